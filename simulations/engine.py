"""The simulator: ``meshd.testing.Cluster`` driven by a scenario over a modelled network.

One driver of the core, not two: :class:`Simulation` is the harness's
``Cluster`` (its event heap in virtual time, its pump of each node's
:class:`~meshd.protocol.host.Host` exactly as the agent pumps it, its
crash/restart/leave/pause/resume), composed with what the harness lets a
driver plug in:

- the network: the :class:`~simulations.network.Network` model decides loss,
  partitions and latency (``Cluster(network=...)``);
- the sizes: every message is counted in exact wire bytes per node and type,
  :func:`simulations.wiresize.wire_size`, without encoding
  (``Cluster(sizers=...)``); the harness counts what each node receives;
- identities: ``add_node`` gives deterministic ones (a node's key and
  certificate serial come from the seed), so that certificate sizes, hence
  byte counts, are the same in every run of one scenario and seed;
- ``node_started`` notes the incarnation each life starts at.

Commands (joins, publications, faults) sit in a second heap and run between
events at their virtual times.  A run is: build the topology, join it (warm
up on a clean network until every pool lists every member and every node
holds every document), then the measured window of ``duration_s`` with the
scenario's publications and faults.  Scenario times count from the start of
that window.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import heapq
import itertools
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshd.identity import (
    BRIDGE_ROLE_URI,
    CA,
    NodeCert,
    StateSigner,
    create_ca,
    spiffe_id,
)
from meshd.policy.policy import AppPolicy
from meshd.protocol.bridge import WAN
from meshd.protocol.member_table import view_term
from meshd.protocol.reach import compute_reach
from meshd.testing import Cluster, HarnessNode
from meshd.wire import (
    AppRecord,
    PushPullReply,
    SignedState,
    Status,
    doc_member,
    may_reach,
)
from simulations.faults import FaultSchedule
from simulations.metrics import Collector, Detection, FailoverWatch, Spread
from simulations.network import Network
from simulations.scenario import Scenario
from simulations.wiresize import SIZERS as _SIZERS

# ----------------------------------------------------------------------
# Deterministic identities


def _deterministic_cert(
    ca: CA, seed: int, cluster: str, node: str, bridge: bool = False
) -> NodeCert:
    """A node certificate whose key, serial and validity follow from the seed.

    Same fields as ``meshd.identity.issue_node_cert`` issues (the verifier
    checks the chain and the SPIFFE URI), but nothing random: the DER length,
    hence every state's wire size, is the same in every run.
    """
    digest = hashlib.sha256(f"meshd-sim/{seed}/{cluster}/{node}".encode()).digest()
    key = ed25519.Ed25519PrivateKey.from_private_bytes(digest)
    serial = int.from_bytes(digest[:16], "big") | (1 << 127)  # fixed length: top bit set
    start = ca.cert.not_valid_before_utc
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, node)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3000))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id(ca.trust_domain, cluster, node))]
                + ([x509.UniformResourceIdentifier(BRIDGE_ROLE_URI)] if bridge else [])
            ),
            critical=False,
        )
        .sign(ca.key, None)
    )
    return NodeCert(
        cert=cert,
        key=key,
        ca_cert=ca.cert,
        trust_domain=ca.trust_domain,
        cluster=cluster,
        node=node,
    )


def _deterministic_ca() -> CA:
    """A CA with a fixed validity start, so node certificates encode identically
    (its key is random, but only its fixed-length signatures reach the wire)."""
    from datetime import UTC, datetime

    return create_ca("mesh.local", now=datetime(2025, 1, 1, tzinfo=UTC), days=3650)


# ----------------------------------------------------------------------
# Garbage collection

#: Allocations between two young-generation collections during a run (the
#: interpreter's default is 700).  Simulator-only: see :func:`few_collections`.
GC_YOUNG_THRESHOLD = 100_000


@contextlib.contextmanager
def few_collections() -> Iterator[None]:
    """Run the block with the cyclic garbage collector mostly out of the way.

    A run allocates millions of short-lived messages and keeps a heap that
    reaches gigabytes at 10,000 nodes; with the default thresholds the
    collector runs every 700 allocations and its older generations traverse
    that heap again and again (a sixth of the CPU time at 5,000 nodes).  The
    protocol frees nearly everything by reference counting, so collecting
    rarely costs little memory.  Nothing here changes what a run computes:
    only when unreachable cycles are freed.  Thresholds are restored after.
    """
    before = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*before)


# ----------------------------------------------------------------------
# The simulation


class Simulation(Cluster):
    """A scenario on the harness; see the module doc.  ``run()`` returns the raw record."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        progress: Callable[[str], None] | None = None,
        progress_every: float = 5.0,
    ) -> None:
        sc = scenario
        self.scenario = sc
        spec = sc.network
        self.net = Network(
            seed=sc.seed,
            lan=spec.lan,
            wan=spec.wan,
            wan_pairs={(a, b): d for a, b, d in spec.wan_pairs},
            loss=spec.loss,
            burst=spec.burst,
        )
        self.net.enabled = not sc.warmup.clean_network
        self.index_of: dict[str, int] = {}
        #: node -> the incarnation its current life started at (a verdict at a
        #: lower one is about a previous life, before a restart).
        self.life_start: dict[int, int] = {}
        self.down: set[int] = set()  # crashed, or left and stopped
        self.events = 0
        self._cmds: list[tuple[float, int, Callable[[], None]]] = []
        self._cmd_tie = itertools.count()
        self.rng_faults = random.Random(f"faults/{sc.seed}")
        self.fault_log: list[dict[str, Any]] = []
        self.t0 = 0.0  # start of the measured window (virtual)
        self.hosts: dict[str, dict[str, list[int]]] = {}  # app -> cluster -> node indices
        self.groups: dict[str, list[int]] = {}
        self._progress = progress
        self._progress_every = progress_every
        self._wall0 = time.perf_counter()
        self._last_print = self._wall0
        self.phase = "build"
        self.joined_at = 0.0
        self.wall_warmup = 0.0
        self.sent0: Any = None
        self.recv0: Any = None
        super().__init__(
            0,
            seed=sc.seed,
            config=sc.lan,
            wan_config=sc.wan,
            encode=False,
            join=False,
            ca=_deterministic_ca(),
            network=self.net,
            sizers=_SIZERS,
        )
        self.collector = Collector(
            self.index_of,
            lambda i: i in self.down,
            self.life_start.__getitem__,
            self._classify,
            lambda a, b: self.net.blocked(a, b) or self.net.blocked(b, a),
            lambda i: self.nodes[i].paused or i in self.net.slow,
            lambda i: i not in self.net.slow and self.net.lags(i, self.now),
        )
        with few_collections():
            self._build()

    # -- building -------------------------------------------------------

    def add_node(self, **kw: Any) -> HarnessNode:
        """As ``Cluster.add_node``, with a deterministic identity; never joins by itself
        (the scenario schedules joins)."""
        start = kw.pop("start", True)
        kw.pop("join", None)
        # The identity first, so that the harness issues none to throw away.
        name = kw["name"] = kw.get("name") or f"n{len(self.nodes)}"
        cluster = kw.setdefault("cluster", "east")
        nc = _deterministic_cert(self.ca, self.seed, cluster, name, kw.get("bridge", False))
        hn = super().add_node(start=False, join=False, signer=StateSigner(nc), **kw)
        ix = self.net.add_node(hn.cluster)
        assert ix == hn.index
        self.index_of[hn.id] = hn.index
        if start:
            self.start(hn.index)
        return hn

    def node_started(self, hn: HarnessNode) -> None:
        self.life_start[hn.index] = hn.cores["lan"].incarnation

    def _build(self) -> None:
        topo = self.scenario.topology
        sizes = topo.sizes()
        zones = "abcdefghijklmnopqrstuvwxyz"[: topo.zones]
        for cname in topo.clusters:
            self.groups[cname] = []
            for k in range(sizes[cname]):
                hn = self.add_node(
                    cluster=cname,
                    name=f"n{k}",
                    region=f"r-{cname}",
                    zone=f"{cname}-{zones[k % len(zones)]}",
                    bridge=k < topo.bridges,
                )
                self.groups[cname].append(hn.index)
        # Joins: each node through the first node of its cluster (bridges also
        # through the first bridge of the mesh), spread over the join window.
        window = self.scenario.warmup.join_window_s
        first_bridge = next((h.index for h in self.nodes if h.is_bridge), None)
        join_rng = random.Random(f"join/{self.seed}")
        for hn in self.nodes:
            seed = self.groups[hn.cluster][0]
            at = join_rng.uniform(0, window) if window > 0 else 0.0
            if hn.index != seed:
                self.at(at, _join_cmd(self.join, hn.index, seed))
            if hn.is_bridge and first_bridge is not None and hn.index != first_bridge:
                self.at(at, _join_cmd(self.join_wan, hn.index, first_bridge))
        # Apps: per_cluster instances in each of their clusters, on the first
        # non-bridge nodes after the cluster's first (the join seed).
        for app in self.scenario.apps:
            self.hosts[app.name] = {}
            for cname in app.clusters:
                members = self.groups[cname]
                candidates = [i for i in members if not self.nodes[i].is_bridge and i != members[0]]
                if not candidates:
                    candidates = [i for i in members if not self.nodes[i].is_bridge]
                picked = candidates[: app.per_cluster]
                self.hosts[app.name][cname] = picked
                for k, i in enumerate(picked):
                    self.register(i, app.name, f"{app.name}-{cname}-{k}")

    # -- the command heap -------------------------------------------------

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``t`` (absolute), after the events at ``t``."""
        heapq.heappush(self._cmds, (t, next(self._cmd_tie), fn))

    def run_until(self, t: float) -> int:
        n = super().run_until(t)
        self.events += n
        return n

    def advance(self, t_end: float) -> None:
        """Run events and commands up to ``t_end``, printing progress now and then."""
        while True:
            t_cmd = self._cmds[0][0] if self._cmds else math.inf
            target = min(t_cmd, t_end)
            while self.now < target:
                self.run_until(min(target, self.now + 1.0))
                self._maybe_progress()
            if t_cmd > t_end:
                return
            while self._cmds and self._cmds[0][0] <= self.now:
                _, _, fn = heapq.heappop(self._cmds)
                fn()

    def _maybe_progress(self, force: bool = False) -> None:
        if self._progress is None:
            return
        wall = time.perf_counter()
        if not force and wall - self._last_print < self._progress_every:
            return
        self._last_print = wall
        elapsed = wall - self._wall0
        rate = self.events / elapsed if elapsed > 0 else 0.0
        if self.phase == "measure":
            where = f"{self.now - self.t0:.1f}/{self.scenario.duration_s:g} s virtual"
        else:
            where = f"{self.now:.1f} s virtual"
        self._progress(
            f"[{self.scenario.name} n={len(self.nodes)}] {self.phase} {where}, "
            f"{self.events:,} events, {rate:,.0f} events/s, wall {elapsed:.0f} s"
        )

    # -- faults and commands the schedule uses ------------------------------

    def log(self, kind: str, **details: Any) -> None:
        self.fault_log.append({"t": round(self.now - self.t0, 6), "kind": kind, **details})

    def crash(self, i: int, detect: bool = True) -> None:
        """Crash node ``i``; when ``detect``, time until its cluster holds it dead."""
        if i in self.down:
            return
        super().crash(i)
        self.nodes[i].paused = False  # a dead process is not paused; a restart runs it
        self.down.add(i)
        self.collector.node_down(i)
        if detect and self.phase == "measure":
            self._watch_detection(i)

    def recheck_failover(self) -> None:
        """Evaluate every asker's lookup now (after a fault that changes what is reachable)."""
        for w in self.collector.watches:
            for a in w.askers:
                self.collector.check_failover(w, a, self.now)

    def stop_after_leave(self, i: int) -> None:
        """Graceful leave, then the process exits (its leave notices are already sent)."""
        if i in self.down:
            return
        self.leave(i)
        Cluster.crash(self, i)
        self.nodes[i].paused = False
        self.down.add(i)
        self.collector.node_down(i)

    def restart(self, i: int, seeds: Any = None) -> None:
        """Start node ``i`` again with the same identity.  As the agent does, it
        contacts every peer it last knew (``Cluster.restart``); a node that knew
        no one joins through its cluster's seed."""
        if i not in self.down:
            return
        hn = self.nodes[i]
        self.down.discard(i)
        if seeds is None and self.core(i).pool_size <= 1:
            seeds = [self.groups[hn.cluster][0]]
        super().restart(i, seeds=seeds)
        self.collector.node_up(i, hn.id)

    def running_in(self, cluster: str | None = None) -> list[int]:
        return [
            h.index
            for h in self.nodes
            if h.index not in self.down and (cluster is None or h.cluster == cluster)
        ]

    def unreachable_from(self, asker: int, target: int) -> bool:
        return (
            target in self.down
            or self.net.blocked(target, asker)
            or self.net.blocked(asker, target)
        )

    def cluster_lost(self, frm: str, to: str) -> bool:
        """Is cluster ``to`` really lost from ``frm``: no running bridge of
        ``frm`` and running bridge of ``to`` that can exchange messages?"""
        ours = [h.index for h in self.nodes if h.is_bridge and h.cluster == frm]
        theirs = [h.index for h in self.nodes if h.is_bridge and h.cluster == to]
        return not any(
            a not in self.down
            and b not in self.down
            and not self.net.blocked(a, b)
            and not self.net.blocked(b, a)
            for a in ours
            for b in theirs
        )

    def _reach_truth(self, i: int) -> tuple[frozenset[str], frozenset[str]]:
        """(clusters node ``i`` holds unreachable, those of them not lost from it).

        The verdict is ``reach.compute_reach`` over the node's store; it only
        moves with the main documents of the node's own bridges, so those are
        read first and the whole store only when some cluster is held
        unreachable (rare: a full pass costs a sort of every document)."""
        cluster = self.nodes[i].cluster
        store = self.core(i).store
        views = []
        for b in self._bridges_of.get(cluster, ()):
            entry = store.get(b)
            if entry is not None and entry.tombstone_since is None and entry.state.bridge:
                views.append(entry.state.unreachable)
        common = set(self._others[cluster])
        for v in views:
            common.intersection_update(v)
        if views and not common:
            return frozenset(), frozenset()  # what compute_reach would say
        held = compute_reach(cluster, store.live()).unreachable
        return held, frozenset(c for c in held if not self.cluster_lost(cluster, c))

    # -- measurements -------------------------------------------------------

    def publish(self, i: int, app: str) -> None:
        """Register a new instance of ``app`` on node ``i``; time its spread."""
        hn = self.nodes[i]
        instance = f"{app}-{i}-{sum(1 for s in self.collector.spreads if s.node == i)}"
        version = self.register(i, app, instance)
        pending = {j for j in self.running_in() if j != i}
        s = Spread(hn.id, version, self.now, i, pending, total=len(pending) + 1)
        self.collector.watch_spread(s)
        self.log("publish", node=i, app=app, version=version)

    def register(self, i: int, app: str, instance: str, port: int = 8080, **kw: object) -> int:
        rec = AppRecord(app=app, instance=instance, address=f"10.0.0.{i % 250 + 1}", port=port)
        version = self.core(i).set_app(rec, self.now)
        self.flush(i)
        return version

    def _watch_detection(self, victim: int) -> None:
        hn = self.nodes[victim]
        pending = {j for j in self.running_in(hn.cluster) if j != victim}
        self.collector.watch_detection(Detection(victim, hn.id, self.now, pending))

    def _classify(self, asker: int, w: FailoverWatch) -> str:
        answers = self.resolve(asker, w.app, policy=AppPolicy(failover=w.policy))
        active = [a for a in answers if a.active]
        if not active:
            return "none"
        st = active[0]
        target = self.index_of.get(st.member)
        if target is not None and self.unreachable_from(asker, target):
            return "stale"
        if st.cluster == w.primary:
            return "primary"
        if st.cluster == w.secondary:
            return "failover"
        return "other"

    # -- warm-up --------------------------------------------------------------

    def joined(self) -> bool:
        """Every running node lists its whole cluster and holds every node's document;
        every running bridge lists every bridge."""
        n = len(self.nodes)
        sizes = {c: len(g) for c, g in self.groups.items()}
        n_bridges = sum(1 for h in self.nodes if h.is_bridge)
        for h in self.nodes:
            if h.index in self.down:
                continue
            core = h.cores["lan"]
            if core.pool_size != sizes[h.cluster] or len(core.store) < n:
                return False
            if h.is_bridge and h.cores[WAN].pool_size != n_bridges:
                return False
        return True

    def preset(self) -> None:
        """Hand every core the converged view at once: one full sync from a seed.

        What a node gets after a push-pull with a seed that already knows the
        whole mesh: a ``PushPullReply`` listing every member of its pool alive
        (at each one's own claim about itself), every document that may reach
        its cluster, the matching digest and view fingerprint.  It is the
        state a cold join converges to, reached without the O(n^2)
        retransmissions of n alive claims that a cold join of n nodes costs.
        Not counted as traffic (it precedes the window).

        In each cluster the first node takes that reply through
        ``Core.receive``, so the core builds its tables itself; every other
        node of the cluster that is not a bridge then adopts those tables
        (``Core.adopt``: shared copy-on-write, the memory of one view for the
        whole cluster until a core changes something).  Bridges take the
        reply through ``receive`` too, so that their bridge sees the events
        and relays the documents to the WAN pool.
        """
        self.phase = "preset"
        docs = []
        for h in self.nodes:
            core = h.cores["lan"]
            docs += [e.signed for e in core.store.live() if doc_member(e.signed.origin) == h.id]
        digest_all = {s.origin: s.version for s in docs}
        pools: list[tuple[str, list[HarnessNode], list[SignedState]]] = []
        for cname, group in self.groups.items():
            states = [s for s in docs if may_reach(s.origin, cname)]
            pools.append(("lan", [self.nodes[i] for i in group], states))
        bridges = [h for h in self.nodes if h.is_bridge]
        if len(bridges) > 1:
            pools.append((WAN, bridges, []))
        for pool, hns, states in pools:
            cores = [h.cores[pool] for h in hns]
            members = tuple(c.members[c.id].update_for(Status.ALIVE, c.id) for c in cores)
            view = 0
            for c in cores:
                view ^= view_term(c.members[c.id])
            digest = {s.origin: s.version for s in states} if states else dict(digest_all)
            shared = None
            for k, h in enumerate(hns):
                core = h.cores[pool]
                if shared is not None and not h.is_bridge:
                    core.adopt(shared)
                else:
                    src = hns[1] if k == 0 else hns[0]
                    msg = PushPullReply(
                        src.id, digest=digest, members=members, states=tuple(states), view=view
                    )
                    assert h.host is not None
                    h.host.receive(pool, msg, self.now, peer=src.id)
                self.flush(h.index)
                if k == 0 and pool == "lan":
                    shared = core.snapshot()
                self._maybe_progress()

    def warm_up(self) -> float:
        """Join everyone; the virtual time it took until ``joined()``, plus settling."""
        w = self.scenario.warmup
        self.phase = "warm-up"
        if w.mode == "preset":
            self._cmds = [c for c in self._cmds if not getattr(c[2], "is_join", False)]
            heapq.heapify(self._cmds)
            self.preset()
            self.phase = "warm-up"
        self.advance(w.join_window_s)
        took = None
        deadline = w.max_s
        while self.now < deadline:
            if self.joined():
                took = self.now
                break
            self.advance(min(self.now + 1.0, deadline))
        if took is None:
            raise RuntimeError(
                f"warm-up: the mesh did not converge within warmup.max_s = {w.max_s:g} s virtual"
            )
        self.advance(self.now + w.settle_s)
        return took

    # -- the run ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Warm up, run the measured window; the results document (results.py)."""
        with few_collections():
            # What the build made (certificates, cores, shared views) lives to
            # the end: frozen, the collector never traverses it again; the
            # same for the converged tables the warm-up makes.
            gc.freeze()
            try:
                wall_build = time.perf_counter() - self._wall0
                self.joined_at = self.warm_up()
                gc.freeze()
                return self._measure(wall_build)
            finally:
                gc.unfreeze()

    def _measure(self, wall_build: float) -> dict[str, Any]:
        from simulations.results import build_results

        sc = self.scenario
        self.wall_warmup = time.perf_counter() - self._wall0
        self.phase = "measure"
        self.t0 = self.now
        self.collector.origin = self.t0
        if len(self.groups) > 1:
            self.collector.bridge_clusters = {h.id: h.cluster for h in self.nodes if h.is_bridge}
            self.collector.cluster_of = lambda i: self.nodes[i].cluster
            self.collector.reach = self._reach_truth
            self._bridges_of: dict[str, list[str]] = {}
            for h in self.nodes:
                if h.is_bridge:
                    self._bridges_of.setdefault(h.cluster, []).append(h.id)
            self._others = {c: set(self.groups) - {c} for c in self.groups}
            for i in self.running_in():
                self.collector.check_unreachable(i, self.now)
        self.observers.append(self.collector)
        self.net.enabled = True
        self.sent0 = self._sent_totals()
        self.recv0 = (self.received_msgs, self.received_bytes)
        for app in sc.apps:
            if app.failover:
                self._watch_failover(app.name, app.failover)
        FaultSchedule(self).install()
        self.advance(self.t0 + sc.duration_s)
        self._maybe_progress(force=True)
        return build_results(self, time.perf_counter() - self._wall0, wall_build)

    def _watch_failover(self, app: str, order: tuple[str, ...]) -> None:
        hosting = set(self.hosts[app])
        askers = [i for i in self.running_in() if self.nodes[i].cluster not in hosting]
        relevant = {self.nodes[i].id for c in self.hosts[app].values() for i in c}
        relevant |= {h.id for h in self.nodes if h.is_bridge}
        w = FailoverWatch(app, order[0], order[1], order, askers, relevant)
        self.collector.watch_failover(w, self.now)

    def _sent_totals(self) -> tuple[Counter[str], Counter[str], list[int], list[int]]:
        per_msgs = [h.sent_count for h in self.nodes]
        per_bytes = [h.sent_size for h in self.nodes]
        return Counter(self.sent_msgs), Counter(self.sent_bytes), per_msgs, per_bytes


def _join_cmd(join: Callable[[int, int], None], i: int, seed: int) -> Callable[[], None]:
    def cmd() -> None:
        join(i, seed)

    cmd.is_join = True  # type: ignore[attr-defined]
    return cmd


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
