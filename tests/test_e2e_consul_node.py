"""End to end: the npm ``consul`` client (Node.js) against two real agents.

py-consul is not the only Consul client apps use: this runs the Node.js
client (npm ``consul``, pinned below) through tests/clients/consul_node.js
against two ``meshd agent`` processes of one cluster, and checks what it got
back: a service registered on A with a TTL check, passing on B once the TTL
is reported, the catalog and health reads, a check added to and removed
from a service, a KV read answered 501, and a watch (the client's blocking
query loop) on B that wakes when A deregisters.

It needs ``node`` and ``npm``, and the npm registry for the first install
(cached per test session); without them it skips and says why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents import AgentProc, two_agents

pytestmark = pytest.mark.e2e

CLIENT = "consul@2.0.1"
SCRIPT = Path(__file__).parent / "clients" / "consul_node.js"


@pytest.fixture(scope="module")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory where ``require("consul")`` finds the pinned client."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed (Debian: apt-get install nodejs npm)")
    root = tmp_path_factory.mktemp("consul-node")
    (root / "package.json").write_text('{"name": "meshd-consul-node-test", "private": true}\n')
    try:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", CLIENT],
            cwd=root, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install {CLIENT} took over 180 s")
    if done.returncode != 0:
        pytest.skip(f"npm install {CLIENT} failed: {done.stderr.strip()[-300:]}")
    return root


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    with two_agents(tmp_path_factory.mktemp("consul-node-agents"), ("na", "nb")) as agents:
        yield agents


def run_client(node_client: Path, a: AgentProc, b: AgentProc) -> dict[str, Any]:
    # The script lives in the repository; node resolves ``require`` from the
    # script's directory upwards, so point it at the installed client.
    env = {"NODE_PATH": str(node_client / "node_modules"), "PATH": os.environ.get("PATH", "")}
    done = subprocess.run(
        ["node", str(SCRIPT), a.api, b.api],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def test_the_node_consul_client_registers_reads_watches_and_is_told_what_is_missing(
    node_client: Path, pair: tuple[AgentProc, AgentProc]
) -> None:
    a, b = pair
    out = run_client(node_client, a, b)
    failed = {k: v for k, v in out.items() if isinstance(v, dict) and "error" in v}
    # What must fail: the KV read (meshd has no KV store: 501, not a 404 a
    # client reads as "no such key") and deregistering what is gone (404).
    assert set(failed) == {"kv_get", "deregister_unknown"}, failed
    assert failed["kv_get"]["status"] == 501
    assert failed["deregister_unknown"]["status"] == 404

    assert out["leader"] and ":" in out["leader"]
    assert isinstance(out["peers"], list) and out["peers"]
    assert out["self"]["Config"]["NodeName"] == "na"
    assert sorted(m["Name"] for m in out["members"]) == ["na", "nb"]
    assert "east" in out["datacenters"]

    # A TTL check starts critical, as in Consul; passing after its report.
    assert out["passing_before_ttl"] == []
    [entry] = out["passing_on_b"]
    svc = entry["Service"]
    assert (svc["ID"], svc["Service"], svc["Address"], svc["Port"]) == (
        "orders-1",
        "orders",
        "127.0.0.1",
        3500,
    )
    assert svc["Tags"] == ["v1"] and svc["Meta"] == {"DAPR_PORT": "50001"}
    assert entry["Node"]["Node"] == "na" and entry["Node"]["Datacenter"] == "east"
    # The node's own health (serfHealth) and the service's check, as Consul.
    checks = {c["CheckID"]: c["Status"] for c in entry["Checks"]}
    assert checks == {"serfHealth": "passing", "service:orders-1": "passing"}
    assert out["services_on_a"]["orders-1"]["Port"] == 3500
    assert out["checks_on_a"]["service:orders-1"]["Status"] == "passing"
    assert out["catalog_services"]["orders"] == ["v1"]
    [row] = out["catalog_nodes_of_orders"]
    assert (row["ServiceID"], row["ServicePort"], row["Node"]) == ("orders-1", 3500, "na")
    assert {"na", "nb"} <= {n["Node"] for n in out["catalog_nodes"]}
    assert [c["ServiceID"] for c in out["health_checks"]] == ["orders-1"]
    assert any(c.get("ServiceID") == "orders-1" for c in out["health_state"])

    # check/register then check/deregister on a service without a check.
    [web] = out["web_health_failed"]
    checks = {c["CheckID"]: c["Status"] for c in web["Checks"]}
    assert checks == {"serfHealth": "passing", "web-ttl": "critical"}
    # Without its check the instance is passing, shown under meshd's own
    # ``service:<ID>`` as every instance without a check (docs/api.md).
    [web] = out["web_health_after"]
    checks = {c["CheckID"]: c["Status"] for c in web["Checks"]}
    assert checks == {"serfHealth": "passing", "service:web-1": "passing"}
    assert web["Service"]["ID"] == "web-1"

    # The watch saw the first answer, then woke on the deregistration.
    watch = out["watch_sees_deregistration"]
    assert watch["answers"] >= 2 and watch["last"] == []
