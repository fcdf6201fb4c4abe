"""Idle cost of a mesh: CPU and memory of every agent in a settled LAN cluster.

    python benchmarks/bench_idle.py [--nodes 32] [--settle 20] [--measure 60]
        [--write-results]

Starts ``--nodes`` real ``meshd agent`` processes on 127.0.0.1 with the LAN
profile (the default; certificates from one CA made with ``meshd ca create`` /
``meshd cert issue``), all joining the first.  Waits (bounded) until the first
agent lists every node alive, lets the mesh settle, then for ``--measure``
seconds reads from /proc each agent's CPU time (utime+stime, in clock ticks)
and its resident memory (VmRSS, sampled every ``--sample`` seconds).

Reported per agent: CPU as % of one core over the window (median and max over
agents) and peak RSS in MB (median and max over agents).  The same is reported
for a baseline: idle ``python -c`` processes that import aiohttp, cryptography
and msgpack and sleep, the interpreter's floor.  Gossip traffic (messages and
bytes sent, from each agent's /metrics) is read before and after the window.

All agents share 2 cores, so this is the cost of the protocol itself with no
traffic; nothing else is happening in the mesh.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs  # noqa: E402  (the benchmarks directory, added just above)

GOAL_CPU_PCT = 2.0
GOAL_RSS_MB = 60.0
CLUSTER = "bench"
START_BATCH = 8
BASELINE_CODE = (
    "import sys, time\n"
    "import aiohttp, aiohttp.web, cryptography, cryptography.x509, msgpack\n"
    "print('baseline ready', file=sys.stderr, flush=True)\n"
    "time.sleep(float(sys.argv[1]))\n"
)


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


def _stats(values: list[float]) -> tuple[float, float]:
    return procs.median(values), max(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=32, help="agents (default 32)")
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after convergence")
    parser.add_argument("--measure", type=float, default=60.0, help="measured seconds (60)")
    parser.add_argument("--sample", type=float, default=2.0, help="RSS sampling interval (2 s)")
    parser.add_argument("--baselines", type=int, default=3, help="baseline processes (3)")
    parser.add_argument(
        "--converge-timeout", type=float, default=180.0, help="max seconds to all-alive"
    )
    parser.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    if not (2 <= args.nodes <= 200 and 0 < args.measure <= 3600 and 0 <= args.settle <= 3600):
        parser.error("need 2 <= --nodes <= 200, 0 < --measure <= 3600, 0 <= --settle <= 3600")
    command = "python benchmarks/bench_idle.py " + shlex.join(sys.argv[1:])

    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-idle-"))
    agents: list[procs.Agent] = []
    baselines: list[procs.Proc] = []
    try:
        t_start = time.monotonic()
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

        def make(i: int, join: str | None) -> procs.Agent:
            name = names[i]
            argv = [
                "--node", name, "--cluster", CLUSTER, "--region", "r1", "--zone", f"z{i % 3}",
                "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0",
                "--state-dir", str(tmp / "state" / name), "--log-level", "warning",
                "--tls-ca", str(ca / "ca.pem"), "--tls-cert", str(tmp / "certs" / f"{name}.pem"),
                "--tls-key", str(tmp / "certs" / f"{name}.key"),
            ]  # fmt: skip
            if join:
                argv += ["--join", join]
            return procs.Agent(name, argv)

        first = make(0, None)
        agents.append(first.launch())
        first.wait_ready(60)
        for lo in range(1, args.nodes, START_BATCH):
            batch = [make(i, first.gossip) for i in range(lo, min(lo + START_BATCH, args.nodes))]
            for a in batch:
                agents.append(a.launch())
            for a in batch:
                a.wait_ready(120)
        print(f"{len(agents)} agents ready after {time.monotonic() - t_start:.1f} s")

        t_conv = time.monotonic()
        procs.wait_until(
            lambda: _alive(first) >= args.nodes,
            args.converge_timeout,
            f"{args.nodes} members alive",
            poll=0.5,
        )
        print(f"all {args.nodes} alive on {first.name} after {time.monotonic() - t_conv:.1f} s")

        sleep_for = args.settle + args.measure + 120  # the baselines end on their own
        for i in range(args.baselines):
            p = procs.Proc(
                f"baseline{i}",
                [sys.executable, "-c", BASELINE_CODE, str(sleep_for)],
                re.compile("baseline ready"),
            )
            baselines.append(p.launch())
        for p in baselines:
            p.wait_ready(60)

        print(f"settling {args.settle:g} s")
        time.sleep(args.settle)

        msgs0 = [_metric_sum(a.api, "meshd_messages_sent_total") for a in agents]
        bytes0 = [_metric_sum(a.api, "meshd_bytes_sent_total") for a in agents]
        everyone = [*agents, *baselines]
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
        msgs1 = [_metric_sum(a.api, "meshd_messages_sent_total") for a in agents]
        bytes1 = [_metric_sum(a.api, "meshd_bytes_sent_total") for a in agents]
        sockets = [procs.socket_count(a.pid) for a in agents]
        alive_end = _alive(first)
        dead = [a.name for a in agents if not (a.proc and a.proc.poll() is None)]

        def cpu_pct(p: procs.Proc) -> float:
            return 100.0 * (ticks1[p.pid] - ticks0[p.pid]) / procs.CLK_TCK / elapsed

        a_cpu = [cpu_pct(a) for a in agents]
        a_rss = [rss_peak[a.pid] / 1e6 for a in agents]
        b_cpu = [cpu_pct(b) for b in baselines]
        b_rss = [rss_peak[b.pid] / 1e6 for b in baselines]
        msg_rate = [(m1 - m0) / elapsed for m0, m1 in zip(msgs0, msgs1, strict=True)]
        byte_rate = [(b1 - b0) / elapsed for b0, b1 in zip(bytes0, bytes1, strict=True)]

        rows = []
        for label, cpu, rss in (
            (f"meshd agent (x{len(agents)})", a_cpu, a_rss),
            (f"baseline python -c (x{len(baselines)})", b_cpu, b_rss),
        ):
            (cm, cx), (rm, rx) = _stats(cpu), _stats(rss)
            rows.append([label, f"{cm:.2f}", f"{cx:.2f}", f"{rm:.1f}", f"{rx:.1f}"])
        result_table = procs.table(
            ["process", "CPU % of a core (median)", "CPU % (max)", "RSS MB (median)",
             "RSS MB (max)"],
            rows,
        )  # fmt: skip
        cm, cx = _stats(a_cpu)
        rm, rx = _stats(a_rss)
        extra = [
            f"- all agents together: {sum(a_cpu):.1f} % of one core "
            f"({sum(a_cpu) / (100 * len(os.sched_getaffinity(0))) * 100:.1f} % of the "
            "machine)",
            f"- gossip sent per agent: median {procs.median(msg_rate):.1f} messages/s, "
            f"{procs.median(byte_rate) / 1e3:.1f} kB/s",
            f"- open sockets per agent at the end: median {procs.median(sockets):.0f}, max "
            f"{max(sockets)} (gossip connections are mutual TLS, one per direction per peer "
            "in use)",
            f"- members alive on {first.name} at the end: {alive_end}/{args.nodes}; "
            f"agents that exited during the run: {dead or 'none'}",
            f"- measured {elapsed:.1f} s after {args.settle:g} s settling; RSS is each "
            f"process's peak VmRSS over samples every {args.sample:g} s (1 MB = 10^6 bytes)",
        ]
        goals = [
            f"- CPU goal (idle agent < {GOAL_CPU_PCT:g} % of a core): median {cm:.2f} %, "
            f"max {cx:.2f} % -> " + ("met" if cx < GOAL_CPU_PCT else "MISSED")
            + ("" if cx < GOAL_CPU_PCT or cm >= GOAL_CPU_PCT else " by some agents (median met)"),
            f"- memory goal (idle agent < {GOAL_RSS_MB:g} MB RSS): median {rm:.1f} MB, max "
            f"{rx:.1f} MB -> " + ("met" if rx < GOAL_RSS_MB else "MISSED")
            + ("" if rx < GOAL_RSS_MB or rm >= GOAL_RSS_MB else " by some agents (median met)"),
        ]  # fmt: skip
        setup = (
            f"Setup: {args.nodes} agents, LAN profile, one cluster, 3 zones, all on 127.0.0.1 "
            "with mutual TLS from one CA; no registrations, no API traffic during the window. "
            "All agents share the machine's 2 cores."
        )
        report = "\n\n".join([setup, result_table, "\n".join(extra), "Goals:\n" + "\n".join(goals)])
        print()
        print(report)
        if args.write_results:
            procs.append_results("bench_idle", command, report)
        return 0
    finally:
        procs.stop_all([*agents, *baselines])
        codes = [a.proc.returncode for a in agents if a.proc is not None]
        bad = [c for c in codes if c != 0]
        print(f"stopped {len(codes)} agents and {len(baselines)} baselines; nonzero exits: {bad}")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
