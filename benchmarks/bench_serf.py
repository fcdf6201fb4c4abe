"""meshd and Serf side by side: join, spread, crash, leave, idle cost.

    python benchmarks/bench_serf.py [--sizes 16,32,64] [--reps 3] [--spreads 3]
        [--idle 20] [--settle 10] [--write-results]

For each size N and each repetition, in one run and alternating which goes
first, starts N Serf agents and then N meshd agents on 127.0.0.1, both with
their LAN timings (Serf ``-profile=lan``; meshd ``--profile lan``: probe every
1 s, gossip every 200 ms to 3 members, suspicion multiplier 4), all joining
the first, and measures:

- **join**: from the first start to every agent listing N alive members
  (certificates are issued before; each agent is asked in turn until it
  first lists them all), and the same from when the last agent is up (its
  ready line, or its RPC answering).  A meshd agent takes about 0.4 s of CPU
  to start and about as much again to join (handshakes, decoding and
  checking every member's signed claim), Serf's Go agents milliseconds, so
  with 64 agents on 2 cores both figures measure mostly the CPU the mesh
  needs in all, not protocol rounds;
- **spread** (``--spreads`` times): a new fact on agent 0 until every agent
  has it.  Serf: a tag set on agent 0 (``tags`` RPC), seen in every agent's
  member table (its ``members`` RPC, polled every 20 ms: the agent's event
  stream coalesces member events for about a second).  meshd: a new registration
  on agent 0, seen by a blocking ``/v1/resolve`` held open on every agent;
- **idle** for ``--idle`` seconds, from ``--settle`` seconds after the last
  spread (its retransmissions are over by then): CPU (utime+stime from /proc), RSS and the
  protocol's bytes sent (meshd: ``meshd_bytes_sent_total`` from /metrics;
  Serf: memberlist's ``udp.sent`` + ``tcp.sent`` counters, received as statsd
  on a local UDP port per agent);
- **crash**: SIGKILL of one agent (not the seed) until every other agent has
  it ``failed`` (Serf) / its record gone from every agent's answer (meshd);
- **leave**: a graceful stop (Serf: SIGINT, its graceful leave; meshd:
  SIGTERM) until every other agent has it ``left`` (Serf) / its record gone.

Serf is Debian's ``serf`` package (``apt-get install serf``; the benchmark
looks for ``serf`` on PATH and says how to get it when absent).  Times are
wall-clock from the action to the last agent's observation, observed by one
thread per agent (Serf: its member table over RPC; meshd: a blocking query).
Everything runs on 127.0.0.1 with ports picked free, waits are bounded, and
only processes started here are signalled, by PID.  The table reports medians
over repetitions and the meshd/Serf ratio (below 1: meshd faster/smaller).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procs  # noqa: E402  (the benchmarks directory, added just above)

CLUSTER = "bench"
SERF_READY = procs.re.compile(r"Serf agent running|serf agent running", procs.re.I)
TIMEOUT = 240.0
#: How often a Serf agent's member table is polled while a change is awaited.
POLL = 0.02


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free for TCP and UDP on 127.0.0.1 (Serf binds both), never one
    this run handed out before: released ports are picked again by the kernel,
    and two agents on one port would fail to start."""
    for _ in range(200):
        with socket.socket() as t, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            if port in _GIVEN:
                continue
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        _GIVEN.add(port)
        return port
    raise RuntimeError("no free port found in 200 tries")


# -- Serf's RPC protocol (msgpack over TCP): handshake, tags, members -------------


class SerfRPC:
    """One RPC connection to a Serf agent (Serf's documented msgpack protocol)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        self.seq = 0
        self._send("handshake", {"Version": 1})
        self._header()

    def _send(self, command: str, body: dict[str, Any] | None) -> int:
        self.seq += 1
        data = msgpack.packb({"Command": command, "Seq": self.seq})
        if body is not None:
            data += msgpack.packb(body)
        self.sock.sendall(data)
        return self.seq

    def _next(self) -> Any:
        for obj in self.unpacker:
            return obj
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("serf closed the RPC connection")
            self.unpacker.feed(chunk)
            for obj in self.unpacker:
                return obj

    def _header(self) -> None:
        header = self._next()
        if header.get("Error"):
            raise RuntimeError(f"serf RPC error: {header['Error']}")

    def members(self) -> list[dict[str, Any]]:
        self._send("members", None)
        self._header()
        return list(self._next()["Members"])

    def tags(self, tags: dict[str, str]) -> None:
        self._send("tags", {"Tags": tags, "DeleteTags": []})
        self._header()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the two systems behind one interface -------------------------------------------


@dataclass
class Watch:
    """When each observer saw a condition come true (observer index -> time)."""

    seen: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, i: int) -> None:
        with self.lock:
            self.seen.setdefault(i, time.monotonic())

    def wait_all(self, observers: list[int], timeout: float, what: str) -> float:
        procs.wait_until(lambda: all(i in self.seen for i in observers), timeout, what, poll=0.005)
        return max(self.seen[i] for i in observers)


class SerfMesh:
    name = "Serf"

    def __init__(self, tmp: Path, n: int) -> None:
        self.tmp, self.n = tmp, n
        self.agents: list[procs.Proc] = []
        self.rpc_ports: list[int] = []
        #: One RPC connection per agent, polled for its member table.
        self._rpcs: list[SerfRPC] = []
        #: Bytes memberlist reports sent (UDP and TCP), per agent, from statsd.
        self.sent = [0.0] * n
        self._statsd: list[socket.socket] = []

    def prepare(self) -> None:
        """Nothing to prepare: Serf's gossip runs without certificates."""

    def start(self) -> None:
        seed = ""
        for i in range(self.n):
            bind, rpc = free_port(), free_port()
            statsd = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            statsd.bind(("127.0.0.1", 0))
            self._statsd.append(statsd)
            threading.Thread(target=self._count_sent, args=(i, statsd), daemon=True).start()
            config = self.tmp / f"serf-{i}-{time.monotonic_ns()}.json"
            config.write_text(json.dumps({"statsd_addr": f"127.0.0.1:{statsd.getsockname()[1]}"}))
            argv = [
                "serf", "agent", f"-node=s{i:02d}", f"-bind=127.0.0.1:{bind}",
                f"-rpc-addr=127.0.0.1:{rpc}", "-profile=lan", "-log-level=warn",
                f"-config-file={config}",
            ]  # fmt: skip
            if seed:
                argv.append(f"-join={seed}")
            p = procs.Proc(f"serf-{i}", argv, SERF_READY).launch()
            self.agents.append(p)
            self.rpc_ports.append(rpc)
            if not seed:
                seed = f"127.0.0.1:{bind}"
                procs.wait_until(lambda: self._rpc_ok(0), 30, "serf seed RPC")
        for i in range(self.n):
            procs.wait_until(lambda i=i: self._rpc_ok(i), 30, f"serf {i} RPC")
            self._rpcs.append(SerfRPC(self.rpc_ports[i]))

    def _count_sent(self, i: int, sock: socket.socket) -> None:
        """Sum memberlist's ``udp.sent`` and ``tcp.sent`` counters (bytes)."""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                name, _, rest = line.partition(":")
                if name.endswith(("memberlist.udp.sent", "memberlist.tcp.sent")):
                    value, _, kind = rest.partition("|")
                    if kind.startswith("c"):
                        with contextlib.suppress(ValueError):
                            self.sent[i] += float(value)

    def bytes_sent(self) -> list[float]:
        return list(self.sent)

    def _rpc_ok(self, i: int) -> bool:
        try:
            SerfRPC(self.rpc_ports[i]).close()
            return True
        except OSError:
            return False

    def alive_count(self, i: int) -> int:
        rpc = SerfRPC(self.rpc_ports[i])
        try:
            return sum(1 for m in rpc.members() if m["Status"] == "alive")
        finally:
            rpc.close()

    def _poll(self, observers: list[int], since: float, pred: Any, what: str) -> float:
        """Time until every observer's member table satisfies ``pred``.

        Polled (every ``POLL`` s, one thread per observer) rather than read from
        Serf's event stream: the agent coalesces member events for about a
        second before it streams them, which would charge Serf for its event
        delivery rather than its gossip.
        """
        times: dict[int, float] = {}
        deadline = since + TIMEOUT

        def watch(i: int) -> None:
            rpc = self._rpcs[i]
            while time.monotonic() < deadline:
                if pred(rpc.members()):
                    times[i] = time.monotonic()
                    return
                time.sleep(POLL)

        with ThreadPoolExecutor(max_workers=len(observers)) as pool:
            list(pool.map(watch, observers))
        if len(times) != len(observers):
            raise TimeoutError(f"timed out waiting for {what}")
        return max(times.values()) - since

    def spread(self, k: int) -> float:
        since = time.monotonic()
        self._rpcs[0].tags({"bench": str(k)})

        def pred(members: list[dict[str, Any]]) -> bool:
            return any(
                m["Name"] == "s00" and m.get("Tags", {}).get("bench") == str(k) for m in members
            )

        return self._poll(list(range(1, self.n)), since, pred, f"serf tag {k}")

    def _gone(self, victim: int, status: str, act: Callable[[], None]) -> float:
        name = f"s{victim:02d}"
        observers = [
            i for i, a in enumerate(self.agents) if i != victim and a.proc and a.proc.poll() is None
        ]
        since = time.monotonic()
        act()

        def pred(members: list[dict[str, Any]]) -> bool:
            return any(m["Name"] == name and m["Status"] == status for m in members)

        return self._poll(observers, since, pred, f"serf {name} {status}")

    def crash(self, victim: int) -> float:
        proc = self.agents[victim].proc
        assert proc is not None
        return self._gone(victim, "failed", proc.kill)

    def leave(self, victim: int) -> float:
        # Serf leaves gracefully on SIGINT (SIGTERM only stops it, by default).
        proc = self.agents[victim].proc
        assert proc is not None
        return self._gone(victim, "left", lambda: proc.send_signal(signal.SIGINT))

    def stop(self) -> None:
        for rpc in self._rpcs:
            rpc.close()
        procs.stop_all(self.agents)
        for sock in self._statsd:
            sock.close()


class MeshdMesh:
    name = "meshd"

    def __init__(self, tmp: Path, n: int) -> None:
        self.tmp, self.n = tmp, n
        self.agents: list[procs.Agent] = []
        self.answers: list[list[tuple[float, set[str]]]] = [[] for _ in range(n)]
        self._stop = threading.Event()

    def prepare(self) -> None:
        """The CA and every agent's certificate (before the clock starts:
        each is a ``meshd cert issue`` process, set-up rather than join)."""
        ca = self.tmp / "ca"
        if not ca.exists():
            procs.run_meshd("ca", "create", "--out", str(ca))
        names = [f"m{i:02d}" for i in range(self.n)]

        def issue(name: str) -> None:
            if not (self.tmp / "certs" / f"{name}.pem").exists():
                procs.run_meshd(
                    "cert", "issue", "--ca", str(ca), "--node", name, "--cluster", CLUSTER,
                    "--ip", "127.0.0.1", "--out", str(self.tmp / "certs"),
                )  # fmt: skip

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(issue, names))

    def start(self) -> None:
        self.prepare()  # done already: every file exists
        ca = self.tmp / "ca"
        names = [f"m{i:02d}" for i in range(self.n)]
        seed = ""
        for name in names:
            state = self.tmp / "state" / f"{name}-{time.monotonic_ns()}"
            argv = [
                "--node", name, "--cluster", CLUSTER, "--profile", "lan",
                "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0",
                "--state-dir", str(state), "--log-level", "warning",
                "--tls-ca", str(ca / "ca.pem"),
                "--tls-cert", str(self.tmp / "certs" / f"{name}.pem"),
                "--tls-key", str(self.tmp / "certs" / f"{name}.key"),
            ]  # fmt: skip
            if seed:
                argv += ["--join", seed]
            a = procs.Agent(name, argv).launch()
            self.agents.append(a)
            if not seed:
                a.wait_ready(60)
                seed = a.gossip
        for a in self.agents:
            a.wait_ready(120)
        for i in range(self.n):
            threading.Thread(target=self._watch, args=(i,), daemon=True).start()

    def _watch(self, i: int) -> None:
        """A blocking resolve of ``bench`` held open on agent ``i``."""
        index = 0
        api = self.agents[i].api
        while not self._stop.is_set():
            try:
                url = f"{api}/v1/resolve/bench?index={index}&wait=30s"
                with urllib.request.urlopen(url, timeout=40) as resp:
                    body = json.loads(resp.read())
                    index = int(resp.headers.get("X-Meshd-Index", index))
            except (OSError, urllib.error.URLError, ValueError):
                if self.agents[i].proc is None or self.agents[i].proc.poll() is not None:
                    return
                time.sleep(0.05)
                continue
            seen = {e["instance"] for e in body.get("endpoints", [])}
            self.answers[i].append((time.monotonic(), seen))

    def alive_count(self, i: int) -> int:
        members = procs.http_json(f"{self.agents[i].api}/v1/members")
        return sum(1 for m in members if m["status"] == "alive")

    def bytes_sent(self) -> list[float]:
        out = []
        for a in self.agents:
            with urllib.request.urlopen(f"{a.api}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            out.append(
                sum(
                    float(line.rpartition(" ")[2])
                    for line in text.splitlines()
                    if line.startswith("meshd_bytes_sent_total")
                )
            )
        return out

    def _register(self, i: int, instance: str) -> None:
        body = {"app": "bench", "address": "127.0.0.1", "port": 9000 + i}
        procs.http_json(f"{self.agents[i].api}/v1/apps/{instance}", "PUT", body)

    def _wait_answers(
        self, observers: list[int], since: float, pred: Callable[[set[str]], bool], what: str
    ) -> float:
        times: dict[int, float] = {}

        def all_seen() -> bool:
            for i in observers:
                if i in times:
                    continue
                for t, seen in list(self.answers[i]):
                    if t >= since and pred(seen):
                        times[i] = t
                        break
            return len(times) == len(observers)

        procs.wait_until(all_seen, TIMEOUT, what, poll=0.005)
        return max(times.values()) - since

    def prepare_victims(self, victims: list[int]) -> None:
        """Each victim publishes a record, seen everywhere before the clock starts."""
        for v in victims:
            self._register(v, f"victim-{v}")
        want = {f"victim-{v}" for v in victims}
        self._wait_answers(
            list(range(self.n)), 0.0, lambda seen: want <= seen, "victims' records everywhere"
        )

    def spread(self, k: int) -> float:
        since = time.monotonic()
        self._register(0, f"spread-{k}")
        return self._wait_answers(
            list(range(1, self.n)), since, lambda seen: f"spread-{k}" in seen, f"spread-{k}"
        )

    def _gone(self, victim: int, act: Callable[[], None]) -> float:
        observers = [
            i for i, a in enumerate(self.agents) if i != victim and a.proc and a.proc.poll() is None
        ]
        since = time.monotonic()
        act()
        return self._wait_answers(
            observers, since, lambda seen: f"victim-{victim}" not in seen, f"{victim} gone"
        )

    def crash(self, victim: int) -> float:
        return self._gone(victim, lambda: self.agents[victim].proc.kill())  # type: ignore[union-attr]

    def leave(self, victim: int) -> float:
        return self._gone(victim, self.agents[victim].terminate)

    def stop(self) -> None:
        self._stop.set()
        procs.stop_all(self.agents)


# -- measuring -------------------------------------------------------------------------


def joined(mesh: Any, n: int) -> float:
    """When the last agent first listed all ``n`` members alive (monotonic).

    Agents are asked in turn, each until its first complete answer: asking
    every agent again on every pass adds 64 answers per pass under the
    join's CPU load, and one thread per agent adds more load than it
    saves.  The time taken is when the answer arrived, so the agent's state
    was complete at or before it.  Every agent is asked once more at the
    end: one that lost a member again meanwhile fails the run.
    """
    deadline = time.monotonic() + TIMEOUT
    pending = list(range(n))
    last = 0.0
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {TIMEOUT:.0f} s waiting for all alive")
        for i in list(pending):
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if mesh.alive_count(i) == n:
                    last = time.monotonic()
                    pending.remove(i)
        if pending:
            time.sleep(0.2)
    counts = [mesh.alive_count(i) for i in range(n)]
    if any(c != n for c in counts):
        raise RuntimeError(f"members fell out after the join: {sorted(counts)[:3]} alive")
    return last


def idle(mesh: Any, seconds: float) -> tuple[float, float, float]:
    """(median CPU % of one core, median peak RSS MB, median protocol bytes sent per second)."""
    pids = [a.pid for a in mesh.agents]
    t0 = time.monotonic()
    cpu0 = {p: procs.cpu_ticks(p) for p in pids}
    sent0 = mesh.bytes_sent()
    peak = dict.fromkeys(pids, 0)
    deadline = t0 + seconds
    while time.monotonic() < deadline:
        for p in pids:
            peak[p] = max(peak[p], procs.rss_bytes(p))
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    dt = time.monotonic() - t0
    cpu = [100.0 * (procs.cpu_ticks(p) - cpu0[p]) / procs.CLK_TCK / dt for p in pids]
    sent = [(b - a) / dt for a, b in zip(sent0, mesh.bytes_sent(), strict=True)]
    return procs.median(cpu), procs.median([v / 1e6 for v in peak.values()]), procs.median(sent)


def run_one(mesh: Any, n: int, spreads: int, idle_s: float, settle_s: float) -> dict[str, Any]:
    mesh.prepare()
    t0 = time.monotonic()
    mesh.start()
    up = time.monotonic()
    done = joined(mesh, n)
    out: dict[str, Any] = {"join": done - t0, "join_up": done - up}
    crash_victim, leave_victim = n - 1, n - 2
    if isinstance(mesh, MeshdMesh):
        mesh.prepare_victims([crash_victim, leave_victim])
    out["spread"] = [mesh.spread(k) for k in range(spreads)]
    # The last spread is still being retransmitted for a few seconds (both
    # systems gossip each fact a number of rounds): idle starts after that.
    time.sleep(settle_s)
    out["cpu"], out["rss"], out["sent"] = idle(mesh, idle_s)
    out["crash"] = mesh.crash(crash_victim)
    out["leave"] = mesh.leave(leave_victim)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64", help="agents per mesh (16,32,64)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per size (3)")
    parser.add_argument("--spreads", type=int, default=3, help="new facts per repetition (3)")
    parser.add_argument("--idle", type=float, default=20.0, help="idle seconds measured (20)")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds after the last spread before idle (10)"
    )
    parser.add_argument("--write-results", action="store_true", help="append to RESULTS.md")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if not all(3 <= s <= 128 for s in sizes) or not 1 <= args.reps <= 20:
        parser.error("sizes must be 3-128 agents and --reps 1-20")
    if shutil.which("serf") is None:
        print("serf is not on PATH: install Debian's package (apt-get install serf)")
        return 2
    command = "python benchmarks/bench_serf.py " + shlex.join(sys.argv[1:])
    tmp = Path(tempfile.mkdtemp(prefix="meshd-bench-serf-"))
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}
    try:
        for n in sizes:
            for rep in range(args.reps):
                order = [SerfMesh, MeshdMesh] if rep % 2 == 0 else [MeshdMesh, SerfMesh]
                for cls in order:
                    mesh = cls(tmp, n)
                    try:
                        r = run_one(mesh, n, args.spreads, args.idle, args.settle)
                    except (RuntimeError, TimeoutError, OSError) as exc:
                        # One failed start must not lose the run: report it, go on.
                        print(f"n={n} rep={rep} {cls.name}: failed: {exc}", flush=True)
                        continue
                    finally:
                        mesh.stop()
                    results.setdefault((n, cls.name), []).append(r)
                    print(
                        f"n={n} rep={rep} {cls.name}: join {r['join']:.1f} s, spread "
                        f"{'/'.join(f'{s:.2f}' for s in r['spread'])} s, crash {r['crash']:.2f} s, "
                        f"leave {r['leave']:.2f} s, cpu {r['cpu']:.2f} %, rss {r['rss']:.1f} MB, "
                        f"sent {r['sent'] / 1000:.2f} kB/s",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for n in sizes:
        if (n, "meshd") not in results or (n, "Serf") not in results:
            continue
        m, s = results[(n, "meshd")], results[(n, "Serf")]

        def med(rs: list[dict[str, Any]], key: str) -> float:
            return procs.median([r[key] for r in rs])

        def spread_med(rs: list[dict[str, Any]]) -> float:
            return procs.median([x for r in rs for x in r["spread"]])

        def spread_max(rs: list[dict[str, Any]]) -> float:
            return max(x for r in rs for x in r["spread"])

        for label, fm, fs, unit in (
            ("join (all alive)", med(m, "join"), med(s, "join"), "s"),
            ("join, after the last agent is up", med(m, "join_up"), med(s, "join_up"), "s"),
            ("new record/tag on all, median", spread_med(m), spread_med(s), "s"),
            ("new record/tag on all, worst", spread_max(m), spread_max(s), "s"),
            ("crashed agent gone everywhere", med(m, "crash"), med(s, "crash"), "s"),
            ("graceful leave gone everywhere", med(m, "leave"), med(s, "leave"), "s"),
            ("idle CPU per agent", med(m, "cpu"), med(s, "cpu"), "%"),
            ("idle RSS per agent", med(m, "rss"), med(s, "rss"), "MB"),
            (
                "idle gossip sent per agent",
                med(m, "sent") / 1000,
                med(s, "sent") / 1000,
                "kB/s",
            ),
        ):
            ratio = fm / fs if fs else float("nan")
            rows.append((n, label, f"{fm:.2f} {unit}", f"{fs:.2f} {unit}", f"{ratio:.2f}x"))
    report = procs.table(("agents", "measure", "meshd", "Serf", "meshd/Serf"), rows)
    print(report)
    if args.write_results:
        body = (
            f"{args.reps} repetitions per size, {args.spreads} spreads each, medians; "
            f"idle over {args.idle:.0f} s from {args.settle:.0f} s after the last spread. "
            f"Serf {serf_version()} (Debian), LAN profiles.\n\n" + report
        )
        procs.append_results("meshd and Serf side by side", command, body)
    return 0


def serf_version() -> str:
    try:
        out = procs.subprocess.run(
            ["serf", "version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "?"
    return out.splitlines()[0] if out else "?"


if __name__ == "__main__":
    sys.exit(main())
