"""Dissemination for one core: what rides on every message, and gossip rounds.

One job of ``Core``.  Membership claims and signed documents wait in two
retransmit-limited queues (``queue.py``) with separate byte budgets, so a
burst of documents cannot starve the claims that keep views right; each
entry goes out about ``retransmit_mult * log10(n + 1)`` times, fewest-sent
first.  They ride on probes, acks and syncs (``piggyback``) and, while
anything waits, on a gossip round to ``gossip_nodes`` random members every
``gossip_interval`` (and to the recently dead, so they hear their death and
refute); when both queues are empty the gossip timer stops.  News of our
own (a document a local client changed) is hurried out at once (``hurry``).
Documents go only where their export lets them (``may_reach``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from meshd.protocol.members import Member
from meshd.protocol.queue import BroadcastQueue, retransmit_limit
from meshd.wire import Gossip, MemberUpdate, SignedState, Status, may_reach

if TYPE_CHECKING:
    from meshd.protocol.core import Core

#: Fraction of ``gossip_interval`` that must pass between two gossip rounds
#: when news is hurried (``Dissemination.hurry``): news of our own (a document
#: we published) goes out at once, yet a burst of it
#: makes at most 1 / HURRY_GAP rounds per interval, ``gossip_nodes`` messages each.
HURRY_GAP = 0.25


class Dissemination:
    """The gossip part of one core (see module doc)."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.member_q: BroadcastQueue[MemberUpdate] = BroadcastQueue(lambda u: u.size)
        self.record_q: BroadcastQueue[SignedState] = BroadcastQueue(lambda s: s.size)
        #: The next gossip round; None while both queues are empty.
        self.next_gossip: float | None = None
        #: When the last round ran (hurry keeps rounds HURRY_GAP apart).
        self.last_round = -math.inf

    def deadline(self) -> float:
        return math.inf if self.next_gossip is None else self.next_gossip

    def tick(self, now: float) -> None:
        if self.next_gossip is not None and now >= self.next_gossip:
            self.gossip_round(now)

    def piggyback(
        self, dest_cluster: str
    ) -> tuple[tuple[MemberUpdate, ...], tuple[SignedState, ...]]:
        member_q, record_q = self.member_q, self.record_q
        if not member_q and not record_q:
            return (), ()  # the usual case on every probe and ack: nothing waits
        cfg = self.core.config
        limit = retransmit_limit(cfg.retransmit_mult, self.core.pool_size)
        members = tuple(member_q.take(cfg.member_budget, limit)) if member_q else ()
        states: tuple[SignedState, ...] = ()
        if record_q:
            states = tuple(
                record_q.take(cfg.record_budget, limit, lambda s: may_reach(s.origin, dest_cluster))
            )
        return members, states

    def wake(self, now: float) -> None:
        if self.next_gossip is None:
            self.next_gossip = now + self.core.config.gossip_interval

    def hurry(self, now: float) -> None:
        """Gossip what is queued now rather than at the next round.

        For news of our own only (a publication a local client asked for): a
        peer's news that we pass on keeps the round's pace.  At most one
        round per ``HURRY_GAP`` of the interval, however often this is
        called, so it costs at most 1 / HURRY_GAP rounds per interval.
        """
        at = max(now, self.last_round + HURRY_GAP * self.core.config.gossip_interval)
        if self.next_gossip is None or at < self.next_gossip:
            self.next_gossip = at

    def gossip_round(self, now: float) -> None:
        cfg = self.core.config
        if not self.member_q and not self.record_q:
            self.next_gossip = None  # idle until something is queued
            return
        self.next_gossip = now + cfg.gossip_interval
        self.last_round = now

        def eligible(m: Member) -> bool:
            if m.id == self.core.id:
                return False
            if m.serving:
                return True
            return m.status is Status.DEAD and now - m.since < cfg.gossip_to_the_dead

        for m in self.core._random_members(cfg.gossip_nodes, eligible):
            members, states = self.piggyback(m.cluster)
            if not members and not states:
                continue
            self.core._send(m.address, Gossip(self.core.id, members=members, states=states))
