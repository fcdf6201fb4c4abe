"""Token buckets and the per-peer limiter, on plain numbers for the clock."""

from __future__ import annotations

import pytest

from meshd.agent.ratelimit import PeerLimiter, RateLimits, TokenBucket, Verdict

LIMITS = RateLimits(
    frames_per_second=10,
    frames_burst=20,
    bytes_per_second=1000,
    bytes_burst=4000,
    abuse_after=10.0,
    abuse_gap=1.0,
)


def test_a_bucket_starts_full_and_refills_at_its_rate_up_to_its_burst() -> None:
    b = TokenBucket(rate=2, burst=5, now=100.0)
    assert b.tokens(100.0) == 5
    assert all(b.take(1, 100.0) for _ in range(5))
    assert not b.take(1, 100.0)
    assert b.tokens(100.25) == pytest.approx(0.5)
    assert not b.take(1, 100.25)
    assert b.take(1, 100.5)
    assert b.tokens(1000.0) == 5  # never above the burst
    assert b.full(1000.0)


def test_a_bucket_takes_all_or_nothing() -> None:
    b = TokenBucket(rate=1, burst=10, now=0.0)
    assert b.take(7, 0.0)
    assert not b.take(4, 0.0)
    assert b.tokens(0.0) == 3  # the refused take cost nothing
    assert b.take(3, 0.0)


def test_a_clock_that_goes_back_refills_nothing() -> None:
    b = TokenBucket(rate=1, burst=10, now=50.0)
    assert b.take(10, 50.0)
    assert b.tokens(40.0) == 0
    assert b.tokens(51.0) == 1


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0.5), (float("nan"), 5)])
def test_a_bucket_refuses_nonsense_limits(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst, 0.0)


def test_frames_over_the_frame_limit_are_dropped_and_nothing_is_charged() -> None:
    p = PeerLimiter(LIMITS, now=0.0)
    verdicts = [p.admit(10, 0.0) for _ in range(25)]
    assert verdicts[:20] == [Verdict.PASS] * 20
    assert verdicts[20:] == [Verdict.FRAMES] * 5
    assert p.bytes.tokens(0.0) == 4000 - 20 * 10  # drops took no bytes
    assert p.admit(10, 0.1) is Verdict.PASS  # one frame regained after 0.1 s


def test_bytes_over_the_byte_limit_are_dropped_and_take_no_frame_token() -> None:
    p = PeerLimiter(LIMITS, now=0.0)
    assert p.admit(3000, 0.0) is Verdict.PASS
    assert p.admit(1500, 0.0) is Verdict.BYTES
    assert p.frames.tokens(0.0) == 19
    assert p.admit(1000, 0.0) is Verdict.PASS  # a smaller one still fits
    assert p.admit(1500, 1.0) is Verdict.BYTES  # 1000 regained, 1500 needed
    assert p.admit(1500, 1.5) is Verdict.PASS


def test_a_peer_over_its_limit_for_abuse_after_seconds_is_abusive() -> None:
    p = PeerLimiter(LIMITS, now=0.0)
    t = 0.0
    # Twice the allowed frame rate: the burst lasts 2 s, then drops for 11 s.
    while t < 13.0:
        p.admit(1, t)
        if t < 9.5:
            assert not p.abusive(t), t
        t += 0.05
    assert p.abusive(t)
    # Once it stops, the run of drops ends after the gap.
    assert not p.abusive(t + LIMITS.abuse_gap + 0.1)


def test_bursts_separated_by_pauses_are_throttled_never_abusive() -> None:
    p = PeerLimiter(LIMITS, now=0.0)
    for second in range(0, 60, 3):
        for _ in range(100):  # far over the burst, then quiet for 3 s
            p.admit(1, float(second))
        assert not p.abusive(float(second))


def test_a_limiter_is_at_rest_once_refilled_and_calm() -> None:
    p = PeerLimiter(LIMITS, now=0.0)
    assert p.at_rest(0.0)
    for _ in range(30):
        p.admit(100, 0.0)
    assert not p.at_rest(0.5)
    assert p.at_rest(10.0)  # 20 frames at 10/s and 3000 bytes at 1000/s are back


def test_rate_limits_refuse_nonsense_abuse_times() -> None:
    with pytest.raises(ValueError):
        RateLimits(1, 1, 1, 1, abuse_after=0, abuse_gap=1)
    with pytest.raises(ValueError):
        RateLimits(1, 1, 1, 1, abuse_after=1, abuse_gap=-1)
