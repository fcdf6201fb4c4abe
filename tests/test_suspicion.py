import math

import pytest

from meshd.protocol.suspicion import (
    Suspicion,
    expected_confirmations,
    suspicion_max,
    suspicion_min,
    suspicion_timeout,
)


def test_min_is_mult_times_log10_n_times_interval():
    # 4 * log10(100) * 1 s = 8 s; below 10 nodes log10 is floored at 1.
    assert suspicion_min(4, 100, 1.0) == pytest.approx(8.0)
    assert suspicion_min(4, 5, 1.0) == pytest.approx(4.0)
    assert suspicion_min(4, 64, 0.5) == pytest.approx(4 * math.log10(64) * 0.5)


def test_max_is_a_multiple_of_min():
    assert suspicion_max(8.0, 6) == pytest.approx(48.0)


def test_expected_confirmations_need_enough_members():
    assert expected_confirmations(4, 64) == 2
    assert expected_confirmations(4, 3) == 0  # n - 2 < k: nobody left to confirm


@pytest.mark.parametrize(
    "c, expected",
    [
        (0, 48.0),  # starts at max
        (1, 48.0 - math.log(2) / math.log(3) * 40.0),
        (2, 8.0),  # k confirmations: down to min
        (5, 8.0),  # never below min
    ],
)
def test_timeout_formula_pinned(c, expected):
    assert suspicion_timeout(c, 2, 8.0, 48.0) == pytest.approx(expected)


def test_no_expected_confirmations_means_min():
    assert suspicion_timeout(0, 0, 8.0, 48.0) == 8.0


def test_confirmations_count_distinct_accusers_only():
    s = Suspicion(start=100.0, first_by="east/a", k=2, min_t=8.0, max_t=48.0)
    assert s.deadline == pytest.approx(148.0)
    assert not s.confirm("east/a")  # the original accuser is not a confirmation
    assert s.confirm("east/b")
    assert not s.confirm("east/b")
    assert s.confirmations == 1
    assert s.deadline == pytest.approx(100.0 + suspicion_timeout(1, 2, 8.0, 48.0))
    assert s.confirm("east/c")
    assert s.deadline == pytest.approx(108.0)
    assert not s.confirm("east/d")  # already at k


def test_one_delivering_peer_counts_once_whatever_accusers_it_names():
    """A peer that invents accusers (a valid certificate that lies) buys one
    confirmation; first-hand ones and the driver's own evidence still count."""
    s = Suspicion(0.0, "east/a", k=3, min_t=4.0, max_t=24.0, via="east/a")
    assert s.confirm("east/b", via="east/rogue")
    assert not s.confirm("east/c", via="east/rogue")
    assert not s.confirm("east/ghost", via="east/rogue")
    assert s.confirmations == 1
    assert s.confirm("east/d", via="east/d")
    assert s.confirm("transport:refused")
    assert s.confirmations == 3


def test_a_suspicion_without_a_named_accuser_takes_the_first_one_as_its_origin():
    # Learnt from a member list (no accuser named): the first accuser heard
    # afterwards started it, it does not confirm it; the second one does.
    s = Suspicion(0.0, None, k=2, min_t=8.0, max_t=48.0, via="east/b")
    assert s.confirmations == 0 and s.deadline == 48.0
    s.confirm("east/c", via="east/c")
    assert s.confirmations == 0 and s.deadline == 48.0
    assert s.confirm("east/d", via="east/d")
    assert s.confirmations == 1
    assert s.deadline == suspicion_timeout(1, 2, 8.0, 48.0)


def test_a_sick_node_holds_its_verdict_health_times_the_timeout():
    # start 0, no confirmation: the Lifeguard timeout is max = 24 s.
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    assert s.expire(24.0, grace=0.5) == "dead"
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    # Health 3 (score 2): held until 72 s, looked at again every step.
    assert s.expire(24.0, grace=0.5, health=3, step=1.0) == "hold"
    assert s.deadline == 25.0
    assert s.expire(71.0, grace=0.5, health=3, step=1.0) == "hold"
    assert s.deadline == 72.0
    assert s.expire(72.0, grace=0.5, health=3, step=1.0) == "dead"
    # Health back to normal during the hold: dead at the next look.
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    assert s.expire(24.0, grace=0.5, health=8, step=1.0) == "hold"
    assert s.expire(25.0, grace=0.5, health=1, step=1.0) == "dead"
    # Confirmations shrink what is held: 4 s (two confirmations) times 3.
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    s.confirm("c")
    s.confirm("d")
    assert s.expire(4.0, grace=0.5, health=3, step=1.0) == "hold"
    assert s.expire(12.0, grace=0.5, health=3, step=1.0) == "dead"


def test_a_refused_check_is_a_verdict_whatever_our_health():
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    assert s.refused(1.0, timeout=2.0)
    assert s.deadline == 3.0
    assert s.expire(3.0, grace=0.5, health=8, step=1.0) == "recheck"
    assert s.refused(3.2, timeout=2.0)  # the check was refused: the kernel's word
    assert s.expire(3.2, grace=0.5, health=8, step=1.0) == "dead"
    # Unrefused, the cap is lifted and the held Lifeguard timeout runs.
    s = Suspicion(0.0, "b", k=2, min_t=4.0, max_t=24.0)
    s.refused(1.0, timeout=2.0)
    assert s.expire(3.0, grace=0.5, health=8, step=1.0) == "recheck"
    assert s.expire(3.5, grace=0.5, health=8, step=1.0) == "wait"
    assert s.deadline == 24.0
    assert s.expire(24.0, grace=0.5, health=8, step=1.0) == "hold"
