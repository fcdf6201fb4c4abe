"""Uniform integer draws for the protocol's hot paths.

Every probe picks its target with one draw and every gossip round picks its
members with a few.  ``random.Random.randrange`` spends most of its time on
argument handling (two Python calls and index conversions per draw); these
draw from the generator's bits directly, by the same rejection sampling, so a
seeded run draws the same numbers either way (tests/test_sampling.py).
"""

from __future__ import annotations

import random


def below(rng: random.Random, n: int) -> int:
    """A uniform integer in ``[0, n)``, ``n >= 1``: ``rng.randrange(n)``.

    Draws ``n.bit_length()`` random bits until they make a number under
    ``n``: fewer than two draws on average, each number equally likely.
    """
    bits = n.bit_length()
    r = rng.getrandbits(bits)
    while r >= n:
        r = rng.getrandbits(bits)
    return r
