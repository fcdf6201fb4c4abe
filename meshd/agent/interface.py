"""What the local API and the CLI may ask of a running agent.

The HTTP layer (``meshd/api``) codes against :class:`AgentAPI` only, never
against the protocol core, so it can be tested with a fake agent and the
agent can change its insides freely.  Values crossing this line are frozen
dataclasses with a ``to_json`` that fixes the contract's JSON shapes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from cryptography import x509

from meshd.metrics import Metrics
from meshd.policy.resolve import Endpoint, Gateway
from meshd.protocol.vivaldi import Coordinate

__all__ = [
    "AgentAPI",
    "CheckSpec",
    "ClusterInfo",
    "Endpoint",
    "Gateway",
    "MemberInfo",
    "Registration",
    "StorageError",
]
from meshd.revocation import RevocationList
from meshd.wire import AppRecord

CheckKind = Literal["ttl", "http", "tcp"]
HEALTH = ("passing", "warning", "critical")


class StorageError(Exception):
    """A change the agent could not store durably, and so did not make.

    ``full`` says the cause is a full disk (or quota); the API answers 507
    then, 503 for any other storage failure.  The message is one sentence.
    """

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.full = full

    @property
    def status(self) -> int:
        return 507 if self.full else 503


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """A health check the agent runs for one instance (contract: ``check``).

    ``ttl``: the app must report within ``ttl`` seconds or turn critical.
    ``http``: GET ``target`` (a URL) every ``interval``; 2xx passing, 429
    warning, anything else critical.  ``tcp``: connect to ``target``
    (HOST:PORT) every ``interval``.
    """

    kind: CheckKind
    target: str = ""
    interval: float = 0.0
    ttl: float = 0.0

    def to_json(self) -> dict[str, str]:
        if self.kind == "ttl":
            return {"ttl": _dur(self.ttl)}
        return {self.kind: self.target, "interval": _dur(self.interval)}


@dataclass(frozen=True, slots=True)
class Registration:
    """A local instance as registered, with its check and its current health."""

    record: AppRecord
    check: CheckSpec | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record
        out: dict[str, Any] = {
            "instance": r.instance,
            "app": r.app,
            "namespace": r.namespace,
            "address": r.address,
            "port": r.port,
            "protocol": r.protocol,
            "meta": dict(r.meta),
            "weight": r.weight,
            "health": r.health,
        }
        if r.export is not None:
            out["export"] = list(r.export)
        if self.check is not None:
            out["check"] = self.check.to_json()
        return out


@dataclass(frozen=True, slots=True)
class MemberInfo:
    node: str
    cluster: str
    region: str
    zone: str
    address: str
    status: Literal["alive", "suspect", "dead", "left"]
    incarnation: int
    #: Operator-set node metadata, from the member's own document when held.
    meta: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node,
            "cluster": self.cluster,
            "region": self.region,
            "zone": self.zone,
            "address": self.address,
            "status": self.status,
            "incarnation": self.incarnation,
        }
        if self.meta:
            out["meta"] = dict(self.meta)
        return out


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    cluster: str
    reachable: bool
    nodes: int
    bridges: int

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "reachable": self.reachable,
            "nodes": self.nodes,
            "bridges": self.bridges,
        }


class AgentAPI(Protocol):
    """The agent as the HTTP layer sees it.  Coroutines may touch disk."""

    node_name: str
    cluster: str
    metrics: Metrics

    @property
    def storage_error(self) -> str | None:
        """Why the last write to the state directory failed (one sentence), or
        None once a later write succeeded; ``/v1/health`` is degraded meanwhile."""
        ...

    @property
    def index(self) -> int:
        """Rises on every change of the records held (the blocking-query index)."""
        ...

    @property
    def generation(self) -> Hashable:
        """Changes whenever any resolve answer could change (records, reach,
        policy); equal generations mean equal answers, so the API may reuse one."""
        ...

    async def register(self, reg: Registration) -> int:
        """Store durably, then publish; returns the new origin version.

        Raises ValueError (one sentence) when the node could not publish the
        result, StorageError when it cannot be stored; either way nothing changed.
        """
        ...

    async def deregister(self, instance: str) -> bool:
        """False when the instance is unknown.  StorageError: nothing changed."""
        ...

    async def set_health(self, instance: str, status: str, output: str = "") -> bool:
        """Report a TTL check's status (and its output); False when the instance is unknown."""
        ...

    def local_registrations(self) -> list[Registration]: ...

    def resolve(
        self, app: str, namespace: str, policy: str | None, include_unhealthy: bool
    ) -> tuple[int, list[Endpoint]]:
        """(index, endpoints best first).  Raises KeyError for an unknown policy name."""
        ...

    def inventory(self, app: str, namespace: str) -> tuple[int, list[Endpoint]]:
        """(index, every instance of ``app`` this cluster may see): unhealthy,
        unreachable and dead nodes' instances too (``alive`` False, critical),
        in the policy's order as seen from the cluster, the same on every agent
        of it.  What catalogs list; :meth:`resolve` is what callers dial."""
        ...

    async def wait_for_index(self, index: int, timeout: float) -> int:
        """Return the current index once it exceeds ``index`` or ``timeout`` passes."""
        ...

    def check_outputs(self) -> dict[str, str]:
        """Local instance -> the last output of its check (a probe's result or
        error, or what the app reported with its TTL status)."""
        ...

    async def set_maintenance(self, instance: str, enable: bool, reason: str) -> bool:
        """Put a local instance in maintenance (critical, whatever its check
        says) or take it out; False when the instance is unknown."""
        ...

    def coordinates(self) -> list[tuple[str, str, Coordinate]]:
        """(node, cluster, Vivaldi coordinate) of this node and every member placed."""
        ...

    def app_names(self) -> dict[str, set[str]]:
        """``{namespace: {app, ...}}`` of every app with a live record held here
        (the catalog's list; what a given asker may see is still up to resolve)."""
        ...

    def members(self, cluster: str | None = None) -> list[MemberInfo]: ...

    def clusters(self) -> list[ClusterInfo]: ...

    def records(self) -> list[dict[str, Any]]:
        """Every document this node holds (tombstones too): what its store is."""
        ...

    def policy_json(self) -> dict[str, Any]:
        """The policy in force, as ``GET /v1/policy`` shows it."""
        ...

    def put_policy(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validate and apply a policy; raises ValueError (one sentence) and
        keeps the old one when it is invalid.  Returns the policy now in force."""
        ...

    @property
    def ca_certs(self) -> Sequence[x509.Certificate]:
        """The CA certificates this agent trusts: a revocation list must be signed by one."""
        ...

    def revocations(self) -> RevocationList | None:
        """The revocation list in force, or None while the agent has none."""
        ...

    async def put_revocations(self, rl: RevocationList) -> RevocationList:
        """Put a verified list in force, keep it in the state directory and spread it.

        Returns the list now in force; the list already held, offered again, is
        not an error.  Raises :class:`meshd.revocation.StaleRevocationList`
        (one sentence, nothing changed) when ``meshd.revocation.accept``
        refuses it: older, a different list of the same number, or one that
        drops a revoked serial.
        """
        ...


def _dur(seconds: float) -> str:
    """Seconds as a Go-style duration string, the way the contract shows them."""
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{int(round(seconds * 1000))}ms"
