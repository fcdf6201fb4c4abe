"""The DNS interface (meshd/api/dns.py): answer() over a fake agent, render(), the server.

Endpoints are laid out by hand on ``FakeAgent.remote`` so the policy's order,
standbys, tags and clusters are pinned without a mesh; the server tests bind
UDP and TCP on 127.0.0.1 port 0 and talk to it with dnspython.
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import replace

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from meshd.agent.config import ConfigError, load_config
from meshd.agent.interface import ClusterInfo, Endpoint
from meshd.api.consul import TAGS_KEY
from meshd.api.dns import (
    MAX_QUERY_BYTES,
    MAX_TCP_CONNECTIONS,
    MIN_UDP_PAYLOAD,
    DNSConfig,
    DNSServer,
    answer,
    render,
    udp_limit,
)
from tests.fakes import FakeAgent


def ep(instance: str, address: str, port: int, **kw: object) -> Endpoint:
    base: dict[str, object] = {
        "app": "web",
        "namespace": "default",
        "instance": instance,
        "address": address,
        "port": port,
        "protocol": "http",
        "node": f"node-{instance}",
        "cluster": "east",
        "region": "us-east",
        "zone": "us-east-1a",
        "health": "passing",
        "weight": 1,
        "meta": {},
        "tier": "zone",
    }
    return Endpoint(**(base | kw))  # type: ignore[arg-type]


@pytest.fixture
def mesh() -> FakeAgent:
    """web: three healthy endpoints in policy order (zone, zone, region), one
    critical, one standby in west; api: one IPv6 endpoint tagged v2."""
    a = FakeAgent()
    a.cluster_rows = [ClusterInfo("east", True, 2, 1), ClusterInfo("West", True, 1, 1)]
    a.remote = [
        ep("web-b", "192.0.2.20", 8002, node="nb", meta={TAGS_KEY: json.dumps(["v1", "Blue"])}),
        ep("web-a", "192.0.2.10", 8001, node="na", meta={TAGS_KEY: json.dumps(["v1"])}),
        ep("web-c", "192.0.2.30", 8003, node="nc", tier="region", weight=5),
        ep("web-sick", "192.0.2.40", 8004, node="nd", health="critical"),
        ep("web-w", "198.51.100.1", 9000, node="w1", cluster="West", tier="failover", active=False),
        ep("api-1", "2001:db8::1", 7000, app="api", node="na", meta={TAGS_KEY: '["v2"]'}),
        ep("pay-1", "192.0.2.50", 6000, app="pay", namespace="billing", node="np"),
    ]
    return a


def ask(agent: FakeAgent, name: str, rdtype: str = "A", **cfg: object) -> dns.message.Message:
    return answer(dns.message.make_query(name, rdtype), agent, DNSConfig(**cfg))  # type: ignore[arg-type]


def records(msg: dns.message.Message, section: str = "answer") -> list[str]:
    return [rd.to_text() for rrset in getattr(msg, section) for rd in rrset]


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


def has_soa(msg: dns.message.Message) -> bool:
    return [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]


# -- names ---------------------------------------------------------------------


def test_a_records_are_healthy_active_endpoints_in_policy_order(mesh):
    msg = ask(mesh, "web.service.consul.")
    assert rcode(msg) == "NOERROR" and msg.flags & dns.flags.AA
    # The critical one and the west standby are left out; no shuffle.
    assert records(msg) == ["192.0.2.20", "192.0.2.10", "192.0.2.30"]
    assert msg.answer[0].ttl == 0


def test_srv_targets_nodes_with_glue_and_priority_by_tier(mesh):
    msg = ask(mesh, "web.service.consul.", "SRV")
    assert records(msg) == [
        "1 1 8002 nb.node.east.consul.",
        "1 1 8001 na.node.east.consul.",
        "2 5 8003 nc.node.east.consul.",
    ]
    assert {r.name.to_text(): records_of(r) for r in msg.additional} == {
        "nb.node.east.consul.": ["192.0.2.20"],
        "na.node.east.consul.": ["192.0.2.10"],
        "nc.node.east.consul.": ["192.0.2.30"],
    }


def records_of(rrset) -> list[str]:
    return [rd.to_text() for rd in rrset]


def test_tag_forms_filter_case_insensitively(mesh):
    assert records(ask(mesh, "v1.web.service.consul.")) == ["192.0.2.20", "192.0.2.10"]
    assert records(ask(mesh, "BLUE.web.service.consul.")) == ["192.0.2.20"]
    srv = ask(mesh, "_web._v1.service.consul.", "SRV")
    assert [r.split()[2] for r in records(srv)] == ["8002", "8001"]
    # _tcp is the protocol, not a tag: every endpoint.
    assert len(records(ask(mesh, "_web._tcp.service.consul.", "SRV"))) == 3
    # A tag nobody has: as Consul, the name does not exist.
    assert rcode(ask(mesh, "v9.web.service.consul.")) == "NXDOMAIN"


def test_names_are_case_insensitive_and_answered_as_asked(mesh):
    msg = ask(mesh, "WEB.Service.CONSUL.")
    assert records(msg) == ["192.0.2.20", "192.0.2.10", "192.0.2.30"]
    assert msg.answer[0].name.to_text() == "WEB.Service.CONSUL."


def test_cluster_forms_answer_that_clusters_healthy_endpoints(mesh):
    for name in ("web.service.west.consul.", "web.service.West.dc.consul."):
        # The standby is answered when its cluster is asked for by name.
        assert records(ask(mesh, name)) == ["198.51.100.1"], name
    assert records(ask(mesh, "web.service.east.consul.")) == [
        "192.0.2.20",
        "192.0.2.10",
        "192.0.2.30",
    ]
    unknown = ask(mesh, "web.service.north.consul.")
    assert rcode(unknown) == "NXDOMAIN" and has_soa(unknown)


def test_namespace_form(mesh):
    assert records(ask(mesh, "pay.service.billing.ns.consul.")) == ["192.0.2.50"]
    assert records(ask(mesh, "pay.service.billing.ns.east.dc.consul.")) == ["192.0.2.50"]
    # Not in the default namespace.
    assert rcode(ask(mesh, "pay.service.consul.")) == "NXDOMAIN"
    assert records(ask(mesh, "web.service.default.ns.consul.")) == [
        "192.0.2.20",
        "192.0.2.10",
        "192.0.2.30",
    ]


def test_node_lookup_answers_the_members_address(mesh):
    assert records(ask(mesh, "n7.node.consul.")) == ["192.0.2.7"]
    assert records(ask(mesh, "n8.node.east.consul.")) == ["192.0.2.8"]  # suspect: still there
    assert records(ask(mesh, "n8.node.east.dc.consul.")) == ["192.0.2.8"]
    assert rcode(ask(mesh, "w1.node.west.consul.")) == "NXDOMAIN"  # dead
    assert rcode(ask(mesh, "n9.node.consul.")) == "NXDOMAIN"
    # A node in another cluster is not found without its cluster.
    assert rcode(ask(mesh, "w1.node.consul.")) == "NXDOMAIN"
    empty = ask(mesh, "n7.node.consul.", "AAAA")
    assert rcode(empty) == "NOERROR" and not empty.answer and has_soa(empty)


def test_aaaa_and_any(mesh):
    assert records(ask(mesh, "api.service.consul.", "AAAA")) == ["2001:db8::1"]
    assert records(ask(mesh, "v2.api.service.consul.", "ANY")) == ["2001:db8::1"]
    srv = ask(mesh, "api.service.consul.", "SRV")
    assert records(srv) == ["1 1 7000 na.node.east.consul."]
    assert records(srv, "additional") == ["2001:db8::1"]


def test_nxdomain_versus_empty_answers(mesh):
    unknown = ask(mesh, "nope.service.consul.")
    assert rcode(unknown) == "NXDOMAIN" and has_soa(unknown) and not unknown.answer
    mesh.remote = [replace(e, health="critical") for e in mesh.remote]
    sick = ask(mesh, "web.service.consul.")
    assert rcode(sick) == "NXDOMAIN" and has_soa(sick)
    mesh.remote = [replace(e, health="passing") for e in mesh.remote]
    wrong_type = ask(mesh, "web.service.consul.", "AAAA")
    assert rcode(wrong_type) == "NOERROR" and not wrong_type.answer and has_soa(wrong_type)
    txt = ask(mesh, "web.service.consul.", "TXT")
    assert rcode(txt) == "NOERROR" and not txt.answer
    for name in ("foo.consul.", "x.y.consul.", "service.consul.", "a\\.b.service.consul."):
        assert rcode(ask(mesh, name)) == "NXDOMAIN", name


def test_soa_carries_the_ttl_as_negative_ttl(mesh):
    msg = ask(mesh, "nope.service.consul.", ttl=30)
    soa = msg.authority[0]
    assert soa.name.to_text() == "consul." and soa.ttl == 30
    assert soa[0].minimum == 30 and soa[0].mname.to_text() == "ns.consul."
    assert ask(mesh, "web.service.consul.", ttl=30).answer[0].ttl == 30


def test_soa_and_ns_of_the_zone(mesh):
    msg = ask(mesh, "consul.", "SOA")
    assert rcode(msg) == "NOERROR" and msg.answer[0].rdtype == dns.rdatatype.SOA
    ns = ask(mesh, "web.service.consul.", "NS")
    assert records(ns) == ["n7.node.east.consul."] and records(ns, "additional") == ["192.0.2.7"]
    assert rcode(ask(mesh, "consul.", "A")) == "NOERROR"


def test_names_outside_the_domain_are_refused(mesh):
    for name in ("example.com.", "web.service.consul.example.", "1.0.0.127.in-addr.arpa."):
        msg = ask(mesh, name)
        assert rcode(msg) == "REFUSED" and not msg.answer, name
    assert rcode(ask(mesh, "web.service.consul.", "AXFR")) == "REFUSED"


def test_another_domain(mesh):
    assert records(ask(mesh, "web.service.mesh.example.", domain="mesh.example")) == [
        "192.0.2.20",
        "192.0.2.10",
        "192.0.2.30",
    ]
    assert rcode(ask(mesh, "web.service.consul.", domain="mesh.example")) == "REFUSED"
    srv = ask(mesh, "web.service.mesh.example.", "SRV", domain="Mesh.Example.")
    assert records(srv)[0] == "1 1 8002 nb.node.east.mesh.example."


def test_an_srv_node_with_several_addresses_gets_address_targets(mesh):
    mesh.remote[1] = replace(mesh.remote[1], node="nb")  # web-a and web-b on one node
    srv = ask(mesh, "web.service.consul.", "SRV")
    targets = [r.split()[3] for r in records(srv)]
    assert targets == [
        "c0000214.addr.east.consul.",  # 192.0.2.20
        "c000020a.addr.east.consul.",  # 192.0.2.10
        "nc.node.east.consul.",
    ]
    # The address form answers itself.
    assert records(ask(mesh, "c0000214.addr.east.consul.")) == ["192.0.2.20"]
    assert rcode(ask(mesh, "zz.addr.consul.")) == "NXDOMAIN"


def test_a_host_name_address_is_an_srv_target_and_no_a_record(mesh):
    mesh.remote = [ep("web-h", "db.example.net", 5432)]
    assert records(ask(mesh, "web.service.consul.", "SRV")) == ["1 1 5432 db.example.net."]
    empty = ask(mesh, "web.service.consul.")
    assert rcode(empty) == "NOERROR" and not empty.answer


def test_answers_are_capped(mesh):
    mesh.remote = [ep(f"w{i}", f"10.0.{i // 250}.{i % 250}", 1000 + i) for i in range(300)]
    assert len(records(ask(mesh, "web.service.consul."))) == 64
    assert len(records(ask(mesh, "web.service.consul.", "SRV", max_answers=5))) == 5


def test_bad_queries_get_a_code_not_an_exception(mesh):
    q = dns.message.make_query("web.service.consul.", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert rcode(answer(q, mesh)) == "NOTIMP"
    none = dns.message.make_query("web.service.consul.", "A")
    none.question = []
    assert rcode(answer(none, mesh)) == "FORMERR"
    chaos = dns.message.make_query("version.bind.", "TXT", rdclass="CH")
    assert rcode(answer(chaos, mesh)) == "REFUSED"


def test_config_validates():
    with pytest.raises(ValueError):
        DNSConfig(ttl=-1)
    with pytest.raises(ValueError):
        DNSConfig(domain="bad_domain")
    assert DNSConfig(domain="Mesh.Example.").domain == "mesh.example"


# -- render: the UDP size and truncation ----------------------------------------------


def test_udp_limit_follows_edns_within_bounds():
    assert udp_limit(dns.message.make_query("a.consul.", "A")) == MIN_UDP_PAYLOAD
    assert udp_limit(dns.message.make_query("a.consul.", "A", use_edns=0, payload=4096)) == 1232
    assert udp_limit(dns.message.make_query("a.consul.", "A", use_edns=0, payload=100)) == 512


def test_render_truncates_from_the_end_and_sets_tc(mesh):
    mesh.remote = [ep(f"w{i}", f"10.0.0.{i}", 1000 + i, node=f"node{i:03d}") for i in range(40)]
    response = ask(mesh, "web.service.consul.", "SRV")
    full, cut = render(response, None)
    assert not cut and len(records(dns.message.from_wire(full))) == 40
    wire, cut = render(response, 512)
    assert cut and len(wire) <= 512
    small = dns.message.from_wire(wire)
    assert small.flags & dns.flags.TC
    kept = records(small)
    assert 0 < len(kept) < 40
    assert kept == records(response)[: len(kept)]  # the best ones, in order
    # The glue of every kept record, nothing else.
    assert sorted(r.name.to_text() for r in small.additional) == sorted(r.split()[3] for r in kept)


def test_render_drops_glue_before_answers(mesh):
    # 11 SRV records: 706 bytes with their glue, 476 without.
    mesh.remote = [ep(f"w{i}", f"10.0.0.{i}", 1000 + i, node=f"n{i:02d}") for i in range(11)]
    response = ask(mesh, "web.service.consul.", "SRV")
    assert len(render(response, None)[0]) > 512
    wire, cut = render(response, 512)
    msg = dns.message.from_wire(wire)
    # Every answer fits once the glue is gone: complete, so no TC.
    assert not cut and not msg.flags & dns.flags.TC
    assert records(msg) == records(response) and not msg.additional


# -- the server ------------------------------------------------------------------------


@pytest.fixture
async def server(mesh):
    s = DNSServer(mesh, DNSConfig(), mesh.metrics)
    host, port = await s.start("127.0.0.1", 0)
    s.address = (host, port)  # type: ignore[attr-defined]
    yield s
    await s.close()


def counted(agent: FakeAgent, name: str, **labels: str) -> float:
    value = agent.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def udp(server: DNSServer, payload: bytes, timeout: float = 2.0) -> bytes | None:
    """Send one datagram; the reply, or None when none came within ``timeout``."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class P(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(
        P,
        remote_addr=server.address,  # type: ignore[attr-defined]
    )
    try:
        transport.sendto(payload)
        try:
            async with asyncio.timeout(timeout):
                return await got
        except TimeoutError:
            return None
    finally:
        transport.close()


async def test_server_answers_udp_and_tcp_on_one_port(server, mesh):
    q = dns.message.make_query("web.service.consul.", "SRV")
    want = records(answer(q, mesh))
    assert len(want) == 3
    # The policy's order survives the wire (dnspython would shuffle an RRset).
    for _ in range(5):
        reply = await udp(server, q.to_wire())
        assert reply is not None
        assert records(dns.message.from_wire(reply)) == want
    host, port = server.address
    tcp = await asyncio.to_thread(dns.query.tcp, q, host, port=port, timeout=5)
    assert records(tcp) == want
    assert counted(mesh, "meshd_dns_queries_total", type="SRV", rcode="NOERROR") == 6


async def test_udp_truncates_and_tcp_gets_everything(server, mesh):
    mesh.remote = [ep(f"w{i}", f"10.0.0.{i}", 1000 + i, node=f"node{i:03d}") for i in range(40)]
    q = dns.message.make_query("web.service.consul.", "SRV")
    reply = await udp(server, q.to_wire())
    assert reply is not None and len(reply) <= 512
    assert dns.message.from_wire(reply).flags & dns.flags.TC
    host, port = server.address
    full = await asyncio.to_thread(dns.query.tcp, q, host, port=port, timeout=5)
    assert len(records(full)) == 40
    assert counted(mesh, "meshd_dns_truncated_total") == 1


async def test_malformed_packets_are_dropped_and_counted(server, mesh):
    # (asyncio sends no empty datagram, so the shortest junk is one byte.)
    for junk in (b"\x00", b"\x00\x01\x02", b"\xff" * 40, b"\x12\x34" + b"\x00" * 3):
        assert await udp(server, junk, timeout=0.3) is None
    response = dns.message.make_response(dns.message.make_query("a.consul.", "A")).to_wire()
    assert await udp(server, response, timeout=0.3) is None  # a response is never answered
    big = dns.message.make_query("web.service.consul.", "A").to_wire() + b"\x00" * MAX_QUERY_BYTES
    assert await udp(server, big, timeout=0.3) is None
    assert counted(mesh, "meshd_dns_dropped_total", reason="malformed") == 5
    assert counted(mesh, "meshd_dns_dropped_total", reason="oversized") == 1
    # Still serving.
    ok = await udp(server, dns.message.make_query("web.service.consul.", "A").to_wire())
    assert ok is not None and len(records(dns.message.from_wire(ok))) == 3


async def test_an_agent_failure_is_servfail(server, mesh):
    mesh.explode = True
    reply = await udp(server, dns.message.make_query("web.service.consul.", "A").to_wire())
    assert reply is not None and rcode(dns.message.from_wire(reply)) == "SERVFAIL"


async def test_tcp_caps_size_and_connections(server, mesh, monkeypatch):
    host, port = server.address
    # A declared length over the cap closes the connection unanswered.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(struct.pack("!H", MAX_QUERY_BYTES + 1))
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    assert counted(mesh, "meshd_dns_dropped_total", reason="oversized") == 1
    # Past the connection cap a new connection is closed at once.
    monkeypatch.setattr("meshd.api.dns.MAX_TCP_CONNECTIONS", 2)
    held = [await asyncio.open_connection(host, port) for _ in range(2)]
    async with asyncio.timeout(5):
        while counted(mesh, "meshd_dns_tcp_connections") < 2:
            await asyncio.sleep(0.01)
    r3, w3 = await asyncio.open_connection(host, port)
    async with asyncio.timeout(5):
        assert await r3.read() == b""
    assert counted(mesh, "meshd_dns_dropped_total", reason="tcp-connections") == 1
    for _, w in held + [(r3, w3)]:
        w.close()
    assert MAX_TCP_CONNECTIONS > 2


async def test_idle_tcp_connection_is_closed(mesh, monkeypatch):
    monkeypatch.setattr("meshd.api.dns.TCP_IDLE_TIMEOUT", 0.2)
    s = DNSServer(mesh, DNSConfig(), mesh.metrics)
    host, port = await s.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"\x00")  # half a length prefix, then nothing
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
    finally:
        await s.close()


async def test_rate_limit_drops_excess(mesh):
    clock = [0.0]
    s = DNSServer(mesh, DNSConfig(), mesh.metrics, clock=lambda: clock[0])
    wire = dns.message.make_query("web.service.consul.", "A").to_wire()
    answered = sum(s.handle(wire, udp=True) is not None for _ in range(4100))
    assert answered == 4000
    assert counted(mesh, "meshd_dns_dropped_total", reason="rate-limit") == 100
    clock[0] += 1.0
    assert s.handle(wire, udp=True) is not None


async def test_port_in_use_is_an_oserror(server):
    host, port = server.address
    other = DNSServer(FakeAgent(), DNSConfig(), FakeAgent().metrics)
    with pytest.raises(OSError):
        await other.start(host, port)


# -- configuration ---------------------------------------------------------------------


def test_flags_and_file_keys(tmp_path):
    cfg = load_config({"dev": True, "dns": "127.0.0.1:8600", "dns_ttl": "5", "dns_domain": "Mesh."})
    assert (cfg.dns, cfg.dns_ttl, cfg.dns_domain) == (("127.0.0.1", 8600), 5, "mesh")
    assert load_config({"dev": True}).dns is None
    path = tmp_path / "a.toml"
    path.write_text('dev = true\ndns = "127.0.0.1:0"\ndns_ttl = 3\ndns_domain = "consul"\n')
    cfg = load_config({"config": str(path)})
    assert (cfg.dns, cfg.dns_ttl) == (("127.0.0.1", 0), 3)
    for flags, words in (
        ({"dns": "127.0.0.1"}, "--dns needs a port"),
        ({"dns_ttl": "-1"}, "--dns-ttl must be"),
        ({"dns_ttl": "86401"}, "--dns-ttl must be"),
        ({"dns_domain": "a..b"}, "--dns-domain must be"),
    ):
        with pytest.raises(ConfigError, match=words):
            load_config({"dev": True, **flags})
    path.write_text("dev = true\ndns_ttl = true\n")
    with pytest.raises(ConfigError, match="'dns_ttl' must be an integer"):
        load_config({"config": str(path)})
