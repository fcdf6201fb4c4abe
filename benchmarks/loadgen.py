"""HTTP load generator for bench_lookup, run as its own process.

``python benchmarks/loadgen.py URL --apps N --mode closed|open [--seconds S]
[--concurrency C] [--rate R] [--warmup W] [--server-pid PID] [--client socket|aiohttp]``
GETs ``URL/v1/resolve/app-NNN`` for random apps and prints one JSON object with
the results on stdout.

* closed: ``C`` connections, each sending its next request as soon as the
  previous one is answered, for ``S`` seconds: the maximum throughput.
* open: requests are *scheduled* at a fixed rate ``R`` (request i at
  ``start + i/R``), whether or not earlier ones were answered, ``R*S`` requests
  in all, over at most ``C`` connections.  Latency is reported twice: from the
  scheduled time (includes any queueing in the client, so a stalled server
  cannot hide behind a slow client: no coordinated omission) and from the
  moment the request was written.

Two clients, the same for every target of a run:

* ``socket`` (the default): one thread, non-blocking sockets and
  ``select.select`` (microsecond timeouts; epoll's are whole milliseconds, which
  would add up to 1 ms of dispatch lag to every open-loop request), one
  precomputed request per app, HTTP/1.1 keep-alive, answers framed by
  Content-Length.  It costs the machine about a fifth of what aiohttp's client
  does per request, so on 2 cores the server, not the client, is what a closed
  loop saturates, and an open loop's p99 is the server's, not the client's
  event loop's (see benchmarks/RESULTS.md: asyncio clients saw 7-57 ms p99
  against a canned-bytes server).
* ``aiohttp``: an aiohttp ClientSession (``TCPConnector(limit=C)``), kept for
  comparison with earlier runs.

With ``--server-pid`` it also reads that process's CPU time (utime+stime from
/proc) over exactly the measured window, warm-up excluded.

Only 127.0.0.1 is a sensible target; every loop is bounded by count and time,
every request by a 10 s timeout and every answer by MAX_ANSWER_BYTES.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import random
import resource
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yarl

REQUEST_TIMEOUT = 10.0
#: After the last open-loop request is scheduled, wait at most this long for answers.
DRAIN_SECONDS = 15.0
#: Per-worker ceiling in closed mode; the time limit is what normally ends a run.
MAX_PER_WORKER = 2_000_000
#: Largest answer (head and body) the socket client accepts; a resolve answer
#: of 1,000 instances is well under it.
MAX_ANSWER_BYTES = 4 << 20


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = max(0, min(len(values) - 1, -(-len(values) * q // 100) - 1))
    return values[int(k)]


def _server_cpu(pid: int) -> float:
    """utime+stime of the server process in seconds (0 when no PID was given)."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as fh:
        raw = fh.read()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _get(session: aiohttp.ClientSession, url: yarl.URL) -> bool:
    try:
        async with session.get(url) as resp:
            await resp.read()
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def closed_loop(
    session: aiohttp.ClientSession,
    urls: list[yarl.URL],
    seconds: float,
    concurrency: int,
    seed: int,
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        rnd = random.Random(seed * 1000 + w)
        for _ in range(MAX_PER_WORKER):
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            ok = await _get(session, urls[rnd.randrange(len(urls))])
            if ok:
                lat.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "requests": len(lat),
        "errors": errors,
        "elapsed": elapsed,
        "rps": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50) * 1e3,
        "p90_ms": _pct(lat, 90) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
    }


async def open_loop(
    session: aiohttp.ClientSession, urls: list[yarl.URL], seconds: float, rate: float, seed: int
) -> dict[str, Any]:
    rnd = random.Random(seed)
    total = int(rate * seconds)
    from_schedule: list[float] = []
    from_send: list[float] = []
    errors = 0
    max_lag = 0.0

    async def one(url: yarl.URL, scheduled: float) -> None:
        nonlocal errors
        sent = time.perf_counter()
        ok = await _get(session, url)
        done = time.perf_counter()
        if ok:
            from_schedule.append(done - scheduled)
            from_send.append(done - sent)
        else:
            errors += 1

    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter() + 0.01
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_lag = max(max_lag, -delay)
        task = asyncio.create_task(one(urls[rnd.randrange(len(urls))], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    dispatched = time.perf_counter()
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=DRAIN_SECONDS)
        for task in pending:
            task.cancel()
        errors += len(pending)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(from_schedule),
        "errors": errors,
        "elapsed": elapsed,
        "offered_rps": total / (dispatched - start) if dispatched > start else float("nan"),
        "rps": len(from_schedule) / elapsed,
        "p50_ms": _pct(from_schedule, 50) * 1e3,
        "p90_ms": _pct(from_schedule, 90) * 1e3,
        "p99_ms": _pct(from_schedule, 99) * 1e3,
        "p50_send_ms": _pct(from_send, 50) * 1e3,
        "p99_send_ms": _pct(from_send, 99) * 1e3,
        "max_dispatch_lag_ms": max_lag * 1e3,
    }


class _Conn:
    """One keep-alive connection of the socket client, at most one request in flight."""

    __slots__ = ("sock", "buf", "need", "ok", "scheduled", "sent")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        #: Total bytes of the answer in flight once its head is parsed, else -1.
        self.need = -1
        self.ok = False
        #: When the request in flight was due (open loop) and written; 0.0 when idle.
        self.scheduled = 0.0
        self.sent = 0.0


class SocketClient:
    """A minimal HTTP/1.1 client over non-blocking sockets, driven by ``select``.

    Not a general client: GET only, answers must carry Content-Length (every
    target here does), no pipelining.  Anything else (a refused connection, a
    reset, a malformed or oversized answer, a timeout) counts as one error and
    replaces the connection.
    """

    def __init__(self, url: str, apps: int, connections: int) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise SystemExit(f"the socket client needs http://HOST:PORT, not {url!r}")
        self.addr = (parts.hostname, parts.port)
        host = f"{parts.hostname}:{parts.port}".encode()
        base = parts.path.rstrip("/").encode()
        self.requests = [
            b"GET %s/v1/resolve/app-%03d HTTP/1.1\r\nHost: %s\r\n\r\n" % (base, a, host)
            for a in range(apps)
        ]
        self.conns: dict[int, _Conn] = {}
        for _ in range(connections):
            self._open()
        self.errors = 0

    def _open(self) -> _Conn:
        sock = socket.create_connection(self.addr, timeout=REQUEST_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        return conn

    def _replace(self, conn: _Conn) -> _Conn:
        """Count an error and swap ``conn`` for a fresh connection (same pool size)."""
        self.errors += 1
        del self.conns[conn.sock.fileno()]
        conn.sock.close()
        return self._open()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.sock.close()
        self.conns.clear()

    def send(self, conn: _Conn, app: int, scheduled: float) -> None:
        conn.sent = time.perf_counter()
        conn.scheduled = scheduled or conn.sent
        try:
            # A request is under 100 bytes and the socket idle: it fits the send
            # buffer whole, and anything less is a broken connection.
            if conn.sock.send(self.requests[app]) == len(self.requests[app]):
                return
        except OSError:
            pass
        self._replace(conn)

    def receive(self, conn: _Conn) -> bool | None:
        """Read what ``conn`` has; True/False once a whole answer is in (200 or not),
        None while it is incomplete, and None after replacing a broken connection."""
        try:
            data = conn.sock.recv(262144)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:  # closed or reset by the server
            self._replace(conn)
            return None
        buf = conn.buf
        buf += data
        if conn.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._replace(conn)
                return None
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._replace(conn)
                return None
            line_end = head.find(b"\r\n", at + 2)
            value = head[at + 17 : line_end if line_end >= 0 else len(head)]
            try:
                length = int(value.strip())
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_ANSWER_BYTES:
                self._replace(conn)
                return None
            conn.need = end + 4 + length
            conn.ok = head.startswith(b"http/1.1 200 ")
        if len(buf) < conn.need:
            return None
        if len(buf) > conn.need:  # bytes nobody asked for: not a sane server
            self._replace(conn)
            return None
        ok = conn.ok
        conn.buf = bytearray()
        conn.need = -1
        conn.scheduled = 0.0
        return ok

    def expire(self, now: float) -> None:
        """Replace every connection whose request has waited past REQUEST_TIMEOUT."""
        for conn in list(self.conns.values()):
            if conn.scheduled and now - conn.sent > REQUEST_TIMEOUT:
                self._replace(conn)

    def ready(self, timeout: float) -> list[_Conn]:
        busy = [fd for fd, conn in self.conns.items() if conn.scheduled]
        if not busy:
            if timeout > 0:
                time.sleep(timeout)
            return []
        readable, _, _ = select.select(busy, [], [], max(0.0, timeout))
        return [self.conns[fd] for fd in readable]


def sock_closed_loop(client: SocketClient, seconds: float, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    lat: list[float] = []
    errors0 = client.errors
    start = time.perf_counter()
    deadline = start + seconds
    for conn in list(client.conns.values()):
        client.send(conn, rnd.randrange(len(client.requests)), 0.0)
    now = start
    seen_errors = client.errors
    drain_until = deadline + REQUEST_TIMEOUT
    while now < drain_until:
        if now >= deadline and not any(c.scheduled for c in client.conns.values()):
            break
        for conn in client.ready(min(0.05, drain_until - now)):
            sent = conn.sent
            ok = client.receive(conn)
            if ok is None:
                continue
            now = time.perf_counter()
            if ok:
                lat.append(now - sent)
            else:
                client.errors += 1
            if now < deadline:
                client.send(conn, rnd.randrange(len(client.requests)), 0.0)
        now = time.perf_counter()
        client.expire(now)
        if client.errors != seen_errors and now < deadline:
            # Replaced connections start idle; keep every one busy.
            seen_errors = client.errors
            for conn in list(client.conns.values()):
                if not conn.scheduled:
                    client.send(conn, rnd.randrange(len(client.requests)), 0.0)
    elapsed = time.perf_counter() - start
    return {
        "requests": len(lat),
        "errors": client.errors - errors0,
        "elapsed": elapsed,
        "rps": len(lat) / elapsed,
        "p50_ms": _pct(lat, 50) * 1e3,
        "p90_ms": _pct(lat, 90) * 1e3,
        "p99_ms": _pct(lat, 99) * 1e3,
    }


def sock_open_loop(client: SocketClient, seconds: float, rate: float, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    total = int(rate * seconds)
    from_schedule: list[float] = []
    from_send: list[float] = []
    errors0 = client.errors
    waiting: collections.deque[tuple[int, float]] = collections.deque()
    max_lag = 0.0
    start = time.perf_counter() + 0.01
    i = 0
    dispatched = start
    drain_until = float("inf")
    while True:
        now = time.perf_counter()
        while i < total and start + i / rate <= now:
            scheduled = start + i / rate
            max_lag = max(max_lag, now - scheduled)
            waiting.append((rnd.randrange(len(client.requests)), scheduled))
            i += 1
            if i == total:
                dispatched = now
                drain_until = now + DRAIN_SECONDS
        if waiting:
            for conn in list(client.conns.values()):
                if not waiting:
                    break
                if not conn.scheduled:
                    app, scheduled = waiting.popleft()
                    client.send(conn, app, scheduled)
        busy = any(c.scheduled for c in client.conns.values())
        if i == total and not busy and not waiting:
            break
        if now >= drain_until:
            client.errors += len(waiting) + sum(1 for c in client.conns.values() if c.scheduled)
            break
        wake = start + i / rate if i < total else drain_until
        for conn in client.ready(min(wake - time.perf_counter(), 0.05)):
            scheduled, sent = conn.scheduled, conn.sent
            ok = client.receive(conn)
            if ok is None:
                continue
            done = time.perf_counter()
            if ok:
                from_schedule.append(done - scheduled)
                from_send.append(done - sent)
            else:
                client.errors += 1
        client.expire(time.perf_counter())
    elapsed = time.perf_counter() - start
    return {
        "requests": len(from_schedule),
        "errors": client.errors - errors0,
        "elapsed": elapsed,
        "offered_rps": total / (dispatched - start) if dispatched > start else float("nan"),
        "rps": len(from_schedule) / elapsed,
        "p50_ms": _pct(from_schedule, 50) * 1e3,
        "p90_ms": _pct(from_schedule, 90) * 1e3,
        "p99_ms": _pct(from_schedule, 99) * 1e3,
        "p50_send_ms": _pct(from_send, 50) * 1e3,
        "p99_send_ms": _pct(from_send, 99) * 1e3,
        "max_dispatch_lag_ms": max_lag * 1e3,
    }


def run_socket(args: argparse.Namespace) -> dict[str, Any]:
    client = SocketClient(args.url, args.apps, args.concurrency)
    # The client's own pauses would show up as the server's latency; what it
    # allocates per request is acyclic, so reference counting frees it all.
    gc.disable()
    try:
        if args.warmup > 0:  # warm the server's caches (connections are open already)
            sock_closed_loop(client, args.warmup, args.seed + 7)
        client.errors = 0
        cpu0, srv0, t0 = _cpu(), _server_cpu(args.server_pid), time.perf_counter()
        if args.mode == "closed":
            result = sock_closed_loop(client, args.seconds, args.seed)
        else:
            result = sock_open_loop(client, args.seconds, args.rate, args.seed)
        _measured(result, args, cpu0, srv0, t0)
    finally:
        gc.enable()
        client.close()
    result["mode"] = args.mode
    return result


def _measured(
    result: dict[str, Any], args: argparse.Namespace, cpu0: float, srv0: float, t0: float
) -> None:
    """Add the client's and the server's CPU time over the measured window."""
    result["client_cpu_s"] = _cpu() - cpu0
    if args.server_pid:
        srv = _server_cpu(args.server_pid) - srv0
        result["server_cpu_s"] = srv
        result["server_cpu_pct"] = 100.0 * srv / (time.perf_counter() - t0)
        done = result["requests"] + result["errors"]
        result["server_us_per_req"] = 1e6 * srv / done if done else float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    base = args.url.rstrip("/")
    # URLs parsed once (yarl), no cookie jar: keep the client's own cost per
    # request down, since it shares the machine's two cores with the server.
    urls = [yarl.URL(f"{base}/v1/resolve/app-{a:03d}") for a in range(args.apps)]
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    ) as session:
        if args.warmup > 0:  # open the connections and warm the server's caches
            await closed_loop(session, urls, args.warmup, args.concurrency, args.seed + 7)
        cpu0, srv0, t0 = _cpu(), _server_cpu(args.server_pid), time.perf_counter()
        if args.mode == "closed":
            result = await closed_loop(session, urls, args.seconds, args.concurrency, args.seed)
        else:
            result = await open_loop(session, urls, args.seconds, args.rate, args.seed)
        _measured(result, args, cpu0, srv0, t0)
    result["mode"] = args.mode
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:7700")
    parser.add_argument("--apps", type=int, default=100)
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--server-pid", type=int, default=0, help="read this PID's CPU time over the run"
    )
    parser.add_argument("--client", choices=("socket", "aiohttp"), default="socket")
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 0 < args.rate <= 100_000 and args.concurrency >= 1):
        parser.error("--seconds must be in (0, 600], --rate in (0, 100000], --concurrency >= 1")
    if args.client == "socket":
        if args.concurrency > 512:
            parser.error("the socket client uses select(): --concurrency at most 512")
        result = run_socket(args)
    else:
        result = asyncio.run(run(args))
    result["client"] = args.client
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
