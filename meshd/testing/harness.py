"""An in-memory cluster harness: many protocol cores, one fake network, virtual time.

Everything here is deterministic from a seed: the network's latency and loss
draw from one ``random.Random``, every core gets its own seeded generator, and
time is a float that only the harness advances.  A 64-node cluster runs
minutes of protocol time in seconds of wall time, so tests can assert on what
each node observes without sleeping.

The network models per-message latency (uniform between two bounds, or any
callable), independent loss, one-way and two-way partitions, crashed nodes,
and paused nodes (a stopped process: its timers do not fire and messages to
it wait in a queue until it resumes, as they would in a TCP receive buffer).

A crashed node is what the kernel makes of a dead process, as far as the
transport sees it: a message sent to its address comes back *refused* after
one hop (``Host.report_refused``: no listener), and each of the last
``RECENT_PEERS`` nodes it exchanged messages with (those that still hold a
connection with it) sees that connection *closed* after one hop
(``Host.report_closed``).  A paused, slow, lossy or cut-off node gives
neither, as a stopped process or a lossy link does not.

By default every message is encoded to wire bytes and decoded again on
delivery, so the harness exercises the real codec and counts real sizes.

The network is an interface (:class:`Network`: ``transit(src, dst, now)``
gives a delay or None for a lost message); :class:`FakeNetwork` is the
default above.  The simulator passes its own model and sizers instead of
overriding anything here.

Run ``python -m meshd.testing --nodes 64`` for the figures of the standard
scenarios (join, spread, detection, false deaths under loss).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.identity import CA, StateSigner, StateVerifier, create_ca, issue_node_cert
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy
from meshd.policy.resolve import Endpoint, resolve
from meshd.protocol.bridge import LAN, WAN, Bridge
from meshd.protocol.config import Config
from meshd.protocol.core import Core
from meshd.protocol.events import Event
from meshd.protocol.host import Host
from meshd.protocol.reach import compute_reach
from meshd.wire import (
    AppRecord,
    Message,
    Rejection,
    Status,
    decode_message,
    encode_frame,
    member_id,
)

Latency = Callable[[int, int, random.Random], float]


class Network(Protocol):
    """Where messages between harness nodes go: the harness asks once per message."""

    def transit(self, src: int, dst: int, now: float) -> float | None:
        """Seconds until a message sent by node ``src`` at ``now`` reaches ``dst``;
        None when it is lost."""
        ...


class FakeNetwork:
    """The harness's own network: a latency draw, independent loss, blocked links.

    Every draw comes from the one generator given, in a fixed order (loss,
    then latency), so a run is the same for the same seed.
    """

    def __init__(
        self, rng: random.Random, latency: Latency, loss: float, blocked: set[tuple[int, int]]
    ) -> None:
        self.rng = rng
        self.latency = latency
        self.loss = loss
        #: (src, dst) links that drop everything (the harness's partitions).
        self.blocked = blocked

    def transit(self, src: int, dst: int, now: float) -> float | None:
        if (src, dst) in self.blocked:
            return None
        if self.loss and self.rng.random() < self.loss:
            return None
        return self.latency(src, dst, self.rng)


_DELIVER, _TIMER, _REFUSED, _CLOSED, _MISPLACED = 0, 1, 2, 3, 4
_heappush = heapq.heappush
#: Node timers due later than the current slot wait in slots of
#: 1/_SLOTS_PER_S seconds (a power of two, so ``t * _SLOTS_PER_S`` is exact
#: and a slot holds exactly the times in [k, k + 1) / _SLOTS_PER_S).
_SLOTS_PER_S = 256.0
#: Timers due at _LAST_SLOT_AT or later (infinity: one that never fires by
#: itself) share the last slot, above the slot of any earlier time.
_LAST_SLOT_AT = 1e15
_LAST_SLOT = 1 << 62
#: How many of its latest peers (sent to or received from) each node is taken
#: to hold open connections with, for the closed notices of a crash.  Real
#: connections live a minute (the transport's idle timeout), so this is few;
#: one notice suffices for fast detection, and a fixed ring keeps the model
#: free of per-pair state in a 10,000-node simulation.
RECENT_PEERS = 16
#: A delivery event's payload: (pool, (sending node, pool), message or frame,
#: wire bytes).  The pair is the sender's own, made once (``HarnessNode.lan_entry``):
#: the receiver files it in ``recent`` as it is.
_Delivery = tuple[str, tuple[int, str], object, int]


def uniform_latency(lo: float, hi: float) -> Latency:
    def draw(src: int, dst: int, rng: random.Random) -> float:
        return rng.uniform(lo, hi)

    return draw


@dataclass(slots=True)
class HarnessNode:
    """One slot of the harness: the identity outlives the cores across restarts.

    Every node has a :class:`Host`: a LAN core, and on a bridge a WAN core
    and the bridge that couples them, exactly as the agent runs them.
    """

    index: int
    name: str
    cluster: str
    address: str
    region: str
    zone: str
    signer: StateSigner
    is_bridge: bool = False
    wan_address: str = ""
    gateway: str = ""
    host: Host | None = None
    #: The host's LAN core when it is its only one (no bridge): the event
    #: loop drives it directly, as the host would (see ``Cluster._run``).
    solo: Core | None = None
    crashed: bool = False
    paused: bool = False
    inbox: list[tuple[str, int, Message]] = field(default_factory=list)
    timer_gen: int = 0
    #: When the live timer event (the one of ``timer_gen``) fires; None when
    #: there is none.  A flush that finds the same deadline pushes nothing.
    timer_at: float | None = None
    #: Messages and bytes it sent (by kind, all nodes together: the
    #: cluster's ``sent_msgs`` and ``sent_bytes``).
    sent_count: int = 0
    sent_size: int = 0
    #: (node, pool) of its latest RECENT_PEERS messages either way: who holds
    #: a connection with it when it crashes.
    recent: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=RECENT_PEERS))
    #: (index, pool) of its LAN and WAN addresses: what a message it sends
    #: files in its receiver's ``recent`` (one pair per node and pool, made
    #: once, not one per message).
    lan_entry: tuple[int, str] = (-1, LAN)
    wan_entry: tuple[int, str] = (-1, WAN)

    #: The member id (set once: every delivery names its sender; a node's
    #: name and cluster never change).
    id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.id = member_id(self.cluster, self.name)

    @property
    def core(self) -> Core | None:
        return self.host.lan if self.host is not None else None

    @property
    def cores(self) -> dict[str, Core]:
        """pool -> core; empty before the node first starts."""
        return self.host.cores if self.host is not None else {}

    @property
    def bridge(self) -> Bridge | None:
        return self.host.bridge if self.host is not None else None


class Cluster:
    """N cores over a fake network, driven by a virtual clock.

    ``observers`` are called as ``observer(index, event, now)`` for every
    event any LAN core emits; scenario tests use them to time spreads and
    deaths.  Several clusters live in one harness: add nodes with another
    ``cluster`` and ``bridge=True`` for the ones in the WAN pool.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        config: Config | None = None,
        wan_config: Config | None = None,
        cluster: str = "east",
        latency: Latency | None = None,
        loss: float = 0.0,
        encode: bool = True,
        join: bool = True,
        ca: CA | None = None,
        network: Network | None = None,
        sizers: Mapping[type[Message], Callable[[Message], int]] | None = None,
    ) -> None:
        """``network`` replaces the fake one (``latency``, ``loss`` and the
        partition methods then do nothing); ``sizers`` count the bytes of a
        message that is not encoded (``encode=False``), one function per
        message type."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or Config.lan()
        self.wan_config = wan_config or Config.wan()
        self.encode = encode
        self.sizers = sizers
        self.now = 0.0
        self.ca = ca or create_ca("mesh.local")
        self.verifier = StateVerifier(self.ca.cert, self.ca.trust_domain)
        self.nodes: list[HarnessNode] = []
        #: Each node's member id, by index: the delivery loop names every
        #: sender without fetching its (cold) slot.
        self._ids: list[str] = []
        self._by_addr: dict[str, tuple[int, str]] = {}
        #: Events as (time, tie, kind, node, payload); the payload's type
        #: follows the kind (a _Delivery, a timer generation, a (pool,
        #: address) pair).  Two heaps, one order: messages and transport
        #: facts (a few in flight, due within milliseconds) in ``_heap``,
        #: node timers (one or two per node, due within seconds) in
        #: ``_timers``; the loop takes the earlier top, by (time, tie), and
        #: ties are unique, so the order is that of one heap, while a message
        #: costs a push and a pop on a heap of a few entries instead of one
        #: of the size of the mesh.
        #:
        #: Node timers are kept in two levels, in the same order: ``_timers``
        #: is a heap of those due before ``_horizon``, the end of the current
        #: slot; later ones wait unsorted in their slot of ``_slots`` (key:
        #: the slot number, numbers in the heap ``_slot_keys``), and a slot
        #: becomes the heap when the heap runs dry.  Every timer in the heap
        #: is due before every timer in a slot, so its top is the earliest:
        #: a pop sifts through the few timers of a few milliseconds, hot in
        #: the cache, not through one or two per node of the mesh.
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._timers: list[tuple[float, int, int, int, Any]] = []
        self._horizon = 0.0
        self._slots: dict[int, list[tuple[float, int, int, int, Any]]] = {}
        self._slot_keys: list[int] = []
        self._tie = 0
        self.blocked: set[tuple[int, int]] = set()
        #: The fake network's settings stay live: ``c.loss = 0.1`` takes effect
        #: at once (they do nothing when another ``network`` was given).
        self.fake = FakeNetwork(
            self.rng, latency or uniform_latency(0.0005, 0.002), loss, self.blocked
        )
        self.network: Network = network or self.fake
        #: Messages and bytes sent by all nodes, per message kind (per node:
        #: HarnessNode.sent_count and sent_size).
        self.sent_msgs: Counter[str] = Counter()
        self.sent_bytes: Counter[str] = Counter()
        #: Messages and bytes delivered, all nodes together.
        self.received_msgs = 0
        self.received_bytes = 0
        self.observers: list[Callable[[int, Event, float], None]] = []
        self.rejected: Counter[str] = Counter()
        self.delivered = 0
        self.dropped = 0
        #: Messages not delivered because another member answers at the address
        #: (the transport's identity check; only a lying claim makes any).
        self.misplaced = 0
        for _ in range(n):
            self.add_node(cluster=cluster, start=False)
        for hn in self.nodes:
            self._start(hn)
        if join and n > 1:
            seed_addr = self.nodes[0].address
            for hn in self.nodes[1:]:
                assert hn.core is not None
                hn.core.join([seed_addr], self.now)
                self._settle(hn)

    # ------------------------------------------------------------------
    # Building

    def add_node(
        self,
        *,
        cluster: str = "east",
        name: str | None = None,
        region: str = "r1",
        zone: str = "z1",
        start: bool = True,
        join: bool = True,
        bridge: bool = False,
        gateway: str = "",
        seed: int | None = None,
        wan_seed: int | None = None,
        signer: StateSigner | None = None,
    ) -> HarnessNode:
        """Add a node; ``seed``/``wan_seed`` name the nodes it joins through.

        ``signer`` is its identity (a certificate for ``cluster``/``name``,
        the bridge role on a bridge); by default one is issued by the CA."""
        i = len(self.nodes)
        name = name or f"n{i}"
        address = f"127.0.0.1:{20000 + i}"
        if signer is None:
            signer = StateSigner(issue_node_cert(self.ca, name, cluster, bridge=bridge))
        hn = HarnessNode(i, name, cluster, address, region, zone, signer)
        hn.gateway = gateway
        self._by_addr[address] = hn.lan_entry = (i, LAN)
        if bridge:
            hn.is_bridge = True
            hn.wan_address = f"127.0.0.1:{40000 + i}"
            self._by_addr[hn.wan_address] = hn.wan_entry = (i, WAN)
        self.nodes.append(hn)
        self._ids.append(hn.id)
        if start:
            self._start(hn)
            if join and i > 0:
                lan_seed = seed if seed is not None else self._first_of(cluster, exclude=i)
                if lan_seed is not None:
                    self.join(i, lan_seed)
                if bridge:
                    ws = wan_seed if wan_seed is not None else self._first_bridge(exclude=i)
                    if ws is not None:
                        self.join_wan(i, ws)
        return hn

    def _first_of(self, cluster: str, exclude: int) -> int | None:
        return next(
            (h.index for h in self.nodes if h.cluster == cluster and h.index != exclude), None
        )

    def _first_bridge(self, exclude: int) -> int | None:
        return next((h.index for h in self.nodes if h.is_bridge and h.index != exclude), None)

    def _start(
        self,
        hn: HarnessNode,
        incarnation: int = 0,
        version: int = 0,
        apps: Iterable[AppRecord] = (),
        wan_incarnation: int = 0,
    ) -> None:
        def make(pool: str, config: Config, address: str, inc: int) -> Core:
            return Core(
                config=config,
                node=hn.name,
                cluster=hn.cluster,
                region=hn.region,
                zone=hn.zone,
                address=address,
                signer=hn.signer,
                verifier=self.verifier,
                rng=random.Random(f"{self.seed}/{hn.index}/{pool}/{inc}"),
                now=self.now,
                incarnation=inc,
                version=version,
                apps=apps if pool == LAN else (),
                publisher=pool == LAN,
                gateway=hn.gateway,
            )

        lan = make(LAN, self.config, hn.address, incarnation)
        wan = make(WAN, self.wan_config, hn.wan_address, wan_incarnation) if hn.is_bridge else None
        hn.host = Host(lan, self.now, wan=wan)
        hn.solo = lan if wan is None else None
        hn.crashed = False
        self.node_started(hn)
        self._flush(hn)

    @property
    def latency(self) -> Latency:
        return self.fake.latency

    @latency.setter
    def latency(self, value: Latency) -> None:
        self.fake.latency = value

    @property
    def loss(self) -> float:
        return self.fake.loss

    @loss.setter
    def loss(self, value: float) -> None:
        self.fake.loss = value

    def start(self, i: int) -> None:
        """Build node ``i``'s cores (it joins nobody: see :meth:`join`)."""
        self._start(self.nodes[i])

    def node_started(self, hn: HarnessNode) -> None:
        """Called each time a node's cores are (re)built, before they run; for
        drivers built on the harness to note what a new life starts with."""

    def core(self, i: int) -> Core:
        c = self.nodes[i].core
        assert c is not None, f"node {i} has no core"
        return c

    def wan(self, i: int) -> Core:
        return self.nodes[i].cores[WAN]

    # ------------------------------------------------------------------
    # Faults and commands

    def join(self, i: int, seed: int) -> None:
        self.core(i).join([self.nodes[seed].address], self.now)
        self._settle(self.nodes[i])

    def join_wan(self, i: int, seed: int) -> None:
        self.wan(i).join([self.nodes[seed].wan_address], self.now)
        self._settle(self.nodes[i])

    def crash(self, i: int) -> None:
        """Stop node ``i`` at once: no leave, no more messages, timers gone."""
        hn = self.nodes[i]
        hn.crashed = True
        hn.inbox.clear()
        hn.timer_gen += 1
        hn.timer_at = None
        # The kernel closes the dead process's connections: each peer that
        # holds one sees it end, one hop later (unless the link drops it).
        for j, pool in sorted(set(hn.recent)):
            delay = self.network.transit(i, j, self.now)
            if delay is not None and j != i:
                self._push(self.now + delay, _CLOSED, j, (pool, hn.id))
        hn.recent.clear()

    def restart(self, i: int, seeds: Iterable[int] | None = None) -> None:
        """Start new cores with the same identity and persisted counters and apps."""
        hn = self.nodes[i]
        old = hn.core
        assert old is not None
        old_wan = hn.cores.get(WAN)
        last_peers = [m.address for m in old.member_list() if m.id != old.id and m.serving]
        if seeds is not None:
            last_peers = [self.nodes[s].address for s in seeds]
        self._start(
            hn,
            incarnation=old.incarnation,
            version=old.version,
            apps=old.apps.values(),
            wan_incarnation=old_wan.incarnation if old_wan is not None else 0,
        )
        self.core(i).join(last_peers, self.now)
        if old_wan is not None:
            wan_peers = [m.address for m in old_wan.member_list() if m.id != old.id and m.serving]
            self.wan(i).join(wan_peers, self.now)
        self._settle(hn)

    def leave(self, i: int) -> None:
        hn = self.nodes[i]
        assert hn.host is not None
        hn.host.leave(self.now)
        self._flush(hn)

    def pause(self, i: int) -> None:
        self.nodes[i].paused = True
        self.nodes[i].timer_gen += 1
        self.nodes[i].timer_at = None

    def resume(self, i: int) -> None:
        hn = self.nodes[i]
        hn.paused = False
        inbox, hn.inbox = hn.inbox, []
        assert hn.host is not None
        for pool, src, msg in inbox:
            hn.host.receive(pool, msg, self.now, peer=self.nodes[src].id)
        hn.host.handle_timer(self.now)
        self._flush(hn)

    def partition(self, a: Iterable[int], b: Iterable[int], one_way: bool = False) -> None:
        """Drop messages from ``a`` to ``b`` (and back unless ``one_way``)."""
        a, b = list(a), list(b)
        for x in a:
            for y in b:
                self.blocked.add((x, y))
                if not one_way:
                    self.blocked.add((y, x))

    def isolate_cluster(self, cluster: str) -> None:
        """Cut every link between ``cluster`` and the rest (a lost cluster)."""
        inside = [h.index for h in self.nodes if h.cluster == cluster]
        outside = [h.index for h in self.nodes if h.cluster != cluster]
        self.partition(inside, outside)

    def heal(self) -> None:
        self.blocked.clear()

    def flush(self, i: int) -> None:
        """After a direct call into node ``i``'s cores: send what they made."""
        self._settle(self.nodes[i])

    def register(self, i: int, app: str, instance: str, port: int = 8080, **kw: object) -> int:
        rec = AppRecord(app=app, instance=instance, address="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]
        version = self.core(i).set_app(rec, self.now)
        self._settle(self.nodes[i])
        return version

    def inject(
        self, dst: int, msg: Message, src: int | None = None, as_peer: str | None = None
    ) -> None:
        """Deliver a hand-made message to ``dst`` now (for adversarial tests), as
        from node ``src`` or from any certificate holder ``as_peer``."""
        peer = self.nodes[src].id if src is not None else as_peer
        hn = self.nodes[dst]
        assert hn.host is not None
        hn.host.receive(LAN, msg, self.now, peer=peer)
        self._flush(hn)

    # ------------------------------------------------------------------
    # The event loop

    def _push(self, t: float, kind: int, index: int, payload: object) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, kind, index, payload))

    # The hot path: every event goes through _run (with the delivery and a
    # copy of _flush inlined: keep the two alike; for a node without a
    # bridge the copy takes from its core what _flush takes from its host,
    # the same messages and events), every message through _transmit.
    # They keep what they use in locals and call nothing they need not (a
    # big simulation runs millions of events); what they do is what step's
    # docstring says, in that order.

    def _settle(self, hn: HarnessNode) -> None:
        """After a direct call into one of ``hn``'s cores: collect, then flush."""
        if hn.host is not None and not hn.crashed:
            hn.host.settle(self.now)
        self._flush(hn)

    def _flush(self, hn: HarnessNode) -> None:
        """Send what ``hn``'s host made, show observers its LAN events, re-arm its timer."""
        host = hn.host
        if host is None or hn.crashed:
            return
        transmit = self._transmit
        for pool, addr, msg, to in host.messages_to_send():
            transmit(hn, pool, addr, msg, to)
        observers = self.observers
        if observers:
            # next_event, not the events() generator: most flushes find none,
            # and a generator is made even then.
            index = hn.index
            item = host.next_event()
            while item is not None:
                pool, event = item
                if pool == LAN:
                    for obs in observers:
                        obs(index, event, self.now)
                item = host.next_event()
        else:
            host.drop_events()
        if not hn.paused:
            t = host.get_timer()
            now = self.now
            if t < now:
                t = now
            if t == hn.timer_at:
                return  # the live timer event already fires then
            gen = hn.timer_gen = hn.timer_gen + 1
            hn.timer_at = t
            tie = self._tie = self._tie + 1
            self._push_timer((t, tie, _TIMER, hn.index, gen))

    def _push_timer(self, entry: tuple[float, int, int, int, Any]) -> None:
        """Schedule a node timer: into the heap if due in the current slot,
        else into its slot (the loop inlines this)."""
        t = entry[0]
        if t < self._horizon:
            _heappush(self._timers, entry)
            return
        k = int(t * _SLOTS_PER_S) if t < _LAST_SLOT_AT else _LAST_SLOT
        slot = self._slots.get(k)
        if slot is None:
            self._slots[k] = [entry]
            _heappush(self._slot_keys, k)
        else:
            slot.append(entry)

    def _next_slot(self) -> float:
        """Make the earliest waiting slot the timer heap (which is empty);
        the new horizon."""
        k = heapq.heappop(self._slot_keys)
        timers = self._timers
        timers.extend(self._slots.pop(k))
        heapq.heapify(timers)
        self._horizon = math.inf if k == _LAST_SLOT else (k + 1) / _SLOTS_PER_S
        return self._horizon

    def _transmit(self, hn: HarnessNode, pool: str, addr: str, msg: Message, to: str) -> None:
        cls = type(msg)
        kind = cls.__name__
        payload: object = msg
        if self.encode:
            frame = encode_frame(msg)
            size = len(frame)
            payload = frame
        else:
            sizers = self.sizers
            size = sizers[cls](msg) if sizers is not None else 0
        # Per kind on the cluster, per node as totals: two counters that
        # every message touches anyway instead of two per node, cold in a
        # large simulation.
        self.sent_msgs[kind] += 1
        hn.sent_count += 1
        if size:
            self.sent_bytes[kind] += size
            hn.sent_size += size
        dst = self._by_addr.get(addr)
        if dst is None:
            self.dropped += 1
            return
        now = self.now
        j = dst[0]
        delay = self.network.transit(hn.index, j, now)
        if delay is None:
            self.dropped += 1
            return
        tie = self._tie = self._tie + 1
        if self.nodes[j].crashed:
            # Nobody listens there: the connect is refused, a round trip later.
            self.dropped += 1
            _heappush(self._heap, (now + 2 * delay, tie, _REFUSED, hn.index, (pool, addr)))
            return
        if to and self._ids[j] != to:
            # Another member's certificate answers there: the transport drops
            # what was meant for ``to`` and tells the sender, a round trip later.
            self.misplaced += 1
            _heappush(self._heap, (now + 2 * delay, tie, _MISPLACED, hn.index, (pool, to, addr)))
            return
        hn.recent.append(dst)
        delivery = (dst[1], hn.lan_entry if pool == LAN else hn.wan_entry, payload, size)
        _heappush(self._heap, (now + delay, tie, _DELIVER, j, delivery))

    def _run(self, until: float, limit: int = -1) -> int:
        """Process the events due by ``until``, at most ``limit`` of them (-1: no
        limit); how many it processed.  One event is as :meth:`step` says."""
        heap = self._heap
        timers = self._timers
        slots = self._slots
        slot_keys = self._slot_keys
        horizon = self._horizon
        nodes = self.nodes
        ids = self._ids
        transmit = self._transmit
        observers = self.observers
        pop = heapq.heappop
        # Counted in locals, added to the totals when the loop ends.
        received_msgs = received_bytes = 0
        # Only this loop moves the clock while it runs (nothing it calls does).
        now = self.now
        n = 0
        try:
            while n != limit:
                if not timers and slot_keys:
                    horizon = self._next_slot()
                # The earlier of the two tops; (time, tie) never compares equal.
                if heap:
                    q = timers if timers and timers[0] < heap[0] else heap
                elif timers:
                    q = timers
                else:
                    break
                if q[0][0] > until:
                    break
                t, _, kind, index, payload = pop(q)
                n += 1
                if t > now:
                    self.now = now = t
                hn = nodes[index]
                # A node without a bridge (``solo``) has its host, and its only
                # address is in the LAN pool: its host need not be asked.
                solo = hn.solo
                if kind == _DELIVER:
                    # The payload of a delivery is a _Delivery (cast() would cost a call).
                    pool, sender, data, size = payload
                    if hn.crashed or (
                        solo is None and (hn.host is None or pool not in hn.host.cores)
                    ):
                        self.dropped += 1
                        continue
                    received_msgs += 1
                    received_bytes += size
                    hn.recent.append(sender)
                    src = sender[0]
                    if isinstance(data, bytes):
                        decoded = decode_message(data[4:])
                        if isinstance(decoded, Rejection):
                            self.rejected[decoded.reason] += 1
                            continue
                        msg: Message = decoded
                    else:
                        msg = data
                    if hn.paused:
                        hn.inbox.append((pool, src, msg))
                        continue
                    self.delivered += 1
                    if solo is None:
                        hn.host.receive(pool, msg, now, ids[src])  # type: ignore[union-attr]
                    else:
                        solo.receive(msg, now, ids[src])
                elif kind == _TIMER:
                    if payload != hn.timer_gen or hn.crashed or hn.paused:
                        continue
                    if solo is None:
                        if hn.host is None:
                            continue
                        hn.timer_at = None  # consumed: the flush below sets the next one
                        hn.host.handle_timer(now)
                    else:
                        hn.timer_at = None
                        solo.handle_timer(now)
                else:
                    self._transport_fact(hn, kind, payload)
                    continue
                # What _flush does, inlined (one call less per event); the node
                # runs and is not paused, as checked above.
                if solo is None:
                    host = hn.host
                    assert host is not None  # checked with the event above
                    for out_pool, addr, out, to in host.messages_to_send():
                        transmit(hn, out_pool, addr, out, to)
                    if observers:
                        item = host.next_event()
                        while item is not None:
                            if item[0] == LAN:
                                for obs in observers:
                                    obs(index, item[1], now)
                            item = host.next_event()
                    else:
                        host.drop_events()
                    t = host.get_timer()
                else:
                    # A host without a bridge only moves its core's messages
                    # and events into its own queues (Host._settle), and its
                    # timer is its core's: the same, without the copies.  Its
                    # own queues are empty here, since every call into a host
                    # from this harness is followed by a flush.
                    for addr, out, to in solo.addressed_messages():
                        transmit(hn, LAN, addr, out, to)
                    if observers:
                        event = solo.next_event()
                        while event is not None:
                            for obs in observers:
                                obs(index, event, now)
                            event = solo.next_event()
                    else:
                        solo.drop_events()
                    t = solo.get_timer()
                if t < now:
                    t = now
                if t != hn.timer_at:
                    gen = hn.timer_gen = hn.timer_gen + 1
                    hn.timer_at = t
                    tie = self._tie = self._tie + 1
                    # _push_timer, inlined.
                    if t < horizon:
                        _heappush(timers, (t, tie, _TIMER, index, gen))
                    else:
                        k = int(t * _SLOTS_PER_S) if t < _LAST_SLOT_AT else _LAST_SLOT
                        slot = slots.get(k)
                        if slot is None:
                            slots[k] = [(t, tie, _TIMER, index, gen)]
                            _heappush(slot_keys, k)
                        else:
                            slot.append((t, tie, _TIMER, index, gen))
        finally:
            self.received_msgs += received_msgs
            self.received_bytes += received_bytes
        return n

    def _transport_fact(self, hn: HarnessNode, kind: int, payload: tuple[str, ...]) -> None:
        """A refused connect, a closed connection or another member's identity
        at an address reaches ``hn``'s driver.

        A paused driver misses it (its own probes will do), a crashed one is gone.
        """
        host = hn.host
        if hn.crashed or hn.paused or host is None:
            return
        if kind == _REFUSED:
            host.report_refused(payload[0], payload[1], self.now)
        elif kind == _MISPLACED:
            host.report_misplaced(payload[0], payload[1], payload[2], self.now)
        else:
            host.report_closed(payload[0], payload[1], self.now)
        self._flush(hn)

    def step(self) -> bool:
        """Process one event; False when nothing is scheduled.

        The next event in time order (ties in the order they were scheduled)
        moves the clock to its time.  A delivery to a node that runs (not
        crashed, in the pool) is counted as received, decoded when it was
        encoded, queued when the node is paused, else handed to its host and
        the node flushed.  A node's timer is live only if it is the last one
        :meth:`_flush` set (``timer_gen``) and the node runs: then its host
        handles its timers (every core whose deadline has come, a due bridge
        refresh), and the node is flushed.  (A node without a bridge has its
        single core driven directly, which is all its host would do.)
        """
        return self._run(math.inf, 1) == 1

    def run_until(self, t: float) -> int:
        """Advance to virtual time ``t``; how many events that took."""
        n = self._run(t)
        self.now = max(self.now, t)
        return n

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, predicate: Callable[[], bool], timeout: float, check_every: float = 0.05
    ) -> float | None:
        """Advance until ``predicate()`` holds; the virtual time it took, or None.

        Bounded by ``timeout`` virtual seconds, so a broken protocol fails a
        test instead of hanging it.
        """
        start = self.now
        deadline = start + timeout
        while True:
            if predicate():
                return self.now - start
            if self.now >= deadline:
                return None
            self.run_until(min(self.now + check_every, deadline))

    # ------------------------------------------------------------------
    # Observations

    def running(self) -> list[int]:
        return [hn.index for hn in self.nodes if not hn.crashed and hn.core is not None]

    def status_of(self, observer: int, subject: int) -> Status | None:
        m = self.core(observer).members.get(self.nodes[subject].id)
        return m.status if m is not None else None

    def all_see(self, subject: int, status: Status, observers: Iterable[int] | None = None) -> bool:
        obs = self.running() if observers is None else observers
        return all(self.status_of(o, subject) is status for o in obs if o != subject)

    def alive_counts(self) -> list[int]:
        return [
            sum(1 for m in self.core(i).members.values() if m.status is Status.ALIVE)
            for i in self.running()
        ]

    def resolve(
        self,
        observer: int,
        app: str,
        namespace: str = "default",
        policy: AppPolicy | None = None,
        include_unhealthy: bool = False,
    ) -> list[Endpoint]:
        """A lookup on node ``observer``, exactly as its agent would answer it."""
        hn = self.nodes[observer]
        core = self.core(observer)
        asker = Topology(hn.name, hn.cluster, hn.region, hn.zone)
        reach = compute_reach(hn.cluster, core.store.live())
        return resolve(
            asker,
            core.store,
            reach,
            policy or AppPolicy(),
            app,
            namespace,
            include_unhealthy=include_unhealthy,
            trust_domain=self.ca.trust_domain,
            node_rtt=core.estimated_rtt,
        )

    def serves(self, observer: int, app: str, instance: str) -> bool:
        return any(rec.instance == instance for _, rec in self.core(observer).store.endpoints(app))
