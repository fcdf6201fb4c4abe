"""One lookup, start to finish: records held -> candidates -> policy -> answer.

Shared by the agent's API and the harness, so a test of the harness and a
lookup on a real node rank the same records the same way.  Pure: it reads a
record store and the bridges' statements (:class:`~meshd.protocol.reach.Reach`)
and returns values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from meshd.policy.gateway import sni_name, split_hostport
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy, Candidate, Ranked, select
from meshd.protocol.reach import Reach
from meshd.protocol.store import RecordStore
from meshd.wire import AppRecord, OriginState


@dataclass(frozen=True, slots=True)
class Gateway:
    address: str
    port: int
    sni: str


@dataclass(frozen=True, slots=True)
class Answer:
    """One endpoint of a lookup: where it runs, why it sits where it does."""

    state: OriginState
    record: AppRecord
    tier: str
    active: bool
    reachable: bool
    gateway: Gateway | None = None

    @property
    def address(self) -> str:
        return self.gateway.address if self.gateway else self.record.address

    @property
    def port(self) -> int:
        return self.gateway.port if self.gateway else self.record.port


def exported_to(record: AppRecord, origin_cluster: str, cluster: str) -> bool:
    return record.export is None or cluster == origin_cluster or cluster in record.export


def resolve(
    asker: Topology,
    store: RecordStore,
    reach: Reach,
    policy: AppPolicy,
    app: str,
    namespace: str,
    *,
    include_unhealthy: bool = False,
    trust_domain: str = "mesh.local",
    node_rtt: Callable[[str], float | None] | None = None,
) -> list[Answer]:
    """Endpoints of ``app`` for ``asker``, best first (see policy.select).

    A remote member its own bridges declared dead is tombstoned in the store
    and so never appears; a cluster we cannot reach is served only as
    unhealthy (``?all=1`` shows it).  Round trips, for ``order = "rtt"`` and
    for preferring the nearest other cluster: ``node_rtt(member)`` inside our
    cluster (our own probes' coordinates), the bridges' estimate per cluster
    outside it.
    """
    by_key: dict[tuple[str, str, str], tuple[OriginState, AppRecord]] = {}
    candidates = []
    for state, rec in store.endpoints(app, namespace):
        if state.cluster == asker.cluster:
            rtt = node_rtt(state.member) if node_rtt is not None else None
        else:
            rtt = reach.rtt.get(state.cluster)
        cand = Candidate(
            instance=rec.instance,
            app=rec.app,
            namespace=rec.namespace,
            address=rec.address,
            port=rec.port,
            node=state.node,
            cluster=state.cluster,
            region=state.region,
            zone=state.zone,
            health=rec.health,
            weight=rec.weight,
            reachable=reach.reachable(state.cluster),
            exported_to_asker=exported_to(rec, state.cluster, asker.cluster),
            rtt=rtt,
        )
        candidates.append(cand)
        by_key[cand.key] = (state, rec)
    ranked: list[Ranked] = select(
        asker, candidates, policy, include_unhealthy=include_unhealthy, cluster_rtt=reach.rtt
    )
    out = []
    for r in ranked:
        state, rec = by_key[r.candidate.key]
        gateway = None
        if state.gateway and state.cluster != asker.cluster:
            host, port = split_hostport(state.gateway)
            sni = sni_name(rec.instance, rec.app, rec.namespace, state.cluster, trust_domain)
            gateway = Gateway(host, port, sni)
        out.append(Answer(state, rec, r.tier, r.active, r.candidate.reachable, gateway))
    return out
