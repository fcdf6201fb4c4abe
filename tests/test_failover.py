"""Failover when a whole cluster is lost: the bridges' cluster watch (cluster_watch.py).

Unit tests drive one ``ClusterWatch`` by hand; the scenario tests run four
clusters of six nodes (two bridges each) in the harness with the real WAN
profile (probe every 5 s, suspicion 30 s and more), so that a verdict within
``watch_unreachable_bound`` (about 10 s) can only come from the watch, and
check that membership has not moved when it does.
"""

from __future__ import annotations

import math

import pytest

from meshd.protocol.bounds import (
    cut_off_side_bound,
    detection_bound,
    spread_bound,
    unreachable_bound,
    watch_false_positive_rate,
    watch_round_loss,
    watch_unreachable_bound,
    watch_verdict_time,
)
from meshd.protocol.cluster_watch import (
    LATE_ACK_WINDOW,
    MAX_TARGETS,
    MAX_WATCHED_CLUSTERS,
    SEQ_BASE,
    ClusterWatch,
    WatchConfig,
)
from meshd.protocol.config import Config
from meshd.testing import (
    Cluster,
    converged_everywhere,
    inject_wan,
    isolation_time,
    multi_cluster,
    reach_of,
)
from meshd.wire import Ack, Ping, Status

W = WatchConfig()

# ---------------------------------------------------------------------------
# The watch alone


def targets(*clusters: str, per: int = 2) -> dict[str, list[tuple[str, str]]]:
    return {c: [(f"{c}/n{k}", f"{c}-{k}:1") for k in range(per)] for c in clusters}


def run_rounds(
    w: ClusterWatch, start: float, rounds: int, tg: dict[str, list[tuple[str, str]]]
) -> tuple[float, list[tuple[str, Ping]], bool]:
    """Tick the watch at each of its deadlines for ``rounds`` rounds, answering nothing."""
    sent: list[tuple[str, Ping]] = []
    now, changed = start, False
    end = start + rounds * W.interval
    while True:
        now = w.deadline()
        if now > end:
            return now, sent, changed
        out, ch = w.tick(now, tg)
        sent += out
        changed |= ch


def test_a_round_pings_every_target_of_every_other_cluster_in_the_upper_seq_half():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    out, changed = w.tick(W.interval, targets("b", "c"))
    assert not changed
    assert sorted((addr, p.target) for addr, p in out) == [
        ("b-0:1", "b/n0"),
        ("b-1:1", "b/n1"),
        ("c-0:1", "c/n0"),
        ("c-1:1", "c/n1"),
    ]
    for _, p in out:
        assert p.source == "a/n0" and p.source_addr == "a-0:1"
        assert SEQ_BASE <= p.seq < 2**32
        assert p.members == () and p.states == ()  # a bare ping: cheap
    assert len({p.seq for _, p in out}) == 4


def test_silence_for_misses_rounds_marks_a_cluster_unreachable_and_one_ack_undoes_it():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    tg = targets("b", "c")
    now = W.interval
    out, _ = w.tick(now, tg)
    changed = False
    t = now
    # b answers every round, c never does.
    while not w.unreachable():
        for _, p in out:
            if p.target.startswith("b/"):
                w.on_ack(p.target, p.seq, t + 0.05)
        t = w.deadline()
        out, changed = w.tick(t, tg)
    assert w.unreachable() == {"c"}
    assert changed and w.lost == 1
    # The verdict came when the misses-th silent round timed out.
    assert t == pytest.approx(W.misses * W.interval + W.timeout, abs=1e-9)
    assert t <= watch_verdict_time()
    # The first ack of c makes it reachable again at once.
    ping = next(p for _, p in out if p.target == "c/n1")
    assert w.on_ack("c/n1", ping.seq, t + 0.05) is True
    assert w.unreachable() == set()
    assert w.lost == 1  # counts verdicts, not rounds: one loss so far


def test_one_answered_round_resets_the_count():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    tg = targets("b", per=1)
    t = W.interval
    for k in range(3 * W.misses):
        out, _ = w.tick(t, tg)
        if k % (W.misses - 1) == 0:  # one answer every misses-1 rounds
            (_, p) = out[0]
            w.on_ack("b/n0", p.seq, t + 0.01)
        t += W.interval
    assert w.unreachable() == set()


def test_an_ack_from_another_member_or_with_an_unknown_seq_is_not_evidence():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    tg = targets("b", "c")
    t, sent, _ = run_rounds(w, 0.0, int(LATE_ACK_WINDOW / W.interval) + 6, tg)
    assert w.unreachable() == {"b", "c"}
    out, _ = w.tick(t, tg)
    to_b = next(p for _, p in out if p.target == "b/n0")
    # c's bridge answering a ping that went to b's bridge, and an ack of
    # b's bridge carrying a seq we never sent (or one of a probe).
    assert w.on_ack("c/n0", to_b.seq, t) is False
    assert w.on_ack("b/n0", to_b.seq + 1000, t) is False
    assert w.on_ack("b/n0", 7, t) is False
    assert w.unreachable() == {"b", "c"}
    assert w.ignored == 2  # the probe's seq (7) is not ours to count
    # A ping of a round that timed out more than LATE_ACK_WINDOW ago is forgotten.
    old = sent[0][1]
    assert w.on_ack(old.target, old.seq, t) is False
    assert w.unreachable() == {"b", "c"}


def test_a_late_ack_proves_life_so_a_slow_link_makes_no_verdict():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    tg = targets("b", per=1)
    rtt = 1.5 * W.timeout  # every ack comes after its round timed out
    due: list[tuple[float, Ping]] = []
    t = 0.0
    while t < 60.0:
        t = min([w.deadline(), *(d for d, _ in due)])
        for d, p in [x for x in due if x[0] <= t]:
            due.remove((d, p))
            assert w.on_ack(p.target, p.seq, d) is False
        out, changed = w.tick(t, tg)
        assert not changed
        due += [(t + rtt, p) for _, p in out]
    assert w.missed > W.misses  # every round counted as missed...
    assert w.unreachable() == set()  # ...yet the late acks kept b reachable
    # After a verdict, a late ack undoes it as an answered one would.
    t2, sent, _ = run_rounds(w, t, W.misses + 2, tg)
    assert w.unreachable() == {"b"}
    last = sent[-5][1]  # timed out, well inside the late window
    assert w.on_ack("b/n0", last.seq, t2) is True
    assert w.unreachable() == set()


def test_a_paused_driver_wakes_without_a_verdict():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    tg = targets("b")
    t, _, _ = run_rounds(w, 0.0, 3, tg)
    # Paused for a minute: the rounds in flight expire, no more were sent.
    t += 60.0
    out, changed = w.tick(t, tg)
    assert not changed and w.unreachable() == set()
    assert len(out) == 2  # one round now, no catching up
    assert w.deadline() <= t + W.interval


def test_caps_on_clusters_and_targets_per_round():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    many = {f"x{k:03}": [(f"x{k:03}/n{j}", f"x{k}-{j}:1") for j in range(9)] for k in range(200)}
    out, _ = w.tick(W.interval, many)
    assert len(out) == MAX_WATCHED_CLUSTERS * MAX_TARGETS
    assert len(w._pending) == len(out)
    # Rounds in flight are bounded by timeout / interval + 1, so is what is pending.
    t, _, _ = run_rounds(w, W.interval, 20, many)
    rounds_in_flight = math.ceil(W.timeout / W.interval) + 1
    assert len(w._pending) <= rounds_in_flight * MAX_WATCHED_CLUSTERS * MAX_TARGETS


def test_a_cluster_gone_from_the_view_is_forgotten():
    w = ClusterWatch("a/n0", "a-0:1", now=0.0)
    t, _, _ = run_rounds(w, 0.0, W.misses + 3, targets("b", "c"))
    assert w.unreachable() == {"b", "c"}
    _, changed = w.tick(t, targets("b"))
    assert changed and w.unreachable() == {"b"}


def test_watch_config_refuses_a_verdict_a_pause_could_cause():
    with pytest.raises(ValueError):
        WatchConfig(interval=0.5, timeout=3.0, misses=6)
    with pytest.raises(ValueError):
        WatchConfig(interval=0.0)
    with pytest.raises(ValueError):
        WatchConfig(misses=0)


# ---------------------------------------------------------------------------
# The bounds


def test_watch_bounds_pin_their_figures():
    assert watch_verdict_time() == pytest.approx(7.0)
    assert watch_verdict_time(WatchConfig(interval=1.0, timeout=2.0, misses=5)) == 7.0
    assert watch_round_loss(0.1, 1) == pytest.approx(0.19)
    assert watch_round_loss(0.1, 2) == pytest.approx(0.0361)
    assert watch_round_loss(0.0, 1) == 0.0
    # A day at 10% loss each way: two live targets, never; one, once in years.
    assert watch_false_positive_rate(0.1, 2) < 1e-11
    assert watch_false_positive_rate(0.1, 1) == pytest.approx(86400 / 0.5 * 0.19**12)
    assert watch_false_positive_rate(0.1, 1) < 1e-3
    with pytest.raises(ValueError):
        watch_round_loss(1.5, 1)
    with pytest.raises(ValueError):
        watch_round_loss(0.1, 0)
    lan, wan = Config.lan(), Config.wan()
    # Failover in 5 clusters of 200 with the WAN profile: under the 10 s
    # on average (the bound is the worst case: a full interval of phase,
    # three times the expected gossip rounds).
    assert watch_unreachable_bound(200, lan) == pytest.approx(7.0 + spread_bound(200, lan))
    assert unreachable_bound(10, 200, lan, wan) == watch_unreachable_bound(200, lan)
    membership = detection_bound(10, wan) + spread_bound(200, lan)
    assert unreachable_bound(10, 200, lan, wan) < membership / 10
    assert cut_off_side_bound(10, 50, lan, wan) == watch_unreachable_bound(50, lan)


# ---------------------------------------------------------------------------
# Four clusters in the harness, WAN profile

NAMES = ("a", "b", "c", "d")
N = 6
LAN = Config.lan()
WAN = Config.wan()
BOUND = watch_unreachable_bound(N, LAN)


def mesh(seed: int) -> tuple[Cluster, dict[str, list[int]]]:
    c, g = multi_cluster(
        NAMES, N, bridges={x: 2 for x in NAMES}, seed=seed, config=LAN, wan_config=WAN, encode=False
    )
    assert c.run_until_true(lambda: converged_everywhere(c), 120.0) is not None
    everywhere = c.run_until_true(
        lambda: all(not reach_of(c, i).unreachable for i in c.running()), 60
    )
    assert everywhere is not None
    return c, g


def outside(c: Cluster, lost: str) -> list[int]:
    return [i for i in c.running() if c.nodes[i].cluster != lost]


def held_unreachable(c: Cluster, nodes: list[int], lost: str) -> bool:
    return all(not reach_of(c, i).reachable(lost) for i in nodes)


def wan_views_of(c: Cluster, lost: str, g: dict[str, list[int]]) -> set[Status]:
    """What the outside bridges' WAN membership says about ``lost``'s bridges."""
    out: set[Status] = set()
    for i in c.running():
        hn = c.nodes[i]
        if hn.is_bridge and hn.cluster != lost:
            for b in g[lost][:2]:
                m = c.wan(i).members.get(c.nodes[b].id)
                assert m is not None
                out.add(m.status)
    return out


def test_a_crashed_cluster_is_unreachable_everywhere_within_the_watch_bound():
    c, g = mesh(seed=3)
    askers = outside(c, "d")
    for i in g["d"]:
        c.crash(i)
    took = c.run_until_true(lambda: held_unreachable(c, askers, "d"), BOUND)
    assert took is not None and took <= BOUND
    # The watch did it: WAN membership still has d's bridges alive or suspect
    # (its detection takes 30 s at least), and it is left to run its course.
    assert Status.DEAD not in wan_views_of(c, "d", g)
    assert detection_bound(8, WAN) > 3 * BOUND
    # The other clusters stay reachable.
    assert all(reach_of(c, i).unreachable == {"d"} for i in askers)


def test_a_silently_cut_cluster_is_unreachable_on_both_sides_within_the_watch_bound():
    c, g = mesh(seed=4)
    took = isolation_time(c, "d", timeout=BOUND)
    assert took is not None
    assert max(took.values()) <= BOUND
    assert max(took.values()) <= cut_off_side_bound(8, N, LAN, WAN)
    assert Status.DEAD not in wan_views_of(c, "d", g)


def test_a_short_cut_is_undone_at_the_first_ack_before_membership_moves():
    c, g = mesh(seed=5)
    askers = outside(c, "d")
    c.isolate_cluster("d")
    assert c.run_until_true(lambda: held_unreachable(c, askers, "d"), BOUND) is not None
    c.heal()
    # Reachable again within a round, its timeout and the LAN spread of the
    # restated documents: no reconnect, no anti-entropy needed.
    back = W.interval + W.timeout + spread_bound(N, LAN)
    took = c.run_until_true(lambda: all(not reach_of(c, i).unreachable for i in c.running()), back)
    assert took is not None
    assert Status.DEAD not in wan_views_of(c, "d", g)


@pytest.mark.slow
def test_ten_percent_loss_marks_no_cluster_unreachable():
    c, _ = mesh(seed=6)
    wrong: list[tuple[str, frozenset[str]]] = []

    def watch(i: int, e: object, now: float) -> None:
        r = reach_of(c, i)
        if r.unreachable:
            wrong.append((c.nodes[i].id, r.unreachable))

    c.observers.append(watch)
    c.loss = 0.10
    c.run_for(240.0)
    assert wrong == []
    # Not for want of trying: the loss cost the watches rounds.
    missed = 0
    for hn in c.nodes:
        if hn.bridge is not None:
            missed += hn.bridge.watch.missed
    assert missed > 50


def test_a_lying_peer_cannot_move_a_third_clusters_verdict():
    c, g = mesh(seed=7)
    a0, b0, d0 = g["a"][0], g["b"][0], g["d"][0]
    watcher = c.nodes[a0].bridge
    assert watcher is not None
    # d is cut off from a; b keeps its links (and a valid certificate).
    c.partition(g["a"], g["d"])
    assert c.run_until_true(lambda: "d" in watcher.watch.unreachable(), BOUND) is not None
    pending = [(s, m) for s, (_, m) in watcher.watch._pending.items() if m.startswith("d/")]
    assert pending
    seq, member = pending[0]
    ignored = watcher.watch.ignored
    # b's bridge acks a ping that went to d's bridge, as itself...
    inject_wan(c, a0, Ack(c.nodes[b0].id, seq=seq), src=b0)
    # ...and claiming to be d's bridge (the transport says it is b).
    inject_wan(c, a0, Ack(member, seq=seq), src=b0)
    assert "d" in watcher.watch.unreachable()
    assert watcher.watch.ignored == ignored + 1
    assert c.wan(a0).counters["impersonation"] >= 1
    # Only d's own bridge answering our own ping counts.
    inject_wan(c, a0, Ack(member, seq=seq), src=d0)
    assert "d" not in watcher.watch.unreachable()


# ---------------------------------------------------------------------------
# The simulator: failover times and the false-unreachable count


def _sim(doc: dict) -> dict:
    from simulations.engine import Simulation
    from simulations.scenario import parse_scenario

    return Simulation(parse_scenario(doc)).run()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crash", "cut"])
def test_simulated_lost_cluster_fails_over_within_the_watch_bound(mode: str) -> None:
    r = _sim(
        {
            "duration_s": 40.0,
            "topology": {"nodes": 30, "clusters": 3, "bridges": 2},
            "warmup": {"mode": "preset"},
            "apps": [{"name": "pay", "clusters": ["c2", "c1"], "failover": ["c2", "c1"]}],
            "faults": [{"at_s": 10.0, "kind": "lose_cluster", "cluster": "c2", "mode": mode}],
        }
    )
    fo = r["failover"]["pay"]
    assert fo["failed_over"] == fo["askers"] == 10
    assert fo["failover_s"]["max"] <= watch_unreachable_bound(10, Config.lan())
    assert fo["failover_bound_s"] == pytest.approx(watch_unreachable_bound(10, Config.lan()))
    # c2 is really lost (crashed, or cut from both others): no false verdict.
    assert r["false_unreachable"] == 0


@pytest.mark.slow
def test_the_simulator_counts_false_unreachables(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hair-trigger watch (two lost rounds of 0.1 s timeout) under 30% loss
    # must be caught marking live clusters unreachable.
    from meshd.protocol import cluster_watch

    hair = WatchConfig(interval=0.5, timeout=0.1, misses=2)
    monkeypatch.setattr(cluster_watch, "WatchConfig", lambda: hair)
    doc = {
        "duration_s": 30.0,
        "topology": {"nodes": 30, "clusters": 3, "bridges": 1},
        "network": {"loss": 0.3},
        "warmup": {"mode": "preset"},
    }
    r = _sim(doc)
    assert r["false_unreachable"] > 0
    assert set(r["false_unreachable_clusters"]) <= {"c0", "c1", "c2"}
    assert len(r["series"]["false_unreachable_times"]) == min(r["false_unreachable"], 1000)
    monkeypatch.undo()
    assert _sim(doc)["false_unreachable"] == 0  # the real watch, same loss
