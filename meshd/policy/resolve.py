"""One lookup, start to finish: records held -> candidates -> policy -> endpoints.

Shared by the agent's API and the harness, so a test of the harness and a
lookup on a real node rank the same records the same way.  Pure: it reads a
record store and the bridges' statements (:class:`~meshd.protocol.reach.Reach`)
and returns values.

This is the one place a record becomes something else: :func:`candidate`
(what the policy ranks) and :func:`endpoint` (what every answer is written
from).  Nothing downstream copies fields between models; the Consul API and
the DNS responder read :class:`Endpoint` and write their own wire shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from meshd.policy.gateway import sni_name, split_hostport
from meshd.policy.locality import Topology
from meshd.policy.policy import AppPolicy, Candidate, Ranked, select
from meshd.protocol.reach import Reach
from meshd.protocol.store import RecordStore
from meshd.wire import AppRecord, OriginState, may_reach, member_id


@dataclass(frozen=True, slots=True)
class Gateway:
    """How an asker outside the endpoint's cluster reaches it: the gateway's
    address and port, and the TLS server name that routes to the instance."""

    address: str
    port: int
    sni: str

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "sni": self.sni}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One endpoint of a lookup: the one model every answer is written from.

    Built here, from a verified record and its document, and nowhere else;
    the native API writes it with :meth:`to_json` (contract:
    ``GET /v1/resolve/{app}``), the Consul API and the DNS responder each
    write their own shape from the same fields.  ``address``/``port`` are
    where to dial: the gateway's when the endpoint is behind one.
    """

    app: str
    namespace: str
    instance: str
    address: str
    port: int
    protocol: str
    #: The node name (as the node calls itself) and its cluster; ``member``
    #: is the two together, the member id ``cluster/node``.
    node: str
    cluster: str
    region: str
    zone: str
    health: str
    weight: int
    meta: dict[str, str] = field(default_factory=dict)
    tier: str = "any"
    gateway: Gateway | None = None
    #: False when the endpoint's cluster is cut off (only listed with ?all=1).
    reachable: bool = True
    #: False for a standby: listed in order, but the policy sends traffic to
    #: the active ones while they are enough (min_healthy spill rule).
    active: bool = True
    #: False when the node is dead: an inventory lists its instances
    #: (critical) until it comes back or is reaped; lookups never do.
    alive: bool = True
    #: The node's own address and operator metadata, as its document says.
    host: str = ""
    node_meta: dict[str, str] = field(default_factory=dict)

    @property
    def member(self) -> str:
        return member_id(self.cluster, self.node)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "instance": self.instance,
            "address": self.address,
            "port": self.port,
            "protocol": self.protocol,
            "node": self.node,
            "cluster": self.cluster,
            "region": self.region,
            "zone": self.zone,
            "health": self.health,
            "weight": self.weight,
            "meta": dict(self.meta),
            "tier": self.tier,
        }
        if self.gateway is not None:
            out["gateway"] = self.gateway.to_json()
        # Extensions appear only when they say something: a plain answer keeps
        # exactly the contract's keys.
        if not self.reachable:
            out["reachable"] = False
        if not self.active:
            out["active"] = False
        if not self.alive:
            out["alive"] = False
        return out


def candidate(
    state: OriginState, rec: AppRecord, asker: Topology, reach: Reach, rtt: float | None
) -> Candidate:
    """What the policy ranks, from a record and the document that carries it."""
    return Candidate(
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


def endpoint(
    state: OriginState,
    rec: AppRecord,
    ranked: Ranked,
    gateway: Gateway | None,
    alive: bool = True,
) -> Endpoint:
    """The answer row for a record the policy ranked."""
    return Endpoint(
        app=rec.app,
        namespace=rec.namespace,
        instance=rec.instance,
        address=gateway.address if gateway else rec.address,
        port=gateway.port if gateway else rec.port,
        protocol=rec.protocol,
        node=state.node,
        cluster=state.cluster,
        region=state.region,
        zone=state.zone,
        health=rec.health,
        weight=rec.weight,
        meta=dict(rec.meta),
        tier=ranked.tier,
        gateway=gateway,
        reachable=ranked.candidate.reachable,
        active=ranked.active,
        alive=alive,
        host=state.host,
        node_meta=dict(state.node_meta),
    )


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
) -> list[Endpoint]:
    """Endpoints of ``app`` for ``asker``, best first (see policy.select).

    A remote member its own bridges declared dead is tombstoned in the store
    and so never appears; a cluster we cannot reach is served only as
    unhealthy (``?all=1`` shows it).  Round trips, for ``order = "rtt"`` and
    for preferring the nearest other cluster: ``node_rtt(member)`` inside our
    cluster (our own probes' coordinates), the bridges' estimate per cluster
    outside it.
    """
    live = store.endpoints(app, namespace)
    return _rank(asker, live, (), reach, policy, include_unhealthy, trust_domain, node_rtt)


def inventory(
    cluster: str,
    store: RecordStore,
    reach: Reach,
    policy: AppPolicy,
    app: str,
    namespace: str,
    dead: Iterable[tuple[OriginState, AppRecord]] = (),
    *,
    trust_domain: str = "mesh.local",
) -> list[Endpoint]:
    """Every instance of ``app`` that ``cluster`` may see, each with its health.

    What a catalog lists, as opposed to what a caller should dial
    (:func:`resolve`): unhealthy and unreachable instances too, and the
    instances of dead nodes (``dead``, remembered by the agent) as critical
    with ``alive`` False.  Ordered by the policy as seen from the cluster as a
    whole (no node, zone or region of the asker, no per-node round trips), so
    every agent of a cluster with the same records answers the same list.
    """
    asker = Topology("", cluster)
    live = store.endpoints(app, namespace)
    held = {(st.member, rec.instance) for st, rec in live}
    gone = [
        (st, dataclasses.replace(rec, health="critical"))
        for st, rec in dead
        if rec.app == app
        and rec.namespace == namespace
        and (st.member, rec.instance) not in held
        and may_reach(st.origin, cluster)
    ]
    return _rank(asker, live, gone, reach, policy, True, trust_domain, None)


def _rank(
    asker: Topology,
    live: Iterable[tuple[OriginState, AppRecord]],
    dead: Iterable[tuple[OriginState, AppRecord]],
    reach: Reach,
    policy: AppPolicy,
    include_unhealthy: bool,
    trust_domain: str,
    node_rtt: Callable[[str], float | None] | None,
) -> list[Endpoint]:
    by_key: dict[tuple[str, str, str], tuple[OriginState, AppRecord, bool]] = {}
    candidates = []
    for alive, pairs in ((True, live), (False, dead)):
        for state, rec in pairs:
            if state.cluster == asker.cluster:
                rtt = node_rtt(state.member) if node_rtt is not None else None
            else:
                rtt = reach.rtt.get(state.cluster)
            cand = candidate(state, rec, asker, reach, rtt)
            if cand.key in by_key:
                continue
            candidates.append(cand)
            by_key[cand.key] = (state, rec, alive)
    ranked: list[Ranked] = select(
        asker, candidates, policy, include_unhealthy=include_unhealthy, cluster_rtt=reach.rtt
    )
    out = []
    for r in ranked:
        state, rec, alive = by_key[r.candidate.key]
        gateway = None
        if state.gateway and state.cluster != asker.cluster:
            host, port = split_hostport(state.gateway)
            sni = sni_name(rec.instance, rec.app, rec.namespace, state.cluster, trust_domain)
            gateway = Gateway(host, port, sni)
        out.append(endpoint(state, rec, r, gateway, alive))
    return out
