import pytest

from meshd.protocol.members import TRANSITIONS, Member, Move, decide
from meshd.wire import MemberUpdate, Status

A, S, D, L = Status.ALIVE, Status.SUSPECT, Status.DEAD, Status.LEFT


def member(status, inc):
    return Member("east/n1", "127.0.0.1:1", "", "", inc, status, 0.0)


def claim(status, inc):
    return MemberUpdate(status, "east/n1", inc, "127.0.0.1:1", by="east/n2")


def test_unknown_member_only_alive_is_accepted():
    assert decide(None, claim(A, 0)) is Move.APPLY
    for s in (S, D, L):
        assert decide(None, claim(s, 5)) is Move.IGNORE


@pytest.mark.parametrize(
    "cur, new, inc, expected",
    [
        (A, A, 3, Move.IGNORE),  # alive needs a strictly newer incarnation
        (A, A, 4, Move.APPLY),
        (A, S, 3, Move.APPLY),
        (A, S, 2, Move.IGNORE),  # stale suspicion, already refuted
        (S, S, 3, Move.CONFIRM),
        (S, A, 3, Move.IGNORE),
        (S, A, 4, Move.APPLY),  # refutation
        (S, D, 3, Move.APPLY),
        (D, S, 9, Move.IGNORE),  # dead is final for a life
        (D, D, 9, Move.IGNORE),
        (D, A, 3, Move.IGNORE),
        (D, A, 4, Move.APPLY),  # a new life
        (D, L, 3, Move.APPLY),
        (L, D, 9, Move.IGNORE),
        (L, A, 4, Move.APPLY),
    ],
)
def test_moves(cur, new, inc, expected):
    assert decide(member(cur, 3), claim(new, inc)) is expected


def test_every_pair_outside_the_table_is_ignored():
    for cur in (None, A, S, D, L):
        for new in (A, S, D, L):
            if (cur, new) not in TRANSITIONS:
                m = None if cur is None else member(cur, 0)
                assert decide(m, claim(new, 100)) is Move.IGNORE
