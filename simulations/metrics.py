"""What a run measures: pure functions over times and counts, and the collectors
that gather those times from the cores' events.

The collectors are harness observers (``Cluster.observers``): called as
``collector(index, event, now)`` for every event a LAN core emits, so every
time they record is exact (the virtual time of the event), not sampled.

- Convergence: a record published on one node; per node that may hold it,
  the time until its core says it holds that version (``OriginChanged``).
- Detection: a node crashed; per node of its cluster still running, the time
  until its core holds it dead (``MemberChanged`` to dead).
- False deaths: a dead verdict about a node that is running (paused counts as
  running: a stopped process that comes back) about its current life (at an
  incarnation at least the one it restarted with; refutations raise it), and
  not cut off from the observer by a partition (those are counted apart).
- Failover: for an app with a failover order, per asker (a node of a cluster
  where the app does not run) which copy its lookup puts first after every
  event that can change it; the timeline is the share of askers on each.
- False unreachables: each time a node starts holding a cluster unreachable
  (what its lookups read, ``reach.compute_reach``) that is not lost from it:
  some running bridge of the node's cluster and some running bridge of that
  cluster can still exchange messages.  Checked on every change of a
  bridge's document of the node's own cluster (the only thing that moves the
  verdict), so exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from meshd.protocol.events import Event, MemberChanged, OriginChanged
from meshd.wire import Status, doc_member

# ----------------------------------------------------------------------
# Pure functions


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of an ascending sequence (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("no values")
    k = max(0, min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def summary(values: Iterable[float], digits: int = 4) -> dict[str, float | int | None]:
    """``{p50, p99, max, count}`` (None when there are no values)."""
    vals = sorted(values)
    if not vals:
        return {"p50": None, "p99": None, "max": None, "count": 0}
    return {
        "p50": round(quantile(vals, 0.5), digits),
        "p99": round(quantile(vals, 0.99), digits),
        "max": round(vals[-1], digits),
        "count": len(vals),
    }


def push_gossip_curve(
    n: int, fanout: int, interval: float, rounds: int
) -> list[tuple[float, float]]:
    """Expected informed fraction of ``n`` nodes under push gossip, round by round.

    Mean field: each informed node sends to ``fanout`` nodes drawn at random
    every ``interval``; an uninformed node escapes all ``x*n*fanout`` sends
    with probability ``(1 - 1/(n-1))^(x*n*fanout) ~ exp(-fanout*x*n/(n-1))``,
    so ``x' = 1 - (1 - x) * exp(-fanout * x * n / (n - 1))``, from ``x0 = 1/n``.
    A newly informed node sends first one interval later (meshd's gossip
    timer), so round k is at ``k * interval``.
    """
    if n < 2:
        return [(0.0, 1.0)]
    x = 1.0 / n
    out = [(0.0, x)]
    for k in range(1, rounds + 1):
        x = 1.0 - (1.0 - x) * math.exp(-fanout * x * n / (n - 1))
        out.append((k * interval, x))
    return out


def fraction_reached(times: Sequence[float], total: int, t: float) -> float:
    """Share of ``total`` nodes (the origin counted as reached at 0) reached by ``t``."""
    if total <= 0:
        return 0.0
    return (1 + sum(1 for x in times if x <= t)) / total


def per_node_rate(count: float, nodes: float, seconds: float) -> float:
    """Count per node per second (0 when there is no time or no node)."""
    if nodes <= 0 or seconds <= 0:
        return 0.0
    return count / nodes / seconds


def cdf_points(values: Iterable[float]) -> list[tuple[float, float]]:
    """(value, fraction <= value) steps of the empirical CDF."""
    vals = sorted(values)
    n = len(vals)
    return [(v, (i + 1) / n) for i, v in enumerate(vals)]


def timeline_shares(
    transitions: Sequence[tuple[float, int, str]],
    states: Sequence[str],
    start: float,
    end: float,
    step: float,
) -> dict[str, list[float]]:
    """Share of subjects in each state at ``start, start+step, ... <= end``.

    ``transitions`` are ``(time, subject, state)`` in time order; a subject's
    first transition gives its initial state.  Returns ``{"t": [...], state: [...]}``.
    """
    current: dict[int, str] = {}
    out: dict[str, list[float]] = {"t": []}
    for s in states:
        out[s] = []
    k = 0
    steps = int(math.floor((end - start) / step + 1e-9)) + 1
    for j in range(steps):
        t = start + j * step
        while k < len(transitions) and transitions[k][0] <= t:
            _, subject, state = transitions[k]
            current[subject] = state
            k += 1
        total = len(current) or 1
        out["t"].append(round(t - start, 6))
        counts = {s: 0 for s in states}
        for state in current.values():
            counts[state] = counts.get(state, 0) + 1
        for s in states:
            out[s].append(round(counts[s] / total, 6))
    return out


# ----------------------------------------------------------------------
# Collectors


@dataclass
class Spread:
    """One published record: who must hold it, and when each first did."""

    origin: str
    version: int
    start: float
    node: int
    pending: set[int]
    total: int
    times: dict[int, float] = field(default_factory=dict)


@dataclass
class Detection:
    """One crash: who must hold the victim dead, and when each first did."""

    victim: int
    member: str
    start: float
    pending: set[int]
    times: dict[int, float] = field(default_factory=dict)
    aborted: bool = False  # restarted before every observer saw it dead


@dataclass
class FailoverWatch:
    app: str
    primary: str
    secondary: str
    policy: tuple[str, ...]  # the failover order the askers' lookups use
    askers: list[int]
    relevant: set[str]  # member ids whose documents can change the answer
    state: dict[int, str] = field(default_factory=dict)
    transitions: list[tuple[float, int, str]] = field(default_factory=list)


FAILOVER_STATES = ("primary", "failover", "other", "stale", "none")


class Collector:
    """The observer the engine registers; see the module doc for what it records.

    ``is_down(i)`` tells whether node ``i`` is crashed (or gone after leaving);
    ``life_start(i)`` the incarnation its current life started at (a verdict
    at a lower one is about a life before a restart); ``index_of`` maps member
    ids to node indices; ``classify(asker, watch)`` evaluates one lookup.
    """

    def __init__(
        self,
        index_of: dict[str, int],
        is_down: Callable[[int], bool],
        life_start: Callable[[int], int],
        classify: Callable[[int, FailoverWatch], str],
        separated: Callable[[int, int], bool] = lambda a, b: False,
        degraded: Callable[[int], bool] = lambda i: False,
        lagging: Callable[[int], bool] = lambda i: False,
    ) -> None:
        self.index_of = index_of
        self.is_down = is_down
        self.life_start = life_start
        self.classify = classify
        self.separated = separated
        self.degraded = degraded
        self.lagging = lagging
        #: False deaths whose subject was neither paused nor slow at the time,
        #: nor lagging (``Network.lags``: back to normal speed less than its
        #: delay ago, so what was sent to it while slow is still on its way).
        self.false_deaths_healthy = 0
        #: False deaths about a lagging node (counted apart, not as healthy).
        self.false_deaths_lagging = 0
        #: Dead verdicts across an active partition: right from where the
        #: observer stands, so not counted as false deaths.
        self.partition_deaths = 0
        #: Suspect verdicts about running nodes: the precursor of a false
        #: death (refuted in time, each costs a round of gossip).
        self.false_suspicions = 0
        self.spreads: list[Spread] = []
        self._open_spreads: dict[str, list[Spread]] = {}
        self.detections: list[Detection] = []
        self._open_detections: dict[str, Detection] = {}
        self.false_deaths = 0
        self.false_death_subjects: set[str] = set()
        self.false_death_times: list[float] = []
        self.watches: list[FailoverWatch] = []
        self._relevant: set[str] = set()
        self.origin = 0.0  # start of the measured window
        #: Set by the engine for runs with bridges: member id -> cluster of
        #: every bridge, and ``reach(i)``: (clusters node i holds unreachable,
        #: those of them that are not lost from it).
        self.bridge_clusters: dict[str, str] = {}
        self.cluster_of: Callable[[int], str] | None = None
        self.reach: Callable[[int], tuple[frozenset[str], frozenset[str]]] | None = None
        self._held: dict[int, frozenset[str]] = {}
        #: Verdicts "cluster C unreachable" taken while C was not lost.
        self.false_unreachable = 0
        self.false_unreachable_clusters: set[str] = set()
        self.false_unreachable_times: list[float] = []

    # -- registration ---------------------------------------------------

    def watch_spread(self, spread: Spread) -> None:
        self.spreads.append(spread)
        if spread.pending:
            self._open_spreads.setdefault(spread.origin, []).append(spread)

    def watch_detection(self, det: Detection) -> None:
        old = self._open_detections.pop(det.member, None)
        if old is not None:
            old.aborted = True
        self.detections.append(det)
        if det.pending:
            self._open_detections[det.member] = det

    def watch_failover(self, watch: FailoverWatch, now: float) -> None:
        self.watches.append(watch)
        self._relevant |= watch.relevant
        for a in watch.askers:
            self.check_failover(watch, a, now)

    # -- lifecycle notices from the engine --------------------------------

    def node_down(self, i: int) -> None:
        """Node ``i`` crashed or left: stop waiting for it as an observer."""
        for spreads in self._open_spreads.values():
            for s in spreads:
                s.pending.discard(i)
        for d in self._open_detections.values():
            d.pending.discard(i)
        self._close_finished()

    def node_up(self, i: int, member: str) -> None:
        """Node ``i`` restarted: a detection of its previous life ends unfinished."""
        det = self._open_detections.pop(member, None)
        if det is not None:
            det.aborted = True

    def _close_finished(self) -> None:
        for origin in [o for o, ss in self._open_spreads.items() if not any(s.pending for s in ss)]:
            del self._open_spreads[origin]
        for m in [m for m, d in self._open_detections.items() if not d.pending]:
            del self._open_detections[m]

    # -- the observer -----------------------------------------------------

    def __call__(self, i: int, e: Event, now: float) -> None:
        if type(e) is OriginChanged:
            spreads = self._open_spreads.get(e.origin)
            if spreads is not None:
                self._on_origin(spreads, e, i, now)
            if self._relevant and doc_member(e.origin) in self._relevant:
                for w in self.watches:
                    if i in w.state:
                        self.check_failover(w, i, now)
            if self.reach is not None:
                cluster = self.bridge_clusters.get(doc_member(e.origin))
                owner = self.cluster_of
                if cluster is not None and owner is not None and cluster == owner(i):
                    self.check_unreachable(i, now)
        elif type(e) is MemberChanged:
            if e.status is Status.DEAD:
                self._on_dead(i, e, now)
            elif e.status is Status.SUSPECT:
                self._on_suspect(i, e)

    def _on_origin(self, spreads: list[Spread], e: OriginChanged, i: int, now: float) -> None:
        for s in spreads:
            if i in s.pending and e.version >= s.version:
                s.pending.discard(i)
                s.times[i] = now - s.start
        if not any(s.pending for s in spreads):
            del self._open_spreads[e.origin]

    def _on_dead(self, i: int, e: MemberChanged, now: float) -> None:
        det = self._open_detections.get(e.member)
        if det is not None and i in det.pending:
            det.pending.discard(i)
            det.times[i] = now - det.start
            if not det.pending:
                del self._open_detections[e.member]
        subject = self.index_of.get(e.member)
        if subject is None or self.is_down(subject):
            return
        if self.separated(i, subject):
            self.partition_deaths += 1
            return
        if e.incarnation >= self.life_start(subject):
            self.false_deaths += 1
            if self.lagging(subject):
                self.false_deaths_lagging += 1
            elif not self.degraded(subject):
                self.false_deaths_healthy += 1
            self.false_death_subjects.add(e.member)
            self.false_death_times.append(round(now - self.origin, 6))

    def _on_suspect(self, i: int, e: MemberChanged) -> None:
        subject = self.index_of.get(e.member)
        if subject is None or self.is_down(subject) or self.separated(i, subject):
            return
        if e.incarnation >= self.life_start(subject):
            self.false_suspicions += 1

    def check_unreachable(self, i: int, now: float) -> None:
        """Count the clusters node ``i`` newly holds unreachable while they are not lost."""
        assert self.reach is not None
        if self.is_down(i):
            return
        held, wrong = self.reach(i)
        new = held - self._held.get(i, frozenset())
        self._held[i] = held
        for c in sorted(new & wrong):
            self.false_unreachable += 1
            self.false_unreachable_clusters.add(c)
            if len(self.false_unreachable_times) < 1000:
                self.false_unreachable_times.append(round(now - self.origin, 6))

    def check_failover(self, w: FailoverWatch, asker: int, now: float) -> None:
        if self.is_down(asker):
            return
        state = self.classify(asker, w)
        if w.state.get(asker) != state:
            w.state[asker] = state
            w.transitions.append((now, asker, state))


def failover_times(w: FailoverWatch, since: float) -> list[float]:
    """Per asker, seconds from ``since`` until it first put the secondary first."""
    first: dict[int, float] = {}
    for t, a, state in w.transitions:
        if t >= since and state == "failover" and a not in first:
            first[a] = t - since
    return sorted(first.values())


def stale_seconds(w: FailoverWatch, since: float, end: float) -> list[float]:
    """Per asker, seconds after ``since`` spent answering with a lost copy first."""
    out: dict[int, float] = {}
    opened: dict[int, float] = {}
    for t, a, state in w.transitions:
        if state == "stale":
            opened.setdefault(a, max(t, since))
        elif a in opened:
            start = opened.pop(a)
            if t > since:
                out[a] = out.get(a, 0.0) + t - start
    for a, start in opened.items():
        out[a] = out.get(a, 0.0) + end - start
    return sorted(out.values())
