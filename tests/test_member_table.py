"""The member table keeps its side tables true through every change, and shares copy-on-write."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshd.protocol.member_table import MemberTable, view_term
from meshd.protocol.members import Member
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
