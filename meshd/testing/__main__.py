"""``python -m meshd.testing``: the figures of the standard harness scenarios.

``--nodes N`` (one pool) or ``--clusters K --nodes N`` (several clusters).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable

from meshd.policy.policy import AppPolicy
from meshd.protocol.bounds import (
    cross_cluster_bound,
    cut_off_side_bound,
    detection_bound,
    heal_bound,
    spread_bound,
    unreachable_bound,
)
from meshd.testing.harness import Cluster
from meshd.testing.scenarios import (
    converged_everywhere,
    converged_join,
    cross_cluster_failover,
    detection_time,
    false_death_counter,
    heal_time,
    isolation_time,
    misplaced,
    multi_cluster,
    percentile,
    published,
    record_spread,
)


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
            f"p99 {percentile(spread.times, 0.99):.2f} s, max {spread.max:.2f} s"
        )
    det = detection_time(c, victim=n - 1)
    if det is not None:
        vals = list(det.values())
        lo, hi = c.core(0).suspicion_bounds()
        print(
            f"crash detection by all {len(vals)}: p50 {statistics.median(vals):.2f} s, "
            f"p99 {percentile(vals, 0.99):.2f} s, max {max(vals):.2f} s "
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
