"""Suspicion timing (Lifeguard, part two).

A suspected member is declared dead when its suspicion timer runs out.  The
timer starts at ``max`` and shrinks towards ``min`` as independent members
confirm the suspicion: one accuser may be the sick one, several agreeing are
unlikely to be.  The curve is logarithmic (memberlist ``suspicion.go``)::

    timeout(c) = max(min, max - log(c + 1) / log(k + 1) * (max - min))

with ``c`` confirmations so far and ``k`` the number expected.  Without
Lifeguard the timer is a fixed ``min``.

Our own local health (Lifeguard's awareness score) stretches the timer at
its end: a node whose own probes are failing holds its verdict up to
``score + 1`` times the timeout, since it may be the slow one and hear the
member's refutation late (``Suspicion.expire``).

One more input caps the timer from above: our own transport's observation
that nobody listens at the member's address any more (a refused connect, see
``Core.report_refused``).  ``Suspicion.refused`` takes it and asks for a
verdict ``bounds.refused_suspicion_timeout`` later; at that deadline
``Suspicion.expire`` wants the refusal fresh (or one more check), so a process
that restarted on the same address in the meantime falls back to the
ordinary timeout and refutes.
"""

from __future__ import annotations

import math
from typing import Literal


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

    A suspicion learnt from a full member list has no named accuser
    (``first_by`` None): a list says what its sender holds, not who saw the
    member fail, so it confirms nothing, and the first named accuser heard
    afterwards is the suspicion's origin, not a confirmation of it.
    """

    __slots__ = (
        "start",
        "k",
        "min_t",
        "max_t",
        "_accusers",
        "_relays",
        "ceiling",
        "refused_at",
        "recheck_until",
        "recheck_from",
        "deadline",
    )

    def __init__(
        self,
        start: float,
        first_by: str | None,
        k: int,
        min_t: float,
        max_t: float,
        via: str | None = None,
    ) -> None:
        self.start = start
        self.k = k
        self.min_t = min_t
        self.max_t = max_t
        self._accusers = {first_by} if first_by is not None else set()
        self._relays = {via} if via is not None and first_by is not None else set()
        #: The verdict our own evidence asks for (see ``refused``); the
        #: deadline is never later than it.  Infinite while we have none.
        self.ceiling = math.inf
        #: When our own connect to the member was last refused.
        self.refused_at = -math.inf
        #: While the last check before a verdict from our own evidence runs:
        #: when it ends (see ``expire``).
        self.recheck_until: float | None = None
        self.recheck_from = math.inf
        self.deadline = start + suspicion_timeout(0, k, min_t, max_t)

    @property
    def confirmations(self) -> int:
        return max(len(self._accusers) - 1, 0)

    def _formula(self) -> float:
        return self.start + suspicion_timeout(self.confirmations, self.k, self.min_t, self.max_t)

    def confirm(self, by: str, via: str | None = None) -> bool:
        """Count ``by`` once; True when it was new and moved the deadline."""
        if self.confirmations >= self.k or by in self._accusers:
            return False
        if via is not None:
            if via in self._relays:
                return False
            self._relays.add(via)
        self._accusers.add(by)
        self.deadline = min(self.deadline, self._formula())
        return True

    def refused(self, now: float, timeout: float) -> bool:
        """Our own connect to the member was refused at ``now``.

        The first refusal asks for a verdict ``timeout`` later (the ceiling);
        a refusal during the last check (``expire``) asks for it now.  Only
        the driver's own observation calls this, never a peer's word: a peer
        with a valid certificate could otherwise shorten anyone's suspicion.
        True when it brought the deadline earlier.
        """
        self.refused_at = now
        before = self.deadline
        if self.recheck_until is not None:
            self.deadline = min(self.deadline, now)
        elif self.ceiling == math.inf:
            self.ceiling = now + timeout
            self.deadline = min(self.deadline, self.ceiling)
        return self.deadline < before

    def expire(
        self, now: float, grace: float, health: int = 1, step: float = math.inf
    ) -> Literal["dead", "recheck", "wait", "hold"]:
        """What to do at ``now`` >= ``deadline``.

        ``dead`` when the ordinary (Lifeguard) timeout ran out, stretched by
        ``health``, our own local-health multiplier (``Awareness.score + 1``):
        a node whose probes are failing may be the slow one, hearing the
        member's refutation late, and holds its verdict (``hold``) until
        ``start + timeout * health``, looking again every ``step`` seconds
        as its health changes.

        A verdict from our own evidence needs a refusal of a connect made
        *now*: a process that restarted on the same address listens again,
        even if it came back a moment ago, and must get the ordinary time to
        refute.  So the ceiling always ends in ``recheck``: the caller probes
        once more and the deadline moves ``grace`` on; a refusal in that
        window makes it ``dead`` at once (``refused`` brings the deadline to
        now), whatever our health (a kernel's refusal is not our sickness).
        If the window passes without one the ceiling is lifted (``wait``: an
        ordinary suspicion from then on).
        """
        if self.recheck_until is not None and self.refused_at >= self.recheck_from:
            return "dead"
        formula = self._formula()
        if now >= formula:
            held = self.start + (formula - self.start) * health
            if now >= held:
                return "dead"
            self.deadline = min(held, now + step)
            return "hold"
        if self.recheck_until is None:
            self.recheck_from = now
            self.recheck_until = self.deadline = now + grace
            return "recheck"
        self.recheck_until = None
        self.recheck_from = math.inf
        self.ceiling = math.inf
        self.deadline = formula
        return "wait"
