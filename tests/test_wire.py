"""Tests for meshd.wire: round trips, caps enforced before allocation, and that
peer bytes never raise (STYLE 4) while our own misuse does."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd import wire
from meshd.wire import (
    MAX_APPS_PER_ORIGIN,
    MAX_FRAME_BYTES,
    MAX_LIST_LEN,
    MAX_MAP_LEN,
    MAX_META_BYTES,
    MAX_META_PAIRS,
    MAX_NAME_LEN,
    MAX_ORIGIN_BODY_BYTES,
    WIRE_VERSION,
    Ack,
    AppRecord,
    FrameDecoder,
    Gossip,
    IndirectPing,
    MemberUpdate,
    Message,
    MsgType,
    Nack,
    OriginState,
    Ping,
    PushPull,
    PushPullReply,
    Rejection,
    Revocations,
    SignedState,
    Status,
    WireError,
    decode_message,
    encode_frame,
    encode_message,
    message_size,
    message_to_wire,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ADDR = "127.0.0.1:7946"


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def frame_of(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def decode_frames(data: bytes, chunk: int | None = None) -> list[Message | Rejection]:
    """Feed ``data`` to a fresh FrameDecoder, whole or ``chunk`` bytes at a time."""
    dec = FrameDecoder()
    if chunk is None:
        out = dec.feed(data)
    else:
        out = []
        for i in range(0, len(data), chunk):
            out += dec.feed(data[i : i + chunk])
    assert dec.pending == 0
    return out


def update(
    node: str = "east/n2",
    status: Status = Status.ALIVE,
    incarnation: int = 3,
    by: str = "",
) -> MemberUpdate:
    return MemberUpdate(status, node, incarnation, "127.0.0.2:7946", "us-east", "a", by)


def origin_state(version: int = 7, apps: int = 2) -> OriginState:
    recs = tuple(
        AppRecord(
            app="web",
            instance=f"web-{i}",
            address="192.0.2.5",
            port=8080 + i,
            meta=AppRecord.make_meta({"rev": f"r{i}", "tier": "front"}),
            weight=10,
            health="warning" if i else "passing",
            protocol="grpc",
        )
        for i in range(apps)
    )
    return OriginState("n1", "east", "us-east", "a", version, recs)


def signed(state: OriginState | None = None) -> SignedState:
    state = state or origin_state()
    return SignedState(state.origin, state.version, state.encode(), b"\x01" * 64, b"cert" * 40)


# ---------------------------------------------------------------------------
# Round trips of every message type, hand-built.


def all_messages() -> list[Message]:
    members = (update(), update("west/n9", Status.DEAD, 12, by="east/n1"))
    states = (signed(), signed(origin_state(version=8, apps=0)))
    suspicion = update("east/n1", Status.SUSPECT, 4, by="east/n3")
    return [
        Ping("east/n1", seq=1, source_addr=ADDR, target="east/n2"),
        Ping(
            "east/n3",
            seq=2**32 - 1,
            source_addr=ADDR,
            target="east/n1",
            suspicion=suspicion,
            members=members,
            states=states,
        ),
        IndirectPing(
            "east/n1",
            seq=5,
            source_addr=ADDR,
            target="west/n9",
            target_addr="192.0.2.3:7946",
            nack=False,
            members=members,
        ),
        Ack("east/n2", seq=5, members=members, states=states),
        Nack("east/n4", seq=5),
        Gossip("east/n1", members=members, states=states),
        Gossip("east/n1"),
        PushPull(
            "east/n1",
            source_addr=ADDR,
            join=True,
            digest={"east/n1": 7, "west/n9": 0, "east/n2": 2**63 - 1},
            members=members,
        ),
        PushPullReply("west/n9", digest={"east/n1": 8}, members=members, states=states),
        Revocations("east/n1", crl=b"0\x82\x01\x00" + b"\x00" * 256),
    ]


MESSAGES = all_messages()


def test_every_message_type_is_covered() -> None:
    assert {type(m).TYPE for m in MESSAGES} == set(MsgType)
    assert any(isinstance(m, Ping) and m.suspicion is not None for m in MESSAGES)


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_whole_and_byte_at_a_time(msg: Message) -> None:
    frame = encode_frame(msg)
    assert decode_message(frame[4:]) == msg
    assert decode_frames(frame) == [msg]
    assert decode_frames(frame, chunk=1) == [msg]


def test_stream_of_all_messages_in_odd_chunks() -> None:
    stream = b"".join(encode_frame(m) for m in MESSAGES)
    for chunk in (None, 1, 3, 7, 4096):
        assert decode_frames(stream, chunk) == MESSAGES


def test_decoded_suspicion_is_a_member_update() -> None:
    ping = next(m for m in MESSAGES if isinstance(m, Ping) and m.suspicion)
    got = decode_message(encode_message(ping))
    assert isinstance(got, Ping)
    assert isinstance(got.suspicion, MemberUpdate)
    assert got.suspicion.status is Status.SUSPECT
    assert got.suspicion.by == "east/n3"


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_size_is_frame_length(msg: Message) -> None:
    assert message_size(msg) == len(encode_frame(msg))


def test_member_update_and_signed_state_size() -> None:
    for u in (update(), update("west/n9", Status.LEFT, 2**63 - 1, by="west/n9")):
        assert u.size == len(pack(u.to_wire()))
    for s in (signed(), SignedState("east/n1", 0, b"", b"", b"")):
        assert s.size == len(pack(s.to_wire()))


# ---------------------------------------------------------------------------
# Hypothesis strategies for valid values.

ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_edge = st.sampled_from(ALNUM)
# Names: alphanumeric at both ends, '_', '.', '-' allowed inside (wire._NAME_RE).
names = _edge | st.builds("{}{}{}".format, _edge, st.text(ALNUM + "_.-", max_size=10), _edge)
opt_names = st.just("") | names
member_ids = st.builds(wire.member_id, names, names)
addresses = st.builds(
    "{}.{}.{}.{}:{}".format,
    *[st.integers(0, 255)] * 4,
    st.integers(1, 65535),
) | st.text(max_size=30)
u63 = st.integers(0, 2**63 - 1)
short_text = st.text(max_size=24)

member_updates = st.builds(
    MemberUpdate,
    status=st.sampled_from(Status),
    member=member_ids,
    incarnation=u63,
    address=addresses,
    region=opt_names,
    zone=opt_names,
    by=st.just("") | member_ids,
)

app_records = st.builds(
    AppRecord,
    app=names,
    instance=names,
    address=names | addresses.filter(bool),
    port=st.integers(1, 65535),
    namespace=names,
    protocol=st.sampled_from(wire.PROTOCOLS),
    meta=st.dictionaries(st.text(max_size=12), short_text, max_size=6).map(AppRecord.make_meta),
    weight=st.integers(0, 1_000_000),
    health=st.sampled_from(wire.HEALTH_VALUES),
)

origin_states = st.builds(
    OriginState,
    node=names,
    cluster=names,
    region=opt_names,
    zone=opt_names,
    version=u63,
    apps=st.lists(app_records, max_size=4, unique_by=lambda r: r.instance).map(tuple),
    host=st.sampled_from(["", "10.0.0.7", "fd00::7", "node-7.example"]),
    node_meta=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True), st.text(max_size=12), max_size=3
    ).map(lambda d: tuple(sorted(d.items()))),
)

signed_states = st.builds(
    SignedState,
    origin=member_ids,
    version=u63,
    body=st.binary(max_size=64) | origin_states.map(OriginState.encode),
    signature=st.binary(max_size=64),
    cert=st.binary(max_size=128),
)

updates_t = st.lists(member_updates, max_size=3).map(tuple)
states_t = st.lists(signed_states, max_size=2).map(tuple)
seqs = st.integers(0, 2**32 - 1)
digests = st.dictionaries(member_ids, u63, max_size=4)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        Ping,
        source=member_ids,
        seq=seqs,
        source_addr=addresses,
        target=member_ids,
        suspicion=st.none() | member_updates,
        members=updates_t,
        states=states_t,
    ),
    st.builds(
        IndirectPing,
        source=member_ids,
        seq=seqs,
        source_addr=addresses,
        target=member_ids,
        target_addr=addresses,
        nack=st.booleans(),
        members=updates_t,
        states=states_t,
    ),
    st.builds(Ack, source=member_ids, seq=seqs, members=updates_t, states=states_t),
    st.builds(Nack, source=member_ids, seq=seqs),
    st.builds(Gossip, source=member_ids, members=updates_t, states=states_t),
    st.builds(
        PushPull,
        source=member_ids,
        source_addr=addresses,
        join=st.booleans(),
        digest=digests,
        members=updates_t,
    ),
    st.builds(PushPullReply, source=member_ids, digest=digests, members=updates_t, states=states_t),
)

# JSON-ish values (plus bin), for splicing into frames.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=16)
    | st.binary(max_size=16)
)
json_ish = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=6), kids, max_size=5)
    ),
    max_leaves=20,
)


def is_result(x: object) -> bool:
    return isinstance(x, Message | Rejection)


# ---------------------------------------------------------------------------
# Properties: round trips and canonical encoding.


@PROPERTY
@given(messages)
def test_property_message_round_trip(msg: Message) -> None:
    frame = encode_frame(msg)
    assert decode_message(frame[4:]) == msg
    assert decode_frames(frame, chunk=5) == [msg]
    assert message_size(msg) == len(frame)


@PROPERTY
@given(member_updates)
def test_property_member_update_wire(u: MemberUpdate) -> None:
    assert MemberUpdate.from_wire(u.to_wire()) == u
    assert u.size == len(pack(u.to_wire()))


@PROPERTY
@given(signed_states)
def test_property_signed_state_wire(s: SignedState) -> None:
    assert SignedState.from_wire(s.to_wire()) == s
    assert s.size == len(pack(s.to_wire()))


@PROPERTY
@given(app_records)
def test_property_app_record_wire(rec: AppRecord) -> None:
    assert AppRecord.from_wire(rec.to_wire()) == rec


@PROPERTY
@given(origin_states)
def test_property_origin_state_round_trip_and_deterministic(state: OriginState) -> None:
    body = state.encode()
    assert OriginState.decode(body) == state
    assert state.encode() == body
    # An equal state built separately (meta from a dict in another order) is the same bytes.
    rebuilt = OriginState(
        state.node,
        state.cluster,
        state.region,
        state.zone,
        state.version,
        tuple(
            AppRecord.from_wire(rec.to_wire()[:6] + [dict(reversed(rec.meta))] + rec.to_wire()[7:])
            for rec in state.apps
        ),
    )
    rebuilt = dataclasses.replace(rebuilt, host=state.host, node_meta=state.node_meta)
    assert rebuilt == state
    assert rebuilt.encode() == body
    assert OriginState.decode(body).encode() == body


# ---------------------------------------------------------------------------
# Fuzz: peer bytes never raise.


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_decode_arbitrary_bytes(data: bytes) -> None:
    assert is_result(decode_message(data))
    dec = FrameDecoder()
    assert all(is_result(r) for r in dec.feed(data))


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_origin_state_decode_raises_only_wire_error(data: bytes) -> None:
    # A signed body is peer input too: the verifier must only ever see WireError.
    with contextlib.suppress(WireError):
        assert isinstance(OriginState.decode(data), OriginState)


def _mutate(data: st.DataObject, body: bytes) -> bytes:
    buf = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4), label="n mutations")):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "splice", "replace"]))
        pos = data.draw(st.integers(0, len(buf)), label="pos")
        if op == "flip" and buf:
            i = min(pos, len(buf) - 1)
            buf[i] ^= data.draw(st.integers(1, 255), label="xor")
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16), label="ins")
        else:
            obj = pack(data.draw(json_ish, label="obj"))
            end = pos if op == "splice" else data.draw(st.integers(pos, len(buf)), label="end")
            buf[pos:end] = obj
    return bytes(buf)


@pytest.mark.slow
@FUZZ
@given(origin_states, st.data())
def test_fuzz_mutated_origin_bodies_raise_only_wire_error(
    state: OriginState, data: st.DataObject
) -> None:
    body = _mutate(data, state.encode())
    try:
        got = OriginState.decode(body)
    except WireError:
        return
    assert OriginState.decode(got.encode()) == got


@pytest.mark.slow
@FUZZ
@given(messages, st.data())
def test_fuzz_mutated_frames_never_raise(msg: Message, data: st.DataObject) -> None:
    body = _mutate(data, encode_message(msg))
    assert is_result(decode_message(body))
    # The same body inside a frame, and a mutated whole frame (length prefix included).
    dec = FrameDecoder()
    out = dec.feed(frame_of(body))
    assert len(out) == 1 and is_result(out[0])
    frame = _mutate(data, encode_frame(msg))
    dec = FrameDecoder()
    for i in range(0, len(frame), 3):
        assert all(is_result(r) for r in dec.feed(frame[i : i + 3]))


@pytest.mark.slow
@FUZZ
@given(messages, st.data())
def test_fuzz_fields_replaced_by_random_values(msg: Message, data: st.DataObject) -> None:
    """Structure-aware: swap a field (or a nested element) for a random value."""
    raw = message_to_wire(msg)
    key = data.draw(st.sampled_from(sorted(raw)), label="key")
    value = data.draw(json_ish, label="value")
    target = raw[key]
    if isinstance(target, list) and target and data.draw(st.booleans(), label="nested"):
        i = data.draw(st.integers(0, len(target) - 1), label="i")
        if isinstance(target[i], list) and target[i]:
            j = data.draw(st.integers(0, len(target[i]) - 1), label="j")
            target[i][j] = value
        else:
            target[i] = value
    else:
        raw[key] = value
    result = decode_message(pack(raw))
    assert is_result(result)
    if isinstance(result, Message):
        assert decode_message(encode_message(result)) == result


@pytest.mark.slow
@PROPERTY
@given(st.lists(messages, min_size=1, max_size=3), st.integers(1, 64))
def test_fuzz_stream_split_anywhere(msgs: list[Message], chunk: int) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    assert decode_frames(stream, chunk) == msgs


# ---------------------------------------------------------------------------
# Caps: enforced by the unpacker before anything is allocated.

#: {"v": 1, "t": GOSSIP, "f": "east/n1", "m": <value follows>}
GOSSIP_HEAD = b"\x84\xa1v\x02\xa1t\x05\xa1f\xa7east/n1\xa1m"

HOSTILE_BODIES = {
    "array-2^31": b"\xdd\x7f\xff\xff\xff",
    "array-2^32-1": b"\xdd\xff\xff\xff\xff",
    "str-1GB": b"\xdb\x40\x00\x00\x00" + b"x" * 16,
    "bin-1GB": b"\xc6\x40\x00\x00\x00" + b"x" * 16,
    "map-2^31": b"\xdf\x7f\xff\xff\xff",
    "map-over-cap": b"\xdf" + (MAX_MAP_LEN + 1).to_bytes(4, "big"),
    "array-over-cap": b"\xdd" + (MAX_LIST_LEN + 1).to_bytes(4, "big"),
    "ext-1GB": b"\xc9\x40\x00\x00\x00\x05",
    # A plausible Gossip whose member list declares 2**31 entries (see GOSSIP_HEAD).
    "nested-array": GOSSIP_HEAD + b"\xdd\x7f\xff\xff\xff",
    "nested-str": b"\x83\xa1v\x02\xa1t\x05\xa1f\xdb\x40\x00\x00\x00east/n1",
    "deep-nesting": b"\x91" * 5000,
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_hostile_declared_sizes_rejected_without_allocating_them(body: bytes) -> None:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = decode_message(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(result, Rejection)
    assert result.reason in ("undecodable", "malformed")
    # Memory, not time, shows a declared size was believed: 2**31 slots are 16 GiB.
    assert peak < 1 << 20, peak


def test_gossip_head_is_sound() -> None:
    """The hostile nested bodies are rejected for their sizes, not their framing."""
    assert decode_message(GOSSIP_HEAD + b"\x90") == Gossip("east/n1")


def test_hostile_input_allocates_little() -> None:
    hostile = [(b + b"\x00" * 100)[:100] for b in HOSTILE_BODIES.values() if len(b) <= 100]
    hostile.append(b"\xdd\x7f\xff\xff\xff" + b"\xdb\x7f\xff\xff\xff" * 19)
    decode_message(hostile[0])  # warm up caches outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        for body in hostile:
            assert isinstance(decode_message(body), Rejection)
            dec = FrameDecoder()
            dec.feed(frame_of(body))
            dec.feed((2**31).to_bytes(4, "big") + body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_map_cap_is_exact() -> None:
    digest = {f"east/n{i}": 1 for i in range(MAX_MAP_LEN)}
    ok = PushPull("east/n1", source_addr=ADDR, digest=digest)
    assert decode_message(encode_message(ok)) == ok
    raw = message_to_wire(ok)
    raw["d"]["east/one-too-many"] = 1
    body = pack(raw)
    assert len(body) < MAX_FRAME_BYTES  # rejected for its map, not its size
    result = decode_message(body)
    assert isinstance(result, Rejection) and result.reason == "undecodable"
    with pytest.raises(WireError):
        PushPull("east/n1", digest=raw["d"])


def test_list_cap_enforced_on_build_and_decode() -> None:
    u = update()
    with pytest.raises(WireError):
        Gossip("east/n1", members=(u,) * (MAX_LIST_LEN + 1))
    small = MemberUpdate(Status.ALIVE, "e/n", 0, "").to_wire()
    body = pack(
        {"v": 1, "t": int(MsgType.GOSSIP), "f": "east/n1", "m": [small] * (MAX_LIST_LEN + 1)}
    )
    assert len(body) < MAX_FRAME_BYTES
    result = decode_message(body)
    assert isinstance(result, Rejection) and result.reason == "undecodable"


def test_frame_body_over_limit_rejected() -> None:
    result = decode_message(b"\x00" * (MAX_FRAME_BYTES + 1))
    assert isinstance(result, Rejection) and result.reason == "oversized"


def test_oversized_length_prefix_closes_at_once() -> None:
    dec = FrameDecoder()
    out = dec.feed((100 * 2**20).to_bytes(4, "big"))
    assert len(out) == 1 and isinstance(out[0], Rejection) and out[0].reason == "oversized"
    assert dec.pending == 0 and dec.closed
    assert dec.feed(encode_frame(MESSAGES[0])) == []
    assert dec.pending == 0


def test_oversized_prefix_after_good_frame_and_with_body_bytes() -> None:
    dec = FrameDecoder()
    good = encode_frame(MESSAGES[0])
    out = dec.feed(good + (MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"\x00" * 1000)
    assert out[0] == MESSAGES[0]
    assert isinstance(out[1], Rejection) and out[1].reason == "oversized"
    assert len(out) == 2 and dec.closed and dec.pending == 0


def test_frame_at_decoder_limit_is_accepted_as_framing() -> None:
    dec = FrameDecoder(max_frame=16)
    out = dec.feed(frame_of(b"\x00" * 16))
    assert len(out) == 1 and isinstance(out[0], Rejection) and out[0].reason != "oversized"
    assert not dec.closed
    out = dec.feed((17).to_bytes(4, "big"))
    assert out == [Rejection("oversized", "length prefix 17")] and dec.closed


def test_truncated_frame_waits() -> None:
    frame = encode_frame(MESSAGES[1])
    dec = FrameDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.pending == len(frame) - 1
    assert not dec.closed
    assert dec.feed(frame[-1:]) == [MESSAGES[1]]
    assert dec.pending == 0
    dec2 = FrameDecoder()
    assert dec2.feed(frame[:3]) == [] and dec2.pending == 3


def test_zero_length_frame_is_rejected_not_fatal() -> None:
    dec = FrameDecoder()
    out = dec.feed(b"\x00\x00\x00\x00" + encode_frame(MESSAGES[0]))
    assert isinstance(out[0], Rejection) and out[0].reason == "undecodable"
    assert out[1:] == [MESSAGES[0]]
    assert not dec.closed


# ---------------------------------------------------------------------------
# Rejection reasons.


def ack_wire(**over: Any) -> dict[str, Any]:
    raw = message_to_wire(Ack("east/n1", seq=9, members=(update(),)))
    raw.update(over)
    return raw


def reason(raw: Any) -> str:
    result = decode_message(pack(raw))
    assert isinstance(result, Rejection), result
    return result.reason


def test_unknown_type() -> None:
    assert reason(ack_wire(t=99)) == "unknown-type"
    assert reason(ack_wire(t=0)) == "unknown-type"
    assert reason(ack_wire(t="3")) == "unknown-type"
    assert reason(ack_wire(t=True)) == "unknown-type"  # True == 1, but is not a type number


def test_bad_version() -> None:
    assert reason(ack_wire(v=WIRE_VERSION + 1)) == "bad-version"
    assert reason(ack_wire(v="1")) == "bad-version"
    assert reason(ack_wire(v=1.0)) == "bad-version"
    assert reason(ack_wire(v=True)) == "bad-version"
    raw = ack_wire()
    del raw["v"]
    assert reason(raw) == "bad-version"


@pytest.mark.parametrize(
    "over",
    [
        {"s": "9"},
        {"s": -1},
        {"s": 2**32},
        {"s": 1.5},
        {"f": 5},  # used to escape as AttributeError
        {"f": None},
        {"f": "no-slash"},
        {"f": "east/n1\n"},
        {"m": {"a": 1}},
        {"m": [[0, "east/n2"]]},
        {"m": [[9, "east/n2", 1, ADDR, "", "", ""]]},  # unknown status
        {"m": [[True, "east/n2", 1, ADDR, "", "", ""]]},
        {"m": [[0, 7, 1, ADDR, "", "", ""]]},  # used to escape as AttributeError
        {"m": [[0, "east/n2", -1, ADDR, "", "", ""]]},
        {"st": [["east/n1", 1, "not-bytes", b"", b""]]},
        {"st": [["east/n1", 1, b"x" * (MAX_ORIGIN_BODY_BYTES + 1), b"", b""]]},
    ],
    ids=lambda v: repr(v)[:48],
)
def test_malformed_fields(over: dict[str, Any]) -> None:
    assert reason(ack_wire(**over)) == "malformed"


def test_malformed_frames() -> None:
    assert reason([1, 2, 3]) == "malformed"
    raw = message_to_wire(MESSAGES[0])
    assert reason({**raw, "bd": [7]}) == "malformed"
    assert reason({**raw, "to": 3}) == "malformed"
    pp = message_to_wire(MESSAGES[7])
    assert reason({**pp, "d": {"east/n1": -1}}) == "malformed"
    assert reason({**pp, "d": [1]}) == "malformed"
    assert reason({**pp, "j": 1}) == "malformed"
    assert reason({**pp, "d": {b"east/n1": 1}}) == "malformed"


def test_undecodable() -> None:
    for body in (b"", b"\xc1", pack({"v": 1}) + b"\x00", b"\x82\xa1v"):
        result = decode_message(body)
        assert isinstance(result, Rejection) and result.reason == "undecodable"
    assert reason({1: 2}) == "undecodable"  # strict_map_key


def test_unknown_fields_and_extra_list_items_are_ignored() -> None:
    """Append-only wire: a newer peer may add fields; we must still understand it."""
    raw = ack_wire(zz=[1, 2, {"x": None}])
    raw["m"][0] = raw["m"][0] + ["future"]
    got = decode_message(pack(raw))
    assert got == Ack("east/n1", seq=9, members=(update(),))


# ---------------------------------------------------------------------------
# Validation when built: our own misuse raises WireError.


def app(**over: Any) -> AppRecord:
    kw: dict[str, Any] = dict(app="web", instance="web-1", address="192.0.2.5", port=8080)
    kw.update(over)
    return AppRecord(**kw)


@pytest.mark.parametrize(
    "over",
    [
        {"port": 0},
        {"port": 65536},
        {"port": True},
        {"port": "80"},
        {"app": ""},
        {"app": "-web"},
        {"app": "web-"},
        {"app": "a b"},
        {"app": "web\n"},  # '$' in the name regex used to allow a trailing newline
        {"app": "a" * (MAX_NAME_LEN + 1)},
        {"instance": "ïnstance"},
        {"namespace": "ns/x"},
        {"address": ""},
        {"address": "x" * (MAX_NAME_LEN + 1)},
        {"address": "\ud800"},
        {"meta": tuple((f"k{i:03}", "v") for i in range(MAX_META_PAIRS + 1))},
        {"meta": (("b", "1"), ("a", "2"))},
        {"meta": (("a", "1"), ("a", "2"))},
        {"meta": (("a", 1),)},
        {"meta": [("a", "1")]},
        {"meta": (("a", "x" * MAX_META_BYTES),)},
        # Within the old character limit but over the byte limit the decoder enforces.
        {"meta": (("a", "é" * 3000),)},
        {"health": "ok"},
        {"health": "PASSING"},
        {"protocol": "udp"},
        {"weight": -1},
        {"weight": 1_000_001},
    ],
    ids=lambda v: repr(v)[:48],
)
def test_app_record_rejects(over: dict[str, Any]) -> None:
    with pytest.raises(WireError):
        app(**over)


def test_app_record_accepts_limits() -> None:
    app(port=1)
    app(port=65535, app="a" * MAX_NAME_LEN, weight=0)
    app(meta=tuple((f"k{i:03}", "v") for i in range(MAX_META_PAIRS)))
    app(meta=(("a", "x" * (MAX_META_BYTES - 1)),))
    rec = app(meta=(("a", "é" * 2000),))
    state = OriginState("n1", "east", "", "", 1, (rec,))
    assert OriginState.decode(state.encode()) == state


@pytest.mark.parametrize(
    "fields",
    [
        {"host": "10.0.0.1:80"},
        {"host": "x" * 300},
        {"node_meta": (("a.b", "x"),)},
        {"node_meta": (("meshd-zone", "x"),)},
        {"node_meta": (("consul-x", "x"),)},
        {"node_meta": (("b", "1"), ("a", "2"))},
        {"node_meta": (("k", "v" * 513),)},
        {"node_meta": tuple((f"k{i:02}", "v") for i in range(17))},
        {"left": ("west/n2",)},
    ],
)
def test_origin_state_refuses_bad_node_fields(fields: dict[str, object]) -> None:
    with pytest.raises(WireError):
        OriginState("n1", "east", "", "", 1, **fields)  # type: ignore[arg-type]


def test_node_fields_round_trip_and_a_malformed_map_is_a_wire_error() -> None:
    state = OriginState(
        "n1", "east", "", "", 3, host="10.0.0.1", node_meta=(("rack", "r7"),), left=("east/n2",)
    )
    assert OriginState.decode(state.encode()) == state
    body = msgpack.packb({"n": "n1", "c": "east", "r": "", "z": "", "ver": 1, "a": [], "nm": [1]})
    with pytest.raises(WireError):
        OriginState.decode(body)


def test_origin_state_rejects() -> None:
    with pytest.raises(WireError, match="twice"):
        OriginState("n1", "east", "", "", 1, (app(), app(port=9090)))
    with pytest.raises(WireError):
        OriginState("n1", "east", "", "", -1)
    with pytest.raises(WireError):
        OriginState("n1", "east", None, "", 1)  # type: ignore[arg-type]
    with pytest.raises(WireError):
        OriginState("n1", "east", "", "", 1, [app()])  # type: ignore[arg-type]
    apps = tuple(app(instance=f"i{i}") for i in range(MAX_APPS_PER_ORIGIN + 1))
    with pytest.raises(WireError):
        OriginState("n1", "east", "", "", 1, apps)


def test_origin_state_encode_cap() -> None:
    big = (("m", "x" * 4000),)
    n = MAX_ORIGIN_BODY_BYTES // 4000 + 1
    state = OriginState(
        "n1", "east", "", "", 1, tuple(app(instance=f"i{i}", meta=big) for i in range(n))
    )
    with pytest.raises(WireError):
        state.encode()
    smaller = OriginState("n1", "east", "", "", 1, state.apps[: n - 2])
    assert len(smaller.encode()) <= MAX_ORIGIN_BODY_BYTES


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        pack([1]),
        pack({"n": "n1"}),
        pack({"n": "n1", "c": "east", "r": "", "z": "", "ver": 1, "a": None}),
        pack({"n": "n1", "c": "east", "r": 0, "z": "", "ver": 1, "a": []}),
        pack({"n": "n1", "c": "east", "r": "", "z": "", "ver": 1, "a": [[1]]}),
        # str and bytes meta keys cannot be sorted together: was a TypeError.
        pack(
            {
                "n": "n1",
                "c": "east",
                "r": "",
                "z": "",
                "ver": 1,
                "a": [["a", "i", "h", 80, "default", "http", {"k": "v", b"k": "v"}, 1, "passing"]],
            }
        ),
        b"\x00" * (MAX_ORIGIN_BODY_BYTES + 1),
    ],
)
def test_origin_state_decode_raises_wire_error(body: bytes) -> None:
    with pytest.raises(WireError):
        OriginState.decode(body)


# Some values have the wrong type on purpose (hence the type: ignores): a
# peer's decoded fields reach these constructors unchecked by any annotation.
@pytest.mark.parametrize(
    "build",
    [
        lambda: Ping("east/n1", seq=-1),
        lambda: Ping("east/n1", seq=2**32),
        lambda: Ping("east/n1", seq="1"),  # type: ignore[arg-type]
        lambda: Ping("east/n1", target="n2"),
        lambda: Ping("east/n1", suspicion=("not", "an", "update")),  # type: ignore[arg-type]
        lambda: Ping("n1"),
        lambda: Gossip("east/n1", members=[update()]),  # type: ignore[arg-type]
        lambda: Gossip("east/n1", states=(update(),)),  # type: ignore[arg-type]
        lambda: IndirectPing("east/n1", nack=1),  # type: ignore[arg-type]
        lambda: PushPull("east/n1", digest={"east/n1": -1}),
        lambda: PushPull("east/n1", source_addr="x" * 300),
        lambda: MemberUpdate(Status.ALIVE, "east", 1, ADDR),
        lambda: MemberUpdate(0, "east/n1", 1, ADDR),  # type: ignore[arg-type]
        lambda: MemberUpdate(Status.ALIVE, "east/n1", -1, ADDR),
        lambda: SignedState("east/n1", 1, b"", b"s" * 513, b""),
        lambda: SignedState("east/n1", 1, "body", b"", b""),  # type: ignore[arg-type]
    ],
)
def test_messages_validated_when_built(build: Any) -> None:
    with pytest.raises(WireError):
        build()


def test_encode_refuses_frames_over_limit() -> None:
    states = tuple(
        SignedState(f"east/n{i}", 1, b"x" * MAX_ORIGIN_BODY_BYTES, b"", b"") for i in range(9)
    )
    msg = Gossip("east/n1", states=states)
    with pytest.raises(WireError):
        encode_frame(msg)
    with pytest.raises(WireError):
        message_size(msg)


def test_frame_decoder_reports_the_size_of_each_frame():
    from meshd.wire import FrameDecoder, Gossip, Nack, encode_frame

    a, b = encode_frame(Nack("east/n1", seq=3)), encode_frame(Gossip("east/n2"))
    dec = FrameDecoder()
    assert dec.feed(a + b[:3]) == [Nack("east/n1", seq=3)]
    assert dec.sizes == [len(a)]
    assert len(dec.feed(b[3:])) == 1 and dec.sizes == [len(b)]


@pytest.mark.parametrize("address", ["", "nohost", ":7946", "h:0", "h:65536", "h:x", "h:²"])
def test_a_member_claim_names_a_real_host_and_port(address: str) -> None:
    from meshd.wire import MemberClaim

    with pytest.raises(WireError):
        MemberClaim(Status.ALIVE, "east/n1", 1, address)
    assert MemberClaim(Status.ALIVE, "east/n1", 1, "[::1]:7946").address == "[::1]:7946"


def test_a_big_digest_is_checked_in_bulk_with_the_same_verdicts():
    """``_plain_digest`` only lets through what the per-entry checks accept."""
    from meshd.wire import MAX_ORIGIN_ID_LEN, _plain_digest

    def per_entry(d: dict) -> bool:
        try:
            for k, v in d.items():
                wire._check_str(k, "o", MAX_ORIGIN_ID_LEN)
                wire._check_int(v, "v", 0)
        except wire.WireError:
            return False
        return True

    good = {f"c{i % 3}/n{i}": i for i in range(2000)}
    cases: list[dict[Any, Any]] = [
        {},
        good,
        {**good, "x": True},
        {**good, "x": -1},
        {**good, "x": 2**63},
        {**good, "x": 1.0},
        {**good, 7: 1},
        {**good, "é": 1},
        {**good, "a" * (MAX_ORIGIN_ID_LEN + 1): 1},
        {**good, "a" * MAX_ORIGIN_ID_LEN: 2**63 - 1},
    ]
    for d in cases:
        if _plain_digest(d):
            assert per_entry(d)
        verdict = True
        try:
            wire._digest(d)
        except wire.WireError:
            verdict = False
        assert verdict == per_entry(d)
    assert _plain_digest(good) and not _plain_digest({**good, "é": 1})


# ---------------------------------------------------------------------------
# The generated checks of each message type equal the plain loop.

_HOSTILE_VALUES: list[Any] = [
    "",
    "east/n1",
    "east/n9999",
    "east",
    "east/",
    "/n1",
    "east/n1\n",
    "a" * (MAX_NAME_LEN + 6),
    "a" * (MAX_NAME_LEN + 7),
    "é/n1",
    "127.0.0.1:7946",
    "\ud800",
    0,
    1,
    -1,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    True,
    False,
    None,
    1.0,
    math.nan,
    b"",
    b"x" * 10,
    (),
    [],
    {},
    {"east/n1": 3},
    {"east/n1": -1},
    {"east/n1": True},
    {3: 3},
    (0.1, 0.2, 0.3),
    (0.1, 0.2),
    (0.1, math.inf, 0.3),
    (1, 2, 3),
    (0.0,) * 35,
    (1e308, 1e308, 1e308),
    (0.1, math.nan, 0.3),
    (0.1, 0.2, 0.3, 1),
    [0.1, 0.2, 0.3],
]
_HOSTILE_VALUES += [update(), (update(),), (signed(),), (update(), "x"), Status.SUSPECT]
_HOSTILE = st.one_of(st.sampled_from(_HOSTILE_VALUES), st.text(max_size=12), st.integers())


def _check_outcome(check: Any, msg: Message) -> str:
    try:
        check(msg)
    except Exception as exc:  # noqa: BLE001 - the type and text are compared
        return f"{type(exc).__name__}: {exc}"
    return "accepted"


def _field_names(cls: type[Message]) -> list[str]:
    return ["source", *(f.name for f in dataclasses.fields(cls) if f.name != "source")]


@pytest.mark.parametrize("cls", [wire.MESSAGE_CLASSES[t] for t in sorted(wire.MESSAGE_CLASSES)])
def test_generated_message_checks_equal_the_plain_loop(cls):
    """Each type's generated ``__post_init__`` accepts and refuses exactly what
    the plain loop over ``_CHECKS`` does, with the same error: every field set
    to every hostile value (the fast paths only skip a call)."""
    assert cls.__post_init__ is not Message.__post_init__
    for name in _field_names(cls):
        for value in _HOSTILE_VALUES:
            msg = cls("east/n1")
            object.__setattr__(msg, name, value)
            got = _check_outcome(cls.__post_init__, msg)
            assert got == _check_outcome(wire._message_checks, msg), (name, value)


@FUZZ
@given(st.sampled_from(sorted(wire.MESSAGE_CLASSES.values(), key=lambda c: c.TYPE)), st.data())
def test_generated_message_checks_equal_the_plain_loop_on_mixed_fields(cls, data):
    """As above, with several fields hostile at once (the first fault named)."""
    msg = cls("east/n1")
    for name in data.draw(st.lists(st.sampled_from(_field_names(cls)), min_size=1, max_size=3)):
        object.__setattr__(msg, name, data.draw(_HOSTILE))
    got = _check_outcome(cls.__post_init__, msg)
    assert got == _check_outcome(wire._message_checks, msg)


@FUZZ
@given(
    st.sampled_from(sorted(wire.MESSAGE_CLASSES.values(), key=lambda c: c.TYPE)),
    st.data(),
)
def test_generated_message_init_equals_the_dataclass_init(cls, data):
    """Same parameters, defaults (a fresh digest map each time), checks and
    errors as the dataclass's own ``__init__``, for any arguments."""
    names = _field_names(cls)
    n_pos = data.draw(st.integers(0, len(names) + 1))
    args = [data.draw(_HOSTILE) for _ in range(n_pos)]
    kwargs = {
        name: data.draw(_HOSTILE)
        for name in data.draw(st.lists(st.sampled_from([*names, "bogus"]), max_size=3))
    }
    if data.draw(st.booleans()):
        args[:1] = ["east/n1"]  # mostly well formed: reach the later checks

    def outcome(init: Any) -> Any:
        msg = object.__new__(cls)
        try:
            init(msg, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the type and text are compared
            return f"{type(exc).__name__}: {exc}"
        return [getattr(msg, name) for name in names]

    got, want = outcome(cls.__init__), outcome(wire._DATACLASS_INITS[cls])
    assert repr(got) == repr(want)
    assert cls.__init__ is not wire._DATACLASS_INITS[cls]


def test_a_default_digest_is_a_new_map_each_time():
    assert PushPull("east/n1").digest is not PushPull("east/n1").digest


@PROPERTY
@given(messages)
def test_an_unchecked_build_is_the_checked_message(msg: Message) -> None:
    """``wire.unchecked`` (a core's own probes and acks) builds the very
    message the checked constructor builds from the same fields."""
    fields = [getattr(msg, f.name) for f in dataclasses.fields(msg)]
    built = wire.unchecked(type(msg))(*fields)
    assert type(built) is type(msg) and built == msg
    assert encode_frame(built) == encode_frame(msg)


def test_what_an_unchecked_build_lets_through_a_peer_still_refuses() -> None:
    # The builder skips the checks on our side only: decoding builds through
    # the checked constructor, so a bad field is refused at the receiver.
    bad = wire.unchecked(Ack)("east/n1", 2**32, (), (), (math.nan,) * 10)
    got = decode_message(encode_frame(bad)[4:])
    assert isinstance(got, Rejection) and got.reason == "malformed"
