"""End to end: a whole cluster goes silent and the others fail over within seconds.

Three clusters of two real agents on 127.0.0.1 (east e0+e1, west w0+w1,
central c0+c1; the n0 of each is its bridge), run with the ``lan`` profile so
that the WAN pool has the real WAN timings (a probe every 5 s, suspicion
30 s and more): a failover within ``watch_unreachable_bound`` can only come
from the bridges' cluster watch.  East is silenced with SIGSTOP: its sockets
stay open, nothing is refused or reset, nothing answers (a lost link, not a
crashed process).  West's lookups follow ``failover = ["east", "central"]``.
"""

from __future__ import annotations

import signal
import time

import pytest

from meshd.protocol.bounds import spread_bound, watch_unreachable_bound
from meshd.protocol.cluster_watch import WatchConfig
from meshd.protocol.config import Config
from meshd.protocol.suspicion import suspicion_min
from tests.agents import AgentProc, Certs, start_in_cluster, wait_until

pytestmark = pytest.mark.e2e

LAN, WAN, WATCH = Config.lan(), Config.wan(), WatchConfig()
#: Process start and scheduling on a loaded 2-core machine.
SLACK = 8.0
FAILOVER = watch_unreachable_bound(2, LAN, WATCH) + SLACK
#: After the silence ends: the next round, its timeout, the restated document.
BACK = WATCH.interval + WATCH.timeout + spread_bound(2, LAN) + SLACK
#: Membership's own verdict on east's bridge cannot come before this.
WAN_FLOOR = suspicion_min(WAN.suspicion_mult, 3, WAN.probe_interval)


def _wan_addr(agent: AgentProc) -> str:
    line = next(ln for ln in agent.lines if "bridge: WAN gossip on" in ln)
    return line.rsplit(" ", 1)[1]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("failover")
    certs = Certs(root / "pki")
    policy = root / "west-policy.toml"
    policy.write_text('failover = ["east", "central"]\n')
    agents: dict[str, AgentProc] = {}

    def start(name: str, cluster: str, join=None, wan_join=None, bridge=False, extra=()):
        a = start_in_cluster(
            root, certs, name, cluster, bridge=bridge, join=join, wan_join=wan_join,
            extra=["--profile", "lan", *extra],
        )  # fmt: skip
        agents[name] = a
        return a

    try:
        e0 = start("e0", "east", bridge=True)
        seed = _wan_addr(e0)
        w0 = start("w0", "west", bridge=True, wan_join=[seed], extra=["--policy", str(policy)])
        c0 = start("c0", "central", bridge=True, wan_join=[seed])
        start("e1", "east", join=[e0.gossip])
        start("w1", "west", join=[w0.gossip], extra=["--policy", str(policy)])
        start("c1", "central", join=[c0.gossip])
        yield agents
    finally:
        for a in agents.values():
            if a.running:
                a.signal(signal.SIGCONT)  # a stopped process ignores SIGTERM
            a.stop()


def instances(agent: AgentProc, app: str) -> list[str]:
    return [e["instance"] for e in agent.resolve(app)]


def test_a_silent_cluster_is_failed_over_within_seconds_and_taken_back_at_once(mesh):
    e1, w1, c1 = mesh["e1"], mesh["w1"], mesh["c1"]
    e1.register("orders", "orders-east", 3500)
    c1.register("orders", "orders-central", 3501)
    wait_until(
        lambda: instances(w1, "orders") == ["orders-east", "orders-central"],
        90,
        "both copies in west, east first",
    )
    # Let the watches see a few answered rounds from everyone.
    time.sleep(2 * WATCH.interval)

    east = [mesh["e0"], e1]
    for a in east:
        a.signal(signal.SIGSTOP)
    silent = time.monotonic()
    try:
        wait_until(lambda: instances(w1, "orders") == ["orders-central"], FAILOVER, "failover")
        took = time.monotonic() - silent
        print(f"\n  west failed over from a silent east in {took:.1f} s (bound {FAILOVER:.1f} s)")
        # Faster than WAN membership could have declared east's bridge dead.
        assert took < WAN_FLOOR
        # Central is no one's concern: still reachable from west.
        clusters = {r["cluster"]: r["reachable"] for r in w1.get("/v1/clusters")}
        assert clusters.get("central") is True and clusters.get("east") is False
        # West's bridge counts and logs the verdict for an operator's alert.
        w0 = mesh["w0"]
        assert w0.metric("meshd_clusters_lost_total") >= 1
        assert any("held unreachable" in line and "east" in line for line in w0.lines)
    finally:
        for a in east:
            a.signal(signal.SIGCONT)
    resumed = time.monotonic()
    wait_until(
        lambda: instances(w1, "orders") == ["orders-east", "orders-central"], BACK, "east back"
    )
    print(f"  east answered first again {time.monotonic() - resumed:.1f} s after it resumed")
