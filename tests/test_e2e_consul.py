"""End to end: the real ``consul`` client (py-consul) against two real agents.

Two ``meshd agent`` processes on 127.0.0.1 form one cluster; a service is
registered through agent A's Consul API and looked up through agent B's, as
a Dapr sidecar on another node would.  Timing bounds come from
``meshd.protocol.bounds`` for the ``local`` profile, plus slack for a busy
machine.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.request

import consul
import pytest

from meshd.protocol.bounds import repair_bound
from meshd.protocol.config import Config
from tests.agents import client_for, two_agents, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 5.0
SPREAD = repair_bound(2, LOCAL) + SLACK


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_agents(tmp_path_factory.mktemp("consul"), ("ca", "cb")) as agents:
        yield agents


def passing(c: consul.Consul, name: str) -> list[dict]:
    return c.health.service(name, passing=True)[1]


def test_register_on_a_resolve_block_and_deregister_on_b(pair):
    a, b = pair
    ca, cb = client_for(a), client_for(b)
    assert ca.agent.service.register(
        "orders", service_id="orders-1", address="127.0.0.1", port=3500,
        tags=["v1"], meta={"DAPR_PORT": "50001"}, check=consul.Check.ttl("30s"),
        enable_tag_override=True,
    )  # fmt: skip
    # A TTL check starts critical, as in Consul: nothing to route to yet.
    assert passing(ca, "orders") == []
    assert ca.agent.check.ttl_pass("service:orders-1")

    [entry] = wait_until(lambda: passing(cb, "orders"), SPREAD, "orders-1 passing on B")
    svc = entry["Service"]
    assert (svc["ID"], svc["Address"], svc["Port"]) == ("orders-1", "127.0.0.1", 3500)
    assert svc["Tags"] == ["v1"] and svc["Meta"] == {"DAPR_PORT": "50001"}
    assert svc["EnableTagOverride"] is True  # as registered, on the other agent too
    assert (entry["Node"]["Node"], entry["Node"]["Datacenter"]) == ("ca", "east")
    assert entry["Checks"][0]["Status"] == "passing"
    assert cb.catalog.services()[1] == {"orders": ["v1"]}
    assert cb.catalog.service("orders")[1][0]["ServicePort"] == 3500

    # A blocking query on B returns within a second of a change on A.  Loop as
    # a Consul client does: an answer for an unrelated change just re-blocks.
    index, _ = cb.health.service("orders", passing=True)
    result: dict = {}

    def watch() -> None:
        idx = index
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            idx, nodes = cb.health.service("orders", passing=True, index=idx, wait="20s")
            if nodes == []:
                result.update(returned=time.monotonic(), index=idx)
                return

    t = threading.Thread(target=watch)
    t.start()
    time.sleep(0.3)  # let the request reach B first (not a sync point: the loop copes)
    changed_at = time.monotonic()
    assert ca.agent.check.ttl_fail("service:orders-1")
    t.join(30)
    assert "returned" in result, "the blocking query on B never saw the change"
    assert result["returned"] - changed_at < 1.0
    assert int(result["index"]) > int(index)
    # Without ?passing Consul still lists it, critical.
    _, [entry] = cb.health.service("orders")
    assert entry["Checks"][0]["Status"] == "critical"

    assert ca.agent.service.deregister("orders-1")
    wait_until(
        lambda: all(c.health.service("orders")[1] == [] for c in (ca, cb)),
        SPREAD,
        "orders-1 gone from A and B",
    )
    assert "orders" not in cb.catalog.services()[1]
    assert ca.agent.service.deregister("orders-1") is False  # 404: already gone


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_dapr_self_registration_with_http_check(pair):
    """The registration Dapr's consul resolver sends, its HTTP check run by A,
    then Dapr's lookup on B: ``?passing=1``, Service.Address + Meta.DAPR_PORT."""
    a, b = pair
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    app_id = f"checkout-127.0.0.1-{port}"
    body = {
        "ID": app_id,
        "Name": "checkout",
        "Tags": None,
        "Port": 6000,
        "Address": "127.0.0.1",
        "Meta": {"DAPR_PORT": "50002"},
        "Check": None,
        "Checks": [
            {
                "CheckID": f"daprHealth:{app_id}",
                "Name": "Dapr Health Status",
                "Interval": "15s",
                "HTTP": f"http://127.0.0.1:{port}/v1.0/healthz?appid=checkout",
            }
        ],
    }
    try:
        req = urllib.request.Request(
            a.api + "/v1/agent/service/register", data=json.dumps(body).encode(), method="PUT"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and resp.read() == b""
        status, entries, headers = wait_until(
            lambda: (r := b.call("GET", "/v1/health/service/checkout?passing=1"))[1] and r,
            SPREAD,
            "checkout passing on B",
        )
        assert status == 200 and int(headers["X-Consul-Index"]) >= 1
        [entry] = entries
        assert entry["Service"]["Address"] == "127.0.0.1"
        assert entry["Service"]["Meta"]["DAPR_PORT"] == "50002"
        assert entry["Checks"][0]["CheckID"] == f"daprHealth:{app_id}"
    finally:
        server.shutdown()
        client_for(a).agent.service.deregister(app_id)


def test_agent_self_and_leader(pair):
    a, _ = pair
    c = client_for(a)
    me = c.agent.self()
    assert me["Config"]["NodeName"] == "ca" and me["Config"]["Datacenter"] == "east"
    assert all(isinstance(v, dict) for v in me.values())
    assert c.status.leader() == a.gossip


def test_local_health_endpoint_answers_in_its_status_code(pair):
    """What a load balancer asks the agent on its own host: the instance's
    health as the status code (200, 429, 503) and as text, following the
    TTL check that py-consul reports to."""
    a, _ = pair
    c = client_for(a)

    def ask(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{a.api}{path}", timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:  # 429, 503 and 404 arrive as errors
            return exc.code, exc.read().decode()

    c.agent.service.register(
        "lb", service_id="lb-1", address="127.0.0.1", port=9100, check=consul.Check.ttl("60s")
    )
    try:
        for report, status, code in ((c.agent.check.ttl_pass, "passing", 200),
                                     (c.agent.check.ttl_warn, "warning", 429),
                                     (c.agent.check.ttl_fail, "critical", 503)):  # fmt: skip
            report("service:lb-1")
            assert ask("/v1/agent/health/service/id/lb-1?format=text") == (code, status)
            assert ask("/v1/agent/health/service/name/lb?format=text") == (code, status)
        code, text = ask("/v1/agent/health/service/name/lb")
        assert code == 503
        assert [(i["Service"]["ID"], i["AggregatedStatus"]) for i in json.loads(text)] == [
            ("lb-1", "critical")
        ]
    finally:
        c.agent.service.deregister("lb-1")
    assert ask("/v1/agent/health/service/id/lb-1?format=text") == (404, "ServiceId lb-1 not found")
