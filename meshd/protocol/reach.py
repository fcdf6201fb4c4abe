"""What a node may serve from other clusters: the bridges' statements, summed up.

Pure function over a record store.  A document of another cluster C is
served only when

- cluster C is reachable: some live bridge document of *our* cluster does
  not list C as unreachable.  With no live bridge of our own, every other
  cluster is unreachable: nothing can carry their changes to us any more.

Whether a member of C is dead is not judged here: a bridge of C states it
("dead as of version v") and every core that hears it tombstones those
documents in its store (``Core._apply_down``), so they are simply not live.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshd.protocol.store import Entry


@dataclass(frozen=True)
class Reach:
    cluster: str
    #: Member ids of other clusters that their own bridges hold down now.
    down: frozenset[str] = frozenset()
    #: Other clusters we cannot reach now.
    unreachable: frozenset[str] = frozenset()
    #: Clusters with at least one document held, and bridges per cluster.
    clusters: dict[str, int] = field(default_factory=dict)
    #: Live member documents (scope "") per cluster.
    nodes: dict[str, int] = field(default_factory=dict)
    #: Estimated round trip (seconds) to each other cluster, the best our
    #: bridges state; what "prefer the nearest other cluster" orders by.
    rtt: dict[str, float] = field(default_factory=dict)

    def serves(self, member: str) -> bool:
        c = member.partition("/")[0]
        if c == self.cluster:
            return True
        return c not in self.unreachable

    def reachable(self, cluster: str) -> bool:
        return cluster == self.cluster or cluster not in self.unreachable


def compute_reach(cluster: str, live: Iterable[Entry]) -> Reach:
    """Sum up the bridges' statements among the live documents we hold."""
    down: set[str] = set()
    own_views: list[frozenset[str]] = []
    bridges: dict[str, int] = {}
    nodes: dict[str, int] = {}
    rtt: dict[str, float] = {}
    for entry in live:
        st = entry.state
        if st.scope != "":
            continue  # statements ride on main documents only
        nodes[st.cluster] = nodes.get(st.cluster, 0) + 1
        bridges.setdefault(st.cluster, 0)
        if not st.bridge:
            continue
        bridges[st.cluster] += 1
        if st.cluster == cluster:
            own_views.append(frozenset(st.unreachable))
            for c, us in st.rtt:
                if c not in rtt or us / 1e6 < rtt[c]:
                    rtt[c] = us / 1e6
        else:
            down.update(mid for mid, _ in st.down)
    others = {c for c in nodes if c != cluster}
    if not own_views:
        unreachable = others
    else:
        # Reachable while at least one of our bridges does not call it cut off.
        unreachable = {c for c in others if all(c in view for view in own_views)}
    return Reach(
        cluster=cluster,
        down=frozenset(down),
        unreachable=frozenset(unreachable),
        clusters=bridges,
        nodes=nodes,
        rtt=rtt,
    )
