"""Tests for meshd.agent.checks: TTL, HTTP and TCP checks against loopback servers.

No sleeps as synchronisation: each test waits for the status callback (or a
server-side event) with a 5 s ceiling; TTLs and intervals are short so the
real timers fire quickly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp import web

from meshd.agent.checks import (
    CheckRunner,
    http_status_to_health,
    parse_host_port,
    probe_timeout,
    validate_spec,
)
from meshd.agent.interface import CheckSpec

WAIT = 5.0


class Recorder:
    """The on_status callback: records calls and lets a test await a given one."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, instance: str, status: str) -> None:
        self.calls.append((instance, status))
        self._changed.set()

    async def wait_for(self, instance: str, status: str) -> None:
        """Until the latest reported status of ``instance`` is ``status``."""

        async def until() -> None:
            while self.latest(instance) != status:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), timeout=WAIT)

    def latest(self, instance: str) -> str | None:
        for i, s in reversed(self.calls):
            if i == instance:
                return s
        return None


@pytest.fixture
async def rec_runner() -> AsyncIterator[tuple[Recorder, CheckRunner]]:
    rec = Recorder()
    runner = CheckRunner(rec)
    yield rec, runner
    await runner.stop_all()


class App:
    """An aiohttp app on 127.0.0.1 whose answer code the test switches."""

    def __init__(self) -> None:
        self.code = 200
        self.hits = 0
        self.hit = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.hit.set()
        return web.Response(status=self.code, text="ok")

    async def wait_hits(self, n: int) -> None:
        async def until() -> None:
            while self.hits < n:
                self.hit.clear()
                await self.hit.wait()

        await asyncio.wait_for(until(), timeout=WAIT)


@pytest.fixture
async def http_app() -> AsyncIterator[tuple[App, str]]:
    app = App()
    web_app = web.Application()
    web_app.router.add_get("/health", app.handle)
    runner = web.AppRunner(web_app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield app, f"http://127.0.0.1:{port}/health"
    await runner.cleanup()


# ---------------------------------------------------------------------------
# Pure helpers


def test_http_status_mapping() -> None:
    assert [http_status_to_health(c) for c in (200, 204, 299)] == ["passing"] * 3
    assert http_status_to_health(429) == "warning"
    assert [http_status_to_health(c) for c in (199, 301, 404, 500, 503)] == ["critical"] * 5


def test_probe_timeout_is_capped() -> None:
    assert probe_timeout(0.2) == 0.2
    assert probe_timeout(5) == 5
    assert probe_timeout(60) == 10


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:80") == ("127.0.0.1", 80)
    assert parse_host_port("[::1]:8080") == ("::1", 8080)
    assert parse_host_port("db.internal:5432") == ("db.internal", 5432)
    for bad in ("nohost", ":80", "h:", "h:0", "h:65536", "h:x"):
        with pytest.raises(ValueError):
            parse_host_port(bad)


@pytest.mark.parametrize(
    "spec",
    [
        CheckSpec(kind="ttl"),
        CheckSpec(kind="ttl", ttl=-1),
        CheckSpec(kind="ttl", ttl=float("nan")),
        CheckSpec(kind="http", target="http://x/"),
        CheckSpec(kind="http", target="not a url", interval=1),
        CheckSpec(kind="tcp", target="x", interval=1),
        CheckSpec(kind="udp", target="x:1", interval=1),  # type: ignore[arg-type]
    ],
)
def test_validate_spec_rejects(spec: CheckSpec) -> None:
    with pytest.raises(ValueError):
        validate_spec(spec)


# ---------------------------------------------------------------------------
# TTL


async def test_ttl_starts_critical_passes_on_report_and_expires(rec_runner) -> None:
    rec, runner = rec_runner
    assert runner.start("a", CheckSpec(kind="ttl", ttl=0.2)) == "critical"
    assert runner.status("a") == "critical"
    assert runner.report_ttl("a", "passing") is True
    assert runner.status("a") == "passing"
    assert rec.calls == [("a", "passing")]
    await rec.wait_for("a", "critical")  # no report within the TTL
    assert rec.calls == [("a", "passing"), ("a", "critical")]
    assert "TTL" in (runner.output("a") or "")


async def test_ttl_initial_status_is_honoured_and_expires(rec_runner) -> None:
    rec, runner = rec_runner
    assert runner.start("a", CheckSpec(kind="ttl", ttl=0.2), initial="passing") == "passing"
    assert rec.calls == []  # the initial status is the caller's, not a change
    await rec.wait_for("a", "critical")


async def test_ttl_report_rearms_deadline(rec_runner) -> None:
    rec, runner = rec_runner
    runner.start("a", CheckSpec(kind="ttl", ttl=0.3))
    runner.report_ttl("a", "passing")
    # Reports repeated well within the TTL keep it passing; each waits on a real
    # TTL-independent event (another instance's short TTL expiring) rather than a sleep.
    for n in range(3):
        runner.start(f"tick{n}", CheckSpec(kind="ttl", ttl=0.1), initial="passing")
        await rec.wait_for(f"tick{n}", "critical")
        assert runner.report_ttl("a", "passing") is True
        assert runner.status("a") == "passing"
    assert ("a", "critical") not in rec.calls
    await rec.wait_for("a", "critical")


async def test_on_status_only_on_change(rec_runner) -> None:
    rec, runner = rec_runner
    runner.start("a", CheckSpec(kind="ttl", ttl=30))
    for status in ("passing", "passing", "warning", "warning", "passing", "critical", "critical"):
        runner.report_ttl("a", status)
    assert rec.calls == [("a", "passing"), ("a", "warning"), ("a", "passing"), ("a", "critical")]


async def test_report_ttl_unknown_or_not_ttl(rec_runner, http_app) -> None:
    rec, runner = rec_runner
    _, url = http_app
    assert runner.report_ttl("ghost", "passing") is False
    runner.start("h", CheckSpec(kind="http", target=url, interval=5))
    assert runner.report_ttl("h", "critical") is False
    runner.start("t", CheckSpec(kind="ttl", ttl=30))
    with pytest.raises(ValueError):
        runner.report_ttl("t", "sick")


async def test_restart_keeps_status_unless_initial_given(rec_runner) -> None:
    rec, runner = rec_runner
    runner.start("a", CheckSpec(kind="ttl", ttl=30))
    runner.report_ttl("a", "passing")
    assert runner.start("a", CheckSpec(kind="ttl", ttl=60)) == "passing"
    assert runner.start("a", CheckSpec(kind="ttl", ttl=60), initial="warning") == "warning"
    assert rec.calls == [("a", "passing")]


async def test_stop_forgets_and_silences(rec_runner) -> None:
    rec, runner = rec_runner
    runner.start("a", CheckSpec(kind="ttl", ttl=0.1), initial="passing")
    runner.start("b", CheckSpec(kind="ttl", ttl=0.2), initial="passing")
    runner.stop("a")
    runner.stop("never-started")
    assert runner.status("a") is None
    assert runner.report_ttl("a", "passing") is False
    await rec.wait_for("b", "critical")  # b's longer TTL passed, so a's would have too
    assert rec.calls == [("b", "critical")]


# ---------------------------------------------------------------------------
# HTTP


async def test_http_check_follows_the_server(rec_runner, http_app) -> None:
    rec, runner = rec_runner
    app, url = http_app
    assert runner.start("h", CheckSpec(kind="http", target=url, interval=0.2)) == "critical"
    await rec.wait_for("h", "passing")  # the first probe runs at once
    app.code = 500
    await rec.wait_for("h", "critical")
    app.code = 429
    await rec.wait_for("h", "warning")
    app.code = 200
    await rec.wait_for("h", "passing")
    assert rec.calls == [("h", "passing"), ("h", "critical"), ("h", "warning"), ("h", "passing")]


async def test_http_repeated_results_call_back_once(rec_runner, http_app) -> None:
    rec, runner = rec_runner
    app, url = http_app
    runner.start("h", CheckSpec(kind="http", target=url, interval=0.1))
    await app.wait_hits(4)
    await rec.wait_for("h", "passing")
    assert rec.calls == [("h", "passing")]


async def test_http_connection_refused_is_critical(rec_runner) -> None:
    rec, runner = rec_runner
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    runner.start(
        "h",
        CheckSpec(kind="http", target=f"http://127.0.0.1:{port}/", interval=5),
        initial="passing",
    )
    await rec.wait_for("h", "critical")


async def test_http_timeout_is_critical(rec_runner) -> None:
    rec, runner = rec_runner
    release = asyncio.Event()
    handlers: list[asyncio.Task[object]] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await release.wait()  # accept, then never answer
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        runner.start(
            "h",
            CheckSpec(kind="http", target=f"http://127.0.0.1:{port}/", interval=0.2),
            initial="passing",
        )
        await rec.wait_for("h", "critical")
        assert "timed out" in (runner.output("h") or "")
    finally:
        # Stop probing first, then let every accepted connection close, so no
        # socket outlives the test (Python 3.11's wait_closed does not wait
        # for connection handlers).
        await runner.stop_all()
        server.close()
        await server.wait_closed()
        release.set()
        await asyncio.gather(*handlers, return_exceptions=True)


class ExplodingSession:
    """Stands in for aiohttp.ClientSession: every request raises a surprise."""

    def __init__(self) -> None:
        self.calls = 0
        self.closed = False
        self.called = asyncio.Event()

    def get(self, url: str, **kw: object) -> object:
        self.calls += 1
        self.called.set()
        raise RuntimeError("boom")

    async def close(self) -> None:
        self.closed = True


async def test_probe_exception_is_critical_and_the_check_keeps_running() -> None:
    rec = Recorder()
    session = ExplodingSession()
    factory: Callable[[], aiohttp.ClientSession] = lambda: session  # type: ignore[assignment,return-value]  # noqa: E731
    runner = CheckRunner(rec, session_factory=factory)
    runner.start(
        "h", CheckSpec(kind="http", target="http://127.0.0.1:9/", interval=0.05), initial="passing"
    )
    await rec.wait_for("h", "critical")
    assert "RuntimeError" in (runner.output("h") or "")

    async def two_calls() -> None:
        while session.calls < 2:
            session.called.clear()
            await session.called.wait()

    await asyncio.wait_for(two_calls(), WAIT)  # the task survived the exception
    await runner.stop_all()
    assert session.closed  # the runner owns the session the factory made


async def test_callback_exception_does_not_stop_checking(http_app) -> None:
    app, url = http_app
    seen: list[str] = []
    second = asyncio.Event()

    def bad_callback(instance: str, status: str) -> None:
        seen.append(status)
        if len(seen) == 2:
            second.set()
        raise RuntimeError("agent bug")

    runner = CheckRunner(bad_callback)
    try:
        runner.start("h", CheckSpec(kind="http", target=url, interval=0.1))
        await app.wait_hits(1)
        app.code = 503
        await asyncio.wait_for(second.wait(), WAIT)
        assert seen == ["passing", "critical"]
    finally:
        await runner.stop_all()


# ---------------------------------------------------------------------------
# TCP


async def test_tcp_passing_then_critical_after_close(rec_runner) -> None:
    rec, runner = rec_runner
    accepted = asyncio.Event()

    def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    runner.start("t", CheckSpec(kind="tcp", target=f"127.0.0.1:{port}", interval=0.2))
    await rec.wait_for("t", "passing")
    await asyncio.wait_for(accepted.wait(), WAIT)
    server.close()
    await server.wait_closed()
    await rec.wait_for("t", "critical")
    assert rec.calls == [("t", "passing"), ("t", "critical")]


# ---------------------------------------------------------------------------
# Shutdown


async def test_stop_all_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    app = App()
    web_app = web.Application()
    web_app.router.add_get("/health", app.handle)
    site_runner = web.AppRunner(web_app)
    await site_runner.setup()
    site = web.TCPSite(site_runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site_runner.addresses[0][1]}/health"
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    rec = Recorder()
    runner = CheckRunner(rec)
    runner.start("h", CheckSpec(kind="http", target=url, interval=0.1))
    runner.start("t", CheckSpec(kind="tcp", target=f"127.0.0.1:{port}", interval=0.1))
    runner.start("x", CheckSpec(kind="ttl", ttl=0.1))
    runner.start("gone", CheckSpec(kind="tcp", target=f"127.0.0.1:{port}", interval=0.1))
    runner.stop("gone")  # stopped earlier: its task must be awaited too
    await rec.wait_for("h", "passing")
    await rec.wait_for("t", "passing")
    await runner.stop_all()

    # Nothing of the runner's is left, at once, before the servers go away...
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("meshd-check-")] == []
    assert runner.status("h") is None and runner.status("x") is None
    assert runner._session is None
    with pytest.raises(RuntimeError):
        runner.start("h", CheckSpec(kind="ttl", ttl=1))
    # ...and once the test's own servers are shut, no task at all.
    server.close()
    await server.wait_closed()
    await site_runner.cleanup()
    assert asyncio.all_tasks() - before == set()
