"""Standard scenarios on the harness, shared by the tests and the figures command.

Single pool: a converged join, the spread of one record, crash detection,
false deaths under loss.  Several clusters: :func:`multi_cluster` builds a
topology of bridges and pools, and the functions after it time what a
multi-cluster mesh promises (every document where it is exported and nowhere
else, cross-cluster failover after a crash, a lost cluster marked
unreachable, convergence after it comes back), each next to a bound of
``meshd.protocol.bounds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from meshd.policy.policy import AppPolicy
from meshd.protocol.bridge import WAN
from meshd.protocol.config import Config
from meshd.protocol.events import Event, MemberChanged, OriginChanged
from meshd.protocol.reach import Reach, compute_reach
from meshd.testing.harness import Cluster
from meshd.wire import (
    Message,
    Status,
    doc_member,
    may_reach,
)

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
        if isinstance(e, MemberChanged) and e.member == vid and e.status is Status.DEAD:
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
            idx = next(hn.index for hn in self.c.nodes if hn.id == e.member)
            if not self.c.nodes[idx].crashed:
                self.false_deaths += 1
                self.subjects.add(e.member)


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


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


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
        return any(x.active and x.member == vid for x in c.resolve(a, app, namespace, policy))

    def failed_over(a: int) -> bool:
        active = [x for x in c.resolve(a, app, namespace, policy) if x.active]
        if not active or any(x.member == vid for x in active):
            return False
        first = active[0]
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
