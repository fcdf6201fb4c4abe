"""Records, for one core: one job of ``Core``.

What the core holds of every origin's documents and what it says itself.
Other origins' documents are merged into the record store (store.py) only
after they verified and only when the export rule lets this cluster hold
them; a bridge's down statement tombstones what it covers, capped at the
versions the subject itself signed.  This core's own documents are drafted
(documents.py), re-signed under one new version when their content changes,
stored and queued to spread.  It also tracks which scoped documents each
member has (``cluster/node#scope``) so a member's death or return reaches all
of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from meshd.protocol.documents import Publisher
from meshd.protocol.documents import drafts as draft_documents
from meshd.protocol.events import OriginChanged
from meshd.protocol.store import Merge, RecordStore, wins
from meshd.wire import OriginState, Rejection, SignedState, Status, doc_member, may_reach

if TYPE_CHECKING:
    from meshd.protocol.core import Core

#: Failed verifications (bad signature, bad or untrusted certificate) after
#: which the rest of one message is dropped unread: an honest peer relays only
#: what verified for it, so a few failures are churn (an expired signer) and
#: many are an attack whose every signature check costs us CPU.
MAX_BAD_PER_MESSAGE = 8


class Records:
    """The documents one core holds and the ones it publishes (see module doc)."""

    # Slots, as Core's (see there).
    __slots__ = ("core", "dead_as_of", "left_at", "published", "scoped", "store")

    def __init__(self, core: Core, store: RecordStore) -> None:
        self.core = core
        self.store = store
        #: Last published content per scope (version left at 0), to re-sign
        #: only the documents that changed.
        self.published: dict[str, OriginState] = {}
        #: member id -> ids of its scoped documents (``cluster/node#scope``)
        #: held in the store; a main document's id is the member id itself.
        self.scoped: dict[str, set[str]] = {}
        #: member id -> (version it is dead as of, when we heard it), from
        #: bridges' down statements; forgotten after tombstone_timeout.
        self.dead_as_of: dict[str, tuple[int, float]] = {}
        #: member id -> when a bridge of its cluster said it left gracefully
        #: (OriginState.left); forgotten after tombstone_timeout.
        self.left_at: dict[str, float] = {}

    def docs_of(self, member: str) -> set[str]:
        """Ids of the documents of ``member`` held in the store."""
        return set(self.doc_ids(member))

    def reap(self, now: float, timeout: float) -> None:
        """Forget tombstones and down statements older than ``timeout``."""
        for member in [m for m, (_, t) in self.dead_as_of.items() if now - t >= timeout]:
            del self.dead_as_of[member]
        for member in [m for m, t in self.left_at.items() if now - t >= timeout]:
            del self.left_at[member]
        for doc in self.store.reap(now, timeout):
            scoped = self.scoped.get(doc_member(doc))
            if scoped is not None:
                scoped.discard(doc)
                if not scoped:
                    del self.scoped[doc_member(doc)]

    def publish(self, now: float, force: bool = False) -> int:
        """Re-sign, under one new version, every document whose content changed.

        What the documents hold is drafted in ``documents.py`` (one per
        audience, the main one always, emptied scopes kept).
        """
        core = self.core
        if not core.publisher:
            raise RuntimeError("this core does not publish (a bridge's WAN core)")
        drafts = {
            scope: d
            for scope, d in draft_documents(
                Publisher.of(core), core._apps.values(), self.published
            ).items()
            if force or self.published.get(scope) != d
        }
        if not drafts:
            return core.version
        core.version += 1
        for scope, draft in sorted(drafts.items()):
            self.published[scope] = draft
            state = dataclasses.replace(draft, version=core.version)
            signed = core._signer.sign(state)
            self.store.merge(signed, state, now)
            self.note_doc(signed.origin)
            core.gossip.record_q.push(signed.origin, signed)
            core._events.append(OriginChanged(signed.origin, core.version, True))
        core.gossip.wake(now)
        return core.version

    def doc_ids(self, member: str) -> list[str]:
        """Ids of ``member``'s documents held in the store, sorted."""
        out = [member] if member in self.store else []
        scoped = self.scoped.get(member)
        if scoped:
            out += sorted(scoped)
        return out

    def note_doc(self, origin: str) -> None:
        member, sep, _ = origin.partition("#")
        if sep:
            self.scoped.setdefault(member, set()).add(origin)

    def origin_event(self, origin: str, live: bool) -> None:
        core = self.core
        entry = self.store.get(origin)
        if entry is not None:
            core._events.append(OriginChanged(origin, entry.signed.version, live))

    def merge(self, states: Iterable[SignedState], now: float, rebroadcast: bool) -> None:
        core = self.core
        for signed in states:
            if core._bad >= MAX_BAD_PER_MESSAGE:
                break
            entry = self.store.get(signed.origin)
            if entry is not None and not wins(signed, entry.signed):
                continue  # already have it or newer: skip verification entirely
            owner = doc_member(signed.origin)
            if not may_reach(signed.origin, core.cluster):
                # Export control, on the receiving side too: a peer that
                # should not have sent it does not get it stored here.
                core.counters["rejected-state:not-exported"] += 1
                continue
            result = core._verifier.verify(signed)
            if isinstance(result, Rejection):
                core._bad += 1
                core.counters[f"rejected-state:{result.reason}"] += 1
                continue
            if owner == core.id and core.publisher:
                # Verified first: only our own signature may move our counter.
                self.own_state_seen(signed, now)
                continue
            m = core.members.get(owner)
            dead = m is not None and m.status in (Status.DEAD, Status.LEFT)
            as_of = self.dead_as_of.get(owner)
            if as_of is not None and signed.version <= as_of[0]:
                dead = True  # a bridge of its cluster said so: this life is over
            merged = self.store.merge(signed, result, now, tombstoned=dead)
            if merged is Merge.KEPT and not dead:
                self.left_at.pop(owner, None)  # a new life: it did not stay gone
            if merged is Merge.KEPT:
                self.note_doc(signed.origin)
                if result.down:
                    own = result.cluster == core.cluster
                    if not own:
                        # Who of them left, known before their documents are
                        # buried (the driver reads it on the events that follow).
                        down = {m for m, _ in result.down}
                        for member in result.left:
                            if member in down:
                                self.left_at[member] = now
                    self.apply_down(result.down, now, own=own)
                core._events.append(OriginChanged(signed.origin, signed.version, not dead))
                if rebroadcast and not dead:
                    # A new document is passed on at once, not at the next
                    # round: each hop of its epidemic then costs a message's
                    # latency instead of half a gossip interval on average.
                    # ``hurry`` keeps rounds HURRY_GAP apart, so a peer that
                    # floods us with documents gets at most 1 / HURRY_GAP
                    # rounds per interval out of us.
                    core.gossip.record_q.push(signed.origin, signed)
                    core.gossip.hurry(now)
            elif merged is Merge.FULL:
                core.counters["rejected-state:store-full"] += 1

    def apply_down(self, down: Iterable[tuple[str, int]], now: float, own: bool) -> None:
        """A bridge says these members of its cluster are dead as of a version:
        tombstone what we hold of theirs up to it (the verifier has checked the
        statement comes from a bridge certificate of that cluster).

        A version is a counter about the member, so it is taken only up to
        the highest version we hold signed by the member itself: a bridge
        cannot bury a life the member has not yet lived.  In the bridge's own
        cluster (``own``) membership is the authority on who is dead, so only
        a statement about ourselves matters there: we republish, so that
        other clusters serve us again.
        """
        core = self.core
        for member, stated in down:
            if member == core.id:
                # A stale or false statement that covers our current version
                # (receivers cap it at the versions they hold of ours): outrun
                # it with the next version, so other clusters serve us again.
                # Never jump to a stated version: it is no version we signed
                # (a real later document of ours moves us in own_state_seen).
                if stated > core.version:
                    core.counters["rejected-state:down-beyond-signed"] += 1
                if core.publisher and stated >= core.version:
                    self.publish(now, force=True)
                continue
            if own:
                continue
            held = [v for d in self.doc_ids(member) if (v := self.store.version(d)) is not None]
            if not held:
                continue  # nothing of theirs here to bury, nor a version to bound it
            if stated > max(held):
                core.counters["rejected-state:down-beyond-signed"] += 1
            version = min(stated, max(held))
            old = self.dead_as_of.get(member)
            if old is None or version > old[0]:
                self.dead_as_of[member] = (version, now)
            for doc in self.doc_ids(member):
                entry = self.store.get(doc)
                covered = entry is not None and entry.signed.version <= version
                if covered and self.store.tombstone(doc, now):
                    self.origin_event(doc, live=False)

    def own_state_seen(self, signed: SignedState, now: float) -> None:
        core = self.core
        # A copy of a state we signed in an earlier life that outranks ours:
        # our version counter was lost.  Move past it and republish.
        if signed.version >= core.version:
            core.counters["own-version-behind"] += 1
            core.version = signed.version
            self.publish(now, force=True)

    def recheck_signers(self, now: float) -> int:
        """Stop serving documents whose signer no longer vouches for them.

        A certificate expires, or lands on the revocation list, long after
        the documents it signed were verified; the driver calls this now and
        then (and after a new revocation list).  The documents are tombstoned,
        so a newer version signed with a renewed certificate still wins.
        Returns how many were tombstoned.
        """
        core = self.core
        dropped = 0
        for entry in list(self.store.live()):
            signed = entry.signed
            if doc_member(signed.origin) == core.id:
                continue  # ours: re-signed by set_signer when renewed
            why = core._verifier.current(signed.cert)
            if why is not None and self.store.tombstone(signed.origin, now):
                core.counters[f"rejected-state:{why.reason}"] += 1
                self.origin_event(signed.origin, live=False)
                dropped += 1
        return dropped
