"""Each inbound cap of the gossip transport, on real TLS connections over 127.0.0.1.

One in-process ``Transport`` listens with limits shrunk so that every test
takes well under a second; clients are asyncio TLS connections holding
certificates of the same CA.  Waiting is always for a condition, bounded.
Connections from 127.0.0.2 and up stand for other hosts (Linux routes all of
127.0.0.0/8 to the loopback interface).
"""

from __future__ import annotations

import asyncio
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd import identity
from meshd.agent.ratelimit import PeerLimiter, RateLimits, Verdict
from meshd.agent.transport import (
    Limits,
    Transport,
    make_client_context,
    make_server_context,
)
from meshd.metrics import Metrics
from meshd.protocol.anti_entropy import SYNC_CHUNK_BYTES
from meshd.wire import MAX_FRAME_BYTES, WIRE_VERSION, FrameDecoder, Gossip, Message, encode_frame
from tests.fakes import until, write_node_pki

TRUST = "mesh.test"
NODES = ("server", "a", "b", "c")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    """(ca, cert, key) file names for east/server, east/a, east/b and east/c."""
    return write_node_pki(tmp_path_factory.mktemp("pki"), TRUST, NODES)


@dataclass
class Server:
    transport: Transport
    metrics: Metrics
    host: str
    port: int
    pki: dict[str, tuple[str, str, str]]
    received: list[tuple[str, Message]] = field(default_factory=list)

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value("meshd_rejected_total", {"reason": reason})
        return value or 0.0

    async def tls(
        self, node: str, source: str = "127.0.0.1"
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        ctx = make_client_context(*self.pki[node])
        return await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=ctx, server_hostname=self.host, local_addr=(source, 0)
            ),
            5.0,
        )

    async def tcp(self, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, local_addr=(source, 0)), 5.0
        )


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the server ends the connection (EOF or reset) within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
    return True


async def refused(server: Server, node: str, source: str = "127.0.0.1") -> bool:
    """True when a TLS connection attempt is cut before or right after its handshake."""
    try:
        reader, writer = await server.tls(node, source)
    except (ConnectionError, ssl.SSLError, OSError):
        return True
    try:
        return await closed_by_server(reader, 2.0)
    finally:
        writer.close()


def unknown_frame(pad: int) -> bytes:
    """A well-formed frame of a type this version does not know: counted and dropped."""
    body = msgpack.packb({"v": WIRE_VERSION, "t": 250, "pad": b"x" * pad})
    return len(body).to_bytes(4, "big") + body


@pytest.fixture
async def serve(
    pki: dict[str, tuple[str, str, str]],
) -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    started: list[Transport] = []

    async def start(**limits: object) -> Server:
        ca, cert, key = pki["server"]
        metrics = Metrics()
        received: list[tuple[str, Message]] = []
        t = Transport(
            server_ctx=make_server_context(ca, cert, key),
            client_ctx=make_client_context(ca, cert, key),
            ca_certs=[identity.load_ca(Path(ca).parent).cert],
            trust_domain=TRUST,
            metrics=metrics,
            on_message=lambda peer, msg: received.append((peer, msg)),
            on_refused=lambda address: None,
            limits=Limits(**limits),  # type: ignore[arg-type]
        )
        host, port = await t.listen("127.0.0.1", 0)
        started.append(t)
        return Server(t, metrics, host, port, pki, received)

    yield start  # type: ignore[misc]
    for t in started:
        await t.close()


def empty_tables(t: Transport) -> bool:
    """Nothing counted for connections that are gone.  (A member's rate limiter
    may outlive its connections until its buckets refill: see Transport._limiter.)"""
    return t.inbound_count() == 0 and t.partial_bytes == 0 and not t._handshakes and not t._by_peer


# -- connections -------------------------------------------------------------


async def test_the_connection_cap_refuses_the_next_one_and_frees_a_slot_on_close(serve) -> None:
    s = await serve(max_inbound=3)
    held = [await s.tls(node) for node in ("a", "b", "c")]
    await until(lambda: len(s.transport._by_peer) == 3, "three authenticated connections")
    assert await refused(s, "a")
    assert s.rejected("inbound-connections") == 1
    assert s.transport.inbound_count() == 3
    assert not any(reader.at_eof() for reader, _ in held)
    # A closed one frees its slot for the next.
    held[0][1].close()
    await until(lambda: s.transport.inbound_count() == 2, "a slot freed")
    reader, writer = await s.tls("a")
    await until(lambda: len(s.transport._by_peer) == 3, "the newcomer authenticated")
    assert s.rejected("inbound-connections") == 1
    for _, w in [*held[1:], (reader, writer)]:
        w.close()
    await until(lambda: empty_tables(s.transport), "tables emptied")


async def test_one_address_cannot_hold_more_than_its_share_of_handshakes(serve) -> None:
    s = await serve(max_handshakes_per_address=2, max_handshakes=3, handshake_timeout=0.5)
    # Plain TCP clients that never say hello hold a handshake slot until its timeout.
    held = [await s.tcp("127.0.0.2"), await s.tcp("127.0.0.2")]
    await until(lambda: s.transport._handshakes.get("127.0.0.2") == 2, "two in handshake")
    third, _ = await s.tcp("127.0.0.2")
    assert await closed_by_server(third, 2.0)
    assert s.rejected("per-address-connections") == 1
    # Another address still gets in, up to the cap on all handshakes.
    held.append(await s.tcp("127.0.0.3"))
    await until(lambda: s.transport.inbound_count() == 3, "a third address in handshake")
    fourth, _ = await s.tcp("127.0.0.4")
    assert await closed_by_server(fourth, 2.0)
    assert s.rejected("handshakes") == 1
    # The held ones end at the handshake timeout, and give their slots back.
    for reader, _ in held:
        assert await closed_by_server(reader, 5.0)
    await until(lambda: empty_tables(s.transport), "slots given back")
    assert s.rejected("tls-handshake") == 3
    # An authenticated connection no longer counts against its address.
    conns = [await s.tls(node, "127.0.0.2") for node in ("a", "b", "c")]
    await until(lambda: len(s.transport._by_peer) == 3, "three members from one address")
    assert s.rejected("per-address-connections") == 1
    for _, w in conns:
        w.close()


async def test_a_member_holds_at_most_its_cap_of_connections_and_the_newest_wins(serve) -> None:
    s = await serve(max_connections_per_peer=2)
    first = await s.tls("a")
    second = await s.tls("a")
    other = await s.tls("b")
    await until(lambda: len(s.transport._by_peer.get("east/a", [])) == 2, "two of a")
    third = await s.tls("a")
    assert await closed_by_server(first[0], 2.0)
    await until(lambda: s.rejected("per-peer-connections") == 1, "eviction counted")
    assert len(s.transport._by_peer["east/a"]) == 2
    assert not second[0].at_eof() and not other[0].at_eof()
    # The survivors still deliver.
    third[1].write(encode_frame(Gossip("east/a")))
    other[1].write(encode_frame(Gossip("east/b")))
    await until(lambda: len(s.received) == 2, "frames from the survivors")
    assert sorted(peer for peer, _ in s.received) == ["east/a", "east/b"]
    for _, w in (second, third, other):
        w.close()
    await until(lambda: empty_tables(s.transport), "tables emptied")


# -- unfinished frames -------------------------------------------------------


async def test_a_trickled_frame_is_closed_at_the_frame_timeout(serve) -> None:
    s = await serve(frame_timeout=0.3)
    reader, writer = await s.tls("a")
    writer.write(encode_frame(Gossip("east/a")))  # a complete frame first: it is served
    writer.write((1 << 20).to_bytes(4, "big") + b"0123456789")
    await until(lambda: s.transport.partial_bytes == 14, "the partial frame held")

    async def trickle() -> None:
        for _ in range(200):  # at most 10 s
            if writer.is_closing():
                return
            writer.write(b"x")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader, 3.0)
    finally:
        task.cancel()
        writer.close()
    assert s.rejected("frame-timeout") == 1
    assert len(s.received) == 1
    await until(lambda: empty_tables(s.transport), "tables emptied")


async def test_frames_that_keep_completing_are_never_timed_out(serve) -> None:
    s = await serve(frame_timeout=0.2)
    reader, writer = await s.tls("a")
    frame = encode_frame(Gossip("east/a"))
    # Each frame arrives in two halves 0.1 s apart: every frame is on time,
    # and the connection lives longer than one frame timeout in total.
    for _ in range(5):
        writer.write(frame[:5])
        await asyncio.sleep(0.1)
        writer.write(frame[5:])
    await until(lambda: len(s.received) == 5, "five frames")
    assert not reader.at_eof()
    assert s.rejected("frame-timeout") == 0
    writer.close()


async def test_idleness_counts_from_the_last_complete_frame(serve) -> None:
    # A frame timeout far longer than the idle timeout.  Bytes keep trickling
    # until the server closes: if they counted as activity, only the frame
    # timeout could close it, and that close is counted.  The counter, not a
    # stopwatch, says which timeout fired.
    s = await serve(idle_timeout=0.4, frame_timeout=10.0)
    reader, writer = await s.tls("a")
    writer.write((1000).to_bytes(4, "big"))

    async def trickle() -> None:
        for _ in range(990):  # fewer bytes than the frame declares, 0.05 s apart
            if writer.is_closing():
                return
            writer.write(b"x")
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader, 30.0)
    finally:
        task.cancel()
        writer.close()
    assert s.rejected("frame-timeout") == 0  # idle, not a refusal


async def test_unfinished_frames_share_one_byte_budget(serve) -> None:
    s = await serve(max_partial_bytes=1000)
    a_reader, a_writer = await s.tls("a")
    frame = unknown_frame(5000)
    a_writer.write(frame[:604])
    await until(lambda: s.transport.partial_bytes == 604, "a's 604 bytes held")
    b_reader, b_writer = await s.tls("b")
    b_writer.write((5000).to_bytes(4, "big") + b"y" * 500)
    assert await closed_by_server(b_reader, 2.0)
    assert s.rejected("partial-bytes") == 1
    assert s.transport.partial_bytes == 604 and not a_reader.at_eof()
    # Finishing a's frame gives its bytes back; b may try again.
    a_writer.write(frame[604:])
    await until(lambda: s.rejected("unknown-type") == 1, "a's frame finished")
    assert s.transport.partial_bytes == 0
    b_reader, b_writer = await s.tls("b")
    b_writer.write((5000).to_bytes(4, "big") + b"y" * 500)
    await until(lambda: s.transport.partial_bytes == 504, "b's bytes held now")
    assert not a_reader.at_eof()
    for w in (a_writer, b_writer):
        w.close()
    await until(lambda: empty_tables(s.transport), "budget given back on close")


def test_a_declared_length_is_not_allocated_before_its_bytes_arrive() -> None:
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert decoder.split(MAX_FRAME_BYTES.to_bytes(4, "big") + b"0123456789") == []
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert decoder.pending == 14
    assert grown < 4096, grown


# -- rate limits ---------------------------------------------------------------


def rates(**overrides: float) -> RateLimits:
    values = {
        "frames_per_second": 1.0,
        "frames_burst": 5.0,
        "bytes_per_second": 1.0,
        "bytes_burst": float(MAX_FRAME_BYTES + 4),
        "abuse_after": 60.0,
        "abuse_gap": 60.0,
    }
    values.update(overrides)
    return RateLimits(**values)


async def test_frames_over_a_members_rate_are_dropped_not_the_connection(serve) -> None:
    s = await serve(rates=rates())
    reader, writer = await s.tls("a")
    writer.write(encode_frame(Gossip("east/a")) * 12)
    await until(lambda: s.rejected("rate-limit-frames") == 7, "seven drops")
    assert len(s.received) == 5
    # The bucket is the member's, not the connection's.
    other_reader, other_writer = await s.tls("a")
    other_writer.write(encode_frame(Gossip("east/a")))
    await until(lambda: s.rejected("rate-limit-frames") == 8, "the second connection's drop")
    # Another member has a bucket of its own.
    b_reader, b_writer = await s.tls("b")
    b_writer.write(encode_frame(Gossip("east/b")))
    await until(lambda: len(s.received) == 6, "b's frame")
    assert not reader.at_eof() and not other_reader.at_eof() and not b_reader.at_eof()
    for w in (writer, other_writer, b_writer):
        w.close()


async def test_bytes_over_a_members_rate_are_dropped_before_decoding(serve) -> None:
    s = await serve(rates=rates(frames_burst=100.0))
    reader, writer = await s.tls("a")
    big = unknown_frame(200 * 1024)  # 5 fit the 1 MiB burst
    writer.write(big * 8)
    await until(lambda: s.rejected("rate-limit-bytes") == 3, "three drops")
    # Only the five admitted frames were decoded (and found of an unknown type).
    assert s.rejected("unknown-type") == 5
    assert s.rejected("rate-limit-frames") == 0
    assert not reader.at_eof()
    writer.close()


async def test_a_member_over_its_rate_for_too_long_is_disconnected(serve) -> None:
    s = await serve(rates=rates(frames_per_second=20.0, abuse_after=0.3, abuse_gap=0.2))
    reader, writer = await s.tls("a")
    frame = encode_frame(Gossip("east/a"))

    async def flood() -> None:
        for _ in range(500):  # at most 5 s
            if writer.is_closing():
                return
            writer.write(frame * 5)  # 500 frames/s, 25 times the rate
            await asyncio.sleep(0.01)

    task = asyncio.create_task(flood())
    try:
        assert await closed_by_server(reader, 5.0)
    finally:
        task.cancel()
        writer.close()
    assert s.rejected("rate-limit-sustained") == 1
    assert s.rejected("rate-limit-frames") > 0


def test_the_default_rates_pass_an_honest_member_of_a_10000_node_pool() -> None:
    """A join answer (member list and 20 MiB of states), then steady gossip and syncs."""
    limiter = PeerLimiter(Limits().rates, now=0.0)
    join = [MAX_FRAME_BYTES] + [SYNC_CHUNK_BYTES] * 80 + [300] * 20
    assert all(limiter.admit(size, 0.0) is Verdict.PASS for size in join)
    t = 0.0
    while t < 120.0:  # 20 frames/s of gossip, probes and acks, a state sync every 5 s
        t += 0.05
        assert limiter.admit(2000, t) is Verdict.PASS, t
        if round(t * 20) % 100 == 0:
            for size in [64 * 1024] + [SYNC_CHUNK_BYTES] * 4:
                assert limiter.admit(size, t) is Verdict.PASS, t
    # A second full answer (a restart, a healed partition) passes as well.
    assert all(limiter.admit(size, t) is Verdict.PASS for size in join)


def test_limits_refuse_nonsense() -> None:
    with pytest.raises(ValueError):
        Limits(frame_timeout=0)
    with pytest.raises(ValueError):
        Limits(max_inbound=0)
    with pytest.raises(ValueError):
        Limits(rates=rates(bytes_burst=1000.0))


@settings(max_examples=200, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=9000), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=40000), max_size=12),
)
def test_the_decoder_splits_any_chunking_into_the_same_frames(
    bodies: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(len(b).to_bytes(4, "big") + b for b in bodies)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = FrameDecoder()
    got: list[bytes | object] = []
    sizes: list[int] = []
    for lo, hi in zip(points, points[1:], strict=False):
        got += decoder.split(stream[lo:hi])
        sizes += decoder.sizes
    assert got == bodies
    assert sizes == [4 + len(b) for b in bodies]
    assert decoder.pending == 0


def test_a_trickled_frame_holds_about_what_it_received() -> None:
    decoder = FrameDecoder()
    frame = (50_000).to_bytes(4, "big") + b"z" * 50_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # one byte at a time, as a trickling peer sends it
            assert decoder.split(frame[i : i + 1]) == []
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert decoder.pending == 20_000
    assert held < 20_000 * 1.25, held
    assert decoder.split(frame[20_000:]) == [b"z" * 50_000]


async def test_messages_to_more_addresses_than_the_outbound_cap_are_dropped(serve) -> None:
    server = await serve(max_outbound=2)
    t = server.transport
    msg = Gossip("east/x")
    # Nobody listens on these: the senders keep trying, holding their slots.
    for port in (1, 2, 3):
        t.send(f"127.0.0.1:{port}", msg)
    assert len(t._out) == 2
    assert server.metrics.rejected.labels("outbound-connections")._value.get() == 1
    t.send("127.0.0.1:1", msg)  # an address already held still queues
    assert len(t._out) == 2
