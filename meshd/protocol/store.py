"""The record store: the latest signed origin state of every origin we know.

Why any delivery order converges: each origin is the only writer of its own
state and its versions only grow, so the merge rule "keep the greater state"
under one total order (version, then signature, body and cert bytes as
tie-breaks) is a max, and a max is commutative, associative and idempotent;
whatever subset, order or repetition of states a store sees, it ends with the
maximum of what it saw, and anti-entropy makes every store see the same set.
A dead origin's state is held as a tombstone but never sent: sending it would
re-install records that should no longer be served on peers that already
reaped it.  The digest still lists tombstones, so a peer never re-sends the
same version of a dead origin to us and we never re-accept it as live.

Sans-IO: no clock is read here; every call that needs a time takes ``now``.
The store trusts what it is given: signatures are verified before ``merge``.
"""

from __future__ import annotations

import collections
import enum
import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from meshd.wire import AppRecord, OriginState, SignedState

#: Most origins one store holds, tombstones included.  Bounds memory against a
#: peer (or a bridge) flooding us with origins; 65,536 matches the largest
#: digest map the wire accepts (``wire.MAX_MAP_LEN``), so our own digest is
#: never one a peer must refuse for its entry count.
MAX_ORIGINS = 65536


class Merge(enum.Enum):
    """What :meth:`RecordStore.merge` did with a state, and so why it refused one.

    Truthy only for ``KEPT``, so ``if store.merge(...)`` reads as "it changed".
    """

    KEPT = "kept"  # added, or replaced an older version
    STALE = "stale"  # we hold this version or a newer one (or the fork winner)
    FULL = "full"  # a new origin, and the store holds MAX_ORIGINS already

    def __bool__(self) -> bool:
        return self is Merge.KEPT


def _order_key(s: SignedState) -> tuple[int, bytes, bytes, bytes]:
    # A total order on states.  Version decides; an equal version with other
    # content means the origin forked its own history (never for a correct
    # node), and the signature, then body and cert, only make the winner the
    # same everywhere.  Without body and cert two states with equal signatures
    # but different bodies would be "equal" and merge would depend on order.
    return (s.version, s.signature, s.body, s.cert)


def wins(candidate: SignedState, incumbent: SignedState | None) -> bool:
    """True when ``candidate`` should replace ``incumbent`` (the merge rule).

    Strict: a state never wins against itself, which is what makes a repeated
    delivery a no-op (idempotence) rather than a churn of the index.
    """
    if incumbent is None:
        return True
    return _order_key(candidate) > _order_key(incumbent)


def record_term(origin: str, version: int) -> int:
    """One held ``(origin, version)``'s share of a store's fingerprint.

    The fingerprint is the XOR of these over every held entry, tombstones
    included (as the digest lists them): order-free, updated in O(1) per
    change, and two stores holding the same versions have the same one.  A
    sync compares fingerprints first and sends digests only when they differ,
    so agreeing peers exchange two short messages, not two O(N) maps.
    """
    key = f"{origin}|{version}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def merge_maps(
    a: Mapping[str, SignedState], b: Mapping[str, SignedState]
) -> dict[str, SignedState]:
    """Join two ``{origin: state}`` maps under :func:`wins`: the CRDT merge itself.

    Pure, for property tests and the simulator; :class:`RecordStore` applies
    the same rule one state at a time.
    """
    out = dict(a)
    for origin, state in b.items():
        if wins(state, out.get(origin)):
            out[origin] = state
    return out


@dataclass(frozen=True, slots=True)
class Entry:
    """One origin as held: its signed state and that state decoded.

    Invariant: ``state`` is ``signed.body`` decoded, so ``state.origin`` and
    ``state.version`` equal ``signed.origin`` and ``signed.version``.
    Immutable (a change replaces the entry), so stores that share a snapshot
    may hold the same object.
    """

    signed: SignedState
    state: OriginState
    #: None while live and served; otherwise when it became a tombstone (the
    #: caller's clock), which is what ``reap`` measures from.
    tombstone_since: float | None = None


#: app -> namespace -> origin -> that origin's records of the app in that
#: namespace, sorted by instance.  Holds live origins only.
_AppIndex = dict[str, dict[str, dict[str, tuple[AppRecord, ...]]]]


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """A store's tables, frozen for sharing: see :meth:`RecordStore.snapshot`."""

    entries: dict[str, Entry]
    #: ``{origin: version}`` of ``entries``: every adopter's digest starts as
    #: a copy of it instead of a walk over the entries.
    digest: dict[str, int]
    tombstones: set[str]
    apps: _AppIndex
    fingerprint: int


class RecordStore:
    """Origin states keyed by origin, merged by :func:`wins`.

    Tombstones are held (they count in ``len``, ``in``, ``version``,
    ``digest``, ``signed_states`` and toward ``max_origins``) but not served
    (absent from ``live``, ``endpoints`` and ``newer_than``).
    """

    # Slots, as Core's (see there).
    __slots__ = (
        "_apps",
        "_base",
        "_base_digest",
        "_count",
        "_digest",
        "_dropped",
        "_entries",
        "_shared",
        "_tombstones",
        "fingerprint",
        "index",
        "max_origins",
        "rejected",
    )

    def __init__(self, max_origins: int = MAX_ORIGINS) -> None:
        if max_origins < 1:
            raise ValueError("max_origins must be at least 1")
        self.max_origins = max_origins
        #: Rises by one on every change to what is held or served, so a
        #: blocking query can wait for "index > what I last saw".
        self.index = 0
        #: Refused states by reason (a metric label), e.g. "store-full".
        self.rejected: collections.Counter[str] = collections.Counter()
        #: XOR of :func:`record_term` over every held entry.
        self.fingerprint = 0
        # What is held is ``_base`` (a snapshot's entries, shared with other
        # stores and never changed) overlaid with ``_entries`` (this store's
        # own, which win) less ``_dropped`` (origins of ``_base`` reaped here).
        # A store that adopted a mesh-wide snapshot then owns only what
        # changed since: the first new record costs one entry, not a copy of
        # the whole mesh per store (what a simulator of 10,000 cores needs;
        # an agent never adopts, so its ``_base`` stays empty).
        self._base: dict[str, Entry] = {}
        self._base_digest: dict[str, int] = {}
        self._entries: dict[str, Entry] = {}
        self._dropped: set[str] = set()
        self._count = 0
        # Tombstoned origins, so reap scans only them, not every entry.
        self._tombstones: set[str] = set()
        self._apps: _AppIndex = {}
        # True while the tombstones and the app index are a snapshot's, which
        # other stores also hold: the first change copies them (copy-on-write).
        self._shared = False
        # ``digest()`` as last built, or None: dropped by every change to what
        # is held (never updated in place), so a digest handed out earlier
        # stays what it was and a changed store can never return a stale one.
        self._digest: dict[str, int] | None = None

    # -- reading ------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    def __contains__(self, origin: object) -> bool:
        return isinstance(origin, str) and self.get(origin) is not None

    def get(self, origin: str) -> Entry | None:
        entry = self._entries.get(origin)
        if entry is None and self._base and origin not in self._dropped:
            entry = self._base.get(origin)
        return entry

    def version(self, origin: str) -> int | None:
        entry = self.get(origin)
        return None if entry is None else entry.signed.version

    def _held(self) -> dict[str, Entry]:
        """Every held entry by origin (the overlay resolved: a new dict when
        there is a base, else this store's own table, not to be changed)."""
        if not self._base:
            return self._entries
        held = dict(self._base)
        for origin in self._dropped:
            del held[origin]
        held.update(self._entries)
        return held

    def digest(self) -> dict[str, int]:
        """``{origin: version}`` of everything held, tombstones included.

        Built once per state of the store and shared by every caller until
        the next change (a sync after a publication sends it, checks a
        peer's against it, and answers syncs, each O(n) if rebuilt): callers
        must not change it.
        """
        d = self._digest
        if d is None:
            if self._base:
                d = dict(self._base_digest)  # a copy in C, then what is ours
                for origin in self._dropped:
                    del d[origin]
                for origin, e in self._entries.items():
                    d[origin] = e.signed.version
            else:
                d = {origin: e.signed.version for origin, e in self._entries.items()}
            self._digest = d
        return d

    def newer_than(self, remote: Mapping[str, int]) -> list[SignedState]:
        """Live states the remote lacks or holds at a lower version, sorted by origin.

        Digests carry versions only, so an equal-version fork (which a correct
        origin never produces) is not repaired here; piggybacked gossip still
        carries the winning copy.
        """
        # Only pairs the remote does not list as we hold them can be newer:
        # the set difference finds them in C, where a Python loop over every
        # entry made this O(n) interpreted steps per sync.
        held = self.get
        get = remote.get
        out: list[SignedState] = []
        for origin, version in self.digest().items() - remote.items():
            if get(origin, -1) < version:
                entry = held(origin)
                assert entry is not None, "the digest lists what is held"
                if entry.tombstone_since is None:
                    out.append(entry.signed)
        out.sort(key=lambda s: s.origin)
        return out

    def live(self) -> Iterator[Entry]:
        """Served entries, sorted by origin."""
        held = self._held()
        for origin in sorted(held):
            entry = held[origin]
            if entry.tombstone_since is None:
                yield entry

    def signed_states(self) -> list[SignedState]:
        """Every held state, tombstones included, sorted by origin."""
        held = self._held()
        return [held[o].signed for o in sorted(held)]

    def endpoints(
        self, app: str, namespace: str = "default"
    ) -> list[tuple[OriginState, AppRecord]]:
        """Records of ``app`` in ``namespace`` on live origins, by (origin, instance).

        Reads the app index, so the cost follows the number of origins that
        publish this app, not the size of the mesh.
        """
        by_origin = self._apps.get(app, {}).get(namespace)
        if not by_origin:
            return []
        out: list[tuple[OriginState, AppRecord]] = []
        for origin in sorted(by_origin):
            entry = self.get(origin)
            assert entry is not None, "the app index lists live held origins"
            state = entry.state
            out.extend((state, rec) for rec in by_origin[origin])
        return out

    # -- sharing ------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        """The tables as they are, to :meth:`adopt` into other stores.

        The entries become the shared base of this store and of every
        adopter, each of which then owns only what it changes; the tombstones
        and the app index are shared until one of them changes, which copies
        them first.  What a simulator needs to give thousands of cores the
        same converged store in the memory of one.
        """
        held = self._held()
        digest = self.digest()
        self._base, self._base_digest = held, digest
        self._entries, self._dropped = {}, set()
        self._shared = True
        return StoreSnapshot(held, digest, self._tombstones, self._apps, self.fingerprint)

    def adopt(self, snap: StoreSnapshot) -> None:
        """Hold exactly what ``snap`` holds (shared until the first change)."""
        self._base, self._base_digest = snap.entries, snap.digest
        self._entries, self._dropped = {}, set()
        self._count = len(snap.entries)
        self._tombstones = snap.tombstones
        self._apps = snap.apps
        self.fingerprint = snap.fingerprint
        self._shared = True
        self._digest = None
        self.index += 1

    def _own(self) -> None:
        if self._shared:
            self._tombstones = set(self._tombstones)
            self._apps = {
                app: {ns: dict(by_origin) for ns, by_origin in namespaces.items()}
                for app, namespaces in self._apps.items()
            }
            self._shared = False

    # -- changing -----------------------------------------------------------

    def merge(
        self, signed: SignedState, state: OriginState, now: float, *, tombstoned: bool = False
    ) -> Merge:
        """Keep ``signed`` if it wins over what we hold; KEPT if it replaced or added,
        else why not (:class:`Merge`).

        ``state`` is ``signed.body`` already verified and decoded.  With
        ``tombstoned`` the kept entry is a tombstone since ``now`` (its member
        is known dead).  A newer version replacing a tombstone without
        ``tombstoned`` is live again: the origin rejoined and published.
        """
        # Our own code pairs these; a mismatch is misuse, not peer input.
        if state.origin != signed.origin or state.version != signed.version:
            raise ValueError(
                f"state {state.origin}@{state.version} does not match "
                f"signed {signed.origin}@{signed.version}"
            )
        origin = signed.origin
        old = self.get(origin)
        if not wins(signed, None if old is None else old.signed):
            return Merge.STALE
        if old is None and self._count >= self.max_origins:
            self.rejected["store-full"] += 1
            return Merge.FULL
        self._own()
        self._digest = None
        if old is not None:
            self.fingerprint ^= record_term(origin, old.signed.version)
            if old.tombstone_since is None:
                self._unindex(origin, old.state)
        else:
            self._count += 1
        self.fingerprint ^= record_term(origin, signed.version)
        self._entries[origin] = Entry(signed, state, now if tombstoned else None)
        if tombstoned:
            self._tombstones.add(origin)
        else:
            self._tombstones.discard(origin)
            self._index(origin, state)
        self.index += 1
        return Merge.KEPT

    def tombstone(self, origin: str, now: float) -> bool:
        """Stop serving ``origin`` (its member is dead or left); True if it was live."""
        entry = self.get(origin)
        if entry is None or entry.tombstone_since is not None:
            return False
        self._own()
        self._digest = None
        self._entries[origin] = replace(entry, tombstone_since=now)
        self._tombstones.add(origin)
        self._unindex(origin, entry.state)
        self.index += 1
        return True

    def revive(self, origin: str) -> bool:
        """Serve ``origin`` again (its member came back alive); True if it was a tombstone."""
        entry = self.get(origin)
        if entry is None or entry.tombstone_since is None:
            return False
        self._own()
        self._digest = None
        self._entries[origin] = replace(entry, tombstone_since=None)
        self._tombstones.discard(origin)
        self._index(origin, entry.state)
        self.index += 1
        return True

    def reap(self, now: float, timeout: float) -> list[str]:
        """Drop tombstones held ``timeout`` seconds or more; the origins dropped, sorted."""
        dropped = sorted(
            origin for origin in self._tombstones if now - self._tombstone_time(origin) >= timeout
        )
        if dropped:
            self._own()
            self._digest = None
        for origin in dropped:
            # Tombstones are not in the app index, so only the entry goes.
            self.fingerprint ^= record_term(origin, self._tombstone_entry(origin).signed.version)
            self._entries.pop(origin, None)
            if origin in self._base:
                self._dropped.add(origin)
            self._count -= 1
            self._tombstones.discard(origin)
            self.index += 1
        return dropped

    # -- the app index ------------------------------------------------------

    def _tombstone_entry(self, origin: str) -> Entry:
        entry = self.get(origin)
        assert entry is not None, "every origin in _tombstones is held"
        return entry

    def _tombstone_time(self, origin: str) -> float:
        since = self._tombstone_entry(origin).tombstone_since
        assert since is not None, "every origin in _tombstones is a tombstone"
        return since

    def _index(self, origin: str, state: OriginState) -> None:
        grouped: dict[tuple[str, str], list[AppRecord]] = {}
        for rec in state.apps:
            grouped.setdefault((rec.app, rec.namespace), []).append(rec)
        for (app, namespace), recs in grouped.items():
            recs.sort(key=lambda r: r.instance)
            self._apps.setdefault(app, {}).setdefault(namespace, {})[origin] = tuple(recs)

    def _unindex(self, origin: str, state: OriginState) -> None:
        # Prune emptied levels so apps that vanish from the mesh cost nothing.
        for app, namespace in {(rec.app, rec.namespace) for rec in state.apps}:
            namespaces = self._apps.get(app)
            if namespaces is None:
                continue
            by_origin = namespaces.get(namespace)
            if by_origin is None:
                continue
            by_origin.pop(origin, None)
            if not by_origin:
                del namespaces[namespace]
                if not namespaces:
                    del self._apps[app]
