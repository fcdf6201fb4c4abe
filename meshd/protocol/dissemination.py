"""Dissemination for one core: what rides on every message, and gossip rounds.

One job of ``Core``.  Membership claims and signed documents wait in two
retransmit-limited queues (``queue.py``) with separate byte budgets, so a
burst of documents cannot starve the claims that keep views right; each
entry goes out about ``retransmit_mult * log10(n + 1)`` times, fewest-sent
first.  They ride on probes, acks and syncs (``piggyback``) and, while
anything waits, on a gossip round to ``gossip_nodes`` random members every
``gossip_interval`` (and to the recently dead, so they hear their death and
refute); when both queues are empty the gossip timer stops.  A new
document (ours, or one we just took from a peer) is hurried out at once
(``hurry``) in a round of its own, documents only: each hop of its epidemic
then costs a message's latency rather than half a gossip interval.
Documents go only where their export lets them (``may_reach``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshd.protocol.members import Member
from meshd.protocol.queue import BroadcastQueue, retransmit_limit
from meshd.wire import Gossip, MemberUpdate, SignedState, Status, may_reach

if TYPE_CHECKING:
    from meshd.protocol.core import Core

#: Fraction of ``gossip_interval`` that must pass between two gossip rounds
#: when news is hurried (``Dissemination.hurry``): a new document goes out
#: at once, yet a burst of them
#: makes at most 1 / HURRY_GAP rounds per interval, ``gossip_nodes`` messages each.
HURRY_GAP = 0.25


class Dissemination:
    """The gossip part of one core (see module doc)."""

    # Slots, as Core's (see there).
    __slots__ = ("core", "last_hurry", "member_q", "next_gossip", "next_hurry", "record_q")

    def __init__(self, core: Core) -> None:
        self.core = core
        self.member_q: BroadcastQueue[MemberUpdate] = BroadcastQueue(lambda u: u.size)
        self.record_q: BroadcastQueue[SignedState] = BroadcastQueue(lambda s: s.size)
        #: The next gossip round; None while both queues are empty.
        self.next_gossip: float | None = None
        #: The next hurried round (new documents only); None when none is due.
        self.next_hurry: float | None = None
        #: When the last hurried round ran (hurry keeps them HURRY_GAP apart).
        self.last_hurry = -math.inf

    def deadline(self) -> float:
        t = math.inf if self.next_gossip is None else self.next_gossip
        if self.next_hurry is not None and self.next_hurry < t:
            t = self.next_hurry
        return t

    def tick(self, now: float) -> None:
        if self.next_hurry is not None and now >= self.next_hurry:
            self.hurried_round(now)
        if self.next_gossip is not None and now >= self.next_gossip:
            self.gossip_round(now)

    def piggyback(self, dest: str) -> tuple[tuple[MemberUpdate, ...], tuple[SignedState, ...]]:
        """What rides on a message to the member ``dest`` (its cluster
        decides which documents may go): claims and documents, fewest-sent first."""
        member_q, record_q = self.member_q, self.record_q
        if not member_q.items and not record_q.items:
            return (), ()  # the usual case on every probe and ack: nothing waits
        cfg = self.core.config
        limit = retransmit_limit(cfg.retransmit_mult, self.core.pool_size)
        members = tuple(member_q.take(cfg.member_budget, limit)) if member_q else ()
        states: tuple[SignedState, ...] = ()
        if record_q:
            states = tuple(
                record_q.take(cfg.record_budget, limit, _exported_to(dest.partition("/")[0]))
            )
        return members, states

    def wake(self, now: float) -> None:
        if self.next_gossip is None:
            self.next_gossip = now + self.core.config.gossip_interval

    def hurry(self, now: float) -> None:
        """Send queued documents now rather than at the next round.

        For new documents (ours, or one a peer just gave us): a hurried
        round carries documents only and leaves the rounds' schedule alone,
        so membership claims, verdicts and refutations keep the tick's pace
        and their retransmissions are not spent in a burst (hurrying them
        went with more false deaths under loss, docs/detection.md).  At most
        one hurried round per ``HURRY_GAP`` of the interval, however often
        this is called: a peer flooding us with documents gets at most
        1 / HURRY_GAP extra rounds per interval out of us.
        """
        if self.next_hurry is None:
            self.next_hurry = max(
                now, self.last_hurry + HURRY_GAP * self.core.config.gossip_interval
            )
        self.wake(now)

    def hurried_round(self, now: float) -> None:
        self.next_hurry = None
        if not self.record_q:
            return
        self.last_hurry = now
        cfg = self.core.config
        limit = retransmit_limit(cfg.retransmit_mult, self.core.pool_size)
        for m in self.core._random_members(
            cfg.gossip_nodes, lambda m: m.serving and m.id != self.core.id
        ):
            states = tuple(self.record_q.take(cfg.record_budget, limit, _exported_to(m.cluster)))
            if states:
                self.core._send(m.address, Gossip(self.core.id, states=states), m.id)

    def gossip_round(self, now: float) -> None:
        cfg = self.core.config
        if not self.member_q and not self.record_q:
            self.next_gossip = None  # idle until something is queued
            return
        self.next_gossip = now + cfg.gossip_interval

        def eligible(m: Member) -> bool:
            if m.id == self.core.id:
                return False
            if m.serving:
                return True
            return m.status is Status.DEAD and now - m.since < cfg.gossip_to_the_dead

        for m in self.core._random_members(cfg.gossip_nodes, eligible):
            members, states = self.piggyback(m.id)
            if not members and not states:
                continue
            self.core._send(m.address, Gossip(self.core.id, members=members, states=states), m.id)


def _exported_to(cluster: str) -> Callable[[SignedState], bool]:
    """The filter of documents a member of ``cluster`` may be sent."""
    return lambda s: may_reach(s.origin, cluster)
