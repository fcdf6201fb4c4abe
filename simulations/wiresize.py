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
an empty message of each type), so a new field is picked up: a plain ``int``,
``str`` or ``bool`` field by the kind of its default, the structured ones by
name (:data:`_STRUCTURED`).  A message type with a field of another kind is
measured by encoding it (slow, exact).

The simulator sizes every message it sends, so each type gets its own sizing
function, generated at import from its layout: one expression per field, the
bytes that do not depend on the values (the length prefix, the map header,
every key, booleans, the empty-container and nil headers) folded into one
constant.  Each generated function is checked against ``message_size`` on the
type's empty message before it is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from operator import attrgetter
from typing import Any, cast

import msgpack

from meshd.wire import MESSAGE_CLASSES, WIRE_VERSION, Message, message_size, message_to_wire

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


def int_size(v: int) -> int:
    """msgpack bytes of any int (negative ones included)."""
    if v >= 0:
        return uint_size(v)
    if v >= -32:
        return 1
    if v >= -(1 << 7):
        return 2
    if v >= -(1 << 15):
        return 3
    if v >= -(1 << 31):
        return 5
    return 9


def container_header(n: int) -> int:
    """Header bytes of an array or a map of ``n`` entries."""
    if n < 16:
        return 1
    if n < 65536:
        return 3
    return 5


def _packed_len(x: Any) -> int:
    return len(msgpack.packb(x, use_bin_type=True))


#: Fields whose kind the default does not tell, by name.
#: - "sized": a tuple of MemberUpdate or SignedState (each knows its ``.size``);
#: - "opt_sized": one of them, or None;
#: - "packed": a digest map, packed (in C, faster than a Python loop over a big map);
#: - "coord": a tuple of floats (float64, 9 bytes each), or None.
_STRUCTURED = {
    "members": "sized",
    "states": "sized",
    "suspicion": "opt_sized",
    "digest": "packed",
    "coord": "coord",
}

# Per kind: (bytes of the value when it equals the type's empty message, so
# folded into the constant; code lines adding the rest, with {a} the field).
_CODE = {
    # Booleans are one byte either way.
    "bool": (1, []),
    "int": (0, ["v = m.{a}", "n += 1 if 0 <= v < 128 else _int_size(v)"]),
    "str": (
        0,
        ["s = m.{a}", "k = len(s)", "n += k + 1 if k < 32 and s.isascii() else _str_size(s)"],
    ),
    "sized": (
        1,
        [
            "x = m.{a}",
            "if x:",
            "    k = len(x)",
            "    n += (0 if k < 16 else 2 if k < 65536 else 4) + sum(map(_size, x))",
        ],
    ),
    "opt_sized": (1, ["x = m.{a}", "if x is not None:", "    n += x.size - 1"]),
    "packed": (1, ["x = m.{a}", "if x:", "    n += _packed_len(x) - 1"]),
    "coord": (
        1,
        [
            "x = m.{a}",
            "if x is not None:",
            "    k = len(x)",
            "    n += (0 if k < 16 else 2 if k < 65536 else 4) + 9 * k",
        ],
    ),
}

_NAMESPACE = {
    "_int_size": int_size,
    "_str_size": str_size,
    "_size": attrgetter("size"),
    "_packed_len": _packed_len,
}


def _kind(f: dataclasses.Field[Any]) -> str | None:
    """How to size field ``f`` (a key of ``_CODE``), or None when unknown."""
    if f.name in _STRUCTURED:
        return _STRUCTURED[f.name]
    default = f.default
    if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    # bool before int: True is an int too.
    for kind, t in (("bool", bool), ("int", int), ("str", str)):
        if type(default) is t:
            return kind
    return None


def _sizer(cls: type[Message]) -> Callable[[Message], int]:
    """The sizing function of one message type (``message_size`` if a field is unknown)."""
    fields = [f for f in dataclasses.fields(cls) if f.name not in ("source", "size")]
    keys = list(message_to_wire(cls("a/b")))  # every field has a default
    # message_to_wire: "v", "t", "f", then one key per field in declaration order.
    assert keys[:3] == ["v", "t", "f"] and len(keys) == 3 + len(fields), keys
    fixed = _LEN_PREFIX + container_header(len(keys))
    fixed += sum(str_size(k) for k in keys)
    fixed += uint_size(WIRE_VERSION) + uint_size(int(cls.TYPE))
    body = [line.format(a="source") for line in _CODE["str"][1]]
    for f in fields:
        kind = _kind(f)
        if kind is None:
            return message_size
        base, lines = _CODE[kind]
        fixed += base
        body += [line.format(a=f.name) for line in lines]
    name = f"_size_{cls.__name__}"
    src = f"def {name}(m):\n    n = {fixed}\n" + "".join(f"    {x}\n" for x in body)
    src += "    return n\n"
    ns = dict(_NAMESPACE)
    exec(compile(src, f"<wiresize {cls.__name__}>", "exec"), ns)
    # exec built it from the source above; the check below catches a misread layout.
    fn = cast(Callable[[Message], int], ns[name])
    sample = cls("a/b")
    if fn(sample) != message_size(sample):  # a layout this module misreads
        return message_size
    return fn


#: Message type -> its sizing function.  The hot path of the simulator looks
#: the function up itself (``SIZERS[type(msg)](msg)``) to save a call.
SIZERS: dict[type[Message], Callable[[Message], int]] = {
    cls: _sizer(cls) for cls in MESSAGE_CLASSES.values()
}


def wire_size(msg: Message) -> int:
    """Bytes ``msg`` takes on the wire, length prefix included (== ``wire.message_size``)."""
    return SIZERS[type(msg)](msg)
