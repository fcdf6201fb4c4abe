"""The inventory's memory of dead nodes: their services stay listed, critical.

A node that dies has its documents tombstoned by the protocol core, so no
lookup routes to it.  A Consul user expects more from a catalog: the dead
node's services stay listed with the node's health check critical (Consul's
``serfHealth``), so an alert on ``up == 0`` fires, until the node comes back,
deregisters them, or a reap interval passes (Consul: 72 h).  The core keeps a
tombstone only as long as the protocol needs it, so the agent remembers here,
from the core's events, what each dead node last published.

What must stay true:

- Only verified documents are remembered (the core's own store entries), so
  a peer cannot plant a service here that it could not publish.
- A node that left gracefully is forgotten at once: leaving is deregistering
  (Consul's ``consul leave``).  Outside our own cluster the member's
  bridges say so (``OriginState.left``, signed with the bridge role).
- A new live version (the node is back, or republished) replaces the memory.
- A record that asked for ``DeregisterCriticalServiceAfter`` is dropped once
  its node has been dead that long; everything else after ``reap_after``.
- Memory is bounded: at most ``MAX_REMEMBERED`` documents, the oldest
  forgotten first.

Pure bookkeeping over the caller's clock: the agent feeds it and reads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from meshd.wire import AppRecord, OriginState, doc_member

#: Consul's default for reaping a node that failed and never came back.
DEFAULT_REAP_AFTER = 72 * 3600.0
#: Documents of dead nodes remembered at most (as many as a store holds origins
#: is far more than any catalog needs; past it the longest dead go first).
MAX_REMEMBERED = 10_000
#: The record meta key that carries Consul's ``DeregisterCriticalServiceAfter``
#: (seconds, a decimal integer), written by the Consul API on registration.
DEREGISTER_AFTER_KEY = "consul.deregister_after"


def deregister_after(record: AppRecord) -> float | None:
    """Seconds after which ``record`` is dropped once critical, if it asked."""
    raw = dict(record.meta).get(DEREGISTER_AFTER_KEY)
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 12:
        return None
    return float(raw)


@dataclass(frozen=True, slots=True)
class Remembered:
    """A dead node's last document and when we learnt it was dead."""

    state: OriginState
    since: float


class DeadNodes:
    """Documents of dead nodes, kept for the inventory (see module doc).

    ``generation`` counts every change of what is listed, reaps included, so
    the agent can fold it into its blocking-query index: a reap wakes
    waiting queries like any other change.  Reaping is driven by
    :attr:`next_deadline`, so nothing scans the memory on every query.
    """

    def __init__(self, reap_after: float = DEFAULT_REAP_AFTER) -> None:
        if not reap_after > 0:
            raise ValueError("the reap interval must be positive")
        self.reap_after = reap_after
        #: origin -> memory, in the order they died (``since`` never falls
        #: along it: an update keeps its place and its time), so the oldest
        #: is always first.
        self._docs: dict[str, Remembered] = {}
        #: Moves whenever what the inventory lists changes.
        self.generation = 0
        #: When :meth:`reap` next has something to do (inf: nothing remembered).
        self.next_deadline = math.inf
        #: The last reap: record deadlines up to it are already accounted for.
        self._reaped_at = -math.inf

    def __len__(self) -> int:
        return len(self._docs)

    def origins(self) -> set[str]:
        return set(self._docs)

    def since(self, origin: str) -> float | None:
        """When ``origin``'s node died (the caller's clock), if remembered."""
        r = self._docs.get(origin)
        return None if r is None else r.since

    def died(self, origin: str, state: OriginState, now: float) -> None:
        """``origin`` was tombstoned because its node is dead (or so a bridge says)."""
        if not state.apps:
            self.forget(origin)
            return
        old = self._docs.get(origin)
        if old is not None and old.state.version >= state.version:
            return
        if old is None and len(self._docs) >= MAX_REMEMBERED:
            del self._docs[next(iter(self._docs))]  # the longest dead goes first
        self._docs[origin] = Remembered(state, old.since if old is not None else now)
        self._changed()

    def forget(self, origin: str) -> None:
        """``origin`` is live again, or gone for good."""
        if self._docs.pop(origin, None) is not None:
            self._changed()

    def left(self, member: str) -> None:
        """``member`` left gracefully: its services are deregistered."""
        for origin in [o for o in self._docs if doc_member(o) == member]:
            self.forget(origin)

    def reap(self, now: float) -> bool:
        """Drop what has been dead past its interval (a whole document after
        ``reap_after``, a record after its own DeregisterCriticalServiceAfter);
        True when anything listed changed."""
        if now < self.next_deadline:
            return False
        for origin in [o for o, r in self._docs.items() if now - r.since >= self.reap_after]:
            del self._docs[origin]
        self._reaped_at = now
        self._changed()
        return True

    def records(self, now: float) -> Iterator[tuple[OriginState, AppRecord]]:
        """Every remembered record still listed at ``now``, in no particular order."""
        for r in self._docs.values():
            dead_for = now - r.since
            if dead_for >= self.reap_after:
                continue
            for rec in r.state.apps:
                limit = deregister_after(rec)
                if limit is None or dead_for < limit:
                    yield r.state, rec

    def _changed(self) -> None:
        self.generation += 1
        after = self._reaped_at
        # The next moment a document or a record leaves the listing: O(n), but
        # only when a node dies, comes back or is reaped, never per query.
        deadline = math.inf
        for r in self._docs.values():
            ends = [r.since + self.reap_after]
            ends += [r.since + lim for rec in r.state.apps if (lim := deregister_after(rec))]
            deadline = min(deadline, *(t for t in ends if t > after), math.inf)
        self.next_deadline = deadline
