"""meshd.protocol.vivaldi: network coordinates from round-trip samples."""

from __future__ import annotations

import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.protocol.vivaldi import (
    DEFAULT_CONFIG,
    Coordinate,
    Placements,
    VivaldiConfig,
    coordinate,
    distance,
    update,
    within,
)

ONE_D = VivaldiConfig(dimensionality=1)


def test_origin_is_uncertain_and_flat():
    c = Coordinate.origin()
    assert c.vec == (0.0,) * 8
    assert c.error == DEFAULT_CONFIG.error_max == 1.5
    assert c.height == DEFAULT_CONFIG.height_min
    assert DEFAULT_CONFIG.ce == DEFAULT_CONFIG.cc == 0.25


def test_distance_is_euclidean_plus_both_heights():
    a = Coordinate((0.0, 0.0), 1.0, 0.001)
    b = Coordinate((0.003, 0.004), 1.0, 0.002)
    assert distance(a, b) == pytest.approx(0.005 + 0.003)
    assert distance(a, b) == distance(b, a)
    with pytest.raises(ValueError, match="dimensionality"):
        distance(a, Coordinate((0.0,), 1.0, 0.0))


def test_update_pins_the_paper_equations():
    local = Coordinate((0.3,), 0.5, 0.01)
    remote = Coordinate((0.0,), 0.5, 0.01)
    new = update(local, remote, 0.52, ONE_D)
    dist = 0.32
    w = 0.5  # e_i / (e_i + e_j)
    e_s = abs(dist - 0.52) / 0.52
    assert new.error == pytest.approx(0.25 * w * e_s + 0.5 * (1 - 0.25 * w))
    force = 0.25 * w * (0.52 - dist)  # delta * (rtt - dist)
    # along the unit height vector [0.3, 0.02] / 0.32
    assert new.vec[0] == pytest.approx(0.3 + force * 0.3 / 0.32)
    assert new.height == pytest.approx(0.01 + force * 0.02 / 0.32)
    # so the predicted distance to the (unmoved) remote grows by exactly the force
    assert distance(new, remote) == pytest.approx(dist + force)
    assert local == Coordinate((0.3,), 0.5, 0.01)  # inputs are untouched


def test_confident_node_moves_less_and_error_is_capped():
    remote = Coordinate((0.0,), 0.1, 0.0)
    sure = update(Coordinate((0.01,), 0.1, 0.0), remote, 0.05, ONE_D)
    unsure = update(Coordinate((0.01,), 1.0, 0.0), remote, 0.05, ONE_D)
    assert abs(unsure.vec[0] - 0.01) > abs(sure.vec[0] - 0.01)
    wild = update(Coordinate((0.0,), 1.5, 0.0), Coordinate((5.0,), 1.5, 0.0), 0.001, ONE_D)
    assert wild.error == DEFAULT_CONFIG.error_max


def test_height_never_below_minimum():
    # predicted far too far: heights shrink, but stay positive
    a = Coordinate((0.0,), 1.0, 0.05)
    b = Coordinate((0.0,), 1.0, 0.05)
    new = update(a, b, 0.0, ONE_D)
    assert ONE_D.height_min < new.height < a.height
    assert new.vec == a.vec  # coincident: only the height can give
    for _ in range(200):
        new = update(new, b, 0.0, ONE_D)
        assert new.height >= ONE_D.height_min
    assert new.height == ONE_D.height_min


def test_coincident_nodes_separate_along_a_seeded_direction():
    o = Coordinate.origin()
    before = random.getstate()
    a1 = update(o, o, 0.050, rng=random.Random("node-a"))
    a2 = update(o, o, 0.050, rng=random.Random("node-a"))
    b = update(o, o, 0.050, rng=random.Random("node-b"))
    assert random.getstate() == before  # never the global generator
    assert a1 == a2
    assert a1.vec != b.vec
    assert a1.height == o.height  # the push is sideways, not up
    assert distance(a1, o) > distance(o, o)
    # without an rng: a fixed direction from cfg.seed
    assert update(o, o, 0.05) == update(o, o, 0.05)
    assert update(o, o, 0.05) != update(o, o, 0.05, VivaldiConfig(seed=1))


def test_bad_input_raises():
    o = Coordinate.origin()
    for rtt in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="rtt"):
            update(o, o, rtt)
    with pytest.raises(ValueError, match="dimensionality"):
        update(o, Coordinate.origin(ONE_D), 0.01)
    with pytest.raises(ValueError, match="finite"):
        Coordinate((math.nan,), 1.0, 0.0)
    with pytest.raises(ValueError, match="error"):
        Coordinate((0.0,), 0.0, 0.0)
    with pytest.raises(ValueError):
        VivaldiConfig(dimensionality=0)


coords = st.builds(
    Coordinate,
    st.tuples(*[st.floats(-1.0, 1.0)] * 8),
    st.floats(1e-3, 1.5),
    st.floats(1e-5, 0.1),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(coords, coords, st.floats(0.0, 2.0), st.integers(0, 2**32))
def test_update_stays_valid_and_is_deterministic(local, remote, rtt, seed):
    new = update(local, remote, rtt, rng=random.Random(seed))
    assert new == update(local, remote, rtt, rng=random.Random(seed))
    assert 0 < new.error <= DEFAULT_CONFIG.error_max
    assert new.height >= DEFAULT_CONFIG.height_min
    assert all(math.isfinite(x) for x in new.vec)


def test_converges_on_a_synthetic_plane():
    """20 nodes on a 100 ms square with 2 ms access links; a few hundred rounds of
    one sample each, with 5% measurement jitter.  Median relative error < 20%."""
    n = 20
    layout = random.Random(7)
    pos = [(layout.uniform(0, 0.1), layout.uniform(0, 0.1)) for _ in range(n)]
    access = [layout.uniform(0.0005, 0.002) for _ in range(n)]
    true = [[math.dist(pos[i], pos[j]) + access[i] + access[j] for j in range(n)] for i in range(n)]

    coords = [Coordinate.origin() for _ in range(n)]
    rngs = [random.Random(f"node-{i}") for i in range(n)]
    schedule = random.Random(1)
    for _ in range(300):
        for i in range(n):
            j = schedule.randrange(n - 1)
            j += j >= i
            sample = true[i][j] * schedule.uniform(0.95, 1.05)
            coords[i] = update(coords[i], coords[j], sample, rng=rngs[i])

    errors = [
        abs(distance(coords[i], coords[j]) - true[i][j]) / true[i][j]
        for i in range(n)
        for j in range(i + 1, n)
    ]
    assert statistics.median(errors) < 0.20
    # the nodes' own error estimates have come down from the initial 1.5
    assert statistics.median(c.error for c in coords) < 0.3


def _plain_update(local, remote, rtt, cfg, rng):
    """The equations of the module doc, written the plain way (as update was
    before its arithmetic was spelled out for speed): the reference."""
    rtt = max(rtt, 1e-6)
    dist = distance(local, remote)
    w = local.error / max(local.error + remote.error, 1e-6)
    error = cfg.ce * w * (abs(dist - rtt) / rtt) + local.error * (1.0 - cfg.ce * w)
    error = min(max(error, 1e-6), cfg.error_max)
    force = cfg.cc * w * (rtt - dist)
    diff = [a - b for a, b in zip(local.vec, remote.vec, strict=True)]
    mag = math.hypot(*diff)
    heights = local.height + remote.height
    if mag > 1e-6:
        norm = mag + heights
        vec = tuple(x + force * d / norm for x, d in zip(local.vec, diff, strict=True))
        height = local.height + force * heights / norm
    elif force > 0:
        while True:
            u = [rng.gauss(0.0, 1.0) for _ in local.vec]
            un = math.hypot(*u)
            if un > 1e-6:
                break
        vec = tuple(x + force * (d / un) for x, d in zip(local.vec, u, strict=True))
        height = local.height
    else:
        vec, height = local.vec, local.height + force
    b = cfg.bound
    vec = tuple(min(max(x, -b), b) for x in vec)
    return Coordinate(vec, error, min(max(height, cfg.height_min), b))


_component = st.one_of(
    st.floats(-0.05, 0.05), st.sampled_from([0.0, 1e-7, -1e-7, 1e-6, 1e300, -1e300])
)


@settings(max_examples=2000, deadline=None, derandomize=True)
@given(
    st.sampled_from([DEFAULT_CONFIG, VivaldiConfig(dimensionality=2, error_max=1e-7), ONE_D]),
    st.data(),
    st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1e-8, 1e-6])),
    st.integers(0, 2**32),
)
def test_update_equals_the_plain_equations_to_the_bit(cfg, data, rtt, seed):
    """Same result, to the last bit, as the plain equations, coincident points,
    zero round trips, clamps and overflow (both raise) included: a simulation
    run must give the same figures whichever way the arithmetic is written."""
    d = cfg.dimensionality
    vecs = st.tuples(*[_component] * d)
    lv = data.draw(vecs)
    rv = lv if data.draw(st.booleans()) else data.draw(vecs)
    errors = st.one_of(st.floats(1e-9, 2.0), st.sampled_from([1e-7, 1.5]))
    heights = st.one_of(st.floats(0.0, 0.01), st.sampled_from([0.0, 1e-5]))
    local = Coordinate(lv, data.draw(errors), data.draw(heights))
    remote = Coordinate(rv, data.draw(errors), data.draw(heights))

    def outcome(fn):
        try:
            c = fn(local, remote, rtt, cfg, random.Random(seed))
        except ValueError:
            return "raised"
        return repr((c.vec, c.error, c.height))

    assert outcome(lambda *a: update(*a[:4], rng=a[4])) == outcome(_plain_update)


_any_component = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2), st.just(True)
)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.tuples(*[_any_component] * 3), _any_component, _any_component)
def test_coordinate_builds_what_the_dataclass_builds(vec, error, height):
    """The fast constructor update and the prober use: same checks, same value."""

    def outcome(build):
        try:
            c = build(vec, error, height)
        except ValueError as exc:
            return f"raised {exc}"
        assert type(c) is Coordinate
        return repr((c.vec, c.error, c.height))

    assert outcome(coordinate) == outcome(Coordinate)
    if not outcome(Coordinate).startswith("raised"):
        assert coordinate(vec, error, height) == Coordinate(vec, error, height)


@pytest.mark.parametrize(
    "coord",
    [
        (1e300,) * 8 + (1.0, 0.0),  # overflows the distance
        (1e100,) * 8 + (1.0, 0.0),  # does not: would drag our coordinate there
        (0.0,) * 7 + (-10.5, 1.0, 0.0),  # one component just outside
        (0.0,) * 8 + (1e-9, 1e50),  # the height
        (0.0,) * 8 + (0.0, 0.0),  # no error estimate: a weight of 0/0
        (0.0,) * 8 + (1.0, -1.0),  # a negative height
        (0.0, 1.0, 0.0),  # the wire's shortest: 1 dimension, not our 8
        (0.0,) * 32 + (1.0, 0.0),  # the wire's longest: 32 dimensions
    ],
)
def test_a_peer_coordinate_outside_the_bound_is_counted_and_ignored(coord):
    """Finite components pass the wire's checks, yet 1e300 overflows the
    distance and 1e100 would move us to 1e100: an ack carrying either must
    not raise out of Core.receive, nor move our coordinate."""
    from meshd.testing import Cluster
    from meshd.wire import Ack

    c = Cluster(3, encode=False)
    core = c.core(0)
    for _ in range(10_000):  # event by event: a probe is in flight for a millisecond
        if core.prober.probe is not None or not c.step():
            break
    probe = core.prober.probe
    assert probe is not None
    target = next(i for i, hn in enumerate(c.nodes) if hn.id == probe.target)
    # A round trip under the fake network's fastest (1 ms): the true ack is
    # still on its way when ours arrives.
    c.run_until(c.now + 0.0004)
    assert core.prober.probe is probe
    before = core.coord
    c.inject(0, Ack(probe.target, seq=probe.seq, coord=coord), src=target)
    assert core.counters["bad-coordinate"] == 1
    assert core.coord == before and probe.target not in core.coords
    assert core.prober.probe is None  # the ack still answered the probe


def test_within_is_the_bound_on_every_component_and_the_height():
    b = DEFAULT_CONFIG.bound
    assert b == 10.0
    inside = Coordinate((b, -b) + (0.0,) * 6, 1.0, b)
    assert within(inside)
    assert not within(Coordinate((b * 1.0001,) + (0.0,) * 7, 1.0, 0.0))
    assert not within(Coordinate((0.0,) * 7 + (-b * 1.0001,), 1.0, 0.0))
    assert not within(Coordinate((0.0,) * 8, 1.0, b * 1.0001))
    with pytest.raises(ValueError, match="bound"):
        VivaldiConfig(bound=float("inf"))


_inside = st.floats(-DEFAULT_CONFIG.bound, DEFAULT_CONFIG.bound)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(
    st.tuples(*[_inside] * 8),
    st.tuples(*[_inside] * 8),
    st.floats(1e-6, 1.5),
    st.floats(1e-6, 1e9),
    st.floats(0.0, DEFAULT_CONFIG.bound),
    st.floats(0.0, DEFAULT_CONFIG.bound),
    st.floats(0.0, 60.0),
)
def test_an_update_never_leaves_the_bound(lv, rv, le, re, lh, rh, rtt):
    """Whatever a peer inside the bound says and however long the round
    trip, our coordinate stays inside: what we carry in our acks passes
    every other node's check."""
    local = Coordinate(lv, le, lh)
    remote = Coordinate(rv, re, rh)
    assert within(update(local, remote, rtt, rng=random.Random(0)))


def test_one_lying_peer_does_not_drag_the_mesh():
    """A peer with a valid certificate whose acks always carry a coordinate
    of 1e100: every honest node refuses it, and their coordinates (which
    they carry in their own acks) stay where the round trips put them."""
    from meshd.protocol.prober import Prober
    from meshd.testing import Cluster

    class LyingProber(Prober):
        __slots__ = ()

        def observe_rtt(self, member: str, raw: tuple[float, ...], rtt: float) -> None:
            pass  # keeps its lie

    c = Cluster(12, encode=False)
    liar = c.core(5).prober
    liar.__class__ = LyingProber  # the same slots: only the method differs
    liar.coord = Coordinate((1e100,) * 8, 1e-6, 0.0)
    c.run_for(60.0)
    honest = [c.core(i) for i in range(12) if i != 5]
    assert sum(core.counters["bad-coordinate"] for core in honest) >= 11  # each probed it
    for core in honest:
        assert within(core.coord)
        # Loopback-like latencies (1-2 ms): nobody is anywhere near a second away.
        assert max(map(abs, core.coord.vec)) < 0.1
        assert c.nodes[5].id not in core.coords


_finite = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.integers(1, 9).flatmap(
        lambda n: st.lists(
            st.tuples(
                st.sampled_from(["east/a", "east/b", "west/c"]),
                st.tuples(*[_finite] * n),
                _finite.filter(lambda e: e > 0),
                _finite.filter(lambda h: h >= 0),
            ),
            min_size=1,
            max_size=8,
        )
    ),
)
def test_placements_give_back_each_members_last_coordinate_to_the_bit(puts):
    """The prober keeps each peer's last coordinate packed: every value, of
    any dimensionality, comes back to the bit (0.0 and -0.0 included), a
    later one replaces an earlier one in place."""
    placed = Placements(len(puts[0][1]))
    last = {}
    for member, vec, error, height in puts:
        placed.put(member, (*vec, error, height))
        last[member] = Coordinate(vec, error, height)
    assert len(placed) == len(last)
    for member, c in last.items():
        back = placed.get(member)
        assert type(back) is Coordinate and back == c
        assert [math.copysign(1, x) for x in back.vec] == [math.copysign(1, x) for x in c.vec]
    assert placed.coordinates() == last
    assert placed.get("east/nobody") is None and "east/nobody" not in placed


def test_a_discarded_member_is_gone_and_its_slot_reused():
    placed = Placements(2)
    placed.put("east/a", (1.0, 2.0, 0.5, 0.001))
    placed.put("east/b", (3.0, 4.0, 0.5, 0.002))
    placed.discard("east/a")
    placed.discard("east/never")  # nothing to forget: nothing happens
    assert "east/a" not in placed and placed.get("east/a") is None
    placed.put("east/c", (5.0, 6.0, 0.5, 0.003))
    assert placed.get("east/b") == Coordinate((3.0, 4.0), 0.5, 0.002)
    assert placed.get("east/c") == Coordinate((5.0, 6.0), 0.5, 0.003)
    assert len(placed._values) == 2 * 4  # c took a's slot: the array did not grow


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.integers(1, 9).flatmap(
        lambda n: st.tuples(st.tuples(*[_finite] * n), st.tuples(*[_finite] * n))
    ),
    st.tuples(_finite.filter(lambda h: h >= 0), _finite.filter(lambda h: h >= 0)),
)
def test_placed_distance_is_the_distance_to_the_kept_coordinate(vecs, heights):
    """What a lookup ranks by, without building the coordinate: the same
    value to the bit (or the same overflow to infinity)."""
    a = Coordinate(vecs[0], 1.0, heights[0])
    b = Coordinate(vecs[1], 1.0, heights[1])
    placed = Placements(len(vecs[0]))
    placed.put("east/b", (*b.vec, b.error, b.height))
    assert repr(placed.distance(a, "east/b")) == repr(distance(a, b))
    assert placed.distance(a, "east/nobody") is None


def test_placements_refuse_another_dimensionality():
    placed = Placements(8)
    with pytest.raises(ValueError):
        placed.put("east/a", (0.0, 0.0, 1.0, 0.0))
    placed.put("east/a", (0.0,) * 8 + (1.0, 0.0))
    with pytest.raises(ValueError):
        placed.distance(Coordinate((0.0,) * 3, 1.0, 0.0), "east/a")


def test_a_probed_peer_is_placed_packed_and_predicted_from_its_coordinate():
    """What a node keeps per peer is the packed coordinate the peer's ack
    carried: the prediction is the distance to it, and Core.coords unpacks
    the same coordinate."""
    from meshd.testing import Cluster

    c = Cluster(4, encode=False)
    c.run_for(20.0)
    core = c.core(0)
    placed = core.prober.placed
    assert len(placed), "twenty probes placed nobody"
    for member, remote in placed.coordinates().items():
        assert core.coords[member] == remote
        assert core.estimated_rtt(member) == distance(core.coord, remote)
    assert core.estimated_rtt("nobody") is None
