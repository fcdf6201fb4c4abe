"""What the gossip transport tells the agent about a peer's connections ending.

Two in-process ``Transport`` objects over real TLS on 127.0.0.1.  A peer that
goes away (its transport aborts every connection and stops listening, as a
killed process's kernel does) is reported closed, by member id for the
connection it opened and by address for ours, and our next connect to it is
refused.  A connection closed because it sat idle is not reported.  A message
meant for one member is never written to a connection whose peer certificate
names another: it is dropped and reported as misplaced.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshd import identity
from meshd.agent.transport import (
    RTO_MAX_MS,
    TCP_RTO_MAX_MS,
    TCP_THIN_LINEAR_TIMEOUTS,
    Limits,
    Transport,
    make_client_context,
    make_server_context,
)
from meshd.metrics import Metrics
from meshd.wire import Gossip
from tests.fakes import until, write_node_pki

TRUST = "mesh.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    return write_node_pki(tmp_path_factory.mktemp("pki"), TRUST, ("a", "b"))


@dataclass
class Peer:
    transport: Transport
    address: str
    closed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    received: list[tuple[str, str]] = field(default_factory=list)
    misplaced: list[tuple[str, str]] = field(default_factory=list)


@pytest.fixture
async def peers(
    pki: dict[str, tuple[str, str, str]],
) -> AsyncIterator[Callable[..., asyncio.Future[Peer]]]:
    made: list[Transport] = []

    async def start(node: str, **limits: object) -> Peer:
        ca, cert, key = pki[node]
        closed: list[str] = []
        refused: list[str] = []
        received: list[tuple[str, str]] = []
        misplaced: list[tuple[str, str]] = []
        t = Transport(
            server_ctx=make_server_context(ca, cert, key),
            client_ctx=make_client_context(ca, cert, key),
            ca_certs=[identity.load_ca(Path(ca).parent).cert],
            trust_domain=TRUST,
            metrics=Metrics(),
            on_message=lambda peer, msg: received.append((peer, msg.source)),
            on_refused=refused.append,
            on_closed=closed.append,
            on_misplaced=lambda member, address: misplaced.append((member, address)),
            limits=Limits(**limits),  # type: ignore[arg-type]
        )
        host, port = await t.listen("127.0.0.1", 0)
        made.append(t)
        return Peer(t, f"{host}:{port}", closed, refused, received, misplaced)

    yield start  # type: ignore[misc]
    for t in made:
        await t.close()


async def talking(a: Peer, b: Peer) -> None:
    """A connection each way between ``a`` and ``b``, each with a frame on it."""
    a.transport.send(b.address, Gossip("east/a"))
    b.transport.send(a.address, Gossip("east/b"))

    def established(x: Peer, y: Peer) -> bool:
        out = x.transport._out.get(y.address)
        mine = f"east/{'a' if x is a else 'b'}"
        return out is not None and out.writer is not None and mine in y.transport._by_peer

    await until(lambda: established(a, b) and established(b, a), "a connection each way")


async def test_a_peer_that_goes_away_is_reported_closed_both_ways_then_refused(peers) -> None:
    a, b = await peers("a"), await peers("b")
    await talking(a, b)
    assert a.closed == []
    await b.transport.close()  # every connection aborted, the listener gone
    await until(lambda: set(a.closed) == {"east/b", b.address}, "both connections reported")
    # The next message is not written into the dead connection: a new connect,
    # refused, so the agent hears of it at once.
    a.transport.send(b.address, Gossip("east/a"))
    await until(lambda: a.refused == [b.address], "the connect refused")


async def test_a_connection_closed_for_idleness_is_not_reported(peers) -> None:
    a, b = await peers("a", idle_timeout=0.3), await peers("b", idle_timeout=0.3)
    await talking(a, b)
    # Both idle timers close both connections (each side's, whichever first).
    await until(
        lambda: a.transport.inbound_count() == 0 and b.transport.inbound_count() == 0,
        "the idle connections closed",
    )
    await asyncio.sleep(0)  # let the watchers of our own connections see their end
    await until(lambda: not a.transport._watchers and not b.transport._watchers, "watchers done")
    assert a.closed == [] and b.closed == []
    assert a.refused == [] and b.refused == []


async def test_a_message_for_another_member_is_never_written_there(peers) -> None:
    """The address came from a peer's word (a claim naming another agent's
    address): what was meant for that member is dropped once the handshake
    shows b's certificate, and reported; b's own messages and a seed's
    (recipient unknown) go through on the same connection."""
    a, b = await peers("a"), await peers("b")
    rejected = a.transport.metrics.rejected.labels("misplaced")
    a.transport.send(b.address, Gossip("east/a"), to="east/mallory")
    a.transport.send(b.address, Gossip("east/a", sync=True), to="east/b")
    a.transport.send(b.address, Gossip("east/a"), to="")
    await until(lambda: len(b.received) == 2, "b's own and the seed's message")
    await until(lambda: a.misplaced == [("east/mallory", b.address)], "the misplaced report")
    assert b.received == [("east/a", "east/a")] * 2
    assert rejected._value.get() == 1
    # Later frames for the liar on the open connection: dropped as well.
    a.transport.send(b.address, Gossip("east/a"), to="east/mallory")
    a.transport.send(b.address, Gossip("east/a"), to="east/b")
    await until(lambda: len(b.received) == 3, "b's next message")
    await until(lambda: len(a.misplaced) == 2, "the second report")
    assert rejected._value.get() == 2


def _rto_max_supported() -> bool:
    """Whether this kernel has TCP_RTO_MAX_MS (Linux 6.15 and later)."""
    with socket.socket() as s:
        try:
            s.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS)
        except OSError:
            return False
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux TCP options")
async def test_gossip_connections_retransmit_on_short_timeouts_both_ways(peers) -> None:
    """A stalled thin stream must not silence a peer for seconds under WAN
    loss: both the connection we open and the one we accept ask the kernel
    not to double the retransmission timeout (TCP_THIN_LINEAR_TIMEOUTS) and,
    where it can, to cap it at a second (TCP_RTO_MAX_MS)."""
    a, b = await peers("a"), await peers("b")
    await talking(a, b)
    writer = a.transport._out[b.address].writer
    assert writer is not None
    ours = writer.get_extra_info("socket")
    (accepted,) = b.transport._by_peer["east/a"]
    assert accepted.raw is not None
    theirs = accepted.raw.get_extra_info("socket")
    capped = _rto_max_supported()
    for sock in (ours, theirs):
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_THIN_LINEAR_TIMEOUTS) == 1
        if capped:
            assert sock.getsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS) == RTO_MAX_MS
