"""One pool's member table, as one core sees it: the members and what is kept beside them.

Beside the ``{member id: Member}`` table it keeps, in step with every change:
the ids in a list (a random member in O(1)), the members dead or left (so
reconnect and reap need not scan everyone), the number of members alive or
suspected (the ``n`` of every formula) and the view fingerprint (an XOR of
:func:`view_term` over the members: equal views, equal numbers, so a sync
compares two integers to decide whether member lists must flow).

Every change goes through :meth:`MemberTable.add`, :meth:`MemberTable.remove`
and :meth:`MemberTable.set_status`, which keep all of it true.  A table can be
shared copy-on-write (:meth:`MemberTable.share`): a simulator's ten thousand
cores of one cluster start from one table instead of ten thousand copies, and
whichever changes first copies first, so none sees another's changes.
"""

from __future__ import annotations

import dataclasses
import hashlib

from meshd.protocol.members import Member
from meshd.wire import SignedClaim, Status


def view_term(m: Member) -> int:
    """A member's contribution to the view fingerprint (order-free, via XOR)."""
    key = f"{m.id}|{int(m.status)}|{m.incarnation}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class MemberTable:
    """The members of one pool as one core sees them (see module doc)."""

    __slots__ = ("members", "ids", "gone", "serving", "view", "_shared", "_ids_lent")

    def __init__(self) -> None:
        self.members: dict[str, Member] = {}
        self.ids: list[str] = []
        self.gone: set[str] = set()
        #: Members alive or suspected.
        self.serving = 0
        #: XOR of view_term over the members.
        self.view = 0
        #: True while the containers are also another table's: copy first.
        self._shared = False
        #: True while a reader holds ``ids`` (:meth:`lend_ids`): copy it first.
        self._ids_lent = False

    def __len__(self) -> int:
        return len(self.members)

    def share(self) -> MemberTable:
        """A second handle on the same containers; both copy before their next change."""
        self._shared = True
        other = MemberTable()
        other.members, other.ids, other.gone = self.members, self.ids, self.gone
        other.serving, other.view, other._shared = self.serving, self.view, True
        return other

    def lend_ids(self) -> list[str]:
        """The id list as it is now, for a reader that keeps it (a probe
        round's order): the table copies the list before it next adds or
        removes a member, so what the reader holds never changes.  The
        reader must not change it either."""
        self._ids_lent = True
        return self.ids

    def _own(self) -> None:
        if self._shared:
            self.members = dict(self.members)
            self.ids = list(self.ids)
            self.gone = set(self.gone)
            self._shared = False
            self._ids_lent = False

    def _own_ids(self) -> None:
        self._own()
        if self._ids_lent:
            self.ids = list(self.ids)
            self._ids_lent = False

    def add(self, m: Member) -> None:
        """A member not in the table yet."""
        self._own_ids()
        self.members[m.id] = m
        self.view ^= view_term(m)
        self.ids.append(m.id)
        if m.serving:
            self.serving += 1
        elif m.status in (Status.DEAD, Status.LEFT):
            self.gone.add(m.id)

    def remove(self, member: str) -> Member:
        """Forget a member (reaped); returns it."""
        self._own_ids()
        m = self.members.pop(member)
        self.view ^= view_term(m)
        if m.serving:
            self.serving -= 1
        self.gone.discard(member)
        # O(n), but a member is removed only when reaped, long after its death.
        pos = self.ids.index(member)
        last = self.ids.pop()
        if last != member:
            self.ids[pos] = last
        return m

    def set_status(
        self,
        m: Member,
        status: Status,
        now: float,
        incarnation: int | None = None,
        *,
        address: str | None = None,
        region: str | None = None,
        zone: str | None = None,
        claim: SignedClaim | None = None,
    ) -> Member:
        """The one place a known member's status, incarnation, address, region,
        zone or claim changes (those left None stay); returns the new member."""
        self._own()
        new = dataclasses.replace(
            m,
            status=status,
            since=now if status is not m.status else m.since,
            incarnation=m.incarnation if incarnation is None else incarnation,
            address=m.address if address is None else address,
            region=m.region if region is None else region,
            zone=m.zone if zone is None else zone,
            claim=m.claim if claim is None else claim,
        )
        self.members[m.id] = new
        self.view ^= view_term(m) ^ view_term(new)
        self.serving += int(new.serving) - int(m.serving)
        if status in (Status.DEAD, Status.LEFT):
            self.gone.add(m.id)
        else:
            self.gone.discard(m.id)
        return new
