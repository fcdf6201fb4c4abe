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

Every resource a peer can make us hold is capped (docs/limits.md lists them
all): inbound connections in total, in handshake, in handshake per address
and per authenticated member; the time one frame may take to arrive; the
bytes held in unfinished frames across all connections; and the frames and
bytes per second a member may make us decode (``meshd.agent.ratelimit``).
Each refusal is counted in ``meshd_rejected_total`` under a fixed reason.
Idleness counts from the last complete frame, so trickling the bytes of an
unfinished frame keeps no connection alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography import x509

from meshd.agent.ratelimit import PeerLimiter, RateLimits, Verdict
from meshd.identity import IdentityError, verify_peer_certificate
from meshd.metrics import Metrics
from meshd.wire import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    Message,
    Rejection,
    decode_message,
    encode_frame,
    member_id,
)

log = logging.getLogger("meshd.transport")

#: Seconds to open a TCP connection and to finish the TLS handshake.  Well
#: under the LAN probe timeout would be ideal, but a handshake costs a few ms
#: of CPU; a failed connect is reported to the core as evidence anyway.
CONNECT_TIMEOUT = 2.0
HANDSHAKE_TIMEOUT = 5.0
#: Seconds an unused connection stays open, counted from the last complete
#: frame (trickled bytes of an unfinished one do not count as use).  Probes
#: reuse connections, so a member probed every few seconds keeps its own.
IDLE_TIMEOUT = 60.0
#: Frames queued for one peer while its connection is (re)established; past
#: this the oldest are dropped: gossip tolerates loss, memory must not grow.
MAX_QUEUED_FRAMES = 1024
#: Seconds a blocked write may take before the connection is given up.
WRITE_TIMEOUT = 5.0
#: Log a given peer's rejection reason at most once per this many seconds.
LOG_EVERY = 60.0

#: Inbound connections of one transport, whatever their state.  Each member
#: opens at most one connection to us and keeps it while it has sent a frame
#: within IDLE_TIMEOUT.  Members gossip to random members (3 every 0.2 s on a
#: LAN) and probe one a second, so in a busy 10,000-member pool about 16
#: distinct members a second send to us: ~960 within an idle timeout.  2048
#: leaves twice that; an idle TLS connection costs about 40 KB, so a full
#: table is ~80 MB, and filling it takes 256 certificates of the CA (see
#: MAX_CONNECTIONS_PER_PEER) since unauthenticated ones stop at MAX_HANDSHAKES.
MAX_INBOUND_CONNECTIONS = 2048
#: Peers we hold an outbound connection (or a queue) for at once.  We dial
#: whom the protocol sends to: gossip and probe targets, about as many as
#: send to us (see above), plus addresses a peer names (an indirect probe's
#: target, a ping's reply address).  Past the cap a message to a new address
#: is dropped and counted; gossip tolerates loss, memory and file
#: descriptors must not grow with what peers name.
MAX_OUTBOUND_CONNECTIONS = 2048
#: Connections still in their TLS handshake (nobody knows who they are yet).
#: An honest handshake takes milliseconds, so even a pool's joining wave has
#: a handful in flight; 256 bounds what an attacker without a certificate can
#: make us hold (~10 MB for HANDSHAKE_TIMEOUT each) below the full table.
MAX_HANDSHAKES = 256
#: Of those, from one remote IP address: one host cannot take them all.
#: Counted only until the handshake ends, because many honest members may
#: share an address (agents on one host, a NAT); after it, the member id
#: counts (MAX_CONNECTIONS_PER_PEER).
MAX_HANDSHAKES_PER_ADDRESS = 64
#: Authenticated connections of one member (one certificate identity).  An
#: honest member has one (two for a moment when it reconnects while our side
#: has not yet seen the old one close); the newest wins, so a peer whose old
#: connections died unseen is never locked out, and an attacker with one
#: certificate holds at most this many.
MAX_CONNECTIONS_PER_PEER = 8
#: Seconds from the first byte of a frame to its last.  Twice WRITE_TIMEOUT:
#: an honest sender gives up on a connection whose frame does not drain in
#: WRITE_TIMEOUT, so any frame it still sends fits; a frame trickled slower
#: than 1 MiB in 10 s (~100 KB/s) is an attack on our memory.
FRAME_TIMEOUT = 10.0
#: Bytes held in unfinished frames across all inbound connections of one
#: transport.  An honest frame is in flight for milliseconds on a LAN, and a
#: member receives about one sync (a few frames of at most MAX_FRAME_BYTES)
#: per sync interval, so 32 honest maximal frames arriving at the same
#: instant is far beyond need; it bounds what trickling peers make us hold.
MAX_PARTIAL_BYTES = 32 * 1024 * 1024
#: What one member may make us decode.  Honest peak per member: one sync
#: answer to our join, i.e. its member list (under 1 MiB for 10,000
#: members) and all its record states in 256 KiB chunks: ~0.6-2 KB per
#: member, 6-20 MiB for 10,000 members, so ~80 frames.  The bursts (400
#: frames, 32 MiB) pass that at once; the rates (200 frames/s, 4 MiB/s)
#: refill them within 8 s, while steady gossip, probes and syncs of one
#: member are under 20 frames/s and 100 KB/s.  Drops past ABUSE_AFTER
#: seconds without a pause of ABUSE_GAP close the connection.
RATE_FRAMES_PER_SECOND = 200.0
RATE_FRAMES_BURST = 400.0
RATE_BYTES_PER_SECOND = 4.0 * 1024 * 1024
RATE_BYTES_BURST = 32.0 * 1024 * 1024
ABUSE_AFTER = 10.0
ABUSE_GAP = 1.0
#: Linux's TCP_THIN_LINEAR_TIMEOUTS and TCP_RTO_MAX_MS (``linux/tcp.h``;
#: Python exports neither). Gossip connections are thin streams, a frame or
#: two in flight, so a lost segment is recovered only by the retransmission
#: timer. Under loss that timer grows two ways: it doubles on every retry,
#: and lost segments inflate the round-trip variance it is computed from
#: (timeouts of 3-13 s after a few losses at 30%). Measured between two
#: namespaces at 20% loss each way for 120 s (benchmarks/bench_thin_streams.py):
#: with Linux's defaults connections went silent for over 6 s 13 times,
#: the longest 44.6 s; with linear timeouts (the first six retries keep the
#: base timeout) 6 times; with the timeout also capped at 1 s (the least
#: Linux allows; kernels before 6.15 refuse the option and keep their
#: default) never. A silence over 6 s is long enough for the cluster watch
#: (12 missed rounds of 0.5 s) to call a healthy cluster unreachable, most
#: likely what one 10% loss run of the separate-hosts test saw. With the
#: cap, Linux gives up on a connection whose data goes unacknowledged for
#: about 14 s instead of 15 minutes; the transport reports that as a closed
#: connection, which makes the core probe the peer, not declare it dead.
TCP_THIN_LINEAR_TIMEOUTS = 16
TCP_RTO_MAX_MS = 44
#: Milliseconds: the most a gossip segment waits for its next retransmission.
RTO_MAX_MS = 1000


@dataclass(frozen=True, slots=True)
class Limits:
    """The caps of one transport.  Defaults are the module constants above
    (docs/limits.md explains each); tests shrink them to run in milliseconds."""

    idle_timeout: float = IDLE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    frame_timeout: float = FRAME_TIMEOUT
    max_inbound: int = MAX_INBOUND_CONNECTIONS
    max_outbound: int = MAX_OUTBOUND_CONNECTIONS
    max_handshakes: int = MAX_HANDSHAKES
    max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS
    max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER
    max_partial_bytes: int = MAX_PARTIAL_BYTES
    rates: RateLimits = RateLimits(
        frames_per_second=RATE_FRAMES_PER_SECOND,
        frames_burst=RATE_FRAMES_BURST,
        bytes_per_second=RATE_BYTES_PER_SECOND,
        bytes_burst=RATE_BYTES_BURST,
        abuse_after=ABUSE_AFTER,
        abuse_gap=ABUSE_GAP,
    )

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "handshake_timeout", "frame_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in (
            "max_inbound",
            "max_outbound",
            "max_handshakes",
            "max_handshakes_per_address",
            "max_connections_per_peer",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.rates.bytes_burst < MAX_FRAME_BYTES + 4:
            raise ValueError("the byte burst must hold one frame of MAX_FRAME_BYTES")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def make_server_context(ca_file: str, cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    # No TLS 1.3 session tickets: our clients never resume a session, and each
    # ticket held a copy of the session on the client's side of every
    # connection (about 7 KB per pair of connections, measured).
    ctx.num_tickets = 0
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
    #: (message type, frame, recipient member id or "" for anyone).
    frames: deque[tuple[str, bytes, str]] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    #: The open connection, its peer's certificate serial (drop_revoked) and
    #: member id (the only recipient its frames may be meant for).
    writer: asyncio.StreamWriter | None = None
    reader: asyncio.StreamReader | None = None
    serial: int = -1
    peer: str = ""
    #: Loop time of our last write on it: the peer's idle timer counts from it.
    last_write: float = 0.0
    #: The connection we closed ourselves last (idle, revoked, failed): its
    #: end is not the peer's doing, so it is not reported.
    dropped: asyncio.StreamWriter | None = None


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
        limits: Limits | None = None,
        on_closed: Callable[[str], None] | None = None,
        on_misplaced: Callable[[str, str], None] | None = None,
    ) -> None:
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.ca_certs = ca_certs
        self.trust_domain = trust_domain
        self.metrics = metrics
        self.on_message = on_message
        self.on_refused = on_refused
        #: A connection with a peer ended without our asking (see _ended):
        #: called with the member id of an inbound one, the address of ours.
        self.on_closed: Callable[[str], None] = on_closed or (lambda who: None)
        #: A connection we opened proved another identity than the member a
        #: message was for: called with (member, address), the message dropped.
        self.on_misplaced: Callable[[str, str], None] = on_misplaced or (lambda m, a: None)
        self.limits = limits or Limits()
        self._watchers: set[asyncio.Task[None]] = set()
        #: Whether a certificate serial is on the CA's revocation list (set by
        #: the agent); checked after every handshake, both directions.
        self.revoked: Callable[[int], bool] | None = None
        self._server: asyncio.Server | None = None
        self._out: dict[str, _Outbound] = {}
        self._inbound: set[_Inbound] = set()
        self._logged: dict[tuple[str, str], float] = {}
        # Inbound accounting; each entry is added and removed by _Inbound only.
        self._handshakes: dict[str, int] = {}  # remote IP -> connections in handshake
        self._by_peer: dict[str, list[_Inbound]] = {}  # member id -> its connections, oldest first
        self._limiters: dict[str, PeerLimiter] = {}  # member id -> its buckets
        self.partial_bytes = 0  # bytes held in unfinished frames, all connections
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

    def inbound_count(self) -> int:
        """Inbound connections open now (in handshake or authenticated)."""
        return len(self._inbound)

    def _refusal(self, host: str) -> tuple[str, str] | None:
        """Why a new inbound connection from ``host`` is refused, if it is."""
        lim = self.limits
        if len(self._inbound) >= lim.max_inbound:
            return "inbound-connections", f"{len(self._inbound)} open"
        if sum(self._handshakes.values()) >= lim.max_handshakes:
            return "handshakes", f"{lim.max_handshakes} in handshake"
        if self._handshakes.get(host, 0) >= lim.max_handshakes_per_address:
            return "per-address-connections", f"{lim.max_handshakes_per_address} in handshake"
        return None

    def _limiter(self, peer: str, now: float) -> PeerLimiter:
        limiter = self._limiters.get(peer)
        if limiter is None:
            if len(self._limiters) >= 2 * self.limits.max_inbound:
                # Only members with a certificate of the CA get here, so this
                # is rare; forgetting those without a connection keeps it bounded.
                for p in [p for p in self._limiters if p not in self._by_peer]:
                    del self._limiters[p]
            limiter = self._limiters[peer] = PeerLimiter(self.limits.rates, now)
        return limiter

    # -- sending -----------------------------------------------------------

    def send(self, address: str, msg: Message, to: str = "") -> None:
        """Queue one message for ``address``; never blocks, never raises on peers.

        ``to``: the member id the message is for.  It is written only on a
        connection whose peer certificate names that member: the address came
        from a peer's word, and another agent may answer there.  "" (a seed,
        whose holder we do not know yet): whoever the CA vouches for.
        """
        if self.closing:
            return
        frame = encode_frame(msg)
        kind = type(msg).__name__
        out = self._out.get(address)
        if out is None:
            if len(self._out) >= self.limits.max_outbound:
                self.metrics.rejected.labels("outbound-connections").inc()
                return
            out = self._out[address] = _Outbound(address)
        if len(out.frames) >= MAX_QUEUED_FRAMES:
            out.frames.popleft()
            self.metrics.rejected.labels("send-queue-full").inc()
        out.frames.append((kind, frame, to))
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
                        await asyncio.wait_for(out.wake.wait(), self.limits.idle_timeout)
                    except TimeoutError:
                        return
                    continue
                if writer is None or writer.is_closing() or _ended(out.reader):
                    # A connection the peer ended is not written into: the
                    # frames would vanish, and a new connect tells us whether
                    # anyone still listens there.
                    if writer is not None:
                        writer.close()
                    writer = await self._connect(out)
                    if writer is None:
                        return
                batch = list(out.frames)
                out.frames.clear()
                misplaced: set[str] = set()
                for kind, frame, to in batch:
                    if to and to != out.peer:
                        misplaced.add(to)
                        continue
                    writer.write(frame)
                    self.metrics.messages_sent.labels(kind).inc()
                    self.metrics.bytes_sent.labels(kind).inc(len(frame))
                for member in sorted(misplaced):
                    # Never written: the peer there is another member.
                    self._reject(out.address, "misplaced", f"{member[:80]} is not {out.peer}")
                    self.on_misplaced(member, out.address)
                out.last_write = asyncio.get_running_loop().time()
                try:
                    await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    self._reject(out.address, "write-failed", str(exc))
                    _drop(out, writer)
                    writer = None
                    if not self.closing:
                        self.on_closed(out.address)
        finally:
            if writer is not None:
                _drop(out, writer)
            if self._out.get(out.address) is out and not out.frames:
                del self._out[out.address]

    async def _connect(self, out: _Outbound) -> asyncio.StreamWriter | None:
        try:
            host, port = split_address(out.address)
            if not 0 < port < 65536:
                raise ValueError(f"port {port} out of range")
        except ValueError as exc:
            # A member's own signed claim may still name nowhere: say so once
            # a minute and drop what was queued, never kill the sender.
            out.frames.clear()
            self._reject(out.address[:80], "bad-address", str(exc)[:80])
            return None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self.client_ctx,
                    server_hostname=host,
                    ssl_handshake_timeout=self.limits.handshake_timeout,
                ),
                CONNECT_TIMEOUT + self.limits.handshake_timeout,
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
            cluster, node = verify_peer_certificate(
                der, self.ca_certs, self.trust_domain, revoked=self.revoked
            )
        except IdentityError as exc:
            out.frames.clear()
            self._reject(out.address, "bad-peer-cert", str(exc))
            writer.close()
            return None
        _thin_stream(writer.get_extra_info("socket"))
        out.writer, out.serial = writer, x509.load_der_x509_certificate(der).serial_number
        out.peer = member_id(cluster, node)
        out.reader, out.last_write = reader, asyncio.get_running_loop().time()
        watcher = asyncio.get_running_loop().create_task(self._watch(out, reader, writer))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return writer

    async def _watch(
        self, out: _Outbound, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Wait for the end of one of our connections, and report it if the peer ended it.

        The peer never writes on a connection we opened (each direction has
        its own), so the only thing a read returns is its end: EOF when the
        peer's process closed it or died (its kernel closes its sockets), an
        error when it was reset.  Anything else a broken peer sends is read
        and dropped, a bounded chunk at a time.  Not reported: our own close
        (idle, revoked, shutting down), and a close by the peer that came an
        idle timeout or more after our last write (its idle timer, not its
        death; ours and its are the same constant).
        """
        with contextlib.suppress(OSError, ConnectionError, ssl.SSLError):
            while await reader.read(4096):
                pass
        if self.closing or out.writer is not writer or out.dropped is writer:
            return
        writer.close()
        idle = asyncio.get_running_loop().time() - out.last_write
        if idle < self.limits.idle_timeout / 2:
            self.on_closed(out.address)

    def drop_revoked(self) -> int:
        """Close open connections, both ways, whose peer certificate is now revoked.

        A handshake is checked once; a revocation list that arrives later must
        also end the conversations already open.  Returns how many were closed.
        """
        revoked = self.revoked
        if revoked is None:
            return 0
        closed = 0
        for out in self._out.values():
            if out.writer is not None and not out.writer.is_closing() and revoked(out.serial):
                _drop(out, out.writer)
                closed += 1
        for conn in list(self._inbound):
            if conn.serial >= 0 and revoked(conn.serial):
                conn.abort()
                closed += 1
        if closed:
            self.metrics.rejected.labels("revoked-cert").inc(closed)
        return closed

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
        tasks += self._watchers
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)


def _thin_stream(sock: object) -> None:
    """Ask for linear and capped retransmission timeouts on a gossip socket,
    where the kernel has them (see TCP_THIN_LINEAR_TIMEOUTS); elsewhere do
    nothing: the numbers mean other options on other systems (16 is
    TCP_KEEPALIVE on macOS)."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        setsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS, 1)
    with contextlib.suppress(OSError):
        setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RTO_MAX_MS)


def _drop(out: _Outbound, writer: asyncio.StreamWriter) -> None:
    """Close one of our connections ourselves (not to be reported as the peer's end)."""
    out.dropped = writer
    writer.close()


def _ended(reader: asyncio.StreamReader | None) -> bool:
    """Whether the peer ended the connection this reader belongs to (EOF or error)."""
    return reader is not None and (reader.at_eof() or reader.exception() is not None)


class _Inbound(asyncio.Protocol):
    """One connection a peer opened to us: TLS handshake, then frames in.

    A protocol object rather than streams: it pauses reading the moment the
    TCP connection exists, so not one byte of the client's hello can land in
    a stream buffer before the TLS layer is attached (the race that makes
    ``StreamWriter.start_tls`` on a server hang now and then).

    What must stay true: a connection is counted in its owner's tables from
    ``connection_made`` (unless refused there) until ``_release``, which runs
    exactly once whichever way it ends; ``held`` bytes are counted in the
    owner's ``partial_bytes`` while it is open.
    """

    def __init__(self, owner: Transport) -> None:
        self.owner = owner
        self.raw: asyncio.Transport | None = None
        self.tls: asyncio.Transport | None = None
        self.remote = "?"
        self.host = "?"
        self.peer: str | None = None
        self.serial = -1
        self.decoder = FrameDecoder(MAX_FRAME_BYTES)
        self.early: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.in_handshake = False
        self.counted = False
        self.closed = False
        #: The peer's end of the connection was reported (_ended_by_peer).
        self.reported = False
        #: Bytes of unfinished frames (or pre-handshake data) counted in the owner.
        self.held = 0
        #: Loop time of the last complete frame (or of the handshake).
        self.last_frame = 0.0
        #: Loop time the first byte of the unfinished frame arrived, if one is.
        self.partial_since: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.raw is not None:
            return  # start_tls does not call this again; be safe if it does
        assert isinstance(transport, asyncio.Transport)
        self.raw = transport
        transport.pause_reading()
        owner = self.owner
        peername = transport.get_extra_info("peername")
        if peername:
            self.host = str(peername[0])
            self.remote = f"{peername[0]}:{peername[1]}"
        refusal = owner._refusal(self.host)
        if refusal is not None:
            # Before any TLS work: a refused connection costs one accept.
            self.closed = True
            owner._reject(self.remote, *refusal)
            transport.abort()
            return
        # We send only the TLS handshake on this connection (no session
        # tickets), but a stalled handshake holds the peer's frames up too.
        _thin_stream(transport.get_extra_info("socket"))
        self.counted = self.in_handshake = True
        owner._inbound.add(self)
        owner._handshakes[self.host] = owner._handshakes.get(self.host, 0) + 1
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
                ssl_handshake_timeout=owner.limits.handshake_timeout,
            )
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            owner._reject(self.remote, "tls-handshake", str(exc) or type(exc).__name__)
            self.abort()
            return
        if tls is None or self.closed:  # closed during the handshake
            self.abort()
            return
        self.tls = tls
        self._end_handshake()
        ssl_obj = tls.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        try:
            if not der:
                raise IdentityError("the client sent no certificate")
            cluster, node = verify_peer_certificate(
                der, owner.ca_certs, owner.trust_domain, revoked=owner.revoked
            )
        except IdentityError as exc:
            owner._reject(self.remote, "bad-peer-cert", str(exc))
            self.abort()
            return
        self.serial = x509.load_der_x509_certificate(der).serial_number
        self.peer = peer = member_id(cluster, node)
        mine = owner._by_peer.setdefault(peer, [])
        mine.append(self)
        while len(mine) > owner.limits.max_connections_per_peer:
            oldest = mine[0]
            owner._reject(peer, "per-peer-connections", f"closing {oldest.remote}")
            oldest.abort()  # removes it from ``mine``
        self.last_frame = asyncio.get_running_loop().time()
        self._schedule()
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.peer is None:
            # Application data can arrive before our handshake task resumes.
            self.early.append(data)
            self._hold(self.held + len(data))
            return
        owner = self.owner
        now = asyncio.get_running_loop().time()
        bodies = self.decoder.split(data)
        if bodies:
            self.last_frame = now
        limiter = owner._limiter(self.peer, now)
        for body, size in zip(bodies, self.decoder.sizes, strict=True):
            if not isinstance(body, bytes):
                owner._reject(self.peer, body.reason, body.detail)  # oversized
                self.abort()
                return
            verdict = limiter.admit(size, now)
            if verdict is not Verdict.PASS:
                owner._reject(self.peer, verdict.value, f"{size} bytes")
                if limiter.abusive(now):
                    owner._reject(self.peer, "rate-limit-sustained", "over the limit too long")
                    self.abort()
                    return
                continue
            item = decode_message(body)
            if isinstance(item, Rejection):
                owner._reject(self.peer, item.reason, item.detail)
                if item.reason != "unknown-type":
                    self.abort()  # undecodable: this peer is broken
                    return
                continue
            kind = type(item).__name__
            owner.metrics.messages_received.labels(kind).inc()
            owner.metrics.bytes_received.labels(kind).inc(size)
            try:
                owner.on_message(self.peer, item)
            except Exception:  # a bug of ours must not kill the connection loop
                log.exception("handling %s from %s failed", kind, self.peer)
            if self.closed:
                return  # on_message may close the transport
        pending = self.decoder.pending
        if not pending:
            self.partial_since = None
        elif bodies or self.partial_since is None:
            self.partial_since = now  # the first bytes of a new frame
        self._hold(pending)
        self._schedule()

    def _hold(self, held: int) -> None:
        """Count ``held`` bytes as ours, or close if the owner's total would pass its cap."""
        owner = self.owner
        grow = held - self.held
        if grow > 0 and owner.partial_bytes + grow > owner.limits.max_partial_bytes:
            owner._reject(
                self.peer or self.remote,
                "partial-bytes",
                f"{held} bytes unfinished, {owner.partial_bytes} held in all",
            )
            self.abort()
            return
        owner.partial_bytes += grow
        self.held = held

    def eof_received(self) -> bool | None:
        if self.decoder.pending and self.peer is not None:
            self.owner._reject(self.peer, "truncated", f"{self.decoder.pending} bytes")
        self._ended_by_peer()
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self._ended_by_peer()  # a reset, or an error on the socket
        self._release()

    def _ended_by_peer(self) -> None:
        """The authenticated peer ended this connection: tell the owner, once.

        Not when we closed it (``closed`` is already set), not when the peer
        merely closed an idle connection (nothing for half an idle timeout:
        its sender's idle timer, not its death).
        """
        if self.closed or self.reported or self.peer is None or self.owner.closing:
            return
        self.reported = True
        now = asyncio.get_running_loop().time()
        if now - self.last_frame < self.owner.limits.idle_timeout / 2:
            self.owner.on_closed(self.peer)

    # -- deadlines -----------------------------------------------------------

    def _deadline(self) -> float:
        lim = self.owner.limits
        due = self.last_frame + lim.idle_timeout
        if self.partial_since is not None:
            due = min(due, self.partial_since + lim.frame_timeout)
        return due

    def _schedule(self) -> None:
        """One timer at the earliest deadline; a later deadline waits for it to fire."""
        if self.closed:
            return
        due = self._deadline()
        if self.timer is not None:
            if self.timer.when() <= due:
                return
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        lim = self.owner.limits
        if self.partial_since is not None and now >= self.partial_since + lim.frame_timeout:
            self.owner._reject(
                self.peer or self.remote,
                "frame-timeout",
                f"{self.decoder.pending} bytes in {lim.frame_timeout:g} s",
            )
            self.abort()
        elif now >= self.last_frame + lim.idle_timeout:
            self.abort()  # idle: nothing wrong, not counted
        else:
            self._schedule()

    # -- closing ---------------------------------------------------------------

    def _end_handshake(self) -> None:
        if self.in_handshake:
            self.in_handshake = False
            table = self.owner._handshakes
            left = table.get(self.host, 0) - 1
            if left > 0:
                table[self.host] = left
            else:
                table.pop(self.host, None)

    def _release(self) -> None:
        """Give back everything this connection is counted for; runs once."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.counted:
            return
        self.counted = False
        owner = self.owner
        self._end_handshake()
        owner._inbound.discard(self)
        owner.partial_bytes -= self.held
        self.held = 0
        self.early = []
        if self.peer is not None:
            mine = owner._by_peer.get(self.peer, [])
            if self in mine:
                mine.remove(self)
            if not mine:
                owner._by_peer.pop(self.peer, None)
                limiter = owner._limiters.get(self.peer)
                if limiter is not None and limiter.at_rest(asyncio.get_running_loop().time()):
                    del owner._limiters[self.peer]

    def abort(self) -> None:
        self._release()
        transport = self.tls or self.raw
        if transport is not None:
            transport.abort()
