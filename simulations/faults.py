"""The scenario's schedule: faults and publications, turned into timed commands.

:meth:`FaultSchedule.install` puts every entry of ``scenario.faults`` and
``scenario.publish`` on the simulation's command heap at ``t0 + at_s``
(repeated every ``every_s`` until ``until_s`` when given).  Node selectors are
resolved when the command fires, from the nodes running then, with the
simulation's fault generator, so a run stays a function of the seed.

Kinds (fields in ``scenario.FAULT_FIELDS``):

- ``crash`` / ``leave``: stop ``count`` nodes (leave: say goodbye first);
  ``restart_after_s`` brings them back with the same identity.
- ``restart``: start a stopped node again.
- ``pause``: stop ``count`` processes for ``duration_s`` (timers stop,
  messages wait), then resume them.
- ``slow``: for ``duration_s``, every message ``count`` nodes send or
  receive takes ``delay_s`` longer (timers keep firing: probes time out).
- ``churn``: a Poisson process of ``rate_per_s`` stops (a ``leave_fraction``
  of them graceful), each node back after ``down_s``.
- ``lose_cluster``: every node of ``cluster`` crashes (``mode = "crash"``) or
  every link to it is cut (``"cut"``).
- ``lose_bridge``: ``count`` running bridges of ``cluster`` crash.
- ``partition``: cut two sets of clusters apart (``sides``), or a random
  ``fraction`` of the nodes (of ``cluster``, or of all) from the rest;
  ``heal_after_s`` heals it.  A node split is measured: the time until each
  side lists only itself, and after the heal until everyone lists everyone.
- ``heal``: remove every partition.  ``loss``: set independent loss to ``rate``.

Random selections never pick a bridge, an app's host, a publishing node or a
node already stopped or paused, so each fault does what it says and nothing
else; bridges are lost only by name (``bridge:<cluster>``, ``lose_bridge``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING, Any

from simulations.scenario import Fault, Publish

if TYPE_CHECKING:
    from simulations.engine import Simulation

POLL_S = 0.5  # virtual seconds between checks of a partition's split and heal


class FaultSchedule:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.rng = sim.rng_faults
        self.end = sim.t0 + sim.scenario.duration_s
        self.protected: set[int] = {
            i for hosts in sim.hosts.values() for c in hosts.values() for i in c
        }
        #: Node-split partitions: measured split and heal times.
        self.partitions: list[dict[str, Any]] = []
        sim.schedule = self  # type: ignore[attr-defined]

    # -- installing -----------------------------------------------------------

    def _times(self, at: float, every: float | None, until: float | None) -> list[float]:
        start = self.sim.t0 + at
        if every is None:
            return [start]
        stop = self.sim.t0 + until if until is not None else self.end
        n = int(math.floor((stop - start) / every + 1e-9)) + 1
        return [start + k * every for k in range(max(n, 1))]

    def install(self) -> None:
        sim = self.sim
        for p in sim.scenario.publish:
            for t in self._times(p.at_s, p.every_s, p.until_s):
                sim.at(t, partial(self._publish, p))
        for f in sim.scenario.faults:
            if f.kind == "churn":
                sim.at(sim.t0 + f.at_s, partial(self._churn, f))
                continue
            for t in self._times(f.at_s, f.every_s, f.until_s):
                sim.at(t, partial(self.fire, f))

    # -- selecting ----------------------------------------------------------------

    def eligible(self, cluster: str | None = None) -> list[int]:
        sim = self.sim
        return [
            h.index
            for h in sim.nodes
            if h.index not in sim.down
            and not h.paused
            and h.index not in sim.net.slow
            and not h.is_bridge
            and h.index not in self.protected
            and (cluster is None or h.cluster == cluster)
        ]

    def select(self, selector: str, count: int = 1, share: float | None = None) -> list[int]:
        sim = self.sim
        if selector.isdigit():
            return [int(selector)]
        kind, _, cluster = selector.partition(":")
        if kind == "bridge":
            bridges = [
                h.index
                for h in sim.nodes
                if h.is_bridge and h.cluster == cluster and h.index not in sim.down
            ]
            return bridges[:count]
        pool = self.eligible(cluster or None)
        if share is not None:
            count = max(1, round(share * len(pool)))
        return sorted(self.rng.sample(pool, min(count, len(pool))))

    # -- firing -----------------------------------------------------------------

    def _publish(self, p: Publish) -> None:
        sim = self.sim
        if p.node.isdigit():
            node = int(p.node)
            if node in sim.down:
                sim.log("publish-skipped", node=node, why="node is down")
                return
        else:
            kind, _, cluster = p.node.partition(":")
            if kind == "bridge":
                picked = self.select(p.node)
            else:
                pool = [
                    h.index
                    for h in sim.nodes
                    if h.index not in sim.down
                    and not h.paused
                    and not h.is_bridge
                    and (not cluster or h.cluster == cluster)
                ]
                picked = [self.rng.choice(pool)] if pool else []
            if not picked:
                sim.log("publish-skipped", why="no node to publish on")
                return
            node = picked[0]
        self.protected.add(node)
        sim.publish(node, p.app)

    def fire(self, f: Fault) -> None:
        getattr(self, f"_{f.kind}")(f)

    def _stop(self, f: Fault, graceful: bool) -> None:
        sim = self.sim
        for i in self.select(f.node, f.count, f.share):
            if i in sim.down:
                continue
            if graceful:
                sim.stop_after_leave(i)
            else:
                sim.crash(i)
            sim.log("leave" if graceful else "crash", node=i)
            if f.restart_after_s is not None:
                sim.at(sim.now + f.restart_after_s, partial(self._restart_node, i))

    def _crash(self, f: Fault) -> None:
        self._stop(f, graceful=False)

    def _leave(self, f: Fault) -> None:
        self._stop(f, graceful=True)

    def _restart_node(self, i: int) -> None:
        if i in self.sim.down:
            self.sim.restart(i)
            self.sim.log("restart", node=i)

    def _restart(self, f: Fault) -> None:
        self._restart_node(int(f.node))

    def _pause(self, f: Fault) -> None:
        sim = self.sim
        for i in self.select(f.node, f.count, f.share):
            if i in sim.down or sim.nodes[i].paused:
                continue
            sim.pause(i)
            sim.log("pause", node=i, duration_s=f.duration_s)
            sim.at(sim.now + f.duration_s, partial(self._resume, i))

    def _slow(self, f: Fault) -> None:
        sim = self.sim
        for i in self.select(f.node, f.count, f.share):
            if i in sim.down or i in sim.net.slow:
                continue
            sim.net.slow[i] = f.delay_s
            sim.log("slow", node=i, delay_s=f.delay_s, duration_s=f.duration_s)
            sim.at(sim.now + f.duration_s, partial(self._unslow, i))

    def _unslow(self, i: int) -> None:
        net = self.sim.net
        delay = net.slow.pop(i, None)
        if delay is not None:
            net.lagging[i] = self.sim.now + delay

    def _resume(self, i: int) -> None:
        sim = self.sim
        if sim.nodes[i].paused and i not in sim.down:
            sim.resume(i)

    def _churn(self, f: Fault) -> None:
        sim = self.sim
        stop = sim.t0 + f.until_s if f.until_s is not None else self.end
        if sim.now > stop:
            return
        pool = self.eligible(f.cluster or None)
        if pool:
            i = self.rng.choice(pool)
            graceful = self.rng.random() < f.leave_fraction
            if graceful:
                sim.stop_after_leave(i)
            else:
                sim.crash(i)
            sim.log("churn-leave" if graceful else "churn-crash", node=i)
            sim.at(sim.now + f.down_s, partial(self._restart_node, i))
        nxt = sim.now + self.rng.expovariate(f.rate_per_s)
        if nxt <= stop:
            sim.at(nxt, partial(self._churn, f))

    def _lose_cluster(self, f: Fault) -> None:
        sim = self.sim
        if f.mode == "cut":
            others = [c for c in sim.groups if c != f.cluster]
            sim.net.partition_clusters([f.cluster], others)
            sim.log("lose-cluster", cluster=f.cluster, mode="cut")
            sim.recheck_failover()
            return
        victims = [i for i in sim.groups[f.cluster] if i not in sim.down]
        for i in victims:
            sim.crash(i, detect=False)  # no one is left in the cluster to detect it
        sim.log("lose-cluster", cluster=f.cluster, mode="crash", nodes=len(victims))
        sim.recheck_failover()
        if f.restart_after_s is not None:
            for i in victims:
                sim.at(sim.now + f.restart_after_s, partial(self._restart_node, i))

    def _lose_bridge(self, f: Fault) -> None:
        sim = self.sim
        for i in self.select(f"bridge:{f.cluster}", f.count):
            sim.crash(i)
            sim.log("lose-bridge", node=i, cluster=f.cluster)
            sim.recheck_failover()
            if f.restart_after_s is not None:
                sim.at(sim.now + f.restart_after_s, partial(self._restart_node, i))

    def _partition(self, f: Fault) -> None:
        sim = self.sim
        if f.sides:
            sim.net.partition_clusters(f.sides[0], f.sides[1], one_way=f.one_way)
            sim.log("partition", sides=[list(s) for s in f.sides], one_way=f.one_way)
            sim.recheck_failover()
        else:
            nodes = sim.running_in(f.cluster or None)
            k = max(1, round(f.fraction * len(nodes)))
            side_a = set(self.rng.sample(nodes, k))
            side_b = [i for i in nodes if i not in side_a]
            sim.net.partition_nodes(side_a, side_b, one_way=f.one_way)
            sim.log("partition", side_a=len(side_a), side_b=len(side_b), one_way=f.one_way)
            if not f.one_way:
                m = {"start": sim.now, "a": side_a, "b": set(side_b), "split_s": None}
                m["heal_at"] = None
                m["heal_s"] = None
                self.partitions.append(m)
                sim.at(sim.now + POLL_S, partial(self._poll_split, m))
        if f.heal_after_s is not None:
            sim.at(sim.now + f.heal_after_s, partial(self._heal, f))

    def _heal(self, f: Fault | None) -> None:
        sim = self.sim
        sim.net.heal()
        sim.log("heal")
        sim.recheck_failover()
        for m in self.partitions:
            if m["heal_at"] is None:
                m["heal_at"] = sim.now
                sim.at(sim.now + POLL_S, partial(self._poll_heal, m))

    def _loss(self, f: Fault) -> None:
        self.sim.net.loss = f.rate
        self.sim.log("loss", rate=f.rate)

    # -- partition measurements -----------------------------------------------------

    def _lists_only(self, groups: list[set[int]]) -> bool:
        """Does every running node list exactly the running nodes of its own
        group within its cluster (LAN pools are per cluster)?"""
        sim = self.sim
        for group in groups:
            per_cluster: dict[str, int] = {}
            up = [i for i in group if i not in sim.down]
            for i in up:
                c = sim.nodes[i].cluster
                per_cluster[c] = per_cluster.get(c, 0) + 1
            for i in up:
                if sim.core(i).pool_size != per_cluster[sim.nodes[i].cluster]:
                    return False
        return True

    def _poll_split(self, m: dict[str, Any]) -> None:
        sim = self.sim
        if m["heal_at"] is not None:
            return
        if self._lists_only([m["a"], m["b"]]):
            m["split_s"] = sim.now - m["start"]
        elif sim.now + POLL_S <= self.end:
            sim.at(sim.now + POLL_S, partial(self._poll_split, m))

    def _poll_heal(self, m: dict[str, Any]) -> None:
        sim = self.sim
        if self._lists_only([m["a"] | m["b"]]):
            m["heal_s"] = sim.now - m["heal_at"]
        elif sim.now + POLL_S <= self.end:
            sim.at(sim.now + POLL_S, partial(self._poll_heal, m))
