"""Idle cost of a mesh: CPU and memory of every agent in a settled LAN cluster.

    python benchmarks/bench_idle.py [--nodes 32] [--settle 20] [--measure 60]
        [--ref-tree DIR] [--serf] [--source-only] [--write-results]

Starts ``--nodes`` real ``meshd agent`` processes on 127.0.0.1 with the LAN
profile (the default; certificates from one CA made with ``meshd ca create`` /
``meshd cert issue``), all joining the first.  Waits (bounded) until the first
agent lists every node alive, lets the mesh settle, then for ``--measure``
seconds reads from /proc each agent's CPU time (utime+stime, in clock ticks)
and its resident memory (VmRSS, sampled every ``--sample`` seconds).

Reported per agent: CPU as % of one core over the window (median and max over
agents) and peak RSS in MB (median and max over agents).  The same is reported
for a baseline: idle ``python -c`` processes that import asyncio, ssl,
httptools, cryptography and msgpack and sleep, the interpreter's floor.
Gossip traffic (messages and bytes sent, from each agent's /metrics) is read
before and after the window.

All agents share 2 cores, so this is the cost of the protocol itself with no
traffic; nothing else is happening in the mesh.

Where the memory goes, measured in the same window: besides the floor above,
a bare interpreter (``python -c`` importing nothing) and a process that only
imports the agent's modules (``meshd.cli``, ``meshd.agent.run``,
``meshd.agent.agent``, ``meshd.api.app``) and sleeps.  So agent = interpreter +
libraries (floor) + meshd's modules (imports) + what a running agent holds.
Next to peak RSS each row gives PSS and USS from /proc/PID/smaps_rollup at the
end: RSS counts every shared library page each process has touched, PSS
divides shared pages among the processes that share them, USS counts only the
process's private pages, what stopping it would give back.

meshd's modules run from compiled bytecode, written next to the sources
(``__pycache__``, ignored by git) before the agents start, as an installed
package always has it; without it (``--source-only``, or wherever
``PYTHONDONTWRITEBYTECODE`` keeps the tree bare) each agent compiles its
modules at start-up and keeps about 3 MB more.  (Not ``PYTHONPYCACHEPREFIX``:
that would move the standard library's bytecode away too.)  ``--ref-tree DIR``
runs a second mesh of the same size from another source tree (e.g.
``git archive <commit> | tar -x -C DIR``) in the same window, for a
before/after ratio in one run; ``--serf`` a mesh of Serf agents (bench_serf.py's,
LAN profile) for the ratio to Serf.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs  # noqa: E402  (the benchmarks directory, added just above)

GOAL_CPU_PCT = 2.0
#: Issue 13: at most 50 MB RSS per idle agent at 32 agents (Serf: about 15).
GOAL_RSS_MB = 50.0
CLUSTER = "bench"
START_BATCH = 8
BASELINE_CODE = (
    "import sys, time\n"
    "import asyncio, ssl, httptools, cryptography, cryptography.x509, msgpack\n"
    "print('baseline ready', file=sys.stderr, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)
#: The interpreter alone (``time`` is built in: nothing is read from disk).
BARE_CODE = (
    "import sys, time\n"
    "print('baseline ready', file=sys.stderr, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)
#: Every module ``meshd agent`` imports before it serves, and nothing else,
#: imported the way the command does (older trees have no CA-bundle guard).
IMPORTS_CODE = (
    "import contextlib, sys, time\n"
    "import meshd.cli\n"
    "with getattr(meshd.cli, '_without_system_ca_bundle', contextlib.nullcontext)():\n"
    "    import meshd.agent.run, meshd.agent.agent, meshd.api.app\n"
    "print('baseline ready', file=sys.stderr, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


class _EnvProc(procs.Proc):
    """A Proc started with its own environment (PYTHONPATH, bytecode cache)."""

    def __init__(
        self, name: str, argv: Sequence[str], ready: re.Pattern[str], env: Mapping[str, str]
    ) -> None:
        # Not the caller's directory: ``python -c`` would import meshd from there.
        procs.Proc.__init__(self, name, argv, ready, env, cwd=tempfile.gettempdir())


class _EnvAgent(_EnvProc, procs.Agent):
    def __init__(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> None:
        _EnvProc.__init__(self, name, [*procs.meshd_cmd(), "agent", *args], procs.READY, env)


def _rollup(pid: int) -> tuple[float, float]:
    """(PSS, USS) of ``pid`` in MB from /proc/PID/smaps_rollup (nan if unreadable)."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[key] = int(parts[0])
    except OSError:
        return float("nan"), float("nan")
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Pss", 0) * 1024 / 1e6, uss * 1024 / 1e6


def _tree_of_meshd(env: Mapping[str, str]) -> Path:
    """The source tree whose meshd package the agents will import under ``env``."""
    code = "import meshd, pathlib; print(pathlib.Path(meshd.__file__).resolve().parent.parent)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env),
        cwd=tempfile.gettempdir(),  # not ours: ``python -c`` imports from its directory first
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cannot import meshd: {out.stderr.strip()}")
    return Path(out.stdout.strip())


def _compile(tree: Path, env: Mapping[str, str]) -> None:
    """Bytecode for ``tree``'s meshd in its ``__pycache__`` directories, as an install has."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(tree / "meshd")],
        env=dict(env), capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip


def _metric_sum(api: str, prefix: str) -> float:
    with urllib.request.urlopen(f"{api}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rpartition(" ")[2])
    return total


def _alive(agent: procs.Agent) -> int:
    members = procs.http_json(f"{agent.api}/v1/members")
    return sum(1 for m in members if m["status"] == "alive")


def _all_alive(agent: procs.Agent, n: int) -> bool:
    return _alive(agent) >= n


def _stats(values: list[float]) -> tuple[float, float]:
    return procs.median(values), max(values) if values else float("nan")


def _start_mesh(
    label: str, names: list[str], tmp: Path, ca: Path, env: Mapping[str, str]
) -> list[_EnvAgent]:
    """``len(names)`` agents of one mesh, all joining the first; started and ready."""
    agents: list[_EnvAgent] = []

    def make(i: int, join: str | None) -> _EnvAgent:
        name = names[i]
        argv = [
            "--node", name, "--cluster", CLUSTER, "--region", "r1", "--zone", f"z{i % 3}",
            "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0",
            "--state-dir", str(tmp / "state" / label / name), "--log-level", "warning",
            "--tls-ca", str(ca / "ca.pem"), "--tls-cert", str(tmp / "certs" / f"{name}.pem"),
            "--tls-key", str(tmp / "certs" / f"{name}.key"),
        ]  # fmt: skip
        if join:
            argv += ["--join", join]
        return _EnvAgent(f"{label}-{name}", argv, env)

    first = make(0, None)
    first.launch()
    agents.append(first)
    first.wait_ready(60)
    for lo in range(1, len(names), START_BATCH):
        batch = [make(i, first.gossip) for i in range(lo, min(lo + START_BATCH, len(names)))]
        for a in batch:
            a.launch()
            agents.append(a)
        for a in batch:
            a.wait_ready(120)
    return agents


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32, help="agents (default 32)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after convergence")
    parser.add_argument("--measure", type=float, default=60.0, help="measured seconds (60)")
    parser.add_argument("--sample", type=float, default=2.0, help="RSS sampling interval (2 s)")
    parser.add_argument("--baselines", type=int, default=3, help="processes per baseline (3)")
    parser.add_argument(
        "--converge-timeout", type=float, default=180.0, help="max seconds to all-alive"
    )
    parser.add_argument(
        "--ref-tree", type=Path, help="also run a mesh from this source tree (before/after)"
    )
    parser.add_argument("--serf", action="store_true", help="also run a mesh of Serf agents")
    parser.add_argument(
        "--source-only", action="store_true", help="do not compile meshd's bytecode first"
    )
    parser.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    if not (2 <= args.nodes <= 200 and 0 < args.measure <= 3600 and 0 <= args.settle <= 3600):
        parser.error("need 2 <= --nodes <= 200, 0 < --measure <= 3600, 0 <= --settle <= 3600")
    if args.ref_tree is not None and not (args.ref_tree / "meshd" / "__init__.py").is_file():
        parser.error(f"--ref-tree {args.ref_tree}: no meshd package there")
    if args.serf and shutil.which("serf") is None:
        parser.error("--serf: no serf on PATH (Debian: apt-get install serf)")
    command = "python benchmarks/bench_idle.py " + shlex.join(sys.argv[1:])

    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-idle-"))
    meshes: dict[str, list[procs.Proc]] = {}
    agent_meshes: dict[str, list[_EnvAgent]] = {}
    baselines: dict[str, list[procs.Proc]] = {}
    serf_mesh: Any = None
    try:
        t_start = time.monotonic()
        env = dict(os.environ)
        ref_env = dict(os.environ)
        if args.ref_tree is not None:
            ref_env["PYTHONPATH"] = str(args.ref_tree.resolve())
        tree = _tree_of_meshd(env)
        ref_tree = None if args.ref_tree is None else _tree_of_meshd(ref_env)
        if not args.source_only:
            _compile(tree, env)
            if ref_tree is not None:
                _compile(ref_tree, ref_env)
        bytecode = "source only (compiled at each start)" if args.source_only else "compiled"
        print(f"meshd from {tree}" + (f", reference from {ref_tree}" if ref_tree else ""))

        ca = tmp / "ca"
        procs.run_meshd("ca", "create", "--out", str(ca))
        names = [f"n{i:02d}" for i in range(args.nodes)]

        def issue(name: str) -> None:
            procs.run_meshd(
                "cert", "issue", "--ca", str(ca), "--node", name, "--cluster", CLUSTER,
                "--ip", "127.0.0.1", "--out", str(tmp / "certs"),
            )  # fmt: skip

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(issue, names))
        print(f"CA and {args.nodes} certificates in {time.monotonic() - t_start:.1f} s")

        # Two meshes never meet: each joins only its own first agent, so they
        # may share the CA and the node certificates.
        plan = [("meshd", env)] + ([("reference", ref_env)] if ref_tree is not None else [])
        for label, e in plan:
            agent_meshes[label] = _start_mesh(label, names, tmp, ca, e)
            meshes[label] = list(agent_meshes[label])
            first = agent_meshes[label][0]
            print(f"{label}: {args.nodes} agents ready after {time.monotonic() - t_start:.1f} s")
            t_conv = time.monotonic()
            procs.wait_until(
                functools.partial(_all_alive, first, args.nodes),
                args.converge_timeout,
                f"{args.nodes} members alive in the {label} mesh",
                poll=0.5,
            )
            print(f"{label}: all alive after {time.monotonic() - t_conv:.1f} s")
        if args.serf:
            import bench_serf  # the benchmarks directory: its Serf mesh, same LAN profile

            serf_mesh = bench_serf.SerfMesh(tmp, args.nodes)
            serf_mesh.start()
            procs.wait_until(
                lambda: all(serf_mesh.alive_count(i) == args.nodes for i in range(args.nodes)),
                args.converge_timeout,
                f"{args.nodes} Serf members alive",
                poll=0.5,
            )
            meshes["Serf"] = serf_mesh.agents
            print(f"Serf: all alive after {time.monotonic() - t_start:.1f} s")

        sleep_for = args.settle + args.measure + 120  # the baselines end on their own
        kinds = [
            ("interpreter", BARE_CODE, env),
            ("floor", BASELINE_CODE, env),
            ("imports", IMPORTS_CODE, env),
        ]
        if ref_tree is not None:
            kinds.append(("imports (reference)", IMPORTS_CODE, ref_env))
        for kind, code, e in kinds:
            baselines[kind] = [
                _EnvProc(
                    f"{kind}{i}",
                    [sys.executable, "-c", code, str(sleep_for)],
                    re.compile("baseline ready"),
                    e,
                ).launch()
                for i in range(args.baselines)
            ]
        for group in baselines.values():
            for p in group:
                p.wait_ready(60)

        print(f"settling {args.settle:g} s")
        time.sleep(args.settle)

        ours = [a for agents in agent_meshes.values() for a in agents]
        msgs0 = {a.pid: _metric_sum(a.api, "meshd_messages_sent_total") for a in ours}
        bytes0 = {a.pid: _metric_sum(a.api, "meshd_bytes_sent_total") for a in ours}
        everyone = [p for g in (*meshes.values(), *baselines.values()) for p in g]
        rss_peak = {p.pid: procs.rss_bytes(p.pid) for p in everyone}
        ticks0 = {p.pid: procs.cpu_ticks(p.pid) for p in everyone}
        t0 = time.monotonic()
        print(f"measuring {args.measure:g} s")
        deadline = t0 + args.measure
        for _ in range(int(args.measure / args.sample) + 2):
            now = time.monotonic()
            if now >= deadline:
                break
            time.sleep(min(args.sample, deadline - now))
            for p in everyone:
                rss_peak[p.pid] = max(rss_peak[p.pid], procs.rss_bytes(p.pid))
        ticks1 = {p.pid: procs.cpu_ticks(p.pid) for p in everyone}
        elapsed = time.monotonic() - t0
        rollup = {p.pid: _rollup(p.pid) for p in everyone}
        msgs1 = {a.pid: _metric_sum(a.api, "meshd_messages_sent_total") for a in ours}
        bytes1 = {a.pid: _metric_sum(a.api, "meshd_bytes_sent_total") for a in ours}
        main_mesh = agent_meshes["meshd"]
        sockets = [procs.socket_count(a.pid) for a in main_mesh]
        alive_end = _alive(main_mesh[0])
        dead = [a.name for a in everyone if not (a.proc and a.proc.poll() is None)]

        def cpu_pct(p: procs.Proc) -> float:
            return 100.0 * (ticks1[p.pid] - ticks0[p.pid]) / procs.CLK_TCK / elapsed

        def rss_of(group: Sequence[procs.Proc]) -> list[float]:
            return [rss_peak[p.pid] / 1e6 for p in group]

        labels = {
            "meshd": "meshd agent",
            "reference": f"meshd agent, reference tree {ref_tree.name if ref_tree else ''}",
            "Serf": "Serf agent",
            "interpreter": "interpreter only (python -c)",
            "floor": "floor: + asyncio, ssl, httptools, cryptography, msgpack",
            "imports": "imports: + the agent's modules",
            "imports (reference)": "imports, reference tree",
        }
        rows = []
        medians: dict[str, float] = {}
        for key, group in [*meshes.items(), *baselines.items()]:
            cpu = [cpu_pct(p) for p in group]
            rss = rss_of(group)
            pss = [rollup[p.pid][0] for p in group]
            uss = [rollup[p.pid][1] for p in group]
            (cm, cx), (rm, rx) = _stats(cpu), _stats(rss)
            medians[key] = rm
            rows.append(
                [f"{labels[key]} (x{len(group)})", f"{cm:.2f}", f"{cx:.2f}", f"{rm:.1f}",
                 f"{rx:.1f}", f"{procs.median(pss):.1f}", f"{procs.median(uss):.1f}"]
            )  # fmt: skip
        result_table = procs.table(
            ["process", "CPU % of a core (median)", "CPU % (max)", "RSS MB (median)",
             "RSS MB (max)", "PSS MB (median)", "USS MB (median)"],
            rows,
        )  # fmt: skip
        a_cpu = [cpu_pct(a) for a in main_mesh]
        cm, cx = _stats(a_cpu)
        rm, rx = _stats(rss_of(main_mesh))
        main_pids = {a.pid for a in main_mesh}
        msg_rate = [(msgs1[p] - msgs0[p]) / elapsed for p in main_pids]
        byte_rate = [(bytes1[p] - bytes0[p]) / elapsed for p in main_pids]
        m = medians
        breakdown = [
            "Where an idle agent's RSS goes (medians, MB):",
            f"- interpreter {m['interpreter']:.1f}; libraries (asyncio, ssl, httptools,"
            f" cryptography, msgpack) "
            f"+{m['floor'] - m['interpreter']:.1f} = floor {m['floor']:.1f}",
            f"- meshd's modules +{m['imports'] - m['floor']:.1f} = imports {m['imports']:.1f}",
            f"- the running agent (sockets, TLS, state, {args.nodes - 1} peers) "
            f"+{m['meshd'] - m['imports']:.1f} = agent {m['meshd']:.1f}",
            f"- the agent above the floor: {m['meshd'] - m['floor']:.1f} MB",
        ]
        if "reference" in m:
            breakdown.append(
                f"- reference tree: imports {m['imports (reference)']:.1f}, agent "
                f"{m['reference']:.1f}; this tree / reference = {m['meshd'] / m['reference']:.2f}"
            )
        if "Serf" in m:
            breakdown.append(
                f"- Serf agent {m['Serf']:.1f}: meshd / Serf = {m['meshd'] / m['Serf']:.2f}"
            )
        extra = [
            f"- all meshd agents together: {sum(a_cpu):.1f} % of one core "
            f"({sum(a_cpu) / (100 * len(os.sched_getaffinity(0))) * 100:.1f} % of the "
            "machine)",
            f"- gossip sent per agent: median {procs.median(msg_rate):.1f} messages/s, "
            f"{procs.median(byte_rate) / 1e3:.1f} kB/s",
            f"- open sockets per agent at the end: median {procs.median(sockets):.0f}, max "
            f"{max(sockets)} (gossip connections are mutual TLS, one per direction per peer "
            "in use)",
            f"- members alive on {main_mesh[0].name} at the end: {alive_end}/{args.nodes}; "
            f"processes that exited during the run: {dead or 'none'}",
            f"- measured {elapsed:.1f} s after {args.settle:g} s settling; RSS is each "
            f"process's peak VmRSS over samples every {args.sample:g} s, PSS and USS are read "
            "once at the end (1 MB = 10^6 bytes); meshd's bytecode: " + bytecode,
        ]
        goals = [
            f"- CPU goal (idle agent < {GOAL_CPU_PCT:g} % of a core): median {cm:.2f} %, "
            f"max {cx:.2f} % -> " + ("met" if cx < GOAL_CPU_PCT else "MISSED")
            + ("" if cx < GOAL_CPU_PCT or cm >= GOAL_CPU_PCT else " by some agents (median met)"),
            f"- memory goal (idle agent <= {GOAL_RSS_MB:g} MB RSS): median {rm:.1f} MB, max "
            f"{rx:.1f} MB -> " + ("met" if rx <= GOAL_RSS_MB else "MISSED")
            + ("" if rx <= GOAL_RSS_MB or rm > GOAL_RSS_MB else " by some agents (median met)"),
        ]  # fmt: skip
        setup = (
            f"Setup: {args.nodes} agents per mesh, LAN profile, one cluster, 3 zones, all on "
            "127.0.0.1 with mutual TLS from one CA; no registrations, no API traffic during "
            "the window. Every process listed ran in the same window; all share the machine's "
            "2 cores."
        )
        report = "\n\n".join(
            [
                setup,
                result_table,
                "\n".join(breakdown),
                "\n".join(extra),
                "Goals:\n" + "\n".join(goals),
            ]
        )
        print()
        print(report)
        if args.write_results:
            procs.append_results("bench_idle", command, report)
        return 0
    finally:
        if serf_mesh is not None:
            serf_mesh.stop()
        everything = [p for g in (*meshes.values(), *baselines.values()) for p in g]
        procs.stop_all([p for p in everything if serf_mesh is None or p not in serf_mesh.agents])
        ours_all = [p for k, g in meshes.items() if k != "Serf" for p in g]
        codes = [a.proc.returncode for a in ours_all if a.proc is not None]
        bad = [c for c in codes if c != 0]
        print(f"stopped {len(codes)} meshd agents and the baselines; nonzero exits: {bad}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
