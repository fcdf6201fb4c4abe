"""Member states and the table of moves between them.

Theory of operation.  Every member of a pool holds a view of every other: a
status and an incarnation number.  Only the member itself raises its
incarnation, and it does so to refute a suspicion or death claim about it, so
an incarnation orders claims about one member: a claim at a higher incarnation
is newer information.  Claims arrive by gossip in any order; the table below
says which claim may move which status, and at which incarnation.

- ``alive`` at a *higher* incarnation overrides anything: the member spoke.
- ``suspect``, ``dead`` and ``left`` at the *same or higher* incarnation
  override ``alive``: they were said about the member's latest life.

Trust.  Alive and left are the member's own word and carry its signature
(``MemberUpdate.claim``); the node checks it before it applies one, and takes
incarnation, address, region and zone from the signed body alone.  Suspect
and dead are accusations by others, unsigned; :func:`decide` lets one count
only at *exactly* the incarnation the receiver holds, which some signed claim
put there.  So no one but the member can move its incarnation, and every
accusation can be refuted by the member's next signed claim.
- ``suspect`` on ``suspect`` is not a move but a confirmation from another
  accuser, which shortens the suspicion timer (Lifeguard).
- ``dead`` and ``left`` are final for that incarnation; only a newer ``alive``
  brings the member back (a restart, or a refutation after a partition).
- Claims about a member we have never seen are ignored unless they say
  ``alive``: we cannot probe what we cannot address.

A pair missing from the table is not a move: the claim is stale and ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from meshd.wire import MemberUpdate, SignedClaim, Status


class Rule(enum.Enum):
    ANY = "any incarnation"
    NEWER = "incarnation greater than ours"
    AT_LEAST = "incarnation at least ours"


class Move(enum.Enum):
    IGNORE = "ignore"
    APPLY = "apply"
    CONFIRM = "confirm"


A, S, D, L = Status.ALIVE, Status.SUSPECT, Status.DEAD, Status.LEFT
#: Claims others make about a member; unsigned, so bound to the held incarnation.
ACCUSATIONS = frozenset((S, D))

#: (current status, None when unknown; claimed status) -> rule the claim must meet.
TRANSITIONS: dict[tuple[Status | None, Status], Rule] = {
    (None, A): Rule.ANY,
    (A, A): Rule.NEWER,
    (A, S): Rule.AT_LEAST,
    (A, D): Rule.AT_LEAST,
    (A, L): Rule.AT_LEAST,
    (S, A): Rule.NEWER,
    (S, S): Rule.AT_LEAST,  # a confirmation, not a move
    (S, D): Rule.AT_LEAST,
    (S, L): Rule.AT_LEAST,
    (D, A): Rule.NEWER,
    (D, L): Rule.AT_LEAST,  # a late leave notice: record the operator's intent
    (L, A): Rule.NEWER,
}


@dataclass(frozen=True, slots=True)
class Member:
    """Our view of one member.  ``since`` is when ``status`` last changed.

    Immutable: a change replaces the member in its table, so cores that share
    a member table (a simulator's copy-on-write snapshot) never see each
    other's changes.
    """

    #: The member id, ``cluster/node``.
    id: str
    address: str
    region: str
    zone: str
    incarnation: int
    status: Status
    since: float
    #: The member's own signed claim at ``incarnation`` (alive, or left):
    #: passed on with every alive or left update, so others verify it too.
    claim: SignedClaim | None = None
    #: Counted in the pool: alive or suspected (not yet dead).  Derived from
    #: ``status`` when the member is made, as ``cluster`` from ``id``: every
    #: probe and gossip round reads them.
    serving: bool = field(init=False, repr=False, compare=False)
    #: The cluster part of ``id``.
    cluster: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "serving", self.status in (Status.ALIVE, Status.SUSPECT))
        object.__setattr__(self, "cluster", self.id.partition("/")[0])

    @property
    def name(self) -> str:
        return self.id.partition("/")[2]

    def update_for(self, status: Status, by: str) -> MemberUpdate:
        # Accusations go without the claim: they name the incarnation the
        # receiver must already hold, and stay small (they are the frequent ones).
        claim = self.claim if status in (Status.ALIVE, Status.LEFT) else None
        return MemberUpdate(
            status, self.id, self.incarnation, self.address, self.region, self.zone, by, claim
        )


def decide(current: Member | None, claim: MemberUpdate) -> Move:
    """What a claim does to our view: ignore it, apply it, or count a confirmation."""
    cur_status = current.status if current is not None else None
    rule = TRANSITIONS.get((cur_status, claim.status))
    if rule is None:
        return Move.IGNORE
    if current is not None:
        if rule is Rule.NEWER and claim.incarnation <= current.incarnation:
            return Move.IGNORE
        if rule is Rule.AT_LEAST and claim.incarnation < current.incarnation:
            return Move.IGNORE
        if claim.status in ACCUSATIONS and claim.incarnation != current.incarnation:
            # Beyond what the member signed: nobody may invent its next life.
            return Move.IGNORE
    if cur_status is Status.SUSPECT and claim.status is Status.SUSPECT:
        return Move.CONFIRM
    return Move.APPLY
