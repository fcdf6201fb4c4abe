"""Local health awareness (Lifeguard, part one).

A node that is itself slow (CPU-starved, paused, on a lossy link) sees its
probes fail and would wrongly suspect healthy peers.  Lifeguard keeps a small
score of evidence that *we* are the problem and stretches our own probe
interval and timeout by ``score + 1``: a sick node slows its accusations
instead of spreading them.

Evidence, as in memberlist's ``awareness.go`` and the Lifeguard paper:
a successful probe lowers the score by one; a failed probe raises it by the
number of nacks that helpers owed us but did not send (or by one when no
helper was asked); having to refute a suspicion about ourselves raises it by
one.
"""

from __future__ import annotations


class Awareness:
    """Score in ``[0, max_multiplier - 1]``; timeouts are multiplied by
    ``factor``, ``score + 1``."""

    __slots__ = ("_max", "_score", "factor")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ValueError("max_multiplier must be at least 1")
        self._max = max_multiplier
        self._score = 0
        #: What timeouts are multiplied by: ``score + 1``, kept with the score
        #: (every probe reads it).
        self.factor = 1

    @property
    def score(self) -> int:
        return self._score

    @score.setter
    def score(self, score: int) -> None:
        self._score = score
        self.factor = score + 1

    def apply(self, delta: int) -> None:
        # Clamped to [0, max - 1] by comparisons, not min(max()): every acked
        # probe lands here.
        score = self._score + delta
        if score < 0:
            score = 0
        elif score >= self._max:
            score = self._max - 1
        self._score = score
        self.factor = score + 1


def failed_probe_delta(expected_nacks: int, nacks: int) -> int:
    """Score change after a probe that got no ack at all.

    Helpers that were asked and stayed silent point at our own link: each
    missing nack counts.  With no helper to ask, the failure itself counts once.
    """
    if expected_nacks <= 0:
        return 1
    return max(expected_nacks - nacks, 0)
