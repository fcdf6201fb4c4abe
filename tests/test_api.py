"""Tests for meshd.api: the local HTTP API against an in-memory fake agent.

The fake (tests/fakes.py, the ``agent`` fixture of tests/conftest.py)
implements AgentAPI and nothing more, so these tests pin the HTTP contract
(paths, JSON shapes, status codes, error sentences) independently of the real
agent.  Every rejected request is also checked to have reached the agent not
at all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshd.agent.interface import CheckSpec, Endpoint, Registration, StorageError
from meshd.api.app import MAX_BODY_BYTES, create_app
from meshd.api.durations import parse_duration
from meshd.api.validation import ApiError, is_host, parse_check
from meshd.wire import AppRecord
from tests.api_server import ApiTestServer, api_client
from tests.fakes import FakeAgent

VALID = {"app": "orders", "address": "192.0.2.3", "port": 3500}
ENDPOINT_KEYS = {
    "instance",
    "address",
    "port",
    "protocol",
    "node",
    "cluster",
    "region",
    "zone",
    "health",
    "weight",
    "meta",
    "tier",
}


async def put_app(client: TestClient, instance: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    resp = await client.put(f"/v1/apps/{instance}", data=data)
    return resp.status, await resp.json()


def assert_one_sentence_error(body: Any) -> str:
    assert set(body) == {"error"}
    message = body["error"]
    assert isinstance(message, str) and message
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("1m", 60.0),
        ("1m30s", 90.0),
        ("1h", 3600.0),
        ("2h45m", 9900.0),
        ("1.5s", 1.5),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("250ns", 2.5e-7),
        ("+5s", 5.0),
        ("-5s", -5.0),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_parse_duration_accepts_go_durations(text: str, seconds: float) -> None:
    assert math.isclose(parse_duration(text), seconds, rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "10",
        "s",
        "1x",
        "1.5",
        " 10s",
        "10s ",
        "1m 30s",
        "-",
        ".s",
        "1e3s",
        "１s",
        "5sm",
        "9" * 30 + "h",
    ],
)
def test_parse_duration_rejects_non_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**9))
def test_parse_duration_milliseconds_round_trip(ms: int) -> None:
    assert math.isclose(parse_duration(f"{ms}ms"), ms / 1000, rel_tol=1e-12)


@given(st.text(max_size=30))
def test_parse_duration_only_ever_raises_value_error(text: str) -> None:
    try:
        value = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(value)


# ---------------------------------------------------------------------------
# Pure validators


@pytest.mark.parametrize(
    "host", ["192.0.2.3", "::1", "fe80::1", "orders.svc.local", "a", "n-7.example.com", "x1"]
)
def test_is_host_accepts_ips_and_names(host: str) -> None:
    assert is_host(host)


@pytest.mark.parametrize(
    "host",
    ["", "-a", "a-", "a..b", "a_b.com", "192.0.2.256", "1.2.3", "a" * 64, "ä.com", "a b", "a.b."],
)
def test_is_host_rejects_the_rest(host: str) -> None:
    assert not is_host(host)


def test_parse_check_shapes() -> None:
    assert parse_check({"ttl": "10s"}) == CheckSpec(kind="ttl", ttl=10.0)
    assert parse_check({"http": "http://127.0.0.1:3500/healthz", "interval": "5s"}) == CheckSpec(
        kind="http", target="http://127.0.0.1:3500/healthz", interval=5.0
    )
    assert parse_check({"tcp": "[::1]:3500", "interval": "1m30s"}) == CheckSpec(
        kind="tcp", target="[::1]:3500", interval=90.0
    )
    with pytest.raises(ApiError):
        parse_check({"ttl": "50ms"})
    with pytest.raises(ApiError):
        parse_check({"ttl": "25h"})


# ---------------------------------------------------------------------------
# Registration: happy paths


async def test_register_minimal_uses_contract_defaults(
    client: TestClient, agent: FakeAgent
) -> None:
    status, body = await put_app(client, "orders-1", VALID)
    assert status == 200
    assert body == {"instance": "orders-1", "version": agent.index}
    reg = agent.registrations["orders-1"]
    r = reg.record
    assert (r.app, r.address, r.port) == ("orders", "192.0.2.3", 3500)
    assert (r.namespace, r.protocol, r.weight, r.meta, r.health) == (
        "default",
        "http",
        1,
        (),
        "passing",
    )
    assert reg.check is None


async def test_register_full_body_and_replace(client: TestClient, agent: FakeAgent) -> None:
    full = {
        **VALID,
        "namespace": "shop",
        "protocol": "grpc",
        "meta": {"version": "2", "dapr": "yes"},
        "weight": 0,
        "check": {"http": "https://orders.svc.local:8443/healthz", "interval": "500ms"},
    }
    status, body = await put_app(client, "orders-1", full)
    assert status == 200
    first = body["version"]
    reg = agent.registrations["orders-1"]
    assert reg.record.namespace == "shop" and reg.record.protocol == "grpc"
    assert reg.record.meta == (("dapr", "yes"), ("version", "2"))
    assert reg.record.weight == 0
    assert reg.check == CheckSpec(
        kind="http", target="https://orders.svc.local:8443/healthz", interval=0.5
    )
    # PUT again replaces: same instance, new version, new values.
    status, body = await put_app(client, "orders-1", {**VALID, "check": {"ttl": "10s"}})
    assert status == 200 and body["version"] > first
    assert agent.registrations["orders-1"].check == CheckSpec(kind="ttl", ttl=10.0)
    assert agent.registrations["orders-1"].record.namespace == "default"


async def test_register_null_optional_fields_take_defaults(
    client: TestClient, agent: FakeAgent
) -> None:
    body = {**VALID, "namespace": None, "protocol": None, "meta": None, "weight": None}
    status, _ = await put_app(client, "o1", {**body, "check": None})
    assert status == 200
    r = agent.registrations["o1"].record
    assert (r.namespace, r.protocol, r.meta, r.weight) == ("default", "http", (), 1)


@pytest.mark.parametrize("address", ["192.0.2.3", "::1", "orders.svc.cluster.local", "localhost"])
async def test_register_accepts_ip_and_host_addresses(
    client: TestClient, agent: FakeAgent, address: str
) -> None:
    status, _ = await put_app(client, "o1", {**VALID, "address": address})
    assert status == 200
    assert agent.registrations["o1"].record.address == address


async def test_register_tcp_check(client: TestClient, agent: FakeAgent) -> None:
    check = {"tcp": "192.0.2.3:3500", "interval": "5s"}
    status, _ = await put_app(client, "o1", {**VALID, "check": check})
    assert status == 200
    assert agent.registrations["o1"].check == CheckSpec(
        kind="tcp", target="192.0.2.3:3500", interval=5.0
    )


async def test_register_value_error_from_agent_is_400(client: TestClient, agent: FakeAgent) -> None:
    agent.refuse = "this node already publishes 512 apps"
    status, body = await put_app(client, "o1", VALID)
    assert status == 400
    assert body == {"error": "this node already publishes 512 apps"}
    assert agent.registrations == {}


# ---------------------------------------------------------------------------
# Registration: every validation error is a 400 that never reaches the agent


BAD_BODIES: list[tuple[str, Any, str]] = [
    # (case id, body as JSON value or raw text, a word the error must contain)
    ("invalid-json", "{not json", "JSON"),
    ("empty-body", "", "empty"),
    ("nan", '{"app": "o", "address": "192.0.2.1", "port": NaN}', "JSON"),
    ("not-utf8", b'{"app": "\xff"}', "JSON"),
    ("deep-nesting", "[" * 100_000, "JSON"),
    ("array-body", [VALID], "object"),
    ("string-body", '"orders"', "object"),
    ("null-body", "null", "object"),
    ("missing-app", {"address": "192.0.2.3", "port": 1}, "app"),
    ("missing-address", {"app": "o", "port": 1}, "address"),
    ("missing-port", {"app": "o", "address": "192.0.2.3"}, "port"),
    ("null-port", {**VALID, "port": None}, "port"),
    ("unknown-field", {**VALID, "tags": ["a"]}, "tags"),
    ("unknown-field-case", {**VALID, "Port": 1}, "Port"),
    ("app-type", {**VALID, "app": 7}, "app"),
    ("app-name", {**VALID, "app": "bad name"}, "app"),
    ("app-empty", {**VALID, "app": ""}, "app"),
    ("app-newline", {**VALID, "app": "orders\n"}, "app"),
    ("namespace-name", {**VALID, "namespace": "a/b"}, "namespace"),
    ("namespace-type", {**VALID, "namespace": ["x"]}, "namespace"),
    ("address-type", {**VALID, "address": 10}, "address"),
    ("address-bad-ip", {**VALID, "address": "192.0.2.256"}, "address"),
    ("address-bad-name", {**VALID, "address": "-orders.local"}, "address"),
    ("address-url", {**VALID, "address": "http://192.0.2.1"}, "address"),
    ("address-empty", {**VALID, "address": ""}, "address"),
    ("address-long", {**VALID, "address": "a." * 127 + "com"}, "address"),
    ("port-zero", {**VALID, "port": 0}, "port"),
    ("port-high", {**VALID, "port": 65536}, "port"),
    ("port-negative", {**VALID, "port": -1}, "port"),
    ("port-string", {**VALID, "port": "3500"}, "port"),
    ("port-float", {**VALID, "port": 3500.0}, "port"),
    ("port-bool", {**VALID, "port": True}, "port"),
    ("protocol", {**VALID, "protocol": "udp"}, "protocol"),
    ("protocol-type", {**VALID, "protocol": {"x": 1}}, "protocol"),
    ("weight-negative", {**VALID, "weight": -1}, "weight"),
    ("weight-type", {**VALID, "weight": "1"}, "weight"),
    ("weight-bool", {**VALID, "weight": False}, "weight"),
    ("weight-huge", {**VALID, "weight": 10**30}, "weight"),
    ("meta-list", {**VALID, "meta": ["a"]}, "meta"),
    ("meta-int-value", {**VALID, "meta": {"a": 1}}, "meta"),
    ("meta-null-value", {**VALID, "meta": {"a": None}}, "meta"),
    ("meta-too-many", {**VALID, "meta": {f"k{i}": "v" for i in range(65)}}, "meta"),
    ("meta-too-big", {**VALID, "meta": {"k": "v" * 5000}}, "meta"),
    (
        "meta-lone-surrogate-key",
        '{"app":"o","address":"h","port":1,"meta":{"\\udfff":"v"}}',
        "meta",
    ),
    ("address-scope-surrogate", '{"app":"o","address":"fe80::1%\\ud800","port":1}', "address"),
    ("address-non-ascii", {**VALID, "address": "bücher.de"}, "address"),
    ("meta-lone-surrogate", '{"app":"o","address":"h","port":1,"meta":{"k":"\\ud800"}}', "meta"),
    ("check-type", {**VALID, "check": "10s"}, "check"),
    ("check-empty", {**VALID, "check": {}}, "check"),
    ("check-two-kinds", {**VALID, "check": {"ttl": "1s", "tcp": "h:1", "interval": "1s"}}, "check"),
    ("check-unknown", {**VALID, "check": {"ttl": "1s", "grace": "1s"}}, "grace"),
    ("check-ttl-interval", {**VALID, "check": {"ttl": "1s", "interval": "1s"}}, "interval"),
    ("check-ttl-number", {**VALID, "check": {"ttl": 10}}, "check.ttl"),
    ("check-ttl-no-unit", {**VALID, "check": {"ttl": "10"}}, "check.ttl"),
    ("check-ttl-short", {**VALID, "check": {"ttl": "99ms"}}, "check.ttl"),
    ("check-ttl-long", {**VALID, "check": {"ttl": "24h1s"}}, "check.ttl"),
    ("check-ttl-negative", {**VALID, "check": {"ttl": "-10s"}}, "check.ttl"),
    ("check-http-no-interval", {**VALID, "check": {"http": "http://h/"}}, "check.interval"),
    ("check-http-scheme", {**VALID, "check": {"http": "ftp://h/", "interval": "5s"}}, "check.http"),
    (
        "check-http-no-host",
        {**VALID, "check": {"http": "http:///x", "interval": "5s"}},
        "check.http",
    ),
    (
        "check-http-port",
        {**VALID, "check": {"http": "http://h:99999/", "interval": "5s"}},
        "check.http",
    ),
    (
        "check-http-space",
        {**VALID, "check": {"http": "http://h/a b", "interval": "5s"}},
        "check.http",
    ),
    ("check-http-v6", {**VALID, "check": {"http": "http://[::1/", "interval": "5s"}}, "check.http"),
    ("check-http-type", {**VALID, "check": {"http": 1, "interval": "5s"}}, "check.http"),
    (
        "check-interval",
        {**VALID, "check": {"http": "http://h/", "interval": "5"}},
        "check.interval",
    ),
    ("check-tcp-no-port", {**VALID, "check": {"tcp": "h", "interval": "5s"}}, "check.tcp"),
    ("check-tcp-port-zero", {**VALID, "check": {"tcp": "h:0", "interval": "5s"}}, "check.tcp"),
    ("check-tcp-bare-v6", {**VALID, "check": {"tcp": "::1:80", "interval": "5s"}}, "check.tcp"),
    ("check-tcp-bad-host", {**VALID, "check": {"tcp": "a_b:80", "interval": "5s"}}, "check.tcp"),
]


@pytest.mark.parametrize(
    ("body", "word"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES]
)
async def test_register_rejects_bad_bodies(
    client: TestClient, agent: FakeAgent, body: Any, word: str
) -> None:
    status, answer = await put_app(client, "orders-1", body)
    assert status == 400
    message = assert_one_sentence_error(answer)
    assert word in message
    assert agent.calls == [] and agent.registrations == {}


@pytest.mark.parametrize("instance", ["bad%20name", "-x", "a" * 254, "x%0A"])
async def test_register_rejects_bad_instance_names(
    client: TestClient, agent: FakeAgent, instance: str
) -> None:
    status, answer = await put_app(client, instance, VALID)
    assert status == 400
    assert "instance" in assert_one_sentence_error(answer)
    assert agent.calls == []


async def test_unknown_field_is_named(client: TestClient) -> None:
    _, answer = await put_app(client, "o1", {**VALID, "healthcheck": {}})
    assert answer == {"error": "unknown field 'healthcheck' in registration"}


# ---------------------------------------------------------------------------
# Deregister and health


async def test_deregister(client: TestClient, agent: FakeAgent) -> None:
    await put_app(client, "o1", VALID)
    resp = await client.delete("/v1/apps/o1")
    assert resp.status == 200
    assert await resp.json() == {"instance": "o1", "deregistered": True}
    assert agent.registrations == {}
    resp = await client.delete("/v1/apps/o1")
    assert resp.status == 404
    assert "o1" in assert_one_sentence_error(await resp.json())


async def test_set_health(client: TestClient, agent: FakeAgent) -> None:
    await put_app(client, "o1", {**VALID, "check": {"ttl": "10s"}})
    for status in ("warning", "critical", "passing"):
        resp = await client.put("/v1/apps/o1/health", json={"status": status})
        assert resp.status == 200
        assert await resp.json() == {"instance": "o1", "status": status}
        assert agent.registrations["o1"].record.health == status


async def test_set_health_unknown_instance_is_404(client: TestClient) -> None:
    resp = await client.put("/v1/apps/nope/health", json={"status": "passing"})
    assert resp.status == 404
    assert "nope" in assert_one_sentence_error(await resp.json())


@pytest.mark.parametrize(
    "body",
    [
        {"status": "ok"},
        {"status": "PASSING"},
        {"status": None},
        {"status": ["passing"]},
        {},
        {"status": "passing", "output": "fine"},
        ["passing"],
        "passing",
    ],
)
async def test_set_health_rejects_bad_bodies(
    client: TestClient, agent: FakeAgent, body: Any
) -> None:
    await put_app(client, "o1", VALID)
    agent.calls.clear()
    resp = await client.put("/v1/apps/o1/health", data=json.dumps(body))
    assert resp.status == 400
    assert_one_sentence_error(await resp.json())
    assert agent.calls == []
    assert agent.registrations["o1"].record.health == "passing"


async def test_set_health_rejects_invalid_json(client: TestClient, agent: FakeAgent) -> None:
    resp = await client.put("/v1/apps/o1/health", data="{status: passing}")
    assert resp.status == 400
    assert "JSON" in assert_one_sentence_error(await resp.json())
    assert agent.calls == []


# ---------------------------------------------------------------------------
# Listing and resolving


async def test_list_apps(client: TestClient, agent: FakeAgent) -> None:
    resp = await client.get("/v1/apps")
    assert resp.status == 200 and await resp.json() == []
    await put_app(client, "o1", {**VALID, "meta": {"a": "b"}, "check": {"ttl": "10s"}})
    await put_app(client, "o2", {**VALID, "check": {"tcp": "h:1", "interval": "500ms"}})
    resp = await client.get("/v1/apps")
    assert await resp.json() == [
        {
            "instance": "o1",
            "app": "orders",
            "namespace": "default",
            "address": "192.0.2.3",
            "port": 3500,
            "protocol": "http",
            "meta": {"a": "b"},
            "weight": 1,
            "health": "passing",
            "check": {"ttl": "10s"},
        },
        {
            "instance": "o2",
            "app": "orders",
            "namespace": "default",
            "address": "192.0.2.3",
            "port": 3500,
            "protocol": "http",
            "meta": {},
            "weight": 1,
            "health": "passing",
            "check": {"tcp": "h:1", "interval": "500ms"},
        },
    ]


async def test_resolve_shape_and_header(client: TestClient, agent: FakeAgent) -> None:
    await put_app(client, "orders-1", {**VALID, "meta": {"v": "2"}})
    resp = await client.get("/v1/resolve/orders")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"app", "namespace", "index", "endpoints"}
    assert body["app"] == "orders" and body["namespace"] == "default"
    assert body["index"] == agent.index
    assert resp.headers["X-Meshd-Index"] == str(body["index"])
    assert body["endpoints"] == [
        {
            "instance": "orders-1",
            "address": "192.0.2.3",
            "port": 3500,
            "protocol": "http",
            "node": "n7",
            "cluster": "east",
            "region": "us-east",
            "zone": "us-east-1a",
            "health": "passing",
            "weight": 1,
            "meta": {"v": "2"},
            "tier": "node",
        }
    ]
    assert set(body["endpoints"][0]) == ENDPOINT_KEYS


async def test_resolve_unknown_app_is_empty(client: TestClient, agent: FakeAgent) -> None:
    resp = await client.get("/v1/resolve/nothing", params={"namespace": "shop"})
    assert resp.status == 200
    assert await resp.json() == {
        "app": "nothing",
        "namespace": "shop",
        "index": agent.index,
        "endpoints": [],
    }


async def test_resolve_namespace_and_all(client: TestClient, agent: FakeAgent) -> None:
    await put_app(client, "a1", VALID)
    await put_app(client, "a2", VALID)
    await put_app(client, "s1", {**VALID, "namespace": "shop"})
    await client.put("/v1/apps/a2/health", json={"status": "critical"})

    async def instances(**params: str) -> list[str]:
        resp = await client.get("/v1/resolve/orders", params=params)
        assert resp.status == 200
        return sorted(e["instance"] for e in (await resp.json())["endpoints"])

    assert await instances() == ["a1"]
    assert await instances(namespace="") == ["a1"]  # empty means the default
    assert await instances(namespace="shop") == ["s1"]
    assert await instances(all="1") == ["a1", "a2"]
    assert await instances(all="true") == ["a1", "a2"]
    assert await instances(all="") == ["a1", "a2"]  # a bare ?all is set
    assert await instances(all="0") == ["a1"]
    assert await instances(policy="default") == ["a1"]


@pytest.mark.parametrize(
    ("params", "word"),
    [
        ({"index": "-1"}, "index"),
        ({"index": "abc"}, "index"),
        ({"index": "1.5"}, "index"),
        ({"index": "9" * 21}, "index"),
        ({"index": "1", "wait": "10"}, "wait"),
        ({"index": "1", "wait": "-1s"}, "wait"),
        ({"index": "1", "wait": "soon"}, "wait"),
        ({"wait": "x"}, "wait"),
        ({"all": "maybe"}, "all"),
        ({"policy": "nearest-moon"}, "nearest-moon"),
        ({"namespace": "a b"}, "namespace"),
    ],
)
async def test_resolve_rejects_bad_queries(
    client: TestClient, params: dict[str, str], word: str
) -> None:
    resp = await client.get("/v1/resolve/orders", params=params)
    assert resp.status == 400
    assert word in assert_one_sentence_error(await resp.json())


async def test_resolve_rejects_bad_app_name(client: TestClient) -> None:
    resp = await client.get("/v1/resolve/-orders")
    assert resp.status == 400
    assert "app" in assert_one_sentence_error(await resp.json())


async def test_blocking_resolve_returns_when_index_rises(
    client: TestClient, agent: FakeAgent
) -> None:
    start_index = agent.index
    query = {"index": str(start_index), "wait": "5m"}
    request = asyncio.create_task(client.get("/v1/resolve/orders", params=query))
    await agent.until_blocked()  # the query is parked, waiting for a change
    assert not request.done() and agent.waits == [(start_index, 300.0)]
    record = AppRecord(app="orders", instance="orders-9", address="192.0.2.3", port=3500)
    await agent.register(Registration(record))
    # Bounded far below the 5 minutes asked: only the change can release it in time.
    resp = await asyncio.wait_for(request, timeout=30)
    body = await resp.json()
    assert body["index"] > start_index
    assert resp.headers["X-Meshd-Index"] == str(body["index"])
    assert [e["instance"] for e in body["endpoints"]] == ["orders-9"]


async def test_blocking_resolve_times_out_after_wait(client: TestClient, agent: FakeAgent) -> None:
    index = agent.index
    resp = await asyncio.wait_for(
        client.get("/v1/resolve/orders", params={"index": str(index), "wait": "200ms"}),
        timeout=30,
    )
    assert resp.status == 200
    assert agent.waits == [(index, 0.2)]  # waited as long as asked, for a change past index
    body = await resp.json()
    assert body["index"] == index == agent.index and body["endpoints"] == []
    assert resp.headers["X-Meshd-Index"] == str(body["index"])


async def test_blocking_resolve_with_old_index_answers_at_once(
    client: TestClient, agent: FakeAgent
) -> None:
    agent.bump()
    # Bounded far below the 30 s asked: an index already passed must not wait.
    resp = await asyncio.wait_for(
        client.get("/v1/resolve/orders", params={"index": "0", "wait": "30s"}), timeout=10
    )
    assert (await resp.json())["index"] == agent.index


async def test_wait_is_clamped_and_defaulted(client: TestClient, agent: FakeAgent) -> None:
    seen: list[float] = []

    async def record_wait(index: int, timeout: float) -> int:
        seen.append(timeout)
        return agent.index

    agent.wait_for_index = record_wait  # type: ignore[method-assign]
    await client.get("/v1/resolve/orders", params={"index": "5", "wait": "1h"})
    await client.get("/v1/resolve/orders", params={"index": "5"})
    await client.get("/v1/resolve/orders", params={"index": "5", "wait": "1m30s"})
    await client.get("/v1/resolve/orders", params={"wait": "5s"})  # no index: no wait
    assert seen == [300.0, 30.0, 90.0]


# ---------------------------------------------------------------------------
# Resolve answers remembered by the exact request (the hot path)


def _counting_resolves(agent: FakeAgent) -> list[tuple[Any, ...]]:
    """Make ``agent.resolve`` log each call; the list it returns fills as calls come."""
    calls: list[tuple[Any, ...]] = []
    real = agent.resolve

    def counting(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    agent.resolve = counting  # type: ignore[method-assign,assignment]
    return calls


def _hot_answers(client: TestClient) -> dict[Any, Any]:
    """The resolve handler's remembered answers (the route's bound method's owner)."""
    assert isinstance(client.server, ApiTestServer)
    for route in client.server.app.router.routes():
        if route.method == "GET" and route.canonical == "/v1/resolve/{app}":
            hot: dict[Any, Any] = getattr(route.handler, "__self__")._hot  # noqa: B009
            return hot
    raise AssertionError("no resolve route")


async def test_resolve_repeated_is_the_same_answer_computed_once(
    client: TestClient, agent: FakeAgent
) -> None:
    await put_app(client, "a1", VALID)
    calls = _counting_resolves(agent)
    first = await client.get("/v1/resolve/orders", params={"all": "1"})
    body = await first.read()
    assert first.status == 200 and json.loads(body)["endpoints"][0]["instance"] == "a1"
    for _ in range(3):
        again = await client.get("/v1/resolve/orders", params={"all": "1"})
        assert again.status == 200 and await again.read() == body
        assert again.content_type == "application/json"
        assert again.headers["X-Meshd-Index"] == first.headers["X-Meshd-Index"]
    assert calls == [("orders", "default", None, True)]


async def test_resolve_remembered_answer_follows_every_change(
    client: TestClient, agent: FakeAgent
) -> None:
    await put_app(client, "a1", VALID)
    resp = await client.get("/v1/resolve/orders")
    assert [e["instance"] for e in (await resp.json())["endpoints"]] == ["a1"]
    await put_app(client, "a2", VALID)
    resp = await client.get("/v1/resolve/orders")
    body = await resp.json()
    assert sorted(e["instance"] for e in body["endpoints"]) == ["a1", "a2"]
    assert body["index"] == agent.index and resp.headers["X-Meshd-Index"] == str(agent.index)


async def test_resolve_remembered_answer_never_skips_a_blocking_wait(
    client: TestClient, agent: FakeAgent
) -> None:
    index = agent.index
    await client.get("/v1/resolve/orders")  # the same app answered once without an index
    for _ in range(2):
        resp = await asyncio.wait_for(
            client.get("/v1/resolve/orders", params={"index": str(index), "wait": "100ms"}),
            timeout=30,
        )
        assert resp.status == 200
    assert agent.waits == [(index, 0.1), (index, 0.1)]


async def test_resolve_bad_request_is_refused_every_time(
    client: TestClient, agent: FakeAgent
) -> None:
    calls = _counting_resolves(agent)
    for _ in range(3):
        resp = await client.get("/v1/resolve/orders", params={"all": "maybe"})
        assert resp.status == 400 and "all" in assert_one_sentence_error(await resp.json())
        resp = await client.get("/v1/resolve/-orders")
        assert resp.status == 400 and "app" in assert_one_sentence_error(await resp.json())
    assert calls == [] and _hot_answers(client) == {}


async def test_resolve_remembered_answers_are_bounded(
    client: TestClient, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    import meshd.api.app as api_app

    monkeypatch.setattr(api_app, "MAX_CACHED_ANSWERS", 8)
    await put_app(client, "a1", VALID)
    expected = await (await client.get("/v1/resolve/orders")).read()
    # Parameters the API ignores make distinct spellings of one question.
    for i in range(30):
        resp = await client.get("/v1/resolve/orders", params={"x": str(i)})
        assert await resp.read() == expected
        assert 1 <= len(_hot_answers(client)) <= 8
    long_query = {"x": "y" * api_app.MAX_HOT_TARGET}
    resp = await client.get("/v1/resolve/orders", params=long_query)
    assert resp.status == 200 and await resp.read() == expected
    assert all(len(target) <= api_app.MAX_HOT_TARGET for target in _hot_answers(client))


async def test_resolve_remembered_answers_are_measured_and_counted(
    client: TestClient, agent: FakeAgent
) -> None:
    for _ in range(3):
        assert (await client.get("/v1/resolve/orders")).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'meshd_http_requests_total{route="/v1/resolve/{app}",status="200"} 3.0' in text
    assert "meshd_lookup_seconds_count 3.0" in text


# ---------------------------------------------------------------------------
# Members, clusters, health, metrics


async def test_members(client: TestClient) -> None:
    resp = await client.get("/v1/members")
    rows = await resp.json()
    assert resp.status == 200 and len(rows) == 3
    assert rows[0] == {
        "node": "n7",
        "cluster": "east",
        "region": "us-east",
        "zone": "us-east-1a",
        "address": "192.0.2.7:7946",
        "status": "alive",
        "incarnation": 3,
    }
    resp = await client.get("/v1/members", params={"cluster": "west"})
    assert [m["node"] for m in await resp.json()] == ["w1"]
    resp = await client.get("/v1/members", params={"cluster": "no such"})
    assert resp.status == 400


async def test_clusters(client: TestClient) -> None:
    resp = await client.get("/v1/clusters")
    assert resp.status == 200
    assert await resp.json() == [
        {"cluster": "east", "reachable": True, "nodes": 2, "bridges": 1},
        {"cluster": "west", "reachable": False, "nodes": 1, "bridges": 0},
    ]


async def test_health(client: TestClient) -> None:
    resp = await client.get("/v1/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok", "node": "n7", "cluster": "east"}


async def test_health_is_degraded_while_the_agent_cannot_store(
    client: TestClient, agent: FakeAgent
) -> None:
    agent.storage_error = "the disk of state directory /s is full; nothing was stored"
    resp = await client.get("/v1/health")
    assert resp.status == 503
    assert await resp.json() == {
        "status": "degraded",
        "node": "n7",
        "cluster": "east",
        "reason": "the disk of state directory /s is full; nothing was stored",
    }
    agent.storage_error = None
    assert (await client.get("/v1/health")).status == 200


@pytest.mark.parametrize("full, status", [(True, 507), (False, 503)])
async def test_a_storage_error_of_any_write_is_507_or_503_with_its_sentence(
    client: TestClient, agent: FakeAgent, monkeypatch: pytest.MonkeyPatch, full: bool, status: int
) -> None:
    async def cannot_store(*args: Any) -> Any:
        raise StorageError("the disk is full; nothing was stored", full=full)

    for method in ("register", "deregister", "set_health"):
        monkeypatch.setattr(agent, method, cannot_store)
    for resp in (
        await client.put("/v1/apps/o1", json=VALID),
        await client.delete("/v1/apps/o1"),
        await client.put("/v1/apps/o1/health", json={"status": "passing"}),
    ):
        assert resp.status == status
        assert await resp.json() == {"error": "the disk is full; nothing was stored"}


async def test_metrics(client: TestClient, agent: FakeAgent) -> None:
    await put_app(client, "o1", VALID)
    await client.get("/v1/resolve/orders")
    await client.get("/v1/resolve/orders", params={"all": "bogus"})
    await client.get("/nope")
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST
    text = await resp.text()
    assert "meshd_lookup_seconds" in text
    assert "meshd_http_requests_total" in text
    assert 'meshd_http_requests_total{route="/v1/resolve/{app}",status="200"} 1.0' in text
    assert 'meshd_http_requests_total{route="/v1/resolve/{app}",status="400"} 1.0' in text
    assert 'meshd_http_requests_total{route="/v1/apps/{instance}",status="200"} 1.0' in text
    assert 'meshd_http_requests_total{route="unmatched",status="404"} 1.0' in text
    assert "meshd_lookup_seconds_count 1.0" in text  # the 400 never reached the lookup


# ---------------------------------------------------------------------------
# Errors the framework raises, and our own bugs


async def test_unknown_path_is_json_404(client: TestClient) -> None:
    resp = await client.get("/v1/nothing/here")
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert "/v1/nothing/here" in assert_one_sentence_error(await resp.json())


async def test_wrong_method_is_json_405(client: TestClient) -> None:
    resp = await client.post("/v1/apps/o1", json=VALID)
    assert resp.status == 405
    assert resp.content_type == "application/json"
    assert "POST" in assert_one_sentence_error(await resp.json())
    assert set(resp.headers["Allow"].split(",")) == {"DELETE", "PUT"}


async def test_body_over_limit_is_json_413(client: TestClient, agent: FakeAgent) -> None:
    big = json.dumps({**VALID, "meta": {"k": "v" * MAX_BODY_BYTES}})
    resp = await client.put("/v1/apps/o1", data=big)
    assert resp.status == 413
    assert resp.content_type == "application/json"
    assert_one_sentence_error(await resp.json())
    assert agent.calls == []


async def test_body_at_limit_is_read(client: TestClient, agent: FakeAgent) -> None:
    # Exactly 1 MiB of JSON (padded with whitespace) is accepted and then validated.
    data = json.dumps(VALID).encode()
    data += b" " * (MAX_BODY_BYTES - len(data))
    resp = await client.put("/v1/apps/o1", data=data)
    assert resp.status == 200
    assert "o1" in agent.registrations


async def test_handler_exception_is_json_500_and_server_keeps_serving(
    client: TestClient, agent: FakeAgent, caplog: pytest.LogCaptureFixture
) -> None:
    agent.explode = True
    with caplog.at_level(logging.ERROR, logger="meshd.api"):
        resp = await client.get("/v1/members")
    assert resp.status == 500
    assert resp.content_type == "application/json"
    message = assert_one_sentence_error(await resp.json())
    assert "boom" not in message  # internals stay in the log
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)
    agent.explode = False
    resp = await client.get("/v1/members")
    assert resp.status == 200
    resp = await client.get("/metrics")
    assert 'route="/v1/members",status="500"' in await resp.text()


async def test_key_error_without_policy_is_a_500_not_a_policy_error(
    client: TestClient, agent: FakeAgent
) -> None:
    def broken(*args: Any) -> tuple[int, list[Endpoint]]:
        raise KeyError("oops")

    agent.resolve = broken  # type: ignore[method-assign, assignment]
    resp = await client.get("/v1/resolve/orders")
    assert resp.status == 500
    assert "policy" not in assert_one_sentence_error(await resp.json())


# ---------------------------------------------------------------------------
# Property: no JSON body makes PUT /v1/apps/x answer 500

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
FIELD_NAMES = ["app", "address", "port", "namespace", "protocol", "meta", "weight", "check"]
field_values = st.one_of(
    json_values,
    st.sampled_from(["orders", "192.0.2.1", "::1", "h.local", "http", "grpc", "10s", "0", ""]),
    st.integers(min_value=-2, max_value=70000),
    st.fixed_dictionaries(
        {},
        optional={
            "ttl": st.sampled_from(["10s", "1ms", "1h", "x"]) | json_values,
            "http": st.sampled_from(["http://h/", "https://[::1]:1/", "x://"]) | json_values,
            "tcp": st.sampled_from(["h:1", "[::1]:80", "::1", "h:0"]) | json_values,
            "interval": st.sampled_from(["5s", "0", "99ms"]) | json_values,
        },
    ),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5) | json_values, max_size=3),
)
# Near-valid bodies: the valid base with some fields replaced, dropped or added,
# so the search reaches the deep validators instead of stopping at "not an object".
near_valid = st.builds(
    lambda base, changes, drop: {k: v for k, v in {**base, **changes}.items() if k not in drop},
    st.just(dict(VALID)),
    st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=6), field_values, max_size=4),
    st.sets(st.sampled_from(FIELD_NAMES), max_size=2),
)

# Valid bodies with every optional field drawn, so the 200 path is searched too.
valid_bodies = st.fixed_dictionaries(
    {k: st.just(v) for k, v in VALID.items()},
    optional={
        "namespace": st.sampled_from(["default", "shop", "a.b-c_d"]),
        "protocol": st.sampled_from(["http", "grpc", "tcp"]),
        "meta": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=5),
        "weight": st.integers(min_value=0, max_value=1_000_000),
        "check": st.sampled_from(
            [
                {"ttl": "10s"},
                {"http": "http://192.0.2.3:3500/healthz", "interval": "5s"},
                {"tcp": "h.local:3500", "interval": "1m30s"},
            ]
        ),
    },
)


@pytest.mark.slow
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.one_of(json_values, near_valid, valid_bodies))
async def test_random_registration_bodies_never_500(body: Any) -> None:
    agent = FakeAgent()
    async with api_client(create_app(agent)) as client:
        resp = await client.put("/v1/apps/x", data=json.dumps(body))
        answer = await resp.json()
    event(f"status {resp.status}")  # shows in --hypothesis-show-statistics: both paths reached
    assert resp.status in (200, 400), (resp.status, answer)
    if resp.status == 400:
        assert_one_sentence_error(answer)
        assert agent.calls == []
    else:
        assert answer == {"instance": "x", "version": agent.index}


async def test_policy_get_put_and_a_bad_policy_keeps_the_old_one(client, agent):
    resp = await client.put("/v1/policy", json={"failover": ["west", "central"]})
    assert resp.status == 200
    assert (await resp.json())["failover"] == ["west", "central"]
    resp = await client.put("/v1/policy", json={"min_healthy": -1})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert "min_healthy" in error and "\n" not in error
    resp = await client.get("/v1/policy")
    assert (await resp.json())["failover"] == ["west", "central"]
    resp = await client.put("/v1/policy", data=b"[1, 2]")
    assert resp.status == 400


async def test_export_is_validated_and_stored(client, agent):
    body = {"app": "orders", "address": "127.0.0.1", "port": 80, "export": ["west", "central"]}
    resp = await client.put("/v1/apps/o-1", json=body)
    assert resp.status == 200
    assert agent.registrations["o-1"].record.export == ("central", "west")
    for bad in ["west", [1], ["bad name!"], [f"c{i}" for i in range(20)]]:
        resp = await client.put("/v1/apps/o-2", json={**body, "export": bad})
        assert resp.status == 400
        assert "export" in (await resp.json())["error"]
    assert "o-2" not in agent.registrations
    resp = await client.get("/v1/records")
    assert resp.status == 200 and (await resp.json())[0]["origin"] == "east/n7"


def test_parse_wait_defaults_and_caps():
    from meshd.api.durations import parse_wait

    assert parse_wait(None, 30.0, 300.0) == 30.0
    assert parse_wait("", 30.0, 300.0) == 30.0
    assert parse_wait("2m", 30.0, 300.0) == 120.0
    assert parse_wait("1h", 30.0, 300.0) == 300.0
    for bad in ("-1s", "soon", "10"):
        with pytest.raises(ValueError):
            parse_wait(bad, 30.0, 300.0)
