"""End to end: a rogue peer holding a valid certificate lies to real agents.

Three honest ``meshd agent`` processes (cluster east) each register one
instance.  A rogue client holds a certificate of the same CA (of east, of
another cluster, without the bridge role) and speaks mutual TLS to their
gossip ports, sending one class of lie at a time.  After each: every honest
member alive in every honest view, every registration resolvable everywhere
within the repair bound, no incarnation or version jumped, the agents' memory
under a cap, and the refusals counted in ``meshd_rejected_total``.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from meshd.identity import NodeCert, StateSigner, issue_node_cert, load_ca, write_node_cert
from meshd.protocol.bounds import repair_bound
from meshd.protocol.config import Config
from meshd.wire import (
    AppRecord,
    Gossip,
    MemberClaim,
    MemberUpdate,
    Message,
    OriginState,
    PushPull,
    SignedClaim,
    SignedState,
    Status,
    encode_frame,
)
from tests.agents import AgentProc, Certs, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 8.0  # process scheduling on a loaded 2-core machine
MAX_INT = 2**63 - 1
#: Resident memory an honest agent may reach during the attacks (it idles
#: near 60 MB: interpreter, aiohttp, cryptography).
RSS_CAP_MB = 160


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[list[AgentProc]]:
    root = tmp_path_factory.mktemp("three")
    agents = [AgentProc(root, certs, "a").start()]
    for n in ("b", "c"):
        agents.append(AgentProc(root, certs, n, join=[agents[0].gossip]).start())
    for i, a in enumerate(agents):
        a.register("orders", f"orders-{a.node}", 9100 + i)
    wait_until(lambda: healthy(agents), repair_bound(3, LOCAL) + SLACK, "a healthy cluster")
    yield agents
    for a in agents:
        a.stop()


def healthy(agents: list[AgentProc]) -> bool:
    want = {f"orders-{a.node}" for a in agents}
    for a in agents:
        members = a.members()
        if any(members.get(f"east/{b.node}") != "alive" for b in agents):
            return False
        if {e["instance"] for e in a.resolve("orders")} != want:
            return False
    return True


def counters(agents: list[AgentProc]) -> dict[str, tuple[int, int]]:
    """(incarnation, highest document version) of each agent, as agent a sees them."""
    members = {m["node"]: m["incarnation"] for m in agents[0].get("/v1/members")}
    versions: dict[str, int] = {}
    for r in agents[0].get("/v1/records"):
        versions[r["node"]] = max(versions.get(r["node"], 0), r["version"])
    return {a.node: (members[a.node], versions.get(a.node, 0)) for a in agents}


def rss_mb(agent: AgentProc) -> float:
    assert agent.proc is not None
    for line in Path(f"/proc/{agent.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


class Rogue:
    """A peer with a certificate of the mesh's CA, speaking the real wire."""

    def __init__(self, tmp: Path, certs: Certs, node: str, cluster: str, **kw: object) -> None:
        ca = load_ca(certs.ca_dir)
        self.cert: NodeCert = issue_node_cert(ca, node, cluster, ips=["127.0.0.1"], **kw)  # type: ignore[arg-type]
        self.id = self.cert.member_id
        self.signer = StateSigner(self.cert)
        cert_file, key_file = write_node_cert(self.cert, tmp / f"rogue-{cluster}-{node}")
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.check_hostname = False
        self.ctx.load_verify_locations(cafile=str(certs.ca_dir / "ca.pem"))
        self.ctx.load_cert_chain(str(cert_file), str(key_file))

    def send(self, agent: AgentProc, *msgs: Message) -> ssl.SSLSocket:
        """Send ``msgs`` on a new connection and leave it open: closing with
        unread bytes (TLS 1.3 session tickets) would reset it, and the agent
        could lose frames it had not read yet.  The caller closes it."""
        host, _, port = agent.gossip.rpartition(":")
        tls = self.ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=5))
        for msg in msgs:
            tls.sendall(encode_frame(msg))
        return tls


def owner_cert(certs: Certs, node: str) -> NodeCert:
    """The honest node's own certificate file (the test holds every key)."""
    from meshd.identity import load_node_cert

    ca, cert, key = certs.issue(node, "east")
    return load_node_cert(cert, key, ca)


def attack_then_check(
    three: list[AgentProc], rogue: Rogue, msgs: list[Message], refused: str
) -> None:
    """Send ``msgs`` to every agent; wait until each has counted a refusal for
    ``refused`` (so the lies were read), then until the cluster is healthy."""
    before = counters(three)
    seen = [a.metric("meshd_rejected_total", reason=refused) for a in three]
    conns = [rogue.send(agent, *msgs) for agent in three]

    def read_by_all() -> bool:
        now = [a.metric("meshd_rejected_total", reason=refused) for a in three]
        return all(n > b for n, b in zip(now, seen, strict=True))

    try:
        wait_until(read_by_all, 10.0, f"every agent refusing with {refused}")
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: healthy(three), repair_bound(3, LOCAL) + SLACK, "the cluster healthy again")
    after = counters(three)
    for node, (inc, ver) in after.items():
        # A lie costs at most a refutation or a republish or two; never a jump.
        assert inc <= before[node][0] + 3, (node, before[node], after[node])
        assert ver <= before[node][1] + 3 * len(msgs) + 3, (node, before[node], after[node])
    for agent in three:
        assert rss_mb(agent) < RSS_CAP_MB, (agent.node, rss_mb(agent))


def accusations(three: list[AgentProc], by: str) -> list[Message]:
    out: list[Message] = []
    for victim in three:
        for status in (Status.DEAD, Status.SUSPECT):
            u = MemberUpdate(status, f"east/{victim.node}", MAX_INT, victim.gossip, by=by)
            out.append(Gossip(by, members=(u,)))
            out.append(PushPull(by, source_addr="127.0.0.1:1", members=(u,)))
    return out


@pytest.mark.parametrize("cluster", ["east", "west"])
def test_accusations_at_huge_incarnations_move_nothing(
    three: list[AgentProc], certs: Certs, tmp_path: Path, cluster: str
) -> None:
    rogue = Rogue(tmp_path, certs, f"mallory-{cluster}", cluster)
    # Each agent hears the lies about itself, and counts them as lies.
    attack_then_check(three, rogue, accusations(three, rogue.id), "claim:beyond-signed")


def test_forged_states_for_others_and_for_the_receiver(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    rogue = Rogue(tmp_path, certs, "mallory2", "east")
    msgs: list[Message] = []
    for victim in three:
        real = owner_cert(certs, victim.node)
        evil = AppRecord(app="orders", instance=f"orders-{victim.node}", address="6.6.6.6", port=1)
        state = OriginState(victim.node, "east", "", "", MAX_INT, apps=(evil,))
        body = state.encode()
        junk = SignedState(state.origin, MAX_INT, body, b"\x07" * 64, real.cert_der)
        assert isinstance(rogue.cert.key, ed25519.Ed25519PrivateKey)
        by_rogue = SignedState(
            state.origin, MAX_INT, body, rogue.cert.key.sign(body), rogue.cert.cert_der
        )
        msgs.append(Gossip(rogue.id, states=(junk, by_rogue)))
    attack_then_check(three, rogue, msgs, "bad-signature")
    for agent in three:
        assert all(e["address"] == "127.0.0.1" for e in agent.resolve("orders"))


def test_a_non_bridge_down_statement_is_refused(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    rogue = Rogue(tmp_path, certs, "mallory3", "east")
    down = tuple((f"east/{v.node}", MAX_INT) for v in three)
    state = OriginState("mallory3", "east", "", "", 1, bridge=True, down=down)
    attack_then_check(
        three, rogue, [Gossip(rogue.id, states=(rogue.signer.sign(state),))], "not-bridge"
    )


def test_phantom_members_and_impersonated_claims(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    rogue = Rogue(tmp_path, certs, "mallory4", "east")
    s = rogue.signer.sign_claim(MemberClaim(Status.ALIVE, rogue.id, 1, "127.0.0.1:1"))
    phantoms = []
    for k in range(300):
        mid = f"east/ghost{k}"
        body = MemberClaim(Status.ALIVE, mid, 1, f"127.0.0.1:{20000 + k}").encode()
        phantoms.append(
            MemberUpdate(
                Status.ALIVE,
                mid,
                1,
                f"127.0.0.1:{20000 + k}",
                by=mid,
                claim=SignedClaim(body, s.signature, s.cert),
            )  # fmt: skip
        )
    b = three[1]
    real = owner_cert(certs, b.node)
    lie = MemberClaim(Status.LEFT, f"east/{b.node}", MAX_INT, "127.0.0.1:1").encode()
    stolen = MemberUpdate(
        Status.LEFT, f"east/{b.node}", MAX_INT, "127.0.0.1:1", by=f"east/{b.node}",
        claim=SignedClaim(lie, b"\x01" * 64, real.cert_der),
    )  # fmt: skip
    # An old claim of b's, really signed by b's key: a replay of an earlier life.
    old = StateSigner(real).sign_claim(MemberClaim(Status.LEFT, f"east/{b.node}", 0, b.gossip))
    replay = MemberUpdate(
        Status.LEFT, f"east/{b.node}", 0, b.gossip, by=f"east/{b.node}", claim=old
    )
    attack_then_check(
        three,
        rogue,
        [Gossip(rogue.id, members=tuple(phantoms)), Gossip(rogue.id, members=(stolen, replay))],
        "claim:bad-signature",
    )
    for agent in three:
        assert not any(k.startswith("east/ghost") for k in agent.members())


def test_a_state_signed_by_an_expired_certificate_is_refused(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    rogue = Rogue(tmp_path, certs, "mallory5", "east")
    ca = load_ca(certs.ca_dir)
    old = issue_node_cert(ca, "retired", "east", days=1, now=datetime.now(UTC) - timedelta(days=5))
    rec = AppRecord(app="orders", instance="orders-retired", address="127.0.0.1", port=1)
    doc = StateSigner(old).sign(OriginState("retired", "east", "", "", 1, apps=(rec,)))
    attack_then_check(three, rogue, [Gossip(rogue.id, states=(doc,))], "expired-cert")
    for agent in three:
        assert "orders-retired" not in {e["instance"] for e in agent.resolve("orders")}


def test_an_expired_certificate_cannot_even_connect(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    ca = load_ca(certs.ca_dir)
    old = issue_node_cert(
        ca, "expired", "east", ips=["127.0.0.1"], days=1,
        now=datetime.now(UTC) - timedelta(days=5),
    )  # fmt: skip
    cert_file, key_file = write_node_cert(old, tmp_path / "expired")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(certs.ca_dir / "ca.pem"))
    ctx.load_cert_chain(str(cert_file), str(key_file))
    host, _, port = three[0].gossip.rpartition(":")
    u = MemberUpdate(Status.DEAD, "east/b", MAX_INT, three[1].gossip, by="east/expired")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        # TLS 1.3: the server checks our certificate after the client's side of
        # the handshake is done, so the refusal shows on the first read.  An
        # agent that took the certificate would say nothing: a timeout.
        try:
            tls = ctx.wrap_socket(raw)
            tls.sendall(encode_frame(Gossip("east/expired", members=(u,))))
            tls.settimeout(5)
            refused = tls.recv(1) == b""
        except TimeoutError:
            refused = False
        except (ssl.SSLError, ConnectionError, OSError):
            refused = True
    assert refused
    assert healthy(three)


def test_a_member_claiming_another_agents_address_sends_nothing_there(
    three: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    """The rogue's own, validly signed claim names agent b's gossip address,
    and it opens syncs asking for the answer there.  a and c find b's
    certificate at that address: everything meant for the rogue (its syncs'
    member lists, probes, gossip) is dropped and counted as misplaced, and
    the rogue is taken for gone.  b receives no answer it did not ask for."""
    rogue = Rogue(tmp_path, certs, "mallory6", "east")
    a, b, c = three
    claim = rogue.signer.sign_claim(MemberClaim(Status.ALIVE, rogue.id, 1, b.gossip))
    hello = MemberUpdate(Status.ALIVE, rogue.id, 1, b.gossip, by=rogue.id, claim=claim)
    msgs: list[Message] = [
        Gossip(rogue.id, members=(hello,)),
        PushPull(rogue.id, source_addr=b.gossip, join=True, members=(hello,)),
    ]
    unasked = b.metric("meshd_rejected_total", reason="unsolicited")
    seen = [x.metric("meshd_rejected_total", reason="misplaced") for x in (a, c)]
    conns = [rogue.send(x, *msgs) for x in (a, c)]
    try:
        wait_until(
            lambda: all(
                x.metric("meshd_rejected_total", reason="misplaced") > n
                for x, n in zip((a, c), seen, strict=True)
            ),
            10.0,
            "a and c dropping what was meant for the rogue",
        )
        wait_until(
            lambda: all(x.members().get(rogue.id) not in (None, "alive") for x in (a, c)),
            repair_bound(3, LOCAL) + SLACK,
            "the rogue taken for gone",
        )
    finally:
        for conn in conns:
            conn.close()
    assert b.metric("meshd_rejected_total", reason="unsolicited") == unasked
    wait_until(lambda: healthy(three), repair_bound(3, LOCAL) + SLACK, "the cluster healthy")
