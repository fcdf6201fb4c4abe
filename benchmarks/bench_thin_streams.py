"""How long a lost segment holds up a thin TCP stream, with Linux's defaults and the agent's.

    python benchmarks/bench_thin_streams.py [--loss 10 30] [--seconds 120]
        [--connections 6] [--interval 0.1] [--write-results]

Gossip connections carry a frame or two at a time, so a lost segment is only
recovered by the retransmission timer, which Linux doubles on every retry
and computes from a round-trip variance that loss inflates.  The agent sets
``TCP_THIN_LINEAR_TIMEOUTS`` and ``TCP_RTO_MAX_MS`` (1 s) on its gossip
sockets (meshd/agent/transport.py).  This measures what each changes,
between two hosts that lose packets.

Two network namespaces made for the run (random names, removed at the end
with everything in them), joined by a veth pair; each drops a random
``--loss`` percent of the packets it receives (nftables ``numgen``), so a
segment and its acknowledgement are each lost with that probability.  A
sender in one namespace opens ``--connections`` TCP connections of each kind
to a receiver in the other, all at once so every kind sees the same loss:
"default" (Linux's defaults), "linear" (linear timeouts only) and "linear,
rto max 1 s" (what the agent sets).  Every ``--interval`` seconds it writes
a 32-byte frame stamped with the monotonic clock (shared by all processes
and namespaces) on each connection; the receiver records how late each
frame arrived.

Reported per loss level and kind: frames sent, those not arrived 30 s after
the last was sent, the median, p99 and maximum delay of the others, and the
stalls: silences on one connection longer than 1 s, 3 s and 6 s between two
arrivals (6 s: what the cluster watch, 12 missed rounds of 0.5 s, takes for
a lost cluster).  Linux only (``TCP_RTO_MAX_MS`` from 6.15); needs root
(``ip netns``) and ``nft``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
#: Linux's option numbers (linux/tcp.h); the agent's constants, repeated so
#: this script runs without the package installed.
TCP_THIN_LINEAR_TIMEOUTS = 16
TCP_RTO_MAX_MS = 44
FRAME = struct.Struct("!BxxxId16x")  # kind, sequence, monotonic send time
KINDS = ("default", "linear", "linear, rto max 1 s")
PORT = 7946
#: Seconds the receiver waits for the sender's connections, and for their end.
CONNECT_WAIT = 30.0
SLACK = 60.0
#: Seconds after the last frame is sent that the receiver still reads: a
#: frame later than that counts as not arrived.
DRAIN = 30.0
#: Seconds of silence on a connection counted as a stall (frames come every --interval).
GAP = 0.5


def _run(*args: str) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Link:
    """Two namespaces joined by a veth pair, each dropping ``loss`` percent of what it receives."""

    def __init__(self, loss: int) -> None:
        tag = secrets.token_hex(3)
        self.a, self.b = f"meshd-thin-a-{tag}", f"meshd-thin-b-{tag}"
        self.made: list[str] = []
        try:
            self._build(loss)
        except BaseException:
            self.close()
            raise

    def _build(self, loss: int) -> None:
        for ns in (self.a, self.b):
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
        # Created inside a, one end moved to b: the root namespace never holds it.
        _run("ip", "-n", self.a, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        _run("ip", "-n", self.a, "link", "set", "peer0", "netns", self.b)
        _run("ip", "-n", self.b, "link", "set", "peer0", "name", "eth0")
        for ns, addr in ((self.a, "10.254.0.1/30"), (self.b, "10.254.0.2/30")):
            _run("ip", "-n", ns, "addr", "add", addr, "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            script = f"""table inet meshd_thin {{
                chain input {{
                    type filter hook input priority -10; policy accept;
                    iifname "eth0" counter
                    iifname "eth0" numgen random mod 100 < {loss} counter drop
                }}
            }}"""
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-f", "-"],
                input=script,
                text=True,
                timeout=30,
                capture_output=True,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}")

    def counters(self) -> tuple[int, int]:
        """(packets received, packets dropped) on both sides."""
        seen = dropped = 0
        for ns in self.made:
            out = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet", "meshd_thin"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if out.returncode != 0:
                continue
            rules = [i["rule"] for i in json.loads(out.stdout)["nftables"] if "rule" in i]
            counts = [
                next(e["counter"]["packets"] for e in r["expr"] if "counter" in e) for r in rules
            ]
            seen, dropped = seen + counts[0], dropped + counts[1]
        return seen, dropped

    def close(self) -> None:
        for ns in self.made:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run("ip", "netns", "delete", ns)


# -- the two roles, each run inside its namespace ------------------------------


def receive(connections: int, seconds: float) -> None:
    """Accept the sender's connections, read until DRAIN seconds after the
    sending ends, then print each kind's delays and stalls as JSON."""
    delays: dict[str, list[float]] = {k: [] for k in KINDS}
    # Silences over GAP between two arrivals on one connection: the stalls.
    gaps: dict[str, list[float]] = {k: [] for k in KINDS}
    lock = threading.Lock()
    server = socket.create_server(("10.254.0.2", PORT))
    server.settimeout(CONNECT_WAIT)
    print("ready", flush=True)
    conns = [server.accept()[0] for _ in range(len(KINDS) * connections)]
    end = time.monotonic() + seconds + DRAIN

    def read(conn: socket.socket) -> None:
        buf = b""
        last: float | None = None
        while (left := end - time.monotonic()) > 0:
            conn.settimeout(left)
            try:
                data = conn.recv(65536)
            except OSError:
                break
            if not data:
                break
            now = time.monotonic()
            buf += data
            while len(buf) >= FRAME.size:
                kind, _seq, sent = FRAME.unpack_from(buf)
                buf = buf[FRAME.size :]
                with lock:
                    delays[KINDS[kind]].append(now - sent)
                    if last is not None and now - last > GAP:
                        gaps[KINDS[kind]].append(now - last)
                last = now
        conn.close()

    threads = [threading.Thread(target=read, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + DRAIN + SLACK)
    print(json.dumps({"delays": delays, "gaps": gaps}), flush=True)


def send(connections: int, seconds: float, interval: float) -> None:
    """Send on every connection for ``seconds``, keep them open DRAIN seconds
    more (retransmissions still under way), then print the frames sent."""
    socks: list[tuple[int, socket.socket]] = []
    for kind in range(len(KINDS)):
        for _ in range(connections):
            s = socket.create_connection(("10.254.0.2", PORT), timeout=CONNECT_WAIT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if kind >= 1:
                s.setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)
            if kind == 2:
                s.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, 1000)
            s.setblocking(False)
            socks.append((kind, s))
    sent = dict.fromkeys(KINDS, 0)
    start = time.monotonic()
    seq = 0
    while time.monotonic() - start < seconds:
        for kind, s in socks:
            # Non-blocking: a stalled connection's frames wait in its buffer
            # (32 bytes each), never the other connections'.
            with contextlib.suppress(BlockingIOError):
                sent[KINDS[kind]] += s.send(FRAME.pack(kind, seq, time.monotonic())) // FRAME.size
        seq += 1
        time.sleep(max(0.0, start + seq * interval - time.monotonic()))  # the send schedule
    time.sleep(DRAIN)  # the receiver reads until then; nothing to wait for here
    for _, s in socks:
        s.close()
    print(json.dumps(sent), flush=True)


# -- the driver ----------------------------------------------------------------


def summary(values: list[float], gaps: list[float], sent: int) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    return {
        "frames": sent,
        "missing": sent - n,
        "p50": statistics.median(ordered) if n else 0.0,
        "p99": ordered[min(n - 1, int(0.99 * n))] if n else 0.0,
        "max": ordered[-1] if n else 0.0,
        "stalls1": sum(g > 1.0 for g in gaps),
        "stalls3": sum(g > 3.0 for g in gaps),
        "stalls6": sum(g > 6.0 for g in gaps),
    }


def measure(loss: int, connections: int, seconds: float, interval: float) -> dict[str, Any]:
    link = Link(loss)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--connections", str(connections), "--seconds", str(seconds)]
    receiver = sender = None
    try:
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", link.b, *me, "--role", "receive", *common],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "ready":
            raise RuntimeError("the receiver did not start")
        sender = subprocess.Popen(
            ["ip", "netns", "exec", link.a, *me, "--role", "send", *common]
            + ["--interval", str(interval)],
            stdout=subprocess.PIPE,
            text=True,
        )
        said, _ = sender.communicate(timeout=seconds + DRAIN + SLACK)
        sent = json.loads(said.strip().splitlines()[-1])
        out, _ = receiver.communicate(timeout=SLACK)
        got = json.loads(out.strip().splitlines()[-1])
        seen, dropped = link.counters()
        return {
            "loss": loss,
            "packets": seen,
            "dropped": dropped,
            **{k: summary(got["delays"][k], got["gaps"][k], sent[k]) for k in KINDS},
        }
    finally:
        for proc in (sender, receiver):
            if proc is not None and proc.poll() is None:
                proc.kill()  # ours, by PID
                proc.wait(10)
        link.close()


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"| loss each way | packets dropped | kind | frames | not in {DRAIN:.0f} s"
        " | median delay | p99 | max | stalls > 1 s | > 3 s | > 6 s |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        share = f"{r['dropped']:,} of {r['packets']:,}"
        for k in KINDS:
            s = r[k]
            lines.append(
                f"| {r['loss']}% | {share} | {k} | {s['frames']:,} | {s['missing']:,}"
                f" | {s['p50'] * 1000:.2f} ms"
                f" | {s['p99'] * 1000:.0f} ms | {s['max']:.2f} s | {s['stalls1']} | {s['stalls3']}"
                f" | {s['stalls6']} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", type=int, nargs="+", default=[10, 30], help="percent, each way")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--connections", type=int, default=6, help="per kind")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between frames")
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--role", choices=("receive", "send"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.role == "receive":
        receive(a.connections, a.seconds)
        return 0
    if a.role == "send":
        send(a.connections, a.seconds, a.interval)
        return 0
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print("bench_thin_streams: needs Linux and root (ip netns)", file=sys.stderr)
        return 2
    if (
        not all(0 <= x < 100 for x in a.loss)
        or min(a.seconds, a.interval) <= 0
        or a.connections < 1
    ):
        print(
            "bench_thin_streams: loss in 0-99, seconds and interval > 0, connections >= 1",
            file=sys.stderr,
        )
        return 2
    rows = []
    for loss in a.loss:
        print(f"{loss}% loss each way, {a.seconds:.0f} s ...", flush=True)
        rows.append(measure(loss, a.connections, a.seconds, a.interval))
    text = table(rows)
    command = "python benchmarks/bench_thin_streams.py " + " ".join(sys.argv[1:])
    kernel = platform.release()
    facts = (
        f"Machine: {os.cpu_count()} cores, Linux {kernel}, Python {platform.python_version()};"
        f" {len(KINDS) * a.connections} connections per level ({a.connections} of each kind),"
        " one"
        f" {FRAME.size}-byte frame every {a.interval} s on each for {a.seconds:.0f} s\n"
    )
    print()
    print(text)
    print(facts)
    if a.write_results:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        with RESULTS.open("a") as f:
            f.write(f"\n## bench_thin_streams ({stamp})\n\n{facts}\nCommand: `{command}`\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
