import math

import pytest

from meshd.protocol.queue import MISS, BroadcastQueue, retransmit_limit


@pytest.mark.parametrize(
    "n, memberlist, expected",
    [(1, 4, 4), (2, 4, 7), (8, 4, 9), (9, 4, 9), (10, 8, 10), (64, 8, 12), (99, 8, 12)]
    + [(100, 12, 12), (1000, 16, 16), (10_000, 20, 20)],
)
def test_retransmit_limit_formula(n, memberlist, expected):
    """memberlist's formula, raised where it leaves a member out too often."""
    assert memberlist == 4 * math.ceil(math.log10(n + 1))
    assert retransmit_limit(4, n) == expected == max(memberlist, retransmit_limit(1, n))


def test_some_member_is_missed_at_most_once_in_a_thousand_updates():
    """The chance that every holder's L sends miss some member, (n - 1) *
    (1 - 1/(n-1))^((n-1) L), stays at or below MISS for every pool size."""
    for n in range(3, 20_001):
        limit = retransmit_limit(4, n)
        assert (n - 1) * (1 - 1 / (n - 1)) ** ((n - 1) * limit) <= MISS, n
        if n > 100:  # past a hundred, at most two sends more than memberlist's
            assert limit <= 4 * math.ceil(math.log10(n + 1)) + 2, n


def test_every_new_record_reaches_every_member_by_gossip():
    """200 new records in a pool of 8 and of 64 (the agent counts a benchmark
    runs): each is everywhere within the spread bound, none waits for a sync.
    With memberlist's limit alone (4 sends at 8 members) 6 of 200 took over
    a second, the worst 3.8 s."""
    from meshd.protocol.bounds import spread_bound
    from meshd.testing import Cluster, record_spread

    for n in (8, 64):
        c = Cluster(n, seed=1, encode=False)
        c.run_for(30.0)
        worst = 0.0
        for k in range(200 if n == 8 else 60):
            spread = record_spread(c, 0, app=f"spread{k}", timeout=20.0)
            assert spread is not None
            worst = max(worst, *spread.times)
            c.run_for(1.0)
        assert worst <= spread_bound(n, c.config), (n, worst)


def q():
    return BroadcastQueue(size_of=len)


def test_each_update_sent_limit_times_then_dropped():
    b = q()
    b.push("a", "xx")
    for _ in range(3):
        assert b.take(100, limit=3) == ["xx"]
    assert b.take(100, limit=3) == []
    assert len(b) == 0


def test_newer_update_about_same_key_replaces_and_resets_count():
    b = q()
    b.push("a", "old")
    b.take(100, limit=3)
    b.push("a", "new")
    assert b.values() == ["new"]
    assert [b.take(100, 3) for _ in range(4)] == [["new"], ["new"], ["new"], []]


def test_fewest_sent_first_then_newest():
    b = q()
    b.push("a", "a1")
    b.take(100, limit=10)  # a sent once
    b.push("b", "b1")
    b.push("c", "c1")
    # b and c unsent: c is newer so it goes first; a comes last.
    assert b.take(100, limit=10) == ["c1", "b1", "a1"]


def test_budget_is_respected_and_skips_items_that_do_not_fit():
    b = q()
    b.push("big", "x" * 60)
    b.push("small1", "y" * 30)
    b.push("small2", "z" * 30)
    out = b.take(70, limit=10)
    assert sum(map(len, out)) <= 70
    assert out == ["z" * 30, "y" * 30]


def test_oversized_update_still_goes_out_alone():
    b = q()
    b.push("huge", "h" * 500)
    assert b.take(100, limit=2) == ["h" * 500]


def test_discard():
    b = q()
    b.push("a", "1")
    b.discard("a")
    b.discard("missing")
    assert b.take(10, 3) == [] and "a" not in b


def test_accept_filters_without_counting_a_send():
    b = q()
    b.push("a", "for-west")
    b.push("b", "for-all")
    assert b.take(100, limit=1, accept=lambda v: v == "for-all") == ["for-all"]
    assert b.values() == ["for-west"]  # still queued, never counted
    assert b.take(100, limit=1) == ["for-west"]
