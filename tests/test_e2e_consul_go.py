"""End to end: a Go Consul client against two real agents.

Dapr's resolver is written in Go, and Go's JSON decoder refuses a field of
the wrong type that Python and Node.js clients let through.  This builds
tests/clients/consul_go (Debian's ``golang-github-armon-consul-api-dev``, the
client hashicorp/consul/api grew from, with the same typed structs for
services, checks, nodes and members) and runs it against two ``meshd agent``
processes of one cluster: self and members, a service with a TTL check
registered on A and passing on B, the catalog and health reads, a check
that names no service refused, a KV read refused, and a blocking query on B
woken by a deregistration on A.

It needs ``go`` and that package (``apt-get install golang-go
golang-github-armon-consul-api-dev``); without them it skips and says why.
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

SOURCE = Path(__file__).parent / "clients" / "consul_go"
GOPATH = Path("/usr/share/gocode")
PACKAGE = GOPATH / "src" / "github.com" / "armon" / "consul-api"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built client program."""
    if shutil.which("go") is None or not PACKAGE.is_dir():
        pytest.skip("go or its Consul client is not installed (Debian: apt-get install "
                    "golang-go golang-github-armon-consul-api-dev)")  # fmt: skip
    root = tmp_path_factory.mktemp("consul-go")
    binary = root / "consul_go"
    env = dict(os.environ, GO111MODULE="off", GOPATH=str(GOPATH), GOCACHE=str(root / "cache"))
    done = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=SOURCE, capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return binary


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AgentProc, AgentProc]]:
    with two_agents(tmp_path_factory.mktemp("consul-go-agents"), ("na", "nb")) as agents:
        yield agents


def hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def test_a_go_client_decodes_every_answer_and_blocks(
    go_client: Path, pair: tuple[AgentProc, AgentProc]
) -> None:
    a, b = pair
    done = subprocess.run(
        [str(go_client), hostport(a.api), hostport(b.api)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    failed = {k: v["error"] for k, v in out.items() if isinstance(v, dict) and "error" in v}
    # Refused, as they must be: a check naming no service (meshd runs checks
    # for services only), removing a check that is not there, the KV store.
    assert set(failed) == {"check_register_without_service", "check_deregister_unknown", "kv_get"}
    assert "400" in failed["check_register_without_service"]
    assert "404" in failed["check_deregister_unknown"]
    assert "501" in failed["kv_get"]

    assert out["node_name"] == "na" and out["self"]["Config"]["NodeName"] == "na"
    assert sorted(m["Name"] for m in out["members"]) == ["na", "nb"]
    assert all(m["Status"] == 1 for m in out["members"])  # serf's "alive"
    assert out["leader"] and "east" in out["datacenters"]

    [entry] = out["passing_on_b"]
    svc = entry["Service"]
    assert (svc["ID"], svc["Service"], svc["Tags"], svc["Port"]) == (
        "orders-1",
        "orders",
        ["v1"],
        3500,
    )
    assert entry["Node"]["Node"] == "na"
    assert {c["CheckID"]: c["Status"] for c in entry["Checks"]} == {
        "serfHealth": "passing",
        "service:orders-1": "passing",
    }
    assert out["services"]["orders-1"]["Port"] == 3500
    assert out["checks"]["service:orders-1"]["Status"] == "passing"
    [row] = out["catalog_service"]
    assert (row["ServiceID"], row["ServicePort"], row["Node"]) == ("orders-1", 3500, "na")
    assert out["catalog_services"]["orders"] == ["v1"]
    assert {"na", "nb"} <= {n["Node"] for n in out["catalog_nodes"]}
    assert out["catalog_node"]["Node"]["Node"] == "na"
    assert "orders-1" in out["catalog_node"]["Services"]
    assert [c["ServiceID"] for c in out["health_checks"]] == ["orders-1"]
    assert {c["CheckID"] for c in out["health_node"]} >= {"serfHealth", "service:orders-1"}
    assert any(c["ServiceID"] == "orders-1" for c in out["health_state"])

    # The blocking query returned because of the deregistration, not its wait.
    assert out["blocking_query"] == []
    assert out["blocking_query_seconds"] < 10
