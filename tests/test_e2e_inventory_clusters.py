"""End to end across two clusters: what another cluster's inventory shows.

east (bridge e0, e1, e2 with operator node metadata) and west (bridge w0,
w1), real agents on 127.0.0.1.  From west, through py-consul: east's nodes
carry their own address and metadata (from their signed documents, since
west does not see east's membership); a node of east that leaves gracefully
is deregistered from west's inventory, while one killed with SIGKILL stays
listed, critical, as in Consul.
"""

from __future__ import annotations

import pytest

from meshd.protocol.bounds import detection_bound, repair_bound, spread_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, Certs, client_for, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 8.0
CROSS = detection_bound(3, LOCAL) + 2 * spread_bound(3, LOCAL) + repair_bound(3, LOCAL) + SLACK


def _wan_addr(agent: AgentProc) -> str:
    line = next(ln for ln in agent.lines if "bridge: WAN gossip on" in ln)
    return line.rsplit(" ", 1)[1]


def test_another_clusters_inventory_shows_node_address_meta_and_tells_left_from_dead(tmp_path):
    certs = Certs(tmp_path / "pki")
    agents: list[AgentProc] = []

    def start(name: str, cluster: str, extra: list[str], join: list[str] | None = None):
        a = AgentProc(tmp_path, certs, name, cluster=cluster, join=join, extra=extra).start()
        agents.append(a)
        return a

    try:
        e0 = start("e0", "east", ["--wan-bind", "127.0.0.1:0"])
        w0 = start("w0", "west", ["--wan-bind", "127.0.0.1:0", "--wan-join", _wan_addr(e0)])
        e1 = start("e1", "east", [], join=[e0.gossip])
        e2 = start("e2", "east", ["--node-meta", "rack=r7"], join=[e0.gossip])
        w1 = start("w1", "west", [], join=[w0.gossip])
        assert client_for(e1).agent.service.register(
            "web", service_id="web-e1", address="127.0.0.4", port=8001
        )
        assert client_for(e2).agent.service.register(
            "web", service_id="web-e2", address="127.0.0.5", port=8002
        )
        west = client_for(w1)

        def inventory() -> dict[str, dict]:
            return {e["Service"]["ID"]: e for e in west.health.service("web")[1]}

        wait_until(lambda: len(inventory()) == 2, CROSS + 20, "east's web in west")
        e2_entry = inventory()["web-e2"]
        node = e2_entry["Node"]
        # The node's own address (its document's), not its instance's.
        assert (node["Node"], node["Datacenter"], node["Address"]) == ("e2", "east", "127.0.0.1")
        assert e2_entry["Service"]["Address"] == "127.0.0.5"
        assert node["Meta"] == {
            "rack": "r7",
            "meshd-cluster": "east",
            "meshd-region": "r1",
            "meshd-zone": "z1",
        }
        _, racks = west.catalog.service("web", node_meta={"rack": "r7"})
        assert [s["ServiceID"] for s in racks] == ["web-e2"]

        e1.stop()  # SIGTERM: a graceful leave deregisters its services
        e2.kill()  # SIGKILL: listed critical until reaped

        def settled() -> bool:
            inv = inventory()
            if set(inv) != {"web-e2"}:
                return False
            checks = {c["CheckID"]: c["Status"] for c in inv["web-e2"]["Checks"]}
            return checks.get("serfHealth") == "critical"

        wait_until(settled, CROSS + 20, "web-e1 gone and web-e2 critical in west")
        assert west.health.service("web", passing=True)[1] == []
    finally:
        for a in reversed(agents):
            a.stop()
