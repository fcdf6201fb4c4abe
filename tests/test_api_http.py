"""The API's own HTTP/1.1 server (meshd/api/http.py, routes.py, connection.py).

Requests and routes are checked as values; connections over real loopback
sockets with raw bytes, as a hostile or merely unusual client sends them:
malformed framing, oversized targets, headers and bodies, chunked bodies,
``Expect: 100-continue``, pipelining, HTTP/1.0, HEAD, upgrades, slow and
idle clients.  Each refusal is one sentence and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
from collections.abc import AsyncIterator, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.api import connection
from meshd.api.app import BLOCKING_KEY, create_app
from meshd.api.connection import MAX_HEADERS, MAX_TARGET_BYTES, http_date
from meshd.api.http import Headers, HTTPError, Query, Request, Response, json_response
from meshd.api.listener import ApiListener
from meshd.api.routes import Application, Route
from tests.fakes import FakeAgent, until

Serve = Callable[..., "asyncio.Future[tuple[ApiListener, int]]"]


# ---------------------------------------------------------------------------
# Values: queries, headers, routes.


def test_query_decodes_as_forms_do_and_keeps_every_value() -> None:
    q = Query("tag=a&tag=b+c&x=%E2%9C%93&empty=&bare&bad=%FF")
    assert q["tag"] == "a" and q.getall("tag") == ["a", "b c"]
    assert q["x"] == "\u2713" and q["empty"] == "" and q["bare"] == ""
    assert q["bad"] == "\ufffd"  # not UTF-8: replaced, never an exception
    assert q.get("missing") is None and q.getall("missing", []) == []
    with pytest.raises(KeyError):
        q.getall("missing")


def test_a_query_with_too_many_parameters_is_a_400() -> None:
    with pytest.raises(HTTPError) as caught:
        Query("&".join(f"k{i}=v" for i in range(1000)))
    assert caught.value.status == 400 and "parameters" in caught.value.message


@given(st.text(max_size=200))
def test_any_query_string_parses_or_is_a_400(text: str) -> None:
    try:
        q = Query(text)
    except HTTPError as exc:
        assert exc.status == 400
    else:
        assert all(isinstance(v, str) for v in q.values())


def test_headers_are_found_in_any_case() -> None:
    h = Headers({"x-consul-token": "t", "accept": "text/plain"})
    assert h["X-Consul-Token"] == "t" and h.get("ACCEPT") == "text/plain"
    assert "x-CONSUL-token" in h and h.get("Missing", "d") == "d"


def test_request_splits_and_decodes_its_target() -> None:
    r = Request("GET", "/v1/resolve/a%2Db?ns=x", Headers({"host": "h:1"}))
    assert r.path == "/v1/resolve/a-b" and r.raw_path == "/v1/resolve/a%2Db?ns=x"
    assert r.query_string == "ns=x" and r.query["ns"] == "x" and r.host == "h:1"


async def test_a_body_over_the_limit_reads_as_a_413() -> None:
    r = Request("PUT", "/x", Headers({}))
    r.too_large, r.limit = True, 10
    with pytest.raises(HTTPError) as caught:
        await r.read()
    assert caught.value.status == 413 and "10 bytes" in caught.value.message


def test_response_types_its_body() -> None:
    assert Response(text="hi").headers["Content-Type"] == "text/plain; charset=utf-8"
    assert Response(body=b"x").headers["Content-Type"] == "application/octet-stream"
    assert Response().headers == {} and Response().body == b""
    r = json_response({"a": 1}, status=201, headers={"X-A": "1"})
    assert r.status == 201 and json.loads(r.body) == {"a": 1}
    assert r.content_type == "application/json" and r.headers["X-A"] == "1"


async def _ok(request: Request) -> Response:
    return Response()


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/v1/apps", "/v1/apps", {}),
        ("/v1/apps", "/v1/apps/", None),
        ("/v1/apps/{instance}", "/v1/apps/web-1", {"instance": "web-1"}),
        ("/v1/apps/{instance}", "/v1/apps/a%2Fb", {"instance": "a/b"}),  # one segment
        ("/v1/apps/{instance}", "/v1/apps/a/b", None),
        ("/v1/apps/{instance}", "/v1/apps/", None),
        ("/v1/check/{id:.+}", "/v1/check/service:web/x", {"id": "service:web/x"}),
        ("/v1/kv/{rest:.*}", "/v1/kv/", {"rest": ""}),
        ("/v1/kv/{rest:.*}", "/v1/kvx", None),
    ],
)
def test_route_patterns(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert Route("GET", pattern, _ok).match(path) == expected


def test_router_answers_404_or_405_with_what_the_path_takes() -> None:
    app = Application()
    app.router.add_get("/a/{x}", _ok)
    app.router.add_put("/a/{x}", _ok)
    assert app.router.resolve("HEAD", "/a/1") is not None  # GET routes take HEAD
    assert app.router.resolve("DELETE", "/a/1") is None
    refusal = app.router.refusal("DELETE", "/a/1", "/a/1")
    assert refusal.status == 405 and refusal.allowed_methods == {"GET", "HEAD", "PUT"}
    assert app.router.refusal("GET", "/b", "/b").status == 404


@given(st.integers(min_value=0, max_value=2**33))
def test_http_date_is_english_whatever_the_locale(when: int) -> None:
    assert http_date(when) == email.utils.formatdate(when, usegmt=True)


# ---------------------------------------------------------------------------
# Connections: raw bytes over loopback.


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    listeners: list[ApiListener] = []

    async def start(app: Application | None = None) -> tuple[ApiListener, int]:
        listener = ApiListener(app or create_app(FakeAgent()), "127.0.0.1", 0)
        await listener.start()
        listeners.append(listener)
        return listener, listener.address[1]

    yield start  # type: ignore[misc]
    for listener in listeners:
        await listener.close(drain_timeout=1.0)


async def _exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split what a connection sent into (status, headers, body) by Content-Length."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        raw = rest[length:]
    return out


def _one_sentence(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error and "\n" not in error
    return error


async def _still_serving(port: int) -> None:
    raw = await _exchange(port, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _responses(raw)[0][0] == 200


@pytest.mark.parametrize(
    ("request_bytes", "status", "words"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\nb\r\n\r\n", 400, "malformed"),
        (
            b"PUT /v1/apps/a HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed",
        ),
        (
            b"PUT /v1/apps/a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            400,
            "malformed",
        ),
        (b"BREW /pot HTTP/1.1\r\n\r\n", 400, "malformed"),
        (b"GET /\x00 HTTP/1.1\r\n\r\n", 400, "malformed"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "malformed"),  # TLS to plain HTTP
        (b"GET http://evil/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", 400, "path"),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 400, "path"),
        (b"GET /" + b"a" * MAX_TARGET_BYTES + b" HTTP/1.1\r\n\r\n", 414, "target"),
        (
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
            + b"\r\n",
            431,
            "header lines",
        ),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 70000 + b"\r\n\r\n", 431, "header"),
    ],
    ids=[
        "bare-lf",
        "cl-and-te",
        "two-lengths",
        "unknown-method",
        "nul",
        "tls",
        "absolute-form",
        "asterisk",
        "long-target",
        "many-headers",
        "big-headers",
    ],
)
async def test_unreadable_requests_get_one_sentence_and_a_close(
    serve: Serve, request_bytes: bytes, status: int, words: str
) -> None:
    _, port = await serve()
    answers = _responses(await _exchange(port, request_bytes))
    assert len(answers) == 1
    got, headers, body = answers[0]
    assert got == status and headers["connection"] == "close"
    assert words in _one_sentence(body)
    await _still_serving(port)


async def test_a_body_over_the_limit_is_refused_by_the_route_without_reading_it(
    serve: Serve,
) -> None:
    agent = FakeAgent()
    _, port = await serve(create_app(agent))
    # The length alone decides: the 413 comes before a byte of the body.
    big = (1 << 20) + 1
    for path, json_error in (("/v1/apps/a", True), ("/v1/agent/service/register", False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PUT %s HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (path.encode(), big))
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        status, headers, body = _responses(raw)[0]
        assert status == 413 and headers["connection"] == "close"
        if json_error:
            assert "1048576 bytes" in _one_sentence(body)
        else:  # Consul routes answer errors as plain text
            assert headers["content-type"].startswith("text/plain") and b"1048576" in body
    assert agent.calls == []


async def test_a_chunked_body_is_read_and_one_over_the_limit_refused(serve: Serve) -> None:
    agent = FakeAgent()
    _, port = await serve(create_app(agent))
    body = json.dumps({"app": "web", "address": "192.0.2.1", "port": 80}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = await _exchange(
        port,
        b"PUT /v1/apps/web-1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + chunked,
    )
    assert _responses(raw)[0][0] == 200 and agent.calls == ["register web-1"]
    chunk = b"a" * 65536
    flood = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(17))
    raw = await _exchange(
        port, b"PUT /v1/apps/web-2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + flood
    )
    assert _responses(raw)[0][0] == 413 and agent.calls == ["register web-1"]


async def test_expect_100_continue_is_answered_before_the_body(serve: Serve) -> None:
    agent = FakeAgent()
    _, port = await serve(create_app(agent))
    body = json.dumps({"app": "web", "address": "192.0.2.1", "port": 80}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"PUT /v1/apps/web-1 HTTP/1.1\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n" and agent.calls == []
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK") and agent.calls == ["register web-1"]
    finally:
        writer.close()


async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    _, port = await serve()
    paths = [b"/v1/health", b"/nowhere", b"/v1/apps"] * 20
    data = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in paths)
    raw = await _exchange(port, data + b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    statuses = [status for status, _, _ in _responses(raw)]
    assert statuses == [200, 404, 200] * 20 + [200]


async def test_http_1_0_keep_alive_only_when_asked(serve: Serve) -> None:
    _, port = await serve()
    raw = await _exchange(port, b"GET /v1/health HTTP/1.0\r\n\r\n")
    ((status, headers, _),) = _responses(raw)
    assert status == 200 and headers["connection"] == "close"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"Connection: keep-alive" in head
    finally:
        writer.close()


async def test_head_has_the_length_and_no_body(serve: Serve) -> None:
    _, port = await serve()
    get = _responses(
        await _exchange(port, b"GET /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    )[0]
    raw = await _exchange(port, b"HEAD /v1/health HTTP/1.1\r\nConnection: close\r\n\r\n")
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and rest == b""
    assert b"Content-Length: %d" % len(get[2]) in head


async def test_an_upgrade_is_answered_as_http_1_1_then_closed(serve: Serve) -> None:
    _, port = await serve()
    raw = await _exchange(
        port,
        b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    )
    ((status, headers, _),) = _responses(raw)
    assert status == 200 and headers["connection"] == "close"


async def test_a_header_a_handler_breaks_is_never_written(serve: Serve) -> None:
    async def inject(request: Request) -> Response:
        return Response(text="x", headers={"X-A": "1\r\nSet-Cookie: evil=1"})

    app = Application()
    app.router.add_get("/inject", inject)
    _, port = await serve(app)
    raw = await _exchange(port, b"GET /inject HTTP/1.1\r\n\r\n")
    assert b"evil" not in raw
    assert _responses(raw)[0][0] == 500


async def test_idle_and_slow_clients_are_closed(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "KEEPALIVE_TIMEOUT", 0.2)
    monkeypatch.setattr(connection, "REQUEST_TIMEOUT", 0.2)
    listener, port = await serve()
    # Idle: never sends a byte.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    # Slow: half a request, then nothing.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHo")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await until(lambda: listener.open == 0, "every connection released")


async def test_a_blocking_query_whose_client_leaves_frees_its_slot(serve: Serve) -> None:
    agent = FakeAgent()
    app = create_app(agent)
    listener, port = await serve(app)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/resolve/web?index=5&wait=60s HTTP/1.1\r\nHost: x\r\n\r\n")
    await agent.until_blocked()
    assert app[BLOCKING_KEY].in_flight == 1
    writer.close()
    await until(lambda: app[BLOCKING_KEY].in_flight == 0, "the slot freed")
    await until(lambda: listener.open == 0, "the connection released")


async def test_closing_answers_the_request_in_progress_and_closes_idle_ones(
    serve: Serve,
) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await gate.wait()
        return json_response({"done": True})

    app = Application()
    app.router.add_put("/slow", slow)
    listener, port = await serve(app)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PUT /slow HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 5)
    assert len(listener.serving) == 2
    closing = asyncio.ensure_future(listener.close(drain_timeout=5.0))
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    gate.set()
    raw = await asyncio.wait_for(reader.read(), 5)
    ((status, headers, body),) = _responses(raw)
    assert status == 200 and headers["connection"] == "close" and json.loads(body) == {"done": True}
    await asyncio.wait_for(closing, 5)
    for w in (writer, idle_writer):
        w.close()


async def test_real_clients_keep_their_connection(serve: Serve) -> None:
    """aiohttp's client reuses one connection for many requests."""
    import aiohttp

    listener, port = await serve()
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(f"http://127.0.0.1:{port}/v1/health") as resp:
                assert resp.status == 200 and (await resp.json())["status"] == "ok"
        assert listener.open == 1


async def test_one_endless_header_is_cut_off_before_it_ends(serve: Serve) -> None:
    """The parser keeps a header until its line ends: the head is capped on the
    bytes fed, so a header that never ends cannot grow the agent's memory."""
    _, port = await serve()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nX-Endless: ")
        # Twice the cap and no end of line: the refusal must come without it.
        writer.write(b"a" * 2 * connection.MAX_HEAD_BYTES)
        answer = await asyncio.wait_for(reader.read(), 5)
        status, headers, body = _responses(answer)[0]
        assert status == 431 and "head is larger" in _one_sentence(body)
    finally:
        writer.close()
    await _still_serving(port)


async def test_one_read_of_many_small_requests_queues_only_a_few(serve: Serve) -> None:
    """Thousands of tiny pipelined requests in one write are all answered, in
    order, while at most MAX_PIPELINED plus one parser slice's worth wait."""
    waiting: list[int] = []
    app = Application()
    listener, port = await serve(app)

    async def count(request: Request) -> Response:
        (conn,) = listener.serving
        waiting.append(len(conn._pending))
        return Response(text=request.path[1:])

    app.router.add_get("/{n}", count)
    requests = [b"GET /%d HTTP/1.1\r\n\r\n" % i for i in range(5000)]
    raw = await _exchange(
        port, b"".join(requests) + b"GET /end HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    answers = _responses(raw)
    assert [body for _, _, body in answers] == [b"%d" % i for i in range(5000)] + [b"end"]
    per_slice = connection.FEED_SLICE // len(requests[0]) + 1
    assert max(waiting) <= connection.MAX_PIPELINED + per_slice
