"""PNG plots of results.json documents.  matplotlib is an optional extra.

Every function imports matplotlib when called and returns None when it is not
installed, so the simulator runs (and its tests pass) without it.

- convergence.png: share of nodes holding a new record against time since it
  was published, one line per record, beside the mean-field curve of push
  gossip with the same fan-out and interval.
- detection_cdf.png: CDF of the time until a node holds a crashed node dead.
- failover.png: per app with a failover order, the share of askers whose
  lookup puts the primary, the failover copy, a lost copy, or nothing first.
- bandwidth.png: messages and bytes per node per second by message type.
- scaling.png (several runs): messages and bytes per node per second vs N.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(r: dict[str, Any], out_dir: Path) -> list[Path] | None:
    """Every plot that applies to one run; the files written (None: no matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    title = f"{r['scenario']}, {r['nodes']} nodes, seed {r['seed']}"
    series = r["series"]

    if series["convergence"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k, s in enumerate(series["convergence"]):
            times = [0.0, *s["times"]]
            frac = [(i + 1) / s["total"] for i in range(len(times))]
            ax.step(
                times,
                frac,
                where="post",
                color="tab:blue",
                alpha=0.5,
                lw=1,
                label="simulated (each record)" if k == 0 else None,
            )
        at, ax_ = zip(*series["analytic"], strict=True)
        ax.plot(
            at,
            ax_,
            "o--",
            color="tab:red",
            ms=3,
            lw=1.2,
            label="push gossip, mean field (same fan-out, interval)",
        )
        bound = r["convergence_bound_s"]
        ax.axvline(bound, color="grey", ls=":", lw=1, label=f"spread bound {bound:.1f} s")
        ax.set_xlim(0, max(bound * 1.05, max(at)))
        ax.set_xlabel("seconds since the record was published")
        ax.set_ylabel("share of nodes holding it")
        ax.set_title(f"Record spread: {title}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out_dir / "convergence.png", plt))

    if series["detection"]:
        vals = series["detection"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.step(
            vals, [(i + 1) / len(vals) for i in range(len(vals))], where="post", label="simulated"
        )
        bound = r["detection_bound_s"]
        ax.axvline(bound, color="grey", ls=":", lw=1, label=f"detection bound {bound:.1f} s")
        ax.set_xlabel("seconds from crash until the observer holds it dead")
        ax.set_ylabel("share of (crash, observer) pairs")
        ax.set_title(f"Failure detection: {title}", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out_dir / "detection_cdf.png", plt))

    for app, tl in series["failover"].items():
        fo = r["failover"][app]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        labels = {
            "primary": f"primary ({fo['primary']})",
            "failover": f"failover ({fo['secondary']})",
            "stale": "a lost copy",
            "none": "nothing",
            "other": "another cluster",
        }
        for state, label in labels.items():
            if any(tl[state]):
                ax.plot(tl["t"], tl[state], label=label, lw=1.5)
        if fo["lost_at_s"] is not None:
            ax.axvline(fo["lost_at_s"], color="grey", ls=":", lw=1, label="cluster lost")
        ax.set_xlabel("seconds into the measured window")
        ax.set_ylabel(f"share of {fo['askers']} askers whose first answer is")
        ax.set_title(f"Failover of {app}: {title}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        made.append(_save(fig, out_dir / f"failover_{app}.png", plt))

    if r["by_type"]:
        kinds = list(r["by_type"])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
        a1.bar(kinds, [r["by_type"][k]["msgs_per_node_s"] for k in kinds])
        a1.set_ylabel("messages / node / s")
        a2.bar(kinds, [r["by_type"][k]["bytes_per_node_s"] for k in kinds], color="tab:orange")
        a2.set_ylabel("bytes / node / s")
        for a in (a1, a2):
            a.tick_params(axis="x", rotation=45, labelsize=8)
            a.grid(alpha=0.3, axis="y")
        fig.suptitle(f"Sent, by message type: {title}", fontsize=10)
        fig.tight_layout()
        made.append(_save(fig, out_dir / "bandwidth.png", plt))
    return made


def scaling_table(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run: N and the per-node rates and timings that should be flat or log."""
    rows = []
    for r in sorted(results, key=lambda x: x["nodes"]):
        rows.append(
            {
                "nodes": r["nodes"],
                "msgs_per_node_s": r["msgs_per_node_s"],
                "bytes_per_node_s": r["bytes_per_node_s"],
                "by_type": r["by_type"],
                "convergence_s": r["convergence_s"],
                "detection_s": r["detection_s"],
                "events": r["events"],
                "wall_s": r["wall_s"],
                "wall_events_per_s": r["wall_events_per_s"],
                "wall_peak_rss_mb": r["wall_peak_rss_mb"],
            }
        )
    return rows


def plot_scaling(results: Sequence[dict[str, Any]], out_dir: Path) -> Path | None:
    plt = _pyplot()
    if plt is None:
        return None
    rows = scaling_table(results)
    ns = [row["nodes"] for row in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
    a1.plot(ns, [row["msgs_per_node_s"] for row in rows], "o-", label="all types")
    a2.plot(ns, [row["bytes_per_node_s"] for row in rows], "o-", label="all types")
    kinds = sorted({k for row in rows for k in row["by_type"]})
    for k in kinds:
        a1.plot(
            ns,
            [row["by_type"].get(k, {}).get("msgs_per_node_s", 0) for row in rows],
            ".--",
            lw=0.8,
            label=k,
        )
        a2.plot(
            ns,
            [row["by_type"].get(k, {}).get("bytes_per_node_s", 0) for row in rows],
            ".--",
            lw=0.8,
            label=k,
        )
    a1.set_ylabel("messages sent / node / s")
    a2.set_ylabel("bytes sent / node / s")
    for a in (a1, a2):
        a.set_xscale("log")
        a.set_xlabel("nodes (N)")
        a.grid(alpha=0.3)
        a.set_ylim(bottom=0)
    a1.legend(fontsize=7)
    fig.suptitle(f"Per-node load vs N: {results[0]['scenario']}", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(out_dir) / "scaling.png", plt)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
