"""The API's listener caps open connections (meshd/api/listener.py).

A small application behind ``ApiListener`` on 127.0.0.1 with a cap of 4: idle
connections are counted from the accept on, the one over the cap gets a 503
(plain HTTP) or is closed before any TLS work, a TLS handshake that never
comes is closed after its timeout, and every ended connection is released,
so the API serves again.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshd.api.connection import HttpConnection
from meshd.api.http import Request, Response, json_response
from meshd.api.listener import ApiListener
from meshd.api.routes import Application
from tests.fakes import until, write_node_pki

CAP = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    return write_node_pki(tmp_path_factory.mktemp("pki"), "mesh.test", ("api",))


@pytest.fixture
async def serve(
    pki: dict[str, tuple[str, str, str]],
) -> AsyncIterator[Callable[..., asyncio.Future[tuple[ApiListener, int, list[str]]]]]:
    listeners: list[ApiListener] = []

    async def start(
        tls: bool = False, per_address: int = CAP, loopback_exempt: bool = True
    ) -> tuple[ApiListener, int, list[str]]:
        async def hello(request: Request) -> Response:
            return json_response({"ok": True})

        app = Application()
        app.router.add_get("/hello", hello)
        ctx = None
        if tls:
            _, cert, key = pki["api"]
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
        refused: list[str] = []
        site = ApiListener(
            app,
            "127.0.0.1",
            0,
            ssl_context=ctx,
            max_connections=CAP,
            max_per_address=per_address,
            loopback_exempt=loopback_exempt,
            handshake_timeout=0.3,
            on_refused=refused.append,
        )
        await site.start()
        listeners.append(site)
        port = site.address[1]
        return site, port, refused

    yield start  # type: ignore[misc]
    for listener in listeners:
        await listener.close()


def client_ctx(pki: dict[str, tuple[str, str, str]]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["api"][0])
    ctx.check_hostname = False
    return ctx


async def get(port: int, ctx: ssl.SSLContext | None = None) -> dict[str, bool]:
    scheme = "https" if ctx is not None else "http"
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx or False)) as session,
        session.get(f"{scheme}://127.0.0.1:{port}/hello") as resp,
    ):
        assert resp.status == 200
        return await resp.json()


async def test_plain_connections_over_the_cap_get_a_503_and_are_released(serve) -> None:
    site, port, refused = await serve()
    assert await get(port) == {"ok": True}
    await until(lambda: site.open == 0, "the client's connection released")
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: site.open == CAP, "the idle connections counted")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(reader.read(), 5)  # then EOF: closed by the agent
    assert answer.startswith(b"HTTP/1.1 503 ") and b"too many open connections" in answer
    assert refused == ["api-connections"] and site.open == CAP
    writer.close()
    for _, w in idle:
        w.close()
    await until(lambda: site.open == 0, "every connection released")
    assert site.by_address == {}
    assert await get(port) == {"ok": True}


async def test_one_address_may_hold_only_its_share(serve) -> None:
    """With the loopback exemption off (every test client is on 127.0.0.1),
    one address holds at most its share; with it on (the default), local
    clients are held only to the total."""
    site, port, refused = await serve(per_address=2, loopback_exempt=False)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await until(lambda: site.by_address == {"127.0.0.1": 2}, "two counted for the address")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 503 ")
    assert refused == ["api-connections-per-address"]
    writer.close()
    for _, w in idle:
        w.close()
    await until(lambda: site.open == 0 and site.by_address == {}, "released")

    site, port, refused = await serve(per_address=2)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: site.open == CAP, "loopback held only to the total")
    assert refused == []
    for _, w in idle:
        w.close()
    await until(lambda: site.open == 0, "released")


async def test_tls_over_the_cap_is_closed_before_a_handshake(serve, pki) -> None:
    site, port, refused = await serve(tls=True)
    assert await get(port, client_ctx(pki)) == {"ok": True}
    await until(lambda: site.open == 0, "the client's connection released")
    # Connections that never say hello hold a slot only until the timeout.
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: site.open == CAP, "the silent connections counted")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki))
    assert refused == ["api-connections"]
    await until(lambda: site.open == 0, "the silent connections closed after the handshake timeout")
    for reader, writer in idle:
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert await get(port, client_ctx(pki)) == {"ok": True}
    await until(lambda: site.open == 0, "released again")


async def test_a_failed_tls_handshake_is_released(serve, tmp_path: Path) -> None:
    site, port, refused = await serve(tls=True)
    # A client that trusts nobody aborts the handshake itself.
    untrusting = ssl.create_default_context()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", port, ssl=untrusting)
    await until(lambda: site.open == 0, "the failed handshake released")
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP on a TLS port
    await writer.drain()
    writer.close()
    await until(lambda: site.open == 0, "the plain client released")
    assert refused == []


@pytest.mark.parametrize("hard", [4096, 20000])
def test_the_agent_raises_its_open_files_limit_to_the_hard_one(hard: int) -> None:
    """A soft limit of 256 would fail accepts long before the caps; the agent
    takes the hard limit at start, and warns when even that is below what
    its caps may take (FDS_NEEDED)."""
    import resource
    import subprocess
    import sys

    from meshd.agent.run import FDS_NEEDED

    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < hard:
        pytest.skip(f"this machine's hard open-files limit is below {hard}")

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    code = (
        "import resource\n"
        "from meshd.agent.run import _raise_open_files_limit\n"
        "_raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lower,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == hard
    assert ("below the" in done.stderr) == (hard < FDS_NEEDED), done.stderr


async def test_requests_sent_with_the_handshake_are_all_answered(serve, pki, monkeypatch) -> None:
    """A TLS client's first requests can arrive with the end of its handshake,
    before the listener hands the connection to its HTTP handler: none is lost."""
    site, port, _ = await serve(tls=True)
    calls: list[str] = []
    for name in ("connection_made", "data_received"):
        method = getattr(HttpConnection, name)

        def record(self: HttpConnection, *args: Any, _name: str = name, _m: Any = method) -> Any:
            calls.append(_name)
            return _m(self, *args)

        monkeypatch.setattr(HttpConnection, name, record)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki))
    request = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(request * 199 + b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.count(b"HTTP/1.1 200 OK") == 200
    # The order a protocol is told: the connection, then its data.
    assert calls[0] == "connection_made" and "data_received" in calls
    writer.close()
    await until(lambda: site.open == 0, "released")
