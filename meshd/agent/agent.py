"""The asyncio driver of the protocol core: one agent on one node.

It owns what the core must not: the clock (``loop.time()``), the sockets
(``Transport``), the durable state (``StateDB``) and the health checks.  After
every call into the core it *pumps*: sends what the core queued, handles the
core's events, persists a changed incarnation and re-arms one timer at the
core's next deadline.  There is no poll loop.

Durability: a registration is committed to SQLite before the core publishes
it, so an acknowledged registration survives a crash.  Origin versions must
never repeat across restarts (a repeat with other content would be two truths
at one version), so the agent reserves versions in blocks: it persists a
ceiling before publishing past it, and a restart starts above the ceiling.
The blocking-query index is kept the same way (``IndexReservation``): a
restart, even after SIGKILL, serves only indexes above any served before.

Stopping: ``stop_waiting`` (run.py calls it once the API stops accepting)
answers every blocked query at once with the current index and keeps new
ones from blocking, so shutdown never waits for a client's ``wait``.

Atomic requests: a registration is checked against what the node may publish
(``limits.py``) before anything is written, and a write the disk refuses
(``StorageError``) leaves the core untouched; either way the request changed
nothing.  Stored registrations that cannot all be published (written by an
older build, or by hand) are dropped one by one with a log line at start:
stored data never keeps the agent from starting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import msgpack
from cryptography import x509

from meshd.agent.checks import CheckRunner
from meshd.agent.interface import (
    ClusterInfo,
    Endpoint,
    MemberInfo,
    Registration,
    StorageError,
)
from meshd.agent.inventory import DEFAULT_REAP_AFTER, DeadNodes, deregister_after
from meshd.agent.limits import Publisher, publish_problem
from meshd.agent.statedb import IndexReservation, StateDB
from meshd.agent.transport import Transport
from meshd.identity import NodeCert, StateSigner, StateVerifier
from meshd.metrics import Metrics
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy, Policy, parse_policy, policy_to_dict
from meshd.policy.resolve import inventory as policy_inventory
from meshd.policy.resolve import resolve as policy_resolve
from meshd.protocol.bridge import LAN, WAN, Bridge
from meshd.protocol.config import Config
from meshd.protocol.core import Core
from meshd.protocol.events import MemberChanged, OriginChanged
from meshd.protocol.host import Host
from meshd.protocol.reach import Reach, compute_reach
from meshd.protocol.vivaldi import Coordinate
from meshd.revocation import (
    RevocationError,
    RevocationList,
    StaleRevocationList,
    accept,
    load_saved_revocation_list,
    save_revocation_list,
    verify_revocation_list,
)
from meshd.wire import (
    AppRecord,
    Message,
    Rejection,
    SignedState,
    Status,
    WireError,
    doc_member,
)

log = logging.getLogger("meshd.agent")

#: Longest check output kept (Consul truncates at 4 KiB by default).
MAX_OUTPUT = 4096


@dataclass
class _Pool:
    """One gossip pool this agent is in: its listener, and its core once started."""

    name: str
    transport: Transport
    protocol: Config
    advertise: str
    core: Core | None = None


#: Versions reserved per SQLite write (see module doc).  Large enough that a
#: flapping health check does not fsync on every flip.
VERSION_BLOCK = 1000
#: Seconds between writes of the last known peers (for rejoin without --join).
PEER_SAVE_INTERVAL = 2.0
#: Seconds a graceful leave waits for its notice to be written out.
LEAVE_FLUSH_TIMEOUT = 2.0
#: Seconds between checks that the certificates behind held documents still
#: vouch for them (expiry); a revocation list triggers one at once.
SIGNER_RECHECK_INTERVAL = 60.0
#: Seconds between retries of the counter writes a pump makes, after one failed.
STORAGE_RETRY_INTERVAL = 1.0
#: Seconds an answer ranked by measured round trips (``order = "rtt"``) is
#: served before it is ranked again.  Answers are cached per ``generation``;
#: the Vivaldi estimates behind such a ranking move with every ack, which no
#: other part of the generation sees.
RTT_RERANK_INTERVAL = 5.0


class Agent:
    """Implements :class:`meshd.agent.interface.AgentAPI` over a running core."""

    def __init__(
        self,
        *,
        node_cert: NodeCert,
        verifier: StateVerifier,
        transport: Transport,
        metrics: Metrics,
        protocol: Config,
        region: str,
        zone: str,
        advertise: str,
        wan_transport: Transport | None = None,
        wan_protocol: Config | None = None,
        wan_advertise: str = "",
        gateway: str = "",
        policy: Policy | None = None,
        reap_after: float = DEFAULT_REAP_AFTER,
        node_meta: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.node_name = node_cert.node
        self.cluster = node_cert.cluster
        self.region = region
        self.zone = zone
        self.metrics = metrics
        self.topology = Topology(self.node_name, self.cluster, region, zone)
        self.trust_domain = node_cert.trust_domain
        self.gateway = gateway
        #: Published in every document: the node's own address (its gossip
        #: host) and operator metadata, for catalogs in other clusters.
        self.node_host = advertise.rpartition(":")[0].strip("[]")
        self.node_meta = node_meta
        self.policy = policy or Policy(AppPolicy(), {})
        self._policy_generation = 0
        self._ranks_by_rtt = _ranks_by_rtt(self.policy)
        #: Monotonic seconds; replaceable in tests (see ``generation``).
        self.clock: Callable[[], float] = time.monotonic
        self._cert = node_cert
        self._verifier = verifier
        self._transport = transport
        self._db: StateDB = None  # type: ignore[assignment]  # see attach_statedb
        self._loop = asyncio.get_running_loop()
        self.pools: dict[str, _Pool] = {LAN: _Pool(LAN, transport, protocol, advertise)}
        if wan_transport is not None:
            self.pools[WAN] = _Pool(WAN, wan_transport, wan_protocol or Config.wan(), wan_advertise)
        #: The node's protocol (cores and bridge), built by start().
        self.host: Host | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._checks: dict[str, Registration] = {}
        self._persisted: dict[str, int] = {}
        self._version_ceiling = 0
        self._index: IndexReservation | None = None
        #: Set once the agent stops: blocking queries answer at once.
        self._stopping = False
        self._peers_changed = asyncio.Event()
        self._peer_task: asyncio.Task[None] | None = None
        self._recheck_task: asyncio.Task[None] | None = None
        self.core: Core | None = None
        self._reach: tuple[int, Reach] | None = None
        self._reported: Counter[str] = Counter()  # core counters already exported
        self._clusters_lost = 0  # the bridge watch's ``lost`` already exported
        #: Dead nodes' last documents, so the inventory lists them critical.
        self.dead = DeadNodes(reap_after)
        self._dead_reap: asyncio.TimerHandle | None = None
        self._dead_reap_at = math.inf
        #: What of ``dead`` is in the state file, and what to write there:
        #: origin -> (signed state as msgpack, wall time it died).
        self._dead_saved: set[str] = set()
        self._dead_dirty: dict[str, tuple[bytes, float]] = {}
        self._dead_saved_generation = -1
        self._members_generation = 0
        #: Local instances critical with DeregisterCriticalServiceAfter: the
        #: timer that deregisters each (Consul's agent-side reaper).
        self._reapers: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[bool]] = set()
        #: Consul's check Output as reported with a TTL status (the runner
        #: keeps its own probes' output), and maintenance mode per instance.
        self._outputs: dict[str, str] = {}
        self._maintenance: dict[str, str] = {}
        self._health_before: dict[str, str] = {}
        # Instance -> (status, output, expires on the wall clock) of the last
        # TTL report stored, to tell which reports need a write.
        self._ttl_stored: dict[str, tuple[str, str, float]] = {}
        self.runner = CheckRunner(self._on_check_status)
        #: The CA's revocation list in force: refused at every handshake and
        #: every verification (the predicates below read it).
        self._revocations: RevocationList | None = None
        verifier.revoked = self._is_revoked
        for pool in self.pools.values():
            pool.transport.on_message = self._receiver(pool)
            pool.transport.on_refused = self._refusal(pool)
            pool.transport.on_closed = self._closure(pool)
            pool.transport.on_misplaced = self._misplacement(pool)
            pool.transport.revoked = self._is_revoked

    # ------------------------------------------------------------------
    # Life cycle

    def attach_statedb(self, statedb: StateDB) -> None:
        """Hand over the durable state (opened last, after the listeners bound)."""
        self._db = statedb
        errors = self.metrics.storage_errors
        statedb.on_error = lambda err: errors.labels("full" if err.full else "error").inc()

    @property
    def storage_error(self) -> str | None:
        return None if self._db is None else self._db.problem

    def start(self, join: list[str], wan_join: list[str] | None = None) -> None:
        """Build the core from the durable state and contact peers."""
        self._storage_retry_at = 0.0
        regs = self._publishable(self._db.load_registrations())
        incarnation = self._db.get_counter("incarnation")
        version = self._db.get_counter("version")
        self._version_ceiling = version + VERSION_BLOCK
        # The core moves past both counters by one; persist before it speaks.
        self._persisted_incarnation = incarnation + 1
        self._db.set_counters(incarnation=incarnation + 1, version=self._version_ceiling)
        # Wall-clock time only raises the start; the stored ceiling keeps it
        # above the last life's whatever the clock says (statedb.py).
        self._index = IndexReservation(self._db, time.time())
        apps = []
        maintenance = self._db.load_maintenance()
        ttl_states = self._db.load_check_states()
        wall = time.time()
        ttl_left: dict[str, float] = {}
        for reg in regs:
            # A checked instance is not routed to until its check passes again
            # (as Consul does after a restart): the app may have died with us.
            record = reg.record if reg.check is None else replace(reg.record, health="critical")
            state = ttl_states.get(record.instance)
            if reg.check is not None and reg.check.kind == "ttl" and state is not None:
                # Except what its app reported on a TTL check that has not
                # run out yet (Consul keeps a TTL check's state too): the
                # report vouches for the app until then, restart or not.
                status, output, expires = state
                if expires > wall:
                    record = replace(record, health=status)
                    ttl_left[record.instance] = expires - wall
                    self._ttl_stored[record.instance] = state
                    if output:
                        self._outputs[record.instance] = output
            reason = maintenance.get(record.instance)
            if reason is not None:
                # Still in maintenance: critical until taken out, which
                # restores what the check or the registration says.
                self._maintenance[record.instance] = reason
                self._health_before[record.instance] = record.health
                record = replace(record, health="critical")
            apps.append(record)
            self._checks[reg.record.instance] = reg
        now = self._loop.time()

        def make(pool: _Pool, incarnation: int) -> Core:
            return Core(
                config=pool.protocol,
                node=self.node_name,
                cluster=self.cluster,
                region=self.region,
                zone=self.zone,
                address=pool.advertise,
                signer=StateSigner(self._cert),
                verifier=self._verifier,
                rng=random.Random(),
                now=now,
                incarnation=incarnation,
                version=version,
                apps=apps if pool.name == LAN else (),
                publisher=pool.name == LAN,
                gateway=self.gateway,
                host=self.node_host,
                node_meta=self.node_meta,
            )

        lan = self.pools[LAN]
        lan_core = lan.core = self.core = make(lan, incarnation)
        self._persisted[LAN] = incarnation + 1
        wan = self.pools.get(WAN)
        wan_core = None
        if wan is not None:
            wan_inc = self._db.get_counter("wan_incarnation")
            self._db.set_counters(wan_incarnation=wan_inc + 1)
            self._persisted[WAN] = wan_inc + 1
            wan_core = wan.core = make(wan, wan_inc)
        self.host = Host(lan_core, now, wan=wan_core)
        for record in apps:
            reg = self._checks[record.instance]
            if reg.check is not None:
                left = ttl_left.get(record.instance)
                initial = (
                    "critical"
                    if left is None
                    else self._health_before.get(record.instance, record.health)
                )
                self.runner.start(record.instance, reg.check, initial=initial, ttl_left=left)
        seeds = join or self._db.load_peers()
        if seeds:
            lan_core.join(seeds, now)
        wan_seeds = wan_join or (self._db.load_peers(WAN) if wan is not None else [])
        if wan_core is not None and wan_seeds:
            wan_core.join(wan_seeds, now)
        self._load_dead()
        self._pump()
        self._peer_task = self._loop.create_task(self._save_peers_loop())
        self._recheck_task = self._loop.create_task(self._recheck_signers_loop())
        for record in apps:
            self._arm_reaper(record.instance, record, record.health)
        for pool in self.pools.values():
            if pool.core is not None:
                pool.core.revocation_check = self._revocation_from_peer
        saved = load_saved_revocation_list(self._db.path.parent, self.ca_certs)
        if saved is not None:
            self._adopt_revocations(saved)

    # ------------------------------------------------------------------
    # Revocation

    def _is_revoked(self, serial: int) -> bool:
        held = self._revocations
        return held is not None and held.is_revoked(serial)

    @property
    def ca_certs(self) -> Sequence[x509.Certificate]:
        return [self._cert.ca_cert]

    def revocations(self) -> RevocationList | None:
        return self._revocations

    async def put_revocations(self, rl: RevocationList) -> RevocationList:
        if not accept(self._revocations, rl):
            assert self._revocations is not None
            return self._revocations  # the list held, offered again
        self._keep_revocations(rl)
        self._adopt_revocations(rl)
        return rl

    def _keep_revocations(self, rl: RevocationList) -> None:
        try:
            save_revocation_list(self._db.path.parent, rl)
        except RevocationError as exc:
            # In force in memory all the same: refusing a revoked certificate
            # now matters more than remembering it across a restart.
            log.error("revocation list %d not kept in the state directory: %s", rl.number, exc)

    def _adopt_revocations(self, rl: RevocationList) -> None:
        self._revocations = rl
        now = self._loop.time()
        for pool in self.pools.values():
            if pool.core is not None:
                pool.core.set_revocations(rl.number, rl.der, now)
        log.warning(
            "revocation list %d in force: %d certificates revoked", rl.number, len(rl.serials)
        )
        for pool in self.pools.values():
            pool.transport.drop_revoked()
        self.recheck_signers()

    def _revocation_from_peer(self, der: bytes) -> int | None:
        """The cores' ``revocation_check``: verify a list a peer pushed, adopt it if newer."""
        got = verify_revocation_list(der, self.ca_certs, now=datetime.now(UTC))
        if not isinstance(got, RevocationList):
            self.metrics.rejected.labels(f"revocations:{got.reason}").inc()
            return None
        try:
            if not accept(self._revocations, got):
                return None
        except StaleRevocationList as exc:
            self.metrics.rejected.labels(f"revocations:{exc.verdict}").inc()
            return None
        self._keep_revocations(got)
        self._adopt_revocations(got)
        return got.number

    async def _recheck_signers_loop(self) -> None:
        while True:
            await asyncio.sleep(SIGNER_RECHECK_INTERVAL)
            self.recheck_signers()

    def recheck_signers(self) -> int:
        """Stop serving documents whose signer expired or was revoked since."""
        now = self._loop.time()
        dropped = 0
        for pool in self.pools.values():
            if pool.core is not None:
                dropped += pool.core.recheck_signers(now)
        if dropped:
            log.warning("stopped serving %d documents whose certificates no longer hold", dropped)
        self._pump()
        return dropped

    def rotate(self, node_cert: NodeCert) -> None:
        """A renewed certificate for this node: sign every claim and document with it.

        The caller (SIGHUP, the certificate-file watcher) has checked that it
        names this node and cluster and chains to the CA.
        """
        if (node_cert.node, node_cert.cluster) != (self.node_name, self.cluster):
            raise ValueError(
                f"certificate for {node_cert.member_id}, not {self.cluster}/{self.node_name}"
            )
        self._cert = node_cert
        now = self._loop.time()
        for pool in self.pools.values():
            if pool.core is not None:
                self._reserve_version(pool.core.version + 1)
                pool.core.set_signer(StateSigner(node_cert), now)
        log.info("signing with the certificate of serial %x from now on", node_cert.serial)
        self._pump()

    def _publishable(self, regs: list[Registration]) -> list[Registration]:
        """The stored registrations this node can publish, oldest first; each
        one it cannot gets a log line and is removed from the state file."""
        who = Publisher(
            self.node_name,
            self.cluster,
            self.region,
            self.zone,
            self.gateway,
            host=self.node_host,
            node_meta=self.node_meta,
        )
        if publish_problem((r.record for r in regs), who) is None:
            return regs
        kept: list[Registration] = []
        for reg in regs:
            problem = publish_problem([k.record for k in kept] + [reg.record], who, reg.record)
            if problem is None:
                kept.append(reg)
                continue
            instance = reg.record.instance
            log.error("not publishing stored registration %r: %s", instance, problem)
            # Logged by the state file if it fails; unpublished either way.
            # Removing a row publishes nothing, so it takes no version.
            with contextlib.suppress(StorageError):
                self._db.delete_registration(instance, None)
        return kept

    @property
    def bridge(self) -> Bridge | None:
        return self.host.bridge if self.host is not None else None

    def stop_waiting(self) -> None:
        """Answer every blocked query now, and let none block from here on.

        Called first when the agent stops: a client's ``wait`` (up to minutes)
        must not hold the process, its port or its state directory.  The
        queries answer as at the end of their wait, with the current index,
        which is what Consul does on shutdown too.
        """
        self._stopping = True
        self._changed.set()
        self._changed = asyncio.Event()

    async def stop(self, leave: bool = True) -> None:
        """Graceful leave (when asked), then close everything we opened."""
        self.stop_waiting()
        if self._timer is not None:
            self._timer.cancel()
        if self.host is not None and leave:
            self.host.leave(self._loop.time())
            self._pump(rearm=False)
            await asyncio.gather(
                *(p.transport.flush(LEAVE_FLUSH_TIMEOUT) for p in self.pools.values())
            )
        if self._peer_task is not None:
            self._peer_task.cancel()
        if self._recheck_task is not None:
            self._recheck_task.cancel()
        await self.runner.stop_all()
        for handle in self._reapers.values():
            handle.cancel()
        if self._dead_reap is not None:
            self._dead_reap.cancel()
        self._reapers.clear()
        self._save_peers()
        for pool in self.pools.values():
            await pool.transport.close()

    # ------------------------------------------------------------------
    # Pumping the cores

    @property
    def _core(self) -> Core:
        assert self.core is not None, "agent not started"
        return self.core

    def _receiver(self, pool: _Pool) -> Callable[[str, Message], None]:
        def on_message(peer: str, msg: Message) -> None:
            if self.host is None:
                return
            self.host.receive(pool.name, msg, self._loop.time(), peer=peer)
            self._pump()

        return on_message

    def _refusal(self, pool: _Pool) -> Callable[[str], None]:
        def on_refused(address: str) -> None:
            if self.host is None:
                return
            self.host.report_refused(pool.name, address, self._loop.time())
            self._pump()

        return on_refused

    def _closure(self, pool: _Pool) -> Callable[[str], None]:
        def on_closed(member_or_address: str) -> None:
            if self.host is None:
                return
            self.host.report_closed(pool.name, member_or_address, self._loop.time())
            self._pump()

        return on_closed

    def _misplacement(self, pool: _Pool) -> Callable[[str, str], None]:
        def on_misplaced(member: str, address: str) -> None:
            if self.host is None:
                return
            self.host.report_misplaced(pool.name, member, address, self._loop.time())
            self._pump()

        return on_misplaced

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.host is not None:
            self.host.handle_timer(self._loop.time())
        self._pump()

    def _pump(self, rearm: bool = True) -> None:
        """Send, handle events, persist, re-arm: after every call into the host
        (or directly into a core: the host first collects what that produced)."""
        host = self.host
        if host is None:
            return
        host.settle(self._loop.time())
        for pool_name, address, msg, to in host.messages_to_send():
            self.pools[pool_name].transport.send(address, msg, to)
        changed = False
        for pool_name, event in host.events():
            if isinstance(event, MemberChanged):
                self._members_generation += 1
                self._peers_changed.set()
                changed = True
                log.info("%s member %s is %s", pool_name, event.member, event.status.label)
                if pool_name == LAN and event.status is Status.LEFT:
                    self.dead.left(event.member)
            elif isinstance(event, OriginChanged):
                changed = True
                if pool_name == LAN:
                    self._remember(event)
        self._persist_counters()
        bridge = host.bridge
        if bridge is not None and bridge.watch.lost > self._clusters_lost:
            self.metrics.clusters_lost.inc(bridge.watch.lost - self._clusters_lost)
            self._clusters_lost = bridge.watch.lost
            log.warning(
                "cluster watch: no answer from %s; held unreachable from this bridge",
                ", ".join(sorted(bridge.watch.unreachable())),
            )
        for pool in self.pools.values():
            core = pool.core
            if core is None:
                continue
            for reason, count in core.counters.items():
                # States keep their bare reasons (as before); member claims
                # are told apart by a "claim:" prefix.
                if reason.startswith(("rejected-state:", "rejected-claim:")) or (
                    reason == "impersonation"
                ):
                    label = f"{pool.name}:{reason}"
                    delta = count - self._reported.get(label, 0)
                    if delta:
                        name = reason.removeprefix("rejected-state:").replace(
                            "rejected-claim:", "claim:"
                        )
                        self.metrics.rejected.labels(name).inc(delta)
                        self._reported[label] = count
        if rearm:
            at = host.get_timer()
            if self._timer_at is None or at < self._timer_at - 1e-4 or at > self._timer_at:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self._loop.call_at(max(at, self._loop.time()), self._on_timer)
                self._timer_at = at
        self._arm_dead_reaper()
        self._save_dead()
        if changed:
            self.update_gauges()
            self._changed.set()
            self._changed = asyncio.Event()

    def _save_dead(self) -> None:
        """Keep the state file's dead documents in step with ``dead`` (best effort)."""
        if self.dead.generation == self._dead_saved_generation or self._db is None:
            return
        self._dead_saved_generation = self.dead.generation
        held = self.dead.origins()
        added = [(o, b, t) for o, (b, t) in self._dead_dirty.items() if o in held]
        removed = self._dead_saved - held
        self._dead_dirty.clear()
        if added or removed:
            self._db.save_dead(added, removed)
        self._dead_saved = held

    def _load_dead(self) -> None:
        """Dead nodes remembered before a restart, verified again (a signer may
        have expired or been revoked since)."""
        now, wall = self._loop.time(), time.time()
        for origin, body, since in self._db.load_dead():
            self._dead_saved.add(origin)
            try:
                signed = SignedState.from_wire(msgpack.unpackb(body, raw=False))
            except (ValueError, WireError, msgpack.UnpackException):
                continue
            state = self._verifier.verify(signed)
            if isinstance(state, Rejection) or signed.origin != origin:
                continue
            self.dead.died(origin, state, now - max(0.0, wall - since))
        self.dead.reap(now)
        self._dead_saved_generation = -1  # what did not come back is removed at once

    def _arm_dead_reaper(self) -> None:
        """A timer at the dead-node memory's next deadline (inventory.py)."""
        at = self.dead.next_deadline
        if at == self._dead_reap_at:
            return
        if self._dead_reap is not None:
            self._dead_reap.cancel()
            self._dead_reap = None
        self._dead_reap_at = at
        if at != math.inf:
            self._dead_reap = self._loop.call_at(at, self._reap_dead, at)

    def _reap_dead(self, at: float) -> None:
        self._dead_reap, self._dead_reap_at = None, math.inf
        # asyncio may run a timer a clock tick early: it is due at ``at``.
        if self.dead.reap(max(self._loop.time(), at)):
            self._persist_counters()  # the index moved: keep its ceiling ahead
            self._save_dead()
            self._changed.set()
            self._changed = asyncio.Event()
        self._arm_dead_reaper()

    def _remember(self, event: OriginChanged) -> None:
        """Keep a dead node's last document for the inventory (inventory.py)."""
        if event.live:
            self.dead.forget(event.origin)
            return
        core = self._core
        entry = core.store.get(event.origin)
        member = doc_member(event.origin)
        if entry is None or member == core.id:
            return
        m = core.members.get(member)
        if (m is not None and m.status is Status.LEFT) or (
            m is None and member in core.records.left_at
        ):
            self.dead.left(member)
        elif (m is not None and m.status is Status.DEAD) or (
            m is None and member in core.records.dead_as_of
        ):
            # Dead by our own membership, or by its cluster's bridges.  Not a
            # document whose signer was revoked or expired: that one is
            # untrusted, not a dead node's, and is not listed at all.
            now = self._loop.time()
            self.dead.died(event.origin, entry.state, now)
            since = self.dead.since(event.origin)
            if since is not None:
                body = msgpack.packb(entry.signed.to_wire(), use_bin_type=True)
                self._dead_dirty[event.origin] = (body, time.time() - (now - since))

    def _persist_counters(self) -> None:
        """Write what the cores moved on their own: incarnations (refutes) and a
        version ceiling well ahead of the LAN core (it also publishes bridge
        statements and re-signs unasked).  Called after every pump.

        A refused write must not escape: the pump would stop before re-arming
        the timers.  It is logged and counted by the state file and retried,
        at most once per STORAGE_RETRY_INTERVAL so a full disk is not hammered.
        """
        now = self._loop.time()
        if now < self._storage_retry_at:
            return
        try:
            lan = self.pools[LAN].core
            if lan is not None:
                self._reserve_version(lan.version + VERSION_BLOCK // 2)
                if self._index is not None:
                    self._index.reserve(self._changes())
            for pool in self.pools.values():
                core = pool.core
                if core is not None and core.incarnation != self._persisted.get(pool.name):
                    key = "incarnation" if pool.name == LAN else "wan_incarnation"
                    self._db.set_counters(**{key: core.incarnation})
                    self._persisted[pool.name] = core.incarnation
        except StorageError:
            self._storage_retry_at = now + STORAGE_RETRY_INTERVAL

    def _reserve_version(self, upcoming: int) -> None:
        """Persist a new ceiling before the core publishes past the old one.

        Synchronous, on the loop, so no other write of the counter interleaves
        (one fsync per VERSION_BLOCK versions).  StorageError: nothing changed.
        """
        if upcoming >= self._version_ceiling:
            ceiling = upcoming + VERSION_BLOCK
            self._db.set_counters(version=ceiling)
            # Only once it is on disk: a ceiling in memory alone would let the
            # core publish versions a restart would hand out again.
            self._version_ceiling = ceiling

    async def _save_peers_loop(self) -> None:
        # Save at once after a change (a crash right after joining must still
        # find its peers on restart), then at most once per interval.
        while True:
            await self._peers_changed.wait()
            self._peers_changed.clear()
            self._save_peers()
            await asyncio.sleep(PEER_SAVE_INTERVAL)

    def _save_peers(self) -> None:
        for pool in self.pools.values():
            core = pool.core
            if core is None:
                continue
            peers = [(m.address, m.id) for m in core.member_list() if m.id != core.id and m.serving]
            if peers:
                self._db.save_peers(peers, pool.name)

    # ------------------------------------------------------------------
    # AgentAPI

    @property
    def index(self) -> int:
        # The store counts this life's changes; the reservation puts them
        # above every earlier life's and caps them at what is on disk.
        assert self._index is not None, "agent not started"
        return self._index.value(self._changes())

    def _changes(self) -> int:
        """This life's changes of what answers list: records held, and dead
        nodes remembered or reaped (both only grow)."""
        return self._core.store.index + self.dead.generation

    @property
    def generation(self) -> tuple[int, int, int, int, int]:
        # Reach is computed from the store, so the store index covers it;
        # membership moves node addresses and health in Consul answers; a
        # policy that ranks by round trips moves every RTT_RERANK_INTERVAL.
        return (
            self._core.store.index,
            self._policy_generation,
            self.dead.generation,
            self._members_generation,
            int(self.clock() // RTT_RERANK_INTERVAL) if self._ranks_by_rtt else 0,
        )

    async def register(self, reg: Registration) -> int:
        async with self._lock:
            core = self._core
            record = reg.record
            if reg.check is not None and reg.check.kind == "ttl":
                # As Consul: a TTL-checked app is not routed to before it reports.
                old = self._checks.get(record.instance)
                same_check = old is not None and old.check == reg.check
                status = self.runner.status(record.instance) if same_check else None
                record = replace(record, health=status or "critical")
            elif reg.check is not None:
                record = replace(record, health="critical")
            if record.instance in self._maintenance:
                # Maintenance holds the instance critical until it is taken
                # out, whatever a new registration says (a client registering
                # again on restart must not end it); taking it out restores
                # what this registration said.
                self._health_before[record.instance] = record.health
                record = replace(record, health="critical")
            apps = core.apps
            apps[record.instance] = record
            problem = publish_problem(apps.values(), Publisher.of(core), record)
            if problem is not None:
                raise ValueError(problem)
            # Both writes raise StorageError with nothing of this request
            # stored; the core is touched only after they succeeded.
            self._reserve_version(core.version + 1)
            await asyncio.to_thread(self._db.put_registration, reg, None)
            version = core.set_app(record, self._loop.time())
            self._arm_reaper(record.instance, record, record.health)
            old = self._checks.get(record.instance)
            self._checks[record.instance] = reg
            if old is None or old.check != reg.check:
                # put_registration dropped the stored report of the old check.
                self._ttl_stored.pop(record.instance, None)
                self.runner.stop(record.instance)
                if reg.check is not None:
                    self.runner.start(record.instance, reg.check, initial=record.health)
            self._pump()
            return version

    async def deregister(self, instance: str) -> bool:
        async with self._lock:
            core = self._core
            if instance not in core.apps:
                return False
            self._reserve_version(core.version + 1)
            await asyncio.to_thread(self._db.delete_registration, instance, None)
            core.remove_app(instance, self._loop.time())
            self._checks.pop(instance, None)
            self.runner.stop(instance)
            reaper = self._reapers.pop(instance, None)
            if reaper is not None:
                reaper.cancel()
            self._outputs.pop(instance, None)
            self._maintenance.pop(instance, None)
            self._health_before.pop(instance, None)
            self._ttl_stored.pop(instance, None)
            self._pump()
            return True

    async def set_health(self, instance: str, status: str, output: str = "") -> bool:
        # Under the lock: a registration replacing this one meanwhile must
        # not be overwritten by the copy stored below.
        async with self._lock:
            if instance not in self._core.apps:
                return False
            reg = self._checks.get(instance)
            if reg is not None and reg.check is not None:
                if reg.check.kind == "ttl":
                    # Stored before it takes effect (StorageError: nothing
                    # changed), so a restart within the TTL keeps it.
                    await self._store_ttl_report(instance, reg.check.ttl, status, output)
                    self.runner.report_ttl(instance, status)
            elif reg is not None and reg.record.health != status:
                # No check finds an unchecked instance's health again after a
                # restart (a checked one restarts critical until its check
                # passes), so what the app said is stored with its
                # registration before it takes effect; StorageError: nothing
                # changed.  Only changes are written: repeating a status is free.
                stored = Registration(replace(reg.record, health=status), None)
                await asyncio.to_thread(self._db.put_registration, stored, None)
                self._checks[instance] = stored
            self._outputs[instance] = output[:MAX_OUTPUT]
            if instance not in self._maintenance:
                self._set_health(instance, status)
            elif reg is None or reg.check is None:
                # Taking it out of maintenance restores the app's latest word.
                self._health_before[instance] = status
            return True

    async def _store_ttl_report(self, instance: str, ttl: float, status: str, output: str) -> None:
        """Store a TTL report unless the stored one says the same and has more
        than half its TTL left.

        So an app reporting every few seconds costs a write per half TTL, not
        one per report, and a restart keeps its status for at least half a
        TTL after its last report (never longer than a whole one): it reports
        again before then or turns critical, as without the restart.
        """
        output = output[:MAX_OUTPUT]
        wall = time.time()
        stored = self._ttl_stored.get(instance)
        same = stored is not None and stored[:2] == (status, output)
        if same and stored is not None and stored[2] - wall > ttl / 2:
            return
        expires = wall + ttl
        try:
            await asyncio.to_thread(self._db.set_check_state, instance, status, output, expires)
        except StorageError:
            if not same:
                raise  # a change the disk refused: refused, nothing changed
            # Only the end moved: what is stored is still what the app says,
            # with an earlier end, so a full disk does not turn a healthy app
            # critical.  The state file counted it and shows it degraded.
            log.debug("TTL report of %s not stored: the disk refused", instance)
            return
        self._ttl_stored[instance] = (status, output, expires)

    def check_outputs(self) -> dict[str, str]:
        out = dict(self._outputs)
        for instance in self._checks:
            ran = self.runner.output(instance)
            if ran and instance not in out:
                out[instance] = ran[:MAX_OUTPUT]
        for instance, reason in self._maintenance.items():
            out[instance] = f"maintenance mode: {reason}" if reason else "maintenance mode"
        return out

    async def set_maintenance(self, instance: str, enable: bool, reason: str) -> bool:
        async with self._lock:
            if instance not in self._core.apps:
                return False
            if enable == (instance in self._maintenance) and (
                not enable or self._maintenance[instance] == reason
            ):
                return True  # nothing to store or publish
            # Stored before it takes effect (StorageError: nothing changed),
            # so a restart keeps the instance out of service.
            await asyncio.to_thread(self._db.set_maintenance, instance, reason if enable else None)
            if enable:
                if instance not in self._maintenance:
                    self._health_before[instance] = self._core.apps[instance].health
                self._maintenance[instance] = reason
                self._set_health(instance, "critical")
            elif instance in self._maintenance:
                del self._maintenance[instance]
                ran = self.runner.status(instance)
                self._set_health(instance, ran or self._health_before.pop(instance, "passing"))
            return True

    def coordinates(self) -> list[tuple[str, str, Coordinate]]:
        core = self._core
        out = [(self.node_name, self.cluster, core.coord)]
        for member, coord in sorted(core.coords.items()):
            m = core.members.get(member)
            if m is not None:
                out.append((m.name, m.cluster, coord))
        return out

    def _on_check_status(self, instance: str, status: str) -> None:
        self._outputs.pop(instance, None)  # the runner's own output is newer
        if instance in self._maintenance:
            return  # maintenance holds it critical until taken out
        if self.core is not None and instance in self.core.apps:
            try:
                self._set_health(instance, status)
            except StorageError:
                # No version could be reserved, so none is published; the
                # state file logged and counted it, health shows it degraded.
                log.warning("instance %s is %s, not published: cannot store", instance, status)

    def _set_health(self, instance: str, status: str) -> None:
        core = self._core
        record = core.apps.get(instance)
        if record is None or record.health == status:
            return
        self._reserve_version(core.version + 1)
        core.set_app(replace(record, health=status), self._loop.time())
        log.info("instance %s is %s", instance, status)
        self._arm_reaper(instance, record, status)
        self._pump()

    def _arm_reaper(self, instance: str, record: AppRecord, status: str) -> None:
        """DeregisterCriticalServiceAfter: deregister an instance critical that long."""
        old = self._reapers.pop(instance, None)
        if old is not None:
            old.cancel()
        limit = deregister_after(record)
        if status != "critical" or limit is None:
            return

        def reap() -> None:
            self._reapers.pop(instance, None)
            log.warning("instance %s critical for %s s: deregistered", instance, limit)
            task = self._loop.create_task(self.deregister(instance))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        self._reapers[instance] = self._loop.call_later(limit, reap)

    def local_registrations(self) -> list[Registration]:
        core = self._core
        out = []
        for instance, record in sorted(core.apps.items()):
            reg = self._checks.get(instance)
            out.append(Registration(record, reg.check if reg is not None else None))
        return out

    def reach(self) -> Reach:
        """The bridges' statements summed up, recomputed only after a change."""
        core = self._core
        if self._reach is None or self._reach[0] != core.store.index:
            self._reach = (core.store.index, compute_reach(self.cluster, core.store.live()))
        return self._reach[1]

    def resolve(
        self, app: str, namespace: str, policy: str | None, include_unhealthy: bool
    ) -> tuple[int, list[Endpoint]]:
        if policy not in (None, "", "default"):
            raise KeyError(policy)
        core = self._core
        index = self.index
        answers = policy_resolve(
            self.topology,
            core.store,
            self.reach(),
            self.policy.for_app(app, namespace),
            app,
            namespace,
            include_unhealthy=include_unhealthy,
            trust_domain=self.trust_domain,
            node_rtt=core.estimated_rtt,
        )
        return index, answers

    def records(self) -> list[dict[str, Any]]:
        store = self._core.store
        out = []
        for signed in store.signed_states():
            entry = store.get(signed.origin)
            assert entry is not None
            st = entry.state
            out.append(
                {
                    "origin": signed.origin,
                    "version": signed.version,
                    "cluster": st.cluster,
                    "node": st.node,
                    "scope": st.scope or "*",
                    "served": entry.tombstone_since is None and self.reach().serves(st.member),
                    "bridge": st.bridge,
                    "apps": [a.instance for a in st.apps],
                    # Which certificate signed it: shows a rotation reaching peers.
                    "signer": f"{self._verifier.serial_of(signed.cert) or 0:x}",
                }
            )
        return out

    def policy_json(self) -> dict[str, Any]:
        return policy_to_dict(self.policy)

    def put_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        self.set_policy(parse_policy(data, source="PUT /v1/policy"))
        log.info("policy replaced through the API")
        return self.policy_json()

    def set_policy(self, policy: Policy) -> None:
        """Apply a new policy at once (PUT /v1/policy, file edit, SIGHUP)."""
        self.policy = policy
        self._ranks_by_rtt = _ranks_by_rtt(policy)
        self._policy_generation += 1
        self._changed.set()  # blocked lookups re-answer under the new order
        self._changed = asyncio.Event()

    async def wait_for_index(self, index: int, timeout: float) -> int:
        # Blocks only while the client holds exactly the current index.  A
        # higher one was never served by this agent (the index never goes
        # back): it comes from another agent or a lost state directory, and
        # waiting would hide every change until the wait ends; the answer's
        # lower index tells a Consul client to start over from it.
        # A new policy reorders answers without touching the records: it ends
        # the wait too (same index; a client that wants changes only re-blocks).
        deadline = self._loop.time() + timeout
        policy = self._policy_generation
        while self.index == index and self._policy_generation == policy and not self._stopping:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                break
        return self.index

    def app_names(self) -> dict[str, set[str]]:
        names: dict[str, set[str]] = {}
        for entry in self._core.store.live():
            for rec in entry.state.apps:
                names.setdefault(rec.namespace, set()).add(rec.app)
        for _, rec in self.dead.records(self._loop.time()):
            names.setdefault(rec.namespace, set()).add(rec.app)
        return names

    def inventory(self, app: str, namespace: str) -> tuple[int, list[Endpoint]]:
        core = self._core
        now = self._loop.time()
        index = self.index
        rows = policy_inventory(
            self.cluster,
            core.store,
            self.reach(),
            self.policy.for_app(app, namespace),
            app,
            namespace,
            self.dead.records(now),
            trust_domain=self.trust_domain,
        )
        return index, rows

    def members(self, cluster: str | None = None) -> list[MemberInfo]:
        """LAN members, and on a bridge the other clusters' bridges (WAN view)."""
        out = []
        seen = set()
        views = [p.core for p in self.pools.values() if p.core is not None]
        for m in (m for core in views for m in core.member_list()):
            if m.id in seen:
                continue
            seen.add(m.id)
            if cluster and m.cluster != cluster:
                continue
            out.append(
                MemberInfo(
                    node=m.name,
                    cluster=m.cluster,
                    region=m.region,
                    zone=m.zone,
                    address=m.address,
                    status=m.status.label,  # type: ignore[arg-type]
                    incarnation=m.incarnation,
                    meta=self._node_meta_of(m.id),
                )
            )
        return out

    def _node_meta_of(self, member: str) -> dict[str, str]:
        entry = self._core.store.get(member)
        return dict(entry.state.node_meta) if entry is not None else {}

    def clusters(self) -> list[ClusterInfo]:
        reach = self.reach()
        alive_here = sum(1 for m in self._core.members.values() if m.serving)
        names = set(reach.nodes) | {self.cluster}
        rows = []
        for c in sorted(names):
            nodes = alive_here if c == self.cluster else reach.nodes.get(c, 0)
            rows.append(
                ClusterInfo(
                    cluster=c,
                    reachable=reach.reachable(c),
                    nodes=nodes,
                    bridges=reach.clusters.get(c, 0),
                )
            )
        return rows

    def update_gauges(self) -> None:
        """Refresh the member and record gauges after a change."""
        core = self._core
        counts = Counter(m.status.label for m in core.members.values())
        for status in ("alive", "suspect", "dead", "left"):
            self.metrics.members.labels(status).set(counts.get(status, 0))
        served = tombstoned = 0
        for origin in core.store.digest():
            entry = core.store.get(origin)
            if entry is None:
                continue
            if entry.tombstone_since is None:
                served += len(entry.state.apps)
            else:
                tombstoned += len(entry.state.apps)
        self.metrics.records.labels("served").set(served)
        self.metrics.records.labels("tombstoned").set(tombstoned)


def _ranks_by_rtt(policy: Policy) -> bool:
    """Whether some app's answers are ordered by measured round trips."""
    return any(p.order == "rtt" for p in (policy.default, *policy.apps.values()))
