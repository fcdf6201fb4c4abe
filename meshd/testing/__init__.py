"""The in-memory test harness: many protocol hosts, one network, virtual time.

- :mod:`meshd.testing.harness`: :class:`Cluster` (nodes, the event heap in
  virtual time, faults) and the :class:`Network` interface with its default
  :class:`FakeNetwork`;
- :mod:`meshd.testing.scenarios`: the standard scenarios (join, spread,
  detection, false deaths; several clusters) shared by the tests and the
  figures command;
- ``python -m meshd.testing``: the figures (``meshd/testing/__main__.py``).

The cross-cluster bounds live in :mod:`meshd.protocol.bounds` with the others;
they are re-exported here for older imports.
"""

from __future__ import annotations

from meshd.protocol.bounds import (
    cross_cluster_bound,
    cross_cluster_repair_bound,
    cross_cluster_spread_bound,
    cut_off_side_bound,
    heal_bound,
    unreachable_bound,
)
from meshd.testing.harness import (
    Cluster,
    FakeNetwork,
    HarnessNode,
    Latency,
    Network,
    uniform_latency,
)
from meshd.testing.scenarios import (
    DeathCounter,
    SpreadResult,
    all_reachable,
    bridge_indices,
    converged_everywhere,
    converged_join,
    cross_cluster_failover,
    detection_time,
    false_death_counter,
    false_deaths_under_loss,
    heal_time,
    inject_wan,
    isolation_time,
    misplaced,
    multi_cluster,
    percentile,
    published,
    reach_of,
    record_spread,
)

__all__ = [
    "Cluster",
    "DeathCounter",
    "FakeNetwork",
    "HarnessNode",
    "Latency",
    "Network",
    "SpreadResult",
    "all_reachable",
    "bridge_indices",
    "converged_everywhere",
    "converged_join",
    "cross_cluster_bound",
    "cross_cluster_failover",
    "cross_cluster_repair_bound",
    "cross_cluster_spread_bound",
    "cut_off_side_bound",
    "detection_time",
    "false_death_counter",
    "false_deaths_under_loss",
    "heal_bound",
    "heal_time",
    "inject_wan",
    "isolation_time",
    "misplaced",
    "multi_cluster",
    "percentile",
    "published",
    "reach_of",
    "record_spread",
    "uniform_latency",
    "unreachable_bound",
]
