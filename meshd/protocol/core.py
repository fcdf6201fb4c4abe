"""The sans-IO protocol core: one member of one gossip pool.

Shape (aioquic's ``QuicConnection``): the driver owns sockets and the clock.
It hands the core each decoded message with :meth:`Core.receive` and the
current time, calls :meth:`Core.handle_timer` when :meth:`Core.get_timer`
says so, and pulls ``(address, message)`` pairs to send with
:meth:`Core.messages_to_send` and events with :meth:`Core.next_event`.  The
core never reads a clock, opens a socket or draws unseeded randomness, so the
asyncio agent and the simulator run the very same code.  A node's whole
protocol (its LAN core, a bridge's WAN core and the bridge) is one
:class:`~meshd.protocol.host.Host`, which is what the drivers pump.

What it does, and where (``Core`` is the facade and holds membership and
records; each other job is a part of its own, reached through an attribute):

- SWIM failure detection with Lifeguard's local health and buddy system
  (``prober``, prober.py): one probe per (health-scaled) interval over a
  reshuffled member list, indirect probes on a missed ack, then suspicion;
  dynamic suspicion timeouts (suspicion.py) and death here.
- Membership: claims applied through the transition table (members.py) on
  the member table (``table``, member_table.py), refutations, suspicions.
- Dissemination (``gossip``, dissemination.py): membership claims and signed
  origin states ride on pings, acks and gossip rounds through two
  retransmit-limited queues with separate byte budgets.
- Anti-entropy (``anti_entropy``, anti_entropy.py): a periodic sync with one
  random member compares two fingerprints (of the member view and of the
  record store); only where they differ do member lists or record digests
  flow.  Agreeing peers exchange two short messages, so the load per member
  stays flat in the size of the pool.
- Records: this node's own documents (drafted in documents.py), re-signed on
  every change with a version that only grows; other origins' states
  verified before they are stored; dead or left origins kept as tombstones
  until reaped.  Incoming messages reach their part through ``_HANDLERS``.

Trust: nothing a peer says is used before it is verified.  A member enters
a view, and moves its incarnation, address, region or zone, only through its
own signed claim (``MemberUpdate.claim``, verified against the certificate it
carries); accusations count only at the incarnation such a claim put there
(``members.decide``).  Documents, our own included, are verified before
anything reads them; a statement about others (down, unreachable) comes only
from a certificate with the bridge role (the verifier) and is taken only up
to the versions its subject signed.  A message whose signatures keep failing
is dropped after ``MAX_BAD_PER_MESSAGE`` of them, so junk costs a bounded
number of signature checks.

Peer input never raises: a claim that breaks a rule is ignored, a state that
fails verification is counted in ``counters`` and dropped.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from meshd.protocol.anti_entropy import AntiEntropy
from meshd.protocol.awareness import Awareness
from meshd.protocol.bounds import refused_suspicion_timeout
from meshd.protocol.config import Config
from meshd.protocol.dissemination import Dissemination
from meshd.protocol.events import Event, MemberChanged
from meshd.protocol.member_table import MemberTable
from meshd.protocol.members import Member, Move, decide
from meshd.protocol.prober import Prober
from meshd.protocol.records import MAX_BAD_PER_MESSAGE, Records
from meshd.protocol.sampling import below
from meshd.protocol.store import RecordStore, StoreSnapshot
from meshd.protocol.suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_max,
    suspicion_min,
)
from meshd.protocol.vivaldi import Coordinate
from meshd.wire import (
    Ack,
    AppRecord,
    Gossip,
    IndirectPing,
    MemberClaim,
    MemberUpdate,
    Message,
    Nack,
    OriginState,
    Ping,
    PushPull,
    PushPullReply,
    Rejection,
    Revocations,
    SignedClaim,
    SignedState,
    Status,
    member_id,
)


class Signer(Protocol):
    def sign(self, state: OriginState) -> SignedState: ...

    def sign_claim(self, claim: MemberClaim) -> SignedClaim: ...


class Verifier(Protocol):
    def verify(self, signed: SignedState) -> OriginState | Rejection: ...

    def verify_claim(self, signed: SignedClaim) -> MemberClaim | Rejection: ...

    def current(self, cert: bytes) -> Rejection | None: ...


@dataclass(frozen=True, slots=True)
class SharedView:
    """A core's member table and store, frozen to be adopted by other cores.

    See :meth:`Core.snapshot` and :meth:`Core.adopt`.  The tables are the
    snapshotting core's own; every core holding them copies before it changes
    anything (copy-on-write), so none sees another's changes.
    """

    cluster: str
    table: MemberTable
    store: StoreSnapshot
    scoped: dict[str, frozenset[str]]


class Core:
    """One member of a gossip pool, with its own origin state (see module doc)."""

    # Slots: an event touches a core and its parts at once, and in a
    # 10,000-node simulation they are cold in the cache; without an instance
    # dict each is one block less to fetch (and holds no stray attribute).
    __slots__ = (
        "_apps",
        "_bad",
        "_crl",
        "_events",
        "_next_reap",
        "_out",
        "_rng",
        "_signer",
        "_suspicions",
        "_verifier",
        "address",
        "anti_entropy",
        "bridge",
        "cluster",
        "config",
        "counters",
        "down",
        "gateway",
        "gossip",
        "host",
        "id",
        "incarnation",
        "left",
        "left_statement",
        "node_meta",
        "node_name",
        "prober",
        "publisher",
        "records",
        "region",
        "revocation_check",
        "revocation_number",
        "rtt_statement",
        "store",
        "table",
        "unreachable",
        "version",
        "zone",
    )

    def __init__(
        self,
        *,
        config: Config,
        node: str,
        cluster: str,
        address: str,
        signer: Signer,
        verifier: Verifier,
        rng: random.Random,
        now: float,
        region: str = "",
        zone: str = "",
        incarnation: int = 0,
        version: int = 0,
        apps: Iterable[AppRecord] = (),
        publisher: bool = True,
        gateway: str = "",
        host: str = "",
        node_meta: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.config = config
        self.id = member_id(cluster, node)
        self.node_name = node
        self.cluster = cluster
        self.region = region
        self.zone = zone
        self.address = address
        self._signer = signer
        self._verifier = verifier
        self._rng = rng
        #: Counters of what happened that an operator may want to see: rejected
        #: states by reason, impersonation attempts, stale claims, refutations.
        self.counters: Counter[str] = Counter()
        #: SWIM probing and Lifeguard health (prober.py).
        self.prober = Prober(self, config, rng)
        #: Syncs, joins and reconnects (anti_entropy.py).
        self.anti_entropy = AntiEntropy(self)
        self.store = RecordStore()
        #: Documents held and published (records.py).
        self.records = Records(self, self.store)
        self.left = False

        # A restart must outrank everything said about our previous life, so
        # both counters move past what the driver persisted.
        self.incarnation = incarnation + 1
        self.version = version
        self._apps: dict[str, AppRecord] = {a.instance: a for a in apps}
        #: False for a bridge's WAN core: the LAN core publishes this node's
        #: documents and the bridge relays them, so one counter orders them.
        self.publisher = publisher
        self.gateway = gateway
        #: The node's own address and operator metadata, carried in every
        #: document (catalogs in other clusters show them).
        self.host = host
        self.node_meta = node_meta
        self.bridge = False
        self.down: tuple[tuple[str, int], ...] = ()
        self.unreachable: tuple[str, ...] = ()
        #: Bridges only: (cluster, microseconds) statement, see OriginState.rtt.
        self.rtt_statement: tuple[tuple[str, int], ...] = ()
        #: Bridges only: the members of ``down`` that left (OriginState.left).
        self.left_statement: tuple[str, ...] = ()
        #: Our view of the pool (member_table.py): every change goes through it.
        self.table = MemberTable()
        #: Failed verifications in the message being received (see receive).
        self._bad = 0
        #: The CA's revocation list we hold (its number, its DER), spread like
        #: a document: pushed on adoption, pulled by syncs that show a lower
        #: number.  The core cannot read X.509: ``revocation_check`` (set by
        #: the driver) verifies a list and returns its number when it adopted
        #: it, None otherwise.  Without one (a simulator) lists are ignored.
        self.revocation_number = 0
        self._crl = b""
        self.revocation_check: Callable[[bytes], int | None] | None = None
        self._add_member(
            Member(
                self.id,
                address,
                region,
                zone,
                self.incarnation,
                Status.ALIVE,
                now,
                self._own_claim(Status.ALIVE),
            )
        )

        #: The two broadcast queues and gossip rounds (dissemination.py).
        self.gossip = Dissemination(self)
        #: (address, message, recipient): the recipient is the member the
        #: message is for ("" for a seed's address, whose holder we do not
        #: know yet); drivers send only to a connection that proved it.
        self._out: list[tuple[str, Message, str]] = []
        self._events: deque[Event] = deque()

        self._suspicions: dict[str, Suspicion] = {}

        jitter = rng.random()
        self.prober.next_probe = now + config.probe_interval * jitter
        self.anti_entropy.next_digest = now + config.digest_interval * (0.5 + rng.random())
        reconnect = now + config.reconnect_interval * (0.5 + rng.random())
        # An interval of 0 turns reconnecting off: no deadline at all.
        self.anti_entropy.next_reconnect = reconnect if config.reconnect_interval > 0 else math.inf
        self._next_reap = now + self._reap_period

        self.gossip.member_q.push(self.id, self.members[self.id].update_for(Status.ALIVE, self.id))
        if publisher:
            self.records.publish(now)

    # ------------------------------------------------------------------
    # Queries

    @property
    def pool_size(self) -> int:
        """Members alive or suspected, ourselves included (the ``n`` of the formulas)."""
        return self.table.serving

    def member_list(self) -> list[Member]:
        return sorted(self.members.values(), key=lambda m: m.id)

    @property
    def apps(self) -> dict[str, AppRecord]:
        return dict(self._apps)

    def suspicion_bounds(self) -> tuple[float, float]:
        """(min, max) suspicion timeout for the current pool size, in seconds."""
        cfg = self.config
        lo = suspicion_min(cfg.suspicion_mult, self.pool_size, cfg.probe_interval)
        hi = suspicion_max(lo, cfg.suspicion_max_timeout_mult) if cfg.lifeguard else lo
        return lo, hi

    # ------------------------------------------------------------------
    # Driver interface

    def messages_to_send(self) -> list[tuple[str, Message]]:
        """``(address, message)`` in the order they were made (for tests and
        tools; drivers take :meth:`addressed_messages`)."""
        return [(address, msg) for address, msg, _ in self.addressed_messages()]

    def addressed_messages(self) -> Sequence[tuple[str, Message, str]]:
        """``(address, message, recipient)`` in the order they were made.

        ``recipient`` is the member id the message is meant for, or "" when
        we do not know who holds the address (a seed).  A driver must not
        hand a message to a connection whose peer proved another identity:
        the address comes from a peer's word (its claim, a ``source_addr``),
        and a member with a valid certificate may name another agent's
        address there.  It reports such a connection with
        :meth:`report_misplaced`.
        """
        out = self._out
        if not out:
            return ()  # after many events: no new list to make
        self._out = []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def drop_events(self) -> None:
        """Forget pending events (a driver that watches none)."""
        self._events.clear()

    def get_timer(self) -> float:
        """The earliest deadline of any part: the prober's next probe, its
        probe's ack or end, a relay's nack; the next sync, reconnect or join
        retry; the reap; the gossip rounds; a suspicion's expiry."""
        # Asked after every message and timer: each part's deadlines read in
        # place, by comparisons, without a call per part or min() calls.
        prober = self.prober
        t = prober.next_probe
        p = prober.probe
        if p is not None:
            d = p.end if p.indirect else p.ack_deadline
            if d < t:
                t = d
        if prober.relays:
            for r in prober.relays.values():
                if r.deadline < t:
                    t = r.deadline
        ae = self.anti_entropy
        if ae.next_digest < t:
            t = ae.next_digest
        if ae.next_reconnect < t:
            t = ae.next_reconnect
        j = ae.next_join
        if j is not None and j < t:
            t = j
        if self._next_reap < t:
            t = self._next_reap
        g = self.gossip.next_gossip
        if g is not None and g < t:
            t = g
        g = self.gossip.next_hurry
        if g is not None and g < t:
            t = g
        if self._suspicions:  # mostly none: no view and iterator to make
            for s in self._suspicions.values():
                if s.deadline < t:
                    t = s.deadline
        return t

    def handle_timer(self, now: float) -> None:
        """Run what is due by ``now``; each part acts only on its own due
        deadlines, so a call before any of them does nothing (a host calls
        its single core without asking :meth:`get_timer` first)."""
        # Every timer event lands here: a part with nothing pending is not
        # called at all (each still checks its own deadlines when it is).
        prober = self.prober
        if prober.relays:
            prober.expire_relays(now)
        if self._suspicions:
            self._expire_suspicions(now)
        prober.tick(now, self.left)
        gossip = self.gossip
        if gossip.next_gossip is not None or gossip.next_hurry is not None:
            gossip.tick(now)
        ae = self.anti_entropy
        if now >= ae.next_digest or now >= ae.next_reconnect or ae.next_join is not None:
            ae.tick(now)
        if now >= self._next_reap:
            self._next_reap = now + self._reap_period
            self._reap(now)

    def receive(self, msg: Message, now: float, peer: str | None = None) -> None:
        """Handle one decoded message.

        ``peer`` is the member id the transport authenticated (the TLS
        certificate's node); a message claiming another source is dropped.
        """
        if peer is not None and msg.source != peer:
            self.counters["impersonation"] += 1
            return
        if msg.source == self.id:
            return
        self._bad = 0
        if type(msg) is Ack or type(msg) is Ping:
            # Most of what arrives, and never a sync: their own fields, without
            # the lookups with defaults that the other types need.
            members = msg.members
            states = msg.states
            synced = False
        else:
            members = getattr(msg, "members", ())
            states = getattr(msg, "states", ())
            synced = getattr(msg, "sync", False) or isinstance(msg, (PushPull, PushPullReply))
        if synced:
            self._merge_remote_members(msg.source, members, now)
            self.records.merge(states, now, rebroadcast=False)
        else:
            for u in members:
                if self._bad >= MAX_BAD_PER_MESSAGE:
                    break
                self._apply(u, now, via=msg.source)
            if states:  # most probes and acks carry none
                self.records.merge(states, now, rebroadcast=True)
        if self._bad >= MAX_BAD_PER_MESSAGE:
            self.counters["rejected-state:flood"] += 1

        # Acks and pings are most of what arrives: straight to the prober,
        # without the table's extra call.
        if type(msg) is Ack:
            self.prober.on_ack(msg, now)
        elif type(msg) is Ping:
            self.prober.on_ping(msg, now)
        else:
            handler = _HANDLERS.get(type(msg))
            if handler is not None:
                handler(self, msg, now)

    # -- commands ---------------------------------------------------------

    def join(self, addresses: Iterable[str], now: float) -> None:
        """Contact seeds with a full push-pull; retried while we know no one."""
        self.anti_entropy.join(addresses, now)

    def leave(self, now: float) -> None:
        """Graceful leave: tell the pool we left, at our current incarnation."""
        if self.left:
            return
        self.left = True
        me = self._set_status(
            self.members[self.id], Status.LEFT, now, claim=self._own_claim(Status.LEFT)
        )
        update = me.update_for(Status.LEFT, self.id)
        self._queue_member(update, now)
        self.prober.probe = None
        # Do not wait for the next gossip round: the driver may stop soon.
        targets = self._random_members(
            max(self.config.gossip_nodes * 2, 4), lambda m: m.serving and m.id != self.id
        )
        for m in targets:
            self._send(m.address, Gossip(self.id, members=(update,)), m.id)

    def set_app(self, record: AppRecord, now: float) -> int:
        """Register or replace a local instance; returns the new origin version."""
        self._apps[record.instance] = record
        return self._publish_now(now)

    def remove_app(self, instance: str, now: float) -> int | None:
        """Deregister; None when unknown, else the new origin version."""
        if self._apps.pop(instance, None) is None:
            return None
        return self._publish_now(now)

    def set_apps(self, records: Iterable[AppRecord], now: float) -> int:
        self._apps = {r.instance: r for r in records}
        return self._publish_now(now)

    def _publish_now(self, now: float) -> int:
        """Publish a change a local client asked for, and gossip it at once (hurried)."""
        version = self.records.publish(now)
        self.gossip.hurry(now)
        return version

    def set_revocations(self, number: int, crl: bytes, now: float) -> None:
        """Hold the CA revocation list ``crl`` (already verified and newer) and push it on."""
        if number <= self.revocation_number:
            return
        self.revocation_number, self._crl = number, crl
        targets = self._random_members(
            self.config.gossip_nodes, lambda m: m.serving and m.id != self.id
        )
        for m in targets:
            self._send(m.address, Revocations(self.id, crl=crl), m.id)

    def _on_revocations(self, msg: Revocations, now: float) -> None:
        check = self.revocation_check
        if check is None or msg.crl == self._crl:
            return
        if not self.anti_entropy.heavy_ok(msg.source, now):
            return  # checking a list costs a signature verification: rationed per peer
        number = check(msg.crl)
        if number is None or number <= self.revocation_number:
            self.counters["revocations-not-taken"] += 1
            return
        self.set_revocations(number, msg.crl, now)

    def _offer_revocations(self, address: str, source: str, theirs: int, now: float) -> None:
        """Send our list to a peer whose sync showed an older one (rationed:
        a list is up to 256 KiB, a sync frame a few bytes)."""
        if theirs < self.revocation_number and self.anti_entropy.heavy_ok(source, now):
            self._send(address, Revocations(self.id, crl=self._crl), source)

    def set_signer(self, signer: Signer, now: float) -> None:
        """A renewed certificate: sign everything we say with it from now on.

        A new incarnation carries our claim under the new key (the old one may
        expire or be revoked soon, and with it every claim it signed), and
        every document is re-signed under a new version.
        """
        self._signer = signer
        if self.left:
            return
        self._new_life(self.incarnation + 1, now)
        self.gossip.wake(now)
        if self.publisher:
            self.records.publish(now, force=True)

    def report_refused(self, address: str, now: float) -> None:
        """The driver's own connect to ``address`` was refused.

        No process listens there: the member holding that address crashed
        (or is between two lives).  Our own observation, so it may do what no
        peer's word can: start a suspicion of an alive member, and bring ours
        (started here or by anyone's word) down to
        ``bounds.refused_suspicion_timeout``.  The member refutes it like any
        other, by announcing a new incarnation once it listens again.
        Nothing in it comes from a peer (a peer that tells us to connect
        somewhere only learns what the kernel says about that address).
        """
        hit = [
            m
            for m in self.members.values()
            if m.address == address and m.serving and m.id != self.id
        ]
        for m in hit:
            self.counters["refused"] += 1
            self._not_there(m, now)

    def report_misplaced(self, member: str, address: str, now: float) -> None:
        """Our connection to ``address`` proved another identity than ``member``'s.

        The TLS handshake is our own observation, as a refused connect is: no
        process of ``member`` answers at the address its claim names.  Either
        its claim is stale (it moved, or died, and another agent took the
        address) or it names another agent's address on purpose, to have the
        pool's traffic for it sent there.  Both are handled as a refused
        connect: a suspicion on the short timeout, which a live member
        refutes with a new incarnation, at a true address if it wants to stay.
        Nothing meant for it was sent (the driver dropped it).
        """
        m = self.members.get(member)
        if m is None or m.id == self.id or m.address != address or not m.serving:
            return  # it moved since: its new address gets a chance of its own
        self.counters["misplaced"] += 1
        self._not_there(m, now)

    def _not_there(self, m: Member, now: float) -> None:
        """Our own evidence that ``m`` does not answer at its address."""
        if m.status is Status.ALIVE:
            self._apply(m.update_for(Status.SUSPECT, self.id), now)
        s = self._suspicions.get(m.id)
        if s is not None and s.refused(now, refused_suspicion_timeout(self.config)):
            self.counters["refused-suspicion"] += 1

    def report_closed(self, member_or_address: str, now: float) -> None:
        """A connection with a serving member ended without a goodbye (EOF,
        reset, a failed write), as the driver saw it.

        A peer that crashed closes every connection at once; so does a peer
        that merely restarted, and a closed connection proves nothing about
        the peer's health.  So it never makes a suspicion: it only asks for a
        direct probe of the member now rather than in its turn (at most one
        per member per probe interval, ``Prober.probe_now``).  If the member
        is gone, that probe's connect is refused, which is evidence
        (:meth:`report_refused`); if it answers, nothing happened.
        """
        m = self.members.get(member_or_address)
        if m is None:
            m = next(
                (x for x in self.members.values() if x.address == member_or_address and x.serving),
                None,
            )
        if m is None or m.id == self.id or not m.serving or self.left:
            return
        self.counters["closed"] += 1
        self.prober.probe_now(m, now)

    # ------------------------------------------------------------------
    # Own state

    def set_bridge_info(
        self,
        down: Iterable[tuple[str, int]],
        unreachable: Iterable[str],
        now: float,
        rtt: Iterable[tuple[str, int]] = (),
        left: Iterable[str] = (),
    ) -> None:
        """A bridge states which own-cluster members are down (and which of
        them left) and which clusters it cannot reach; republished only when
        it changes."""
        self.bridge = True
        self.left_statement = tuple(sorted(left))
        self.down = tuple(sorted(down))
        self.unreachable = tuple(sorted(unreachable))
        self.rtt_statement = tuple(sorted(rtt))
        self.records.publish(now)

    def docs_of(self, member: str) -> set[str]:
        """Ids of the documents of ``member`` held in the store."""
        return self.records.docs_of(member)

    def recheck_signers(self, now: float) -> int:
        """See :meth:`Records.recheck_signers <meshd.protocol.records.Records.recheck_signers>`."""
        return self.records.recheck_signers(now)

    def snapshot(self) -> SharedView:
        """This core's member table and store, for other cores to :meth:`adopt`.

        Nothing is copied: from now on this core too copies a table before
        changing it.
        """
        return SharedView(
            cluster=self.cluster,
            table=self.table.share(),
            store=self.store.snapshot(),
            scoped={m: frozenset(d) for m, d in self.records.scoped.items()},
        )

    def adopt(self, shared: SharedView) -> None:
        """Take a member table and store built by another core of this cluster.

        The state a full sync with that core builds here, without building
        it: the tables are shared copy-on-write with every core that adopts
        them.  For a simulator's warm-up (ten thousand cores that each list
        ten thousand members would otherwise hold 10^8 entries); afterwards
        the core runs as any other, through ``receive`` and ``handle_timer``.
        No events are raised for what was adopted.  Only a core that knows no
        one yet may adopt, and the view must already list it as it is, with
        its own documents at their current versions.
        """
        me = self.members[self.id]
        listed = shared.table.members.get(self.id)
        if shared.cluster != self.cluster or len(self.members) > 1:
            raise ValueError("only a core that knows no one yet adopts a view of its own cluster")
        if listed is None or listed.update_for(me.status, self.id) != me.update_for(
            me.status, self.id
        ):
            raise ValueError(f"the view does not list {self.id} as it is")
        own = self.records.doc_ids(self.id)
        for doc in own:
            entry = shared.store.entries.get(doc)
            if entry is None or entry.signed != self.store.get(doc).signed:  # type: ignore[union-attr]
                raise ValueError(f"the view does not hold {doc} at its current version")
        self.table = shared.table.share()
        self.store.adopt(shared.store)
        self.records.scoped = {m: set(d) for m, d in shared.scoped.items()}
        self.prober.new_round([])

    def inject(self, signed: SignedState, now: float) -> bool:
        """Take a document from the bridge's other pool (already verified there;
        verified again here, which the shared verifier's cache makes cheap)."""
        before = self.store.version(signed.origin)
        self.records.merge((signed,), now, rebroadcast=True)
        return self.store.version(signed.origin) != before

    @property
    def pool(self) -> str:
        """The pool this core is in: a bridge's WAN core is the one that does not publish."""
        return "lan" if self.publisher else "wan"

    def _own_claim(self, status: Status) -> SignedClaim:
        return self._signer.sign_claim(
            MemberClaim(
                status,
                self.id,
                self.incarnation,
                self.address,
                self.region,
                self.zone,
                self.pool,
            )
        )

    def _new_life(self, incarnation: int, now: float) -> None:
        """Move to ``incarnation``: alive, under a newly signed claim, queued to spread."""
        self.incarnation = incarnation
        me = self._set_status(
            self.members[self.id],
            Status.ALIVE,
            now,
            incarnation,
            claim=self._own_claim(Status.ALIVE),
        )
        self.gossip.member_q.push(self.id, me.update_for(Status.ALIVE, self.id))

    def _refute(self, claim: MemberUpdate, now: float) -> None:
        """Outrun ``claim`` (about us, at an incarnation we signed) with a new one."""
        if self.left:
            return
        self.counters["refutations"] += 1
        self._new_life(max(self.incarnation, claim.incarnation) + 1, now)
        if self.config.lifeguard:
            self.awareness.apply(1)
        if claim.status is Status.DEAD and self.publisher:
            # Bridges may already have told other clusters we are dead as of
            # our current version: a new version is what brings us back there.
            self.records.publish(now, force=True)
        self.gossip.wake(now)

    # ------------------------------------------------------------------
    # Membership

    # Every change to the member table goes through the table's own methods
    # (member_table.py); these add what the core keeps beside it.

    @property
    def members(self) -> dict[str, Member]:
        """member id -> our view of it (read only: change it through the table)."""
        return self.table.members

    @property
    def view(self) -> int:
        """Fingerprint of our member view (see member_table.view_term)."""
        return self.table.view

    def _add_member(self, m: Member) -> None:
        self.table.add(m)
        if m.id != self.id:
            # Among the members not yet probed this round: probed within it.
            self.prober.joined.append(m.id)

    def _remove_member(self, member: str) -> None:
        self.prober.placed.discard(member)
        self.table.remove(member)

    def _set_status(
        self,
        m: Member,
        status: Status,
        now: float,
        incarnation: int | None = None,
        **where: str | SignedClaim | None,
    ) -> Member:
        return self.table.set_status(m, status, now, incarnation, **where)  # type: ignore[arg-type]

    def _verified(self, u: MemberUpdate) -> MemberUpdate | None:
        """An alive or left update rebuilt from its member's verified signed claim.

        Everything but ``by`` comes from the signed body, never from the
        unsigned copies beside it; None (and a count) when it does not verify.
        """
        if u.claim is None:
            self.counters["rejected-claim:unsigned"] += 1
            return None
        claim = self._verifier.verify_claim(u.claim)
        if isinstance(claim, Rejection):
            self._bad += 1
            self.counters[f"rejected-claim:{claim.reason}"] += 1
            return None
        if claim.member != u.member:
            self._bad += 1
            self.counters["rejected-claim:node-mismatch"] += 1
            return None
        if claim.pool != self.pool:
            # Signed by the member, but for its life in the other pool.
            self.counters["rejected-claim:wrong-pool"] += 1
            return None
        return MemberUpdate(
            claim.status,
            claim.member,
            claim.incarnation,
            claim.address,
            claim.region,
            claim.zone,
            claim.member,
            u.claim,
        )

    def _apply(
        self, u: MemberUpdate, now: float, rebroadcast: bool = True, via: str | None = None
    ) -> None:
        """Apply one update; ``via`` is the authenticated peer that delivered it."""
        if u.member == self.id:
            self._about_me(u, now)
            return
        cur = self.members.get(u.member)
        move = decide(cur, u)
        if move is Move.IGNORE:
            self.counters["stale-claims"] += 1
            return
        if u.status in (Status.ALIVE, Status.LEFT):
            if cur is not None and u.claim is not None and u.claim is cur.claim:
                # The very claim we hold (shared in memory): nothing new in it.
                self.counters["stale-claims"] += 1
                return
            # The member's own word: believed only through its signature
            # (checked after the cheap table lookup, so stale repeats cost
            # nothing).
            checked = self._verified(u)
            if checked is None:
                return
            u = checked
            move = decide(cur, u)
            if move is Move.IGNORE:
                self.counters["stale-claims"] += 1
                return
        if move is Move.CONFIRM:
            s = self._suspicions.get(u.member)
            if u.by == u.member:
                # How a full member list carries a suspicion (anti_entropy):
                # no accuser named, so no independent confirmation.  Counting
                # it cut the Lifeguard timeout from max to about half for
                # every suspicion a sync touched (simulations/RESULTS.md).
                return
            if s is not None and self.config.lifeguard and s.confirm(u.by, via):
                # Others count confirmations too: pass it on.
                self._queue_member(u, now)
            return

        old_status = cur.status if cur is not None else None
        if cur is None:
            cur = Member(
                u.member, u.address, u.region, u.zone, u.incarnation, u.status, now, u.claim
            )
            self._add_member(cur)
        elif u.status in (Status.ALIVE, Status.LEFT):
            cur = self._set_status(
                cur,
                u.status,
                now,
                u.incarnation,
                address=u.address,
                region=u.region,
                zone=u.zone,
                claim=u.claim,
            )
        else:
            cur = self._set_status(cur, u.status, now, u.incarnation)

        if u.status is Status.SUSPECT:
            self._start_suspicion(cur, u.by, now, via)
        else:
            self._suspicions.pop(u.member, None)
        if u.status in (Status.DEAD, Status.LEFT):
            for doc in self.records.doc_ids(u.member):
                if self.store.tombstone(doc, now):
                    self.records.origin_event(doc, live=False)
        elif old_status in (Status.DEAD, Status.LEFT):
            for doc in self.records.doc_ids(u.member):
                if self.store.revive(doc):
                    self.records.origin_event(doc, live=True)

        self._events.append(MemberChanged(u.member, u.status, u.incarnation, cur.address))
        if rebroadcast:
            self._queue_member(u, now)

    def _about_me(self, u: MemberUpdate, now: float) -> None:
        """A claim about ourselves: refute what concerns our current life.

        Only an incarnation we signed counts.  An accusation beyond our
        incarnation is invented (we never signed that life) and ignored; an
        alive or left claim beyond it must carry our own signature (a life
        before a restart that lost our counters), and then we move past it.
        """
        if self.left:
            return
        if u.status in (Status.ALIVE, Status.LEFT):
            later = u.incarnation > self.incarnation or (
                u.status is Status.LEFT and u.incarnation == self.incarnation
            )
            if later and u.claim is not self.members[self.id].claim:
                checked = self._verified(u)
                if checked is not None and checked.incarnation >= self.incarnation:
                    self._refute(checked, now)
            return
        if u.incarnation > self.incarnation:
            self.counters["rejected-claim:beyond-signed"] += 1
            return
        if u.incarnation == self.incarnation:  # an older claim is already refuted
            self._refute(u, now)

    def _merge_remote_members(
        self, source: str, updates: Iterable[MemberUpdate], now: float
    ) -> None:
        """Merge a peer's member list (push-pull).

        As memberlist's ``mergeState``: a remote 'dead' becomes a local
        'suspect', so one peer's stale view cannot kill a member outright;
        and nothing is re-gossiped except the sender's claim about itself
        (a joiner), so a sync does not flood the queue with old news.
        """
        for u in updates:
            if self._bad >= MAX_BAD_PER_MESSAGE:
                break
            if u.status is Status.DEAD and u.member != self.id:
                u = dataclasses.replace(u, status=Status.SUSPECT)
            self._apply(u, now, rebroadcast=(u.member == source), via=source)

    def _queue_member(self, u: MemberUpdate, now: float) -> None:
        self.gossip.member_q.push(u.member, u)
        self.gossip.wake(now)

    def _start_suspicion(self, m: Member, by: str, now: float, via: str | None = None) -> None:
        cfg = self.config
        n = self.pool_size
        lo, hi = self.suspicion_bounds()
        k = expected_confirmations(cfg.suspicion_mult, n) if cfg.lifeguard else 0
        # A member never accuses itself: ``by`` is its own id only in a full
        # member list, which names no accuser (see Suspicion).
        accuser = None if by == m.id else by
        self._suspicions[m.id] = Suspicion(now, accuser, k, lo, hi, via)

    def _expire_suspicions(self, now: float) -> None:
        if not self._suspicions:
            return  # mostly none: no list to build on every timer
        expired = [member for member, s in self._suspicions.items() if now >= s.deadline]
        for member in expired:
            m = self.members.get(member)
            s = self._suspicions[member]
            if m is None or m.status is not Status.SUSPECT:
                del self._suspicions[member]
                continue
            # A verdict from our own evidence needs a refusal of a check made
            # now: a grace of one probe timeout, the time a live member takes
            # to answer it (a process that just restarted does).
            cfg = self.config
            if cfg.lifeguard:
                # A sick node (its probes failing) holds its verdict; it
                # looks again each probe interval as its health moves.
                verdict = s.expire(
                    now, cfg.probe_timeout, self.awareness.factor, cfg.probe_interval
                )
            else:
                verdict = s.expire(now, cfg.probe_timeout)
            if verdict == "hold":
                self.counters["verdict-held"] += 1
                continue
            if verdict == "recheck":
                self.counters["refused-recheck"] += 1
                self.prober.probe_now(m, now, force=True)
                continue
            if verdict == "wait":
                self.counters["refused-lifted"] += 1
                continue
            del self._suspicions[member]
            self.counters["declared-dead"] += 1
            # The verdict keeps the round's pace (no hurry): hurried verdicts
            # and refutations went with more false deaths under loss
            # (simulations/RESULTS.md, crash detection from TCP facts).
            self._apply(m.update_for(Status.DEAD, self.id), now)

    # ------------------------------------------------------------------
    # Probing: prober.py (the handler table routes pings, acks and nacks there)

    @property
    def awareness(self) -> Awareness:
        """Our Lifeguard local health (the prober's)."""
        return self.prober.awareness

    @property
    def coord(self) -> Coordinate:
        """Our Vivaldi coordinate."""
        return self.prober.coord

    @property
    def coords(self) -> dict[str, Coordinate]:
        """The last coordinate each member we probed told us (a new dict)."""
        return self.prober.placed.coordinates()

    def estimated_rtt(self, member: str) -> float | None:
        """Predicted round trip to ``member`` in seconds, when we have placed it."""
        return self.prober.estimated_rtt(member)

    # ------------------------------------------------------------------
    # Records: records.py.  Anti-entropy: anti_entropy.py (the handler table
    # routes syncs there).

    # ------------------------------------------------------------------
    # Housekeeping

    @property
    def _reap_period(self) -> float:
        return max(1.0, min(self.config.tombstone_timeout / 10, 60.0))

    def _reap(self, now: float) -> None:
        timeout = self.config.tombstone_timeout
        gone = sorted(n for n in self.table.gone if now - self.members[n].since >= timeout)
        for member in gone:
            self._remove_member(member)
        self.records.reap(now, timeout)

    # ------------------------------------------------------------------
    # Helpers

    def _send(self, address: str, msg: Message, to: str) -> None:
        self._out.append((address, msg, to))

    def _address_of(self, member: str) -> str | None:
        m = self.members.get(member)
        return m.address if m is not None else None

    def _random_members(self, k: int, accept: _Accept) -> list[Member]:
        """Up to ``k`` distinct members passing ``accept``, chosen at random.

        Rejection sampling over the id list keeps this O(k) in large pools;
        a bounded number of tries falls back to a full scan in sparse ones.
        """
        ids = self.table.ids
        if not ids or k <= 0:
            return []
        picked: dict[str, Member] = {}
        tries = 3 * k + 8
        for _ in range(tries):
            if len(picked) >= k:
                break
            m = self.members[ids[below(self._rng, len(ids))]]
            if m.id not in picked and accept(m):
                picked[m.id] = m
        if len(picked) < k:
            rest = [m for m in self.members.values() if m.id not in picked and accept(m)]
            need = min(k - len(picked), len(rest))
            for m in self._rng.sample(rest, need):
                picked[m.id] = m
        return list(picked.values())


_Handler = Callable[[Core, Any, float], None]

#: What each message type does beyond the members and states it carries (which
#: ``Core.receive`` merges for every type): one handler per type, the type
#: checker sees each handler's argument.  A new message type adds its line here.
_HANDLERS: dict[type[Message], _Handler] = {
    Ping: lambda core, msg, now: core.prober.on_ping(msg, now),
    Ack: lambda core, msg, now: core.prober.on_ack(msg, now),
    Nack: lambda core, msg, now: core.prober.on_nack(msg, now),
    IndirectPing: lambda core, msg, now: core.prober.on_indirect_ping(msg, now),
    PushPull: lambda core, msg, now: core.anti_entropy.on_push_pull(msg, now),
    PushPullReply: lambda core, msg, now: core.anti_entropy.on_push_pull_reply(msg, now),
    Revocations: Core._on_revocations,
    Gossip: lambda core, msg, now: None,  # members and states only
}


class _Accept(Protocol):
    def __call__(self, m: Member) -> bool: ...
