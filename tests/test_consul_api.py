"""Tests for meshd.api.consul: the Consul-compatible subset against a fake agent.

The fake (tests/fakes.py, the ``agent`` fixture of tests/conftest.py)
implements AgentAPI in memory: local registrations (what the Consul routes
write) plus "remote" endpoints a test lays out by hand, so locality
order, standbys (``active=False``) and unreachable clusters can be pinned
without a mesh.  Shapes are checked against what Consul answers and what
Dapr's resolver and py-consul read; every refused request is checked to have
reached the agent not at all.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import consul.aio
import pytest
from aiohttp.test_utils import TestClient

from meshd.agent.interface import Endpoint, Registration, StorageError
from meshd.api.consul import CHECK_ID_KEY, TAGS_KEY, decode_tags, parse_filter
from meshd.api.validation import ApiError
from meshd.wire import AppRecord
from tests.fakes import FakeAgent

# ---------------------------------------------------------------------------
# Helpers


def remote(
    instance: str,
    app: str = "orders",
    *,
    node: str = "n9",
    cluster: str = "east",
    health: str = "passing",
    active: bool = True,
    reachable: bool = True,
    tags: list[str] | None = None,
    meta: dict[str, str] | None = None,
    namespace: str = "default",
) -> Endpoint:
    meta = dict(meta or {})
    if tags:
        meta[TAGS_KEY] = json.dumps(tags)
    return Endpoint(
        app=app,
        namespace=namespace,
        instance=instance,
        address=f"198.51.100.{len(instance)}",
        port=4000,
        protocol="http",
        node=node,
        cluster=cluster,
        region="us-east" if cluster == "east" else "us-west",
        zone="z",
        health=health,
        weight=1,
        meta=meta,
        tier="zone",
        reachable=reachable,
        active=active,
    )


async def put(client: TestClient, path: str, body: Any = None) -> tuple[int, str]:
    data = None if body is None else body if isinstance(body, (str, bytes)) else json.dumps(body)
    resp = await client.put(path, data=data)
    return resp.status, await resp.text()


async def get(client: TestClient, path: str) -> tuple[int, Any, Any]:
    resp = await client.get(path)
    text = await resp.text()
    body = json.loads(text) if resp.content_type == "application/json" else text
    return resp.status, body, resp.headers


async def register(client: TestClient, body: dict[str, Any]) -> None:
    status, text = await put(client, "/v1/agent/service/register", body)
    assert (status, text) == (200, ""), text


def assert_text_error(resp_text: str) -> None:
    assert resp_text and "\n" not in resp_text and not resp_text.startswith("{")


GO_BODY = {  # what Consul's Go api sends: zero values included, CamelCase keys
    "ID": "orders-1",
    "Name": "orders",
    "Tags": ["v2", "primary"],
    "Address": "192.0.2.3",
    "Port": 3500,
    "Meta": {"version": "2"},
    "Weights": {"Passing": 5, "Warning": 1},
    "Check": {"TTL": "10s", "CheckID": "", "Name": "", "Interval": "", "HTTP": ""},
    "Checks": None,
    "EnableTagOverride": False,
    "Kind": "",
}


# ---------------------------------------------------------------------------
# Registration


async def test_register_go_style_body(client: TestClient, agent: FakeAgent) -> None:
    await register(client, GO_BODY)
    reg = agent.registrations["orders-1"]
    r = reg.record
    assert (r.app, r.address, r.port, r.namespace, r.weight) == (
        "orders", "192.0.2.3", 3500, "default", 5,
    )  # fmt: skip
    meta = dict(r.meta)
    assert meta["version"] == "2"
    assert decode_tags(meta[TAGS_KEY]) == ["v2", "primary"]
    assert CHECK_ID_KEY not in meta  # the default "service:orders-1" is not stored
    assert reg.check is not None and (reg.check.kind, reg.check.ttl) == ("ttl", 10.0)


async def test_register_py_consul_style_lowercase_keys(client: TestClient, agent: FakeAgent):
    body = {
        "name": "web",
        "id": "web-1",
        "address": "192.0.2.4",
        "port": 8080,
        "tags": ["a,b", "c"],  # a comma inside a tag survives
        "checks": [{"http": "http://192.0.2.4:8080/health", "interval": "5s"}],
        "enabletagoverride": True,
        "tagged_addresses": {"lan": {"address": "192.0.2.4", "port": 8080}},
    }
    await register(client, body)
    reg = agent.registrations["web-1"]
    assert reg.check is not None and reg.check.kind == "http" and reg.check.interval == 5.0
    _, entries, _ = await get(client, "/v1/health/service/web")
    assert entries[0]["Service"]["Tags"] == ["a,b", "c"]


async def test_register_defaults_id_address_and_weight(client: TestClient, agent: FakeAgent):
    await register(client, {"Name": "cart", "Port": 9000})
    r = agent.registrations["cart"].record
    assert (r.instance, r.address, r.weight) == ("cart", "192.0.2.7", 1)  # the node's own host
    assert agent.registrations["cart"].check is None


async def test_register_tcp_check_and_namespace(client: TestClient, agent: FakeAgent):
    await register(
        client,
        {"Name": "db", "Port": 5432, "Address": "192.0.2.9", "Namespace": "team-a",
         "Check": {"TCP": "192.0.2.9:5432", "Interval": "10s", "Timeout": "1s"}},
    )  # fmt: skip
    reg = agent.registrations["db"]
    assert reg.record.namespace == "team-a"
    assert reg.check is not None and (reg.check.kind, reg.check.target) == ("tcp", "192.0.2.9:5432")
    status, _ = await put(
        client, "/v1/agent/service/register?ns=team-b", {"Name": "db2", "Port": 1}
    )
    assert status == 200 and agent.registrations["db2"].record.namespace == "team-b"


async def test_register_dapr_self_registration(client: TestClient, agent: FakeAgent):
    # The registration Dapr's consul resolver builds when selfRegister is on.
    app_id = "checkout-192.0.2.5-3500"
    body = {
        "ID": app_id,
        "Name": "checkout",
        "Tags": None,
        "Port": 6000,
        "Address": "192.0.2.5",
        "Meta": {"DAPR_PORT": "50002"},
        "Check": None,
        "Checks": [
            {
                "CheckID": f"daprHealth:{app_id}",
                "Name": "Dapr Health Status",
                "Interval": "15s",
                "HTTP": "http://192.0.2.5:3500/v1.0/healthz?appid=checkout",
            }
        ],
    }
    await register(client, body)
    meta = dict(agent.registrations[app_id].record.meta)
    assert meta[CHECK_ID_KEY] == f"daprHealth:{app_id}"
    status, _ = await put(client, f"/v1/agent/check/pass/daprHealth:{app_id}")
    assert status == 200 and agent.calls[-1] == f"health {app_id} passing"
    _, entries, _ = await get(client, "/v1/health/service/checkout?passing=1")
    [entry] = entries
    # What Dapr reads: Service.Address and Meta.DAPR_PORT.
    assert entry["Service"]["Address"] == "192.0.2.5"
    assert entry["Service"]["Meta"] == {"DAPR_PORT": "50002"}
    check = entry["Checks"][0]
    assert (check["CheckID"], check["Name"]) == (f"daprHealth:{app_id}", "Dapr Health Status")


async def test_register_port_zero_uses_dapr_port(client: TestClient, agent: FakeAgent):
    await register(client, {"Name": "worker", "Port": 0, "Meta": {"DAPR_PORT": "50001"}})
    assert agent.registrations["worker"].record.port == 50001


async def test_register_initial_status_is_reported(client: TestClient, agent: FakeAgent):
    await register(client, {"Name": "api", "Port": 80, "Check": {"TTL": "5s", "Status": "passing"}})
    assert agent.calls == ["register api", "health api passing"]


async def test_register_ignores_unknown_fields(client: TestClient, agent: FakeAgent):
    body = {
        **GO_BODY,
        "Connect": {"Native": False},
        "Proxy": None,
        "Locality": {"Region": "r"},
        "SomethingNew": 1,
    }
    await register(client, body)
    assert "orders-1" in agent.registrations


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"Port": 1}, "Name is required"),
        ({"Name": "web", "ID": "web:1", "Port": 1}, "service ID must be"),
        ({"Name": "bad name", "Port": 1}, "service Name must be"),
        ({"Name": "web", "Port": 1, "Tags": "a,b"}, "Tags must be a list"),
        ({"Name": "web", "Port": 1, "Meta": {"consul.tags": "x"}}, "is invalid"),
        ({"Name": "web", "Port": 1, "Meta": {"consul-x": "x"}}, "reserved"),
        ({"Name": "web", "Port": 1, "Meta": {"k": 1}}, "Meta must be"),
        ({"Name": "web", "Port": 1, "Meta": ["k"]}, "Meta must be"),
        ({"Name": "web", "Port": 1, "Address": "not an address"}, "Address must be"),
        ({"Name": "web"}, "Port is required"),
        ({"Name": "web", "Port": 70000}, "port must be"),
        ({"Name": "web", "Port": "80"}, "port must be"),
        ({"Name": "web", "Port": 1, "Weights": {"Passing": -1}}, "Weights.Passing"),
        ({"Name": "web", "Port": 1, "Weights": 3}, "Weights must be"),
        ({"Name": "web", "Port": 1, "Check": {"GRPC": "x:1", "Interval": "5s"}}, "GRPC checks"),
        ({"Name": "web", "Port": 1, "Check": {"Args": ["true"], "Interval": "5s"}}, "Args checks"),
        ({"Name": "web", "Port": 1, "Check": {"Interval": "5s"}}, "one of TTL, HTTP or TCP"),
        ({"Name": "web", "Port": 1, "Check": {"TTL": "5s", "HTTP": "http://a/"}}, "only one"),
        ({"Name": "web", "Port": 1, "Check": {"HTTP": "http://a/"}}, "interval is required"),
        ({"Name": "web", "Port": 1, "Check": {"TTL": "soon"}}, "ttl must be a duration"),
        ({"Name": "web", "Port": 1, "Check": {"TTL": "5s", "Status": "ok"}}, "Status must be"),
        ({"Name": "web", "Port": 1, "Check": "ttl"}, "must be a JSON object"),
        ({"Name": "web", "Port": 1, "Check": {"TTL": "5s", "CheckID": 5}}, "CheckID must be"),
        ({"Name": "web", "Port": 1, "Check": {"TTL": "5s", "Name": ["x"]}}, "Name must be"),
        ({"Name": "web", "Port": 1, "Checks": {"TTL": "5s"}}, "Checks must be a list"),
        (
            {"Name": "web", "Port": 1, "Checks": [{"TTL": "5s"}, {"TCP": "a:1", "Interval": "1s"}]},
            "one check per service",
        ),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
        ("", "body is empty"),
    ],
)
async def test_register_rejects_with_one_text_sentence(
    client: TestClient, agent: FakeAgent, body: Any, needle: str
) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    resp = await client.put("/v1/agent/service/register", data=data)
    text = await resp.text()
    assert resp.status == 400 and resp.content_type == "text/plain", text
    assert needle in text
    assert_text_error(text)
    assert agent.calls == []


async def test_deregister(client: TestClient, agent: FakeAgent) -> None:
    await register(client, GO_BODY)
    assert await put(client, "/v1/agent/service/deregister/orders-1") == (200, "")
    assert "orders-1" not in agent.registrations
    status, text = await put(client, "/v1/agent/service/deregister/orders-1")
    assert status == 404 and "unknown service ID" in text
    status, text = await put(client, "/v1/agent/service/deregister/no:such")
    assert status == 404
    assert_text_error(text)


@pytest.mark.parametrize(
    ("verb", "status"), [("pass", "passing"), ("warn", "warning"), ("fail", "critical")]
)
async def test_check_verbs(client: TestClient, agent: FakeAgent, verb: str, status: str) -> None:
    await register(client, GO_BODY)
    for check_id in ("service:orders-1", "orders-1"):
        code, text = await put(client, f"/v1/agent/check/{verb}/{check_id}?note=fine")
        assert (code, text) == (200, "")
        assert agent.registrations["orders-1"].record.health == status
    code, text = await put(client, f"/v1/agent/check/{verb}/service:nope")
    assert code == 404 and 'unknown check ID "service:nope"' in text


async def test_check_update(client: TestClient, agent: FakeAgent) -> None:
    await register(client, GO_BODY)
    code, _ = await put(
        client, "/v1/agent/check/update/service:orders-1", {"Status": "warning", "Output": "slow"}
    )
    assert code == 200 and agent.registrations["orders-1"].record.health == "warning"
    code, text = await put(client, "/v1/agent/check/update/service:orders-1", {"Status": "meh"})
    assert code == 400 and "Status must be" in text


async def test_check_register_then_deregister(client: TestClient, agent: FakeAgent) -> None:
    await register(client, {"ID": "web-1", "Name": "web", "Address": "192.0.2.4", "Port": 80})
    assert agent.registrations["web-1"].check is None
    check = {"CheckID": "web-ttl", "Name": "web alive", "ServiceID": "web-1", "TTL": "15s"}
    assert await put(client, "/v1/agent/check/register", check) == (200, "")
    reg = agent.registrations["web-1"]
    assert reg.check is not None and reg.check.kind == "ttl"
    assert dict(reg.record.meta)[CHECK_ID_KEY] == "web-ttl"
    code, text = await put(client, "/v1/agent/check/register", {"ServiceID": "web-1", "TTL": "5s"})
    assert code == 400 and "already has a check" in text
    # The check's own ID reports on it.
    assert await put(client, "/v1/agent/check/fail/web-ttl") == (200, "")
    assert agent.registrations["web-1"].record.health == "critical"

    # Deregistering the check keeps the service, passing as Consul counts a
    # service without checks, with nothing of the check left in its meta.
    assert await put(client, "/v1/agent/check/deregister/web-ttl") == (200, "")
    reg = agent.registrations["web-1"]
    assert reg.check is None and reg.record.health == "passing"
    assert (reg.record.address, reg.record.port) == ("192.0.2.4", 80)
    assert not [k for k, _ in reg.record.meta if k.startswith("consul.check")]
    _, checks, _ = await get(client, "/v1/agent/checks")
    assert "web-ttl" not in checks

    # Gone, never there, or a service without a check: 404, nothing written.
    calls = len(agent.calls)
    for check_id in ("web-ttl", "service:web-1", "service:nope"):
        code, text = await put(client, f"/v1/agent/check/deregister/{check_id}")
        assert code == 404 and f'unknown check ID "{check_id}"' in text
        assert_text_error(text)
    assert len(agent.calls) == calls
    assert agent.registrations["web-1"].record.health == "passing"


# ---------------------------------------------------------------------------
# Health


async def test_health_service_shape_and_headers(client: TestClient, agent: FakeAgent) -> None:
    await register(client, GO_BODY)
    await put(client, "/v1/agent/check/pass/service:orders-1")
    status, entries, headers = await get(client, "/v1/health/service/orders")
    assert status == 200
    assert headers["X-Consul-Index"] == str(agent.index + 1)
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"] == "0"
    [entry] = entries
    assert set(entry) == {"Node", "Service", "Checks"}
    node = entry["Node"]
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta"} <= set(node)
    # The node's own address (its member address), not the service's.
    assert (node["Node"], node["Datacenter"], node["Address"]) == ("n7", "east", "192.0.2.7")
    assert len(node["ID"]) == 36  # a UUID, as Consul's node IDs
    service = entry["Service"]
    assert service == {
        "ID": "orders-1",
        "Service": "orders",
        "Tags": ["v2", "primary"],
        "Address": "192.0.2.3",
        "Meta": {"version": "2"},  # consul.* keys are ours, never shown
        "Port": 3500,
        "Weights": {"Passing": 5, "Warning": 1},
        "EnableTagOverride": False,
        "Kind": "",
        "CreateIndex": agent.index + 1,
        "ModifyIndex": agent.index + 1,
    }
    service_check, serf = entry["Checks"]
    assert service_check["CheckID"] == "service:orders-1"
    assert service_check["Name"] == "Service 'orders' check"
    assert (service_check["Status"], service_check["ServiceID"]) == ("passing", "orders-1")
    assert service_check["ServiceName"] == "orders" and service_check["Node"] == "n7"
    assert (serf["CheckID"], serf["Status"], serf["ServiceID"]) == ("serfHealth", "passing", "")


async def test_health_service_status_mapping_and_passing(client: TestClient, agent: FakeAgent):
    await register(client, {**GO_BODY, "ID": "o-pass"})
    await register(client, {**GO_BODY, "ID": "o-warn"})
    await register(client, {**GO_BODY, "ID": "o-crit"})
    await put(client, "/v1/agent/check/pass/o-pass")
    await put(client, "/v1/agent/check/warn/o-warn")
    await put(client, "/v1/agent/check/fail/o-crit")
    _, entries, _ = await get(client, "/v1/health/service/orders")
    statuses = {e["Service"]["ID"]: e["Checks"][0]["Status"] for e in entries}
    assert statuses == {"o-pass": "passing", "o-warn": "warning", "o-crit": "critical"}
    for flag in ("passing=1", "passing", "passing=true"):
        _, entries, _ = await get(client, f"/v1/health/service/orders?{flag}")
        assert [e["Service"]["ID"] for e in entries] == ["o-pass"]
    _, entries, _ = await get(client, "/v1/health/service/orders?passing=false")
    assert len(entries) == 3
    status, text, _ = await get(client, "/v1/health/service/orders?passing=maybe")
    assert status == 400 and "passing must be true or false" in text


async def test_health_service_answers_only_active_endpoints_in_order(client, agent):
    agent.remote = [
        remote("near-1", node="n1"),
        remote("near-2", node="n2"),
        remote("far-1", node="w1", cluster="west", active=False),
        remote("dead-1", node="n3", health="critical"),
        remote("cut-1", node="x1", cluster="south", reachable=False),
    ]
    _, entries, _ = await get(client, "/v1/health/service/orders?passing=1")
    assert [e["Service"]["ID"] for e in entries] == ["near-1", "near-2"]
    # Without passing, the inventory: every instance, standbys and the ones
    # nobody should call too, each with its status.
    _, entries, _ = await get(client, "/v1/health/service/orders")
    got = {e["Service"]["ID"]: e["Checks"][0]["Status"] for e in entries}
    assert list(got) == ["near-1", "near-2", "far-1", "dead-1", "cut-1"]
    assert got["cut-1"] == "critical"  # a cluster cut off is critical whatever its record says
    assert entries[-1]["Checks"][1]["Status"] == "critical"  # its serfHealth too
    # ?all=1 lists standbys too, still in policy order.
    _, entries, _ = await get(client, "/v1/health/service/orders?passing=1&all=1")
    assert [e["Service"]["ID"] for e in entries] == ["near-1", "near-2", "far-1"]


async def test_health_service_falls_back_to_standbys_when_filters_leave_no_active(client, agent):
    agent.remote = [
        remote("near-1", node="n1", tags=["blue"]),
        remote("far-1", node="w1", cluster="west", active=False, tags=["green", "v2"]),
        remote("far-2", node="w2", cluster="west", active=False, tags=["green"]),
    ]
    _, entries, _ = await get(client, "/v1/health/service/orders?tag=green&tag=v2&passing=1")
    assert [e["Service"]["ID"] for e in entries] == ["far-1"]
    _, entries, _ = await get(client, "/v1/health/service/orders?tag=green")
    assert [e["Service"]["ID"] for e in entries] == ["far-1", "far-2"]
    _, entries, _ = await get(client, "/v1/health/service/orders?dc=west")
    assert [e["Node"]["Datacenter"] for e in entries] == ["west", "west"]
    _, entries, _ = await get(client, "/v1/health/service/orders?dc=east")
    assert [e["Service"]["ID"] for e in entries] == ["near-1"]
    status, text, _ = await get(client, "/v1/health/service/orders?dc=nowhere")
    assert (status, text) == (500, "No path to datacenter")  # as Consul answers


async def test_health_service_unknown_app_and_namespace(client: TestClient, agent: FakeAgent):
    agent.remote = [remote("t-1", namespace="team-a")]
    status, entries, headers = await get(client, "/v1/health/service/orders")
    assert (status, entries) == (200, []) and "X-Consul-Index" in headers
    _, entries, _ = await get(client, "/v1/health/service/orders?ns=team-a")
    assert [e["Service"]["ID"] for e in entries] == ["t-1"]
    assert entries[0]["Service"]["Namespace"] == "team-a"
    resp = await client.get("/v1/health/service/orders", headers={"X-Consul-Namespace": "team-a"})
    assert len(await resp.json()) == 1


async def test_health_service_answer_follows_changes(client: TestClient, agent: FakeAgent):
    _, first, _ = await get(client, "/v1/health/service/orders")
    await register(client, GO_BODY)
    _, second, _ = await get(client, "/v1/health/service/orders")
    assert first == [] and [e["Service"]["ID"] for e in second] == ["orders-1"]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("index=abc", "index must be"),
        ("index=-1", "index must be"),
        ("index=1&wait=soon", "wait must be"),
        ("filter=Service.Tags contains", "position"),
        ("all=2", "all must be"),
    ],
)
async def test_health_service_bad_query(client: TestClient, query: str, needle: str) -> None:
    status, text, headers = await get(client, f"/v1/health/service/orders?{query}")
    assert status == 400 and needle in text and headers["Content-Type"].startswith("text/plain")


async def test_health_service_bad_name(client: TestClient) -> None:
    status, text, _ = await get(client, "/v1/health/service/web:v1")
    assert status == 400 and "service name must be" in text


async def test_blocking_query_returns_on_change(client: TestClient, agent: FakeAgent) -> None:
    _, _, headers = await get(client, "/v1/health/service/orders")
    index = int(headers["X-Consul-Index"])
    assert index >= 1  # Consul clients take 0 as "no index"

    request = asyncio.create_task(get(client, f"/v1/health/service/orders?index={index}&wait=5m"))
    await agent.until_blocked()  # the query is parked, waiting for a change
    assert not request.done() and agent.waits == [(index - 1, 300.0)]
    await agent.register(
        Registration(AppRecord(app="orders", instance="orders-9", address="192.0.2.9", port=80))
    )
    # Bounded far below the 5 minutes asked: only the change can release it in time.
    status, entries, headers = await asyncio.wait_for(request, timeout=30)
    assert status == 200
    assert int(headers["X-Consul-Index"]) > index
    assert [e["Service"]["ID"] for e in entries] == ["orders-9"]


async def test_blocking_query_times_out_with_same_index(
    client: TestClient, agent: FakeAgent
) -> None:
    _, _, headers = await get(client, "/v1/health/service/orders")
    index = headers["X-Consul-Index"]
    status, _, headers = await get(client, f"/v1/health/service/orders?index={index}&wait=150ms")
    # Waited as long as asked, for a change past the agent index behind X-Consul-Index.
    assert status == 200 and agent.waits == [(int(index) - 1, 0.15)]
    assert headers["X-Consul-Index"] == index


async def test_blocking_with_index_zero_does_not_block(
    client: TestClient, agent: FakeAgent
) -> None:
    status, _, _ = await get(client, "/v1/health/service/orders?index=0&wait=5s")
    assert status == 200 and agent.waits == []


async def test_health_state(client: TestClient, agent: FakeAgent) -> None:
    agent.remote = [
        remote("o-1", node="n1"),
        remote("o-2", node="n2", health="critical"),
        remote("p-1", app="payments", node="n1"),
    ]
    _, checks, headers = await get(client, "/v1/health/state/any")
    assert "X-Consul-Index" in headers
    ids = sorted((c["Node"], c["CheckID"]) for c in checks)
    assert ids == [
        ("n1", "serfHealth"),
        ("n1", "service:o-1"),
        ("n1", "service:p-1"),
        ("n2", "serfHealth"),
        ("n2", "service:o-2"),
    ]
    # Dapr's watcher: every check of the named services, node checks left out.
    query = 'filter=ServiceName=="orders" or ServiceName=="nope"'
    _, checks, _ = await get(client, f"/v1/health/state/any?{query}")
    assert sorted(c["CheckID"] for c in checks) == ["service:o-1", "service:o-2"]
    _, checks, _ = await get(client, "/v1/health/state/critical")
    assert [c["CheckID"] for c in checks] == ["service:o-2"]
    status, text, _ = await get(client, "/v1/health/state/sick")
    assert status == 400 and "state must be" in text
    _, checks, _ = await get(client, '/v1/health/state/any?filter=Status=="critical"')
    assert [c["CheckID"] for c in checks] == ["service:o-2"]
    status, text, _ = await get(client, "/v1/health/state/any?filter=ServiceName ==")
    assert status == 400 and "position" in text


def test_parse_filter() -> None:
    assert parse_filter('ServiceName=="a"') == ["a"]
    assert parse_filter('ServiceName == "a" or ServiceName == "b"') == ["a", "b"]
    assert parse_filter('(ServiceName == "a") or (ServiceName == "b")') == ["a", "b"]
    for bad in ('ServiceName != "a"', 'ServiceName=="a" and Status=="x"', "x"):
        with pytest.raises(ApiError):
            parse_filter(bad)


# ---------------------------------------------------------------------------
# Catalog


async def test_catalog_services(client: TestClient, agent: FakeAgent) -> None:
    await register(client, GO_BODY)
    agent.remote = [
        remote("o-2", tags=["canary"]),
        remote("p-1", app="payments", cluster="west"),
        remote("t-1", app="hidden", namespace="team-a"),
    ]
    status, services, headers = await get(client, "/v1/catalog/services")
    assert status == 200 and "X-Consul-Index" in headers
    assert services == {"orders": ["canary", "primary", "v2"], "payments": []}
    _, services, _ = await get(client, "/v1/catalog/services?dc=west")
    assert services == {"payments": []}
    _, services, _ = await get(client, "/v1/catalog/services?ns=team-a")
    assert services == {"hidden": []}


async def test_catalog_service_lists_every_instance(client: TestClient, agent: FakeAgent):
    await register(client, GO_BODY)
    agent.remote = [remote("far-1", cluster="west", node="w1", active=False)]
    status, rows, headers = await get(client, "/v1/catalog/service/orders")
    assert status == 200 and "X-Consul-Index" in headers
    assert [r["ServiceID"] for r in rows] == ["orders-1", "far-1"]
    row = rows[0]
    assert row["Node"] == "n7" and row["Datacenter"] == "east"
    assert (row["ServiceName"], row["ServiceAddress"], row["ServicePort"]) == (
        "orders", "192.0.2.3", 3500,
    )  # fmt: skip
    assert row["ServiceTags"] == ["v2", "primary"] and row["ServiceMeta"] == {"version": "2"}
    assert row["ServiceWeights"] == {"Passing": 5, "Warning": 1}
    _, rows, _ = await get(client, "/v1/catalog/service/orders?tag=primary")
    assert [r["ServiceID"] for r in rows] == ["orders-1"]


async def test_enable_tag_override_reads_back_as_registered(client: TestClient, agent: FakeAgent):
    """Consul clients compare what they registered with what the agent
    answers: the flag comes back as given in every view of the service,
    false by default and again after a registration without it."""

    async def flags() -> list[bool]:
        _, one, _ = await get(client, "/v1/agent/service/orders-1")
        _, services, _ = await get(client, "/v1/agent/services")
        _, health, _ = await get(client, "/v1/health/service/orders")
        _, rows, _ = await get(client, "/v1/catalog/service/orders")
        return [
            one["EnableTagOverride"],
            services["orders-1"]["EnableTagOverride"],
            health[0]["Service"]["EnableTagOverride"],
            rows[0]["ServiceEnableTagOverride"],
        ]

    await register(client, GO_BODY)
    assert await flags() == [False] * 4
    await register(client, {**GO_BODY, "EnableTagOverride": True})
    assert await flags() == [True] * 4
    _, one, _ = await get(client, "/v1/agent/service/orders-1")
    assert one["Meta"] == {"version": "2"}  # the flag is not a meta pair of the app's
    await register(client, GO_BODY)
    assert await flags() == [False] * 4


async def test_enable_tag_override_must_be_a_boolean(client: TestClient, agent: FakeAgent):
    status, text = await put(
        client, "/v1/agent/service/register", {**GO_BODY, "EnableTagOverride": "yes"}
    )
    assert status == 400 and "EnableTagOverride must be true or false" in text
    assert agent.calls == []


# ---------------------------------------------------------------------------
# Agent and status


async def test_agent_services_service_and_checks(client: TestClient, agent: FakeAgent):
    await register(client, GO_BODY)
    await register(client, {"Name": "plain", "Port": 1})
    _, services, _ = await get(client, "/v1/agent/services")
    assert set(services) == {"orders-1", "plain"}
    assert services["orders-1"]["Tags"] == ["v2", "primary"]
    assert services["orders-1"]["Datacenter"] == "east"
    status, one, _ = await get(client, "/v1/agent/service/orders-1")
    assert status == 200 and one["Service"] == "orders"
    status, text, _ = await get(client, "/v1/agent/service/nope")
    assert status == 404 and "unknown service ID" in text
    _, checks, _ = await get(client, "/v1/agent/checks")
    assert list(checks) == ["service:orders-1"]  # "plain" has no check
    assert checks["service:orders-1"]["Type"] == "ttl"


async def test_agent_health_by_id_answers_the_status_in_the_code(client, agent):
    """Consul's local health endpoint: 200 passing, 429 warning, 503
    critical (maintenance included), the instance and its checks as JSON or
    the status alone as text; 404 for an instance the agent does not hold."""
    await register(client, GO_BODY)
    await register(client, {"Name": "plain", "Port": 1})
    path = "/v1/agent/health/service/id/orders-1"
    for verb, status, code in (("pass", "passing", 200), ("warn", "warning", 429),
                               ("fail", "critical", 503)):  # fmt: skip
        await put(client, f"/v1/agent/check/{verb}/service:orders-1?note=said")
        got, body, _ = await get(client, path)
        assert got == code and body["AggregatedStatus"] == status
        assert body["Service"]["ID"] == "orders-1" and body["Service"]["Service"] == "orders"
        assert [(c["CheckID"], c["Status"]) for c in body["Checks"]] == [
            ("service:orders-1", status)
        ]
        got, text, _ = await get(client, path + "?format=text")
        assert (got, text) == (code, status)
        resp = await client.get(path, headers={"Accept": "text/plain"})
        assert (resp.status, await resp.text()) == (code, status)
    await put(client, "/v1/agent/check/pass/service:orders-1")
    await put(client, "/v1/agent/service/maintenance/orders-1?enable=true&reason=x")
    got, body, _ = await get(client, path)
    assert (got, body["AggregatedStatus"]) == (503, "critical")
    # No check: passing, with no checks listed.
    got, body, _ = await get(client, "/v1/agent/health/service/id/plain")
    assert (got, body["AggregatedStatus"], body["Checks"]) == (200, "passing", [])
    got, body, _ = await get(client, "/v1/agent/health/service/id/nope")
    assert got == 404 and body == {"AggregatedStatus": "critical", "Service": None, "Checks": None}
    got, text, _ = await get(client, "/v1/agent/health/service/id/nope?format=text")
    assert (got, text) == (404, "ServiceId nope not found")
    got, body, _ = await get(client, path + "?format=json")
    assert got == 503 and isinstance(body, dict)


async def test_agent_health_by_name_answers_the_worst_instance(client, agent):
    await register(client, {**GO_BODY, "ID": "o-pass"})
    await register(client, {**GO_BODY, "ID": "o-warn"})
    await register(client, {"Name": "other", "Port": 1})
    await put(client, "/v1/agent/check/pass/o-pass")
    await put(client, "/v1/agent/check/warn/o-warn")
    path = "/v1/agent/health/service/name/orders"
    got, body, _ = await get(client, path)
    assert got == 429
    assert sorted((i["Service"]["ID"], i["AggregatedStatus"]) for i in body) == [
        ("o-pass", "passing"), ("o-warn", "warning"),
    ]  # fmt: skip
    assert (await get(client, path + "?format=text"))[:2] == (429, "warning")
    await put(client, "/v1/agent/check/fail/o-pass")
    assert (await get(client, path + "?format=text"))[:2] == (503, "critical")
    await put(client, "/v1/agent/check/pass/o-pass")
    await put(client, "/v1/agent/check/pass/o-warn")
    assert (await get(client, path + "?format=text"))[:2] == (200, "passing")
    got, body, _ = await get(client, "/v1/agent/health/service/name/nope")
    assert (got, body) == (404, [])
    got, text, _ = await get(client, "/v1/agent/health/service/name/nope?format=text")
    assert (got, text) == (404, "ServiceName nope Not Found")


async def test_agent_self(client: TestClient) -> None:
    status, body, _ = await get(client, "/v1/agent/self")
    assert status == 200
    # Dapr decodes this as map[string]map[string]any.
    assert all(isinstance(v, dict) for v in body.values())
    config = body["Config"]
    assert (config["Datacenter"], config["NodeName"], config["Server"]) == ("east", "n7", False)
    assert {"NodeID", "Revision", "Version"} <= set(config)
    member = body["Member"]
    assert (member["Name"], member["Addr"], member["Port"], member["Status"]) == (
        "n7", "192.0.2.7", 7946, 1,
    )  # fmt: skip
    assert member["Tags"]["dc"] == "east"


async def test_agent_members(client: TestClient) -> None:
    _, members, _ = await get(client, "/v1/agent/members")
    assert [(m["Name"], m["Status"]) for m in members] == [("n7", 1), ("n8", 1), ("w1", 4)]


async def test_status_leader_and_peers(client: TestClient) -> None:
    status, leader, _ = await get(client, "/v1/status/leader")
    assert (status, leader) == (200, "192.0.2.7:7946")
    _, peers, _ = await get(client, "/v1/status/peers")
    assert peers == ["192.0.2.7:7946"]


async def test_internal_error_is_text_500(client: TestClient, agent: FakeAgent) -> None:
    agent.explode = True
    status, text, _ = await get(client, "/v1/health/service/orders")
    assert status == 500 and text == "internal error in the agent; its log has the details"


async def test_native_api_keeps_json_errors(client: TestClient) -> None:
    resp = await client.delete("/v1/apps/nope")
    assert resp.status == 404 and "error" in await resp.json()


async def test_requests_are_counted_by_route(client: TestClient, agent: FakeAgent) -> None:
    await get(client, "/v1/health/service/orders")
    text = agent.metrics.exposition().decode()
    assert 'route="/v1/health/service/{service}",status="200"' in text


# ---------------------------------------------------------------------------
# py-consul, the real client, against the fake


# py-consul's aio client builds its connector with an argument aiohttp deprecates.
@pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")
async def test_py_consul_client_round_trip(client: TestClient, agent: FakeAgent) -> None:
    c = consul.aio.Consul(host="127.0.0.1", port=client.port)
    try:
        ok = await c.agent.service.register(
            "orders", service_id="orders-1", address="192.0.2.3", port=3500,
            tags=["v2"], meta={"DAPR_PORT": "50001"}, check=consul.Check.ttl("10s"),
        )  # fmt: skip
        assert ok is True
        assert await c.agent.check.ttl_pass("service:orders-1") is True
        index, nodes = await c.health.service("orders", passing=True)
        assert int(index) >= 1
        [entry] = nodes
        assert (entry["Service"]["Address"], entry["Service"]["Port"]) == ("192.0.2.3", 3500)
        assert entry["Service"]["Tags"] == ["v2"]
        _, services = await c.catalog.services()
        assert services == {"orders": ["v2"]}
        _, rows = await c.catalog.service("orders")
        assert rows[0]["ServiceID"] == "orders-1"
        assert (await c.agent.self())["Config"]["Datacenter"] == "east"
        assert await c.status.leader() == "192.0.2.7:7946"
        assert await c.agent.service.deregister("orders-1") is True
        _, nodes = await c.health.service("orders")
        assert nodes == []
        assert await c.agent.check.ttl_pass("service:orders-1") is False  # 404
    finally:
        await c.close()


async def test_register_that_cannot_be_stored_is_507_text(
    client: TestClient, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def cannot_store(reg: Registration) -> int:
        raise StorageError("the disk of state directory /s is full; nothing was stored", True)

    monkeypatch.setattr(agent, "register", cannot_store)
    status, text = await put(client, "/v1/agent/service/register", GO_BODY)
    assert status == 507
    assert text == "the disk of state directory /s is full; nothing was stored"
    assert_text_error(text)
    assert agent.registrations == {}


async def test_a_native_registrations_check_type_shows_in_consul_answers(client: TestClient):
    body = {"app": "jobs", "address": "192.0.2.9", "port": 9000, "check": {"ttl": "10s"}}
    status, _ = await put(client, "/v1/apps/jobs-1", body)
    assert status == 200
    _, entries, _ = await get(client, "/v1/health/service/jobs")
    checks = {c["CheckID"]: c for c in entries[0]["Checks"]}
    assert checks["service:jobs-1"]["Type"] == "ttl"
    assert checks["serfHealth"]["Type"] == ""


@pytest.mark.parametrize(
    ("method", "path", "named"),
    [
        ("GET", "/v1/agent/metrics", "/metrics"),
        ("GET", "/v1/agent/metrics?format=prometheus", "/metrics"),
        ("GET", "/v1/agent/host", "host information"),
        ("GET", "/v1/agent/version", "/v1/agent/self"),
        ("GET", "/v1/agent/monitor", "log streaming"),
        ("PUT", "/v1/agent/reload", "reload"),
        ("PUT", "/v1/agent/maintenance?enable=true", "node maintenance"),
        ("PUT", "/v1/agent/leave", "leaving"),
        ("PUT", "/v1/agent/join/10.0.0.1", "--join"),
        ("PUT", "/v1/agent/force-leave/n1", "force-leave"),
        ("PUT", "/v1/agent/token/default", "API token"),
        ("PUT", "/v1/catalog/register", "/v1/agent/service/register"),
        ("PUT", "/v1/catalog/deregister", "agent endpoint"),
        ("GET", "/v1/coordinate/datacenters", "WAN coordinates"),
    ],
)
async def test_consul_endpoints_meshd_lacks_answer_501_with_a_sentence(
    client: TestClient, method: str, path: str, named: str
) -> None:
    # Not a 404 "no API route": a client must not read it as "nothing there".
    resp = await client.request(method, path)
    text = await resp.text()
    assert resp.status == 501, (path, resp.status, text)
    assert text.startswith("meshd does not implement") and named in text, text
    assert "\n" not in text.strip()
