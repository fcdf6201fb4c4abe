import math

import pytest

from meshd.protocol.queue import BroadcastQueue, retransmit_limit


@pytest.mark.parametrize(
    "n, expected", [(1, 4), (9, 4), (10, 8), (64, 8), (99, 8), (100, 12), (10_000, 20)]
)
def test_retransmit_limit_formula(n, expected):
    assert retransmit_limit(4, n) == expected == 4 * math.ceil(math.log10(n + 1))


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
