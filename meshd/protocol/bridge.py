"""Bridges: one node in two pools, relaying documents and liveness between clusters.

A bridge runs two cores with one identity: its cluster's LAN pool and the WAN
pool of all clusters' bridges.  This module couples them without I/O: the
driver hands every event of either core to :meth:`Bridge.on_event` and the
bridge injects documents into the other core and restates what it knows.

- Documents: a live document that the LAN core learns (its own node's
  included) goes into the WAN core unless it is local-only; a live document
  the WAN core learns goes into the LAN core when its scope lets it into this
  cluster.  The cores' own export filter keeps every send in line, so a
  document exported only to ``west`` never reaches a node of ``central``,
  bridges included.
- Liveness: the bridge lists the members of its own cluster that its LAN view
  holds dead or left (``OriginState.down``) and the clusters it cannot reach
  (``OriginState.unreachable``), in its own signed main document.  A cluster
  is unreachable when its WAN view holds none of its bridges alive, or,
  much sooner, when none of them has answered the bridge's own watch pings
  for a few seconds (``ClusterWatch``, cluster_watch.py): a routing verdict,
  taken back at the first answer, that leaves membership alone.  Other
  clusters believe a statement about cluster C only from a certificate of C
  (the verifier checks the signer's cluster), so a relay cannot kill another
  cluster's nodes.
"""

from __future__ import annotations

import math

from meshd.protocol.cluster_watch import MAX_TARGETS, ClusterWatch, WatchConfig
from meshd.protocol.core import Core
from meshd.protocol.events import Event, MemberChanged, OriginChanged
from meshd.wire import Ping, Status, doc_member, may_reach

LAN, WAN = "lan", "wan"

#: Most members one down statement names.  An entry is a member id and a
#: version, about 40 bytes, and ``left`` may repeat the id: 1,500 of them stay
#: well inside the 128 KiB a signed document may take, with room for apps.
MAX_DOWN_STATEMENT = 1500


class Bridge:
    def __init__(
        self, lan: Core, wan: Core, now: float = 0.0, watch: WatchConfig | None = None
    ) -> None:
        if lan.id != wan.id:
            raise ValueError("a bridge's two cores must share one identity")
        if wan.publisher:
            raise ValueError("the WAN core of a bridge must not publish (publisher=False)")
        self.lan = lan
        self.wan = wan
        self.cluster = lan.cluster
        #: Our own pings to the other clusters' bridges (cluster_watch.py).
        self.watch = ClusterWatch(wan.id, wan.address, now, watch)

    def start(self, now: float) -> None:
        """Relay what each core already holds and state our view once."""
        for entry in list(self.lan.store.live()):
            self._to_wan(entry.signed.origin, now)
        for entry in list(self.wan.store.live()):
            self._to_lan(entry.signed.origin, now)
        self._restate(now)

    def on_event(self, pool: str, event: Event, now: float) -> None:
        if isinstance(event, OriginChanged):
            if not event.live:
                return
            if pool == LAN:
                self._to_wan(event.origin, now)
            else:
                self._to_lan(event.origin, now)
        elif isinstance(event, MemberChanged):
            own_member = event.member.partition("/")[0] == self.cluster
            if pool == WAN or own_member:
                self._restate(now)

    def _to_wan(self, origin: str, now: float) -> None:
        entry = self.lan.store.get(origin)
        if entry is None or entry.tombstone_since is not None:
            return
        if origin.partition("#")[2] == "local":
            return  # this cluster only, and the WAN pool is not this cluster
        self.wan.inject(entry.signed, now)

    def _to_lan(self, origin: str, now: float) -> None:
        entry = self.wan.store.get(origin)
        if entry is None or entry.tombstone_since is not None:
            return
        if doc_member(origin).partition("/")[0] == self.cluster:
            # Our own cluster's documents travel in our LAN pool, which also
            # decides their liveness; a WAN copy could only be older, or one
            # the LAN has already reaped (a resurrection).
            return
        if may_reach(origin, self.cluster):
            self.lan.inject(entry.signed, now)

    def down_members(self) -> list[tuple[str, int]]:
        """(member, highest version of its documents we hold) for the dead and left.

        At most :data:`MAX_DOWN_STATEMENT`, the most recent kept: the
        statement rides in the bridge's signed main document, which must stay
        within the wire's body limit however many members a churning pool
        has buried within a tombstone timeout.  A statement is remembered by
        every store that took it, so dropping an old entry unburies nothing.
        """
        gone = [
            m
            for m in self.lan.members.values()
            if m.cluster == self.cluster and m.status in (Status.DEAD, Status.LEFT)
        ]
        if len(gone) > MAX_DOWN_STATEMENT:
            gone = sorted(gone, key=lambda m: (m.since, m.id))[-MAX_DOWN_STATEMENT:]
        out = []
        for m in gone:
            versions = [self.lan.store.version(doc) or 0 for doc in self.lan.docs_of(m.id)]
            out.append((m.id, max(versions, default=0)))
        return sorted(out)

    def left_members(self, down: list[tuple[str, int]]) -> list[str]:
        """The members of ``down`` that left gracefully."""
        members = self.lan.members
        return [mid for mid, _ in down if members[mid].status is Status.LEFT]

    def unreachable_clusters(self) -> list[str]:
        """Clusters with no live bridge in our WAN view, and those our watch
        has heard nothing from lately (see module doc)."""
        known: dict[str, bool] = {}
        for m in self.wan.members.values():
            known[m.cluster] = known.get(m.cluster, False) or m.serving
        out = {c for c, up in known.items() if not up and c != self.cluster}
        out |= {c for c in self.watch.unreachable() if c in known}
        return sorted(out)

    def watch_targets(self) -> dict[str, list[tuple[str, str]]]:
        """Per other cluster, ``(member, address)`` of the bridges to ping:
        those alive or suspected in our WAN view.  A cluster with none is
        unreachable by membership already, and pinging the dead would only
        cost connection attempts."""
        found: dict[str, list[tuple[str, str]]] = {}
        for m in self.wan.members.values():
            if m.cluster != self.cluster and m.serving and m.address:
                found.setdefault(m.cluster, []).append((m.id, m.address))
        return {c: sorted(ms)[:MAX_TARGETS] for c, ms in found.items()}

    def tick_watch(self, now: float) -> list[tuple[str, Ping]]:
        """The watch's timer: returns its pings (address, message) for the
        WAN pool; a changed verdict restates our main document at once."""
        targets = {} if self.wan.left else self.watch_targets()
        pings, changed = self.watch.tick(now, targets)
        if changed:
            self._restate(now)
        return pings

    def on_wan_ack(self, source: str, seq: int, now: float) -> None:
        if self.watch.on_ack(source, seq, now):
            self._restate(now)

    def cluster_rtts(self) -> list[tuple[str, int]]:
        """(cluster, microseconds) to the nearest live bridge of each other cluster.

        Estimates from WAN coordinates, rounded to steps of 25% on a log scale
        so that jitter does not re-sign and re-gossip our document.
        """
        best: dict[str, float] = {}
        for m in self.wan.members.values():
            if m.cluster == self.cluster or not m.serving:
                continue
            rtt = self.wan.estimated_rtt(m.id)
            if rtt is not None and (m.cluster not in best or rtt < best[m.cluster]):
                best[m.cluster] = rtt
        stated = dict(self.lan.rtt_statement)
        out = []
        for c, r in best.items():
            us = quantize_us(r)
            old = stated.get(c)
            # Hysteresis: keep the stated value until the estimate has moved
            # RTT_HYSTERESIS steps away, so jitter does not re-sign our document.
            if old is not None and abs(math.log(us / old, RTT_STEP)) < RTT_HYSTERESIS:
                us = old
            out.append((c, us))
        return sorted(out)

    def refresh(self, now: float) -> None:
        """Restate if anything changed (the driver calls this now and then:
        round-trip estimates move without any membership event)."""
        self._restate(now)

    def _restate(self, now: float) -> None:
        down = self.down_members()
        self.lan.set_bridge_info(
            down,
            self.unreachable_clusters(),
            now,
            rtt=self.cluster_rtts(),
            left=self.left_members(down),
        )


#: Ratio between two round-trip steps a bridge states (see Bridge.cluster_rtts),
#: and how many steps an estimate must move before the statement changes.
RTT_STEP = 1.25
RTT_HYSTERESIS = 2


def quantize_us(seconds: float) -> int:
    """Seconds to whole microseconds on a log scale of RTT_STEP (>= 1 us)."""
    us = max(seconds * 1e6, 1.0)
    return int(round(RTT_STEP ** round(math.log(us, RTT_STEP))))
