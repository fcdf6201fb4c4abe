"""End to end: DNS answered by real ``meshd agent`` processes on 127.0.0.1.

Two agents run with ``--dns 127.0.0.1:0`` (the port is read from the ready
line).  Clients are dnspython's stub resolver and ``dig``, as an application
and an operator would use them.  Timing bounds come from
``meshd.protocol.bounds`` for the ``local`` profile, plus slack for a busy
two-core machine.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import dns.resolver
import pytest

from meshd.protocol.bounds import detection_bound, repair_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 5.0
DNS_ADDR = re.compile(r" dns=127\.0\.0\.1:(\d+)")


def dns_port(agent: AgentProc) -> int:
    for line in agent.lines:
        m = DNS_ADDR.search(line)
        if m:
            return int(m.group(1))
    raise AssertionError(f"agent {agent.node} printed no dns= address")


def resolver(port: int) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.timeout = r.lifetime = 3.0
    r.cache = None  # every question goes to the agent
    return r


def srv(port: int, name: str) -> list[tuple[int, int, str]]:
    """(priority, port, target) of each SRV record, in the order received."""
    try:
        ans = resolver(port).resolve(name, "SRV")
    except dns.resolver.NXDOMAIN:
        return []
    return [(r.priority, r.port, r.target.to_text()) for r in ans]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("dns")
    extra = ["--dns", "127.0.0.1:0", "--dns-ttl", "0"]
    a = AgentProc(root, certs, "a", zone="z1", extra=extra).start()
    b = AgentProc(root, certs, "b", zone="z2", join=[a.gossip], extra=extra).start()
    agents = [a, b]
    yield agents
    for agent in agents:
        agent.stop()


def test_srv_and_a_records_in_policy_order_then_a_dead_instance_leaves(pair):
    a, b = pair
    wait_until(
        lambda: all(list(x.members().values()).count("alive") == 2 for x in pair),
        repair_bound(2, LOCAL) + SLACK,
        "both agents alive",
    )
    a.register("web", "web-a", 3500)
    b.register("web", "web-b", 3600)
    port = dns_port(a)
    # Named with its cluster, every healthy instance there in policy order:
    # a's own (tier node) first, then b's (tier region, another zone).
    want = [(1, 3500, "a.node.east.consul."), (2, 3600, "b.node.east.consul.")]
    wait_until(
        lambda: srv(port, "web.service.east.consul.") == want, repair_bound(2, LOCAL) + SLACK
    )
    assert srv(port, "_web._tcp.service.east.consul.") == want
    # Without it, the policy's active set: one healthy copy is enough by
    # default, so each agent answers its own and keeps the other as standby.
    assert srv(port, "web.service.consul.") == [(1, 3500, "a.node.east.consul.")]
    assert srv(dns_port(b), "web.service.consul.") == [(1, 3600, "b.node.east.consul.")]

    ans = resolver(port).resolve("web.service.consul.", "A")
    assert [r.address for r in ans] == ["127.0.0.1"]  # both on 127.0.0.1, one record
    assert ans.rrset is not None and ans.rrset.ttl == 0
    assert [r.address for r in resolver(port).resolve("b.node.consul.", "A")] == ["127.0.0.1"]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(port).resolve("nope.service.consul.", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver(port).resolve("web.service.consul.", "AAAA")
    assert a.metric("meshd_dns_queries_total", type="SRV", rcode="NOERROR") >= 2
    assert a.metric("meshd_dns_queries_total", type="A", rcode="NXDOMAIN") >= 1

    b.kill()  # SIGKILL: no leave, no deregistration
    bound = detection_bound(2, LOCAL) + SLACK
    wait_until(
        lambda: srv(port, "web.service.east.consul.") == [(1, 3500, "a.node.east.consul.")],
        bound,
        "web-b gone from the SRV answer",
    )
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver(port).resolve("b.node.consul.", "A")


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (Debian: dnsutils)")
def test_dig_reads_srv_ports_and_glue(tmp_path, certs):
    agent = AgentProc(tmp_path, certs, "d", extra=["--dns", "127.0.0.1:0"]).start()
    try:
        agent.register("orders", "orders-1", 3501)
        agent.register("orders", "orders-2", 3502, address="127.0.0.2")
        port = dns_port(agent)
        base = ["dig", "@127.0.0.1", "-p", str(port), "+time=3", "+tries=1"]

        def dig(*args: str) -> str:
            done = subprocess.run(
                [*base, *args], capture_output=True, text=True, timeout=20, check=True
            )
            return done.stdout

        order = [e["port"] for e in agent.resolve("orders")]
        assert sorted(order) == [3501, 3502]
        short = dig("orders.service.consul", "SRV", "+short").split("\n")
        # One node, two addresses: address targets, in the policy's order.
        assert [line.split()[:3] for line in short if line] == [
            ["1", "1", str(order[0])],
            ["1", "1", str(order[1])],
        ]
        full = dig("orders.service.consul", "SRV")
        assert "status: NOERROR" in full and "flags: qr aa" in full
        assert re.search(r"7f000001\.addr\.east\.consul\.\s+0\s+IN\s+A\s+127\.0\.0\.1", full)
        assert re.search(r"7f000002\.addr\.east\.consul\.\s+0\s+IN\s+A\s+127\.0\.0\.2", full)
        a_records = dig("orders.service.consul", "A", "+short").split()
        assert a_records == ["127.0.0.1" if p == 3501 else "127.0.0.2" for p in order]
        assert "status: NXDOMAIN" in dig("missing.service.consul", "A")
        assert "status: REFUSED" in dig("example.com", "A")
        assert dig("+tcp", "orders.service.consul", "SRV", "+short").count("3502") == 1
    finally:
        agent.stop()


def test_a_port_in_use_is_a_clear_start_error(tmp_path, certs):
    first = AgentProc(tmp_path, certs, "p1", extra=["--dns", "127.0.0.1:0"]).start()
    try:
        taken = f"127.0.0.1:{dns_port(first)}"
        second = AgentProc(tmp_path, certs, "p2", extra=["--dns", taken])
        with pytest.raises(AssertionError, match="did not become ready"):
            second.start(timeout=20)
        assert second.wait() == 2
        assert any(f"cannot listen for DNS on {taken}" in line for line in second.lines)
        assert [r.address for r in resolver(dns_port(first)).resolve("p1.node.consul.")] == [
            "127.0.0.1"
        ]
    finally:
        first.stop()
