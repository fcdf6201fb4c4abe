"""An in-memory cluster harness: many protocol cores, one fake network, virtual time.

Everything here is deterministic from a seed: the network's latency and loss
draw from one ``random.Random``, every core gets its own seeded generator, and
time is a float that only the harness advances.  A 64-node cluster runs
minutes of protocol time in seconds of wall time, so tests can assert on what
each node observes without sleeping.

The network models per-message latency (uniform between two bounds, or any
callable), independent loss, one-way and two-way partitions, crashed nodes
(messages to them vanish), and paused nodes (a stopped process: its timers do
not fire and messages to it wait in a queue until it resumes, as they would in
a TCP receive buffer).

By default every message is encoded to wire bytes and decoded again on
delivery, so the harness exercises the real codec and counts real sizes.

The network is an interface (:class:`Network`: ``transit(src, dst, now)``
gives a delay or None for a lost message); :class:`FakeNetwork` is the
default above.  The simulator passes its own model and a sizer instead of
overriding anything here.

Run ``python -m meshd.testing --nodes 64`` for the figures of the standard
scenarios (join, spread, detection, false deaths under loss).
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol, cast

from meshd.identity import CA, StateSigner, StateVerifier, create_ca, issue_node_cert
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy
from meshd.policy.resolve import Answer, resolve
from meshd.protocol.bounds import detection_bound, repair_bound, spread_bound
from meshd.protocol.bridge import LAN, WAN, Bridge
from meshd.protocol.config import Config
from meshd.protocol.events import Event, MemberChanged, OriginChanged
from meshd.protocol.host import Host
from meshd.protocol.node import Node
from meshd.protocol.reach import Reach, compute_reach
from meshd.protocol.suspicion import suspicion_max, suspicion_min
from meshd.wire import (
    AppRecord,
    Message,
    Rejection,
    Status,
    decode_message,
    doc_member,
    encode_frame,
    may_reach,
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


_DELIVER, _TIMER = 0, 1
#: A delivery event's payload: (pool, sending node, message or frame, wire bytes).
_Delivery = tuple[str, int, object, int]


def uniform_latency(lo: float, hi: float) -> Latency:
    def draw(src: int, dst: int, rng: random.Random) -> float:
        return rng.uniform(lo, hi)

    return draw


@dataclass
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
    crashed: bool = False
    paused: bool = False
    inbox: list[tuple[str, int, Message]] = field(default_factory=list)
    timer_gen: int = 0
    #: When the live timer event (the one of ``timer_gen``) fires; None when
    #: there is none.  A flush that finds the same deadline pushes nothing.
    timer_at: float | None = None
    sent_msgs: Counter[str] = field(default_factory=Counter)
    sent_bytes: Counter[str] = field(default_factory=Counter)

    @cached_property
    def id(self) -> str:
        # Cached: every delivery names its sender; a node's name never changes.
        return member_id(self.cluster, self.name)

    @property
    def core(self) -> Node | None:
        return self.host.lan if self.host is not None else None

    @property
    def cores(self) -> dict[str, Node]:
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
        sizer: Callable[[Message], int] | None = None,
    ) -> None:
        """``network`` replaces the fake one (``latency``, ``loss`` and the
        partition methods then do nothing); ``sizer`` counts the bytes of a
        message that is not encoded (``encode=False``)."""
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or Config.lan()
        self.wan_config = wan_config or Config.wan()
        self.encode = encode
        self.sizer = sizer
        self.now = 0.0
        self.ca = ca or create_ca("mesh.local")
        self.verifier = StateVerifier(self.ca.cert, self.ca.trust_domain)
        self.nodes: list[HarnessNode] = []
        self._by_addr: dict[str, tuple[int, str]] = {}
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._tie = 0
        self.blocked: set[tuple[int, int]] = set()
        #: The fake network's settings stay live: ``c.loss = 0.1`` takes effect
        #: at once (they do nothing when another ``network`` was given).
        self.fake = FakeNetwork(
            self.rng, latency or uniform_latency(0.0005, 0.002), loss, self.blocked
        )
        self.network: Network = network or self.fake
        #: Per node: messages and bytes delivered to it (sent ones: HarnessNode.sent_*).
        self.received_msgs: list[int] = []
        self.received_bytes: list[int] = []
        self.observers: list[Callable[[int, Event, float], None]] = []
        self.rejected: Counter[str] = Counter()
        self.delivered = 0
        self.dropped = 0
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
    ) -> HarnessNode:
        """Add a node; ``seed``/``wan_seed`` name the nodes it joins through."""
        i = len(self.nodes)
        name = name or f"n{i}"
        address = f"127.0.0.1:{20000 + i}"
        cert = issue_node_cert(self.ca, name, cluster, bridge=bridge)
        hn = HarnessNode(i, name, cluster, address, region, zone, StateSigner(cert))
        hn.gateway = gateway
        self.received_msgs.append(0)
        self.received_bytes.append(0)
        self._by_addr[address] = (i, LAN)
        if bridge:
            hn.is_bridge = True
            hn.wan_address = f"127.0.0.1:{40000 + i}"
            self._by_addr[hn.wan_address] = (i, WAN)
        self.nodes.append(hn)
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
        def make(pool: str, config: Config, address: str, inc: int) -> Node:
            return Node(
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

    def core(self, i: int) -> Node:
        c = self.nodes[i].core
        assert c is not None, f"node {i} has no core"
        return c

    def wan(self, i: int) -> Node:
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

    def restart(self, i: int, seeds: Iterable[int] | None = None) -> None:
        """Start new cores with the same identity and persisted counters and apps."""
        hn = self.nodes[i]
        old = hn.core
        assert old is not None
        old_wan = hn.cores.get(WAN)
        last_peers = [m.address for m in old.member_list() if m.node != old.id and m.serving]
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
            wan_peers = [m.address for m in old_wan.member_list() if m.node != old.id and m.serving]
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

    # The hot path: every event goes through _run, most through _flush, every
    # message through _transmit and _deliver.  They keep what they use in
    # locals and call nothing they need not (a big simulation runs millions
    # of events); what they do is what step's docstring says, in that order.

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
        for pool, addr, msg in host.messages_to_send():
            transmit(hn, pool, addr, msg)
        observers = self.observers
        if observers:
            index = hn.index
            for pool, event in host.events():
                if pool == LAN:
                    for obs in observers:
                        obs(index, event, self.now)
        else:
            host.drop_events()
        if not hn.paused:
            t = host.get_timer()
            now = self.now
            if t < now:
                t = now
            if t == hn.timer_at:
                return  # the live timer event already fires then
            hn.timer_gen += 1
            hn.timer_at = t
            self._tie += 1
            heapq.heappush(self._heap, (t, self._tie, _TIMER, hn.index, hn.timer_gen))

    def _transmit(self, hn: HarnessNode, pool: str, addr: str, msg: Message) -> None:
        kind = type(msg).__name__
        payload: object = msg
        if self.encode:
            frame = encode_frame(msg)
            size = len(frame)
            payload = frame
        else:
            size = self.sizer(msg) if self.sizer is not None else 0
        hn.sent_msgs[kind] += 1
        if size:
            hn.sent_bytes[kind] += size
        dst = self._by_addr.get(addr)
        if dst is None:
            self.dropped += 1
            return
        now = self.now
        delay = self.network.transit(hn.index, dst[0], now)
        if delay is None:
            self.dropped += 1
            return
        self._tie += 1
        heapq.heappush(
            self._heap,
            (now + delay, self._tie, _DELIVER, dst[0], (dst[1], hn.index, payload, size)),
        )

    def _deliver(self, dst: int, pool: str, src: int, payload: object, size: int) -> None:
        hn = self.nodes[dst]
        host = hn.host
        if hn.crashed or host is None or pool not in host.cores:
            self.dropped += 1
            return
        self.received_msgs[dst] += 1
        self.received_bytes[dst] += size
        if isinstance(payload, bytes):
            decoded = decode_message(payload[4:])
            if isinstance(decoded, Rejection):
                self.rejected[decoded.reason] += 1
                return
            msg = decoded
        else:
            msg = payload  # type: ignore[assignment]
        if hn.paused:
            hn.inbox.append((pool, src, msg))
            return
        self.delivered += 1
        host.receive(pool, msg, self.now, peer=self.nodes[src].id)
        self._flush(hn)

    def _run(self, until: float, limit: int = -1) -> int:
        """Process the events due by ``until``, at most ``limit`` of them (-1: no
        limit); how many it processed.  One event is as :meth:`step` says."""
        heap = self._heap
        nodes = self.nodes
        deliver = self._deliver
        flush = self._flush
        pop = heapq.heappop
        n = 0
        while heap and heap[0][0] <= until and n != limit:
            t, _, kind, index, payload = pop(heap)
            n += 1
            if t > self.now:
                self.now = t
            if kind == _DELIVER:
                pool, src, data, size = cast(_Delivery, payload)
                deliver(index, pool, src, data, size)
                continue
            hn = nodes[index]
            host = hn.host
            if payload != hn.timer_gen or hn.crashed or hn.paused or host is None:
                continue
            hn.timer_at = None  # consumed: the flush below sets the next one
            host.handle_timer(self.now)
            flush(hn)
        return n

    def step(self) -> bool:
        """Process one event; False when nothing is scheduled.

        The next event in time order (ties in the order they were scheduled)
        moves the clock to its time.  A delivery goes to :meth:`_deliver`.  A
        node's timer is live only if it is the last one :meth:`_flush` set
        (``timer_gen``) and the node runs: then its host handles its timers
        (every core whose deadline has come, a due bridge refresh), and the
        node is flushed.
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
    ) -> list[Answer]:
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


# ----------------------------------------------------------------------
# Standard scenarios, shared by the tests and the figures script.


@dataclass
class SpreadResult:
    times: list[float]  # per observing node, seconds from registration to first sight

    @property
    def max(self) -> float:
        return max(self.times)


def record_spread(
    c: Cluster, origin: int, app: str = "orders", timeout: float = 60.0
) -> SpreadResult | None:
    """Register an app on ``origin``; time until each other running node holds it."""
    seen: dict[int, float] = {}
    start = c.now
    oid = c.nodes[origin].id
    target_version = c.core(origin).version + 1

    def observe(i: int, e: Event, now: float) -> None:
        if (
            isinstance(e, OriginChanged)
            and e.origin == oid
            and e.version >= target_version
            and i not in seen
        ):
            seen[i] = now - start

    c.observers.append(observe)
    try:
        c.register(origin, app, f"{app}-1")
        others = [i for i in c.running() if i != origin]
        took = c.run_until_true(lambda: all(i in seen for i in others), timeout)
    finally:
        c.observers.remove(observe)
    if took is None:
        return None
    return SpreadResult([seen[i] for i in others])


def detection_time(c: Cluster, victim: int, timeout: float = 300.0) -> dict[int, float] | None:
    """Crash ``victim``; per observer, seconds until it holds the victim dead."""
    dead_at: dict[int, float] = {}
    start = c.now
    vid = c.nodes[victim].id

    def observe(i: int, e: Event, now: float) -> None:
        if isinstance(e, MemberChanged) and e.node == vid and e.status is Status.DEAD:
            dead_at.setdefault(i, now - start)

    c.observers.append(observe)
    try:
        c.crash(victim)
        others = [i for i in c.running() if i != victim]
        took = c.run_until_true(lambda: all(i in dead_at for i in others), timeout)
    finally:
        c.observers.remove(observe)
    return None if took is None else {i: dead_at[i] for i in others}


class DeathCounter:
    """Counts 'dead' verdicts about nodes that were never crashed (false deaths)."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.false_deaths = 0
        self.subjects: set[str] = set()
        c.observers.append(self)

    def __call__(self, i: int, e: Event, now: float) -> None:
        if isinstance(e, MemberChanged) and e.status is Status.DEAD:
            idx = next(hn.index for hn in self.c.nodes if hn.id == e.node)
            if not self.c.nodes[idx].crashed:
                self.false_deaths += 1
                self.subjects.add(e.node)


def converged_join(c: Cluster, timeout: float = 120.0) -> float | None:
    n = len(c.running())
    return c.run_until_true(lambda: all(a == n for a in c.alive_counts()), timeout)


def false_deaths_under_loss(
    n: int, loss: float, minutes: float, lifeguard: bool, seed: int = 1
) -> int:
    """'Dead' verdicts about live nodes, counted per observing node."""
    return false_death_counter(n, loss, minutes, lifeguard, seed).false_deaths


def false_death_counter(
    n: int, loss: float, minutes: float, lifeguard: bool, seed: int = 1
) -> DeathCounter:
    c = Cluster(n, seed=seed, config=Config.lan(lifeguard=lifeguard), encode=False)
    converged_join(c)
    c.loss = loss
    counter = DeathCounter(c)
    c.run_for(minutes * 60)
    return counter


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m meshd.testing",
        description="Run the standard harness scenarios and print their figures.",
    )
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--loss-minutes", type=float, default=10.0, help="virtual minutes of the 10%% loss scenario"
    )
    if argv is None:
        argv = sys.argv[1:]
    if any(a == "--clusters" or a.startswith("--clusters=") for a in argv):
        return main_multi(argv)
    args = ap.parse_args(argv)
    if args.nodes < 3:
        ap.error("--nodes must be at least 3")

    n = args.nodes
    wall = time.perf_counter()
    c = Cluster(n, seed=args.seed)
    joined = converged_join(c)
    print(f"join: {n} nodes through one seed, all list {n} alive after {joined:.2f} s virtual")
    spread = record_spread(c, origin=n // 2)
    if spread is not None:
        print(
            f"record spread to {n - 1} nodes: p50 {statistics.median(spread.times):.2f} s, "
            f"p99 {_pct(spread.times, 0.99):.2f} s, max {spread.max:.2f} s"
        )
    det = detection_time(c, victim=n - 1)
    if det is not None:
        vals = list(det.values())
        lo, hi = c.core(0).suspicion_bounds()
        print(
            f"crash detection by all {len(vals)}: p50 {statistics.median(vals):.2f} s, "
            f"p99 {_pct(vals, 0.99):.2f} s, max {max(vals):.2f} s "
            f"(suspicion timeout {lo:.1f}-{hi:.1f} s)"
        )
    for lifeguard in (True, False):
        fd = false_death_counter(n, 0.10, args.loss_minutes, lifeguard, args.seed)
        print(
            f"false deaths, 10% loss, {args.loss_minutes:g} virtual min, "
            f"lifeguard {'on ' if lifeguard else 'off'}: {fd.false_deaths} verdicts "
            f"about {len(fd.subjects)} live node(s)"
        )
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    return 0


# ----------------------------------------------------------------------
# Several clusters: bridges, the WAN pool, and cross-cluster figures.
#
# ``multi_cluster`` builds the topology; the functions after it time what a
# multi-cluster mesh promises (every document where it is exported and
# nowhere else, cross-cluster failover after a crash, a lost cluster marked
# unreachable, convergence after it comes back), each next to a bound derived
# from the configuration.  ``python -m meshd.testing --clusters 5 --nodes 50``
# prints the figures (see ``main_multi``).


def multi_cluster(
    clusters: Sequence[str],
    nodes_per_cluster: int | Mapping[str, int],
    *,
    bridges: Mapping[str, int] | None = None,
    seed: int = 0,
    config: Config | None = None,
    wan_config: Config | None = None,
    gateways: Mapping[str, str] | None = None,
    encode: bool = True,
) -> tuple[Cluster, dict[str, list[int]]]:
    """Several clusters in one harness, their bridges in one WAN pool.

    Cluster ``c`` gets ``nodes_per_cluster`` nodes (or ``nodes_per_cluster[c]``
    when a mapping) named ``n0``, ``n1``, ...
    (member ids ``c/n0`` ...), all in region ``r-c``, alternating between zones
    ``c-a`` and ``c-b``.  Its first ``bridges.get(c, 1)`` nodes are bridges.
    Every node joins its LAN pool through the first node of its cluster, and
    every bridge joins the WAN pool through the first bridge of the mesh.
    ``gateways`` maps a cluster to the ``host:port`` of its gateway.

    Returns the harness and, per cluster, the node indices (bridges first).
    """
    if len(set(clusters)) != len(clusters):
        raise ValueError("cluster names must be unique")
    if isinstance(nodes_per_cluster, int):
        sizes = {x: nodes_per_cluster for x in clusters}
    else:
        sizes = dict(nodes_per_cluster)
        if set(sizes) != set(clusters):
            raise ValueError("nodes_per_cluster must give a size for every cluster, and only them")
    if any(size < 1 for size in sizes.values()):
        raise ValueError("every cluster needs at least 1 node")
    bridges = dict(bridges or {})
    gateways = dict(gateways or {})
    for name in (*bridges, *gateways):
        if name not in clusters:
            raise ValueError(f"{name!r} is not one of the clusters")
    c = Cluster(0, seed=seed, config=config, wan_config=wan_config, encode=encode, join=False)
    groups: dict[str, list[int]] = {}
    for cluster in clusters:
        nb = bridges.get(cluster, 1)
        if not 0 <= nb <= sizes[cluster]:
            raise ValueError(f"cluster {cluster!r}: {nb} bridges among {sizes[cluster]} nodes")
        groups[cluster] = []
        for k in range(sizes[cluster]):
            hn = c.add_node(
                cluster=cluster,
                name=f"n{k}",
                region=f"r-{cluster}",
                zone=f"{cluster}-{'ab'[k % 2]}",
                bridge=k < nb,
                gateway=gateways.get(cluster, ""),
            )
            groups[cluster].append(hn.index)
    return c, groups


def bridge_indices(c: Cluster, cluster: str | None = None) -> list[int]:
    """The bridges of ``cluster`` (all bridges when None), crashed ones included."""
    return [
        hn.index for hn in c.nodes if hn.is_bridge and (cluster is None or hn.cluster == cluster)
    ]


def reach_of(c: Cluster, i: int) -> Reach:
    """What node ``i`` makes of the bridges' statements it holds (as its lookups do)."""
    return compute_reach(c.nodes[i].cluster, c.core(i).store.live())


def published(c: Cluster) -> dict[str, int]:
    """``{document id: version}`` of every document a running node publishes now."""
    out: dict[str, int] = {}
    for i in c.running():
        own = c.nodes[i].id
        for entry in c.core(i).store.live():
            if doc_member(entry.signed.origin) == own:
                out[entry.signed.origin] = entry.signed.version
    return out


def misplaced(c: Cluster, docs: Mapping[str, int] | None = None) -> list[str]:
    """What keeps the mesh from holding every exported document where it may, and only there.

    For every running node: each document a running node publishes and may
    reach the node's cluster (``wire.may_reach``) must be in its LAN store,
    live, at the publisher's version; a document that may not reach it must
    be absent from its LAN store, and from its WAN store if it is a bridge.
    An empty list means converged.
    """
    docs = published(c) if docs is None else docs
    problems: list[str] = []
    for i in c.running():
        hn = c.nodes[i]
        store = c.core(i).store
        for origin, version in docs.items():
            if may_reach(origin, hn.cluster):
                entry = store.get(origin)
                if entry is None or entry.tombstone_since is not None:
                    problems.append(f"{hn.id} lacks {origin}")
                elif entry.signed.version != version:
                    problems.append(f"{hn.id} holds {origin}@{entry.signed.version}, not {version}")
            elif origin in store or (hn.is_bridge and origin in c.wan(i).store):
                problems.append(f"{hn.id} holds {origin}, not exported to {hn.cluster}")
    return problems


def converged_everywhere(c: Cluster) -> bool:
    """Every running node holds every document it may, at its latest version, and no other."""
    return not misplaced(c)


def cross_cluster_spread_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds within which a new document of cluster A reaches every node of cluster B.

    Three epidemics in a row, each ``bounds.spread_bound`` of its pool:

    1. A's LAN pool (``n_origin`` nodes, ``config``): every node of A, so every
       bridge of A, holds the document.  A bridge hands what its LAN core
       learns to its WAN core in the same pass of the driver (``Bridge.on_event``).
    2. The WAN pool (``n_bridges``, all bridges of the mesh, ``wan_config``):
       every bridge holds it, those of B included, and each injects it into
       its LAN core on receipt (when the document's scope admits B).
    3. B's LAN pool (``n_asker`` nodes, ``config``).

    Message latency is absorbed by the margin of each spread bound as long
    as a hop takes well under a gossip interval (the harness: 2 ms at most).
    """
    return (
        spread_bound(n_origin, config)
        + spread_bound(n_bridges, wan_config)
        + spread_bound(n_asker, config)
    )


def cross_cluster_bound(
    n_victim: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds within which a crashed (non-bridge) node of cluster A stops being
    served to every node of cluster B.

    ``bounds.detection_bound(n_victim, config)`` + ``spread_bound(n_bridges,
    wan_config)`` + ``spread_bound(n_asker, config)``:

    1. Detection in A's LAN pool: every node of A, its bridges included,
       holds the victim dead within ``detection_bound`` (first probe, the
       Lifeguard suspicion ceiling, spread of the death notice).
    2. On that ``MemberChanged`` a bridge of A restates at once: its main
       document, re-signed with the victim in ``down``, goes into its WAN core
       in the same pass, and spreads in the WAN pool within ``spread_bound``
       of the WAN pool.
    3. A bridge of B injects it into B's LAN pool on receipt; it spreads there
       within ``spread_bound`` of B's pool.  A lookup on a node of B that holds
       it drops the victim's endpoints at once (``Reach.down``), so the next
       copy in policy order becomes the first active one.

    Not a bound for a crashed bridge: its death is seen through the WAN pool
    (see :func:`unreachable_bound`).  Inside A the bound is ``detection_bound``
    alone, as for any crash.
    """
    return (
        detection_bound(n_victim, config)
        + spread_bound(n_bridges, wan_config)
        + spread_bound(n_asker, config)
    )


def unreachable_bound(n_bridges: int, n_asker: int, config: Config, wan_config: Config) -> float:
    """Seconds within which every node of cluster B marks a lost cluster A unreachable.

    A is lost when none of its bridges answers in the WAN pool (crashed, or
    cut off).  ``detection_bound(n_bridges, wan_config)``: every bridge of B
    holds every bridge of A dead; on each such ``MemberChanged`` of its WAN
    core a bridge restates its main document with A in ``unreachable``; then
    ``spread_bound(n_asker, config)`` in B's LAN pool.  A node of B holds A
    unreachable once every live bridge of B says so, and the last of them says
    so within the detection bound.  Symmetrically, nodes of a cut-off A mark
    every other cluster unreachable within the same bound (A's bridges hold
    every other bridge dead).  If A's only bridge crashed, A's own nodes mark
    the others unreachable once they hold that bridge dead: within
    ``detection_bound(n_A, config)``.
    """
    return detection_bound(n_bridges, wan_config) + spread_bound(n_asker, config)


def cut_off_side_bound(n_bridges: int, n_lan: int, config: Config, wan_config: Config) -> float:
    """Seconds within which the nodes of a cut-off cluster mark every other cluster unreachable.

    Not :func:`unreachable_bound`: ``detection_bound`` assumes most of the pool
    is alive and probes the lost member, so one of them does within about two
    probe intervals.  A cut-off bridge is on the minority side: it (and the
    other bridges of its cluster, cut off with it) must probe every outside
    bridge itself.  Its indirect probes go to outside helpers that never
    answer, and each missing nack raises its Lifeguard local-health score
    (as it should: it cannot tell a cut link from its own sickness) until its
    probe interval is stretched ``awareness_max_multiplier`` times.  So:

    - two round-robin cycles of ``n_bridges - 1`` probes at the stretched
      interval (a member probed just before the cut waits for the next cycle);
    - the suspicion ceiling (no confirmation comes from outside);
    - the death notices spread in the WAN pool (among the cut-off bridges)
      and the bridge's restated main document in its LAN pool.
    """
    cfg = wan_config
    stretch = cfg.awareness_max_multiplier if cfg.lifeguard else 1
    lo = suspicion_min(cfg.suspicion_mult, n_bridges, cfg.probe_interval)
    hi = suspicion_max(lo, cfg.suspicion_max_timeout_mult) if cfg.lifeguard else lo
    cycles = 2 * max(n_bridges - 1, 1) * cfg.probe_interval * stretch
    return cycles + hi + spread_bound(n_bridges, cfg) + spread_bound(n_lan, config)


def cross_cluster_repair_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Like :func:`cross_cluster_spread_bound`, but for a document that gossip
    missed (published while its way out was cut): each of the three hops is
    ``bounds.repair_bound`` (the next digest sync, then an epidemic)."""
    return (
        repair_bound(n_origin, config)
        + repair_bound(n_bridges, wan_config)
        + repair_bound(n_asker, config)
    )


def heal_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds after a cut-off cluster's links heal until the mesh converges again.

    Both sides hold the other's bridges dead and never probe them, so the
    first contact is a reconnect attempt (every ``reconnect_interval`` of the
    WAN config, the first after up to 1.5 of it, so two intervals), after
    which member claims and missed documents flow by anti-entropy:
    :func:`cross_cluster_repair_bound`.
    """
    return 2 * wan_config.reconnect_interval + cross_cluster_repair_bound(
        n_origin, n_bridges, n_asker, config, wan_config
    )


def cross_cluster_failover(
    c: Cluster,
    victim: int,
    app: str,
    askers: Iterable[int],
    *,
    to_cluster: str | None = None,
    policy: AppPolicy | None = None,
    namespace: str = "default",
    timeout: float = 300.0,
) -> dict[int, float] | None:
    """Crash ``victim`` (a node hosting ``app``); per asker, seconds until it failed over.

    An asker has failed over when its lookup (``Cluster.resolve`` under
    ``policy``) returns no endpoint of the victim as active and its first
    active endpoint is in ``to_cluster`` (any other node when None).  A
    lookup reads the asker's store only, so it is evaluated after every event
    of the asker's LAN core: the times are exact, not sampled.

    Raises ValueError if an asker does not use the victim before the crash
    (nothing would be measured).  None if some asker did not fail over
    within ``timeout`` virtual seconds.
    """
    vid = c.nodes[victim].id
    pending = {a for a in askers if a != victim}

    def uses_victim(a: int) -> bool:
        return any(x.active and x.state.member == vid for x in c.resolve(a, app, namespace, policy))

    def failed_over(a: int) -> bool:
        active = [x for x in c.resolve(a, app, namespace, policy) if x.active]
        if not active or any(x.state.member == vid for x in active):
            return False
        first = active[0].state
        return first.member != vid if to_cluster is None else first.cluster == to_cluster

    idle = sorted(c.nodes[a].id for a in pending if not uses_victim(a))
    if idle:
        raise ValueError(f"{', '.join(idle[:5])} do not use {vid} for {app} now")
    start = c.now
    took: dict[int, float] = {}

    def observe(i: int, e: Event, now: float) -> None:
        if i in pending and failed_over(i):
            took[i] = now - start
            pending.discard(i)

    c.observers.append(observe)
    try:
        c.crash(victim)
        done = c.run_until_true(lambda: not pending, timeout, check_every=1.0)
    finally:
        c.observers.remove(observe)
    return None if done is None else took


def _cut_off(c: Cluster, i: int, cluster: str) -> bool:
    """Does node ``i`` hold the cut-off side unreachable (``cluster`` lost)?"""
    reach = reach_of(c, i)
    if c.nodes[i].cluster != cluster:
        return not reach.reachable(cluster)
    others = {h.cluster for h in c.nodes if h.cluster != cluster}
    return all(not reach.reachable(o) for o in others)


def isolation_time(c: Cluster, cluster: str, timeout: float = 600.0) -> dict[int, float] | None:
    """Cut every link of ``cluster`` (``Cluster.isolate_cluster``); per running
    node, seconds until it holds the other side unreachable.

    Nodes outside must mark ``cluster`` unreachable; nodes inside must mark
    every other cluster unreachable.  Evaluated on every event of each node's
    LAN core, so exact.  None if some node did not within ``timeout``.
    """
    pending = set(c.running())
    start = c.now
    took: dict[int, float] = {}

    def observe(i: int, e: Event, now: float) -> None:
        if (
            i in pending
            and isinstance(e, OriginChanged | MemberChanged)
            and _cut_off(c, i, cluster)
        ):
            took[i] = now - start
            pending.discard(i)

    c.observers.append(observe)
    try:
        c.isolate_cluster(cluster)
        done = c.run_until_true(lambda: not pending, timeout, check_every=1.0)
    finally:
        c.observers.remove(observe)
    return None if done is None else took


def all_reachable(c: Cluster) -> bool:
    """Every running node reaches every cluster it holds documents of."""
    return all(not reach_of(c, i).unreachable for i in c.running())


def heal_time(c: Cluster, timeout: float = 600.0, check_every: float = 0.5) -> float | None:
    """Heal every cut link; seconds until every cluster is reachable from every
    node and every document is where it may be (:func:`converged_everywhere`)."""
    c.heal()
    return c.run_until_true(
        lambda: all_reachable(c) and converged_everywhere(c), timeout, check_every=check_every
    )


def inject_wan(c: Cluster, dst: int, msg: Message, src: int | None = None) -> None:
    """Deliver a hand-made message to the WAN core of bridge ``dst`` now."""
    peer = c.nodes[src].id if src is not None else None
    host = c.nodes[dst].host
    assert host is not None
    host.receive(WAN, msg, c.now, peer=peer)
    c._flush(c.nodes[dst])


def _summary(values: Iterable[float]) -> str:
    vals = sorted(values)
    return f"p50 {statistics.median(vals):.2f} s, max {vals[-1]:.2f} s"


def main_multi(argv: list[str]) -> int:
    """``python -m meshd.testing --clusters N [--nodes M] [--bridges B]``: multi-cluster figures.

    Builds N clusters of M nodes (B bridges each) with the standard LAN and
    WAN profiles, and prints, each next to its stated bound: the time until
    every node holds every document exported to it; cross-cluster failover
    after the node of an app instance crashes; the time until a cut-off
    cluster is marked unreachable on both sides; the time until it converges
    again after the cut heals; and the wall time.
    """
    ap = argparse.ArgumentParser(
        prog="python -m meshd.testing",
        description="Run the multi-cluster harness scenarios and print their figures.",
    )
    ap.add_argument("--clusters", type=int, required=True, help="number of clusters (>= 3)")
    ap.add_argument("--nodes", type=int, default=50, help="nodes per cluster")
    ap.add_argument("--bridges", type=int, default=1, help="bridges per cluster")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--no-encode", action="store_true", help="skip wire encoding (faster, same dynamics)"
    )
    args = ap.parse_args(argv)
    if args.clusters < 3:
        ap.error("--clusters must be at least 3")
    if args.nodes < 3:
        ap.error("--nodes must be at least 3")
    if not 1 <= args.bridges < args.nodes:
        ap.error("--bridges must be at least 1 and below --nodes")

    wall = time.perf_counter()
    names = [f"c{k}" for k in range(args.clusters)]
    n, nb = args.nodes, args.bridges
    n_wan = nb * len(names)
    c, groups = multi_cluster(
        names, n, bridges={x: nb for x in names}, seed=args.seed, encode=not args.no_encode
    )
    lan, wan = c.config, c.wan_config
    print(
        f"mesh: {len(names)} clusters x {n} nodes, {nb} bridge(s) each "
        f"({n_wan} in the WAN pool), LAN and WAN profiles"
    )
    # What each cluster runs: "orders" in the first two clusters (exported to
    # all), a "ledger" exported to the next cluster only, a "cache" kept local.
    host = {x: groups[x][nb] for x in names}  # first non-bridge node
    for k, x in enumerate(names):
        if k < 2:
            c.register(host[x], "orders", f"orders-{x}")
        c.register(host[x], "ledger", f"ledger-{x}", export=(names[(k + 1) % len(names)],))
        c.register(host[x], "cache", f"cache-{x}", export=())
    ready = c.run_until_true(lambda: converged_everywhere(c), timeout=600.0, check_every=0.5)
    if ready is None:
        print(f"converge: NOT converged after 600 s virtual: {misplaced(c)[:3]}")
        return 1
    docs = len(published(c))
    print(
        f"converge from cold start: every node holds every document exported to it "
        f"({docs} documents) after {ready:.2f} s virtual (sampled every 0.5 s)"
    )

    # Cross-cluster failover: orders-c0 dies; askers use failover = [c0, c1].
    c0, c1 = names[0], names[1]
    policy = AppPolicy(failover=(c0, c1))
    victim = host[c0]
    own = [i for i in groups[c0] if i != victim]
    far = [i for x in names[2:] for i in groups[x]]
    failed = cross_cluster_failover(
        c, victim, "orders", own + far, to_cluster=c1, policy=policy, timeout=600.0
    )
    if failed is None:
        print("failover: some asker did not fail over within 600 s virtual")
        return 1
    print(
        f"failover after crashing {c.nodes[victim].id}, askers in {c0}: "
        f"{_summary(failed[i] for i in own)} "
        f"(bound: LAN detection {detection_bound(n, lan):.1f} s)"
    )
    print(
        f"failover to {c1}, {len(far)} askers in the other clusters: "
        f"{_summary(failed[i] for i in far)} "
        f"(bound: {cross_cluster_bound(n, n_wan, n, lan, wan):.1f} s = LAN detection "
        f"{detection_bound(n, lan):.1f} + WAN spread {spread_bound(n_wan, wan):.1f} "
        f"+ LAN spread {spread_bound(n, lan):.1f})"
    )

    # A lost cluster: every link of the last cluster cut.
    lost = names[-1]
    cut = isolation_time(c, lost, timeout=1200.0)
    if cut is None:
        print(f"lost cluster: {lost} not marked unreachable everywhere within 1200 s virtual")
        return 1
    outside = [t for i, t in cut.items() if c.nodes[i].cluster != lost]
    inside = [t for i, t in cut.items() if c.nodes[i].cluster == lost]
    print(
        f"lost cluster {lost} (cut off): marked unreachable by all {len(outside)} nodes "
        f"elsewhere: {_summary(outside)} "
        f"(bound {unreachable_bound(n_wan, n, lan, wan):.1f} s); its {len(inside)} nodes "
        f"mark the others unreachable: {_summary(inside)} "
        f"(bound {cut_off_side_bound(n_wan, n, lan, wan):.1f} s)"
    )
    c.register(host[lost], "orders", f"orders-{lost}")  # published while cut off
    healed = heal_time(c, timeout=1200.0)
    bound = heal_bound(n, n_wan, n, lan, wan)
    if healed is None:
        print(f"heal: not converged within 1200 s virtual: {misplaced(c)[:3]}")
        return 1
    print(
        f"heal: every cluster reachable and every document (one published while cut "
        f"off) everywhere again after {healed:.2f} s virtual, sampled every 0.5 s "
        f"(bound {bound:.1f} s)"
    )
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
