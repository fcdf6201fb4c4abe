"""End to end: a revoked certificate is refused by every agent, across restarts.

Four real agents (a, b, c, d); d registers an app.  The operator revokes d's
certificate with ``meshd ca revoke`` and hands the list to a alone with
``meshd revocation put``.  The list must reach b and c by gossip, d's records
must stop being served everywhere, d's handshakes must be refused, and a
restarted agent must still hold the list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.protocol.bounds import repair_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, Certs, run_meshd, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 8.0


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[list[AgentProc]]:
    root = tmp_path_factory.mktemp("four")
    agents = [AgentProc(root, certs, "a").start()]
    for n in ("b", "c", "d"):
        agents.append(AgentProc(root, certs, n, join=[agents[0].gossip]).start())
    yield agents
    for a in agents:
        a.stop()


def served(agent: AgentProc) -> set[str]:
    return {e["instance"] for e in agent.resolve("orders")}


def test_a_revoked_node_is_refused_everywhere_and_after_a_restart(
    four: list[AgentProc], certs: Certs, tmp_path: Path
) -> None:
    a, b, c, d = four
    for agent in four:
        agent.register("orders", f"orders-{agent.node}", 9200 + ord(agent.node[0]))
    bound = repair_bound(4, LOCAL) + SLACK
    wait_until(lambda: all(len(served(x)) == 4 for x in four), bound, "orders on all four")

    _, d_cert, _ = certs.issue("d", "east")
    crl = tmp_path / "crl.pem"
    run_meshd("ca", "revoke", "--ca", str(certs.ca_dir), "--cert", str(d_cert), "--out", str(crl))
    out = run_meshd("revocation", "put", str(crl), "--api", a.api).stdout
    assert "number 1" in out

    honest = [a, b, c]
    wait_until(
        lambda: all(x.get("/v1/revocations")["number"] == 1 for x in honest),
        bound,
        "the list on a, b and c",
    )
    wait_until(
        lambda: all("orders-d" not in served(x) for x in honest),
        bound,
        "d's records gone from a, b and c",
    )
    assert all(served(x) == {"orders-a", "orders-b", "orders-c"} for x in honest)
    # d's handshakes are refused from now on: it falls out of every view.
    wait_until(
        lambda: all(x.members().get("east/d") in ("dead", None) for x in honest),
        bound + 30,
        "d dead in every honest view",
    )
    assert any(x.metric("meshd_rejected_total", reason="bad-peer-cert") > 0 for x in honest)

    # Kept across a restart, and still refused.
    b.stop()
    b.start()
    assert b.get("/v1/revocations")["number"] == 1
    wait_until(lambda: served(b) == {"orders-a", "orders-b", "orders-c"}, bound, "b serving")


def test_a_renewed_certificate_signs_the_next_documents_and_survives_revoking_the_old(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Rotate a's certificate, then revoke the old one: a keeps being served
    (everything it says is signed anew), across restarts of both agents."""
    certs = Certs(tmp_path_factory.mktemp("pki2"))
    root = tmp_path_factory.mktemp("rot")
    a = AgentProc(root, certs, "a").start()
    b = AgentProc(root, certs, "b", join=[a.gossip]).start()
    try:
        bound = repair_bound(2, LOCAL) + SLACK
        a.register("orders", "orders-a", 9301)

        def signers_on_b() -> set[str]:
            return {r["signer"] for r in b.get("/v1/records") if r["node"] == "a"}

        wait_until(lambda: served(b) == {"orders-a"}, bound, "orders-a on b")
        (old,) = signers_on_b()
        inc_before = {m["node"]: m["incarnation"] for m in b.get("/v1/members")}["a"]

        # Renew: a new certificate for the same node, written over the files.
        _, cert, key = certs.issue("a", "east")
        renewed = root / "renewed"
        run_meshd(
            "cert", "issue", "--ca", str(certs.ca_dir), "--node", "a", "--cluster", "east",
            "--ip", "127.0.0.1", "--out", str(renewed),
        )  # fmt: skip
        (renewed / "a.key").replace(key)
        (renewed / "a.pem").replace(cert)
        wait_until(lambda: signers_on_b() not in ({old}, set()), bound, "a's documents re-signed")
        (new,) = signers_on_b()
        assert new != old
        # A new incarnation's claim, signed with the new key, reached b too.
        wait_until(
            lambda: {m["node"]: m["incarnation"] for m in b.get("/v1/members")}["a"] > inc_before,
            bound,
            "a's new incarnation on b",
        )

        # Revoke the old certificate: nothing of a's is signed by it any more.
        crl = root / "crl.pem"
        run_meshd("ca", "revoke", "--ca", str(certs.ca_dir), "--serial", old, "--out", str(crl))
        run_meshd("revocation", "put", str(crl), "--api", b.api)
        wait_until(lambda: a.get("/v1/revocations")["number"] == 1, bound, "the list on a")
        a.register("orders", "orders-a2", 9302)
        wait_until(lambda: served(b) == {"orders-a", "orders-a2"}, bound, "a still served")
        assert b.members()["east/a"] == "alive"

        # Both restart: the list and the new certificate stay in force.
        for agent in (a, b):
            agent.stop()
        a.start()
        b.start(join=[a.gossip])
        assert b.get("/v1/revocations")["number"] == 1
        wait_until(lambda: served(b) == {"orders-a", "orders-a2"}, bound, "a served after restarts")
        assert signers_on_b() == {new}
    finally:
        for agent in (a, b):
            agent.stop()
