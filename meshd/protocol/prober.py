"""SWIM probing with Lifeguard, for one core: one job of ``Core``.

Whom to probe next (a lazy Fisher-Yates shuffle over the member list, a new
round when it runs out), the probe in flight (direct, then through
``indirect_checks`` helpers, then a suspicion), the indirect probes we run for
others (forward their ack, or a nack at ``nack_timeout``), our local health
(Lifeguard's awareness: failed probes without nacks stretch our own timing),
and the Vivaldi coordinates learnt from the round trips of direct probes.

It reads the member table and sends through its core (``Prober.core``), and
hands every verdict back to it: a failed probe becomes a suspicion by
``Core._apply``, a buddy's suspicion about us goes to ``Core._about_me``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshd.protocol.awareness import Awareness, failed_probe_delta
from meshd.protocol.config import Config
from meshd.protocol.members import Member
from meshd.protocol.sampling import below
from meshd.protocol.vivaldi import (
    Coordinate,
    Placements,
    VivaldiConfig,
)
from meshd.protocol.vivaldi import update_from as vivaldi_update_from
from meshd.wire import Ack, IndirectPing, Nack, Ping, Status, unchecked

if TYPE_CHECKING:
    from meshd.protocol.core import Core

#: Fraction of the probe timeout a helper waits before it nacks (see nack_timeout).
NACK_TIMEOUT_FRACTION = 0.8
#: Members with an out-of-turn probe (``Prober.probe_now``) in the last probe
#: interval.  Each entry is one ping we sent; past the cap further requests
#: wait for ordinary probing, so a storm of closed connections (a peer's
#: restart, a flapping link, a peer that opens and drops connections on
#: purpose) costs at most this many pings per probe interval.
MAX_OUT_OF_TURN = 64


#: A round's probe and its ack, built without the message checks: every field
#: is the core's own, already checked (see meshd.wire.unchecked); one of each
#: per member per probe interval.
_probe_ping = unchecked(Ping)
_ack = unchecked(Ack)


def nack_timeout(probe_timeout: float) -> float:
    """How long a helper waits for the target before sending its nack.

    The prober asks helpers at ``probe_timeout`` and gives up at the end of
    the probe interval; a nack sent at a full ``probe_timeout`` would land
    after that and be counted missing, blaming a healthy prober.  Lifeguard
    (footnote 5 of the paper) waits 80% of the timeout.
    """
    return NACK_TIMEOUT_FRACTION * probe_timeout


@dataclass(slots=True)
class _Probe:
    target: str
    seq: int
    ack_deadline: float
    end: float
    sent: float = 0.0
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    """An indirect probe we run for ``requester``: forward its ack, or a nack."""

    requester: str
    requester_addr: str
    requester_seq: int
    deadline: float
    want_nack: bool


class Prober:
    """The probing part of one core (see module doc)."""

    # Slots, as Core's (see there).
    __slots__ = (
        "awareness",
        "config",
        "coord",
        "core",
        "index",
        "next_probe",
        "order",
        "joined",
        "moved",
        "out_of_turn",
        "placed",
        "probe",
        "relays",
        "rng",
        "seq",
        "vivaldi",
    )

    def __init__(self, core: Core, config: Config, rng: random.Random) -> None:
        self.core = core
        self.config = config
        self.rng = rng
        self.awareness = Awareness(config.awareness_max_multiplier)
        #: Vivaldi: our network coordinate, and the last one each member we
        #: probed told us (fed by the round trips of direct probes): one per
        #: member probed, so thousands in a large pool, kept packed in one
        #: array (vivaldi.Placements).
        self.vivaldi = VivaldiConfig()
        self.coord = Coordinate.origin(self.vivaldi)
        self.placed = Placements(self.vivaldi.dimensionality)
        #: This probe round's order: positions ``[:index]`` probed, the rest
        #: drawn one at a time (a lazy Fisher-Yates shuffle: a random order
        #: without an O(n) shuffle up front, and a newcomer appended lands at
        #: a random place among the members not yet probed).  The order is
        #: ``order`` (the member table's id list as the round began, lent,
        #: never written), then ``joined`` (members added since), with
        #: ``moved`` holding the positions the shuffle rewrote: no copy of
        #: the id list per round (80 KB a node at 10,000 members).
        self.order: list[str] = []
        self.joined: list[str] = []
        self.moved: dict[int, str] = {}
        self.index = 0
        self.seq = 0
        self.probe: _Probe | None = None
        self.relays: dict[int, _Relay] = {}
        #: When the next probe starts (the core sets the first, jittered).
        self.next_probe = math.inf
        #: member id -> when we last probed it out of turn (see probe_now).
        self.out_of_turn: dict[str, float] = {}

    def tick(self, now: float, left: bool) -> None:
        """The probe part of the core's timer (after relays and suspicions expired)."""
        if self.probe is not None:
            self.advance(now)
        if now >= self.next_probe and not left:
            if self.probe is not None:  # a paused driver woke late: close it out first
                self.finish(now, acked=False)
            self.start(now)
        elif now >= self.next_probe:
            self.next_probe = now + self.config.probe_interval

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def new_round(self, ids: list[str]) -> None:
        """Start a probe round over ``ids`` (kept, never written)."""
        self.order, self.joined, self.moved, self.index = ids, [], {}, 0

    def _next_target(self) -> Member | None:
        members = self.core.table.members  # Core.members, without the property's call
        for _ in range(2):
            order, joined, moved = self.order, self.joined, self.moved
            size = len(order)
            n = size + len(joined)
            while self.index < n:
                # One step of a Fisher-Yates shuffle: a uniform pick among the
                # members not yet probed this round, swapped into place i.
                i = self.index
                j = i + below(self.rng, n - i)
                here = moved.pop(i, None)
                if here is None:
                    here = order[i] if i < size else joined[i - size]
                pick = here
                if j != i:
                    there = moved.get(j)
                    pick = (
                        there if there is not None else order[j] if j < size else joined[j - size]
                    )
                    moved[j] = here
                self.index = i + 1
                m = members.get(pick)
                if m is not None and m.serving and m.id != self.core.id:
                    return m
            # Round over: a new one over who is there now (memberlist resetNodes).
            self.new_round(self.core.table.lend_ids())
        return None

    def start(self, now: float) -> None:
        cfg = self.config
        # Lifeguard stretches both by our awareness.
        factor = self.awareness.factor if cfg.lifeguard else 1
        interval = cfg.probe_interval * factor
        self.next_probe = now + interval
        target = self._next_target()
        if target is None:
            return
        timeout = cfg.probe_timeout * factor
        seq = self._next_seq()
        buddy = None
        if cfg.lifeguard and target.status is Status.SUSPECT:
            buddy = target.update_for(Status.SUSPECT, self.core.id)
        members, states = self.core.gossip.piggyback(target.id)
        core = self.core
        core._send(
            target.address,
            _probe_ping(core.id, seq, core.address, target.id, buddy, members, states),
            target.id,
        )
        self.probe = _Probe(target.id, seq, now + timeout, now + interval, sent=now)

    def probe_now(self, target: Member, now: float, force: bool = False) -> bool:
        """One direct ping to ``target`` now, out of turn; False when rate-limited.

        Asked for when a connection with the member ended without a goodbye
        (``Core.report_closed``).  Nothing waits for its ack and a missing
        ack raises nothing: its only job is to make the transport connect
        again, so that a crashed member's refusal is seen at once.  One per
        member per probe interval, ``MAX_OUT_OF_TURN`` in all; ``force`` (the
        last check of a suspicion, at most one per suspicion) skips the limits.
        """
        if not force and not self._out_of_turn_ok(target.id, now):
            return False
        buddy = None
        if self.config.lifeguard and target.status is Status.SUSPECT:
            buddy = target.update_for(Status.SUSPECT, self.core.id)
        self.core._send(
            target.address,
            Ping(
                self.core.id,
                seq=self._next_seq(),
                source_addr=self.core.address,
                target=target.id,
                suspicion=buddy,
            ),
            target.id,
        )
        self.core.counters["out-of-turn-probes"] += 1
        return True

    def _out_of_turn_ok(self, member: str, now: float) -> bool:
        """Take one out-of-turn probe of ``member`` from the limits, if they allow it."""
        interval = self.config.probe_interval
        last = self.out_of_turn.get(member)
        if last is not None and now - last < interval:
            return False
        if len(self.out_of_turn) >= MAX_OUT_OF_TURN:
            for m in [m for m, t in self.out_of_turn.items() if now - t >= interval]:
                del self.out_of_turn[m]
            if len(self.out_of_turn) >= MAX_OUT_OF_TURN:
                self.core.counters["out-of-turn-dropped"] += 1
                return False
        self.out_of_turn[member] = now
        return True

    def advance(self, now: float) -> None:
        p = self.probe
        assert p is not None
        if not p.indirect and now >= p.ack_deadline:
            p.indirect = True
            target = self.core.members.get(p.target)
            if target is None:
                self.probe = None
                return
            helpers = self.core._random_members(
                self.config.indirect_checks,
                lambda m: m.status is Status.ALIVE and m.id not in (self.core.id, p.target),
            )
            p.expected_nacks = len(helpers)
            for h in helpers:
                self.core._send(
                    h.address,
                    IndirectPing(
                        self.core.id,
                        seq=p.seq,
                        source_addr=self.core.address,
                        target=target.id,
                        target_addr=target.address,
                        nack=True,
                    ),
                    h.id,
                )
        if p.indirect and now >= p.end:
            self.finish(now, acked=False)

    def finish(self, now: float, acked: bool) -> None:
        p = self.probe
        assert p is not None
        self.probe = None
        if acked:
            if self.config.lifeguard:
                self.awareness.apply(-1)
            return
        if self.config.lifeguard:
            self.awareness.apply(failed_probe_delta(p.expected_nacks, p.nacks))
        m = self.core.members.get(p.target)
        if m is None or not m.serving:
            return
        self.core.counters["probe-failures"] += 1
        # On a member already suspected (by someone else's word) our failed
        # probe is an independent confirmation: counted and passed on, it
        # shortens the suspicion (Lifeguard; memberlist's suspectNode does
        # the same).  Without it only the few nodes that probe the member
        # before the first suspicion reaches them could confirm it.
        self.core._apply(m.update_for(Status.SUSPECT, self.core.id), now)

    def on_nack(self, msg: Nack, now: float) -> None:
        if self.probe is not None and self.probe.seq == msg.seq and self.probe.indirect:
            self.probe.nacks += 1

    def on_ping(self, msg: Ping, now: float) -> None:
        if msg.target != self.core.id:
            self.core.counters["misdirected"] += 1
            return
        if msg.suspicion is not None and msg.suspicion.member == self.core.id:
            self.core._about_me(msg.suspicion, now)
        addr = msg.source_addr or self.core._address_of(msg.source)
        if addr is None:
            return
        members, states = self.core.gossip.piggyback(msg.source)
        c = self.coord
        coord = c.vec + (c.error, c.height)  # one concatenation: every ack carries it
        self.core._send(addr, _ack(self.core.id, msg.seq, members, states, coord), msg.source)

    def on_ack(self, msg: Ack, now: float) -> None:
        p = self.probe
        if p is not None and p.seq == msg.seq:
            if msg.coord is not None and msg.source == p.target:
                self.observe_rtt(p.target, msg.coord, now - p.sent)
            self.finish(now, acked=True)
            return
        relay = self.relays.pop(msg.seq, None)
        if relay is not None:
            self.core._send(
                relay.requester_addr, Ack(self.core.id, seq=relay.requester_seq), relay.requester
            )

    def on_indirect_ping(self, msg: IndirectPing, now: float) -> None:
        seq = self._next_seq()
        self.relays[seq] = _Relay(
            msg.source,
            msg.source_addr,
            msg.seq,
            now + nack_timeout(self.config.probe_timeout),
            msg.nack,
        )
        self.core._send(
            msg.target_addr,
            Ping(self.core.id, seq=seq, source_addr=self.core.address, target=msg.target),
            msg.target,
        )

    def observe_rtt(self, member: str, raw: tuple[float, ...], rtt: float) -> None:
        """A direct probe's round trip: place the peer, nudge our coordinate (Vivaldi)."""
        dims = self.vivaldi.dimensionality
        if len(raw) != dims + 2 or rtt <= 0:
            self.core.counters["bad-coordinate"] += 1
            return
        vec, error, height = raw[:dims], raw[dims], raw[dims + 1]
        b = self.vivaldi.bound
        # vivaldi.within, spelled out (every ack): finite but far outside
        # what a round trip gives (1e100), the update would carry us, and
        # through our acks the mesh, there.
        if height > b or max(vec) > b or min(vec) < -b:
            self.core.counters["bad-coordinate"] += 1
            return
        # The rest of vivaldi.coordinate's checks, without building the
        # coordinate (NaN fails every comparison; a NaN component makes the
        # update below raise).  The ack's own check already made every value
        # a finite float.
        if not (0 < error < math.inf and height >= 0):
            self.core.counters["bad-coordinate"] += 1
            return
        try:
            coord = vivaldi_update_from(self.coord, vec, error, height, rtt, self.vivaldi, self.rng)
        except ValueError:
            # Both coordinates are inside the bound, so nothing overflows;
            # should it ever raise, the peer's input is counted, never
            # raised into the driver.
            self.core.counters["bad-coordinate"] += 1
            return
        self.placed.put(member, raw)
        self.coord = coord

    def estimated_rtt(self, member: str) -> float | None:
        """Predicted round trip to ``member`` in seconds, when we have placed it."""
        if member == self.core.id:
            return 0.0
        return self.placed.distance(self.coord, member)

    def expire_relays(self, now: float) -> None:
        if not self.relays:
            return
        for seq in [s for s, r in self.relays.items() if now >= r.deadline]:
            r = self.relays.pop(seq)
            if r.want_nack:
                self.core._send(
                    r.requester_addr, Nack(self.core.id, seq=r.requester_seq), r.requester
                )
