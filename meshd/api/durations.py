"""Go-style duration strings ("500ms", "10s", "1m30s"), as Consul and the contract write them.

The grammar is Go's ``time.ParseDuration``: an optional sign, then one or more
``<decimal><unit>`` parts, units ``ns``, ``us`` (or ``µs``), ``ms``, ``s``,
``m``, ``h``; a bare ``0`` is the only number allowed without a unit.  Keeping
Go's grammar exactly means a value copied from a Consul or Dapr configuration
means the same thing here.  Bounds (what a TTL or a wait may be) are the
caller's business; this module only turns text into seconds.
"""

from __future__ import annotations

import re

__all__ = ["parse_duration", "MAX_DURATION_SECONDS"]

#: Go keeps durations in int64 nanoseconds; anything longer overflows there,
#: so we refuse it too rather than accept a value Go tooling would reject.
MAX_DURATION_SECONDS = (2**63 - 1) / 1e9

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC Greek mu; Go accepts both spellings
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# [0-9], not \d: \d would admit other scripts' digits, which float() then accepts.
# "ms" is tried before "m" and "s" so that "5ms" is not read as 5 minutes + junk.
_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ValueError if it is not a Go duration."""
    if not isinstance(text, str):
        raise ValueError("a duration must be a string such as '10s'")
    s = text
    sign = 1.0
    if s[:1] in ("+", "-"):
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"invalid duration {text[:40]!r}")
    total = 0.0
    pos = 0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text[:40]!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if total > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {text[:40]!r} is too long")
    return sign * total


def parse_wait(value: str | None, default: float, maximum: float) -> float:
    """A blocking query's ``wait`` parameter: absent or empty -> ``default``,
    longer than ``maximum`` -> ``maximum``; raises ValueError when it is not a
    non-negative duration.  Shared by the native and the Consul API, which
    differ only in their defaults and in how they word errors."""
    if not value:
        return default
    seconds = parse_duration(value)
    if seconds < 0:
        raise ValueError("a wait cannot be negative")
    return min(seconds, maximum)
