import asyncio
import socket
from typing import Any

import pytest

from meshd.agent.interface import Endpoint
from meshd.agent.interface import Gateway as EndpointGateway
from meshd.api.consul import Where, gateway_routes, health_entry, health_rows, via_gateway
from meshd.cli import main
from meshd.gateway import MAX_ROUTES, Gateway, GatewayConfig, Target, allocate, targets_from
from meshd.policy.gateway import ROUTE_APP, Route, route_of, sni_label, sni_name, split_hostport


def test_plain_names_are_kept():
    assert sni_name("orders-1", "orders", "default", "east", "mesh.local") == (
        "orders-1.orders.default.east.mesh.local"
    )


@pytest.mark.parametrize("name", ["Orders", "a.b", "under_score", "x" * 64, "x--abc"])
def test_names_that_are_not_labels_are_hashed(name):
    label = sni_label(name)
    assert label.startswith("x--") and len(label) == 3 + 32
    assert sni_label(name) == label  # stable


def test_components_cannot_be_confused():
    # "a.b" in one place must not read like two labels "a" and "b".
    one = sni_name("i", "a.b", "default", "east", "mesh.local")
    two = sni_name("i", "a", "b", "east", "mesh.local")
    assert one != two
    assert len(one.split(".")) == len(["i", "x", "default", "east", "mesh", "local"])


def test_split_hostport():
    assert split_hostport("127.0.0.1:15443") == ("127.0.0.1", 15443)
    assert split_hostport("[::1]:443") == ("::1", 443)
    for bad in ["nohost", ":1", "h:0", "h:x"]:
        with pytest.raises(ValueError):
            split_hostport(bad)


# -- route records (what ``meshd gateway`` publishes) and the Consul answer --------


def _route_meta(**over: str) -> dict[str, str]:
    meta = Route("default", "orders", "orders-1", "127.0.0.9", 20001).meta()
    meta.update(over)
    return meta


def test_route_meta_round_trips():
    route = Route("ns", "orders", "orders-1", "gw.example.net", 20001)
    assert route_of(route.meta()) == route


@pytest.mark.parametrize(
    "over",
    [
        {"route-port": "0"},
        {"route-port": "65536"},
        {"route-port": "12a"},
        {"route-port": ""},
        {"route-address": "10.0.0.1:22"},
        {"route-address": "host name"},
        {"route-address": "a/b"},
        {"route-app": ""},
    ],
)
def test_a_malformed_route_is_no_route(over):
    assert route_of(_route_meta(**over)) is None


def _ep(app: str, instance: str, cluster: str, **kw: Any) -> Endpoint:
    base: dict[str, Any] = dict(
        app=app, namespace="default", instance=instance, address="10.0.0.1", port=3000,
        protocol="http", node="n1", cluster=cluster, region="r", zone="z",
        health="passing", weight=1,
    )  # fmt: skip
    base.update(kw)
    return Endpoint(**base)


GW = EndpointGateway("127.0.0.9", 8443, "orders-1.orders.default.east.mesh.local")


def _route_record(cluster: str, **kw: Any) -> Endpoint:
    meta = kw.pop("meta", _route_meta())
    return _ep(ROUTE_APP, "gw-20001", cluster, meta=meta, gateway=GW, **kw)


def test_a_dapr_endpoint_across_a_gateway_dials_its_route():
    routes = gateway_routes([_route_record("east")])
    e = _ep("orders", "orders-1", "east", address="127.0.0.9", port=8443,
            meta={"DAPR_PORT": "50002"}, gateway=GW)  # fmt: skip
    out = via_gateway(e, routes)
    assert (out.address, out.meta["DAPR_PORT"], out.reachable) == ("127.0.0.9", "20001", True)
    # What Dapr's resolver computes from the Consul entry.
    service = health_entry(out, Where(1, {}, {}))["Service"]
    assert f"{service['Address']}:{service['Meta']['DAPR_PORT']}" == "127.0.0.9:20001"


def test_a_plain_endpoint_across_a_gateway_gets_the_route_port():
    routes = gateway_routes([_route_record("east")])
    out = via_gateway(_ep("orders", "orders-1", "east", gateway=GW), routes)
    assert (out.address, out.port) == ("127.0.0.9", 20001)


def test_a_dapr_endpoint_without_a_route_is_not_passing():
    e = _ep("orders", "orders-1", "east", meta={"DAPR_PORT": "50002"}, gateway=GW)
    out = via_gateway(e, {})
    assert out.reachable is False
    assert health_rows([out], passing=True) == []
    # Not a Dapr instance: left as the gateway answers it (an SNI client may use it).
    plain = _ep("orders", "orders-1", "east", gateway=GW)
    assert via_gateway(plain, {}) == plain


def test_endpoints_not_behind_a_gateway_are_untouched():
    routes = gateway_routes([_route_record("east")])
    e = _ep("orders", "orders-1", "east", meta={"DAPR_PORT": "50002"})
    assert via_gateway(e, routes) is e


def test_only_a_passing_route_of_the_instances_own_cluster_counts():
    e = _ep("orders", "orders-1", "east", meta={"DAPR_PORT": "50002"}, gateway=GW)
    # A record from another cluster cannot redirect east's traffic.
    assert via_gateway(e, gateway_routes([_route_record("evil")])).reachable is False
    for bad in (
        _route_record("east", health="critical"),
        _route_record("east", reachable=False),
        _route_record("east", meta=_route_meta(**{"route-port": "x"})),
        _ep("orders", "gw-20001", "east", meta=_route_meta(), gateway=GW),  # not a route app
    ):
        assert gateway_routes([bad]) == {}


def test_the_first_route_in_policy_order_wins():
    near = _route_record("east")
    far = _route_record("east", meta=_route_meta(**{"route-address": "10.9.9.9"}))
    assert gateway_routes([near, far])[("east", "default", "orders", "orders-1")] == (
        "127.0.0.9",
        20001,
    )


# -- meshd gateway: ports, targets, piping -------------------------------------------


def test_allocate_is_sticky_deterministic_and_bounded():
    a, b, c = ("default", "orders", "a"), ("default", "orders", "b"), ("default", "orders", "c")
    first = allocate([a, b], {}, (20000, 20009))
    assert first == allocate([b, a], {}, (20000, 20009))  # order of arrival does not matter
    assert len(set(first.values())) == 2
    assert all(20000 <= p <= 20009 for p in first.values())
    # A port given stays given while its instance exists, whatever comes next.
    second = allocate([a, b, c], first, (20000, 20009))
    assert {k: second[k] for k in (a, b)} == first
    # A port that failed to bind is never handed out.
    third = allocate([a], {}, (20000, 20001), unusable=[first[a]] if first[a] <= 20001 else [])
    assert third[a] in (20000, 20001)
    # A full range leaves the rest out rather than sharing a port.
    assert len(allocate([a, b, c], {}, (20000, 20001))) == 2


def test_allocate_caps_routes():
    keys = [("default", "orders", f"i{n}") for n in range(MAX_ROUTES + 10)]
    assert len(allocate(keys, {}, (10000, 60000))) == MAX_ROUTES


def test_targets_are_the_own_clusters_instances_at_their_dapr_port():
    answer = {
        "app": "orders",
        "endpoints": [
            {"app": "orders", "instance": "a", "address": "10.0.0.1", "port": 3000,
             "cluster": "east", "meta": {"DAPR_PORT": "50002"}},
            {"app": "orders", "instance": "b", "address": "10.0.0.2", "port": 3000,
             "cluster": "east", "meta": {"DAPR_PORT": "99999"}},
            {"app": "orders", "instance": "c", "address": "10.0.0.3", "port": 3000,
             "cluster": "west", "meta": {}},
            {"app": "orders", "instance": "d", "address": "10.0.0.4", "port": 3000,
             "cluster": "east", "meta": {}, "gateway": {}},
            "garbage",
        ],
    }  # fmt: skip
    assert targets_from("east", "default", answer) == {
        ("default", "orders", "a"): Target("10.0.0.1", 50002),
        ("default", "orders", "b"): Target("10.0.0.2", 3000),  # a bad DAPR_PORT is no port
    }
    assert targets_from("east", "default", ["not", "an", "answer"]) == {}


class _FakeAgentGateway(Gateway):
    """A gateway whose local agent is a list of the calls it got."""

    __slots__ = ("calls",)
    calls: list[tuple[str, str, Any]]

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((method, path, body))
        return None


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _free_ports(n: int) -> tuple[int, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        first = min(s.getsockname()[1], 65535 - n)
    return first, first + n - 1


async def _closed_unanswered(port: int) -> bool:
    """The gateway accepted, sent nothing and closed (or reset) the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionError:
        return True
    finally:
        writer.close()


async def _roundtrip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return got


async def test_gateway_pipes_publishes_and_withdraws_routes():
    backend, backend_port = await _echo_server()
    key = ("default", "orders", "orders-1")
    config = GatewayConfig(api="http://agent", apps=(("default", "orders"),), ports=_free_ports(8))
    gw = _FakeAgentGateway(config, None)  # type: ignore[arg-type]
    gw.calls = []
    try:
        await gw.apply({key: Target("127.0.0.1", backend_port)}, {})
        [port] = gw.listeners
        [(method, path, body)] = gw.calls
        assert (method, path) == ("PUT", f"/v1/apps/gateway-{port}")
        assert body["app"] == "meshd-gateway" and body["check"]["tcp"] == f"127.0.0.1:{port}"
        assert route_of(body["meta"]) == Route(*key, address="127.0.0.1", port=port)
        payload = bytes(range(256)) * 1000
        assert await _roundtrip(port, payload) == payload
        # Nothing changed: nothing is published again.
        await gw.apply({key: Target("127.0.0.1", backend_port)}, {})
        assert len(gw.calls) == 1
        # The instance went away: its record is withdrawn and its port closed.
        await gw.apply({}, {})
        assert gw.calls[-1][:2] == ("DELETE", f"/v1/apps/gateway-{port}")
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await gw.close()
        backend.close()


async def test_gateway_caps_connections_and_survives_a_dead_backend():
    backend, backend_port = await _echo_server()
    key = ("default", "orders", "orders-1")
    config = GatewayConfig(
        api="http://agent", apps=(("default", "orders"),), ports=_free_ports(8), max_connections=1
    )
    gw = _FakeAgentGateway(config, None)  # type: ignore[arg-type]
    gw.calls = []
    try:
        await gw.apply({key: Target("127.0.0.1", backend_port)}, {})
        [port] = gw.listeners
        held_r, held_w = await asyncio.open_connection("127.0.0.1", port)
        held_w.write(b"ping")
        assert await asyncio.wait_for(held_r.readexactly(4), 5) == b"ping"
        # Over the cap: closed at once, nothing piped.
        assert await _closed_unanswered(port)
        held_w.close()
        await asyncio.wait_for(_wait_for(lambda: gw.connections == 0), 5)
        # A backend that is gone: the client's connection closes, the gateway serves on.
        backend.close()
        await backend.wait_closed()
        assert await _closed_unanswered(port)
        assert gw.connections == 0 and port in gw.listeners
    finally:
        await gw.close()


async def _wait_for(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    "argv",
    [
        ["gateway", "--app", "orders", "--ports", "9000-8000"],
        ["gateway", "--app", "orders", "--ports", "9000"],
        ["gateway", "--app", "bad name", "--ports", "9000-9001"],
        ["gateway", "--app", "orders", "--ports", "9000-9001", "--listen", "0.0.0.0"],
        ["gateway", "--ports", "9000-9001"],
    ],
)
def test_gateway_command_line_errors(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error" in err
