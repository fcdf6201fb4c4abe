"""The API's listener: accepts connections, caps them, and serves HTTP on them.

Every accepted connection holds a file descriptor and a few KB until its
keep-alive timeout (75 s, also for a connection that never sends a
request), so whoever reaches the API (a local user; off loopback, the
network) could open thousands and leave the agent no descriptors for its
gossip connections or its state database.  The listener counts connections
from the TCP accept on, TLS handshakes included, and refuses those above
``max_connections`` in all or ``max_per_address`` from one remote address
(loopback exempt) before any TLS work: a plain-HTTP client reads a one-line
503, a TLS client sees the connection closed.  A TLS handshake that does not
finish within ``handshake_timeout`` is closed.  Each connection admitted is
served by :class:`meshd.api.connection.HttpConnection`.

TLS is started here (``loop.start_tls``), as the gossip transport does, and
not by ``create_server(ssl=...)``: an accepted connection must be counted
before its handshake, and one whose handshake fails must be released, which
a protocol behind asyncio's own TLS layer never hears of.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Callable

from meshd.api.connection import HttpConnection
from meshd.api.routes import Application

__all__ = [
    "API_HANDSHAKE_TIMEOUT",
    "ApiListener",
    "MAX_API_CONNECTIONS",
    "MAX_API_CONNECTIONS_PER_ADDRESS",
]

#: Open API connections (established or in a TLS handshake).  Twice the
#: blocking queries' own cap (MAX_BLOCKING_QUERIES, 1024), so that long polls
#: never take every slot from ordinary requests; with the gossip caps, below
#: the systemd unit's LimitNOFILE of 16384 (docs/limits.md).
MAX_API_CONNECTIONS = 2048
#: Of those, from one remote address (Consul's http_max_conns_per_client is
#: 200): one pod or host cannot take every slot from the others.  Loopback
#: is exempt, since every local client shares it (the total still counts).
MAX_API_CONNECTIONS_PER_ADDRESS = 256
#: Seconds a client has to finish its TLS handshake.
API_HANDSHAKE_TIMEOUT = 10.0

_BUSY_BODY = b'{"error": "too many open connections to the API; retry later"}\n'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class ApiListener:
    """The local API of ``app`` on ``host:port``, with a connection cap."""

    def __init__(
        self,
        app: Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = MAX_API_CONNECTIONS,
        max_per_address: int = MAX_API_CONNECTIONS_PER_ADDRESS,
        loopback_exempt: bool = True,
        handshake_timeout: float = API_HANDSHAKE_TIMEOUT,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.app = app
        self.host, self.port = host, port
        self._ssl_context = ssl_context
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.loopback_exempt = loopback_exempt
        self.handshake_timeout = handshake_timeout
        #: Called with the reason of each refusal: ``api-connections`` (the
        #: total) or ``api-connections-per-address``.
        self.on_refused = on_refused
        #: Connections counted now: accepted and not yet ended, in all and
        #: per remote address (an address leaves the map with its last one).
        self.open = 0
        self.by_address: dict[str, int] = {}
        #: Connections served now (after TLS, if any).
        self.serving: set[HttpConnection] = set()
        self._server: asyncio.Server | None = None
        #: Set while closing: done when the last connection served has ended.
        self._drained: asyncio.Future[None] | None = None

    def _refusal(self, address: str) -> str | None:
        if self.open >= self.max_connections:
            return "api-connections"
        if self.by_address.get(address, 0) >= self.max_per_address and not (
            self.loopback_exempt and _is_loopback(address)
        ):
            return "api-connections-per-address"
        return None

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """The address bound (the port the system chose, if 0 was asked)."""
        assert self._server is not None, "the listener is started"
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), self.host, self.port, backlog=128
        )

    def _serve(self) -> HttpConnection:
        return HttpConnection(self.app)

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Stop accepting, release what waits (``app.on_shutdown``), let the requests
        in progress finish for up to ``drain_timeout`` seconds, then close every
        connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for callback in self.app.on_shutdown:
            result = callback(self.app)
            if asyncio.iscoroutine(result):
                await result
        drained = self._drained = asyncio.get_running_loop().create_future()
        for conn in list(self.serving):
            conn.shut()
        if self.serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(drained), drain_timeout)
        for conn in list(self.serving):
            if conn.transport is not None:
                conn.transport.abort()
        self.serving.clear()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1.0)


class _Connection(asyncio.Protocol):
    """One accepted connection: counted, then served over HTTP (after TLS)."""

    def __init__(self, site: ApiListener) -> None:
        self.site = site
        self.address = ""
        self.counted = False
        self.handler: HttpConnection | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        site = self.site
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        refusal = site._refusal(self.address)
        if refusal is not None:
            site.on_refused(refusal)
            if site._ssl_context is None:
                transport.write(_BUSY)
                transport.close()
            else:
                transport.abort()  # no TLS work for a connection we refuse
            return
        site.open += 1
        site.by_address[self.address] = site.by_address.get(self.address, 0) + 1
        self.counted = True
        if site._ssl_context is None:
            self.handler = site._serve()
            site.serving.add(self.handler)
            self.handler.connection_made(transport)
        else:
            transport.pause_reading()
            self.task = asyncio.get_running_loop().create_task(self._tls(transport))

    async def _tls(self, raw: asyncio.Transport) -> None:
        site = self.site
        assert site._ssl_context is not None
        handler = site._serve()
        app = _AfterTls(self, handler)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                raw,
                app,
                site._ssl_context,
                server_side=True,
                ssl_handshake_timeout=site.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError):
            raw.abort()
            self.release()
            return
        if tls is None:  # the connection ended during the handshake
            self.release()
            return
        self.handler = handler
        site.serving.add(handler)
        app.connected(tls)

    def release(self) -> None:
        site = self.site
        if self.handler is not None:
            site.serving.discard(self.handler)
            drained = site._drained
            if drained is not None and not site.serving and not drained.done():
                drained.set_result(None)
        if self.counted:
            self.counted = False
            site = self.site
            site.open -= 1
            left = site.by_address[self.address] - 1
            if left:
                site.by_address[self.address] = left
            else:
                del site.by_address[self.address]

    # Plain HTTP: the raw transport keeps this protocol; forward to the handler.
    # (With TLS, start_tls moves the raw transport to asyncio's TLS layer,
    # which talks to _AfterTls; until then reading is paused.)

    def data_received(self, data: bytes) -> None:
        if self.handler is not None:
            self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self.handler is not None:
            return self.handler.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handler is not None:
            self.handler.connection_lost(exc)
        elif self.task is not None:
            self.task.cancel()  # closed before its handshake began
        self.release()


class _AfterTls(asyncio.Protocol):
    """The application side of a TLS connection: the HTTP handler, and the
    release of the connection's count when it ends."""

    def __init__(self, conn: _Connection, handler: HttpConnection) -> None:
        self.conn, self.handler = conn, handler
        # asyncio's TLS layer delivers the data that came with the end of the
        # handshake at once, before start_tls's caller resumes and tells
        # the handler of the connection: kept here until then (at most what one
        # read of the socket brought).
        self.early: list[bytes] = []
        self.early_eof = False

    def connected(self, tls: asyncio.Transport) -> None:
        """Hand the connection to the handler, then what arrived before."""
        self.handler.connection_made(tls)
        early, self.early = self.early, []
        for data in early:
            self.handler.data_received(data)
        if self.early_eof:
            self.handler.eof_received()

    def data_received(self, data: bytes) -> None:
        if self.conn.handler is None:
            self.early.append(data)
        else:
            self.handler.data_received(data)

    def eof_received(self) -> bool | None:
        if self.conn.handler is None:
            self.early_eof = True
        else:
            self.handler.eof_received()
        return None

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn.handler is not None:  # the handler was told of the connection
            self.handler.connection_lost(exc)
        self.conn.release()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False
