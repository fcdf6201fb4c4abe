"""The simulator's speed, old commit against the working tree, in one invocation.

    python benchmarks/bench_sim.py --base COMMIT [--scenario convergence]
        [--nodes 1000] [--rounds 3] [--set FIELD=VALUE ...] [--keep]

``COMMIT`` is checked out into a temporary ``git worktree`` under /tmp
(removed afterwards, unless ``--keep``); the scenario then runs there and in
this working tree, alternating (base, new, base, new, ...), each run in a
fresh process (``python -m simulations run ... --quiet --no-plots``), so both
sides see the same machine load as nearly as alternation allows.

Reported for every run: events, wall seconds of the run (``wall_s`` of its
results.json: build, warm-up and the measured window), events per wall
second, and the CPU seconds the process used (user + system, from
``getrusage``): on a shared machine CPU time is the steadier figure, since
it does not count the time another process held the core.  Then the median
of each side and the ratios new/base.  Every run of one seed must give the
same figures: the results without their ``wall_*`` fields are compared
between all runs, and any difference is printed (and the exit status is 1).

The machine facts (CPU model, cores, memory, Python, load average before and
after) come first, so that two outputs can be compared knowingly.

``--instructions`` counts instead of timing: each side runs once under
valgrind's callgrind (Debian package ``valgrind``), both at once, and the
report is the number of machine instructions each executed and their ratio.
The count does not depend on what else the machine is doing (a run takes
about 40 times as long as without valgrind), so it settles what the drift
of a shared machine hides: whether a change removed work.  It does not see
waits on memory, which grow with the number of nodes: time a large run too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def machine_facts() -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GB"
                break
    except (OSError, ValueError):
        pass
    return [
        f"cpu: {model}; {os.cpu_count()} cores; memory {mem}",
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}",
        f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def _command(args: argparse.Namespace, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "simulations", "run", args.scenario, "--nodes", str(args.nodes)]
    cmd += ["--out", str(out), "--no-plots", "--quiet"]
    for item in args.set or []:
        cmd += ["--set", item]
    return cmd


def _env(tree: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(tree), PYTHONHASHSEED="0")


def run_once(tree: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One run of the scenario with the code of ``tree``; its results and CPU time."""
    cmd = _command(args, out)
    env = _env(tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, env=env, check=False, capture_output=True, text=True)
    wall_process = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree}: exit {done.returncode}\n{done.stderr}")
    r: dict[str, Any] = json.loads((out / "results.json").read_text(encoding="utf-8"))
    r["bench_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    r["bench_process_s"] = wall_process
    return r


#: callgrind's total at exit: "==PID== Collected : 41758443908".
_COLLECTED = re.compile(r"^==\d+== Collected : (\d+)$", re.MULTILINE)


def count_instructions(
    trees: dict[str, Path], args: argparse.Namespace, tmp: Path
) -> dict[str, dict[str, Any]]:
    """One run of each side under callgrind, all at once; each side's results
    with ``bench_instructions``, the instructions its process executed."""
    procs = {}
    for side, tree in trees.items():
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
        cmd += _command(args, tmp / side)
        procs[side] = (
            cmd,
            tree,
            subprocess.Popen(
                cmd,
                cwd=tree,
                env=_env(tree),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    out: dict[str, dict[str, Any]] = {}
    failed = []
    for side, (cmd, tree, proc) in procs.items():
        _, err = proc.communicate()
        found = _COLLECTED.search(err)
        if proc.returncode != 0 or found is None:
            failed.append(f"{' '.join(cmd)} in {tree}: exit {proc.returncode}\n{err[-2000:]}")
            continue
        r: dict[str, Any] = json.loads((tmp / side / "results.json").read_text(encoding="utf-8"))
        r["bench_instructions"] = int(found.group(1))
        out[side] = r
    if failed:
        raise RuntimeError("\n".join(failed))
    return out


def deterministic(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if not k.startswith(("wall_", "bench_"))}


def _figures(r: dict[str, Any]) -> str:
    parts = [f"{r['events']:,} events"]
    c = r.get("convergence_s") or {}
    if c.get("count"):
        parts.append(f"convergence p50 {c['p50']:.2f} / p99 {c['p99']:.2f} / max {c['max']:.2f} s")
    d = r.get("detection_s") or {}
    if d.get("count"):
        parts.append(f"detection p50 {d['p50']:.2f} / max {d['max']:.2f} s")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--base", required=True, help="the commit to compare against")
    ap.add_argument("--scenario", default="convergence")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each side (alternating)")
    ap.add_argument("--set", action="append", metavar="FIELD=VALUE")
    ap.add_argument("--keep", action="store_true", help="keep the base worktree and outputs")
    ap.add_argument(
        "--instructions",
        action="store_true",
        help="count each side's instructions under valgrind (one run each, both at once)",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.nodes < 1:
        print("error: --rounds and --nodes must be at least 1", file=sys.stderr)
        return 2
    if args.instructions and shutil.which("valgrind") is None:
        print("error: --instructions needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.instructions:
        args.rounds = 1
    try:
        base_rev = _git("rev-parse", "--verify", f"{args.base}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"error: --base {args.base!r} is not a commit of {ROOT}", file=sys.stderr)
        return 2
    head = _git("rev-parse", "--short", "HEAD")
    dirty = (
        " (with uncommitted changes)"
        if _git("status", "--porcelain", "--untracked-files=no")
        else ""
    )
    for line in machine_facts():
        print(line)
    print(
        f"scenario {args.scenario}, {args.nodes:,} nodes, "
        f"{'instructions counted' if args.instructions else f'{args.rounds} rounds'}; "
        f"base {base_rev[:10]}, new {head}{dirty} ({ROOT})",
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench_sim_"))
    base_tree = tmp / "base"
    _git("worktree", "add", "--detach", "--quiet", str(base_tree), base_rev)
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
    try:
        if args.instructions:
            counted = count_instructions({"base": base_tree, "new": ROOT}, args, tmp)
            for side in ("base", "new"):
                r = counted[side]
                runs[side].append(r)
                print(
                    f"  {side:4}: {r['bench_instructions']:,} instructions; {_figures(r)}",
                    flush=True,
                )
        for k in range(0 if args.instructions else args.rounds):
            for side, tree in (("base", base_tree), ("new", ROOT)):
                r = run_once(tree, args, tmp / f"{side}{k}")
                runs[side].append(r)
                print(
                    f"  round {k + 1} {side:4}: {r['wall_s']:8.1f} s wall, "
                    f"{r['wall_events_per_s']:9,.0f} events/s, {r['bench_cpu_s']:8.1f} s CPU; "
                    f"{_figures(r)}",
                    flush=True,
                )
    finally:
        if not args.keep:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
            )
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")

    if args.instructions:
        base_i, new_i = runs["base"][0]["bench_instructions"], runs["new"][0]["bench_instructions"]
        print(f"instructions new/base: {new_i / base_i:.3f} ({base_i / new_i:.2f}x fewer)")
    else:
        _print_times(runs)
    return _compare(runs)


def _print_times(runs: dict[str, list[dict[str, Any]]]) -> None:
    def med(side: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[side]))

    print("| side | median wall s | median events/s | median CPU s | events/CPU s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for side in ("base", "new"):
        ev = runs[side][0]["events"]
        print(
            f"| {side} | {med(side, 'wall_s'):.1f} | {med(side, 'wall_events_per_s'):,.0f} | "
            f"{med(side, 'bench_cpu_s'):.1f} | {ev / med(side, 'bench_cpu_s'):,.0f} |"
        )
    wall_ratio = med("new", "wall_events_per_s") / med("base", "wall_events_per_s")
    cpu_ratio = med("base", "bench_cpu_s") / med("new", "bench_cpu_s")
    print(
        f"speed-up new/base: {wall_ratio:.2f}x in events per wall second, "
        f"{cpu_ratio:.2f}x in CPU time"
    )
    for line in machine_facts()[2:]:
        print(f"after: {line}")


def _compare(runs: dict[str, list[dict[str, Any]]]) -> int:
    """Print whether every run gave the same figures; the exit status."""
    ref = deterministic(runs["base"][0])
    # A field one side's simulator does not report yet (added since the base
    # commit) cannot differ; it is named, not compared.
    common = set(ref).intersection(*(deterministic(r) for side in runs.values() for r in side))
    extra = sorted(
        set().union(*(deterministic(r) for side in runs.values() for r in side)) - common
    )
    if extra:
        print(f"not compared (reported by one side only): {', '.join(extra)}")
    ref = {k: ref[k] for k in common}
    same = True
    for side in ("base", "new"):
        for k, r in enumerate(runs[side]):
            d = {x: v for x, v in deterministic(r).items() if x in common}
            if d != ref:
                same = False
                keys = sorted(x for x in set(d) | set(ref) if d.get(x) != ref.get(x))
                print(f"DIFFERENT figures: {side} round {k + 1} differs in {', '.join(keys)}")
    print("same figures in every run: " + ("yes" if same else "NO"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
