"""results.json: what a run measured, in a fixed field order.

Every field is a function of the scenario and the seed, except those whose
name starts with ``wall_`` (wall-clock time, rates over it, and the process's
memory): two runs of one scenario and seed give equal documents once the
``wall_*`` fields are dropped (:func:`deterministic_part`).

Rates per node per second are over the measured window and all nodes of the
topology (a crashed node counts as a node sending nothing), so they are
comparable across N: flat in N is what SWIM promises.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshd.protocol.bounds import (
    cross_cluster_spread_bound,
    detection_bound,
    epidemic_rounds,
    spread_bound,
    unreachable_bound,
)
from simulations.metrics import (
    FAILOVER_STATES,
    failover_times,
    per_node_rate,
    push_gossip_curve,
    stale_seconds,
    summary,
    timeline_shares,
)

if TYPE_CHECKING:
    from simulations.engine import Simulation


def peak_rss_bytes() -> int | None:
    """The process's peak resident set (VmHWM), or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _r(x: float, digits: int = 6) -> float:
    return round(x, digits)


def build_results(sim: Simulation, wall_s: float, wall_build_s: float) -> dict[str, Any]:
    sc = sim.scenario
    n = len(sim.nodes)
    measure_s = sc.duration_s
    col = sim.collector
    sizes = {c: len(g) for c, g in sim.groups.items()}
    n_bridges = sum(1 for h in sim.nodes if h.is_bridge)
    biggest = max(sizes.values())

    # Convergence: every (record, node) pair.
    conv_times = [t for s in col.spreads for t in s.times.values()]
    conv_incomplete = sum(len(s.pending) for s in col.spreads)
    if len(sizes) == 1:
        conv_bound = spread_bound(biggest, sc.lan)
    else:
        conv_bound = cross_cluster_spread_bound(biggest, n_bridges, biggest, sc.lan, sc.wan)

    det_times = [t for d in col.detections if not d.aborted for t in d.times.values()]
    det_done = sum(1 for d in col.detections if not d.aborted and not d.pending)

    # Bandwidth over the measured window.
    msgs0, bytes0, per_msgs0, per_bytes0 = sim.sent0
    msgs1, bytes1, per_msgs1, per_bytes1 = sim._sent_totals()
    kinds = sorted(set(msgs1) | set(msgs0))
    by_type = {
        k: {
            "msgs_per_node_s": _r(per_node_rate(msgs1[k] - msgs0[k], n, measure_s), 4),
            "bytes_per_node_s": _r(per_node_rate(bytes1[k] - bytes0[k], n, measure_s), 2),
        }
        for k in kinds
    }
    total_msgs = sum(msgs1.values()) - sum(msgs0.values())
    total_bytes = sum(bytes1.values()) - sum(bytes0.values())
    per_node_bytes = [(b1 - b0) / measure_s for b0, b1 in zip(per_bytes0, per_bytes1, strict=True)]
    per_node_msgs = [(m1 - m0) / measure_s for m0, m1 in zip(per_msgs0, per_msgs1, strict=True)]
    recv_msgs0, recv_bytes0 = sim.recv0
    recv_msgs = sim.received_msgs - recv_msgs0
    recv_bytes = sim.received_bytes - recv_bytes0

    failover: dict[str, Any] = {}
    series_failover: dict[str, Any] = {}
    loss_at = next(
        (e["t"] for e in sim.fault_log if e["kind"] in ("lose-cluster", "lose-bridge")), None
    )
    for w in col.watches:
        since = sim.t0 + (loss_at if loss_at is not None else 0.0)
        end = sim.t0 + measure_s
        fo = failover_times(w, since)
        final = {s: 0 for s in FAILOVER_STATES}
        for a in w.askers:
            if a in w.state:
                final[w.state[a]] += 1
        failover[w.app] = {
            "primary": w.primary,
            "secondary": w.secondary,
            "askers": len(w.askers),
            "lost_at_s": loss_at,
            "failover_s": summary(fo),
            # Every asker's cluster holds the lost one unreachable within this
            # (meshd.protocol.bounds.unreachable_bound): the bridges' cluster
            # watch (or WAN detection, if slower), then LAN spread.
            "failover_bound_s": _r(unreachable_bound(n_bridges, biggest, sc.lan, sc.wan), 4),
            "failed_over": len(fo),
            "stale_s": summary(stale_seconds(w, since, end)),
            "final": final,
        }
        step = max(0.1, measure_s / 600)
        series_failover[w.app] = timeline_shares(
            w.transitions, FAILOVER_STATES, sim.t0, sim.t0 + measure_s, step
        )

    partitions = [
        {
            "side_a": len(m["a"]),
            "side_b": len(m["b"]),
            "at_s": _r(m["start"] - sim.t0),
            "split_s": None if m["split_s"] is None else _r(m["split_s"]),
            "healed_at_s": None if m["heal_at"] is None else _r(m["heal_at"] - sim.t0),
            "heal_s": None if m["heal_s"] is None else _r(m["heal_s"]),
        }
        for m in getattr(sim, "schedule", None).partitions  # type: ignore[union-attr]
    ]

    fault_counts: dict[str, int] = {}
    for e in sim.fault_log:
        fault_counts[e["kind"]] = fault_counts.get(e["kind"], 0) + 1

    # The analytic push-gossip curve for the origin's pool, to the last arrival.
    pool = biggest
    last = max(conv_times, default=0.0)
    rounds = max(1, math.ceil(max(last, sc.lan.gossip_interval) / sc.lan.gossip_interval) + 2)
    analytic = push_gossip_curve(pool, sc.lan.gossip_nodes, sc.lan.gossip_interval, rounds)

    rss = peak_rss_bytes()
    out: dict[str, Any] = {
        "scenario": sc.name,
        "description": sc.description,
        "source": sc.source,
        "nodes": n,
        "clusters": sizes,
        "bridges": n_bridges,
        "seed": sc.seed,
        "virtual_s": _r(sim.now),
        "warmup_s": _r(sim.t0),
        "joined_s": _r(sim.joined_at),
        "measure_s": measure_s,
        "events": sim.events,
        "convergence_s": summary(conv_times),
        "convergence_records": len(col.spreads),
        "convergence_incomplete": conv_incomplete,
        "convergence_bound_s": _r(conv_bound, 4),
        "epidemic_rounds": _r(epidemic_rounds(pool, sc.lan.gossip_nodes), 4),
        "detection_s": summary(det_times),
        "detections": len(col.detections),
        "detections_complete": det_done,
        "detection_bound_s": _r(detection_bound(biggest, sc.lan), 4),
        "false_deaths": col.false_deaths,
        "false_death_subjects": len(col.false_death_subjects),
        "false_deaths_healthy": col.false_deaths_healthy,
        "false_deaths_lagging": col.false_deaths_lagging,
        "partition_deaths": col.partition_deaths,
        "false_suspicions": col.false_suspicions,
        "msgs_per_node_s": _r(per_node_rate(total_msgs, n, measure_s), 4),
        "bytes_per_node_s": _r(per_node_rate(total_bytes, n, measure_s), 2),
        "recv_msgs_per_node_s": _r(per_node_rate(recv_msgs, n, measure_s), 4),
        "recv_bytes_per_node_s": _r(per_node_rate(recv_bytes, n, measure_s), 2),
        "per_node_msgs_s": summary(per_node_msgs, 3),
        "per_node_bytes_s": summary(per_node_bytes, 1),
        "by_type": by_type,
        "network": {
            "delivered": sim.delivered,
            "dropped": sim.dropped,
            "lost_independent": sim.net.lost_independent,
            "lost_burst": sim.net.lost_burst,
            "lost_partition": sim.net.lost_partition,
        },
        "failover": failover,
        # Times a node began to hold a cluster unreachable that was not lost.
        "false_unreachable": col.false_unreachable,
        "false_unreachable_clusters": sorted(col.false_unreachable_clusters),
        "partitions": partitions,
        "faults": fault_counts,
        "fault_log": sim.fault_log[:500],
        "scenario_spec": sc.summary(),
        "series": {
            "convergence": [
                {
                    "node": s.node,
                    "at_s": _r(s.start - sim.t0),
                    "total": s.total,
                    "times": sorted(_r(t) for t in s.times.values()),
                }
                for s in col.spreads
            ],
            "analytic": [[_r(t), _r(x)] for t, x in analytic],
            "detection": sorted(_r(t) for t in det_times),
            "false_death_times": col.false_death_times[:1000],
            "false_unreachable_times": col.false_unreachable_times,
            "failover": series_failover,
        },
        "wall_s": round(wall_s, 3),
        "wall_build_s": round(wall_build_s, 3),
        "wall_warmup_s": round(sim.wall_warmup, 3),
        "wall_events_per_s": round(sim.events / wall_s, 1) if wall_s > 0 else None,
        "wall_peak_rss_mb": None if rss is None else round(rss / 2**20, 1),
        "wall_peak_rss_kb_per_node": None if rss is None else round(rss / 1024 / n, 1),
    }
    return out


def deterministic_part(results: dict[str, Any]) -> dict[str, Any]:
    """The results without their ``wall_*`` fields (what a seed fixes)."""
    return {k: v for k, v in results.items() if not k.startswith("wall_")}


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "results.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target
