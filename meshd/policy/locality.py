"""Locality tiers: where an endpoint sits relative to the node that asks.

Pure functions over plain values.  The tier order is the contract's: same
node, same zone, same region, same cluster, then the clusters of a failover
list, then anything else allowed.  Zone and region are physical places, so a
copy in the asker's zone wins even when it belongs to another cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

TIERS = ("node", "zone", "region", "cluster", "failover", "any")
TIER_RANK = {t: i for i, t in enumerate(TIERS)}


@dataclass(frozen=True, slots=True)
class Topology:
    """Where a node is: what every locality rule compares."""

    node: str
    cluster: str
    region: str = ""
    zone: str = ""


def tier_of(asker: Topology, at: Topology, failover: tuple[str, ...] = ()) -> str:
    """The tier of an endpoint hosted at ``at`` as seen from ``asker``.

    Empty region or zone never match: unknown is not "the same place".
    """
    if at.cluster == asker.cluster and at.node == asker.node:
        return "node"
    if asker.zone and at.zone == asker.zone and at.region == asker.region:
        return "zone"
    if asker.region and at.region == asker.region:
        return "region"
    if at.cluster == asker.cluster:
        return "cluster"
    if at.cluster in failover:
        return "failover"
    return "any"
