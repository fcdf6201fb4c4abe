"""Time bounds derived from the configuration: what tests assert and figures compare to.

Each is a pure function of the pool size and the config, with its derivation
here, so a reader can check the number a test holds the protocol to.
"""

from __future__ import annotations

import math

from meshd.protocol.anti_entropy import push_pull_scale
from meshd.protocol.cluster_watch import WatchConfig
from meshd.protocol.config import Config
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
    Push gossip misses some member of the pool for at most ``queue.MISS``
    (one in a thousand) of updates: every holder sends each update
    ``queue.retransmit_limit`` times, at least ``ln((n - 1) / MISS)``.
    """
    return 1.5 * push_pull_scale(cfg.digest_interval, n) + spread_bound(n, cfg)


def detection_bound(n: int, cfg: Config) -> float:
    """Seconds within which every node holds a crashed member dead.

    First probe: the n-1 other members each probe it once per round-robin
    cycle at random offsets, so one of them does within about two probe
    intervals.  The suspicion then runs at most ``suspicion_max`` (Lifeguard
    starts there and only shrinks), and the death notice spreads like any
    broadcast.  A node whose own probes fail holds its own verdict up to
    ``awareness_max_multiplier`` times longer (``Suspicion.expire``), but the
    healthy members' verdict reaches it within this bound all the same.
    """
    lo = suspicion_min(cfg.suspicion_mult, n, cfg.probe_interval)
    hi = suspicion_max(lo, cfg.suspicion_max_timeout_mult) if cfg.lifeguard else lo
    return 2 * cfg.probe_interval + hi + spread_bound(n, cfg)


#: Probe intervals a suspicion runs when it rests on our own refused connect.
REFUSED_SUSPICION_INTERVALS = 2.0


def refused_suspicion_timeout(cfg: Config) -> float:
    """Seconds from our own refused connect to a member's address to our dead verdict.

    A refused connect is the remote kernel saying no process listens on that
    port: a crashed process, never a paused, slow or lossy one (those accept
    into the listen backlog or stay silent) and never our own trouble (a sick
    node loses packets; it cannot make up a reset).  So it needs no
    confirmations and no Lifeguard ceiling.  What it must still allow is a
    process that restarts on the same address: it is refused only while it
    is down, and once it listens again it announces a new incarnation, which
    overrides the suspicion.  ``REFUSED_SUSPICION_INTERVALS`` probe intervals
    (2 s on the LAN and local profiles) leave that much for the restart: the
    agent binds its listener about 0.6 s of CPU after start, and its alive
    claim reaches its seeds in the first round trip after that.  A restart
    slower than this is declared dead and still comes back, since an alive
    claim at a higher incarnation overrides dead (members.py).
    """
    return REFUSED_SUSPICION_INTERVALS * cfg.probe_interval


def crash_bound(n: int, cfg: Config) -> float:
    """Seconds within which every node holds a crashed member dead, when some
    node held a connection with it (any pool with traffic: connections stay
    open for the transport's idle timeout, a minute).

    The kernel closes the crashed process's sockets: its peers see the end
    of their connections at once and probe it out of turn; the connect is
    refused within a round trip, so each such peer suspects it for
    :func:`refused_suspicion_timeout` and then declares it dead itself.  The
    verdict is gossiped at once and reaches the rest within
    :func:`spread_bound`.  A pool where nobody held a connection falls back
    to the first ordinary probe (two probe intervals) before the same timeout,
    still well inside :func:`detection_bound`.
    """
    return refused_suspicion_timeout(cfg) + spread_bound(n, cfg)


# ----------------------------------------------------------------------
# Several clusters: bounds over the LAN pools and the WAN pool of bridges.


def cross_cluster_spread_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds within which a new document of cluster A reaches every node of cluster B.

    Three epidemics in a row, each ``bounds.spread_bound`` of its pool:

    1. A's LAN pool (``n_origin`` nodes, ``config``): every node of A, so every
       bridge of A, holds the document.  A bridge hands what its LAN core
       learns to its WAN core in the same pass of the driver (``Bridge.on_event``).
    2. The WAN pool (``n_bridges``, all bridges of the mesh, ``wan_config``):
       every bridge holds it, those of B included, and each injects it into
       its LAN core on receipt (when the document's scope admits B).
    3. B's LAN pool (``n_asker`` nodes, ``config``).

    Message latency is absorbed by the margin of each spread bound as long
    as a hop takes well under a gossip interval (the harness: 2 ms at most).
    """
    return (
        spread_bound(n_origin, config)
        + spread_bound(n_bridges, wan_config)
        + spread_bound(n_asker, config)
    )


def cross_cluster_bound(
    n_victim: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds within which a crashed (non-bridge) node of cluster A stops being
    served to every node of cluster B.

    ``bounds.detection_bound(n_victim, config)`` + ``spread_bound(n_bridges,
    wan_config)`` + ``spread_bound(n_asker, config)``:

    1. Detection in A's LAN pool: every node of A, its bridges included,
       holds the victim dead within ``detection_bound`` (first probe, the
       Lifeguard suspicion ceiling, spread of the death notice).
    2. On that ``MemberChanged`` a bridge of A restates at once: its main
       document, re-signed with the victim in ``down``, goes into its WAN core
       in the same pass, and spreads in the WAN pool within ``spread_bound``
       of the WAN pool.
    3. A bridge of B injects it into B's LAN pool on receipt; it spreads there
       within ``spread_bound`` of B's pool.  A lookup on a node of B that holds
       it drops the victim's endpoints at once (``Reach.down``), so the next
       copy in policy order becomes the first active one.

    Not a bound for a crashed bridge: its death is seen through the WAN pool
    (see :func:`unreachable_bound`).  Inside A the bound is ``detection_bound``
    alone, as for any crash.
    """
    return (
        detection_bound(n_victim, config)
        + spread_bound(n_bridges, wan_config)
        + spread_bound(n_asker, config)
    )


def unreachable_bound(
    n_bridges: int,
    n_asker: int,
    config: Config,
    wan_config: Config,
    watch: WatchConfig | None = None,
) -> float:
    """Seconds within which every node of cluster B marks a lost cluster A unreachable.

    A is lost when none of its bridges answers in the WAN pool (crashed, or
    cut off).  Two ways lead there, and the faster one bounds it:

    - The cluster watch (:func:`watch_unreachable_bound`): every bridge of B
      holds A unreachable after ``misses`` unanswered rounds of its own pings.
    - Membership: ``detection_bound(n_bridges, wan_config)``: every bridge of B
      holds every bridge of A dead; on each such ``MemberChanged`` of its WAN
      core a bridge restates its main document with A in ``unreachable``;
      then ``spread_bound(n_asker, config)`` in B's LAN pool.

    A node of B holds A unreachable once every live bridge of B says so, and
    the last of them says so within the bound.  Symmetrically, the nodes of a
    cut-off A mark every other cluster unreachable (see
    :func:`cut_off_side_bound`).  If A's only bridge crashed, A's own nodes
    mark the others unreachable once they hold that bridge dead: within
    ``detection_bound(n_A, config)`` (the watch runs on bridges only).
    """
    membership = detection_bound(n_bridges, wan_config) + spread_bound(n_asker, config)
    return min(membership, watch_unreachable_bound(n_asker, config, watch))


def watch_verdict_time(watch: WatchConfig | None = None) -> float:
    """Seconds from the loss of cluster A until a bridge's watch holds it unreachable.

    Every round sent after the loss goes unanswered; one sent just before it
    may still be answered (its ack was on the way), which resets the count.
    The first round after the loss starts within one ``interval``, the
    ``misses``-th one ``(misses - 1) * interval`` later, and it counts as
    missed at its ``timeout``: at most ``misses * interval + timeout``
    (6 + 1 = 7 s by default; 6.75 s on average over the phase).  Acks are
    assumed to take less than ``timeout`` (else a live cluster's rounds
    would count as missed too: see :func:`watch_false_positive_rate`).
    """
    w = watch or WatchConfig()
    return w.misses * w.interval + w.timeout


def watch_unreachable_bound(
    n_asker: int, config: Config, watch: WatchConfig | None = None
) -> float:
    """Seconds within which every node of cluster B holds a lost cluster A
    unreachable through the watch: :func:`watch_verdict_time` at each bridge
    of B (they ping independently, each within it), then the bridge's
    re-signed main document spreads in B's LAN pool (``spread_bound``)."""
    return watch_verdict_time(watch) + spread_bound(n_asker, config)


def watch_round_loss(loss: float, targets: int) -> float:
    """Chance that one watch round goes unanswered while A is alive.

    Each of the ``targets`` live bridges pinged loses the ping or its ack
    with ``q = 1 - (1 - loss)^2`` (independent loss each way), independently
    of the others: the round is lost with ``q ** targets``.  At 10% loss:
    0.19 with one target, 0.036 with two.
    """
    if not 0 <= loss <= 1:
        raise ValueError("loss must be in [0, 1]")
    if targets < 1:
        raise ValueError("a round pings at least one target")
    q = 1 - (1 - loss) ** 2
    return float(q**targets)


def watch_false_positive_rate(
    loss: float, targets: int, watch: WatchConfig | None = None, seconds: float = 86400.0
) -> float:
    """Expected false unreachable verdicts of one bridge about one live cluster
    in ``seconds`` (a day by default), under independent loss ``loss`` each way.

    A verdict needs ``misses`` rounds in a row lost, each with ``r =
    watch_round_loss(loss, targets)``.  A run can start at any of the
    ``seconds / interval`` rounds, so by the union bound the expected count
    is at most ``seconds / interval * r ** misses``.  With the defaults at
    10% loss: 2 targets 8e-13 a day, 1 target (a cluster down to one live
    bridge) 3.8e-4 a day, about once in 7 years.  A node of B is misled only
    when *every* bridge of B is at once (``reach.compute_reach``), which
    with two bridges multiplies in another such factor.  Assumes acks come
    within ``timeout``; a round trip beyond it is a lost round.
    """
    w = watch or WatchConfig()
    r = watch_round_loss(loss, targets)
    return seconds / w.interval * r**w.misses


def cut_off_side_bound(
    n_bridges: int,
    n_lan: int,
    config: Config,
    wan_config: Config,
    watch: WatchConfig | None = None,
) -> float:
    """Seconds within which the nodes of a cut-off cluster mark every other cluster unreachable.

    The watch sees the cut from inside as from outside: no other cluster
    answers its pings, so :func:`watch_unreachable_bound` of the cut-off
    cluster's LAN pool.  Membership alone is slower (below), and the faster
    one bounds it.  Not :func:`unreachable_bound`: ``detection_bound`` assumes most of the pool
    is alive and probes the lost member, so one of them does within about two
    probe intervals.  A cut-off bridge is on the minority side: it (and the
    other bridges of its cluster, cut off with it) must probe every outside
    bridge itself.  Its indirect probes go to outside helpers that never
    answer, and each missing nack raises its Lifeguard local-health score
    (as it should: it cannot tell a cut link from its own sickness) until its
    probe interval is stretched ``awareness_max_multiplier`` times.  So:

    - two round-robin cycles of ``n_bridges - 1`` probes at the stretched
      interval (a member probed just before the cut waits for the next cycle);
    - the suspicion ceiling (no confirmation comes from outside), held as
      long again per point of the same local-health score
      (``Suspicion.expire``: a sick node holds its own verdicts);
    - the death notices spread in the WAN pool (among the cut-off bridges)
      and the bridge's restated main document in its LAN pool.
    """
    cfg = wan_config
    stretch = cfg.awareness_max_multiplier if cfg.lifeguard else 1
    lo = suspicion_min(cfg.suspicion_mult, n_bridges, cfg.probe_interval)
    hi = suspicion_max(lo, cfg.suspicion_max_timeout_mult) if cfg.lifeguard else lo
    cycles = 2 * max(n_bridges - 1, 1) * cfg.probe_interval * stretch
    membership = cycles + hi * stretch + spread_bound(n_bridges, cfg) + spread_bound(n_lan, config)
    return min(membership, watch_unreachable_bound(n_lan, config, watch))


def cross_cluster_repair_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Like :func:`cross_cluster_spread_bound`, but for a document that gossip
    missed (published while its way out was cut): each of the three hops is
    ``bounds.repair_bound`` (the next digest sync, then an epidemic)."""
    return (
        repair_bound(n_origin, config)
        + repair_bound(n_bridges, wan_config)
        + repair_bound(n_asker, config)
    )


def heal_bound(
    n_origin: int, n_bridges: int, n_asker: int, config: Config, wan_config: Config
) -> float:
    """Seconds after a cut-off cluster's links heal until the mesh converges again.

    Both sides hold the other's bridges dead and never probe them, so the
    first contact is a reconnect attempt (every ``reconnect_interval`` of the
    WAN config, the first after up to 1.5 of it, so two intervals), after
    which member claims and missed documents flow by anti-entropy:
    :func:`cross_cluster_repair_bound`.
    """
    return 2 * wan_config.reconnect_interval + cross_cluster_repair_bound(
        n_origin, n_bridges, n_asker, config, wan_config
    )
