"""Protocol configuration: one documented dataclass, three profiles.

Defaults follow memberlist's ``DefaultLANConfig`` / ``DefaultWANConfig`` /
``DefaultLocalConfig`` where a field has a counterpart there, because those
values have years of production behind them.  Times are seconds (floats).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Config:
    #: Seconds between probes of one member (scaled by local health).  Shorter
    #: detects faster but costs one ping per node per interval.
    probe_interval: float = 1.0
    #: Seconds to wait for a direct ack before asking helpers.  Must be well
    #: above the network's 99th-percentile round trip.
    probe_timeout: float = 0.5
    #: Helpers asked to probe indirectly after a missed direct ack (SWIM's k).
    indirect_checks: int = 3
    #: Suspicion timeout floor = suspicion_mult * max(1, log10 n) * probe_interval.
    suspicion_mult: int = 4
    #: Suspicion timeout ceiling = suspicion_max_timeout_mult * floor (Lifeguard).
    suspicion_max_timeout_mult: int = 6
    #: Each broadcast goes out retransmit_mult * ceil(log10(n + 1)) times, and
    #: at least ln((n - 1) / 0.001) (queue.retransmit_limit).
    retransmit_mult: int = 4
    #: Seconds between gossip rounds, and members gossiped to per round.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    #: Seconds a dead member still receives gossip, so it can learn it was
    #: declared dead and refute (memberlist's GossipToTheDeadTime).
    gossip_to_the_dead: float = 30.0
    #: Seconds between anti-entropy syncs with one random member; scaled up
    #: above 32 members like memberlist's push-pull.  A sync compares
    #: fingerprints of the member view and the store, and sends member lists
    #: or digests only where they differ, so it is cheap enough to run often;
    #: it bounds worst-case record spread.
    digest_interval: float = 5.0
    #: Seconds between attempts to reach one dead (not left) member, so that a
    #: healed partition merges again (Serf's reconnect).  0 disables.
    reconnect_interval: float = 30.0
    #: Seconds a dead or left member, and its records as a tombstone, are kept
    #: before being forgotten.  Must outlast any partition one expects to heal
    #: by reconnect; a stale copy older than this could be resurrected.
    tombstone_timeout: float = 3600.0
    #: Highest local-health score (Lifeguard); timeouts scale by (score + 1).
    awareness_max_multiplier: int = 8
    #: Lifeguard on: local health, dynamic suspicion, buddy system.  Off gives
    #: plain SWIM with a fixed suspicion timeout, for comparison.
    lifeguard: bool = True
    #: Piggyback byte budgets per message: kept separate so that a burst of
    #: record updates cannot starve membership updates, or the reverse.  An
    #: alive claim carries its member's certificate (~570 B), so memberlist's
    #: 1400 B (its UDP packet) held two: at 1,000 members under 10% loss the
    #: refutations then outran the queue, some never reached every observer,
    #: and those declared running members dead (simulations/RESULTS.md).
    member_budget: int = 8 * 1024
    record_budget: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("probe_interval", "probe_timeout", "gossip_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("probe_timeout must be shorter than probe_interval")
        if self.suspicion_mult < 1 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("suspicion multipliers must be at least 1")
        if self.retransmit_mult < 1 or self.gossip_nodes < 1 or self.indirect_checks < 0:
            raise ValueError("retransmit_mult and gossip_nodes must be at least 1")

    @classmethod
    def lan(cls, **overrides: object) -> Config:
        """One cluster's nodes on a LAN or within a cloud region."""
        return dataclasses.replace(cls(), **overrides)  # type: ignore[arg-type]

    @classmethod
    def wan(cls, **overrides: object) -> Config:
        """Bridges across regions: longer timeouts, fewer, slower gossip rounds."""
        base = cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            suspicion_mult=6,
            gossip_interval=0.5,
            gossip_nodes=4,
            digest_interval=10.0,
            gossip_to_the_dead=60.0,
        )
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]

    @classmethod
    def local(cls, **overrides: object) -> Config:
        """Loopback or one host: short timeouts, quick convergence."""
        base = cls(
            probe_interval=1.0,
            probe_timeout=0.2,
            suspicion_mult=3,
            digest_interval=2.0,
            gossip_to_the_dead=15.0,
            reconnect_interval=10.0,
        )
        return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]
