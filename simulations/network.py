"""The modelled network: per-message latency, loss, burst loss, partitions.

Everything is drawn from one ``random.Random`` owned by the model, in the
order the driver asks, so a run is a pure function of the scenario and the
seed.  The model knows nodes only as indices and each node's cluster, which
is all it needs:

- Latency: one distribution for links inside a cluster (LAN), one for links
  between clusters (WAN), and optional per-cluster-pair WAN distributions
  (``wan_pairs``, unordered).  Each message draws its own delay, so messages
  on one link may overtake each other, as datagrams and separate TCP
  connections do.
- Independent loss: each message is lost with probability ``loss``.
- Burst loss (Gilbert-Elliott): a two-state Markov chain, good and bad, in
  continuous time (state durations exponential with means ``mean_good_s`` and
  ``mean_bad_s``), each state with its own loss probability.  One chain per
  sending node (``scope = "node"``: a congested uplink) or per directed link
  (``scope = "link"``).  The chain is advanced lazily to the time of each
  message, so idle links cost nothing.  Long-run loss is
  ``(mean_good * loss_good + mean_bad * loss_bad) / (mean_good + mean_bad)``.
- Partitions: rules between two sets of nodes or two sets of clusters, one
  way or both; ``heal`` removes them all.
- Slow nodes: a fixed extra delay on every message a node sends or receives
  (an overloaded process whose queues back up while its timers keep firing,
  the case Lifeguard's local health is for).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# ----------------------------------------------------------------------
# Latency distributions (seconds)


@dataclass(frozen=True, slots=True)
class Fixed:
    seconds: float

    def draw(self, rng: random.Random) -> float:
        return self.seconds

    @property
    def median(self) -> float:
        return self.seconds


@dataclass(frozen=True, slots=True)
class Uniform:
    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError("uniform latency needs 0 <= lo <= hi")

    def draw(self, rng: random.Random) -> float:
        return rng.uniform(self.lo, self.hi)

    @property
    def median(self) -> float:
        return (self.lo + self.hi) / 2


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Median ``median_s``, shape ``sigma`` (of the underlying normal), never below ``floor_s``.

    Network delays are right-skewed: most messages near the median, a long
    tail of slow ones; a log-normal is the usual fit.  ``cap_s`` bounds the
    tail so that one unlucky draw cannot stall a scenario.
    """

    median_s: float
    sigma: float
    floor_s: float = 0.0
    cap_s: float = math.inf

    def __post_init__(self) -> None:
        if self.median_s <= 0 or self.sigma < 0 or self.floor_s < 0 or self.cap_s < self.floor_s:
            raise ValueError("log-normal latency needs median > 0, sigma >= 0, floor <= cap")

    def draw(self, rng: random.Random) -> float:
        x = self.median_s * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        # min(max(x, floor), cap) without two calls: drawn for every message.
        if x < self.floor_s:
            return self.floor_s
        return self.cap_s if x > self.cap_s else x

    @property
    def median(self) -> float:
        return min(max(self.median_s, self.floor_s), self.cap_s)


Distribution = Fixed | Uniform | LogNormal


# ----------------------------------------------------------------------
# Burst loss


@dataclass(frozen=True, slots=True)
class BurstLoss:
    """Gilbert-Elliott parameters (continuous time)."""

    mean_good_s: float
    mean_bad_s: float
    loss_good: float = 0.0
    loss_bad: float = 1.0
    scope: str = "node"  # "node" (per sender) or "link" (per directed pair)

    def __post_init__(self) -> None:
        if self.mean_good_s <= 0 or self.mean_bad_s <= 0:
            raise ValueError("burst loss state durations must be positive")
        if not (0 <= self.loss_good <= 1 and 0 <= self.loss_bad <= 1):
            raise ValueError("burst loss probabilities must be in [0, 1]")
        if self.scope not in ("node", "link"):
            raise ValueError("burst loss scope must be 'node' or 'link'")

    @property
    def bad_fraction(self) -> float:
        """Long-run fraction of time in the bad state."""
        return self.mean_bad_s / (self.mean_good_s + self.mean_bad_s)

    @property
    def mean_loss(self) -> float:
        b = self.bad_fraction
        return (1 - b) * self.loss_good + b * self.loss_bad


class _Chain:
    """One Gilbert-Elliott chain: the current state and when it next flips."""

    __slots__ = ("bad", "until")

    def __init__(self, bad: bool, until: float) -> None:
        self.bad = bad
        self.until = until


# ----------------------------------------------------------------------
# Partitions


@dataclass(frozen=True, slots=True)
class Partition:
    """Messages from a node of ``a`` to a node of ``b`` are dropped (and back unless one-way).

    ``a`` and ``b`` are node indices, or cluster indices when ``clusters``.
    """

    a: frozenset[int]
    b: frozenset[int]
    one_way: bool = False
    clusters: bool = False

    def blocks(self, src: int, dst: int, src_c: int, dst_c: int) -> bool:
        x, y = (src_c, dst_c) if self.clusters else (src, dst)
        if x in self.a and y in self.b:
            return True
        return not self.one_way and x in self.b and y in self.a


# ----------------------------------------------------------------------
# The model


class Network:
    """Decides, per message, whether it is lost and how long it takes.

    ``cluster_of`` grows with the nodes (``add_node``); clusters are small
    integers so the per-message work is a few list and dict lookups.
    """

    def __init__(
        self,
        *,
        seed: int | str,
        lan: Distribution,
        wan: Distribution,
        wan_pairs: dict[tuple[str, str], Distribution] | None = None,
        loss: float = 0.0,
        burst: BurstLoss | None = None,
    ) -> None:
        if not 0 <= loss <= 1:
            raise ValueError("loss must be in [0, 1]")
        self.rng = random.Random(f"network/{seed}")
        self.lan = lan
        self.wan = wan
        self._pair_names = dict(wan_pairs or {})
        self.loss = loss
        self.burst = burst
        self.enabled = True  # False: a perfect network (warm-up); latency still drawn
        self.clusters: list[str] = []
        self._cluster_ix: dict[str, int] = {}
        self.cluster_of: list[int] = []
        self._pairs: dict[tuple[int, int], Distribution] = {}
        self._chains: dict[object, _Chain] = {}
        self.partitions: list[Partition] = []
        #: node -> extra seconds on everything it sends and receives (a slow,
        #: overloaded node: its messages sit in queues; its timers still fire).
        self.slow: dict[int, float] = {}
        #: node -> virtual time until which a node that is no longer slow
        #: still lags: what was sent to it or by it while it was slow is on
        #: its way for up to the delay it had (see ``lags``).
        self.lagging: dict[int, float] = {}
        self.lost_independent = 0
        self.lost_burst = 0
        self.lost_partition = 0

    def lags(self, i: int, now: float) -> bool:
        """Node ``i`` is slow, or was until less than its delay ago.

        A node back to normal speed at ``t`` still hears, until ``t + delay``,
        the messages sent to it before ``t`` (a suspicion, say), and its
        answers to them leave only then: to its peers it is as slow as it was
        for one more delay.
        """
        return i in self.slow or self.lagging.get(i, -1.0) > now

    # -- topology -------------------------------------------------------

    def cluster_index(self, name: str) -> int:
        ix = self._cluster_ix.get(name)
        if ix is None:
            ix = self._cluster_ix[name] = len(self.clusters)
            self.clusters.append(name)
            for (a, b), dist in self._pair_names.items():
                if a in self._cluster_ix and b in self._cluster_ix:
                    ia, ib = self._cluster_ix[a], self._cluster_ix[b]
                    self._pairs[(ia, ib)] = self._pairs[(ib, ia)] = dist
        return ix

    def add_node(self, cluster: str) -> int:
        """Register the next node index; returns it."""
        self.cluster_of.append(self.cluster_index(cluster))
        return len(self.cluster_of) - 1

    # -- partitions -----------------------------------------------------

    def partition_nodes(self, a: Iterable[int], b: Iterable[int], one_way: bool = False) -> None:
        self.partitions.append(Partition(frozenset(a), frozenset(b), one_way, clusters=False))

    def partition_clusters(self, a: Iterable[str], b: Iterable[str], one_way: bool = False) -> None:
        ia = frozenset(self.cluster_index(x) for x in a)
        ib = frozenset(self.cluster_index(x) for x in b)
        self.partitions.append(Partition(ia, ib, one_way, clusters=True))

    def heal(self) -> None:
        self.partitions.clear()

    def blocked(self, src: int, dst: int) -> bool:
        if not self.partitions:
            return False
        sc, dc = self.cluster_of[src], self.cluster_of[dst]
        return any(p.blocks(src, dst, sc, dc) for p in self.partitions)

    # -- per message ----------------------------------------------------

    def distribution(self, src: int, dst: int) -> Distribution:
        sc, dc = self.cluster_of[src], self.cluster_of[dst]
        if sc == dc:
            return self.lan
        return self._pairs.get((sc, dc), self.wan)

    def latency(self, src: int, dst: int, rng: random.Random | None = None) -> float:
        """Seconds a message from ``src`` to ``dst`` takes (the harness's Latency signature;
        the harness's generator is ignored: the model draws from its own)."""
        d = self.distribution(src, dst).draw(self.rng)
        if self.slow:
            d += self.slow.get(src, 0.0) + self.slow.get(dst, 0.0)
        return d

    def transit(self, src: int, dst: int, now: float) -> float | None:
        """``lost`` then ``latency`` (the simulator's per-message path): None if
        the message is lost, else the seconds it takes.

        Every message passes here, so the common case (no partition, no loss
        model) is spelled out without the calls; the draws, and their order,
        are exactly those of ``lost`` then ``latency``.
        """
        lossy = self.partitions or (self.enabled and (self.burst is not None or self.loss))
        if lossy and self.lost(src, dst, now):
            return None
        cluster_of = self.cluster_of
        sc, dc = cluster_of[src], cluster_of[dst]
        dist = self.lan if sc == dc else self._pairs.get((sc, dc), self.wan)
        d = dist.draw(self.rng)
        if self.slow:
            d += self.slow.get(src, 0.0) + self.slow.get(dst, 0.0)
        return d

    def lost(self, src: int, dst: int, now: float) -> bool:
        """Is this message lost?  Partitions first, then burst, then independent loss."""
        if self.partitions and self.blocked(src, dst):
            self.lost_partition += 1
            return True
        if not self.enabled:
            return False
        if self.burst is not None and self._burst_lost(src, dst, now):
            self.lost_burst += 1
            return True
        if self.loss and self.rng.random() < self.loss:
            self.lost_independent += 1
            return True
        return False

    def _burst_lost(self, src: int, dst: int, now: float) -> bool:
        b = self.burst
        assert b is not None
        key: object = src if b.scope == "node" else (src, dst)
        chain = self._chains.get(key)
        rng = self.rng
        if chain is None:
            # Start in the stationary distribution, so a run needs no burn-in.
            bad = rng.random() < b.bad_fraction
            mean = b.mean_bad_s if bad else b.mean_good_s
            chain = self._chains[key] = _Chain(bad, now + rng.expovariate(1.0 / mean))
        while chain.until <= now:
            chain.bad = not chain.bad
            mean = b.mean_bad_s if chain.bad else b.mean_good_s
            chain.until += rng.expovariate(1.0 / mean)
        p = b.loss_bad if chain.bad else b.loss_good
        return p > 0 and (p >= 1 or rng.random() < p)

    def in_bad_state(self, key: object) -> bool | None:
        """The burst state of a chain (a sender index, or a (src, dst) pair); None if unseen."""
        chain = self._chains.get(key)
        return None if chain is None else chain.bad


def median_seconds(dists: Sequence[Distribution]) -> float:
    """The largest median among ``dists`` (for stating what a bound assumes)."""
    return max(d.median for d in dists)
