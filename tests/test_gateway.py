from typing import Any

import pytest

from meshd.agent.interface import Endpoint
from meshd.api.consul import gateway_routes, health_entry, health_rows, via_gateway
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


GW = {"address": "127.0.0.9", "port": 8443, "sni": "orders-1.orders.default.east.mesh.local"}


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
    service = health_entry(out, 1)["Service"]
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
