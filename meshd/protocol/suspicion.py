"""Suspicion timing (Lifeguard, part two).

A suspected member is declared dead when its suspicion timer runs out.  The
timer starts at ``max`` and shrinks towards ``min`` as independent members
confirm the suspicion: one accuser may be the sick one, several agreeing are
unlikely to be.  The curve is logarithmic (memberlist ``suspicion.go``)::

    timeout(c) = max(min, max - log(c + 1) / log(k + 1) * (max - min))

with ``c`` confirmations so far and ``k`` the number expected.  Without
Lifeguard the timer is a fixed ``min``.

One more input caps the timer from above: our own transport's observation
that nobody listens at the member's address any more (a refused connect, see
``Core.report_refused``); ``Suspicion.bound`` takes it, and the cap comes from
``bounds.refused_suspicion_timeout``.
"""

from __future__ import annotations

import math


def suspicion_min(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """Floor: ``suspicion_mult * max(1, log10 n) * probe_interval`` (memberlist)."""
    return suspicion_mult * max(1.0, math.log10(max(n, 1))) * probe_interval


def suspicion_max(min_timeout: float, max_timeout_mult: int) -> float:
    return min_timeout * max_timeout_mult


def expected_confirmations(suspicion_mult: int, n: int) -> int:
    """``k``: confirmations we wait for; none in a pool too small to give them."""
    k = suspicion_mult - 2
    return 0 if n - 2 < k else max(k, 0)


def suspicion_timeout(confirmations: int, k: int, min_t: float, max_t: float) -> float:
    """Remaining-time formula of Lifeguard's dynamic suspicion (see module doc)."""
    if k <= 0:
        return min_t
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(min_t, max_t - frac * (max_t - min_t))


class Suspicion:
    """One running suspicion: when it started and who has confirmed it.

    The member that raised it is not a confirmation; each further distinct
    accuser is, up to ``k``.  ``deadline`` is recomputed on every new one.

    An accusation names its accuser (``by``) but is not signed by it, so a
    confirmation also names the peer that delivered it (``via``, known by its
    connection's certificate) and counts only if that peer has not delivered
    one before: a peer holding a valid certificate that invents accusers gets
    one confirmation, not ``k``.  The driver's own evidence (``via`` None,
    e.g. a refused connection) is not limited so.
    """

    __slots__ = ("start", "k", "min_t", "max_t", "_accusers", "_relays", "ceiling", "deadline")

    def __init__(
        self,
        start: float,
        first_by: str,
        k: int,
        min_t: float,
        max_t: float,
        via: str | None = None,
    ) -> None:
        self.start = start
        self.k = k
        self.min_t = min_t
        self.max_t = max_t
        self._accusers = {first_by}
        self._relays = {via} if via is not None else set()
        #: The latest verdict our own evidence allows (see ``bound``); confirmations
        #: only ever bring the deadline earlier than it.
        self.ceiling = math.inf
        self.deadline = start + suspicion_timeout(0, k, min_t, max_t)

    @property
    def confirmations(self) -> int:
        return len(self._accusers) - 1

    def confirm(self, by: str, via: str | None = None) -> bool:
        """Count ``by`` once; True when it was new and moved the deadline."""
        if self.confirmations >= self.k or by in self._accusers:
            return False
        if via is not None:
            if via in self._relays:
                return False
            self._relays.add(via)
        self._accusers.add(by)
        self.deadline = min(
            self.ceiling,
            self.start + suspicion_timeout(self.confirmations, self.k, self.min_t, self.max_t),
        )
        return True

    def bound(self, deadline: float) -> bool:
        """Our own observation (a refused connect): the verdict comes by ``deadline``.

        Only the driver's own evidence calls this, never a peer's word: a peer
        with a valid certificate could otherwise shorten anyone's suspicion.
        True when it moved the deadline earlier.
        """
        if deadline >= self.deadline:
            return False
        self.ceiling = self.deadline = deadline
        return True
