"""Tests for meshd.protocol.store: the merge rule, the store, and CRDT properties."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.protocol.store import (
    MAX_ORIGINS,
    Entry,
    Merge,
    RecordStore,
    merge_maps,
    record_term,
    wins,
)
from meshd.wire import MAX_MAP_LEN, AppRecord, OriginState, SignedState

# ---------------------------------------------------------------------------
# Helpers


def rec(app: str, instance: str, namespace: str = "default", port: int = 8080) -> AppRecord:
    return AppRecord(
        app=app, instance=instance, address="192.0.2.1", port=port, namespace=namespace
    )


def make(
    node: str,
    version: int,
    apps: tuple[AppRecord, ...] = (),
    cluster: str = "c",
    signature: bytes | None = None,
) -> tuple[SignedState, OriginState]:
    """A real origin state and a signed copy whose body is its encoding.

    The fake signature is the version plus the origin: distinct for distinct
    (origin, version), the same for the same, like a real one.
    """
    state = OriginState(
        node=node, cluster=cluster, region="r1", zone="z1", version=version, apps=apps
    )
    sig = signature if signature is not None else version.to_bytes(8, "big") + state.origin.encode()
    signed = SignedState(
        origin=state.origin, version=version, body=state.encode(), signature=sig, cert=b""
    )
    return signed, state


def raw(origin: str, version: int, signature: bytes = b"", body: bytes = b"", cert: bytes = b""):
    """A SignedState whose body need not decode, for the pure merge rule."""
    return SignedState(origin=origin, version=version, body=body, signature=signature, cert=cert)


def add(store: RecordStore, node: str, version: int, *apps: AppRecord, now: float = 0.0) -> Merge:
    signed, state = make(node, version, tuple(apps))
    return store.merge(signed, state, now)


# ---------------------------------------------------------------------------
# The merge rule


def test_max_origins_fits_one_digest() -> None:
    assert MAX_ORIGINS <= MAX_MAP_LEN


def test_wins_against_nothing() -> None:
    assert wins(raw("c/a", 0), None)


def test_wins_higher_version_regardless_of_signature() -> None:
    assert wins(raw("c/a", 2, b"\x00"), raw("c/a", 1, b"\xff"))
    assert not wins(raw("c/a", 1, b"\xff"), raw("c/a", 2, b"\x00"))


def test_wins_equal_version_greater_signature() -> None:
    assert wins(raw("c/a", 3, b"b"), raw("c/a", 3, b"a"))
    assert not wins(raw("c/a", 3, b"a"), raw("c/a", 3, b"b"))


def test_wins_never_against_itself() -> None:
    s = raw("c/a", 3, b"sig", b"body")
    assert not wins(s, s)
    assert not wins(raw("c/a", 3, b"sig", b"body"), s)


def test_wins_total_order_breaks_equal_signature_ties_on_body_then_cert() -> None:
    # Never happens with real signatures, but the rule must still be a total
    # order or merge would depend on delivery order.
    assert wins(raw("c/a", 1, b"s", b"b"), raw("c/a", 1, b"s", b"a"))
    assert not wins(raw("c/a", 1, b"s", b"a"), raw("c/a", 1, b"s", b"b"))
    assert wins(raw("c/a", 1, b"s", b"x", b"2"), raw("c/a", 1, b"s", b"x", b"1"))


def test_merge_maps_per_key() -> None:
    a = {"c/a": raw("c/a", 1), "c/b": raw("c/b", 5)}
    b = {"c/a": raw("c/a", 2), "c/b": raw("c/b", 4), "c/c": raw("c/c", 0)}
    out = merge_maps(a, b)
    assert out == {"c/a": b["c/a"], "c/b": a["c/b"], "c/c": b["c/c"]}
    # Inputs untouched.
    assert a["c/a"].version == 1 and "c/c" not in a


# ---------------------------------------------------------------------------
# merge, get, len, contains, version, digest


def test_empty_store() -> None:
    store = RecordStore()
    assert len(store) == 0
    assert "c/a" not in store
    assert store.get("c/a") is None
    assert store.version("c/a") is None
    assert store.digest() == {}
    assert store.signed_states() == []
    assert list(store.live()) == []
    assert store.newer_than({}) == []
    assert store.index == 0


def test_merge_adds_and_get_returns_entry() -> None:
    store = RecordStore()
    signed, state = make("a", 1, (rec("web", "w1"),))
    assert store.merge(signed, state, now=10.0)
    entry = store.get("c/a")
    assert entry == Entry(signed=signed, state=state, tombstone_since=None)
    assert len(store) == 1
    assert "c/a" in store
    assert store.version("c/a") == 1
    assert store.digest() == {"c/a": 1}
    assert store.index == 1


def test_merge_replaces_with_higher_version_only() -> None:
    store = RecordStore()
    assert add(store, "a", 2)
    assert not add(store, "a", 1)
    assert store.version("c/a") == 2
    assert store.index == 1
    assert add(store, "a", 3)
    assert store.version("c/a") == 3
    assert store.index == 2


def test_duplicate_merge_is_a_noop() -> None:
    store = RecordStore()
    signed, state = make("a", 1)
    assert store.merge(signed, state, 0.0)
    assert not store.merge(signed, state, 1.0)
    assert store.index == 1


def test_equal_version_fork_keeps_greater_signature() -> None:
    store = RecordStore()
    lo_signed, lo_state = make("a", 4, (rec("web", "old"),), signature=b"\x01")
    hi_signed, hi_state = make("a", 4, (rec("web", "new"),), signature=b"\x02")
    assert store.merge(lo_signed, lo_state, 0.0)
    assert store.merge(hi_signed, hi_state, 0.0)
    assert not store.merge(lo_signed, lo_state, 0.0)
    entry = store.get("c/a")
    assert entry is not None and entry.signed is hi_signed
    assert [r.instance for _, r in store.endpoints("web")] == ["new"]


def test_merge_rejects_mismatched_pair() -> None:
    store = RecordStore()
    signed, _ = make("a", 1)
    _, other = make("b", 1)
    _, older = make("a", 0)
    with pytest.raises(ValueError):
        store.merge(signed, other, 0.0)
    with pytest.raises(ValueError):
        store.merge(signed, older, 0.0)
    assert len(store) == 0 and store.index == 0


def test_merge_tombstoned_stores_a_tombstone_since_now() -> None:
    store = RecordStore()
    signed, state = make("a", 1, (rec("web", "w1"),))
    assert store.merge(signed, state, 7.0, tombstoned=True)
    entry = store.get("c/a")
    assert entry is not None and entry.tombstone_since == 7.0
    assert store.digest() == {"c/a": 1}
    assert list(store.live()) == []
    assert store.endpoints("web") == []
    assert store.newer_than({}) == []


def test_newer_version_revives_tombstone_unless_tombstoned_passed() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"))
    store.tombstone("c/a", 5.0)
    # The origin rejoined and published again: served again.
    assert add(store, "a", 2, rec("web", "w2"))
    entry = store.get("c/a")
    assert entry is not None and entry.tombstone_since is None
    assert [r.instance for _, r in store.endpoints("web")] == ["w2"]
    # Known dead while a newer version arrives: stays a tombstone, since now.
    store.tombstone("c/a", 6.0)
    signed, state = make("a", 3, (rec("web", "w3"),))
    assert store.merge(signed, state, 9.0, tombstoned=True)
    entry = store.get("c/a")
    assert entry is not None and entry.tombstone_since == 9.0 and entry.signed is signed
    assert store.endpoints("web") == []


def test_stale_state_does_not_revive_tombstone() -> None:
    store = RecordStore()
    signed, state = make("a", 2)
    store.merge(signed, state, 0.0)
    store.tombstone("c/a", 1.0)
    index = store.index
    # Same version again (a peer re-sending it) and an older one: both ignored.
    assert not store.merge(signed, state, 2.0)
    assert not add(store, "a", 1)
    entry = store.get("c/a")
    assert entry is not None and entry.tombstone_since == 1.0
    assert store.index == index


def test_store_full_rejects_new_origins_and_counts() -> None:
    store = RecordStore(max_origins=2)
    assert add(store, "a", 1)
    assert add(store, "b", 1)
    assert add(store, "c", 1) is Merge.FULL
    assert add(store, "d", 1) is Merge.FULL
    assert add(store, "a", 1) is Merge.STALE  # says why: it holds that version
    assert store.rejected["store-full"] == 2
    assert "c/c" not in store and len(store) == 2
    assert store.index == 2
    # Origins already held still update at the cap.
    assert add(store, "a", 2)
    assert store.rejected["store-full"] == 2
    # Tombstones count toward the cap until reaped.
    store.tombstone("c/b", 0.0)
    assert not add(store, "c", 1)
    assert store.rejected["store-full"] == 3
    store.reap(now=100.0, timeout=10.0)
    assert add(store, "c", 1)


def test_store_full_does_not_count_losing_states() -> None:
    store = RecordStore(max_origins=1)
    add(store, "a", 2)
    assert not add(store, "a", 1)
    assert not store.rejected


def test_max_origins_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RecordStore(max_origins=0)


# ---------------------------------------------------------------------------
# newer_than


def test_newer_than_sends_what_the_remote_lacks_or_has_older() -> None:
    store = RecordStore()
    for node, version in (("d", 1), ("a", 3), ("c", 2), ("b", 5)):
        add(store, node, version)
    remote = {"c/a": 3, "c/b": 4, "c/c": 9, "c/z": 1}
    out = store.newer_than(remote)
    # c/a equal: not sent; c/b older remotely: sent; c/c newer remotely: not
    # sent; c/d missing remotely: sent.  Sorted by origin.
    assert [(s.origin, s.version) for s in out] == [("c/b", 5), ("c/d", 1)]


def test_newer_than_sorted_by_origin() -> None:
    store = RecordStore()
    for node in ("e", "b", "d", "a", "c"):
        add(store, node, 0)
    assert [s.origin for s in store.newer_than({})] == ["c/a", "c/b", "c/c", "c/d", "c/e"]


def test_newer_than_skips_tombstones() -> None:
    store = RecordStore()
    add(store, "a", 1)
    add(store, "b", 1)
    store.tombstone("c/a", 0.0)
    assert [s.origin for s in store.newer_than({})] == ["c/b"]
    store.revive("c/a")
    assert [s.origin for s in store.newer_than({})] == ["c/a", "c/b"]


# ---------------------------------------------------------------------------
# tombstone, revive, reap


def test_tombstone_and_revive() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"))
    assert store.index == 1
    assert store.tombstone("c/a", 3.5)
    assert store.index == 2
    entry = store.get("c/a")
    assert entry is not None and entry.tombstone_since == 3.5
    # Held, not served.
    assert "c/a" in store and len(store) == 1
    assert store.digest() == {"c/a": 1}
    assert store.version("c/a") == 1
    assert [s.origin for s in store.signed_states()] == ["c/a"]
    assert list(store.live()) == []
    assert store.endpoints("web") == []
    # A second tombstone changes nothing, not even the time it is measured from.
    assert not store.tombstone("c/a", 4.0)
    assert entry.tombstone_since == 3.5
    assert store.index == 2
    assert store.revive("c/a")
    assert store.get("c/a").tombstone_since is None  # type: ignore[union-attr]
    assert entry.tombstone_since == 3.5  # entries are replaced, never changed
    assert store.index == 3
    assert [r.instance for _, r in store.endpoints("web")] == ["w1"]
    assert not store.revive("c/a")
    assert store.index == 3


def test_tombstone_and_revive_unknown_origin() -> None:
    store = RecordStore()
    assert not store.tombstone("c/nobody", 0.0)
    assert not store.revive("c/nobody")
    assert store.index == 0


def test_reap_drops_only_old_tombstones() -> None:
    store = RecordStore()
    for node in ("a", "b", "c", "d"):
        add(store, node, 1)
    store.tombstone("c/a", 10.0)
    store.tombstone("c/b", 15.0)
    store.tombstone("c/c", 20.0)
    index = store.index
    # Held for timeout seconds or more is dropped: c/a at exactly 30.
    assert store.reap(now=39.5, timeout=30.0) == []
    assert store.reap(now=40.0, timeout=30.0) == ["c/a"]
    assert store.reap(now=49.0, timeout=30.0) == ["c/b"]
    assert "c/a" not in store and "c/b" not in store
    assert "c/c" in store and "c/d" in store
    assert store.index == index + 2
    assert store.digest() == {"c/c": 1, "c/d": 1}
    # Live entries are never reaped, however old.
    assert store.reap(now=1e9, timeout=30.0) == ["c/c"]
    assert store.digest() == {"c/d": 1}
    assert store.reap(now=2e9, timeout=30.0) == []
    assert store.index == index + 3


def test_reap_boundary_and_order() -> None:
    store = RecordStore()
    for node in ("z", "m", "a"):
        add(store, node, 1)
        store.tombstone(f"c/{node}", 100.0)
    assert store.reap(now=129.999, timeout=30.0) == []
    assert store.reap(now=130.0, timeout=30.0) == ["c/a", "c/m", "c/z"]
    assert len(store) == 0


def test_reaped_origin_can_return() -> None:
    store = RecordStore()
    add(store, "a", 4, rec("web", "w1"))
    store.tombstone("c/a", 0.0)
    store.reap(now=60.0, timeout=30.0)
    assert not store.revive("c/a")
    # Once reaped, even the same version is accepted again as new.
    assert add(store, "a", 4, rec("web", "w1"))
    assert [r.instance for _, r in store.endpoints("web")] == ["w1"]


def test_revived_entry_is_not_reaped() -> None:
    store = RecordStore()
    add(store, "a", 1)
    store.tombstone("c/a", 0.0)
    store.revive("c/a")
    assert store.reap(now=1000.0, timeout=1.0) == []
    assert "c/a" in store


def test_replacing_tombstone_with_live_state_is_not_reaped() -> None:
    store = RecordStore()
    add(store, "a", 1)
    store.tombstone("c/a", 0.0)
    add(store, "a", 2)
    assert store.reap(now=1000.0, timeout=1.0) == []


# ---------------------------------------------------------------------------
# live, signed_states


def test_live_sorted_and_skips_tombstones() -> None:
    store = RecordStore()
    for node in ("c", "a", "d", "b"):
        add(store, node, 1)
    store.tombstone("c/c", 0.0)
    assert [e.state.origin for e in store.live()] == ["c/a", "c/b", "c/d"]
    assert all(isinstance(e, Entry) for e in store.live())


def test_signed_states_sorted_and_includes_tombstones() -> None:
    store = RecordStore()
    for node in ("c", "a", "b"):
        add(store, node, 2)
    store.tombstone("c/b", 0.0)
    assert [(s.origin, s.version) for s in store.signed_states()] == [
        ("c/a", 2),
        ("c/b", 2),
        ("c/c", 2),
    ]


# ---------------------------------------------------------------------------
# endpoints and its index


def test_endpoints_sorted_by_origin_then_instance() -> None:
    store = RecordStore()
    add(store, "b", 1, rec("web", "w2"), rec("web", "w1"), rec("db", "d1"))
    add(store, "a", 1, rec("web", "w9"))
    add(store, "c", 1, rec("db", "d2"))
    got = [(s.origin, r.instance) for s, r in store.endpoints("web")]
    assert got == [("c/a", "w9"), ("c/b", "w1"), ("c/b", "w2")]
    assert [(s.origin, r.instance) for s, r in store.endpoints("db")] == [
        ("c/b", "d1"),
        ("c/c", "d2"),
    ]
    assert store.endpoints("nothing") == []
    # The OriginState returned is the held decoded state.
    entry = store.get("c/a")
    assert entry is not None and store.endpoints("web")[0][0] is entry.state


def test_endpoints_by_namespace() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"), rec("web", "w2", namespace="staging"))
    add(store, "b", 1, rec("web", "w3", namespace="staging"))
    assert [r.instance for _, r in store.endpoints("web")] == ["w1"]
    assert [r.instance for _, r in store.endpoints("web", "staging")] == ["w2", "w3"]
    assert store.endpoints("web", "prod") == []


def test_endpoints_updated_on_replace() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"), rec("api", "a1"))
    add(store, "a", 2, rec("web", "w2", port=9090), rec("db", "d1"))
    web = store.endpoints("web")
    assert [(r.instance, r.port) for _, r in web] == [("w2", 9090)]
    assert web[0][0].version == 2
    assert store.endpoints("api") == []
    assert [r.instance for _, r in store.endpoints("db")] == ["d1"]
    # The api app left the mesh entirely: nothing of it stays in the index.
    assert "api" not in store._apps


def test_endpoints_updated_on_tombstone_revive_reap() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"))
    add(store, "b", 1, rec("web", "w2"))
    store.tombstone("c/a", 0.0)
    assert [s.origin for s, _ in store.endpoints("web")] == ["c/b"]
    store.revive("c/a")
    assert [s.origin for s, _ in store.endpoints("web")] == ["c/a", "c/b"]
    store.tombstone("c/a", 1.0)
    store.tombstone("c/b", 1.0)
    assert store.endpoints("web") == []
    assert store._apps == {}
    store.reap(now=100.0, timeout=10.0)
    assert store.endpoints("web") == []
    assert store._apps == {}


def test_endpoints_index_matches_full_scan_after_churn() -> None:
    store = RecordStore()
    add(store, "a", 1, rec("web", "w1"), rec("web", "w2", namespace="ns"))
    add(store, "b", 1, rec("web", "w3"))
    add(store, "a", 2, rec("web", "w4", namespace="ns"))
    store.tombstone("c/b", 0.0)
    add(store, "c", 1, rec("api", "x"))
    store.revive("c/b")
    add(store, "b", 2)
    for app in ("web", "api"):
        for ns in ("default", "ns"):
            assert store.endpoints(app, ns) == full_scan(store, app, ns)


def full_scan(store: RecordStore, app: str, namespace: str) -> list[tuple[OriginState, AppRecord]]:
    return [
        (e.state, r)
        for e in store.live()
        for r in sorted(e.state.apps, key=lambda r: r.instance)
        if r.app == app and r.namespace == namespace
    ]


# ---------------------------------------------------------------------------
# Property tests: the merge is a CRDT join, and stores converge.

ORIGINS = [f"c/n{i}" for i in range(5)]

signed_states_st = st.builds(
    SignedState,
    origin=st.sampled_from(ORIGINS),
    version=st.integers(0, 5),
    body=st.binary(max_size=2),
    signature=st.binary(max_size=2),
    cert=st.binary(max_size=1),
)
state_maps = st.lists(signed_states_st, max_size=8).map(lambda xs: {s.origin: s for s in xs})

PROPS = settings(deadline=None, max_examples=100)


@PROPS
@given(state_maps, state_maps)
def test_merge_maps_commutative(a: dict[str, SignedState], b: dict[str, SignedState]) -> None:
    assert merge_maps(a, b) == merge_maps(b, a)


@PROPS
@given(state_maps, state_maps, state_maps)
def test_merge_maps_associative(
    a: dict[str, SignedState], b: dict[str, SignedState], c: dict[str, SignedState]
) -> None:
    assert merge_maps(merge_maps(a, b), c) == merge_maps(a, merge_maps(b, c))


@PROPS
@given(state_maps, state_maps)
def test_merge_maps_idempotent(a: dict[str, SignedState], b: dict[str, SignedState]) -> None:
    assert merge_maps(a, a) == a
    ab = merge_maps(a, b)
    assert merge_maps(ab, b) == ab


@PROPS
@given(st.lists(signed_states_st, max_size=20))
def test_wins_is_a_strict_total_order(states: list[SignedState]) -> None:
    for x in states:
        assert not wins(x, x)
        for y in states:
            if x.origin == y.origin and x != y:
                assert wins(x, y) != wins(y, x)


# A pool of real states: every origin at every version, with apps that change
# with the version so a wrong winner would show in endpoints too.
POOL: list[tuple[SignedState, OriginState]] = [
    make(
        f"n{i}",
        v,
        tuple(rec("web", f"w{i}-{v}-{k}") for k in range(v % 3))
        + ((rec("db", f"d{i}", namespace="ns"),) if v % 2 else ()),
    )
    for i in range(5)
    for v in range(6)
]
DECODED = {signed: state for signed, state in POOL}


def anti_entropy(stores: list[RecordStore], now: float) -> int:
    """One round: every ordered pair pushes what the other's digest lacks."""
    changed = 0
    for a in stores:
        for b in stores:
            if a is b:
                continue
            for s in a.newer_than(b.digest()):
                changed += bool(b.merge(s, DECODED[s], now))
    return changed


@PROPS
@given(
    st.integers(3, 5).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(0, len(POOL) - 1), max_size=25), min_size=n, max_size=n
        )
    )
)
def test_stores_converge_under_anti_entropy(deliveries: list[list[int]]) -> None:
    stores = [RecordStore() for _ in deliveries]
    # Each store sees its own subsequence, in its own order, with repeats;
    # whatever no store saw is lost.
    for store, picks in zip(stores, deliveries, strict=True):
        for i in picks:
            store.merge(*POOL[i], now=0.0)

    seen: dict[str, SignedState] = {}
    for store in stores:
        seen = merge_maps(seen, {s.origin: s for s in store.signed_states()})
    expected = [seen[o] for o in sorted(seen)]

    rounds = 0
    while anti_entropy(stores, now=1.0):
        rounds += 1
        assert rounds <= 2, "anti-entropy did not settle"

    for store in stores:
        assert store.digest() == {s.origin: s.version for s in expected}
        assert store.signed_states() == expected
        for app, ns in (("web", "default"), ("db", "ns")):
            assert store.endpoints(app, ns) == full_scan(store, app, ns)
    # Every store agrees on what it serves, too.
    first = stores[0]
    for store in stores[1:]:
        assert store.endpoints("web") == first.endpoints("web")


@PROPS
@given(st.lists(st.integers(0, len(POOL) - 1), max_size=30))
def test_store_agrees_with_merge_maps(picks: list[int]) -> None:
    store = RecordStore()
    folded: dict[str, SignedState] = {}
    replacements = 0
    for i in picks:
        signed, state = POOL[i]
        replaced = bool(store.merge(signed, state, now=0.0))
        assert replaced == wins(signed, folded.get(signed.origin))
        replacements += replaced
        folded = merge_maps(folded, {signed.origin: signed})
    assert store.signed_states() == [folded[o] for o in sorted(folded)]
    # The index counts exactly the merges that changed something.
    assert store.index == replacements


# ---------------------------------------------------------------------------
# Fingerprint and copy-on-write sharing


def fingerprint_of(store: RecordStore) -> int:
    """The fingerprint from its definition: XOR of record_term over the digest."""
    fp = 0
    for origin, version in store.digest().items():
        fp ^= record_term(origin, version)
    return fp


def test_record_term_depends_on_origin_and_version() -> None:
    assert record_term("c/a", 1) == record_term("c/a", 1)
    assert len({record_term("c/a", 1), record_term("c/a", 2), record_term("c/b", 1)}) == 3


@PROPS
@given(st.lists(st.tuples(st.sampled_from("mtrv"), st.integers(0, len(POOL) - 1)), max_size=40))
def test_fingerprint_follows_every_change(ops: list[tuple[str, int]]) -> None:
    """Merges, tombstones, revivals and reaps keep it equal to its definition,
    and two stores holding the same versions agree whatever the order."""
    store = RecordStore()
    for k, (op, i) in enumerate(ops):
        signed, state = POOL[i]
        if op == "m":
            store.merge(signed, state, now=float(k))
        elif op == "t":
            store.tombstone(signed.origin, float(k))
        elif op == "r":
            store.revive(signed.origin)
        else:
            store.reap(float(k), timeout=3.0)
        assert store.fingerprint == fingerprint_of(store)
    other = RecordStore()
    for signed in reversed(store.signed_states()):
        other.merge(signed, store.get(signed.origin).state, now=0.0)  # type: ignore[union-attr]
    assert other.fingerprint == store.fingerprint
    assert (store.fingerprint == 0) == (len(store) == 0)


def test_adopted_snapshot_is_shared_until_either_side_changes() -> None:
    source = RecordStore()
    add(source, "a", 1, rec("web", "w1"))
    add(source, "b", 1, rec("web", "w2"))
    snap = source.snapshot()
    x, y = RecordStore(), RecordStore()
    x.adopt(snap)
    y.adopt(snap)
    assert x.digest() == y.digest() == source.digest()
    assert x.fingerprint == source.fingerprint
    assert x.endpoints("web") == source.endpoints("web")
    # One adopter changes: nobody else sees it.
    add(x, "a", 2, rec("web", "w9"))
    assert x.tombstone("c/b", 5.0)
    assert x.version("c/a") == 2 and [r.instance for _, r in x.endpoints("web")] == ["w9"]
    for other in (source, y):
        assert other.version("c/a") == 1
        assert [r.instance for _, r in other.endpoints("web")] == ["w1", "w2"]
        assert other.get("c/b").tombstone_since is None  # type: ignore[union-attr]
        assert other.fingerprint == fingerprint_of(other) != x.fingerprint
    # Nor does the source's own later change reach the adopters.
    add(source, "c", 1)
    assert "c/c" not in y and "c/c" not in x
    assert x.fingerprint == fingerprint_of(x)


# ---------------------------------------------------------------------------
# The kept digest and the set-difference scans: same answers as a full scan.


def scanned_digest(store: RecordStore) -> dict[str, int]:
    return {s.origin: s.version for s in store.signed_states()}


def scanned_newer(store: RecordStore, remote: dict[str, int]) -> list[SignedState]:
    """``newer_than`` as a loop over every entry (its definition)."""
    return [
        s
        for s in store.signed_states()
        if store.get(s.origin).tombstone_since is None  # type: ignore[union-attr]
        and remote.get(s.origin, -1) < s.version
    ]


def scanned_lacks(store: RecordStore, remote: dict[str, int]) -> bool:
    return any((store.version(o) or -1) < v for o, v in remote.items())


def test_the_kept_digest_follows_every_change_and_an_old_one_never_changes() -> None:
    store = RecordStore()
    add(store, "a", 1)
    first = store.digest()
    assert store.digest() is first  # kept while nothing changes
    add(store, "b", 1)
    assert first == {"c/a": 1} and store.digest() == {"c/a": 1, "c/b": 1}
    add(store, "a", 2)
    assert store.digest() == scanned_digest(store) == {"c/a": 2, "c/b": 1}
    assert add(store, "a", 2) is Merge.STALE
    assert store.digest() == {"c/a": 2, "c/b": 1}
    store.tombstone("c/a", 0.0)
    assert store.digest() == {"c/a": 2, "c/b": 1}  # tombstones are listed
    assert store.reap(10.0, timeout=1.0) == ["c/a"]
    assert store.digest() == {"c/b": 1}
    other = RecordStore()
    add(other, "z", 7)
    held = store.digest()
    store.adopt(other.snapshot())
    assert store.digest() == {"c/z": 7} and held == {"c/b": 1}
    add(other, "y", 1)  # the snapshot's source changes: the adopter does not
    assert store.digest() == {"c/z": 7}


remote_digests = st.dictionaries(st.sampled_from(ORIGINS + ["c/x"]), st.integers(0, 6), max_size=6)


@PROPS
@given(
    st.lists(
        st.tuples(st.sampled_from(ORIGINS), st.integers(0, 5), st.sampled_from(["add", "tomb"])),
        max_size=12,
    ),
    remote_digests,
)
def test_newer_than_lacks_and_digest_equal_full_scans(
    steps: list[tuple[str, int, str]], remote: dict[str, int]
) -> None:
    from types import SimpleNamespace

    from meshd.protocol.anti_entropy import AntiEntropy

    store = RecordStore()
    ae = AntiEntropy(SimpleNamespace(store=store))  # type: ignore[arg-type]
    for origin, version, what in steps:
        store.digest()  # a kept digest must not survive the change below
        if what == "add":
            add(store, origin.partition("/")[2], version)
        else:
            store.tombstone(origin, 0.0)
        assert store.digest() == scanned_digest(store)
        assert store.newer_than(remote) == scanned_newer(store, remote)
        assert ae.lacks(remote) is scanned_lacks(store, remote)


def observed(store: RecordStore) -> tuple[object, ...]:
    """Everything a store answers, for comparing two stores."""
    origins = [*ORIGINS, "c/x"]
    return (
        len(store),
        [o for o in origins if o in store],
        [store.get(o) for o in origins],
        [store.version(o) for o in origins],
        store.digest(),
        store.signed_states(),
        list(store.live()),
        store.newer_than({}),
        store.endpoints("web"),
        store.fingerprint,
    )


overlay_steps = st.lists(
    st.tuples(
        st.sampled_from(["add", "tomb", "revive", "reap"]),
        st.sampled_from(ORIGINS),
        st.integers(0, 4),
    ),
    max_size=14,
)


@PROPS
@given(overlay_steps, overlay_steps)
def test_an_adopter_answers_as_a_store_that_owns_everything(
    before: list[tuple[str, str, int]], after: list[tuple[str, str, int]]
) -> None:
    def apply(store: RecordStore, steps: list[tuple[str, str, int]], t0: float) -> None:
        for k, (what, origin, version) in enumerate(steps):
            now = t0 + k
            if what == "add":
                node = origin.partition("/")[2]
                add(store, node, version, rec("web", f"{node}-{version}"), now=now)
            elif what == "tomb":
                store.tombstone(origin, now)
            elif what == "revive":
                store.revive(origin)
            else:
                store.reap(now, timeout=3.0)

    source, owner = RecordStore(), RecordStore()
    apply(source, before, 0.0)
    apply(owner, before, 0.0)
    snap = source.snapshot()
    seen = observed(source)
    adopter = RecordStore()
    adopter.adopt(snap)
    assert observed(adopter) == observed(owner) == seen
    apply(adopter, after, 100.0)
    apply(owner, after, 100.0)
    assert observed(adopter) == observed(owner)
    assert observed(source) == seen  # an adopter's changes never reach the base
    again = RecordStore()
    again.adopt(adopter.snapshot())  # a snapshot of an overlay: everything held
    assert observed(again) == observed(owner)
