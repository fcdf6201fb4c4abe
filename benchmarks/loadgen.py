"""HTTP load generator for bench_lookup, run as its own process.

``python benchmarks/loadgen.py URL --apps N --mode closed|open [--seconds S]
[--concurrency C] [--rate R] [--warmup W] [--server-pid PID]`` GETs ``URL/v1/resolve/app-NNN`` for
random apps and prints one JSON object with the results on stdout.

* closed: ``C`` workers, each sending its next request as soon as the previous
  one is answered, for ``S`` seconds: the maximum throughput.
* open: requests are *scheduled* at a fixed rate ``R`` (request i at
  ``start + i/R``), whether or not earlier ones were answered, ``R*S`` requests
  in all.  Latency is reported twice: from the scheduled time (includes any
  queueing in the client, so a stalled server cannot hide behind a slow
  client: no coordinated omission) and from the moment the request was handed
  to aiohttp.

With ``--server-pid`` it also reads that process's CPU time (utime+stime from
/proc) over exactly the measured window, warm-up excluded.

Only 127.0.0.1 is a sensible target; every loop is bounded by count and time,
and every request by a 10 s timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from typing import Any

import aiohttp
import yarl

REQUEST_TIMEOUT = 10.0
#: After the last open-loop request is scheduled, wait at most this long for answers.
DRAIN_SECONDS = 15.0
#: Per-worker ceiling in closed mode; the time limit is what normally ends a run.
MAX_PER_WORKER = 2_000_000


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
        result["client_cpu_s"] = _cpu() - cpu0
        if args.server_pid:
            srv = _server_cpu(args.server_pid) - srv0
            result["server_cpu_s"] = srv
            result["server_cpu_pct"] = 100.0 * srv / (time.perf_counter() - t0)
            done = result["requests"] + result["errors"]
            result["server_us_per_req"] = 1e6 * srv / done if done else float("nan")
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
    args = parser.parse_args()
    if not (0 < args.seconds <= 600 and 0 < args.rate <= 100_000 and args.concurrency >= 1):
        parser.error("--seconds must be in (0, 600], --rate in (0, 100000], --concurrency >= 1")
    json.dump(asyncio.run(run(args)), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
