"""The member table keeps its side tables true through every change, and shares copy-on-write."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol.config import Config
from meshd.protocol.member_table import MemberTable, view_term
from meshd.protocol.members import Member
from meshd.protocol.prober import Prober
from meshd.wire import Status


def member(i: int, status: Status = Status.ALIVE, inc: int = 1) -> Member:
    return Member(f"east/n{i}", f"127.0.0.1:{7000 + i}", "r1", "z1", inc, status, 0.0)


def consistent(t: MemberTable) -> bool:
    ms = t.members.values()
    return (
        sorted(t.ids) == sorted(t.members)
        and t.gone == {m.id for m in ms if m.status in (Status.DEAD, Status.LEFT)}
        and t.serving == sum(1 for m in ms if m.serving)
        and t.view == _xor(view_term(m) for m in ms)
    )


def _xor(values: object) -> int:
    out = 0
    for v in values:  # type: ignore[attr-defined]
        out ^= v
    return out


ops = st.lists(
    st.tuples(st.integers(0, 9), st.sampled_from(list(Status)), st.integers(0, 3)), max_size=60
)


@given(ops)
def test_side_tables_follow_every_change(steps: list[tuple[int, Status, int]]) -> None:
    t = MemberTable()
    for i, status, inc in steps:
        node = f"east/n{i}"
        cur = t.members.get(node)
        if cur is None:
            t.add(member(i, status, inc))
        elif inc == 0:
            t.remove(node)
        else:
            t.set_status(cur, status, 1.0, inc)
        assert consistent(t)


def test_a_shared_table_is_copied_by_whichever_changes_first() -> None:
    a = MemberTable()
    for i in range(3):
        a.add(member(i))
    b = a.share()
    assert b.members is a.members
    b.set_status(b.members["east/n1"], Status.DEAD, 2.0)
    assert a.members["east/n1"].status is Status.ALIVE and a.serving == 3
    assert b.members["east/n1"].status is Status.DEAD and b.serving == 2
    a.remove("east/n2")
    assert "east/n2" in b.members and "east/n2" not in a.members
    assert consistent(a) and consistent(b)


@given(ops)
def test_lent_ids_never_change_and_the_table_stays_true(
    steps: list[tuple[int, Status, int]],
) -> None:
    """What lend_ids returned (a probe round's order) is never written, by
    adds, removes or a share; the table goes on as if it had lent nothing."""
    t = MemberTable()
    for i in range(4):
        t.add(member(i))
    lent = t.lend_ids()
    frozen = list(lent)
    other = t.share()
    for i, status, inc in steps:
        m = t.members.get(f"east/n{i}")
        if m is None:
            t.add(member(i, status, inc))
        elif inc == 0:
            t.remove(m.id)
        else:
            t.set_status(m, status, 1.0, incarnation=m.incarnation + inc)
        if i % 3 == 0:
            lent = t.lend_ids()  # a new round lends again
            frozen = list(lent)
        assert lent == frozen
        assert consistent(t)
    assert sorted(other.ids) == [f"east/n{i}" for i in range(4)]


class _ProberHost:
    """What a Prober reads of its core: the id, the table, the members."""

    def __init__(self, n: int) -> None:
        self.id = member(0).id
        self.table = MemberTable()
        for i in range(n):
            self.table.add(member(i))

    @property
    def members(self) -> dict[str, Member]:
        return self.table.members


def test_a_probe_round_takes_every_member_once_newcomers_included() -> None:
    host = _ProberHost(7)
    p = Prober(host, Config.lan(), random.Random(1))  # type: ignore[arg-type]
    others = {member(i).id for i in range(1, 7)}

    def take(k: int) -> list[str]:
        out = []
        for _ in range(k):
            m = p._next_target()
            assert m is not None
            out.append(m.id)
        return out

    rounds = [take(6) for _ in range(3)]
    assert all(sorted(r) == sorted(others) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # shuffled anew each round
    # A member that joins mid-round is probed within that round (Core._add_member
    # adds it to the table and to the round); one reaped mid-round is not.
    first = take(3)
    host.table.add(member(9))
    p.joined.append(member(9).id)
    gone = next(i for i in others if i not in first)
    host.table.remove(gone)
    rest = take(3)
    assert sorted(first + rest) == sorted((others - {gone}) | {member(9).id})
    assert sorted(take(6)) == sorted((others - {gone}) | {member(9).id})
