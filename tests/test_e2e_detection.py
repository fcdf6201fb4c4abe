"""End to end: a crashed agent is seen gone at once from what TCP tells; a restart is not.

Real ``meshd agent`` processes (``local`` profile) on 127.0.0.1.  SIGKILL is
a crash: the kernel closes the process's connections, its peers probe it at
once and their connects are refused, so each holds it dead within
``bounds.crash_bound`` (the short suspicion of a refused connect plus one
spread), well before the Lifeguard floor the old path needed.  An agent
SIGKILLed and started again on the same address before that timeout runs
out must never be held dead and its registration never leave an answer.
"""

from __future__ import annotations

import time

import pytest

from meshd.protocol.bounds import crash_bound, refused_suspicion_timeout, repair_bound
from meshd.protocol.config import Config
from meshd.protocol.suspicion import suspicion_min
from tests.agents import AgentProc, Certs, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
N = 4
#: Polling the agents' APIs and scheduling on a loaded 2-core machine.  Kept
#: small: the old path (first probe, then the suspicion floor) takes
#: ``suspicion_min`` = 3 s plus a probe interval, which this must tell apart.
SLACK = 1.0


@pytest.fixture
def four(tmp_path, certs: Certs):
    agents = [AgentProc(tmp_path, certs, "d0").start()]
    for i in range(1, N):
        agents.append(AgentProc(tmp_path, certs, f"d{i}", join=[agents[0].gossip]).start())
    wait_until(
        lambda: all(list(a.members().values()).count("alive") == N for a in agents),
        repair_bound(N, LOCAL) + 10,
        f"{N} alive members",
    )
    yield agents
    for a in agents:
        a.stop()


def test_a_sigkilled_agent_is_dead_everywhere_within_the_crash_bound(four):
    victim, others = four[1], [a for i, a in enumerate(four) if i != 1]
    victim.register("billing", "billing-1", 5000)
    wait_until(lambda: all(a.resolve("billing") for a in others), 10, "billing-1 everywhere")

    start = time.monotonic()
    victim.kill()
    bound = crash_bound(N, LOCAL)
    wait_until(
        lambda: all(a.members()["east/d1"] == "dead" for a in others),
        bound + SLACK,
        f"d1 dead everywhere within {bound:.1f} s",
    )
    took = time.monotonic() - start
    # Faster than the ordinary path could ever be: its floor alone is longer.
    assert took < suspicion_min(LOCAL.suspicion_mult, N, LOCAL.probe_interval) + 1.0
    assert all(a.resolve("billing") == [] for a in others)


def test_an_agent_restarted_on_its_address_is_never_held_dead(four):
    victim, others = four[2], [a for i, a in enumerate(four) if i != 2]
    victim.register("cart", "cart-1", 5001)
    wait_until(lambda: all(a.resolve("cart") for a in others), 10, "cart-1 everywhere")
    address = victim.gossip
    victim.args[victim.args.index("--bind") + 1] = address  # the same port again

    start = time.monotonic()
    victim.kill()
    victim.start(join=[])  # as a supervisor would restart it: from its saved peers
    restart_took = time.monotonic() - start
    if restart_took >= refused_suspicion_timeout(LOCAL):
        pytest.skip(f"the machine took {restart_took:.1f} s to restart an agent")
    assert victim.gossip == address

    # Watch every view until well past the short timeout and the Lifeguard floor.
    watch_until = start + crash_bound(N, LOCAL) + suspicion_min(LOCAL.suspicion_mult, N, 1.0)
    seen: set[str] = set()
    while time.monotonic() < watch_until:
        for a in others:
            seen.add(a.members()["east/d2"])
            assert [e["instance"] for e in a.resolve("cart")] == ["cart-1"], "cart-1 left"
        time.sleep(0.05)
    assert "dead" not in seen
    assert all(a.members()["east/d2"] == "alive" for a in others)
