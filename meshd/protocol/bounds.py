"""Time bounds derived from the configuration: what tests assert and figures compare to.

Each is a pure function of the pool size and the config, with its derivation
here, so a reader can check the number a test holds the protocol to.
"""

from __future__ import annotations

import math

from meshd.protocol.config import Config
from meshd.protocol.node import push_pull_scale
from meshd.protocol.suspicion import suspicion_max, suspicion_min

#: Margin over the expected epidemic round count.  Push gossip finishes in
#: about the expected number of rounds with high probability; three times
#: that leaves room for an unlucky draw without hiding a broken protocol.
EPIDEMIC_MARGIN = 3.0


def epidemic_rounds(n: int, fanout: int) -> float:
    """Expected rounds for push gossip with ``fanout`` to reach ``n`` nodes.

    ``log_{fanout+1}(n) + ln(n) / fanout``: the informed set grows by a factor
    of about ``fanout + 1`` per round until most nodes know, then the last
    stragglers are found at rate ``fanout`` per round (Pittel 1987, for f=1
    ``log2 n + ln n``).
    """
    if n <= 1:
        return 0.0
    return math.log(n, fanout + 1) + math.log(n) / fanout


def spread_bound(n: int, cfg: Config) -> float:
    """Seconds within which a new origin state reaches every node of a healthy pool.

    The originator queues the state at once and gossips it on its next round;
    every receiver forwards it, so it spreads as push gossip with fan-out
    ``gossip_nodes`` every ``gossip_interval``.
    """
    rounds = epidemic_rounds(n, cfg.gossip_nodes)
    return cfg.gossip_interval * (1 + EPIDEMIC_MARGIN * rounds)


def repair_bound(n: int, cfg: Config) -> float:
    """Worst case for a node that gossip missed: its own next digest sync.

    A node syncs every scaled ``digest_interval`` (the first one drawn in
    [0.5, 1.5) of it) with a random member that already holds the state.
    """
    return 1.5 * push_pull_scale(cfg.digest_interval, n) + spread_bound(n, cfg)


def detection_bound(n: int, cfg: Config) -> float:
    """Seconds within which every node holds a crashed member dead.

    First probe: the n-1 other members each probe it once per round-robin
    cycle at random offsets, so one of them does within about two probe
    intervals.  The suspicion then runs at most ``suspicion_max`` (Lifeguard
    starts there and only shrinks), and the death notice spreads like any
    broadcast.
    """
    lo = suspicion_min(cfg.suspicion_mult, n, cfg.probe_interval)
    hi = suspicion_max(lo, cfg.suspicion_max_timeout_mult) if cfg.lifeguard else lo
    return 2 * cfg.probe_interval + hi + spread_bound(n, cfg)
