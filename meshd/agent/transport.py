"""Gossip transport: mutual TLS 1.3 connections carrying length-prefixed frames.

Each direction of a conversation has its own connection: we send on the
connections we open and only read on the ones others open.  That keeps the
code simple (no connection sharing races) and costs at most two connections
per pair of nodes, which the idle timeout closes again.

Everything a peer sends is untrusted.  The TLS handshake happens inside our
handler (``start_tls``), so a plain TCP client, a TLS client without a
certificate, or random bytes fail it there, are counted and closed, and
never reach the protocol.  A certificate must chain to our CA and carry a
SPIFFE ID of our trust domain; the member id it names is handed to the core
as the authenticated ``peer`` of every message on that connection.  An
oversized length prefix or an undecodable frame closes the connection; a
frame of an unknown type is counted and dropped (newer peers may send it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from meshd.identity import IdentityError, verify_peer_certificate
from meshd.metrics import Metrics
from meshd.wire import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    Message,
    Rejection,
    encode_frame,
    member_id,
)

log = logging.getLogger("meshd.transport")

#: Seconds to open a TCP connection and to finish the TLS handshake.  Well
#: under the LAN probe timeout would be ideal, but a handshake costs a few ms
#: of CPU; a failed connect is reported to the core as evidence anyway.
CONNECT_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 5.0
#: Seconds an unused connection stays open.  Probes reuse connections, so a
#: member probed every few seconds keeps its connection.
IDLE_TIMEOUT = 60.0
#: Frames queued for one peer while its connection is (re)established; past
#: this the oldest are dropped: gossip tolerates loss, memory must not grow.
MAX_QUEUED_FRAMES = 1024
#: Seconds a blocked write may take before the connection is given up.
WRITE_TIMEOUT = 5.0
#: Log a given peer's rejection reason at most once per this many seconds.
LOG_EVERY = 60.0


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def make_server_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def make_client_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # Peers are identified by the SPIFFE ID in their certificate, checked
    # after the handshake, not by host name: addresses change, names do not.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=ca_file)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


@dataclass
class _Outbound:
    address: str
    frames: deque[tuple[str, bytes]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Transport:
    """Listens for and opens gossip connections; hands decoded messages to ``on_message``."""

    def __init__(
        self,
        *,
        server_ctx: ssl.SSLContext,
        client_ctx: ssl.SSLContext,
        ca_certs: list[x509.Certificate],
        trust_domain: str,
        metrics: Metrics,
        on_message: Callable[[str, Message], None],
        on_refused: Callable[[str], None],
    ) -> None:
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.ca_certs = ca_certs
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.on_message = on_message
        self.on_refused = on_refused
        self._server: asyncio.Server | None = None
        self._out: dict[str, _Outbound] = {}
        self._inbound: set[_Inbound] = set()
        self._logged: dict[tuple[str, str], float] = {}
        self.closing = False

    # -- listening ---------------------------------------------------------

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        """Bind the listener; returns the bound (host, port).  Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Inbound(self), host, port)
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    def _reject(self, who: str, reason: str, detail: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        key = (who.rsplit(":", 1)[0], reason)
        if now - self._logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._logged[key] = now
            if len(self._logged) > 4096:
                self._logged.clear()
            log.warning("rejected from %s: %s %s", who, reason, detail)

    # -- sending -----------------------------------------------------------

    def send(self, address: str, msg: Message) -> None:
        """Queue one message for ``address``; never blocks, never raises on peers."""
        if self.closing:
            return
        frame = encode_frame(msg)
        kind = type(msg).__name__
        out = self._out.get(address)
        if out is None:
            out = self._out[address] = _Outbound(address)
        if len(out.frames) >= MAX_QUEUED_FRAMES:
            out.frames.popleft()
            self.metrics.rejected.labels("send-queue-full").inc()
        out.frames.append((kind, frame))
        out.wake.set()
        if out.task is None or out.task.done():
            out.task = asyncio.get_running_loop().create_task(self._sender(out))

    async def _sender(self, out: _Outbound) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            while not self.closing:
                if not out.frames:
                    out.wake.clear()
                    try:
                        await asyncio.wait_for(out.wake.wait(), IDLE_TIMEOUT)
                    except TimeoutError:
                        return
                    continue
                if writer is None or writer.is_closing():
                    writer = await self._connect(out)
                    if writer is None:
                        return
                batch = list(out.frames)
                out.frames.clear()
                for kind, frame in batch:
                    writer.write(frame)
                    self.metrics.messages_sent.labels(kind).inc()
                    self.metrics.bytes_sent.labels(kind).inc(len(frame))
                try:
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    self._reject(out.address, "write-failed", str(exc))
                    writer.close()
                    writer = None
        finally:
            if writer is not None:
                writer.close()
            if self._out.get(out.address) is out and not out.frames:
                del self._out[out.address]

    async def _connect(self, out: _Outbound) -> asyncio.StreamWriter | None:
        host, port = split_address(out.address)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self.client_ctx,
                    server_hostname=host,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                ),
                CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT,
            )
        except ConnectionRefusedError:
            out.frames.clear()
            self.metrics.rejected.labels("connect-refused").inc()
            self.on_refused(out.address)
            return None
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            out.frames.clear()
            self._reject(out.address, "connect-failed", str(exc) or type(exc).__name__)
            return None
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        try:
            if not der:
                raise IdentityError("the server sent no certificate")
            verify_peer_certificate(der, self.ca_certs, self.trust_domain)
        except IdentityError as exc:
            out.frames.clear()
            self._reject(out.address, "bad-peer-cert", str(exc))
            writer.close()
            return None
        return writer

    def pending(self) -> int:
        """Frames queued and not yet written."""
        return sum(len(o.frames) for o in self._out.values())

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until queued frames are written, e.g. a leave notice."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending() and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._inbound):
            conn.abort()
        tasks = [o.task for o in self._out.values() if o.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


class _Inbound(asyncio.Protocol):
    """One connection a peer opened to us: TLS handshake, then frames in.

    A protocol object rather than streams: it pauses reading the moment the
    TCP connection exists, so not one byte of the client's hello can land in
    a stream buffer before the TLS layer is attached (the race that makes
    ``StreamWriter.start_tls`` on a server hang now and then).
    """

    def __init__(self, owner: Transport) -> None:
        self.owner = owner
        self.raw: asyncio.Transport | None = None
        self.tls: asyncio.Transport | None = None
        self.remote = "?"
        self.peer: str | None = None
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.early: list[bytes] = []
        self.idle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:
            return  # start_tls does not call this again; be safe if it does
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        transport.pause_reading()
        peername = transport.get_extra_info("peername")
        if peername:
            self.remote = f"{peername[0]}:{peername[1]}"
        self.owner._inbound.add(self)
        self.task = asyncio.get_running_loop().create_task(self._handshake())

    async def _handshake(self) -> None:
        owner = self.owner
        assert self.raw is not None
        try:
            tls = await asyncio.get_running_loop().start_tls(
                self.raw,
                self,
                owner.server_ctx,
                server_side=True,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            owner._reject(self.remote, "tls-handshake", str(exc) or type(exc).__name__)
            self.abort()
            return
        if tls is None:  # closed during the handshake
            self.abort()
            return
        self.tls = tls
        ssl_obj = tls.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        try:
            if not der:
                raise IdentityError("the client sent no certificate")
            cluster, node = verify_peer_certificate(der, owner.ca_certs, owner.trust_domain)
        except IdentityError as exc:
            owner._reject(self.remote, "bad-peer-cert", str(exc))
            self.abort()
            return
        self.peer = member_id(cluster, node)
        self._arm_idle()
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            # Application data can arrive before our handshake task resumes.
            self.early.append(data)
            return
        self._arm_idle()
        owner = self.owner
        items = self.decoder.feed(data)
        for item, size in zip(items, self.decoder.sizes, strict=True):
            if isinstance(item, Rejection):
                owner._reject(self.peer, item.reason, item.detail)
                if item.reason != "unknown-type":
                    self.abort()  # oversized or undecodable: this peer is broken
                    return
                continue
            kind = type(item).__name__
            owner.metrics.messages_received.labels(kind).inc()
            owner.metrics.bytes_received.labels(kind).inc(size)
            try:
                owner.on_message(self.peer, item)
            except Exception:  # a bug of ours must not kill the connection loop
                log.exception("handling %s from %s failed", type(item).__name__, self.peer)

    def eof_received(self) -> bool | None:
        if self.decoder.pending and self.peer is not None:
            self.owner._reject(self.peer, "truncated", f"{self.decoder.pending} bytes")
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._inbound.discard(self)
        if self.idle is not None:
            self.idle.cancel()

    def _arm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.abort)

    def abort(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        transport = self.tls or self.raw
        if transport is not None:
            transport.abort()
        self.owner._inbound.discard(self)
