"""meshd.protocol.sampling: the same draws as randrange, uniform over the range."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol.sampling import below


@given(st.integers(0, 2**32), st.lists(st.integers(1, 2**70), min_size=1, max_size=50))
def test_below_draws_what_randrange_draws(seed, sizes):
    # A seeded simulation gives the same figures whichever of the two draws.
    ours, theirs = random.Random(seed), random.Random(seed)
    for n in sizes:
        assert below(ours, n) == theirs.randrange(n)
    assert ours.getstate() == theirs.getstate()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 1000])
def test_below_stays_in_range_and_reaches_every_value(n):
    rng = random.Random(n)
    counts = Counter(below(rng, n) for _ in range(200 * n))
    assert set(counts) == set(range(n))
    # Each value near its share (200 draws expected; a wide band, no flakes).
    assert min(counts.values()) > 100 and max(counts.values()) < 320
