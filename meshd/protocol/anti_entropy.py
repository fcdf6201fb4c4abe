"""Anti-entropy for one core: periodic syncs that repair what gossip lost.

One job of ``Core``.  Every sync interval (stretched above 32 members, as
memberlist's pushPullScale) the core syncs with one random alive member.  Two
fingerprints make agreeing peers cheap: of the member view and of the record
store; only where they differ do member lists or record digests flow, and
then only the states the other side lacks, in frame-sized chunks.  Joins are
full syncs with the seeds, retried while we know no one; a dead member is
contacted now and then so that a healed partition merges (Serf's
reconnect).  O(n) answers are rationed per peer (a token bucket), and a reply
to a sync we never opened draws nothing.

It reads and changes its core's tables through the core (``AntiEntropy.core``):
what a sync brings in is merged by ``Core.receive`` before the handlers here run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from meshd.protocol.sampling import below
from meshd.wire import (
    Gossip,
    MemberUpdate,
    PushPull,
    PushPullReply,
    SignedState,
    Status,
    may_reach,
)

if TYPE_CHECKING:
    from meshd.protocol.core import Core
    from meshd.protocol.members import Member

#: Bytes of states per anti-entropy message: with a full member list of a
#: 10,000-node pool (~0.6 MiB) this stays under the 1 MiB frame limit.
SYNC_CHUNK_BYTES = 256 * 1024
#: Seconds between join attempts while we know no other member.
JOIN_RETRY_INTERVAL = 2.0
#: Pools above this size sync less often (memberlist's pushPullScaleThreshold).
PUSH_PULL_SCALE_THRESHOLD = 32

#: Heavy sync answers (our member list, digest or states: O(n) bytes, ~0.6 KB
#: a member with its claim) one peer may draw from us: a burst of
#: HEAVY_REPLY_BURST, then one per HEAVY_REPLY_INTERVAL seconds.  An honest
#: peer syncs with us about once per digest interval (2-10 s) and a joiner
#: retries every 2 s; a peer that asks faster is amplifying its own small
#: frames into our O(n) answers, and gets fingerprints only until it slows.
HEAVY_REPLY_BURST = 8
HEAVY_REPLY_INTERVAL = 1.0

# What an open sync offered (``Core._open_syncs``): our full member list and
# digest (a join), our digest, or our fingerprints alone.
_SYNC_FULL, _SYNC_DIGEST, _SYNC_SHORT = "full", "digest", "short"


def push_pull_scale(interval: float, n: int) -> float:
    """Stretch a sync interval above 32 members so the pool-wide sync load stays flat.

    ``interval * (ceil(log2 n - log2 32) + 1)``, as memberlist's ``pushPullScale``.
    """
    if n <= PUSH_PULL_SCALE_THRESHOLD:
        return interval
    mult = math.ceil(math.log2(n) - math.log2(PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return interval * mult


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


def _cluster_of(mid: str) -> str:
    return mid.partition("/")[0]


def _chunks(items: Sequence[_Sized]) -> Iterator[tuple[Any, ...]]:
    """``items`` in runs of at most SYNC_CHUNK_BYTES (each run at least one item)."""
    chunk: list[Any] = []
    used = 0
    for s in items:
        if chunk and used + s.size > SYNC_CHUNK_BYTES:
            yield tuple(chunk)
            chunk, used = [], 0
        chunk.append(s)
        used += s.size
    if chunk:
        yield tuple(chunk)


def _listed(m: Member) -> list[MemberUpdate]:
    """``m`` as a member list gives it (see ``AntiEntropy.full_member_list``)."""
    if m.status is Status.SUSPECT:
        return [m.update_for(Status.ALIVE, m.id), m.update_for(m.status, m.id)]
    return [m.update_for(m.status, m.id)]


#: The view a fingerprint-only answer carries to a sync opener the answerer
#: cannot place by a claim of the opener's own: not a fingerprint (those are
#: hashes; 0 has odds of 2^-64), it asks the opener for a full sync.
UNPLACED = 0


class AntiEntropy:
    """The sync part of one core (see module doc)."""

    # Slots, as Core's (see there).
    __slots__ = (
        "core",
        "heavy",
        "next_digest",
        "next_join",
        "next_reconnect",
        "open_syncs",
        "seeds",
    )

    def __init__(self, core: Core) -> None:
        self.core = core
        #: Addresses we join through (retried while we know no one).
        self.seeds: list[str] = []
        #: address -> what our open sync offered (_SYNC_FULL/_DIGEST/_SHORT).
        self.open_syncs: dict[str, str] = {}
        #: source -> (heavy answers left, when last counted); see heavy_ok.
        self.heavy: dict[str, tuple[float, float]] = {}
        #: The next periodic sync, reconnect attempt and join retry (the core
        #: draws the first two, jittered, when it starts).
        self.next_digest = math.inf
        self.next_reconnect = math.inf
        self.next_join: float | None = None

    def tick(self, now: float) -> None:
        """The sync part of the core's timer: a due sync, reconnect or join retry."""
        cfg = self.core.config
        if now >= self.next_digest:
            self.next_digest = now + push_pull_scale(cfg.digest_interval, self.core.pool_size)
            self.start_sync(now)
        if cfg.reconnect_interval > 0 and now >= self.next_reconnect:
            self.next_reconnect = now + cfg.reconnect_interval
            self.reconnect(now)
        if self.next_join is not None and now >= self.next_join:
            self.retry_join(now)

    def join(self, addresses: Iterable[str], now: float) -> None:
        """Contact seeds with a full push-pull; retried while we know no one."""
        self.seeds = [a for a in addresses if a != self.core.address]
        for addr in self.seeds:
            self.send_sync(addr, "", full=True, join=True)
        self.next_join = now + JOIN_RETRY_INTERVAL if self.seeds else None

    def full_member_list(self) -> list[tuple[MemberUpdate, ...]]:
        """Our member list in chunks that each fit a frame (claims carry certificates).

        A suspected member is listed by its signed alive claim, then the
        accusation, so a peer that never heard of it can take both.  The
        accusation names the member itself as its author: we do not keep who
        accused it, and a list is no independent observation, so receivers
        read that as "no accuser named" and count no confirmation from it
        (``Core._apply``).
        """
        updates: list[MemberUpdate] = []
        for m in self.core.members.values():
            updates += _listed(m)
        return list(_chunks(updates)) or [()]

    def send_members(self, address: str, to: str, rest: list[tuple[MemberUpdate, ...]]) -> None:
        """The chunks of a member list after the first, which went in the sync."""
        for chunk in rest:
            self.core._send(address, Gossip(self.core.id, members=chunk, sync=True), to)

    def digest_for(self, cluster: str | None) -> dict[str, int]:
        """Our digest as ``cluster`` may see it (None: unknown, public docs only)."""
        digest = self.core.store.digest()
        if cluster == self.core.cluster:
            return digest
        return {o: v for o, v in digest.items() if may_reach(o, cluster if cluster else "\0")}

    def newer_for(self, remote: dict[str, int], cluster: str) -> list[SignedState]:
        return [s for s in self.core.store.newer_than(remote) if may_reach(s.origin, cluster)]

    def lacks(self, remote: dict[str, int]) -> bool:
        """Does a peer's digest list a version we do not hold (or an older one)?"""
        version = self.core.store.version
        if 0 in remote.values():
            # A version 0 we hold counts as lacking it (``or -1``), which the
            # difference below would miss: take the loop, as before.
            return any((version(o) or -1) < v for o, v in remote.items())
        # Only pairs we do not hold as listed can be newer: found in C.
        return any(
            (version(o) or -1) < v for o, v in remote.items() - self.core.store.digest().items()
        )

    def send_sync(
        self,
        address: str,
        to: str,
        full: bool,
        join: bool = False,
        dest_cluster: str | None = None,
        short: bool = True,
    ) -> None:
        """Open a sync.  ``full``: our member list and digest (a join).
        Otherwise, within our cluster, only our fingerprints (``short``): a
        peer of our cluster that agrees holds exactly what we hold.  Across
        clusters stores differ by export, so the digest always goes.  ``to``:
        the member we mean to reach there ("" for a seed)."""
        if len(self.open_syncs) > 1024:  # replies that never came: forget them
            self.open_syncs.clear()
        records = self.core.store.fingerprint if dest_cluster == self.core.cluster else 0
        short = short and not full and records != 0
        self.open_syncs[address] = _SYNC_FULL if full else _SYNC_SHORT if short else _SYNC_DIGEST
        chunks: list[tuple[MemberUpdate, ...]] = self.full_member_list() if full else [()]
        self.core._send(
            address,
            PushPull(
                self.core.id,
                source_addr=self.core.address,
                join=join,
                digest={} if short else self.digest_for(dest_cluster),
                members=chunks[0],
                view=self.core.view,
                records=records,
                revocations=self.core.revocation_number,
            ),
            to,
        )
        self.send_members(address, to, chunks[1:])

    def start_sync(self, now: float) -> None:
        peers = self.core._random_members(
            1, lambda m: m.status is Status.ALIVE and m.id != self.core.id
        )
        if peers:
            p = peers[0]
            self.send_sync(p.address, p.id, full=False, dest_cluster=p.cluster)

    def reconnect(self, now: float) -> None:
        # A healed partition: both sides think the other dead and would never
        # probe it again.  Reaching out to one dead member at a time lets the
        # refutations flow (Serf's reconnect).  A short sync is enough: if it
        # answers, our views differ (it is dead in ours), so member lists flow
        # both ways; if it is really gone, the attempt cost one small message.
        dead = sorted(n for n in self.core.table.gone if self.core.members[n].status is Status.DEAD)
        if dead:
            m = self.core.members[dead[below(self.core._rng, len(dead))]]
            self.send_sync(m.address, m.id, full=False, dest_cluster=m.cluster)

    def retry_join(self, now: float) -> None:
        if self.core.pool_size > 1 or self.core.left:
            self.next_join = None
            return
        for addr in self.seeds:
            self.send_sync(addr, "", full=True, join=True)
        self.next_join = now + JOIN_RETRY_INTERVAL

    def on_push_pull(self, msg: PushPull, now: float) -> None:
        # Answer in full only where the sender's own signed claim says it
        # listens (merged from this very message first, and a sender lists
        # itself first): ``source_addr`` is the sender's word alone, and
        # trusting it would let one member have everyone it syncs with send
        # member lists to a third agent.  A sender we cannot place there (a
        # stranger, or one whose claim we hold names another address) gets
        # the small fingerprint answer at ``source_addr``.
        known = self.core._address_of(msg.source)
        placed = known is not None and msg.source_addr in ("", known)
        addr = known if placed else msg.source_addr
        if not addr:
            return
        # Views that differ mean some member claim did not reach one of us:
        # answer with our list too, so member views converge within one sync.
        full = bool(msg.members) or msg.join or msg.view != self.core.view
        peer_cluster = _cluster_of(msg.source)
        records = self.core.store.fingerprint if peer_cluster == self.core.cluster else 0
        agree = bool(records) and msg.records == records
        if not placed and (full or not agree):
            self.core.counters["rejected-state:unplaced-sync"] += 1
        if (full or not agree) and (not placed or not self.heavy_ok(msg.source, now)):
            # Fingerprints only: enough for an honest peer to ask again later.
            # To a sender we cannot place, the view is UNPLACED ("send your
            # claim", on_push_pull_reply), and the entry we hold for it if any
            # (a restart that lost its state learns the incarnation to refute).
            own: list[MemberUpdate] = []
            if not placed and known is not None and self.heavy_ok(msg.source, now):
                own = _listed(self.core.members[msg.source])
            self.core._send(
                addr,
                PushPullReply(
                    self.core.id,
                    members=tuple(own),
                    view=self.core.view if placed else UNPLACED,
                    records=records,
                    revocations=self.core.revocation_number,
                ),
                msg.source,
            )
            return
        if agree:
            digest: dict[str, int] = {}  # we agree: nothing to send either way
            chunks: list[tuple[SignedState, ...]] = []
        elif msg.records and not msg.digest:
            # Fingerprints only, and they differ: our digest lets the opener
            # send what we lack and see what it lacks.
            digest = self.digest_for(peer_cluster)
            chunks = []
        else:
            digest = self.digest_for(peer_cluster)
            chunks = list(_chunks(self.newer_for(msg.digest, peer_cluster)))
        lists: list[tuple[MemberUpdate, ...]] = self.full_member_list() if full else [()]
        self.core._send(
            addr,
            PushPullReply(
                self.core.id,
                digest=digest,
                members=lists[0],
                states=chunks[0] if chunks else (),
                view=self.core.view,
                records=records,
                revocations=self.core.revocation_number,
            ),
            msg.source,
        )
        self.send_members(addr, msg.source, lists[1:])
        if placed:  # the list is up to 256 KiB: for a placed sender only
            self.core._offer_revocations(addr, msg.source, msg.revocations, now)
        for chunk in chunks[1:]:
            self.core._send(addr, Gossip(self.core.id, states=chunk, sync=True), msg.source)

    def heavy_ok(self, source: str, now: float) -> bool:
        """May ``source`` draw one more O(n) answer from us now?  (a token bucket)"""
        tokens, last = self.heavy.get(source, (float(HEAVY_REPLY_BURST), now))
        tokens = min(float(HEAVY_REPLY_BURST), tokens + (now - last) / HEAVY_REPLY_INTERVAL)
        if tokens < 1.0:
            self.core.counters["rejected-state:sync-rate"] += 1
            self.heavy[source] = (tokens, now)
            return False
        if len(self.heavy) >= 4096 and source not in self.heavy:
            self.heavy.clear()  # bounded: forgetting only makes us more generous
        self.heavy[source] = (tokens - 1.0, now)
        return True

    def on_push_pull_reply(self, msg: PushPullReply, now: float) -> None:
        addr = self.core._address_of(msg.source)
        if addr is None:
            return
        offered = self.open_syncs.pop(addr, None)
        if offered is None:
            # We asked nothing: what it carried was merged (verified) like any
            # gossip, but an unasked reply draws no O(n) answer from us.
            self.core.counters["rejected-state:unsolicited"] += 1
            return
        self.core._offer_revocations(addr, msg.source, msg.revocations, now)
        if offered in (_SYNC_DIGEST, _SYNC_SHORT) and msg.view == UNPLACED:
            # It could not place us by a claim of ours (it reaped us after a
            # long partition, say, or holds us at another address) and
            # answered fingerprints only, with its entry for us if it has one
            # (merged above: we refute an old life's).  Our full list, our own
            # claim first, lets it place us: without it two sides that forgot
            # each other would never heal.  The answer to a full sync is
            # never escalated again.
            self.send_sync(addr, msg.source, full=True, dest_cluster=_cluster_of(msg.source))
        elif offered in (_SYNC_DIGEST, _SYNC_SHORT) and msg.members and msg.view != self.core.view:
            # It sent its list because views differed; ours may hold what it
            # lacks.  Send it back as a reply, which is never answered again.
            lists = self.full_member_list()
            self.core._send(
                addr,
                PushPullReply(
                    self.core.id,
                    digest=self.digest_for(_cluster_of(msg.source)),
                    members=lists[0],
                    view=self.core.view,
                ),
                msg.source,
            )
            self.send_members(addr, msg.source, lists[1:])
        if msg.records and not msg.digest:
            return  # its store matches ours
        peer_cluster = _cluster_of(msg.source)
        for chunk in _chunks(self.newer_for(msg.digest, peer_cluster)):
            self.core._send(addr, Gossip(self.core.id, states=chunk, sync=True), msg.source)
        if offered == _SYNC_SHORT and self.lacks(msg.digest):
            # We offered fingerprints only, so it could not tell what we
            # lack: ask again with our digest.
            self.send_sync(addr, msg.source, full=False, dest_cluster=peer_cluster, short=False)
