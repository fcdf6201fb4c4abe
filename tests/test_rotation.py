"""Tests for meshd.agent.rotation: which renewed certificate an agent takes, and how.

``load_rotated_cert`` runs on a fixed ``NOW``.  The rotator tests use real
TLS contexts (certificates valid on the wall clock) and check what a real
handshake presents after a swap; the agent is a stub that records
``rotate``.  The last tests run a real ``meshd agent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshd.agent import rotation
from meshd.agent.rotation import CertificateRotator, load_rotated_cert
from meshd.agent.transport import make_client_context, make_server_context
from meshd.identity import (
    CA,
    IdentityError,
    NodeCert,
    create_ca,
    issue_node_cert,
    load_node_cert,
    write_ca,
    write_node_cert,
)
from tests.agents import AgentProc, Certs, run_meshd, wait_until

NOW = datetime(2025, 1, 1, tzinfo=UTC)
_PEM = serialization.Encoding.PEM


@dataclass
class Files:
    ca: Path
    cert: Path
    key: Path


def install(nc: NodeCert, directory: Path) -> Files:
    """Write ``nc`` as the agent's files (n1.pem, n1.key) in ``directory``, whatever node it names.

    Through write_node_cert, which replaces each file atomically.
    """
    staging = directory / "staging"
    cert_path, key_path = write_node_cert(nc, staging)
    os.replace(cert_path, directory / "n1.pem")
    os.replace(key_path, directory / "n1.key")
    return Files(directory / "ca.pem", directory / "n1.pem", directory / "n1.key")


# ---------------------------------------------------------------------------
# load_rotated_cert.


@pytest.fixture(scope="module")
def ca() -> CA:
    return create_ca("mesh.local", now=NOW - timedelta(days=30))


@pytest.fixture
def setup(tmp_path: Path, ca: CA) -> tuple[NodeCert, Files]:
    write_ca(ca, tmp_path)
    current = issue_node_cert(ca, "n1", "east", now=NOW - timedelta(days=20), days=30)
    return current, install(current, tmp_path)


def test_a_renewed_certificate_for_the_same_node_is_taken(
    setup: tuple[NodeCert, Files], ca: CA, tmp_path: Path
) -> None:
    current, f = setup
    renewed = issue_node_cert(ca, "n1", "east", now=NOW, days=90, ips=["192.0.2.1"])
    install(renewed, tmp_path)
    got = load_rotated_cert(f.cert, f.key, f.ca, current, NOW)
    assert got.serial == renewed.serial != current.serial
    assert (got.cluster, got.node, got.bridge) == ("east", "n1", False)
    # A plain node may be granted the bridge role by a renewal (the CA decides).
    install(issue_node_cert(ca, "n1", "east", now=NOW, bridge=True), tmp_path)
    assert load_rotated_cert(f.cert, f.key, f.ca, current, NOW).bridge


def test_a_bridge_takes_its_renewed_bridge_certificate(tmp_path: Path, ca: CA) -> None:
    write_ca(ca, tmp_path)
    current = issue_node_cert(ca, "n1", "east", now=NOW - timedelta(days=1), bridge=True)
    f = install(issue_node_cert(ca, "n1", "east", now=NOW, bridge=True), tmp_path)
    got = load_rotated_cert(f.cert, f.key, f.ca, current, NOW)
    assert got.bridge and got.serial != current.serial


def test_a_bridge_may_not_lose_its_role(tmp_path: Path, ca: CA) -> None:
    write_ca(ca, tmp_path)
    current = issue_node_cert(ca, "n1", "east", now=NOW - timedelta(days=1), bridge=True)
    f = install(issue_node_cert(ca, "n1", "east", now=NOW), tmp_path)
    with pytest.raises(IdentityError, match="lacks the bridge role .* may not lose it silently"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)


@pytest.mark.parametrize(
    ("node", "cluster", "fragment"),
    [
        ("n2", "east", "is for node 'n2' in cluster 'east', not this agent's node 'n1'"),
        ("n1", "west", "is for node 'n1' in cluster 'west'"),
    ],
)
def test_another_identity_is_refused(
    setup: tuple[NodeCert, Files], ca: CA, tmp_path: Path, node: str, cluster: str, fragment: str
) -> None:
    current, f = setup
    install(issue_node_cert(ca, node, cluster, now=NOW), tmp_path)
    with pytest.raises(IdentityError, match=fragment):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)


def test_another_ca_is_refused(setup: tuple[NodeCert, Files], tmp_path: Path) -> None:
    current, f = setup
    other = create_ca("mesh.local", now=NOW - timedelta(days=1))
    install(issue_node_cert(other, "n1", "east", now=NOW), tmp_path)
    with pytest.raises(IdentityError, match="is not signed by the CA in"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)
    # Even when the CA file is changed to trust it too: peers trust the old CA only.
    f.ca.write_bytes(f.ca.read_bytes() + other.cert.public_bytes(_PEM))
    with pytest.raises(IdentityError, match="signed by another CA .* needs a restart"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)
    # Another trust domain altogether.
    corp = create_ca("corp.test", now=NOW - timedelta(days=1))
    install(issue_node_cert(corp, "n1", "east", now=NOW), tmp_path)
    f.ca.write_bytes(corp.cert.public_bytes(_PEM))
    with pytest.raises(IdentityError, match="trust domain 'corp.test'"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)


def test_an_expired_or_future_certificate_is_refused(
    setup: tuple[NodeCert, Files], ca: CA, tmp_path: Path
) -> None:
    current, f = setup
    install(issue_node_cert(ca, "n1", "east", now=NOW - timedelta(days=10), days=2), tmp_path)
    with pytest.raises(IdentityError, match="expired at"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)
    install(issue_node_cert(ca, "n1", "east", now=NOW + timedelta(days=2)), tmp_path)
    with pytest.raises(IdentityError, match="is not valid until"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)


def test_a_key_that_does_not_match_is_refused(
    setup: tuple[NodeCert, Files], ca: CA, tmp_path: Path
) -> None:
    current, f = setup
    old_key = f.key.read_bytes()
    install(issue_node_cert(ca, "n1", "east", now=NOW), tmp_path)
    f.key.write_bytes(old_key)
    with pytest.raises(IdentityError, match="does not match certificate"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW)


def test_a_revoked_certificate_is_refused(
    setup: tuple[NodeCert, Files], ca: CA, tmp_path: Path
) -> None:
    current, f = setup
    renewed = issue_node_cert(ca, "n1", "east", now=NOW)
    install(renewed, tmp_path)
    with pytest.raises(IdentityError, match=f"serial {renewed.serial:x}\\) is revoked"):
        load_rotated_cert(f.cert, f.key, f.ca, current, NOW, revoked={renewed.serial}.__contains__)
    assert load_rotated_cert(f.cert, f.key, f.ca, current, NOW, revoked={1}.__contains__)


# ---------------------------------------------------------------------------
# The rotator: real TLS contexts, a stub agent.


class StubAgent:
    def __init__(self) -> None:
        self.rotated: list[NodeCert] = []
        self.refuse: Exception | None = None

    def rotate(self, node_cert: NodeCert) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.rotated.append(node_cert)


class AsyncStubAgent(StubAgent):
    async def rotate(self, node_cert: NodeCert) -> None:  # type: ignore[override]
        await asyncio.sleep(0)
        super().rotate(node_cert)


@dataclass
class StubTransport:
    server_ctx: ssl.SSLContext
    client_ctx: ssl.SSLContext


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> tuple[int, int]:
    """(serial the server presents, serial the client presents), over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {id(client): False, id(server): False}
    for _ in range(20):
        for end in (client, server):
            if not done[id(end)]:
                try:
                    end.do_handshake()
                    done[id(end)] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    # TLS 1.3 sends the client's certificate after the client considers itself done.
    with pytest.raises(ssl.SSLWantReadError):
        server.read(1)
    by_server = client.getpeercert(binary_form=True)
    by_client = server.getpeercert(binary_form=True)
    assert by_server and by_client
    return (
        x509.load_der_x509_certificate(by_server).serial_number,
        x509.load_der_x509_certificate(by_client).serial_number,
    )


@dataclass
class Rig:
    ca: CA
    files: Files
    current: NodeCert
    peer: tuple[ssl.SSLContext, ssl.SSLContext]  # a peer's (server, client) contexts
    transports: list[StubTransport]
    agent: StubAgent
    rotator: CertificateRotator

    def presented(self) -> tuple[int, int]:
        """Serials our transports present: as a server to the peer, as a client to the peer."""
        t = self.transports[0]
        as_server, _ = handshake(t.server_ctx, self.peer[1])
        _, as_client = handshake(self.peer[0], t.client_ctx)
        return as_server, as_client

    def renew(self, node: str = "n1", bridge: bool = False) -> NodeCert:
        nc = issue_node_cert(self.ca, node, "east", bridge=bridge)
        install(nc, self.files.ca.parent)
        return nc


def make_rig(tmp_path: Path, agent: StubAgent | None = None, bridge: bool = False) -> Rig:
    ca = create_ca("mesh.local")
    write_ca(ca, tmp_path)
    current = issue_node_cert(ca, "n1", "east", bridge=bridge)
    f = install(current, tmp_path)
    p_cert, p_key = write_node_cert(issue_node_cert(ca, "peer", "east"), tmp_path / "peer")
    peer = (
        make_server_context(str(f.ca), str(p_cert), str(p_key)),
        make_client_context(str(f.ca), str(p_cert), str(p_key)),
    )
    ctx = (
        make_server_context(str(f.ca), str(f.cert), str(f.key)),
        make_client_context(str(f.ca), str(f.cert), str(f.key)),
    )
    transports = [StubTransport(*ctx), StubTransport(*ctx)]  # LAN and WAN
    agent = agent or StubAgent()
    rotator = CertificateRotator(
        ca_file=f.ca,
        cert_file=f.cert,
        key_file=f.key,
        current=load_node_cert(f.cert, f.key, f.ca),
        transports=[transports[0], None, transports[1]],
        agent=agent,
    )
    return Rig(ca, f, current, peer, transports, agent, rotator)


def contexts(rig: Rig) -> list[tuple[ssl.SSLContext, ssl.SSLContext]]:
    return [(t.server_ctx, t.client_ctx) for t in rig.transports]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_reload_swaps_to_a_renewed_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    assert rig.presented() == (rig.current.serial, rig.current.serial)
    renewed = rig.renew()
    with caplog.at_level(logging.INFO, logger="meshd.agent"):
        assert await rig.rotator.reload("SIGHUP") is True
    assert [nc.serial for nc in rig.agent.rotated] == [renewed.serial]
    assert rig.rotator.current.serial == renewed.serial
    assert rig.presented() == (renewed.serial, renewed.serial)
    assert contexts(rig)[0] == contexts(rig)[1]  # LAN and WAN alike
    (line,) = [r.getMessage() for r in caplog.records]
    until = f"{renewed.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    assert line == (
        f"rotated certificate: serial {rig.current.serial:x} -> {renewed.serial:x},"
        f" valid until {until}"
    )


async def test_an_async_rotate_is_awaited(tmp_path: Path) -> None:
    rig = make_rig(tmp_path, AsyncStubAgent())
    renewed = rig.renew()
    assert await rig.rotator.reload() is True
    assert [nc.serial for nc in rig.agent.rotated] == [renewed.serial]


@pytest.mark.parametrize("bad", ["other-node", "lost-bridge", "key-mismatch", "garbage"])
async def test_reload_of_a_bad_file_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    rig = make_rig(tmp_path, bridge=True)
    before = contexts(rig)
    if bad == "other-node":
        rig.renew("n2", bridge=True)
    elif bad == "lost-bridge":
        rig.renew()
    elif bad == "key-mismatch":
        old_key = rig.files.key.read_bytes()
        rig.renew(bridge=True)
        rig.files.key.write_bytes(old_key)
    else:
        rig.files.cert.write_text("-----BEGIN CERTIFICATE-----\nhalf")
    with caplog.at_level(logging.INFO, logger="meshd.agent"):
        assert await rig.rotator.reload("SIGHUP") is False
    assert rig.agent.rotated == []
    assert contexts(rig) == before
    assert rig.rotator.current.serial == rig.current.serial
    assert rig.presented() == (rig.current.serial, rig.current.serial)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("certificate not rotated (SIGHUP): ")
    assert line.endswith(f"; still using serial {rig.current.serial:x}")
    assert errors(caplog) == [line] and "\n" not in line


async def test_an_agent_that_refuses_keeps_the_old_contexts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    rig.agent.refuse = ValueError("cannot re-sign now")
    before = contexts(rig)
    rig.renew()
    with caplog.at_level(logging.ERROR, logger="meshd.agent"):
        assert await rig.rotator.reload() is False
    assert contexts(rig) == before and rig.rotator.current.serial == rig.current.serial
    assert "the agent could not take it: cannot re-sign now" in errors(caplog)[0]


async def test_reload_of_unchanged_files_is_quiet_and_calls_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    before = contexts(rig)
    with caplog.at_level(logging.INFO, logger="meshd.agent"):
        assert await rig.rotator.reload() is True
    assert rig.agent.rotated == [] and contexts(rig) == before
    assert [r.getMessage() for r in caplog.records] == [
        f"reloaded certificates from {rig.files.cert}: unchanged, serial {rig.current.serial:x}"
    ]


async def test_reload_refuses_a_revoked_renewal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    revoked: set[int] = set()
    asked: list[int] = []

    def is_revoked(serial: int) -> bool:
        asked.append(serial)
        return serial in revoked

    rig.rotator.revoked = is_revoked
    assert await rig.rotator.reload() is True  # the certificate in use is not asked about
    assert asked == []
    renewed = rig.renew()
    revoked.add(renewed.serial)
    with caplog.at_level(logging.ERROR, logger="meshd.agent"):
        assert await rig.rotator.reload() is False
    assert f"(serial {renewed.serial:x}) is revoked" in errors(caplog)[0]
    assert rig.agent.rotated == [] and asked == [renewed.serial]


async def test_poll_takes_files_replaced_in_two_steps(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    renewed = issue_node_cert(rig.ca, "n1", "east")
    cert_path, key_path = write_node_cert(renewed, tmp_path / "new")
    with caplog.at_level(logging.INFO, logger="meshd.agent"):
        await rig.rotator.poll()  # nothing changed yet
        os.replace(cert_path, rig.files.cert)  # the certificate first: its key is not there yet
        await rig.rotator.poll()
        assert rig.agent.rotated == [] and errors(caplog) == []
        os.replace(key_path, rig.files.key)
        await rig.rotator.poll()
    assert [nc.serial for nc in rig.agent.rotated] == [renewed.serial]
    assert rig.presented() == (renewed.serial, renewed.serial)
    assert errors(caplog) == []
    await rig.rotator.poll()  # the same files again: nothing more
    assert len(rig.agent.rotated) == 1


async def test_poll_reports_a_bad_file_once_it_stands_still(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path)
    before = contexts(rig)
    rig.renew("n2")
    with caplog.at_level(logging.INFO, logger="meshd.agent"):
        await rig.rotator.poll()  # could be a file caught mid-write: quiet
        assert errors(caplog) == []
        await rig.rotator.poll()  # the same files a poll later: the operator's mistake
        await rig.rotator.poll()
        await rig.rotator.poll()
    (line,) = errors(caplog)
    assert line.startswith(f"certificate not rotated ({rig.files.cert} changed): ")
    assert "is for node 'n2'" in line
    assert rig.agent.rotated == [] and contexts(rig) == before
    # A fixed file is taken at the next poll.
    renewed = rig.renew()
    await rig.rotator.poll()
    assert [nc.serial for nc in rig.agent.rotated] == [renewed.serial]


async def test_watch_takes_a_renewed_certificate_within_its_interval(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    watcher = asyncio.create_task(rig.rotator.watch(interval=0.02))
    try:
        renewed = rig.renew()
        async with asyncio.timeout(5):
            while not rig.agent.rotated:
                await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
    assert rig.rotator.current.serial == renewed.serial
    assert rotation.CERT_POLL_INTERVAL == 1.0


async def test_sighup_rotates(tmp_path: Path) -> None:
    rig = make_rig(tmp_path)
    renewed = rig.renew()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, rig.rotator.reload_soon)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(5):
            while not rig.agent.rotated:
                await asyncio.sleep(0.01)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    assert rig.presented() == (renewed.serial, renewed.serial)


# ---------------------------------------------------------------------------
# A real agent.


def presented_serial(agent: AgentProc, certs: Certs, client: str) -> int:
    """The serial the agent's gossip listener presents to a TLS client."""
    ca, cert, key = certs.issue(client, "east")
    ctx = make_client_context(str(ca), str(cert), str(key))
    host, port = agent.gossip.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        ctx.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_in(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


@pytest.fixture
def lone(tmp_path: Path) -> Iterator[tuple[AgentProc, Certs]]:
    certs = Certs(tmp_path / "pki")
    agent = AgentProc(tmp_path, certs, "n0").start()
    yield agent, certs
    agent.stop()


@pytest.mark.e2e
def test_e2e_agent_refuses_another_nodes_certificate(lone: tuple[AgentProc, Certs]) -> None:
    agent, certs = lone
    ca, cert, key = certs.issue("n0", "east")
    old = serial_in(cert)
    assert presented_serial(agent, certs, "probe") == old
    # Another node's files copied over n0's: the watcher refuses them.
    _, other_cert, other_key = certs.issue("n9", "east")
    os.replace(other_cert, cert)
    os.replace(other_key, key)
    wait_until(
        lambda: any("certificate not rotated" in ln for ln in agent.lines), 10, "refusal logged"
    )
    (line,) = [ln for ln in agent.lines if "certificate not rotated" in ln]
    assert "is for node 'n9'" in line and f"still using serial {old:x}" in line
    assert presented_serial(agent, certs, "probe") == old
    # SIGHUP says the same at once, and the agent keeps serving.
    agent.signal(signal.SIGHUP)
    wait_until(
        lambda: sum("certificate not rotated (SIGHUP)" in ln for ln in agent.lines) == 1,
        10,
        "SIGHUP refusal logged",
    )
    assert agent.running and agent.get("/v1/health")["status"] == "ok"
    assert presented_serial(agent, certs, "probe") == old


@pytest.mark.e2e
def test_e2e_agent_takes_a_renewed_certificate(lone: tuple[AgentProc, Certs]) -> None:
    agent, certs = lone
    ca, cert, key = certs.issue("n0", "east")
    old = serial_in(cert)
    renewed = certs.root / "renewed"
    run_meshd(
        "cert", "issue", "--ca", str(certs.ca_dir), "--node", "n0", "--cluster", "east",
        "--ip", "127.0.0.1", "--out", str(renewed),
    )  # fmt: skip
    new = serial_in(renewed / "n0.pem")
    os.replace(renewed / "n0.key", key)
    os.replace(renewed / "n0.pem", cert)
    wait_until(lambda: presented_serial(agent, certs, "probe") == new, 10, "new cert presented")
    assert any(f"rotated certificate: serial {old:x} -> {new:x}" in ln for ln in agent.lines)
    assert agent.get("/v1/health")["status"] == "ok"


def served_serial(server_ctx: ssl.SSLContext, ca_file: Path) -> int:
    """The serial an HTTPS server context presents to a client checking it
    against ``ca_file`` (no client certificate), over memory BIOs."""
    client_ctx = ssl.create_default_context(cafile=str(ca_file))
    client_ctx.check_hostname = False
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = client.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


async def test_reload_loads_the_renewed_certificate_into_the_https_api(tmp_path: Path) -> None:
    from meshd.agent.run import _api_context

    rig = make_rig(tmp_path)
    api = _api_context(rig.files.cert, rig.files.key)
    rig.rotator.api_contexts = [api]
    assert served_serial(api, rig.files.ca) == rig.current.serial
    renewed = rig.renew()
    assert await rig.rotator.reload("SIGHUP") is True
    assert served_serial(api, rig.files.ca) == renewed.serial
