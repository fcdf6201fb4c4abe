"""End to end: py-consul against real agents, for the rest of the Consul subset.

Two ``meshd agent`` processes form cluster ``east``.  Each test goes through
the real ``consul`` client and checks what a Consul user would see: the
catalog's node endpoints, health by node and by service, coordinates, check
registration, maintenance, filters and node metadata, the fields a
registration keeps (Kind, TaggedAddresses, Notes, Output), Consul's meta-key
rules, an unknown datacenter, and the explicit 501 of what meshd does not do.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import consul
import pytest

from meshd.protocol.bounds import repair_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, client_for, two_agents, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SPREAD = repair_bound(2, LOCAL) + 5.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_agents(tmp_path_factory.mktemp("catalog"), ("ca", "cb"), ("z1", "z2")) as (a, b):
        ca, cb = client_for(a), client_for(b)
        assert ca.agent.service.register(
            "api", service_id="api-a", address="127.0.0.1", port=7001, tags=["v2"],
            meta={"team": "core"}, kind="", check=consul.Check.ttl("60s"),
            tagged_addresses={"lan": {"address": "127.0.0.1", "port": 7001}},
        )  # fmt: skip
        assert ca.agent.check.ttl_pass("service:api-a", notes="warmed up")
        assert cb.agent.service.register("api", service_id="api-b", address="127.0.0.1", port=7002)
        wait_until(
            lambda: all(len(c.health.service("api")[1]) == 2 for c in (ca, cb)),
            SPREAD,
            "both api instances everywhere",
        )
        yield a, b


def raw(agent: AgentProc, method: str, path: str) -> tuple[int, str]:
    req = urllib.request.Request(agent.api + path, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_catalog_nodes_node_and_datacenters(pair):
    a, b = pair
    cb = client_for(b)
    _, nodes = cb.catalog.nodes()
    by_name = {n["Node"]: n for n in nodes}
    assert set(by_name) == {"ca", "cb"}
    assert by_name["ca"]["Address"] == "127.0.0.1" and by_name["ca"]["Datacenter"] == "east"
    assert by_name["ca"]["Meta"] == {
        "meshd-cluster": "east",
        "meshd-region": "r1",
        "meshd-zone": "z1",
    }
    # node-meta filters nodes and services by the node's metadata.
    _, z2 = cb.catalog.nodes(node_meta={"meshd-zone": "z2"})
    assert [n["Node"] for n in z2] == ["cb"]
    _, node = cb.catalog.node("ca")
    assert node["Node"]["Node"] == "ca" and list(node["Services"]) == ["api-a"]
    assert node["Services"]["api-a"]["Port"] == 7001
    assert cb.catalog.node("nowhere")[1] is None  # as Consul: 200 null
    assert cb.catalog.datacenters() == ["east"]


def test_health_checks_node_and_state(pair):
    a, b = pair
    cb = client_for(b)
    _, checks = cb.health.checks("api")
    assert sorted((c["ServiceID"], c["Status"]) for c in checks) == [
        ("api-a", "passing"),
        ("api-b", "passing"),
    ]
    notes = {c["ServiceID"]: c for c in checks}
    assert notes["api-a"]["Type"] == "ttl"
    _, on_a = cb.health.node("ca")
    assert {c["CheckID"]: c["Status"] for c in on_a} == {
        "serfHealth": "passing",
        "service:api-a": "passing",
    }
    # The TTL note is the check's Output, on the agent that runs the check.
    _, own = client_for(a).health.node("ca")
    assert {c["CheckID"]: c["Output"] for c in own}["service:api-a"] == "warmed up"
    # Filters in Consul's language, and a syntax error's position.
    _, only_b = cb.health.state("any", filter_expr='ServiceID == "api-b"')
    assert [c["ServiceID"] for c in only_b] == ["api-b"]
    with pytest.raises(consul.ConsulException, match="position"):
        cb.health.state("any", filter_expr="ServiceID ==")
    _, entries = cb.health.service("api", filter_expr='Service.Meta.team == "core"')
    assert [e["Service"]["ID"] for e in entries] == ["api-a"]
    _, entries = cb.health.service("api", node_meta={"meshd-zone": "z1"})
    assert [e["Service"]["ID"] for e in entries] == ["api-a"]
    _, entries = cb.catalog.service("api", filter_expr='"v2" in ServiceTags')
    assert [e["ServiceID"] for e in entries] == ["api-a"]


def test_registration_keeps_what_consul_keeps(pair):
    a, b = pair
    _, entries = client_for(b).catalog.service("api")
    e = {x["ServiceID"]: x for x in entries}["api-a"]
    assert e["ServiceTaggedAddresses"] == {"lan": {"Address": "127.0.0.1", "Port": 7001}}
    assert e["ServiceMeta"] == {"team": "core"} and e["ServiceKind"] == ""
    assert e["Address"] == "127.0.0.1"  # the node's own address
    # Consul's meta key rules: a dot, or the consul- prefix, is refused.
    ca = client_for(a)
    for meta in ({"a.b": "x"}, {"consul-x": "y"}):
        with pytest.raises(consul.ConsulException):
            ca.agent.service.register("bad", service_id="bad-1", port=1, meta=meta)
    assert "bad-1" not in ca.agent.services()


def test_check_register_and_maintenance(pair):
    a, b = pair
    ca, cb = client_for(a), client_for(b)
    assert ca.agent.service.register("jobs", service_id="jobs-1", address="127.0.0.1", port=7100)
    assert ca.agent.check.register(
        "jobs alive", check=consul.Check.ttl("60s"), service_id="jobs-1", notes="from cron"
    )
    checks = ca.agent.checks()
    [check] = [c for c in checks.values() if c["ServiceID"] == "jobs-1"]
    assert (check["Type"], check["Notes"], check["Status"]) == ("ttl", "from cron", "critical")
    assert ca.agent.check.ttl_pass(check["CheckID"])
    wait_until(lambda: cb.health.service("jobs", passing=True)[1], SPREAD, "jobs-1 passing on B")
    # Maintenance: critical whatever the check says, back when taken out.
    assert ca.agent.service.maintenance("jobs-1", True, reason="upgrade")
    wait_until(lambda: not cb.health.service("jobs", passing=True)[1], SPREAD, "jobs-1 out")
    assert ca.agent.check.ttl_pass(check["CheckID"])  # does not end maintenance
    assert ca.health.service("jobs", passing=True)[1] == []
    # Nor does registering it again, as a client does when it restarts.
    assert ca.agent.service.register("jobs", service_id="jobs-1", address="127.0.0.1", port=7100)
    assert ca.health.service("jobs", passing=True)[1] == []
    assert ca.agent.service.maintenance("jobs-1", False)
    wait_until(lambda: cb.health.service("jobs", passing=True)[1], SPREAD, "jobs-1 back")
    assert ca.agent.service.deregister("jobs-1")


def test_check_deregister_keeps_the_service(pair):
    a, b = pair
    ca, cb = client_for(a), client_for(b)
    assert ca.agent.service.register("cron", service_id="cron-1", address="127.0.0.1", port=7200)
    assert ca.agent.check.register(
        "cron alive", check=consul.Check.ttl("60s"), check_id="cron-ttl", service_id="cron-1"
    )
    assert ca.health.service("cron", passing=True)[1] == []  # a TTL check starts critical
    assert ca.agent.check.deregister("cron-ttl")
    assert "cron-ttl" not in ca.agent.checks()
    [entry] = wait_until(
        lambda: cb.health.service("cron", passing=True)[1], SPREAD, "cron-1 passing on B"
    )
    assert entry["Service"]["ID"] == "cron-1"
    assert ca.agent.check.deregister("cron-ttl") is False  # gone: 404
    assert ca.agent.service.deregister("cron-1")


def test_coordinates(pair):
    a, b = pair
    _, coords = client_for(a).coordinate.nodes()
    assert {c["Node"] for c in coords} >= {"ca"}
    for c in coords:
        assert set(c["Coord"]) == {"Vec", "Error", "Adjustment", "Height"}
        assert len(c["Coord"]["Vec"]) == 8


def test_unknown_datacenter_and_what_meshd_does_not_do(pair):
    a, _ = pair
    status, text = raw(a, "GET", "/v1/health/service/api?dc=mars")
    assert (status, text) == (500, "No path to datacenter")
    for method, path in (
        ("GET", "/v1/kv/foo"),
        ("PUT", "/v1/kv/foo"),
        ("PUT", "/v1/session/create"),
        ("GET", "/v1/query"),
        ("PUT", "/v1/txn"),
        ("GET", "/v1/agent/version"),
        ("GET", "/v1/agent/host"),
        ("GET", "/v1/agent/metrics"),
        ("GET", "/v1/coordinate/datacenters"),
    ):
        status, text = raw(a, method, path)
        assert status == 501 and "meshd does not implement" in text, (path, status, text)
    with pytest.raises(consul.ConsulException):
        client_for(a).kv.get("foo")  # not a silent "key not found"


def test_answers_are_json_the_go_client_decodes(pair):
    a, _ = pair
    status, text = raw(a, "GET", "/v1/health/service/api")
    assert status == 200
    for entry in json.loads(text):
        assert {"Node", "Service", "Checks"} <= set(entry)
        assert {c["CheckID"] for c in entry["Checks"]} >= {"serfHealth"}
