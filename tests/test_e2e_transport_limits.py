"""End to end: a rogue holding valid certificates floods a real agent's gossip port.

One ``meshd agent`` (n0) with an honest member (n1) joined to it.  The rogue
holds certificates of the same CA for members that never joined and tries,
from 127.0.0.2 and up (Linux routes all of 127.0.0.0/8 to loopback):

- a handshake flood from one address (plain TCP that never says hello);
- more connections of one certificate than a member may hold;
- 300 TLS connections, each announcing a 1 MiB frame, sending a first part of
  it and then trickling a byte a second;
- a burst of frames far over one member's rate.

Throughout, n0's memory must stay under a stated cap, its API must answer and
n1 must stay alive in its view (and n0 in n1's); afterwards records still
spread.  Every refusal must show in ``meshd_rejected_total`` under its reason.
All loops are bounded in count and time.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path

import pytest

from meshd import identity
from meshd.agent.transport import (
    FRAME_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS_PER_PEER,
    MAX_HANDSHAKES_PER_ADDRESS,
    MAX_PARTIAL_BYTES,
    RATE_FRAMES_BURST,
)
from meshd.protocol.bounds import repair_bound
from meshd.protocol.config import Config
from meshd.wire import Gossip, encode_frame
from tests.agents import AgentProc, Certs, wait_until

pytestmark = pytest.mark.e2e

SLACK = 5.0  # process scheduling on a loaded 2-core machine
MIB = 1024 * 1024
#: Trickling connections, and what each sends of its 1 MiB frame up front:
#: together more than MAX_PARTIAL_BYTES, so the budget is exercised too.
TRICKLERS = 300
FIRST_PART = 128 * 1024
#: Memory the flood may add to the agent: every byte the budget lets it hold,
#: about 40 KB for each open TLS connection, and room for the allocator and
#: the TLS layer's read buffers.
RSS_ALLOWANCE = MAX_PARTIAL_BYTES + (TRICKLERS + MAX_HANDSHAKES_PER_ADDRESS) * 40_000 + 16 * MIB


def rss(agent: AgentProc) -> int:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def rejected(agent: AgentProc, reason: str) -> float:
    return agent.metric("meshd_rejected_total", reason=reason)


def is_closed(sock: socket.socket) -> bool:
    """True when the agent has ended this connection; never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    except (OSError, ssl.SSLError):
        return True


def rogue_contexts(certs: Certs, root: Path, count: int) -> list[ssl.SSLContext]:
    """Client contexts for ``count`` valid certificates of members that never joined."""
    ca = identity.load_ca(certs.ca_dir)
    contexts = []
    for i in range(count):
        cert, key = identity.write_node_cert(
            identity.issue_node_cert(ca, f"rogue-{i:02d}", "east", ips=["127.0.0.1"]),
            root / f"rogue-{i:02d}",
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(certs.ca_dir / "ca.pem")
        ctx.load_cert_chain(cert, key)
        contexts.append(ctx)
    return contexts


def tls(address: str, ctx: ssl.SSLContext, source: str) -> ssl.SSLSocket:
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname=host)


def both_alive(n0: AgentProc, n1: AgentProc) -> bool:
    return n0.members().get("east/n1") == "alive" and n1.members().get("east/n0") == "alive"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    certs = Certs(root / "pki")
    n0 = AgentProc(root, certs, "n0").start()
    n1 = AgentProc(root, certs, "n1", join=[n0.gossip]).start()
    wait_until(lambda: both_alive(n0, n1), repair_bound(2, Config.local()) + SLACK, "n0, n1")
    yield certs, root, n0, n1
    n1.stop()
    n0.stop()


def test_a_rogue_with_valid_certificates_cannot_exhaust_an_agent(pair) -> None:
    certs, root, n0, n1 = pair
    contexts = rogue_contexts(certs, root, TRICKLERS // MAX_CONNECTIONS_PER_PEER + 3)
    base = rss(n0)
    peak = base
    opened: list[socket.socket] = []

    def sample() -> None:
        nonlocal peak
        peak = max(peak, rss(n0))

    try:
        # 1. A handshake flood from one address: plain TCP that never says hello.
        before = rejected(n0, "per-address-connections")
        host, port = n0.gossip.rsplit(":", 1)
        flood = [
            socket.create_connection((host, int(port)), timeout=10, source_address=("127.0.0.2", 0))
            for _ in range(MAX_HANDSHAKES_PER_ADDRESS + 26)
        ]
        opened += flood
        wait_until(lambda: rejected(n0, "per-address-connections") >= before + 26, 10, "26 refused")
        # Well within the handshake timeout, so the held ones are still open.
        assert sum(is_closed(s) for s in flood) == 26
        assert rejected(n0, "per-address-connections") == before + 26

        # 2. One certificate, more connections than a member may hold: the oldest go.
        before = rejected(n0, "per-peer-connections")
        solo = [
            tls(n0.gossip, contexts[-1], "127.0.0.3") for _ in range(MAX_CONNECTIONS_PER_PEER + 12)
        ]
        opened += solo
        wait_until(lambda: rejected(n0, "per-peer-connections") >= before + 12, 10, "12 evicted")
        wait_until(lambda: all(is_closed(s) for s in solo[:12]), 10, "the oldest 12 closed")
        assert not any(is_closed(s) for s in solo[12:])

        # 3. 300 connections announcing 1 MiB frames, then trickling.
        partial_before = rejected(n0, "partial-bytes")
        timeout_before = rejected(n0, "frame-timeout")
        start = time.monotonic()
        tricklers = []
        for i in range(TRICKLERS):
            s = tls(n0.gossip, contexts[i // MAX_CONNECTIONS_PER_PEER], "127.0.0.4")
            with contextlib.suppress(OSError):
                s.sendall(MIB.to_bytes(4, "big") + b"\0" * FIRST_PART)
            tricklers.append(s)
            if i % 20 == 0:
                sample()
        opened += tricklers
        assert n0.get("/v1/health")["status"] == "ok"
        assert both_alive(n0, n1)
        deadline = start + FRAME_TIMEOUT + 20.0
        while time.monotonic() < deadline:  # a byte a second on each, until all are closed
            sample()
            alive = [s for s in tricklers if not is_closed(s)]
            if not alive:
                break
            for s in alive:
                with contextlib.suppress(OSError, ssl.SSLError):
                    s.setblocking(True)
                    s.sendall(b"\0")
            time.sleep(1.0)
        sample()
        assert all(is_closed(s) for s in tricklers), "trickling connections outlived the cap"
        assert time.monotonic() - start < FRAME_TIMEOUT + 20.0
        by_budget = rejected(n0, "partial-bytes") - partial_before
        by_timeout = rejected(n0, "frame-timeout") - timeout_before
        # More was sent up front than the budget holds, so some were refused at once.
        assert by_budget >= (TRICKLERS * (FIRST_PART + 4) - MAX_PARTIAL_BYTES) // (FIRST_PART + 4)
        assert by_budget + by_timeout == TRICKLERS
        assert peak - base < RSS_ALLOWANCE, f"RSS grew {(peak - base) / MIB:.1f} MiB"

        # 4. A burst far over one member's frame rate: dropped, the connection kept.
        before = rejected(n0, "rate-limit-frames")
        burst = tls(n0.gossip, contexts[-2], "127.0.0.5")
        opened.append(burst)
        frame = encode_frame(Gossip("east/rogue-" + f"{len(contexts) - 2:02d}"))
        count = int(RATE_FRAMES_BURST) * 3
        burst.sendall(frame * count)
        wait_until(
            lambda: rejected(n0, "rate-limit-frames") >= before + count // 2, 10, "drops counted"
        )
        assert not is_closed(burst)

        # The agent still serves and still gossips.
        assert n0.get("/v1/health")["status"] == "ok"
        assert both_alive(n0, n1)
        n1.register("after-flood", "after-flood-1", 4100)
        wait_until(
            lambda: [e["instance"] for e in n0.resolve("after-flood")] == ["after-flood-1"],
            repair_bound(2, Config.local()) + SLACK,
            "a record of n1 on n0 after the flood",
        )
        assert peak - base < RSS_ALLOWANCE
        print(f"agent RSS {base / MIB:.1f} MiB, peak {peak / MIB:.1f} MiB during the flood")
    finally:
        for sock in opened:
            with contextlib.suppress(OSError):
                sock.close()
    # The handshake flood ended at the handshake timeout, counted as such.
    wait_until(
        lambda: rejected(n0, "tls-handshake") >= MAX_HANDSHAKES_PER_ADDRESS,
        HANDSHAKE_TIMEOUT + SLACK,
        "held handshakes timed out",
    )
    assert both_alive(n0, n1)


def test_idle_api_connections_are_capped(pair) -> None:
    """MAX_API_CONNECTIONS idle connections to the API (a local user, or the
    network for an API off loopback): the next one is answered 503 and
    closed, gossip goes on, and once they close the API answers again."""
    import resource

    from meshd.api.listener import MAX_API_CONNECTIONS

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = MAX_API_CONNECTIONS + 256
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"this process may open {hard} files, the test needs {need}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    _, _, n0, n1 = pair
    host, port = n0.api.removeprefix("http://").rsplit(":", 1)
    before = rejected(n0, "api-connections")
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_API_CONNECTIONS):
            idle.append(socket.create_connection((host, int(port)), timeout=10))
        extra = socket.create_connection((host, int(port)), timeout=10)
        with extra:
            extra.settimeout(10)
            answer = b""
            while chunk := extra.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        assert b"too many open connections" in answer
        # The agent's gossip does not depend on its API: both stay alive.
        assert n1.members().get("east/n0") == "alive"
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: n0.call("GET", "/v1/health")[0] == 200, 10.0, "the API answering again")
    assert rejected(n0, "api-connections") > before
    assert both_alive(n0, n1)
