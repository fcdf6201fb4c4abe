"""The retransmit-limited broadcast queue (memberlist ``queue.go``).

Updates ride piggybacked on probes, acks and gossip messages.  Each is sent a
limited number of times, ``retransmit_mult * ceil(log10(n + 1))`` and at
least ``ln((n - 1) / MISS)`` (:func:`retransmit_limit`): enough for an
epidemic to reach every member but once in a thousand updates, few enough
that the queue drains.  The least-sent update goes first (ties: the
newest), so a fresh update overtakes ones that have already spread.  An update about a key (a
member, an origin) replaces any older one about the same key: only the latest
claim is worth bandwidth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sortedcontainers import SortedList

T = TypeVar("T")


#: The chance, per update, that push gossip leaves some member out; that
#: member then waits for a digest sync, seconds (``bounds.repair_bound``).
MISS = 1e-3


def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times each member sends one update in a pool of ``n``.

    memberlist's ``retransmit_mult * ceil(log10(n + 1))``, and at least
    ``ln((n - 1) / MISS)``.  Every member that holds the update sends it
    ``L`` times, each to a member drawn at random among the other ``n - 1``,
    so a given member is missed by all of them with probability
    ``(1 - 1/(n-1))^((n-1) L)``, about ``e^-L``, and some member is missed
    with about ``(n - 1) e^-L``.  memberlist's formula alone makes that 15%
    at 8 members (``L`` = 4) and 2% at 64 (``L`` = 8): one new record or
    death notice in fifty then waited seconds for a sync at some member.
    The floor gives 9 at 8 members and 12 at 64; past a hundred it adds
    one or two sends at the top of each decade, where memberlist's has not
    stepped up yet (13 or 14 from 164 to 999 members, 17 from 8,887 to
    9,999), and nothing elsewhere (16 at 1,000, 20 at 10,000).
    """
    base = retransmit_mult * math.ceil(math.log10(n + 1))
    if n < 2:
        return base
    return max(base, math.ceil(math.log((n - 1) / MISS)))


@dataclass(slots=True)
class _Item(Generic[T]):
    key: str
    value: T
    size: int
    seq: int
    transmits: int = 0

    def order(self) -> tuple[int, int]:
        return (self.transmits, -self.seq)


class BroadcastQueue(Generic[T]):
    """Updates keyed by ``key``; ``take`` fills a byte budget, fewest-sent first."""

    # Slots, as Core's (see there).
    __slots__ = ("_order", "_seq", "_size_of", "items")

    def __init__(self, size_of: Callable[[T], int]) -> None:
        self._size_of = size_of
        #: key -> its queued item.  Read only outside this class (change it
        #: through push, discard and take); the dissemination reads it to tell
        #: an empty queue without a call on every probe and ack.
        self.items: dict[str, _Item[T]] = {}
        self._order: SortedList = SortedList(key=_Item.order)
        self._seq = 0

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def push(self, key: str, value: T) -> None:
        """Queue ``value``, replacing whatever was queued about ``key``."""
        old = self.items.pop(key, None)
        if old is not None:
            self._order.remove(old)
        self._seq += 1
        item = _Item(key, value, self._size_of(value), self._seq)
        self.items[key] = item
        self._order.add(item)

    def discard(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self._order.remove(old)

    def take(self, budget: int, limit: int, accept: Callable[[T], bool] | None = None) -> list[T]:
        """Pick updates fitting ``budget`` bytes; each pick counts as one send.

        An update bigger than the whole budget still goes out alone when
        nothing else was picked, so no update is stuck forever (frames carry
        up to a MiB; the budget shapes messages, it is not a hard cap).
        ``accept`` filters by destination (export rules): a refused update is
        neither sent nor counted.
        """
        picked: list[_Item[T]] = []
        used = 0
        for item in self._order:
            if accept is not None and not accept(item.value):
                continue  # not for this destination; stays queued for others
            if used + item.size <= budget or (not picked and item.size > budget):
                picked.append(item)
                used += item.size
                if used >= budget:
                    break
        for item in picked:
            self._order.remove(item)
            item.transmits += 1
            if item.transmits >= limit:
                del self.items[item.key]
            else:
                self._order.add(item)
        return [item.value for item in picked]

    def values(self) -> list[T]:
        return [item.value for item in self._order]
