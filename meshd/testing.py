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

Run ``python -m meshd.testing --nodes 64`` for the figures of the standard
scenarios (join, spread, detection, false deaths under loss).
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meshd.identity import CA, StateSigner, StateVerifier, create_ca, issue_node_cert
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy
from meshd.policy.resolve import Answer, resolve
from meshd.protocol.bridge import LAN, WAN, Bridge
from meshd.protocol.config import Config
from meshd.protocol.events import Event, MemberChanged, OriginChanged
from meshd.protocol.node import Node
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

_DELIVER, _TIMER = 0, 1


def uniform_latency(lo: float, hi: float) -> Latency:
    def draw(src: int, dst: int, rng: random.Random) -> float:
        return rng.uniform(lo, hi)

    return draw


@dataclass
class HarnessNode:
    """One slot of the harness: the identity outlives the cores across restarts.

    Every node has a LAN core; a bridge also has a WAN core and the
    :class:`Bridge` that couples them, exactly as the agent runs them.
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
    cores: dict[str, Node] = field(default_factory=dict)
    bridge: Bridge | None = None
    crashed: bool = False
    paused: bool = False
    inbox: list[tuple[str, int, Message]] = field(default_factory=list)
    timer_gen: int = 0
    sent_msgs: Counter[str] = field(default_factory=Counter)
    sent_bytes: Counter[str] = field(default_factory=Counter)

    @property
    def id(self) -> str:
        return member_id(self.cluster, self.name)

    @property
    def core(self) -> Node | None:
        return self.cores.get(LAN)


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
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or Config.lan()
        self.wan_config = wan_config or Config.wan()
        self.latency = latency or uniform_latency(0.0005, 0.002)
        self.loss = loss
        self.encode = encode
        self.now = 0.0
        self.ca = ca or create_ca("mesh.local")
        self.verifier = StateVerifier(self.ca.cert, self.ca.trust_domain)
        self.nodes: list[HarnessNode] = []
        self._by_addr: dict[str, tuple[int, str]] = {}
        self._heap: list[tuple[float, int, int, int, object]] = []
        self._tie = 0
        self.blocked: set[tuple[int, int]] = set()
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
                self._flush(hn)

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
        cert = issue_node_cert(self.ca, name, cluster)
        hn = HarnessNode(i, name, cluster, address, region, zone, StateSigner(cert))
        hn.gateway = gateway
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

        hn.cores = {LAN: make(LAN, self.config, hn.address, incarnation)}
        hn.bridge = None
        if hn.is_bridge:
            hn.cores[WAN] = make(WAN, self.wan_config, hn.wan_address, wan_incarnation)
            hn.bridge = Bridge(hn.cores[LAN], hn.cores[WAN])
            hn.bridge.start(self.now)
        hn.crashed = False
        self._flush(hn)

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
        self._flush(self.nodes[i])

    def join_wan(self, i: int, seed: int) -> None:
        self.wan(i).join([self.nodes[seed].wan_address], self.now)
        self._flush(self.nodes[i])

    def crash(self, i: int) -> None:
        """Stop node ``i`` at once: no leave, no more messages, timers gone."""
        hn = self.nodes[i]
        hn.crashed = True
        hn.inbox.clear()
        hn.timer_gen += 1

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
        self._flush(hn)

    def leave(self, i: int) -> None:
        for core in self.nodes[i].cores.values():
            core.leave(self.now)
        self._flush(self.nodes[i])

    def pause(self, i: int) -> None:
        self.nodes[i].paused = True
        self.nodes[i].timer_gen += 1

    def resume(self, i: int) -> None:
        hn = self.nodes[i]
        hn.paused = False
        inbox, hn.inbox = hn.inbox, []
        for pool, src, msg in inbox:
            hn.cores[pool].receive(msg, self.now, peer=self.nodes[src].id)
        for core in hn.cores.values():
            core.handle_timer(self.now)
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

    def register(self, i: int, app: str, instance: str, port: int = 8080, **kw: object) -> int:
        rec = AppRecord(app=app, instance=instance, address="127.0.0.1", port=port, **kw)  # type: ignore[arg-type]
        version = self.core(i).set_app(rec, self.now)
        self._flush(self.nodes[i])
        return version

    def inject(self, dst: int, msg: Message, src: int | None = None) -> None:
        """Deliver a hand-made message to ``dst`` now (for adversarial tests)."""
        peer = self.nodes[src].id if src is not None else None
        self.core(dst).receive(msg, self.now, peer=peer)
        self._flush(self.nodes[dst])

    # ------------------------------------------------------------------
    # The event loop

    def _push(self, t: float, kind: int, index: int, payload: object) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, kind, index, payload))

    def _flush(self, hn: HarnessNode) -> None:
        if not hn.cores or hn.crashed:
            return
        # A bridge's injection makes the other core produce more: go round
        # until both are quiet (bounded: each pass only relays new versions).
        for _ in range(16):
            busy = False
            for pool, core in hn.cores.items():
                for addr, msg in core.messages_to_send():
                    self._transmit(hn, pool, addr, msg)
                event = core.next_event()
                while event is not None:
                    busy = True
                    if pool == LAN:
                        for obs in self.observers:
                            obs(hn.index, event, self.now)
                    if hn.bridge is not None:
                        hn.bridge.on_event(pool, event, self.now)
                    event = core.next_event()
            if not busy:
                break
        if not hn.paused:
            hn.timer_gen += 1
            t = min(core.get_timer() for core in hn.cores.values())
            self._push(max(t, self.now), _TIMER, hn.index, hn.timer_gen)

    def _transmit(self, hn: HarnessNode, pool: str, addr: str, msg: Message) -> None:
        kind = type(msg).__name__
        dst = self._by_addr.get(addr)
        payload: object = msg
        if self.encode:
            frame = encode_frame(msg)
            hn.sent_bytes[kind] += len(frame)
            payload = frame
        hn.sent_msgs[kind] += 1
        if dst is None or (hn.index, dst[0]) in self.blocked:
            self.dropped += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        self._push(
            self.now + self.latency(hn.index, dst[0], self.rng),
            _DELIVER,
            dst[0],
            (dst[1], hn.index, payload),
        )

    def _deliver(self, dst: int, pool: str, src: int, payload: object) -> None:
        hn = self.nodes[dst]
        core = hn.cores.get(pool)
        if hn.crashed or core is None:
            self.dropped += 1
            return
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
        core.receive(msg, self.now, peer=self.nodes[src].id)
        self._flush(hn)

    def step(self) -> bool:
        """Process one event; False when nothing is scheduled."""
        if not self._heap:
            return False
        t, _, kind, index, payload = heapq.heappop(self._heap)
        self.now = max(self.now, t)
        if kind == _DELIVER:
            pool, src, data = payload  # type: ignore[misc]
            self._deliver(index, pool, src, data)
        else:
            hn = self.nodes[index]
            if payload != hn.timer_gen or hn.crashed or hn.paused or not hn.cores:
                return True
            for core in hn.cores.values():
                if core.get_timer() <= self.now:
                    core.handle_timer(self.now)
            self._flush(hn)
        return True

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            self.step()
        self.now = max(self.now, t)

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
    c = Cluster(n, seed=seed, config=Config.lan(lifeguard=lifeguard), encode=False)
    converged_join(c)
    c.loss = loss
    counter = DeathCounter(c)
    c.run_for(minutes * 60)
    return counter.false_deaths


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
        fd = false_deaths_under_loss(n, 0.10, args.loss_minutes, lifeguard, args.seed)
        print(
            f"false deaths, 10% loss, {args.loss_minutes:g} virtual min, "
            f"lifeguard {'on ' if lifeguard else 'off'}: {fd}"
        )
    print(f"wall time {time.perf_counter() - wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
