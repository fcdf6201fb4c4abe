"""Shared helpers for the benchmarks: real ``meshd agent`` processes, /proc readings.

Copied in spirit from ``tests/agents.py`` (which others edit), trimmed to what the
benchmarks need.  Everything talks to 127.0.0.1 only, every wait is bounded, and
only processes started here are ever signalled, by their own PID.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

READY = re.compile(r"meshd agent ready api=(http://\S+) gossip=(\S+)")
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def meshd_cmd() -> list[str]:
    exe = shutil.which("meshd")
    return [exe] if exe else [sys.executable, "-m", "meshd.cli"]


def run_meshd(*args: str) -> None:
    proc = subprocess.run(
        [*meshd_cmd(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"meshd {' '.join(args)} failed: {proc.stderr.strip()}")


def wait_until(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll ``pred`` until truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} ({last})")


def http_json(url: str, method: str = "GET", body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


class Proc:
    """A child process whose stderr is pumped into ``lines`` by a daemon thread."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        ready: re.Pattern[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready_re = ready
        #: The child's environment (ours when None) and working directory.
        self.env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.cwd = cwd
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.match: re.Match[str] | None = None
        self._ready = threading.Event()
        self._termed = False

    def launch(self) -> Proc:
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd=self.cwd,
        )
        threading.Thread(target=self._pump, args=(self.proc.stderr,), daemon=True).start()
        return self

    def _pump(self, stream: Any) -> None:
        for line in stream:
            if len(self.lines) < 2000:  # bounded: only the start and errors matter
                self.lines.append(line.rstrip("\n"))
            if self.match is None:
                m = self.ready_re.search(line)
                if m:
                    self.match = m
                    self._ready.set()

    def wait_ready(self, timeout: float) -> Proc:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.lines[-20:])
                raise RuntimeError(f"{self.name} did not become ready:\n{tail}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self) -> None:
        """Send SIGTERM once, to this process's own PID, if it still runs."""
        if self.proc is not None and self.proc.poll() is None and not self._termed:
            self._termed = True
            self.proc.send_signal(signal.SIGTERM)

    def reap(self, timeout: float = 15.0) -> int | None:
        """Wait (bounded) for the exit; SIGKILL the process if it will not go."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        return self.proc.returncode

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (once) and wait.  A second SIGTERM could land after the
        process has restored the default handler on its way out, and kill it."""
        self.terminate()
        return self.reap(timeout)


class Agent(Proc):
    def __init__(self, name: str, args: Sequence[str]) -> None:
        super().__init__(name, [*meshd_cmd(), "agent", *args], READY)

    @property
    def api(self) -> str:
        assert self.match is not None
        return self.match.group(1)

    @property
    def gossip(self) -> str:
        assert self.match is not None
        return self.match.group(2)


def stop_all(procs: Sequence[Proc], timeout: float = 15.0) -> None:
    """SIGTERM every process once, then wait for each (bounded)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.reap(timeout)
        except Exception as exc:  # keep stopping the others
            print(f"warning: stopping {p.name} (pid {p.proc and p.proc.pid}): {exc}")


# -- /proc readings -------------------------------------------------------------


def cpu_ticks(pid: int) -> int:
    """utime + stime of ``pid`` in clock ticks."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the name may hold spaces
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def socket_count(pid: int) -> int:
    """Open sockets of ``pid`` (TCP listeners and connections, Unix sockets)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed between listdir and readlink
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                n += 1
    return n


# -- statistics and reporting ---------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan when empty)."""
    if not sorted_values:
        return float("nan")
    k = math.ceil(q / 100.0 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def machine_line() -> str:
    mem_gib = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    try:
        import aiohttp

        aio = aiohttp.__version__
    except ImportError:  # pragma: no cover
        aio = "?"
    return (
        f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {mem_gib:.0f} GiB RAM, "
        f"Python {platform.python_version()}, aiohttp {aio}, {platform.system()} "
        f"{platform.release()}"
    )


def code_version() -> str:
    """The commit under test, and whether meshd/ differs from it (others edit it)."""
    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", "--format=%h %cd", "--date=iso"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "meshd"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return f"commit {head}" + (f", plus {len(dirty)} changed file(s) under meshd/" if dirty else "")


def append_results(title: str, command: str, body: str) -> None:
    stamp = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = (
        f"\n## {title} ({stamp})\n\n"
        f"Machine: {machine_line()}\n\n"
        f"Code: {code_version()}\n\n"
        f"Command: `{command}`\n\n"
        f"{body.rstrip()}\n"
    )
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n")
    with RESULTS.open("a") as fh:
        fh.write(section)
    print(f"appended to {RESULTS}")
