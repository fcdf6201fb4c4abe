"""Exact wire sizes of messages, without encoding them.

The simulator passes message objects (``Cluster(encode=False)``) and counts
the bytes each would take on the wire.  Encoding every message costs more
than the protocol work it carries, so :func:`wire_size` adds up msgpack's
sizes instead: the immutable parts already know their own encoded size
(``MemberUpdate.size``, ``SignedState.size``, computed once when built and
shared by every node that holds them), and the rest are headers, short
strings and integers whose msgpack sizes are fixed by their values.

What must stay true: ``wire_size(m) == meshd.wire.message_size(m)`` for every
message (tests/test_simulations.py checks real messages of every type).  The
field layout is read from the wire module at import (``message_to_wire`` of
an empty message of each type), so a new field is picked up; a field whose
kind this module does not know is measured by encoding it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgpack

from meshd.wire import MESSAGE_CLASSES, WIRE_VERSION, Message, message_to_wire

_LEN_PREFIX = 4


def str_size(s: str) -> int:
    n = len(s) if s.isascii() else len(s.encode("utf-8"))
    if n < 32:
        return 1 + n
    if n < 256:
        return 2 + n
    if n < 65536:
        return 3 + n
    return 5 + n


def uint_size(v: int) -> int:
    if v < 128:
        return 1
    if v < 256:
        return 2
    if v < 65536:
        return 3
    if v < 1 << 32:
        return 5
    return 9


def container_header(n: int) -> int:
    """Header bytes of an array or a map of ``n`` entries."""
    if n < 16:
        return 1
    if n < 65536:
        return 3
    return 5


def _sized_seq(items: Any) -> int:
    # MemberUpdate and SignedState carry their own encoded size.
    return container_header(len(items)) + sum(x.size for x in items)


def _opt_sized(x: Any) -> int:
    return 1 if x is None else x.size


def _bool(x: Any) -> int:
    return 1


def _str(x: Any) -> int:
    return str_size(x)


def _uint(x: Any) -> int:
    return uint_size(x)


def _packed(x: Any) -> int:
    return len(msgpack.packb(x, use_bin_type=True))


def _coord(x: Any) -> int:
    # Python floats pack as float64: 9 bytes each.
    return 1 if x is None else container_header(len(x)) + 9 * len(x)


#: How to size a field's value, by field name.  Digests are packed (in C,
#: faster than a Python loop over a big map); everything else is arithmetic.
_SIZERS: dict[str, Callable[[Any], int]] = {
    "seq": _uint,
    "view": _uint,
    "source_addr": _str,
    "target": _str,
    "target_addr": _str,
    "nack": _bool,
    "join": _bool,
    "sync": _bool,
    "suspicion": _opt_sized,
    "members": _sized_seq,
    "states": _sized_seq,
    "digest": _packed,
    "coord": _coord,
}


def _layout(cls: type[Message]) -> tuple[int, tuple[tuple[str, int, Callable[[Any], int]], ...]]:
    """(fixed bytes, ((field, key bytes, sizer), ...)) for one message type."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "size")]
    sample = cls("a/b")  # every field has a default
    keys = list(message_to_wire(sample))
    # message_to_wire: "v", "t", "f", then one key per field in declaration order.
    assert keys[:3] == ["v", "t", "f"] and len(keys) == 3 + len(names), keys
    fixed = _LEN_PREFIX + container_header(len(keys))
    fixed += str_size("v") + uint_size(WIRE_VERSION) + str_size("t") + uint_size(int(cls.TYPE))
    fixed += str_size("f")
    fields = []
    for name, key in zip(names, keys[3:], strict=True):
        sizer = _SIZERS.get(name)
        if sizer is None:
            sizer = _fallback(name)
        fields.append((name, str_size(key), sizer))
    return fixed, tuple(fields)


def _fallback(name: str) -> Callable[[Any], int]:
    """Size an unknown field by encoding the message it sits in (slow, exact)."""

    def sizer(x: Any) -> int:
        raise _Unknown(name)

    return sizer


class _Unknown(Exception):
    pass


_LAYOUTS = {cls: _layout(cls) for cls in MESSAGE_CLASSES.values()}


def wire_size(msg: Message) -> int:
    """Bytes ``msg`` takes on the wire, length prefix included (== ``wire.message_size``)."""
    fixed, fields = _LAYOUTS[type(msg)]
    total = fixed + str_size(msg.source)
    try:
        for name, key_bytes, sizer in fields:
            total += key_bytes + sizer(getattr(msg, name))
    except _Unknown:
        from meshd.wire import message_size

        return message_size(msg)
    return total
