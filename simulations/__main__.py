"""``python -m simulations``: run scenario files, list them, plot results.

    python -m simulations list
    python -m simulations run SCENARIO.toml [--nodes N[,N...]] [--seed S] [--out DIR]
                                            [--set FIELD=VALUE ...] [--no-plots]
    python -m simulations bench SCENARIO.toml --nodes N,N,... [--out DIR]
    python -m simulations plot DIR [DIR ...] [--out DIR]

``run`` prints a progress line every few wall seconds (stderr), then a
summary (stdout), and writes DIR/results.json and PNG plots (when the
optional matplotlib extra is installed: ``pip install -e '.[plot]'``).  With
several ``--nodes`` values each size runs in DIR/n<N>/ and DIR/scaling.png
plots messages and bytes per node per second against N.  A scenario file
that does not validate gets one line naming the field, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from simulations.scenario import ScenarioError, load_scenario, parse_override

SCENARIOS = Path(__file__).parent / "scenarios"


def _fmt(s: dict[str, Any]) -> str:
    if not s.get("count"):
        return "none"
    return f"p50 {s['p50']:.2f} s, p99 {s['p99']:.2f} s, max {s['max']:.2f} s (n={s['count']})"


def print_summary(r: dict[str, Any]) -> None:
    print(
        f"{r['scenario']}: {r['nodes']} nodes, seed {r['seed']}, "
        f"{r['virtual_s']:.0f} s virtual (joined after {r['joined_s']:.1f} s), "
        f"{r['events']:,} events in {r['wall_s']:.1f} s wall "
        f"({r['wall_events_per_s']:,.0f} events/s, peak RSS {r['wall_peak_rss_mb']} MB)"
    )
    if r["convergence_records"]:
        print(
            f"  convergence: {_fmt(r['convergence_s'])}; bound {r['convergence_bound_s']:.2f} s"
            + (
                f"; {r['convergence_incomplete']} never reached"
                if r["convergence_incomplete"]
                else ""
            )
        )
    if r["detections"]:
        print(
            f"  detection: {_fmt(r['detection_s'])}; bound {r['detection_bound_s']:.2f} s; "
            f"{r['detections_complete']}/{r['detections']} crashes seen dead everywhere"
        )
    print(
        f"  false deaths: {r['false_deaths']} verdicts about {r['false_death_subjects']} nodes, "
        f"{r['false_deaths_healthy']} about nodes neither paused nor slow"
        + (
            f" ({r['false_deaths_lagging']} more about nodes slow until less than their delay ago)"
            if r.get("false_deaths_lagging")
            else ""
        )
        + f"; {r['false_suspicions']} suspect verdicts about running nodes"
    )
    print(f"  per node: {r['msgs_per_node_s']:.2f} msgs/s, {r['bytes_per_node_s']:.0f} B/s sent")
    if len(r["clusters"]) > 1:
        print(
            f"  false unreachable: {r['false_unreachable']} verdicts"
            + (
                f" about {', '.join(r['false_unreachable_clusters'])}"
                if r["false_unreachable"]
                else ""
            )
        )
    for app, f in r["failover"].items():
        print(
            f"  failover {app} ({f['primary']} -> {f['secondary']}, {f['askers']} askers): "
            f"{_fmt(f['failover_s'])}; served a lost copy first: {_fmt(f['stale_s'])}"
        )
    for p in r["partitions"]:
        print(
            f"  partition {p['side_a']}|{p['side_b']}: each side lists only itself after "
            f"{p['split_s']} s; after the heal everyone lists everyone in {p['heal_s']} s"
        )


def cmd_list(args: argparse.Namespace) -> int:
    for path in sorted(SCENARIOS.glob("*.toml")):
        try:
            sc = load_scenario(path)
        except ScenarioError as exc:
            print(f"{path.name:32} INVALID: {exc}")
            continue
        print(f"{path.name:32} {sc.topology.nodes:>6} nodes  {sc.description}")
    return 0


def _resolve_path(name: str) -> Path:
    p = Path(name)
    if p.exists() or p.is_absolute():
        return p
    for candidate in (SCENARIOS / name, SCENARIOS / f"{name}.toml"):
        if candidate.exists():
            return candidate
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from simulations import plots
    from simulations.engine import Simulation, stderr_progress
    from simulations.results import write_results

    overrides: dict[str, Any] = {}
    for item in args.set or []:
        key, value = parse_override(item)
        overrides[key] = value
    if args.seed is not None:
        overrides["seed"] = args.seed
    sizes: list[int | None] = [None]
    if args.nodes:
        try:
            sizes = [int(x) for x in args.nodes.split(",")]
        except ValueError:
            print(f"error: --nodes {args.nodes!r}: expected N or N,N,...", file=sys.stderr)
            return 2
    path = _resolve_path(args.scenario)
    scenarios = []
    for n in sizes:
        o = dict(overrides)
        if n is not None:
            o["topology.nodes"] = n
        try:
            scenarios.append(load_scenario(path, o))
        except ScenarioError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    out = Path(args.out or f"sim-out/{scenarios[0].name}")
    all_results = []
    for sc in scenarios:
        run_dir = out / f"n{sc.topology.nodes}" if len(scenarios) > 1 else out
        sim = Simulation(sc, progress=None if args.quiet else stderr_progress)
        try:
            if args.profile:
                import cProfile

                prof = cProfile.Profile()
                results = prof.runcall(sim.run)
                prof.dump_stats(args.profile)
            else:
                results = sim.run()
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        write_results(results, run_dir)
        print_summary(results)
        if not args.no_plots:
            made = plots.plot_run(results, run_dir)
            if made is None:
                print("  (plots skipped: matplotlib is not installed; pip install -e '.[plot]')")
            else:
                print(f"  wrote {run_dir / 'results.json'} and {', '.join(p.name for p in made)}")
        else:
            print(f"  wrote {run_dir / 'results.json'}")
        all_results.append(results)
    if len(all_results) > 1:
        (out / "scaling.json").write_text(
            json.dumps(plots.scaling_table(all_results), indent=1) + "\n", encoding="utf-8"
        )
        if not args.no_plots:
            plots.plot_scaling(all_results, out)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Each size in a fresh process (peak memory is per process), then one table."""
    import subprocess

    from simulations import plots

    out = Path(args.out or "sim-out/bench")
    rows = []
    results = []
    for n in [int(x) for x in args.nodes.split(",")]:
        run_dir = out / f"n{n}"
        cmd = [sys.executable, "-m", "simulations", "run", args.scenario, "--nodes", str(n)]
        cmd += ["--out", str(run_dir), "--no-plots", "--quiet"]
        for item in args.set or []:
            cmd += ["--set", item]
        print(f"$ {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            return done.returncode
        r = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        results.append(r)
        rows.append(
            {
                "nodes": n,
                "virtual_s": r["virtual_s"],
                "events": r["events"],
                "events_per_node_s": round(r["events"] / n / r["virtual_s"], 3),
                "wall_s": r["wall_s"],
                "wall_build_s": r["wall_build_s"],
                "wall_events_per_s": r["wall_events_per_s"],
                "wall_peak_rss_mb": r["wall_peak_rss_mb"],
                "wall_peak_rss_kb_per_node": r["wall_peak_rss_kb_per_node"],
            }
        )
    (out / "bench.json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print("| N | virtual s | events | events/node/s | wall s | events/s | peak RSS MB | KB/node |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['nodes']:,} | {row['virtual_s']:.0f} | {row['events']:,} | "
            f"{row['events_per_node_s']} | {row['wall_s']:.0f} | "
            f"{row['wall_events_per_s']:,.0f} | {row['wall_peak_rss_mb']} | "
            f"{row['wall_peak_rss_kb_per_node']} |"
        )
    if len(results) > 1 and not args.no_plots:
        plots.plot_scaling(results, out)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from simulations import plots

    results = []
    for d in args.dirs:
        p = Path(d) / "results.json"
        try:
            results.append(json.loads(p.read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            print(f"error: {p}: {exc}", file=sys.stderr)
            return 2
    for r, d in zip(results, args.dirs, strict=True):
        if plots.plot_run(r, Path(d)) is None:
            print("error: matplotlib is not installed (pip install -e '.[plot]')", file=sys.stderr)
            return 1
    if len(results) > 1:
        plots.plot_scaling(results, Path(args.out or args.dirs[0]).parent)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m simulations",
        description="Discrete-event simulations of the meshd protocol core.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the scenario files shipped in simulations/scenarios")
    run = sub.add_parser("run", help="run a scenario file")
    run.add_argument("scenario", help="a .toml file (or the name of one in simulations/scenarios)")
    run.add_argument("--nodes", help="override topology.nodes; N,N,... runs each size")
    run.add_argument("--seed", type=int, help="override the scenario's seed")
    run.add_argument("--out", help="output directory (default sim-out/<scenario>)")
    run.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a field")
    run.add_argument("--no-plots", action="store_true", help="write results.json only")
    run.add_argument("--quiet", action="store_true", help="no progress lines")
    run.add_argument("--profile", metavar="FILE", help="run under cProfile, dump stats to FILE")
    bench = sub.add_parser("bench", help="run one scenario at several sizes, one process each")
    bench.add_argument("scenario")
    bench.add_argument("--nodes", required=True, help="N,N,... (each in its own process)")
    bench.add_argument("--out", help="output directory (default sim-out/bench)")
    bench.add_argument("--set", action="append", metavar="FIELD=VALUE")
    bench.add_argument("--no-plots", action="store_true")
    plot = sub.add_parser("plot", help="plot results.json files again")
    plot.add_argument("dirs", nargs="+", help="run directories holding results.json")
    plot.add_argument("--out", help="where the scaling plot goes (default: beside the first)")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        return cmd_list(args)
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "bench":
        return cmd_bench(args)
    return cmd_plot(args)


if __name__ == "__main__":
    sys.exit(main())
