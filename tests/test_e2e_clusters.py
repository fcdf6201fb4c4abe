"""End to end across clusters: three clusters of three real agents on 127.0.0.1.

east (bridge e0), west (bridges w0 and w1, behind a gateway) and central
(bridge c0), certificates per cluster from one CA.  Agents run the ``local``
profile in both pools, so the bounds below are those of
``meshd.protocol.bounds`` for ``Config.local()``, plus scheduling slack.
"""

from __future__ import annotations

import time

import pytest

from meshd.protocol.bounds import detection_bound, repair_bound, spread_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, Certs, start_in_cluster, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 8.0
#: A change crosses: detection in its LAN, the WAN pool, then the asker's LAN.
CROSS = detection_bound(3, LOCAL) + 2 * spread_bound(4, LOCAL) + repair_bound(4, LOCAL) + SLACK
SPREAD = 2 * repair_bound(4, LOCAL) + SLACK
GATEWAY = "127.0.0.1:15443"


def _wan_addr(agent: AgentProc) -> str:
    line = next(ln for ln in agent.lines if "bridge: WAN gossip on" in ln)
    return line.rsplit(" ", 1)[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("mesh")
    certs = Certs(root / "pki")
    policy = root / "central-policy.toml"
    policy.write_text('failover = ["west", "east"]\n')
    agents: dict[str, AgentProc] = {}

    def start(name, cluster, bridge=False, join=None, wan_join=None, extra=()):
        a = start_in_cluster(
            root, certs, name, cluster, bridge=bridge, join=join, wan_join=wan_join, extra=extra
        )
        agents[name] = a
        return a

    try:
        e0 = start("e0", "east", bridge=True)
        wan_seed = _wan_addr(e0)
        w_extra = ["--gateway", GATEWAY]
        w0 = start("w0", "west", bridge=True, wan_join=[wan_seed], extra=w_extra)
        c_extra = ["--policy", str(policy)]
        c0 = start("c0", "central", bridge=True, wan_join=[wan_seed], extra=c_extra)
        start("w1", "west", bridge=True, join=[w0.gossip], wan_join=[wan_seed], extra=w_extra)
        for i in (1, 2):
            start(f"e{i}", "east", join=[e0.gossip])
            start(f"w{i + 1}", "west", join=[w0.gossip], extra=w_extra)
            start(f"c{i}", "central", join=[c0.gossip], extra=c_extra)
        agents["_policy"] = policy  # type: ignore[assignment]
        yield agents
    finally:
        for a in agents.values():
            if isinstance(a, AgentProc):
                a.stop()


def instances(agent, app, query=""):
    return [e["instance"] for e in agent.resolve(app, query)]


def test_cross_cluster_lookup_failover_export_gateway_and_policy(mesh):
    e1, e2, w2, w3, c1, c2 = (mesh[n] for n in ("e1", "e2", "w2", "w3", "c1", "c2"))
    e2.register("orders", "orders-east", 3500)
    w2.register("orders", "orders-west", 3501)
    e1.register("secret", "secret-1", 3600, export=["west"])
    c2.register("billing", "billing-1", 3700)

    wait_until(
        lambda: (
            set(instances(c1, "orders")) == {"orders-east", "orders-west"}
            and set(instances(e1, "orders")) == {"orders-east", "orders-west"}
            and instances(w3, "secret") == ["secret-1"]
            and instances(e1, "billing") == ["billing-1"]
        ),
        SPREAD + 20,
        "records spread to every cluster",
    )
    # East answers east first (its own cluster's copy, tier cluster or nearer).
    east_view = e1.resolve("orders")
    assert east_view[0]["instance"] == "orders-east"
    assert east_view[0]["tier"] in ("node", "zone", "region", "cluster")
    # West is behind a gateway: east gets the gateway's address and the SNI name.
    west_ep = next(e for e in east_view if e["instance"] == "orders-west")
    assert (west_ep["address"], west_ep["port"]) == ("127.0.0.1", 15443)
    assert west_ep["gateway"] == {
        "address": "127.0.0.1",
        "port": 15443,
        "sni": "orders-west.orders.default.west.mesh.local",
    }
    # Inside west the same endpoint stays direct.
    assert [(e["port"], "gateway" in e) for e in w3.resolve("orders")][0] == (3501, False)
    # Central follows its failover list: west, then east.
    assert instances(c1, "orders") == ["orders-west", "orders-east"]
    assert [e["tier"] for e in c1.resolve("orders")] == ["failover", "failover"]
    # One healthy copy is enough (min_healthy 1): the rest are listed as standby.
    assert [e.get("active", True) for e in c1.resolve("orders")] == [True, False]
    assert "active" not in east_view[0] and west_ep["active"] is False

    # An app exported only to west never reaches central's stores (bridge included).
    for name in ("c0", "c1", "c2"):
        held = mesh[name].get("/v1/records")
        assert not any("secret-1" in r["apps"] for r in held), name
        assert not any(r["origin"].startswith("east/e1#") for r in held), name
    assert any("secret-1" in r["apps"] for r in mesh["w0"].get("/v1/records"))

    # A policy edit changes the order of answers within a second.
    policy = mesh["_policy"]
    policy.write_text('failover = ["east", "west"]\n')
    edited = time.monotonic()
    wait_until(lambda: instances(c1, "orders") == ["orders-east", "orders-west"], 5, "new order")
    assert time.monotonic() - edited < 1.5  # within a second, plus one poll of the API
    # An invalid policy is refused with a clear error and the old one stays.
    status, body, _ = c1.call("PUT", "/v1/policy", {"failover": ["not a cluster!"]})
    assert status == 400 and "failover" in body["error"]
    assert c1.get("/v1/policy")["failover"] == ["east", "west"]

    # Kill east's instance node: east's lookups fail over to west.
    e2.kill()
    took = wait_until_timed(lambda: instances(e1, "orders") == ["orders-west"], CROSS)
    print(f"\n  east failed over to west in {took:.1f} s (bound {CROSS:.1f} s)")
    assert e1.resolve("orders")[0]["tier"] == "any"
    wait_until(lambda: instances(c1, "orders") == ["orders-west"], CROSS, "central drops it")

    # Kill one of west's two bridges: nothing lost, nothing unreachable.
    mesh["w1"].kill()
    time.sleep(0)  # (no sync point needed: we check a steady state for a while)
    deadline = time.monotonic() + detection_bound(4, LOCAL) + SLACK
    while time.monotonic() < deadline:
        assert instances(c1, "orders") == ["orders-west"]
        assert all(row["reachable"] for row in c1.get("/v1/clusters"))
        time.sleep(0.5)

    # Kill central's only bridge: central's records turn unreachable elsewhere,
    # and come back when it restarts.
    mesh["c0"].kill()
    wait_until(
        lambda: (
            instances(e1, "billing") == []
            and [e.get("reachable") for e in e1.resolve("billing", "?all=1")] == [False]
        ),
        CROSS + detection_bound(3, LOCAL),
        "central unreachable from east",
    )
    assert {r["cluster"]: r["reachable"] for r in e1.get("/v1/clusters")}["central"] is False
    # No --join and no --wan-join: it rejoins both pools from its saved peers.
    mesh["c0"].start(join=[], wan_join=[])
    wait_until(lambda: instances(e1, "billing") == ["billing-1"], CROSS + SPREAD, "central is back")


def wait_until_timed(pred, timeout):
    start = time.monotonic()
    wait_until(pred, timeout, "failover")
    return time.monotonic() - start
