"""End to end: the inventory and the lookup, through py-consul, on three real agents.

Three ``meshd agent`` processes form one cluster, each in its own zone, each
hosting one instance of ``web``.  A health query with ``passing`` (Dapr's) is
a lookup, so each agent answers its own copy (the policy's nearest); without
it, every agent answers the same inventory of all three.  A node killed with
SIGKILL keeps its instance listed, critical, with its ``serfHealth``
critical, until ``--reap-after`` passes; and
``DeregisterCriticalServiceAfter`` reaps a local instance that stays critical
that long.
"""

from __future__ import annotations

from functools import partial
from urllib.parse import urlsplit

import consul
import pytest

from meshd.protocol.bounds import detection_bound, repair_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, Certs, client_for, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 5.0
SPREAD = repair_bound(3, LOCAL) + SLACK
#: --reap-after for the dead-node test: long enough to see it listed, short to wait out.
REAP_AFTER = 20


def ids(entries: list[dict]) -> list[str]:
    return [e["Service"]["ID"] for e in entries]


def test_inventory_is_the_same_everywhere_lookups_follow_the_policy_and_the_dead_stay_listed(
    tmp_path,
):
    certs = Certs(tmp_path / "pki")
    reap = ["--reap-after", f"{REAP_AFTER}s"]
    a = AgentProc(tmp_path, certs, "na", zone="z1", extra=reap).start()
    agents = [a]
    try:
        for name, zone in (("nb", "z2"), ("nc", "z3")):
            agents.append(
                AgentProc(tmp_path, certs, name, zone=zone, join=[a.gossip], extra=reap).start()
            )
        clients = [client_for(x) for x in agents]
        for x, c in zip(agents, clients, strict=True):
            host = urlsplit(x.api).hostname
            assert c.agent.service.register(
                "web", service_id=f"web-{x.node}", address=host, port=8000, tags=["v1"]
            )

        def inventories() -> list[list[str]]:
            return [ids(c.health.service("web")[1]) for c in clients]

        wait_until(
            lambda: all(len(inv) == 3 for inv in inventories()), SPREAD, "3 instances everywhere"
        )
        first = inventories()
        assert all(inv == first[0] for inv in first), first  # the same list from every agent
        assert sorted(first[0]) == ["web-na", "web-nb", "web-nc"]
        catalogs = [[s["ServiceID"] for s in c.catalog.service("web")[1]] for c in clients]
        assert all(cat == first[0] for cat in catalogs)
        # The lookup: each agent's own copy, the policy's nearest (node tier).
        for x, c in zip(agents, clients, strict=True):
            assert ids(c.health.service("web", passing=True)[1]) == [f"web-{x.node}"]

        # SIGKILL nc: its instance stays listed, critical, its serfHealth too.
        agents[2].kill()
        dead_by = detection_bound(3, LOCAL) + SPREAD

        def listed_critical(c: consul.Consul) -> bool:
            entries = {e["Service"]["ID"]: e for e in c.health.service("web")[1]}
            e = entries.get("web-nc")
            if e is None:
                return False
            checks = {ch["CheckID"]: ch["Status"] for ch in e["Checks"]}
            return checks.get("serfHealth") == "critical" and set(checks.values()) == {"critical"}

        for c in clients[:2]:
            wait_until(partial(listed_critical, c), dead_by, "web-nc listed critical")
            assert "web-nc" not in ids(c.health.service("web", passing=True)[1])
            assert "web" in c.catalog.services()[1]
        assert ids(clients[0].health.service("web")[1]) == ids(clients[1].health.service("web")[1])
        node = clients[0].health.node("nc")[1]
        assert {ch["CheckID"]: ch["Status"] for ch in node}["serfHealth"] == "critical"
        # An agent restarted meanwhile still lists it: remembered in its state file.
        agents[1].stop()
        agents[1].start()
        clients[1] = client_for(agents[1])
        assert listed_critical(clients[1])

        # Then reaped (--reap-after), from the inventory.
        def reaped(c: consul.Consul) -> bool:
            return sorted(ids(c.health.service("web")[1])) == ["web-na", "web-nb"]

        for c in clients[:2]:
            wait_until(partial(reaped, c), REAP_AFTER + SLACK, "web-nc reaped")
    finally:
        for x in reversed(agents):
            x.stop()


def test_deregister_critical_service_after_reaps_a_local_instance(tmp_path):
    certs = Certs(tmp_path / "pki")
    a = AgentProc(tmp_path, certs, "na").start()
    try:
        c = client_for(a)
        check = consul.Check.ttl("30s")
        check["DeregisterCriticalServiceAfter"] = "2s"
        assert c.agent.service.register(
            "job", service_id="job-1", address="127.0.0.1", port=9000, check=check
        )
        assert "job-1" in c.agent.services()
        # A TTL check starts critical and nobody reports: reaped after 2 s.
        wait_until(lambda: "job-1" not in c.agent.services(), 2.0 + SLACK, "job-1 reaped")
        # One that reports passing is kept.
        assert c.agent.service.register(
            "job", service_id="job-2", address="127.0.0.1", port=9001, check=check
        )
        assert c.agent.check.ttl_pass("service:job-2")
        # Past the 2 s (a blocking query that waits 3 s for a change), still there.
        index, _ = c.catalog.services()
        c.catalog.services(index=index, wait="3s")
        assert "job-2" in c.agent.services()
    finally:
        a.stop()
