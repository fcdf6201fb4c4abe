"""Crash detection from TCP facts: refused connects and closed connections.

Cores over the harness's network in virtual time.  The harness gives what a
kernel gives a dead process's peers (a connect to its address is refused, a
connection with it ends) and nothing for a paused, slow or lossy one.  Each
test asserts what must hold: a crash is held dead everywhere within
``bounds.crash_bound``; a closed connection alone never suspects anyone; a
quick restart on the same address is never held dead; nobody but our own
transport can shorten a suspicion.
"""

from __future__ import annotations

import math

import pytest

from meshd.protocol import prober as prober_module
from meshd.protocol.bounds import crash_bound, refused_suspicion_timeout, spread_bound
from meshd.protocol.config import Config
from meshd.protocol.dissemination import HURRY_GAP
from meshd.protocol.events import Event, MemberChanged
from meshd.protocol.suspicion import Suspicion, suspicion_min
from meshd.testing import Cluster, converged_join, detection_time
from meshd.wire import Gossip, Ping, Status

LAN = Config.lan()


def joined(n: int, seed: int) -> Cluster:
    c = Cluster(n, seed=seed)
    assert converged_join(c) is not None
    return c


def deaths_of(c: Cluster, victim: int) -> list[tuple[int, float]]:
    """(observer, time) of every dead verdict about ``victim`` from now on."""
    vid = c.nodes[victim].id
    seen: list[tuple[int, float]] = []

    def observe(i: int, e: Event, now: float) -> None:
        if isinstance(e, MemberChanged) and e.member == vid and e.status is Status.DEAD:
            seen.append((i, now))

    c.observers.append(observe)
    return seen


# -- the pure parts ------------------------------------------------------------


def test_the_refused_timeout_and_the_crash_bound_are_pinned():
    assert refused_suspicion_timeout(LAN) == 2.0
    assert refused_suspicion_timeout(Config.wan()) == 10.0
    assert crash_bound(16, LAN) == 2.0 + spread_bound(16, LAN)
    # Well under the ordinary path's floor at every size that matters.
    for n in (3, 16, 64, 1000):
        assert crash_bound(n, LAN) < suspicion_min(LAN.suspicion_mult, n, LAN.probe_interval) + 2


def test_a_refusal_caps_the_suspicion_and_confirmations_never_lift_the_cap():
    s = Suspicion(10.0, "a", k=2, min_t=5.0, max_t=30.0)
    assert s.deadline == 40.0
    assert s.refused(10.1, timeout=2.0)
    assert s.deadline == pytest.approx(12.1)
    assert s.confirm("b") and s.deadline == pytest.approx(12.1)
    # A later refusal does not push the verdict back (nor forward).
    assert not s.refused(11.0, timeout=2.0)
    assert s.deadline == pytest.approx(12.1)


def test_at_the_cap_a_stale_refusal_asks_for_one_more_check_then_lifts():
    s = Suspicion(10.0, "a", k=2, min_t=5.0, max_t=30.0)
    s.refused(10.0, timeout=2.0)
    assert s.expire(12.0, grace=0.5) == "recheck"
    assert s.deadline == 12.5
    # Nothing refused during the check: the address answers again (a restart).
    assert s.expire(12.5, grace=0.5) == "wait"
    assert s.deadline == 40.0 and s.ceiling == math.inf


def test_at_the_cap_only_a_refused_check_is_a_verdict():
    # A refusal just before the cap is not enough: the process may have come
    # back since (a restart in the last moments of the suspicion).
    fresh = Suspicion(10.0, "a", k=2, min_t=5.0, max_t=30.0)
    fresh.refused(10.0, timeout=2.0)
    fresh.refused(11.99, timeout=2.0)
    assert fresh.expire(12.0, grace=0.5) == "recheck"
    assert fresh.expire(12.5, grace=0.5) == "wait"

    checked = Suspicion(10.0, "a", k=2, min_t=5.0, max_t=30.0)
    checked.refused(10.0, timeout=2.0)
    assert checked.expire(12.0, grace=0.5) == "recheck"
    assert checked.refused(12.01, timeout=2.0)
    assert checked.deadline == 12.01
    assert checked.expire(12.01, grace=0.5) == "dead"


def test_hurried_gossip_makes_at_most_one_round_per_gap():
    c = joined(8, seed=2)
    core = c.core(0)
    interval = core.config.gossip_interval
    c.run_for(30)  # quiet: nothing queued, no rounds
    rounds = 0
    t0 = c.now
    while c.now < t0 + interval:
        c.register(0, "burst", f"i{rounds}")  # a publication hurries gossip
        before = core.gossip.last_hurry
        c.run_for(interval / 40)
        rounds += core.gossip.last_hurry != before
    assert 1 <= rounds <= math.ceil(1 / HURRY_GAP) + 1


# -- crashes -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [3, pytest.param(4, marks=pytest.mark.slow)])
def test_a_crash_is_dead_everywhere_within_the_crash_bound(seed):
    n = 16
    c = joined(n, seed)
    victim = 5
    c.register(victim, "billing", "billing-1")
    assert c.run_until_true(lambda: all(c.serves(i, "billing", "billing-1") for i in range(n)), 5)
    dead_after = detection_time(c, victim, timeout=crash_bound(n, c.config))
    assert dead_after is not None and len(dead_after) == n - 1
    assert min(dead_after.values()) >= refused_suspicion_timeout(c.config)
    assert max(dead_after.values()) <= crash_bound(n, c.config)
    # Through the new path: peers saw closed connections and refused connects.
    assert sum(c.core(i).counters["closed"] for i in c.running()) > 0
    assert sum(c.core(i).counters["refused-suspicion"] for i in c.running()) > 0
    assert not any(c.serves(i, "billing", "billing-1") for i in c.running())


def test_a_closed_connection_alone_suspects_nobody_and_probes_once_per_interval():
    c = joined(8, seed=5)
    core = c.core(0)
    target = c.nodes[3]
    core.messages_to_send()  # what the harness has not pulled yet is not ours
    core.report_closed(target.id, c.now)
    pings = [m for a, m in core.messages_to_send() if isinstance(m, Ping)]
    assert len(pings) == 1 and pings[0].target == target.id
    core.report_closed(target.address, c.now + 0.5)  # by address too, rate-limited
    assert not [m for _, m in core.messages_to_send() if isinstance(m, Ping)]
    core.report_closed(target.address, c.now + core.config.probe_interval + 0.01)
    assert len([m for _, m in core.messages_to_send() if isinstance(m, Ping)]) == 1
    assert c.status_of(0, 3) is Status.ALIVE
    assert core.counters["closed"] == 3


def test_out_of_turn_probes_are_capped_in_all(monkeypatch):
    monkeypatch.setattr(prober_module, "MAX_OUT_OF_TURN", 3)
    c = joined(8, seed=6)
    core = c.core(0)
    core.messages_to_send()
    for i in range(1, 8):
        core.report_closed(c.nodes[i].id, c.now)
    assert len([m for _, m in core.messages_to_send() if isinstance(m, Ping)]) == 3
    assert core.counters["out-of-turn-dropped"] == 4
    # A probe interval later the old entries make room again.
    core.report_closed(c.nodes[7].id, c.now + core.config.probe_interval + 0.01)
    assert len([m for _, m in core.messages_to_send() if isinstance(m, Ping)]) == 1


def test_a_paused_node_gives_no_transport_facts():
    c = joined(8, seed=7)
    c.pause(4)
    c.run_for(2.5)
    c.resume(4)
    c.run_for(20)
    for i in c.running():
        assert c.core(i).counters["refused"] == 0 and c.core(i).counters["closed"] == 0
    assert c.all_see(4, Status.ALIVE)


# -- restarts --------------------------------------------------------------------


@pytest.mark.parametrize("gap", [0.6, 0.99])
def test_a_quick_restart_on_the_same_address_is_never_held_dead_and_stays_served(gap):
    """Restarted within the short timeout: at 0.99 of it, through one seed, so
    most peers reach the cap before the new incarnation reaches them, and only
    the last check (which the new process answers) keeps them from a verdict."""
    n = 16
    c = joined(n, seed=8)
    victim = 6
    c.register(victim, "cart", "cart-1")
    assert c.run_until_true(lambda: all(c.serves(i, "cart", "cart-1") for i in range(n)), 5)
    old = c.core(victim).incarnation
    deaths = deaths_of(c, victim)
    c.crash(victim)
    c.run_for(refused_suspicion_timeout(c.config) * gap)  # the gap: connects refused
    refused = sum(c.core(i).counters["refused"] for i in c.running())
    assert refused > 0, "the gap went unnoticed: the test shows nothing"
    c.restart(victim, seeds=[0])
    others = [i for i in range(n) if i != victim]
    gone: list[float] = []

    def settled() -> bool:
        if not all(c.serves(i, "cart", "cart-1") for i in others):
            gone.append(c.now)
        return c.all_see(victim, Status.ALIVE)

    assert c.run_until_true(settled, 30, check_every=0.02) is not None
    c.run_for(2 * suspicion_min(LAN.suspicion_mult, n, LAN.probe_interval))
    assert deaths == [] and gone == []
    assert c.all_see(victim, Status.ALIVE)
    assert all(c.core(i).members[c.nodes[victim].id].incarnation > old for i in others)


def test_a_slow_restart_is_held_dead_and_comes_back():
    n = 16
    c = joined(n, seed=9)
    victim = 7
    c.register(victim, "cart", "cart-1")
    assert c.run_until_true(lambda: all(c.serves(i, "cart", "cart-1") for i in range(n)), 5)
    deaths = deaths_of(c, victim)
    c.crash(victim)
    c.run_for(crash_bound(n, c.config) + 1)
    assert {i for i, _ in deaths} == {i for i in range(n) if i != victim}
    c.restart(victim)
    assert c.run_until_true(lambda: c.all_see(victim, Status.ALIVE), 30) is not None
    others = [i for i in range(n) if i != victim]
    back = c.run_until_true(lambda: all(c.serves(i, "cart", "cart-1") for i in others), 30)
    assert back is not None


# -- nobody else can shorten a suspicion ------------------------------------------


def test_a_refusal_of_an_address_no_member_holds_suspects_nobody():
    c = joined(8, seed=10)
    core = c.core(0)
    core.report_refused("127.0.0.1:1", c.now)
    core.report_refused(core.address, c.now)  # our own: never about ourselves
    c.run_for(10)
    assert all(c.status_of(0, i) is Status.ALIVE for i in range(1, 8))
    assert core.counters["refused"] == 0


def test_a_peers_accusations_never_cap_a_suspicion():
    c = joined(8, seed=11)
    core = c.core(0)
    subject = c.nodes[3]
    liar = c.nodes[1]
    m = core.members[subject.id]
    c.partition([3], range(8))  # the subject cannot refute in time: timing is all ours
    accusations = tuple(
        m.update_for(Status.SUSPECT, f"east/invented{k}") for k in range(20)
    )  # whatever a peer writes, including names a transport would use
    c.inject(0, Gossip(liar.id, members=accusations), src=1)
    s = core._suspicions[subject.id]
    lo, hi = core.suspicion_bounds()
    assert s.ceiling == math.inf
    assert s.deadline >= s.start + lo  # one relay counts once: the formula, no cap
    assert s.deadline > s.start + refused_suspicion_timeout(core.config)
    c.run_for(refused_suspicion_timeout(core.config) + 0.5)
    assert c.status_of(0, 3) is Status.SUSPECT  # not dead at the short timeout
