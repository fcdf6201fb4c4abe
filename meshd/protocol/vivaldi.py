"""Vivaldi network coordinates: estimate round trips between nodes without measuring each pair.

Dabek, Cox, Kaashoek and Morris, "Vivaldi: A Decentralized Network Coordinate
System", SIGCOMM 2004, with the parameters Serf uses (8 dimensions plus a
height, c_e = c_c = 0.25).  Each node keeps a :class:`Coordinate`; every
measured round trip to a peer nudges the local coordinate toward where the
sample says it should be (:func:`update`), and the predicted round trip
between two nodes is :func:`distance` of their coordinates.

The equations (paper, section 3 and 5.3):

- height vectors: ``[x, h]``; ``[x, h] - [y, g] = [x - y, h + g]`` and
  ``||[x, h]|| = ||x|| + h``, so a distance is the Euclidean distance plus
  both heights.  The height models the access link every packet crosses; it
  stays at least ``height_min``.
- sample weight ``w = e_i / (e_i + e_j)``: a node sure of itself (small error)
  moves less, and trusts a peer that is sure of itself more.
- relative error of the sample ``e_s = |dist - rtt| / rtt``; the error
  estimate is a moving average ``e_i = c_e * w * e_s + e_i * (1 - c_e * w)``,
  capped at ``error_max``.
- adaptive timestep ``delta = c_c * w``; the node moves by
  ``delta * (rtt - dist)`` along the unit height vector from the peer to it.

Pure functions: nothing here reads a clock or the global random generator.
Where two coordinates coincide there is no direction to push along, so one is
drawn from the ``random.Random`` the caller passes (seed it per node, e.g. from
the node name, so that two nodes at the origin move apart), or, without one,
from ``random.Random(cfg.seed)``.
"""

from __future__ import annotations

import math
import random
import struct
from array import array
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class VivaldiConfig:
    """Tuning of the coordinate system; the defaults are Serf's."""

    #: Euclidean dimensions.  Serf measured 8 to fit real WAN latencies well.
    dimensionality: int = 8
    #: Largest (and initial) error estimate: a new node knows nothing.
    error_max: float = 1.5
    #: c_e: how fast the error estimate follows new samples.
    ce: float = 0.25
    #: c_c: the largest fraction of a sample's disagreement a node moves by.
    cc: float = 0.25
    #: Smallest height, seconds (10 us): keeps heights positive.
    height_min: float = 10e-6
    #: Seed of the fallback direction for coincident coordinates.
    seed: int = 0
    #: Largest magnitude of a component, and largest height, seconds.  No
    #: round trip a probe can measure comes near it (a probe gives up within
    #: seconds), so a coordinate outside says its node lies or is broken:
    #: a peer's is refused (:func:`within`) and ours is kept inside by
    #: :func:`update`.  Without the bound one peer acking with components of
    #: 1e100 would drag our coordinate there, and ours, carried in our acks,
    #: every other node's after it.
    bound: float = 10.0

    def __post_init__(self) -> None:
        if self.dimensionality < 1:
            raise ValueError("dimensionality must be at least 1")
        if not (self.error_max > 0 and 0 < self.ce <= 1 and 0 < self.cc <= 1):
            raise ValueError("error_max must be positive and ce, cc in (0, 1]")
        if not self.height_min > 0:
            raise ValueError("height_min must be positive")
        if not (math.isfinite(self.bound) and self.bound > self.height_min):
            raise ValueError("bound must be finite and above height_min")


DEFAULT_CONFIG = VivaldiConfig()

#: Distances and round trips under 1 us are treated as 1 us (no division by 0).
ZERO_THRESHOLD = 1e-6


@dataclass(frozen=True, slots=True)
class Coordinate:
    """A node's place in the coordinate space.  Units are seconds."""

    vec: tuple[float, ...]
    #: Confidence in this coordinate: the expected relative error of a prediction.
    error: float
    height: float

    def __post_init__(self) -> None:
        _check(self.vec, self.error, self.height)

    @classmethod
    def origin(cls, cfg: VivaldiConfig = DEFAULT_CONFIG) -> Coordinate:
        """Where a new node starts: the origin, maximal error, minimal height."""
        return cls((0.0,) * cfg.dimensionality, cfg.error_max, cfg.height_min)


def _check(vec: tuple[float, ...], error: float, height: float) -> None:
    if not all(map(math.isfinite, vec)):
        raise ValueError("coordinate components must be finite")
    if not (math.isfinite(error) and error > 0):
        raise ValueError("coordinate error must be finite and positive")
    if not (math.isfinite(height) and height >= 0):
        raise ValueError("coordinate height must be finite and non-negative")


_new_object = object.__new__
# The slots' own setters: what the frozen dataclass __init__ reaches through
# object.__setattr__, without the generic lookup.
_set_vec = Coordinate.__dict__["vec"].__set__
_set_error = Coordinate.__dict__["error"].__set__
_set_height = Coordinate.__dict__["height"].__set__


def coordinate(vec: tuple[float, ...], error: float, height: float) -> Coordinate:
    """``Coordinate(vec, error, height)``: the same checks and the same value,
    built without the dataclass ``__init__`` (every probe's ack builds two)."""
    _check(vec, error, height)
    c = _new_object(Coordinate)
    _set_vec(c, vec)
    _set_error(c, error)
    _set_height(c, height)
    return c


#: One ``struct.Struct`` per dimensionality: native doubles, the components,
#: then the error and the height (the layout of a slot in :class:`Placements`).
_PACKINGS: dict[int, struct.Struct] = {}


def _packing(dimensionality: int) -> struct.Struct:
    """The layout of one coordinate of ``dimensionality`` in :class:`Placements`."""
    s = _PACKINGS.get(dimensionality)
    if s is None:
        s = _PACKINGS[dimensionality] = struct.Struct(f"={dimensionality + 2}d")
    return s


class Placements:
    """The last coordinate each member told us, packed: ``member -> slot``,
    and the values of every slot (components, error, height) in one array
    of doubles.

    A node keeps one per member it has probed: thousands in a large pool,
    and a simulator holds ten thousand nodes' worth.  As Coordinate objects
    each would be a tuple and ten floats (~400 bytes, objects the garbage
    collector walks); as one bytes object each, ~130 bytes allocated anew on
    every ack, the heap of a 10,000-node simulation grew by 1.3 MB a virtual
    second and every event slowed as it grew (simulations/RESULTS.md).
    Here a member's new coordinate overwrites its slot, a new member extends
    the array, and a member's only object is its entry in the slot table.
    Values come back to the bit.
    """

    __slots__ = ("_free", "_layout", "_slots", "_values", "_width")

    def __init__(self, dimensionality: int) -> None:
        self._layout = _packing(dimensionality)
        self._width = dimensionality + 2
        self._slots: dict[str, int] = {}
        self._values = array("d")
        #: Slots of members forgotten (:meth:`discard`), taken before the array grows.
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, member: object) -> bool:
        return member in self._slots

    def put(self, member: str, values: tuple[float, ...]) -> None:
        """Keep the coordinate ``values`` (components, error, height) of
        ``member``; the caller checked them as :func:`coordinate` would."""
        if len(values) != self._width:
            raise ValueError("a coordinate of another dimensionality")
        k = self._slots.get(member)
        if k is None:
            if not self._free:
                self._slots[member] = len(self._values) // self._width
                # One copy of the packed values, not ten appends of a float.
                self._values.frombytes(self._layout.pack(*values))
                return
            k = self._slots[member] = self._free.pop()
        self._layout.pack_into(self._values, 8 * self._width * k, *values)

    def get(self, member: str) -> Coordinate | None:
        """The coordinate kept for ``member``, None when there is none."""
        k = self._slots.get(member)
        return None if k is None else self._at(k)

    def _at(self, k: int) -> Coordinate:
        values = self._layout.unpack_from(self._values, 8 * self._width * k)
        return coordinate(values[:-2], values[-2], values[-1])

    def distance(self, c: Coordinate, member: str) -> float | None:
        """``distance(c, self.get(member))``, to the bit, without building
        the coordinate (a lookup ranks each instance in our cluster by it);
        None when ``member`` has no coordinate here."""
        k = self._slots.get(member)
        if k is None:
            return None
        if len(c.vec) != self._width - 2:
            raise ValueError("coordinates of different dimensionality")
        values: tuple[float, ...] = self._layout.unpack_from(self._values, 8 * self._width * k)
        return math.dist(c.vec, values[:-2]) + c.height + values[-1]

    def discard(self, member: str) -> None:
        """Forget ``member``'s coordinate (its slot is reused)."""
        k = self._slots.pop(member, None)
        if k is not None:
            self._free.append(k)

    def coordinates(self) -> dict[str, Coordinate]:
        """Every member's coordinate, in a new dict."""
        return {m: self._at(k) for m, k in self._slots.items()}


def within(c: Coordinate, cfg: VivaldiConfig = DEFAULT_CONFIG) -> bool:
    """Is ``c`` inside ``cfg.bound`` (every component and the height)?"""
    b = cfg.bound
    return c.height <= b and max(c.vec) <= b and min(c.vec) >= -b


def distance(a: Coordinate, b: Coordinate) -> float:
    """Predicted round trip between ``a`` and ``b``, seconds."""
    if len(a.vec) != len(b.vec):
        raise ValueError("coordinates of different dimensionality")
    return math.dist(a.vec, b.vec) + a.height + b.height


def _random_unit(rng: random.Random, n: int) -> tuple[float, ...]:
    # Gaussian components, normalised: uniform over the sphere.
    while True:
        v = [rng.gauss(0.0, 1.0) for _ in range(n)]
        norm = math.hypot(*v)
        if norm > ZERO_THRESHOLD:
            return tuple(x / norm for x in v)


def update(
    local: Coordinate,
    remote: Coordinate,
    rtt: float,
    cfg: VivaldiConfig = DEFAULT_CONFIG,
    *,
    rng: random.Random | None = None,
) -> Coordinate:
    """``local`` moved by one round-trip sample ``rtt`` (seconds) to the node at ``remote``."""
    return update_from(local, remote.vec, remote.error, remote.height, rtt, cfg, rng)


def update_from(
    local: Coordinate,
    rvec: tuple[float, ...],
    r_error: float,
    r_height: float,
    rtt: float,
    cfg: VivaldiConfig = DEFAULT_CONFIG,
    rng: random.Random | None = None,
) -> Coordinate:
    """:func:`update` towards the coordinate ``(rvec, r_error, r_height)``
    given by its values: what the prober has from an ack, without building a
    Coordinate to take apart again.

    The values need not have passed :func:`coordinate`'s checks: whatever
    they are, the result passes them or this raises ValueError.
    """
    if not (math.isfinite(rtt) and rtt >= 0):
        raise ValueError("rtt must be a finite non-negative number of seconds")
    lvec = local.vec
    n = len(lvec)
    if n != cfg.dimensionality or len(rvec) != n:
        raise ValueError("coordinates must have the configured dimensionality")
    if rtt < ZERO_THRESHOLD:
        rtt = ZERO_THRESHOLD
    # Every probe's ack lands here, so the arithmetic is spelled out once,
    # with the very operations of the equations in the module doc, in the
    # same order: the result is the same to the bit (test_vivaldi.py).
    # ``mag`` is what ``distance`` computes (math.dist is math.hypot of the
    # differences, to the bit), and the lengths were checked just above.
    mag = math.dist(lvec, rvec)
    l_error, l_height = local.error, local.height
    heights = l_height + r_height
    dist = mag + l_height + r_height

    # Sample weight and error estimate.
    total_error = l_error + r_error
    if total_error < ZERO_THRESHOLD:
        total_error = ZERO_THRESHOLD
    w = l_error / total_error
    ce_w = cfg.ce * w
    error = ce_w * (abs(dist - rtt) / rtt) + l_error * (1.0 - ce_w)
    if error < ZERO_THRESHOLD:
        error = ZERO_THRESHOLD
    if error > cfg.error_max:
        error = cfg.error_max

    # Move along the unit height vector from remote to local:
    # u = [x_l - x_r, h_l + h_r] / (||x_l - x_r|| + h_l + h_r).
    force = cfg.cc * w * (rtt - dist)
    vec: tuple[float, ...]
    if mag > ZERO_THRESHOLD:
        norm = mag + heights
        # x - r is the component of the difference ``mag`` measured.
        if n == 8:
            # The default (Serf's) dimensionality spelled out: the same
            # operations per component, without the comprehension's frame,
            # which cost a sixth of a large simulation's Vivaldi time.
            x0, x1, x2, x3, x4, x5, x6, x7 = lvec
            r0, r1, r2, r3, r4, r5, r6, r7 = rvec
            vec = (
                x0 + force * (x0 - r0) / norm,
                x1 + force * (x1 - r1) / norm,
                x2 + force * (x2 - r2) / norm,
                x3 + force * (x3 - r3) / norm,
                x4 + force * (x4 - r4) / norm,
                x5 + force * (x5 - r5) / norm,
                x6 + force * (x6 - r6) / norm,
                x7 + force * (x7 - r7) / norm,
            )
        else:
            vec = tuple([x + force * (x - r) / norm for x, r in zip(lvec, rvec, strict=False)])
        height = l_height + force * heights / norm
    elif force > 0:
        # Coincident and predicted too close: the paper's "random direction".
        # The pure-height unit vector would only inflate both heights.
        u = _random_unit(rng if rng is not None else random.Random(cfg.seed), n)
        vec = tuple(x + force * d for x, d in zip(lvec, u, strict=True))
        height = l_height
    else:
        # Coincident and predicted too far: only the heights can shrink.
        vec = lvec
        height = l_height + force
    if height < cfg.height_min:
        height = cfg.height_min
    # Inside the bound, whatever the sample: a long round trip (seconds,
    # under a slow link) pushes us away from the peer by a quarter of it.
    b = cfg.bound
    if height > b:
        height = b
    if max(vec) > b or min(vec) < -b:
        vec = tuple([b if x > b else -b if x < -b else x for x in vec])
    # coordinate()'s checks, in its order and words, the components by their
    # sum: clamped just above, each is inside the finite bound or NaN (which
    # no comparison moves), so the sum is finite exactly when they all are.
    if not math.isfinite(sum(vec)):
        raise ValueError("coordinate components must be finite")
    if not (math.isfinite(error) and error > 0):
        raise ValueError("coordinate error must be finite and positive")
    if not (math.isfinite(height) and height >= 0):
        raise ValueError("coordinate height must be finite and non-negative")
    c = _new_object(Coordinate)
    _set_vec(c, vec)
    _set_error(c, error)
    _set_height(c, height)
    return c
