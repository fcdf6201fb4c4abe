"""Cluster watch: can this bridge reach cluster C right now?  A routing verdict.

Membership death in the WAN pool is slow on purpose (a probe every 5 s, a
suspicion of 30 s to 180 s): a false death costs a refutation war.  Whether
to send askers to another cluster is a different question, cheap to undo, so
a bridge answers it on its own, fast, and takes it back at the first sign of
life:

- Every ``interval`` seconds a round: for each other cluster C the bridge
  knows bridges of (at most :data:`MAX_WATCHED_CLUSTERS`), one plain ``Ping``
  from its WAN core to each of up to :data:`MAX_TARGETS` bridges of C that
  its membership view holds alive or suspect (a cluster with none is
  unreachable by membership already).
- A round is *answered* when an ``Ack`` for one of its pings comes back from
  the very bridge that ping went to, within ``timeout``.
- C is unreachable once ``misses`` rounds in a row went unanswered, and
  reachable again at the first answered ping.  An ack that comes after its
  round's timeout (up to :data:`LATE_ACK_WINDOW`) still proves C alive: it
  resets the count too, so a link slower than ``timeout`` makes no verdict
  rather than a false one.

Why that cannot be forged: only acks of our own pings count, matched by
their sequence number *and* by the acker being the member we pinged (the
transport authenticates the sender; a peer's claim about a third cluster is
never read).  A bridge that cannot reach anyone (its own link is cut) holds
every other cluster unreachable, which is true from where it stands; a node
holds C unreachable only when every bridge of its own cluster says so
(``reach.compute_reach``), so one sick bridge does not move its cluster.  A
driver that was paused sends no rounds while paused and so counts no misses
for that time: on waking, at most the rounds in flight expire
(``ceil(timeout / interval)``, well below ``misses``).

The time to the verdict and its false-positive rate under loss are derived
in :func:`meshd.protocol.bounds.watch_unreachable_bound` and
:func:`meshd.protocol.bounds.watch_false_positive_rate`.

Sans-IO like the core: :meth:`ClusterWatch.tick` returns the pings to send,
:meth:`ClusterWatch.on_ack` takes what came back, both take ``now``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from meshd.wire import Ping

#: Most clusters one bridge watches: a round costs a ping per target, so the
#: cap bounds the bridge's sending rate whatever the WAN pool holds.
MAX_WATCHED_CLUSTERS = 64
#: Most bridges of one cluster pinged per round.  Two live ones already make
#: a lost round as rare as two lost round trips; more only cost traffic.
MAX_TARGETS = 3
#: Sequence numbers of watch pings live in the upper half of the 32-bit space.
#: The prober counts up from 0 one probe a second, so it never reaches this
#: half and an ack of ours is never taken for an ack of its probe.
SEQ_BASE = 1 << 31
#: Seconds an ack is still taken after its round timed out (it no longer
#: makes the round answered, but proves the cluster alive).  Bounds what is
#: remembered: rounds of this many seconds, at most clusters x targets each.
LATE_ACK_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class WatchConfig:
    """Timing of the cluster watch (see module doc and bounds.py for the figures)."""

    #: Seconds between rounds.  Shorter makes the verdict both faster and
    #: safer (more rounds in the same silence); 0.5 s costs 2 pings a second
    #: per target, about 200 bytes/s each way.
    interval: float = 0.5
    #: Seconds a ping's ack may take.  Far WAN links run 100-300 ms round
    #: trips; 1 s leaves room for a congested one without stretching the
    #: verdict much (it adds to it once, not per round).
    timeout: float = 1.0
    #: Unanswered rounds in a row before a cluster is unreachable: 12 rounds of
    #: 0.5 s is 6 s of silence, and under 10% loss each way with a single live
    #: target the chance of 12 lost round trips in a row is 0.19^12 = 2.2e-9
    #: (see bounds.watch_false_positive_rate).
    misses: int = 12

    def __post_init__(self) -> None:
        if not (self.interval > 0 and self.timeout > 0):
            raise ValueError("interval and timeout must be positive")
        if self.misses < 1:
            raise ValueError("misses must be at least 1")
        if math.ceil(self.timeout / self.interval) >= self.misses:
            raise ValueError(
                "misses must exceed the rounds in flight (timeout / interval), "
                "or a paused driver would mark clusters unreachable on waking"
            )


@dataclass(slots=True)
class _Round:
    cluster: str
    deadline: float
    answered: bool = False
    seqs: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Watched:
    #: Unanswered rounds in a row (reset by any answered ping).
    misses: int = 0
    unreachable: bool = False
    last_ack: float = -math.inf


class ClusterWatch:
    """The watch of one bridge (see module doc)."""

    def __init__(
        self, member: str, address: str, now: float, config: WatchConfig | None = None
    ) -> None:
        self.member = member
        self.address = address
        self.config = config or WatchConfig()
        self.next_round = now + self.config.interval
        self._seq = 0
        self._clusters: dict[str, _Watched] = {}
        #: Rounds in flight, oldest first (deadlines grow: one timeout each).
        self._rounds: deque[_Round] = deque()
        #: seq -> (round, member pinged).  At most clusters x targets x rounds
        #: in flight entries: the rounds expire at their deadline.
        self._pending: dict[int, tuple[_Round, str]] = {}
        #: Pings of timed-out rounds, still taken as a sign of life:
        #: seq -> (cluster, member pinged), forgotten LATE_ACK_WINDOW after
        #: their round timed out (oldest first in ``_late_order``).
        self._late: dict[int, tuple[str, str]] = {}
        self._late_order: deque[tuple[float, list[int]]] = deque()
        #: Acks that matched nothing or came from the wrong member.
        self.ignored = 0
        #: Rounds that timed out unanswered (loss, or a lost cluster).
        self.missed = 0
        #: Times a cluster went from reachable to unreachable here: a lost
        #: cluster, or (what an operator alerts on) a healthy one behind loss.
        self.lost = 0

    def deadline(self) -> float:
        t = self.next_round
        if self._rounds and self._rounds[0].deadline < t:
            t = self._rounds[0].deadline
        return t

    def unreachable(self) -> set[str]:
        """The clusters this bridge holds unreachable now."""
        return {c for c, w in self._clusters.items() if w.unreachable}

    def tick(
        self, now: float, targets: Mapping[str, Sequence[tuple[str, str]]]
    ) -> tuple[list[tuple[str, Ping]], bool]:
        """Expire rounds past their deadline, start a round when due.

        ``targets``: cluster -> ``(member, address)`` of its bridges, in order
        of preference (the bridge builds it from its WAN view).  Returns the
        pings to send (address, message) and whether the verdicts changed.
        """
        changed = self._expire(now)
        out: list[tuple[str, Ping]] = []
        if now < self.next_round:
            return out, changed
        # No catching up after a pause: one round now, the next an interval on.
        self.next_round = now + self.config.interval
        watched = sorted(targets)[:MAX_WATCHED_CLUSTERS]
        for gone in [c for c in self._clusters if c not in targets or c not in watched]:
            # No bridge of it left in our view (all left or reaped): membership
            # speaks for it now; forget our verdict.
            changed |= self._clusters.pop(gone).unreachable
        for cluster in watched:
            self._clusters.setdefault(cluster, _Watched())
            rnd = _Round(cluster, now + self.config.timeout)
            for member, address in targets[cluster][:MAX_TARGETS]:
                seq = self._next_seq()
                rnd.seqs.append(seq)
                self._pending[seq] = (rnd, member)
                out.append(
                    (address, Ping(self.member, seq=seq, source_addr=self.address, target=member))
                )
            if rnd.seqs:
                self._rounds.append(rnd)
        return out, changed

    def on_ack(self, source: str, seq: int, now: float) -> bool:
        """An ack arrived from ``source`` (authenticated by the transport).
        True when it made a cluster reachable again."""
        hit = self._pending.get(seq)
        if hit is not None and hit[1] == source:
            rnd = hit[0]
            for s in rnd.seqs:
                self._pending.pop(s, None)
            rnd.answered = True
            cluster = rnd.cluster
        else:
            late = self._late.get(seq)
            if late is None or late[1] != source or hit is not None:
                # Not ours (a probe's ack) or from someone we did not ping: a
                # peer cannot speak for another bridge, so it is not evidence.
                if seq >= SEQ_BASE:
                    self.ignored += 1
                return False
            del self._late[seq]
            cluster = late[0]
        w = self._clusters.get(cluster)
        if w is None:
            return False
        w.misses = 0
        w.last_ack = now
        if w.unreachable:
            w.unreachable = False
            return True
        return False

    def _expire(self, now: float) -> bool:
        changed = False
        late = self._late_order
        while late and late[0][0] <= now:
            for s in late.popleft()[1]:
                self._late.pop(s, None)
        rounds = self._rounds
        while rounds and rounds[0].deadline <= now:
            rnd = rounds.popleft()
            kept = []
            for s in rnd.seqs:
                hit = self._pending.pop(s, None)
                if hit is not None and not rnd.answered:
                    self._late[s] = (rnd.cluster, hit[1])
                    kept.append(s)
            if kept:
                late.append((rnd.deadline + LATE_ACK_WINDOW, kept))
            w = self._clusters.get(rnd.cluster)
            if w is None or rnd.answered:
                continue
            self.missed += 1
            w.misses += 1
            if w.misses >= self.config.misses and not w.unreachable:
                w.unreachable = True
                self.lost += 1
                changed = True
        return changed

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % SEQ_BASE
        return SEQ_BASE + self._seq
