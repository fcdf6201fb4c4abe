"""Per-peer rate limits: token buckets, and when a peer's excess becomes abuse.

Pure and clock-free: every call takes ``now`` (seconds, any monotonic clock),
so the transport drives it with the loop's clock and tests with plain numbers.

A :class:`TokenBucket` holds up to ``burst`` tokens and regains ``rate`` per
second; taking more than it holds fails and takes nothing.  A
:class:`PeerLimiter` pairs two buckets, one counting frames and one counting
bytes, and decides for each complete frame of one authenticated peer whether
it is handled or dropped.  Dropping a frame costs a few arithmetic operations,
so a peer over its limit costs us almost nothing; a peer that stays over it
(``abuse_after`` seconds of drops with no pause longer than ``abuse_gap``) is
abusive and the transport closes its connection.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    """What to do with one frame.  The values are the ``reason`` label of a drop."""

    PASS = "pass"
    FRAMES = "rate-limit-frames"
    BYTES = "rate-limit-bytes"


class TokenBucket:
    """``burst`` tokens at most, ``rate`` more per second; starts full."""

    __slots__ = ("rate", "burst", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not rate > 0 or not burst >= 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = float(rate)
        self.burst = float(burst)
        self._tokens = self.burst
        self._stamp = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (a clock that went back refills nothing)."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._tokens

    def can_take(self, n: float, now: float) -> bool:
        return self.tokens(now) >= n

    def take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if all are there; otherwise take none."""
        if self.tokens(now) < n:
            return False
        self._tokens -= n
        return True

    def full(self, now: float) -> bool:
        return self.tokens(now) >= self.burst


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The limits of one peer.  Rates per second, bursts as bucket sizes."""

    frames_per_second: float
    frames_burst: float
    bytes_per_second: float
    bytes_burst: float
    #: Seconds of continued drops after which a peer is abusive.
    abuse_after: float
    #: A pause in drops longer than this ends a run of drops: a peer that
    #: bursts now and then is throttled, never disconnected.
    abuse_gap: float

    def __post_init__(self) -> None:
        if not self.abuse_after > 0 or not self.abuse_gap > 0:
            raise ValueError("abuse_after and abuse_gap must be positive")


class PeerLimiter:
    """The buckets of one authenticated peer, shared by all its connections."""

    __slots__ = ("limits", "frames", "bytes", "_over_since", "_last_over")

    def __init__(self, limits: RateLimits, now: float) -> None:
        self.limits = limits
        self.frames = TokenBucket(limits.frames_per_second, limits.frames_burst, now)
        self.bytes = TokenBucket(limits.bytes_per_second, limits.bytes_burst, now)
        self._over_since: float | None = None
        self._last_over = now

    def admit(self, size: int, now: float) -> Verdict:
        """Charge one frame of ``size`` bytes, or drop it (and charge nothing)."""
        if not self.frames.can_take(1, now):
            verdict = Verdict.FRAMES
        elif not self.bytes.can_take(size, now):
            verdict = Verdict.BYTES
        else:
            self.frames.take(1, now)
            self.bytes.take(size, now)
            return Verdict.PASS
        if self._over_since is None or now - self._last_over > self.limits.abuse_gap:
            self._over_since = now
        self._last_over = now
        return verdict

    def abusive(self, now: float) -> bool:
        """True when the peer has been over its limit for ``abuse_after`` seconds."""
        if self._over_since is None or now - self._last_over > self.limits.abuse_gap:
            return False
        return now - self._over_since >= self.limits.abuse_after

    def at_rest(self, now: float) -> bool:
        """Both buckets full and no run of drops: forgetting it changes nothing."""
        return (
            self.frames.full(now)
            and self.bytes.full(now)
            and (self._over_since is None or now - self._last_over > self.limits.abuse_gap)
        )
