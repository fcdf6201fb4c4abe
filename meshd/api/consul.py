"""The Consul-compatible subset of the local API (contract: "Consul-compatible subset").

Enough of Consul's HTTP API, on the same listener as the native API, that
Dapr's ``consul`` name resolution and ordinary Consul clients (the Go ``api``
package, ``py-consul``) work unchanged against meshd.  Every handler maps a
Consul request onto one or a few :class:`~meshd.agent.interface.AgentAPI`
calls; nothing here talks to the protocol core.

What Dapr's resolver calls (components-contrib ``nameresolution/consul``):
``PUT /v1/agent/service/register`` when it self-registers (a service with an
HTTP check on the sidecar's ``/v1.0/healthz``, check ID ``daprHealth:<ID>``
and the sidecar port in ``Meta.DAPR_PORT``), ``GET /v1/agent/self`` at start
when it does not, ``GET /v1/health/service/{app}?passing=1`` on every lookup
(it then picks a *random* entry and dials ``Service.Address`` or else
``Node.Address``, with the port from ``Meta.DAPR_PORT``),
``PUT /v1/agent/service/deregister/{id}`` on close when asked to, and, with
``useCache``, blocking ``GET /v1/health/state/any?filter=ServiceName==...``.

Mapping, and what must stay true:

- Datacenter = meshd cluster; Consul OSS has no namespaces, so every request
  uses meshd namespace ``default`` unless Consul Enterprise's ``ns`` (query
  parameter, ``X-Consul-Namespace`` header or ``Namespace`` field) names one.
- A service is one meshd instance: ``ID`` (default ``Name``) is the instance,
  ``Name`` the app, ``Weights.Passing`` the weight.  What meshd's record has no
  field for lives in its meta under keys starting ``consul.``: ``consul.tags``
  (a JSON list, so any tag round-trips, commas included; a hand-written
  ``a,b`` is read too), ``consul.check_id`` and ``consul.check_name`` (only
  when not Consul's defaults ``service:<ID>`` / ``Service '<Name>' check``).
  Consul itself refuses meta keys with a dot, so no Consul client can collide
  with them; they are stripped from every ``Meta`` we answer.
- Two answers.  A *lookup* (``health/service`` with ``passing``, which Dapr
  always sends; it then picks at random) answers only the passing endpoints
  the locality policy marks *active* (the nearest tier with enough healthy
  copies), in policy order: the rest are standbys a Consul client must not
  spread load onto.  ``?all=1`` (a meshd extension) adds the passing
  standbys; if a filter leaves no active endpoint, the passing standbys are
  answered rather than none.  Anything else (``health/service`` without
  ``passing``, the catalog, ``health/state``, ``health/checks``) answers the
  *inventory*: every instance the cluster may see, with its real health,
  dead nodes' instances critical until reaped, in the policy's order as seen
  from the cluster, so every agent of a cluster answers alike (what
  Prometheus and dashboards need).
- ``X-Consul-Index`` is the agent's index plus one (the index never goes
  back, even across a restart; see docs/durability.md).  A blocking
  ``?index=N`` waits while the agent's index is ``N - 1``, so no change is
  ever missed and an index from elsewhere is answered at once.
- An endpoint behind another cluster's gateway is answered with the address
  and port of the route a ``meshd gateway`` publishes for it (``Address`` and
  ``Meta.DAPR_PORT``, :func:`via_gateway`), since Dapr dials exactly those.
- Errors are plain text, one sentence, as Consul answers them (the native
  API's ``{"error": ...}`` would be shown raw by Consul clients).
- Unknown request fields and query parameters are ignored, as real clients
  send many; a check kind meshd cannot run (script, gRPC, Docker, ...) is
  refused, since ignoring it would publish the service as healthy.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from meshd.agent.interface import (
    HEALTH,
    AgentAPI,
    Endpoint,
    MemberInfo,
    Registration,
    StorageError,
)
from meshd.agent.inventory import DEREGISTER_AFTER_KEY
from meshd.api.access import BlockingQueries
from meshd.api.durations import parse_wait
from meshd.api.http import HTTPError, Request, Response
from meshd.api.routes import Application, Handler, Route
from meshd.api.validation import ApiError, is_host, parse_registration
from meshd.policy.gateway import ROUTE_APP, ROUTE_NAMESPACE, route_of
from meshd.wire import AppRecord, WireError, check_name

if TYPE_CHECKING:
    from meshd.api.filter import Filter

__all__ = [
    "add_consul_routes",
    "text_error",
    "parse_service",
    "parse_filter",
    "health_rows",
    "health_entry",
    "Where",
    "node_meta",
    "parse_node_meta",
    "gateway_routes",
    "via_gateway",
    "catalog_entry",
    "decode_tags",
    "node_id",
    "ConsulService",
    "META_PREFIX",
    "TAGS_KEY",
    "CHECK_ID_KEY",
    "CHECK_NAME_KEY",
    "DEFAULT_WAIT",
    "MAX_WAIT",
]

log = logging.getLogger("meshd.api.consul")

#: Meta keys meshd uses to carry Consul fields its record lacks.  Consul allows
#: only ``[A-Za-z0-9_-]`` in meta keys, so a dot cannot come from a Consul client.
META_PREFIX = "consul."
TAGS_KEY = "consul.tags"
CHECK_ID_KEY = "consul.check_id"
CHECK_NAME_KEY = "consul.check_name"
CHECK_TYPE_KEY = "consul.check_type"
CHECK_NOTES_KEY = "consul.check_notes"
KIND_KEY = "consul.kind"
TAGGED_ADDRESSES_KEY = "consul.tagged_addresses"
#: Present ("true") only when a registration asked for EnableTagOverride.
TAG_OVERRIDE_KEY = "consul.enable_tag_override"
#: What a check adds to its service's meta (``_check_meta_for``): dropped
#: with the check.
_CHECK_META_KEYS = frozenset(
    {CHECK_ID_KEY, CHECK_NAME_KEY, CHECK_TYPE_KEY, CHECK_NOTES_KEY, DEREGISTER_AFTER_KEY}
)
#: Consul's own rules for service meta (its ``structs.ValidateServiceMetadata``):
#: keys of letters, digits, ``_`` and ``-``, none starting ``consul-``.
MAX_META_KEY_LEN = 128
MAX_META_VALUE_LEN = 512
MAX_META_PAIRS_CONSUL = 64
_META_KEY = re.compile(r"[A-Za-z0-9_-]+")
#: Consul API families meshd does not implement: answered 501 with a sentence,
#: never a 404 a client would read as "key not found".
_NOT_IMPLEMENTED = {
    "kv": "Consul's key/value store",
    "session": "Consul sessions",
    "query": "prepared queries",
    "txn": "transactions",
    "acl": "Consul ACLs (meshd uses an API token, see --api-token-file)",
    "connect": "Consul Connect",
    "config": "config entries",
    "event": "user events",
    "snapshot": "snapshots",
    "operator": "operator endpoints",
}
#: Single Consul endpoints beside those families that meshd does not
#: implement (path -> what): 501 with a sentence too, rather than the 404 of
#: an unknown route, which a client reads as "no such thing".
_NOT_IMPLEMENTED_PATHS = {
    "/v1/agent/metrics": "Consul's agent metrics (meshd's own are at /metrics, Prometheus text)",
    "/v1/agent/host": "Consul's host information",
    "/v1/agent/version": "Consul's version endpoint (/v1/agent/self names meshd's version)",
    "/v1/agent/monitor": "Consul's log streaming",
    "/v1/agent/reload": "Consul's configuration reload",
    "/v1/agent/maintenance": "node maintenance (an instance's maintenance is implemented)",
    "/v1/agent/leave": "leaving through the API (stop the agent instead)",
    "/v1/agent/join/{rest:.*}": "joining through the API (start the agent with --join)",
    "/v1/agent/force-leave/{rest:.*}": "force-leave",
    "/v1/agent/token/{rest:.*}": _NOT_IMPLEMENTED["acl"],
    "/v1/catalog/register": (
        "writing the catalog directly (register with /v1/agent/service/register)"
    ),
    "/v1/catalog/deregister": "writing the catalog directly (deregister with the agent endpoint)",
    "/v1/coordinate/datacenters": "the WAN coordinates of Consul servers",
}
#: Blocking queries: Consul's own default and ceiling for ``wait``.
DEFAULT_WAIT = 300.0
MAX_WAIT = 600.0
#: Encoded health answers kept; past it the cache starts over (bounded memory).
MAX_CACHED_ANSWERS = 4096
#: The meta key Dapr keeps its sidecar port in (its default ``daprPortMetaKey``).
DAPR_PORT_KEY = "DAPR_PORT"

_INDEX = re.compile(r"[0-9]{1,20}")
_MAX_INDEX = 2**64 - 1
_TRUE = frozenset(("", "1", "t", "true"))  # Go's strconv.ParseBool, plus a bare ?flag
_FALSE = frozenset(("0", "f", "false"))
_CHECK_KINDS = ("ttl", "http", "tcp")
# Check kinds Consul runs and meshd does not (folded key -> Consul's spelling).
_UNSUPPORTED_CHECKS = {
    "args": "Args",
    "scriptargs": "ScriptArgs",
    "script": "Script",
    "grpc": "GRPC",
    "dockercontainerid": "DockerContainerID",
    "h2ping": "H2PING",
    "udp": "UDP",
    "osservice": "OSService",
    "aliasservice": "AliasService",
    "aliasnode": "AliasNode",
}
# Serf member status codes, as Consul's /v1/agent/members and Member answer them.
_SERF_STATUS = {"alive": 1, "suspect": 1, "left": 3, "dead": 4}
# The only filter meshd evaluates: what Dapr's watcher sends to /v1/health/state.
_FILTER_TERM = re.compile(r'\s*ServiceName\s*==\s*"([^"\\]*)"\s*')
_FILTER_OR = re.compile(r"\)?\s+or\s+\(?")
_LEADER_HEADERS = {"X-Consul-KnownLeader": "true", "X-Consul-LastContact": "0"}

_dumps = functools.partial(json.dumps, separators=(",", ":"))


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _version() -> str:
    # Imported here, like the filter language below: an idle agent never loads
    # either (benchmarks/RESULTS.md, the idle memory breakdown).
    from importlib import metadata

    try:
        return metadata.version("meshd")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


# ---------------------------------------------------------------------------
# Consul's JSON conventions


def _fold(obj: dict[Any, Any]) -> dict[str, Any]:
    """Keys as Consul matches them: case-insensitive, snake_case equal to CamelCase.

    Go clients send ``CheckID``, py-consul sends ``checks`` and
    ``DeregisterCriticalServiceAfter``, HCL-minded ones ``check_id``.
    """
    return {k.replace("_", "").replace("-", "").lower(): v for k, v in obj.items()}


def _given(value: Any) -> bool:
    """Go clients send zero values for unset fields (``""``, ``0``, ``null``, ``[]``)."""
    return value is not None and value != "" and value != 0 and value != [] and value != {}


def text_error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """An error as Consul answers one: the sentence as plain text."""
    return Response(
        status=status, text=message, content_type="text/plain", charset="utf-8", headers=headers
    )


def _name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except WireError as exc:
        raise _bad(str(exc)) from None


def _flag(query: Any, key: str) -> bool:
    value = query.get(key)
    if value is None:
        return False
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _bad(f"{key} must be true or false")


def _wait(value: str | None) -> float:
    try:
        return parse_wait(value, DEFAULT_WAIT, MAX_WAIT)
    except ValueError:
        raise _bad('wait must be a duration such as "10s" or "5m"') from None


def _split_hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port) if port.isdigit() else 0


@functools.lru_cache(maxsize=4096)
def node_id(cluster: str, node: str) -> str:
    """A stable UUID for a node, the form Consul's node IDs take."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"meshd:{cluster}/{node}"))


def decode_tags(value: str | None) -> list[str]:
    """``consul.tags`` as we write it (a JSON list) or as a person writes it (``a,b``)."""
    if not value:
        return []
    if value.startswith("["):
        try:
            tags = json.loads(value)
        except ValueError:
            return []
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []
    return [t.strip() for t in value.split(",") if t.strip()]


@dataclass(frozen=True, slots=True)
class _Consulish:
    """The Consul fields of one record's meta."""

    meta: dict[str, str]
    tags: list[str]
    check_id: str
    check_name: str
    check_type: str = ""
    check_notes: str = ""
    kind: str = ""
    tagged: dict[str, Any] | None = None
    tag_override: bool = False


def _consulish(instance: str, app: str, meta: dict[str, str]) -> _Consulish:
    tagged = None
    raw = meta.get(TAGGED_ADDRESSES_KEY)
    if raw:
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        tagged = value if isinstance(value, dict) else None
    return _Consulish(
        meta={k: v for k, v in meta.items() if not k.startswith(META_PREFIX)},
        tags=decode_tags(meta.get(TAGS_KEY)),
        check_id=meta.get(CHECK_ID_KEY) or f"service:{instance}",
        check_name=meta.get(CHECK_NAME_KEY) or f"Service '{app}' check",
        check_type=meta.get(CHECK_TYPE_KEY, ""),
        check_notes=meta.get(CHECK_NOTES_KEY, ""),
        kind=meta.get(KIND_KEY, ""),
        tagged=tagged,
        tag_override=meta.get(TAG_OVERRIDE_KEY) == "true",
    )


# ---------------------------------------------------------------------------
# Registration: a Consul service definition -> a meshd Registration


@dataclass(frozen=True, slots=True)
class ConsulService:
    """A parsed ``PUT /v1/agent/service/register``."""

    registration: Registration
    #: The check's ``Status``: the health to report right after registering.
    status: str | None = None


@dataclass(frozen=True, slots=True)
class _Check:
    native: dict[str, Any]
    kind: str
    status: str | None
    check_id: str | None
    name: str | None
    notes: str
    #: DeregisterCriticalServiceAfter, whole seconds; None when not asked.
    deregister_after: int | None


def _parse_check(raw: Any) -> _Check:
    """One Consul check definition, validated."""
    if not isinstance(raw, dict):
        raise _bad("each check must be a JSON object")
    c = _fold(raw)
    for key, label in _UNSUPPORTED_CHECKS.items():
        if _given(c.get(key)):
            raise _bad(f"{label} checks are not supported by meshd; use a TTL, HTTP or TCP check")
    kinds = [k for k in _CHECK_KINDS if _given(c.get(k))]
    if not kinds:
        raise _bad("a check needs one of TTL, HTTP or TCP")
    if len(kinds) > 1:
        raise _bad("a check may have only one of TTL, HTTP or TCP")
    kind = kinds[0]
    native: dict[str, Any] = {kind: c[kind]}
    if kind != "ttl" and _given(c.get("interval")):
        native["interval"] = c["interval"]
    status = c.get("status")
    if _given(status):
        if status not in HEALTH:
            raise _bad(f"check Status must be one of {', '.join(HEALTH)}")
    else:
        status = None
    ids: list[str | None] = []
    for keys, what in ((("checkid", "id"), "CheckID"), (("name",), "Name")):
        value = next((c[k] for k in keys if _given(c.get(k))), None)
        if value is not None and not isinstance(value, str):
            raise _bad(f"check {what} must be a string")
        ids.append(value)
    notes = c.get("notes")
    if _given(notes) and (not isinstance(notes, str) or len(notes) > MAX_META_VALUE_LEN):
        raise _bad(f"check Notes must be a string of at most {MAX_META_VALUE_LEN} characters")
    after = None
    if _given(c.get("deregistercriticalserviceafter")):
        raw_after = c["deregistercriticalserviceafter"]
        try:
            if not isinstance(raw_after, str):
                raise ValueError
            seconds = parse_wait(raw_after, 0.0, 10 * 365 * 86400.0)
        except ValueError:
            raise _bad(
                'DeregisterCriticalServiceAfter must be a duration such as "90s" or "72h"'
            ) from None
        after = max(1, int(round(seconds)))
    return _Check(
        native, kind, status, ids[0], ids[1], notes if isinstance(notes, str) else "", after
    )


def parse_service(
    body: Any, namespace: str | None, node_address: Callable[[], str | None]
) -> ConsulService:
    """A Consul service definition as a meshd Registration; ApiError(400) if invalid.

    ``namespace`` comes from the request (``ns``); ``node_address`` gives the
    agent's own host for a service registered without an Address, as Consul
    uses its node's address then.
    """
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object (a Consul service definition)")
    f = _fold(body)
    if not _given(f.get("name")):
        raise _bad("the service Name is required")
    name = _name(f["name"], "service Name")
    instance = _name(f["id"], "service ID") if _given(f.get("id")) else name
    if namespace is None and _given(f.get("namespace")):
        namespace = _name(f["namespace"], "Namespace")

    tags = f.get("tags")
    if not _given(tags):
        tags = []
    elif not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _bad("Tags must be a list of strings")

    meta = f.get("meta")
    if not _given(meta):
        meta = {}
    elif not isinstance(meta, dict):
        raise _bad("Meta must be an object mapping strings to strings")
    _check_meta(meta)
    meta = dict(meta)

    address = f.get("address")
    if not _given(address):
        address = node_address()
        if address is None:
            raise _bad("Address is required: this agent does not know its own address")
    elif not isinstance(address, str) or not is_host(address):
        raise _bad("Address must be an IP address or a host name")

    port = f.get("port")
    if not _given(port):
        # meshd routes to an address and a port.  Dapr registers a sidecar
        # with no app port as Port 0 and resolves it by Meta.DAPR_PORT, so
        # that is the port to publish.
        dapr = meta.get(DAPR_PORT_KEY)
        if not isinstance(dapr, str) or not dapr.isdigit():
            raise _bad("Port is required: meshd routes clients to an address and a port")
        port = int(dapr)

    weight = 1
    weights = f.get("weights")
    if _given(weights):
        if not isinstance(weights, dict):
            raise _bad('Weights must be an object such as {"Passing": 1, "Warning": 1}')
        passing = _fold(weights).get("passing")
        if passing is not None:
            if type(passing) is not int or not 0 <= passing <= 1_000_000:
                raise _bad("Weights.Passing must be an integer from 0 to 1000000")
            weight = passing

    kind = f.get("kind")
    if _given(kind):
        if not isinstance(kind, str) or kind not in _SERVICE_KINDS:
            raise _bad(f"Kind must be one of {', '.join(repr(k) for k in _SERVICE_KINDS)}")
        meta[KIND_KEY] = kind
    tagged = f.get("taggedaddresses")
    if _given(tagged):
        meta[TAGGED_ADDRESSES_KEY] = _dumps(_parse_tagged(tagged))
    # Nothing in meshd rewrites an agent's tags (Consul's anti-entropy is
    # what the flag tempers), so it is kept only to be read back as given.
    override = f.get("enabletagoverride")
    if override is not None and override is not True and override is not False:
        raise _bad("EnableTagOverride must be true or false")
    if override:
        meta[TAG_OVERRIDE_KEY] = "true"

    checks: list[Any] = []
    if _given(f.get("check")):
        checks.append(f["check"])
    if _given(f.get("checks")):
        if not isinstance(f["checks"], list):
            raise _bad("Checks must be a list of check objects")
        checks.extend(c for c in f["checks"] if c is not None)
    if len(checks) > 1:
        raise _bad("meshd runs one check per service; send one Check (or a Checks list of one)")
    native_check = None
    status = None
    if checks:
        check = _parse_check(checks[0])
        native_check, status = check.native, check.status
        _check_meta_for(meta, check, instance, name)
    if tags:
        meta[TAGS_KEY] = _dumps(tags)

    native: dict[str, Any] = {
        "app": name,
        "address": address,
        "port": port,
        "namespace": namespace or "default",
        "meta": meta,
        "weight": weight,
        "check": native_check,
    }
    return ConsulService(parse_registration(instance, native), status)


_SERVICE_KINDS = (
    "connect-proxy",
    "mesh-gateway",
    "terminating-gateway",
    "ingress-gateway",
    "api-gateway",
)


def _check_meta(meta: dict[Any, Any]) -> None:
    """Consul's rules for service meta, so what Consul refuses meshd refuses too."""
    if len(meta) > MAX_META_PAIRS_CONSUL:
        raise _bad(f"Meta may have at most {MAX_META_PAIRS_CONSUL} keys")
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY.fullmatch(key):
            raise _bad(
                f"Meta key {str(key)[:64]!r} is invalid: use letters, digits, '_' and '-' only"
            )
        if len(key) > MAX_META_KEY_LEN:
            raise _bad(f"Meta key {key[:64]!r} is longer than {MAX_META_KEY_LEN} characters")
        if key.startswith("consul-"):
            raise _bad(f"Meta key {key[:64]!r} is reserved: the prefix consul- is Consul's")
        if not isinstance(value, str):
            raise _bad("Meta must be an object mapping strings to strings")
        if len(value) > MAX_META_VALUE_LEN:
            raise _bad(f"Meta value of {key!r} is longer than {MAX_META_VALUE_LEN} characters")


def _parse_tagged(raw: Any) -> dict[str, dict[str, Any]]:
    """Service TaggedAddresses: ``{"lan": {"Address": ..., "Port": ...}, ...}``."""
    if not isinstance(raw, dict) or len(raw) > 8:
        raise _bad("TaggedAddresses must be an object of at most 8 named addresses")
    out: dict[str, dict[str, Any]] = {}
    for tag, value in raw.items():
        if not isinstance(tag, str) or not _META_KEY.fullmatch(tag) or len(tag) > 64:
            raise _bad("TaggedAddresses names must be letters, digits, '_' and '-'")
        v = _fold(value) if isinstance(value, dict) else None
        address = v.get("address") if v is not None else None
        port = v.get("port", 0) if v is not None else None
        if not isinstance(address, str) or not (address == "" or is_host(address)):
            raise _bad(f"TaggedAddresses.{tag}.Address must be an IP address or a host name")
        if type(port) is not int or not 0 <= port <= 65535:
            raise _bad(f"TaggedAddresses.{tag}.Port must be an integer from 0 to 65535")
        out[tag] = {"Address": address, "Port": port}
    return out


def _with_check(r: AppRecord, meta: dict[str, str], check: dict[str, Any] | None) -> Registration:
    """The registration of record ``r`` again, with ``meta`` and the native
    ``check`` (None: no check), through the same validation as any other."""
    native: dict[str, Any] = {
        "app": r.app,
        "address": r.address,
        "port": r.port,
        "namespace": r.namespace,
        "protocol": r.protocol,
        "meta": meta,
        "weight": r.weight,
    }
    if check is not None:
        native["check"] = check
    if r.export is not None:
        native["export"] = list(r.export)
    return parse_registration(r.instance, native)


def _check_meta_for(meta: dict[str, str], check: _Check, instance: str, name: str) -> None:
    """What a check says that meshd's record has no field for, kept in its meta."""
    if check.check_id is not None and check.check_id != f"service:{instance}":
        meta[CHECK_ID_KEY] = check.check_id
    if check.name is not None and check.name != f"Service '{name}' check":
        meta[CHECK_NAME_KEY] = check.name
    meta[CHECK_TYPE_KEY] = check.kind
    if check.notes:
        meta[CHECK_NOTES_KEY] = check.notes
    if check.deregister_after is not None:
        meta[DEREGISTER_AFTER_KEY] = str(check.deregister_after)


def parse_filter(text: str) -> list[str]:
    """Service names of ``ServiceName == "a" or ServiceName == "b"`` (Dapr's watch filter).

    The one shape of Consul's filter language meshd evaluates; anything else
    is refused rather than ignored, since ignoring a filter widens an answer.
    """
    names = []
    for term in _FILTER_OR.split(text.strip().strip("()")):
        m = _FILTER_TERM.fullmatch(term)
        if m is None:
            raise _bad('filter supports only ServiceName == "name" terms joined by or')
        names.append(m.group(1))
    return names


# ---------------------------------------------------------------------------
# Answers: meshd endpoints -> Consul shapes


def _status(e: Endpoint) -> str:
    # A record from a cluster we cannot reach, or of a dead node, may still say "passing".
    return e.health if e.reachable and e.alive else "critical"


def node_meta(e: Endpoint) -> dict[str, str]:
    """A node's metadata as Consul's ``Node.Meta`` (and ``?node-meta=``) see it."""
    return _meta(e.cluster, e.region, e.zone, e.node_meta)


def _meta(cluster: str, region: str, zone: str, extra: dict[str, str]) -> dict[str, str]:
    # The operator's keys cannot shadow ours: the wire refuses meshd- keys.
    return {**extra, "meshd-cluster": cluster, "meshd-region": region, "meshd-zone": zone}


def parse_node_meta(values: Iterable[str]) -> dict[str, str]:
    """``?node-meta=key:value`` (repeatable) as Consul takes it."""
    out = {}
    for v in values:
        key, sep, value = v.partition(":")
        if not sep or not key:
            raise _bad("node-meta must be key:value")
        out[key] = value
    return out


def health_rows(
    endpoints: Iterable[Endpoint],
    *,
    passing: bool = False,
    tags: tuple[str, ...] = (),
    dc: str = "",
    every: bool = False,
    node_meta_: dict[str, str] | None = None,
) -> list[Endpoint]:
    """What a health query answers, in policy order (see the module docstring).

    ``endpoints`` are the inventory (every instance, any health) or, for a
    ``passing`` query, the policy's lookup.  With ``passing`` only passing
    endpoints are kept, and of those only the active ones (the policy's
    choice) unless ``every`` or unless a filter left no active one.
    """
    rows = []
    for e in endpoints:
        if dc and e.cluster != dc:
            continue
        if tags:
            have = set(decode_tags(e.meta.get(TAGS_KEY)))
            if not all(t in have for t in tags):
                continue
        if node_meta_ and any(node_meta(e).get(k) != v for k, v in node_meta_.items()):
            continue
        if passing and _status(e) != "passing":
            continue
        rows.append(e)
    if passing and not every:
        active = [e for e in rows if e.active]
        if active:
            rows = active
    return rows


#: (cluster, namespace, app, instance) -> (address, port) of a gateway route.
GatewayRoutes = dict[tuple[str, str, str, str], tuple[str, int]]


def gateway_routes(records: Iterable[Endpoint]) -> GatewayRoutes:
    """The routes ``meshd gateway`` publishes (meshd/policy/gateway.py), from its records.

    Only a passing route record of a reachable cluster counts, and only for an
    instance of that same cluster: the record is signed by one of its nodes.
    The first in policy order wins, so the nearest gateway replica is used.
    """
    out: GatewayRoutes = {}
    for r in records:
        if r.app != ROUTE_APP or not r.reachable or r.health != "passing":
            continue
        route = route_of(r.meta)
        if route is not None:
            key = (r.cluster, route.namespace, route.app, route.instance)
            out.setdefault(key, (route.address, route.port))
    return out


def via_gateway(e: Endpoint, routes: GatewayRoutes) -> Endpoint:
    """An endpoint behind another cluster's gateway, as a Consul client must dial it.

    Dapr dials ``Service.Address:Meta.DAPR_PORT`` (docs/dapr-gateways.md), so
    the gateway's own address and port do not reach the instance: the route's
    address and port do, in ``Address`` and ``DAPR_PORT`` (in ``Port`` for an
    instance without ``DAPR_PORT``).  A Dapr instance with no route cannot be
    reached from here at all and is answered unreachable (critical), so Dapr
    never picks it; anything else keeps the gateway's address and port, for a
    client that knows the SNI name.
    """
    if e.gateway is None or e.app == ROUTE_APP:
        return e
    route = routes.get((e.cluster, e.namespace, e.app, e.instance))
    if route is None:
        return replace(e, reachable=False) if DAPR_PORT_KEY in e.meta else e
    address, port = route
    if DAPR_PORT_KEY in e.meta:
        return replace(e, address=address, meta={**e.meta, DAPR_PORT_KEY: str(port)})
    return replace(e, address=address, port=port)


@dataclass(frozen=True, slots=True)
class Where:
    """What an answer needs beyond the endpoint: the index and node addresses."""

    index: int
    #: (cluster, node) -> the node's own address, where membership knows it.
    hosts: dict[tuple[str, str], str]
    #: Local instance -> its check's last output (only this agent runs checks).
    outputs: dict[str, str]
    #: Local instance -> its check's kind (a native registration keeps no
    #: Consul fields in its record, but this agent knows what it runs).
    types: dict[str, str] = field(default_factory=dict)

    def host(self, e: Endpoint) -> str:
        # A node in another cluster is known only by its documents: the
        # address they state, else its instance's (an older agent's).
        return self.hosts.get((e.cluster, e.node)) or e.host or e.address


def _node_object(
    cluster: str,
    node: str,
    host: str,
    region: str,
    zone: str,
    index: int,
    meta: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A node as Consul's ``Node`` objects show it."""
    return {
        "ID": node_id(cluster, node),
        "Node": node,
        "Address": host,
        "Datacenter": cluster,
        "TaggedAddresses": {"lan": host, "lan_ipv4": host, "wan": host, "wan_ipv4": host},
        "Meta": _meta(cluster, region, zone, meta or {}),
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _node_json(e: Endpoint, where: Where) -> dict[str, Any]:
    return _node_object(
        e.cluster, e.node, where.host(e), e.region, e.zone, where.index, e.node_meta
    )


def _serf_check(node: str, alive: bool, reachable: bool, index: int) -> dict[str, Any]:
    if not alive:
        status, output = "critical", "Agent not live or unreachable"
    elif not reachable:
        status, output = "critical", "Agent's cluster unreachable from here"
    else:
        status, output = "passing", "Agent alive and reachable"
    return {
        "Node": node,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": status,
        "Notes": "",
        "Output": output,
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Definition": {},
        "CreateIndex": index,
        "ModifyIndex": index,
    }


def _service_check(e: Endpoint, c: _Consulish, where: Where, local: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "Node": e.node,
        "CheckID": c.check_id,
        "Name": c.check_name,
        "Status": _status(e),
        "Notes": c.check_notes,
        "Output": where.outputs.get(e.instance, "") if local else "",
        "ServiceID": e.instance,
        "ServiceName": e.app,
        "ServiceTags": list(c.tags),
        "Type": c.check_type or (where.types.get(e.instance, "") if local else ""),
        "Definition": {},
        "CreateIndex": where.index,
        "ModifyIndex": where.index,
    }
    if e.namespace != "default":
        out["Namespace"] = e.namespace
    return out


def _checks_json(e: Endpoint, c: _Consulish, where: Where, local: bool) -> list[dict[str, Any]]:
    serf = _serf_check(e.node, e.alive, e.reachable, where.index)
    return [_service_check(e, c, where, local), serf]


def _service_json(
    instance: str,
    app: str,
    namespace: str,
    address: str,
    port: int,
    weight: int,
    c: _Consulish,
    index: int | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ID": instance,
        "Service": app,
        "Tags": list(c.tags),
        "Address": address,
        "Meta": dict(c.meta),
        "Port": port,
        "Weights": {"Passing": weight, "Warning": 1},
        "EnableTagOverride": c.tag_override,
        "Kind": c.kind,
    }
    if c.tagged is not None:
        out["TaggedAddresses"] = c.tagged
    if index is not None:
        out["CreateIndex"] = out["ModifyIndex"] = index
    if namespace != "default":
        out["Namespace"] = namespace
    return out


def health_entry(e: Endpoint, where: Where, local: bool = False) -> dict[str, Any]:
    """One element of ``GET /v1/health/service/{name}``."""
    c = _consulish(e.instance, e.app, e.meta)
    index = where.index
    service = _service_json(e.instance, e.app, e.namespace, e.address, e.port, e.weight, c, index)
    return {
        "Node": _node_json(e, where),
        "Service": service,
        "Checks": _checks_json(e, c, where, local),
    }


def catalog_entry(e: Endpoint, where: Where) -> dict[str, Any]:
    """One element of ``GET /v1/catalog/service/{name}``."""
    c = _consulish(e.instance, e.app, e.meta)
    host = where.host(e)
    out = {
        "ID": node_id(e.cluster, e.node),
        "Node": e.node,
        "Address": host,
        "Datacenter": e.cluster,
        "TaggedAddresses": {"lan": host, "lan_ipv4": host, "wan": host, "wan_ipv4": host},
        "NodeMeta": node_meta(e),
        "ServiceKind": c.kind,
        "ServiceID": e.instance,
        "ServiceName": e.app,
        "ServiceTags": list(c.tags),
        "ServiceAddress": e.address,
        "ServiceTaggedAddresses": c.tagged or {},
        "ServicePort": e.port,
        "ServiceMeta": dict(c.meta),
        "ServiceWeights": {"Passing": e.weight, "Warning": 1},
        "ServiceEnableTagOverride": c.tag_override,
        "CreateIndex": where.index,
        "ModifyIndex": where.index,
    }
    if e.namespace != "default":
        out["Namespace"] = e.namespace
    return out


# ---------------------------------------------------------------------------
# Handlers


def _text_errors(handler: Handler) -> Handler:
    """Consul answers errors as plain text; the native API's middleware would answer JSON."""

    @functools.wraps(handler)
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return text_error(exc.status, exc.message)
        except StorageError as exc:  # 507 full disk, 503 other; nothing was changed
            return text_error(exc.status, exc.message)
        except HTTPError as exc:  # the body was over the limit
            return text_error(exc.status, exc.message)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path[:200])
            return text_error(500, "internal error in the agent; its log has the details")

    return wrapped


def _loads(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=no_constants)


async def _read_json(request: Request, what: str) -> Any:
    raw = await request.read()  # a 413 (HTTPError) past client_max_size
    if not raw.strip():
        raise _bad(f"request body is empty; send {what}")
    try:
        return _loads(raw)
    except (ValueError, RecursionError):
        raise _bad("request body is not valid JSON") from None


class _Handlers:
    """One method per Consul route, over the agent."""

    def __init__(self, agent: AgentAPI) -> None:
        self.agent = agent
        #: (name, namespace, passing, tags, dc, every) -> (generation, index, body)
        self._answers: dict[tuple[Any, ...], tuple[Any, int, bytes]] = {}
        #: (generation, routes): gateway routes, read again when anything changed
        self._routes: tuple[Any, GatewayRoutes] | None = None
        #: (generation, (cluster, node) -> host): node addresses from membership
        self._hosts: tuple[Any, dict[tuple[str, str], str]] | None = None

    # -- helpers ---------------------------------------------------------------

    def _namespace(self, request: Request) -> str | None:
        ns = request.query.get("ns") or request.headers.get("X-Consul-Namespace")
        return _name(ns, "namespace") if ns else None

    def _own_member(self) -> MemberInfo | None:
        agent = self.agent
        for m in agent.members(agent.cluster):
            if m.node == agent.node_name:
                return m
        return None

    def _own_host(self) -> str | None:
        me = self._own_member()
        if me is None:
            return None
        host = _split_hostport(me.address)[0]
        return host if is_host(host) and host not in ("0.0.0.0", "::") else None

    async def _block(self, request: Request) -> None:
        """Consul's blocking query: wait until the answer may differ from ``index``."""
        text = request.query.get("index")
        if not text:
            return
        if not _INDEX.fullmatch(text) or int(text) > _MAX_INDEX:
            raise _bad("index must be a non-negative integer")
        wanted = int(text)
        wait = _wait(request.query.get("wait"))
        if wanted > 0:
            # Our X-Consul-Index is the agent's index + 1 (never 0).
            await self.agent.wait_for_index(wanted - 1, wait)

    @staticmethod
    def _query_headers(index: int) -> dict[str, str]:
        return {"X-Consul-Index": str(index + 1), **_LEADER_HEADERS}

    @staticmethod
    def _filter(request: Request) -> Filter | None:
        text = request.query.get("filter") or ""
        if not text.strip():
            return None
        from meshd.api.filter import FilterError, compile_filter

        try:
            return compile_filter(text)
        except FilterError as exc:
            raise _bad(str(exc)) from None

    @staticmethod
    def _apply(f: Filter | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if f is None:
            return rows
        from meshd.api.filter import FilterError

        try:
            return f.apply(rows)  # type: ignore[return-value]
        except FilterError as exc:  # a field no row has: Consul refuses it too
            raise _bad(str(exc)) from None

    def _clusters(self) -> list[str]:
        agent = self.agent
        return sorted({agent.cluster, *(c.cluster for c in agent.clusters())})

    def _dc(self, request: Request) -> str:
        """``?dc=``: a cluster this agent knows of, else Consul's error."""
        dc = request.query.get("dc") or ""
        if dc and dc not in self._clusters():
            raise ApiError(500, "No path to datacenter")
        return dc

    def _where(self, index: int) -> Where:
        agent = self.agent
        generation = agent.generation
        if self._hosts is None or self._hosts[0] != generation:
            # O(members): rebuilt only when membership or records changed.
            hosts = {}
            for m in agent.members():
                host = _split_hostport(m.address)[0]
                if host and host not in ("0.0.0.0", "::"):
                    hosts[(m.cluster, m.node)] = host
            self._hosts = (generation, hosts)
        types: dict[str, str] = {
            r.record.instance: r.check.kind
            for r in agent.local_registrations()
            if r.check is not None
        }
        return Where(index + 1, self._hosts[1], agent.check_outputs(), types)

    def _is_local(self, e: Endpoint) -> bool:
        return e.node == self.agent.node_name and e.cluster == self.agent.cluster

    def _everything(self, namespace: str) -> tuple[int, list[Endpoint]]:
        """The inventory of every app of ``namespace``: (index, endpoints)."""
        index = self.agent.index
        rows: list[Endpoint] = []
        for app in sorted(self.agent.app_names().get(namespace, ())):
            rows.extend(self._inventory(app, namespace)[1])
        return index, rows

    def _dialable(self, endpoints: list[Endpoint]) -> list[Endpoint]:
        """Endpoints behind another cluster's gateway as a Consul client dials them."""
        if any(e.gateway is not None for e in endpoints):
            routes = self._gateway_routes()
            endpoints = [via_gateway(e, routes) for e in endpoints]
        return endpoints

    def _lookup(self, app: str, namespace: str) -> tuple[int, list[Endpoint]]:
        index, endpoints = self.agent.resolve(app, namespace, None, False)
        return index, self._dialable(endpoints)

    def _inventory(self, app: str, namespace: str) -> tuple[int, list[Endpoint]]:
        index, endpoints = self.agent.inventory(app, namespace)
        return index, self._dialable(endpoints)

    def _gateway_routes(self) -> GatewayRoutes:
        generation = self.agent.generation
        if self._routes is None or self._routes[0] != generation:
            _, records = self.agent.resolve(ROUTE_APP, ROUTE_NAMESPACE, None, True)
            self._routes = (generation, gateway_routes(records))
        return self._routes[1]

    def _json(self, data: Any, index: int | None = None) -> Response:
        headers = None if index is None else self._query_headers(index)
        body = _dumps(data).encode()
        return Response(body=body, content_type="application/json", headers=headers)

    def _instance_for_check(self, check_id: str) -> str | None:
        """A local instance by its check's ID: custom, ``service:<ID>``, or bare ``<ID>``."""
        regs = self.agent.local_registrations()
        for reg in regs:
            if dict(reg.record.meta).get(CHECK_ID_KEY) == check_id:
                return reg.record.instance
        target = check_id.removeprefix("service:")
        for reg in regs:
            if reg.record.instance == target:
                return target
        return None

    # -- agent -------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        body = await _read_json(request, "a Consul service definition")
        parsed = parse_service(body, self._namespace(request), self._own_host)
        try:
            await self.agent.register(parsed.registration)
        except ValueError as exc:  # the agent's own refusal, e.g. too many apps
            raise _bad(str(exc) or "the agent refused the registration") from None
        if parsed.status is not None:
            await self.agent.set_health(parsed.registration.record.instance, parsed.status)
        return Response(status=200)

    async def deregister(self, request: Request) -> Response:
        service_id = request.match_info["service_id"]
        try:
            check_name(service_id, "service ID")
            known = await self.agent.deregister(service_id)
        except WireError:
            known = False
        if not known:
            raise ApiError(404, f'unknown service ID "{service_id[:200]}" on this agent')
        return Response(status=200)

    async def _report(self, request: Request, status: str, output: str = "") -> Response:
        check_id = request.match_info["check_id"]
        instance = self._instance_for_check(check_id)
        output = output or request.query.get("note", "")
        if instance is None or not await self.agent.set_health(instance, status, output):
            raise ApiError(404, f'unknown check ID "{check_id[:200]}" on this agent')
        return Response(status=200)

    async def check_pass(self, request: Request) -> Response:
        return await self._report(request, "passing")

    async def check_warn(self, request: Request) -> Response:
        return await self._report(request, "warning")

    async def check_fail(self, request: Request) -> Response:
        return await self._report(request, "critical")

    async def check_update(self, request: Request) -> Response:
        body = await _read_json(request, 'an object such as {"Status": "passing"}')
        folded = _fold(body) if isinstance(body, dict) else {}
        status = folded.get("status")
        if status not in HEALTH:
            raise _bad(f"Status must be one of {', '.join(HEALTH)}")
        output = folded.get("output")
        return await self._report(request, status, output if isinstance(output, str) else "")

    def _local(self, request: Request) -> list[Registration]:
        ns = self._namespace(request) or "default"
        return [r for r in self.agent.local_registrations() if r.record.namespace == ns]

    def _agent_service(self, reg: Registration) -> dict[str, Any]:
        r = reg.record
        c = _consulish(r.instance, r.app, dict(r.meta))
        out = _service_json(r.instance, r.app, r.namespace, r.address, r.port, r.weight, c)
        out["Datacenter"] = self.agent.cluster
        return out

    async def services(self, request: Request) -> Response:
        f = self._filter(request)
        services = [self._agent_service(r) for r in self._local(request)]
        return self._json({s["ID"]: s for s in self._apply(f, services)})

    async def service(self, request: Request) -> Response:
        service_id = request.match_info["service_id"]
        for reg in self._local(request):
            if reg.record.instance == service_id:
                return self._json(self._agent_service(reg))
        raise ApiError(404, f'unknown service ID "{service_id[:200]}" on this agent')

    def _agent_check(self, reg: Registration, outputs: dict[str, str]) -> dict[str, Any] | None:
        """The instance's check as the agent lists it; None without a check."""
        if reg.check is None:
            return None
        r = reg.record
        c = _consulish(r.instance, r.app, dict(r.meta))
        return {
            "Node": self.agent.node_name,
            "CheckID": c.check_id,
            "Name": c.check_name,
            "Status": r.health,
            "Notes": c.check_notes,
            "Output": outputs.get(r.instance, ""),
            "ServiceID": r.instance,
            "ServiceName": r.app,
            "ServiceTags": c.tags,
            "Type": reg.check.kind,
        }

    async def checks(self, request: Request) -> Response:
        f = self._filter(request)
        outputs = self.agent.check_outputs()
        out = {}
        for reg in self._local(request):
            check = self._agent_check(reg, outputs)
            if check is not None:
                out[check["CheckID"]] = check
        kept = self._apply(f, list(out.values()))
        return self._json({c["CheckID"]: c for c in kept})

    def _checks_info(self, reg: Registration, outputs: dict[str, str]) -> dict[str, Any]:
        # The instance's health is its check's status, critical in
        # maintenance (the agent sets it so), passing without a check: what
        # Consul aggregates over an instance's checks.
        check = self._agent_check(reg, outputs)
        return {
            "AggregatedStatus": reg.record.health,
            "Service": self._agent_service(reg),
            "Checks": [] if check is None else [check],
        }

    async def health_by_id(self, request: Request) -> Response:
        """``GET /v1/agent/health/service/id/{id}``: one local instance's health,
        in the status code too (200 passing, 429 warning, 503 critical), so a
        load balancer can ask the agent without reading the body."""
        service_id = request.match_info["service_id"]
        reg = next((r for r in self._local(request) if r.record.instance == service_id), None)
        if reg is None:
            reason = f"ServiceId {service_id[:200]} not found"
            return _health_answer(request, 404, reason, _NO_INFO)
        info = self._checks_info(reg, self.agent.check_outputs())
        status = info["AggregatedStatus"]
        return _health_answer(request, _HEALTH_CODES[status], status, info)

    async def health_by_name(self, request: Request) -> Response:
        """``GET /v1/agent/health/service/name/{name}``: every local instance
        of the service, the code and text of the worst."""
        name = request.match_info["service_name"]
        outputs = self.agent.check_outputs()
        infos = [
            self._checks_info(reg, outputs)
            for reg in self._local(request)
            if reg.record.app == name
        ]
        if not infos:
            return _health_answer(request, 404, f"ServiceName {name[:200]} Not Found", [])
        worst = max((i["AggregatedStatus"] for i in infos), key=_HEALTH_CODES.__getitem__)
        return _health_answer(request, _HEALTH_CODES[worst], worst, infos)

    def _member_json(self, m: MemberInfo) -> dict[str, Any]:
        host, port = _split_hostport(m.address)
        return {
            "Name": m.node,
            "Addr": host,
            "Port": port,
            "Tags": {
                "role": "node",
                "dc": m.cluster,
                "build": f"meshd:{_version()}",
                "meshd-region": m.region,
                "meshd-zone": m.zone,
            },
            "Status": _SERF_STATUS.get(m.status, 0),
        }

    async def self_(self, request: Request) -> Response:
        # Dapr decodes this as map[string]map[string]any: every top-level
        # value must be an object.
        agent = self.agent
        me = self._own_member()
        member = (
            self._member_json(me)
            if me is not None
            else {"Name": agent.node_name, "Addr": "", "Port": 0, "Tags": {}, "Status": 1}
        )
        return self._json(
            {
                "Config": {
                    "Datacenter": agent.cluster,
                    "PrimaryDatacenter": agent.cluster,
                    "NodeName": agent.node_name,
                    "NodeID": node_id(agent.cluster, agent.node_name),
                    "Revision": "meshd",
                    "Server": False,
                    "Version": _version(),
                },
                "Member": member,
                "Meta": {},
            }
        )

    async def members(self, request: Request) -> Response:
        return self._json([self._member_json(m) for m in self.agent.members()])

    # -- health and catalog --------------------------------------------------------

    async def health_service(self, request: Request) -> Response:
        q = request.query
        app = _name(request.match_info["service"], "service name")
        namespace = self._namespace(request) or "default"
        passing = _flag(q, "passing")
        every = _flag(q, "all")
        tags = tuple(sorted(set(t for t in q.getall("tag", []) if t)))
        dc = self._dc(request)
        meta = parse_node_meta(q.getall("node-meta", []))
        f = self._filter(request)
        await self._block(request)
        key = (
            app,
            namespace,
            passing,
            tags,
            dc,
            every,
            tuple(sorted(meta.items())),
            q.get("filter"),
        )
        generation = self.agent.generation
        cached = self._answers.get(key)
        if cached is not None and cached[0] == generation:
            _, index, body = cached
        else:
            # Two answers (module doc): a passing query is a lookup, answered
            # with the policy's choice; any other lists the inventory.
            if passing:
                index, endpoints = self._lookup(app, namespace)
            else:
                index, endpoints = self._inventory(app, namespace)
            rows = health_rows(
                endpoints, passing=passing, tags=tags, dc=dc, every=every, node_meta_=meta
            )
            where = self._where(index)
            entries = [health_entry(e, where, self._is_local(e)) for e in rows]
            body = _dumps(self._apply(f, entries)).encode()
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers.clear()  # bounded; refilled by what is asked next
            self._answers[key] = (generation, index, body)
        return Response(
            body=body, content_type="application/json", headers=self._query_headers(index)
        )

    def _checks_of(
        self, endpoints: Iterable[Endpoint], where: Where, *, serf: bool
    ) -> list[dict[str, Any]]:
        out = []
        seen: set[tuple[str, str]] = set()
        for e in endpoints:
            c = _consulish(e.instance, e.app, e.meta)
            if serf and (e.cluster, e.node) not in seen:
                seen.add((e.cluster, e.node))
                out.append(_serf_check(e.node, e.alive, e.reachable, where.index))
            out.append(_service_check(e, c, where, self._is_local(e)))
        return out

    async def health_state(self, request: Request) -> Response:
        state = request.match_info["state"]
        if state != "any" and state not in HEALTH:
            raise _bad("state must be any, passing, warning or critical")
        namespace = self._namespace(request) or "default"
        dc = self._dc(request)
        f = self._filter(request)
        await self._block(request)
        index, endpoints = self._everything(namespace)
        rows = [e for e in endpoints if not dc or e.cluster == dc]
        checks = self._checks_of(rows, self._where(index), serf=True)
        if state != "any":
            checks = [c for c in checks if c["Status"] == state]
        return self._json(self._apply(f, checks), index)

    async def health_checks(self, request: Request) -> Response:
        app = _name(request.match_info["service"], "service name")
        namespace = self._namespace(request) or "default"
        dc = self._dc(request)
        meta = parse_node_meta(request.query.getall("node-meta", []))
        f = self._filter(request)
        await self._block(request)
        index, endpoints = self._inventory(app, namespace)
        rows = health_rows(endpoints, dc=dc, node_meta_=meta)
        checks = self._checks_of(rows, self._where(index), serf=False)
        return self._json(self._apply(f, checks), index)

    async def health_node(self, request: Request) -> Response:
        node = request.match_info["node"]
        namespace = self._namespace(request) or "default"
        dc = self._dc(request) or self.agent.cluster
        f = self._filter(request)
        await self._block(request)
        index, endpoints = self._everything(namespace)
        where = self._where(index)
        rows = [e for e in endpoints if e.node == node and e.cluster == dc]
        checks = self._checks_of(rows, where, serf=False)
        member = next(
            (m for m in self.agent.members(dc) if m.node == node and m.cluster == dc), None
        )
        if member is not None or rows:
            alive = member.status in ("alive", "suspect") if member is not None else rows[0].alive
            reachable = rows[0].reachable if rows else True
            checks.insert(0, _serf_check(node, alive, reachable, where.index))
        return self._json(self._apply(f, checks), index)

    async def catalog_services(self, request: Request) -> Response:
        namespace = self._namespace(request) or "default"
        dc = self._dc(request)
        meta = parse_node_meta(request.query.getall("node-meta", []))
        f = self._filter(request)
        await self._block(request)
        index, endpoints = self._everything(namespace)
        rows = health_rows(endpoints, dc=dc, node_meta_=meta)
        if f is not None:
            where = self._where(index)
            keep = {
                id(e)
                for e, entry in zip(rows, self._catalog(rows, where), strict=True)
                if f.matches(entry)
            }
            rows = [e for e in rows if id(e) in keep]
        out: dict[str, set[str]] = {}
        for e in rows:
            out.setdefault(e.app, set()).update(decode_tags(e.meta.get(TAGS_KEY)))
        return self._json({app: sorted(tags) for app, tags in sorted(out.items())}, index)

    def _catalog(self, rows: list[Endpoint], where: Where) -> list[dict[str, Any]]:
        return [catalog_entry(e, where) for e in rows]

    async def catalog_service(self, request: Request) -> Response:
        q = request.query
        app = _name(request.match_info["service"], "service name")
        namespace = self._namespace(request) or "default"
        tags = tuple(t for t in q.getall("tag", []) if t)
        dc = self._dc(request)
        meta = parse_node_meta(q.getall("node-meta", []))
        f = self._filter(request)
        await self._block(request)
        # The catalog is the inventory: every instance, in policy order.
        index, endpoints = self._inventory(app, namespace)
        rows = health_rows(endpoints, tags=tags, dc=dc, node_meta_=meta)
        return self._json(self._apply(f, self._catalog(rows, self._where(index))), index)

    def _nodes(self, dc: str, where: Where, namespace: str) -> list[dict[str, Any]]:
        """Nodes of cluster ``dc``: members we know of, and nodes hosting instances."""
        agent = self.agent
        out: dict[str, dict[str, Any]] = {}
        for m in agent.members(dc):
            if m.cluster != dc or m.status == "left":
                continue
            host = _split_hostport(m.address)[0]
            out[m.node] = _node_object(
                m.cluster, m.node, host, m.region, m.zone, where.index, m.meta
            )
        for e in self._everything(namespace)[1]:
            if e.cluster == dc and e.node not in out:
                out[e.node] = _node_json(e, where)
        return [out[n] for n in sorted(out)]

    async def catalog_nodes(self, request: Request) -> Response:
        namespace = self._namespace(request) or "default"
        dc = self._dc(request) or self.agent.cluster
        meta = parse_node_meta(request.query.getall("node-meta", []))
        f = self._filter(request)
        await self._block(request)
        index = self.agent.index
        nodes = self._nodes(dc, self._where(index), namespace)
        nodes = [n for n in nodes if all(n["Meta"].get(k) == v for k, v in meta.items())]
        return self._json(self._apply(f, nodes), index)

    async def catalog_node(self, request: Request) -> Response:
        node = request.match_info["node"]
        namespace = self._namespace(request) or "default"
        dc = self._dc(request) or self.agent.cluster
        f = self._filter(request)
        await self._block(request)
        index = self.agent.index
        where = self._where(index)
        found = next((n for n in self._nodes(dc, where, namespace) if n["Node"] == node), None)
        if found is None:
            return self._json(None, index)  # as Consul: 200 null for an unknown node
        services = []
        for e in self._everything(namespace)[1]:
            if e.node == node and e.cluster == dc:
                c = _consulish(e.instance, e.app, e.meta)
                services.append(
                    _service_json(
                        e.instance, e.app, e.namespace, e.address, e.port, e.weight, c, where.index
                    )
                )
        kept = self._apply(f, services)
        return self._json({"Node": found, "Services": {s["ID"]: s for s in kept}}, index)

    async def catalog_datacenters(self, request: Request) -> Response:
        return self._json(self._clusters())

    async def coordinate_nodes(self, request: Request) -> Response:
        dc = self._dc(request) or self.agent.cluster
        await self._block(request)
        out = [
            {
                "Node": node,
                "Segment": "",
                "Coord": {
                    "Vec": list(c.vec),
                    "Error": c.error,
                    "Adjustment": 0.0,
                    "Height": c.height,
                },
            }
            for node, cluster, c in self.agent.coordinates()
            if cluster == dc
        ]
        return self._json(out, self.agent.index)

    # -- checks and maintenance ------------------------------------------------------

    async def check_register(self, request: Request) -> Response:
        body = await _read_json(request, "a Consul check definition")
        if not isinstance(body, dict):
            raise _bad("request body must be a JSON object (a Consul check definition)")
        f = _fold(body)
        service_id = f.get("serviceid")
        if not _given(service_id) or not isinstance(service_id, str):
            raise _bad("meshd runs checks for services only: ServiceID is required")
        reg = next(
            (r for r in self.agent.local_registrations() if r.record.instance == service_id), None
        )
        if reg is None:
            raise ApiError(404, f'unknown service ID "{service_id[:200]}" on this agent')
        if reg.check is not None:
            raise _bad(
                f"service {service_id!r} already has a check; meshd runs one check per service"
            )
        check = _parse_check(body)
        r = reg.record
        meta = {k: v for k, v in r.meta}
        _check_meta_for(meta, check, r.instance, r.app)
        try:
            await self.agent.register(_with_check(r, meta, check.native))
        except ValueError as exc:
            raise _bad(str(exc) or "the agent refused the check") from None
        if check.status is not None:
            await self.agent.set_health(r.instance, check.status)
        return Response(status=200)

    async def check_deregister(self, request: Request) -> Response:
        # The opposite of check_register: the service stays, without a check.
        # As in Consul, a service with no check left counts as passing.
        check_id = request.match_info["check_id"]
        instance = self._instance_for_check(check_id)
        reg = next(
            (r for r in self.agent.local_registrations() if r.record.instance == instance), None
        )
        if reg is None or reg.check is None:
            raise ApiError(404, f'unknown check ID "{check_id[:200]}" on this agent')
        r = reg.record
        meta = {k: v for k, v in r.meta if k not in _CHECK_META_KEYS}
        try:
            await self.agent.register(_with_check(r, meta, None))
        except ValueError as exc:
            raise _bad(str(exc) or "the agent refused the change") from None
        return Response(status=200)

    async def maintenance(self, request: Request) -> Response:
        service_id = request.match_info["service_id"]
        enable = request.query.get("enable")
        if enable is None:
            raise _bad("enable is required (true or false)")
        on = _flag(request.query, "enable")
        reason = request.query.get("reason", "")[:MAX_META_VALUE_LEN]
        if not await self.agent.set_maintenance(service_id, on, reason):
            raise ApiError(404, f'unknown service ID "{service_id[:200]}" on this agent')
        return Response(status=200)

    # -- status --------------------------------------------------------------------

    def _leader(self, request: Request) -> str:
        # meshd has no leader and no servers.  Clients that probe Consul's
        # health with this call (a common readiness check) take an empty
        # answer as "no leader, cluster down" and stop, so we answer this
        # agent's own gossip address: every agent answers reads on its own,
        # which is all a leader means to a reader.
        me = self._own_member()
        if me is not None:
            return str(me.address)
        return request.host

    async def leader(self, request: Request) -> Response:
        return self._json(self._leader(request))

    async def peers(self, request: Request) -> Response:
        return self._json([self._leader(request)])


#: An instance's health as the status code of the agent's local health
#: endpoints, worst last (Consul's: 200, 429 Too Many Requests, 503).
_HEALTH_CODES = {"passing": 200, "warning": 429, "critical": 503}

#: The body of a local health answer about an instance the agent does not hold.
_NO_INFO: dict[str, Any] = {"AggregatedStatus": "critical", "Service": None, "Checks": None}


def _health_answer(request: Request, code: int, text: str, body: Any) -> Response:
    """A local health answer: the status as plain text when the client asks
    for it (``Accept: text/plain``, or ``format=text``), else ``body`` as
    JSON; ``code`` either way."""
    accept = request.headers.get("Accept", "")
    if accept.startswith("text/plain") or request.query.get("format") == "text":
        return Response(status=code, text=text)
    return Response(status=code, body=_dumps(body).encode(), content_type="application/json")


def _blocks(request: Request) -> bool:
    """Whether :meth:`_Handlers._block` will wait: a well-formed ``index`` above 0."""
    text = request.query.get("index", "")
    return _INDEX.fullmatch(text) is not None and 0 < int(text) <= _MAX_INDEX


def add_consul_routes(
    app: Application, agent: AgentAPI, blocking: BlockingQueries | None = None
) -> list[Route]:
    """Add the Consul-compatible routes to ``app`` (the native API's application).

    Routes that may block count against ``blocking``, the listener's cap on
    waiting queries.  Returns the routes added, so the application can tell
    its Consul routes apart (they answer errors as plain text).
    """
    h = _Handlers(agent)
    r = app.router

    def capped(handler: Handler) -> Handler:
        return handler if blocking is None else blocking.guard(handler, _blocks, text_error)

    routes: list[tuple[str, str, Handler]] = [
        ("PUT", "/v1/agent/service/register", h.register),
        ("PUT", "/v1/agent/service/deregister/{service_id}", h.deregister),
        ("PUT", "/v1/agent/check/pass/{check_id:.+}", h.check_pass),
        ("PUT", "/v1/agent/check/warn/{check_id:.+}", h.check_warn),
        ("PUT", "/v1/agent/check/fail/{check_id:.+}", h.check_fail),
        ("PUT", "/v1/agent/check/update/{check_id:.+}", h.check_update),
        ("GET", "/v1/agent/services", h.services),
        ("GET", "/v1/agent/service/{service_id}", h.service),
        ("GET", "/v1/agent/checks", h.checks),
        ("GET", "/v1/agent/health/service/id/{service_id}", h.health_by_id),
        ("GET", "/v1/agent/health/service/name/{service_name}", h.health_by_name),
        ("GET", "/v1/agent/self", h.self_),
        ("GET", "/v1/agent/members", h.members),
        ("PUT", "/v1/agent/check/register", h.check_register),
        ("PUT", "/v1/agent/check/deregister/{check_id:.+}", h.check_deregister),
        ("PUT", "/v1/agent/service/maintenance/{service_id}", h.maintenance),
        ("GET", "/v1/health/service/{service}", capped(h.health_service)),
        ("GET", "/v1/health/state/{state}", capped(h.health_state)),
        ("GET", "/v1/health/checks/{service}", capped(h.health_checks)),
        ("GET", "/v1/health/node/{node}", capped(h.health_node)),
        ("GET", "/v1/catalog/services", capped(h.catalog_services)),
        ("GET", "/v1/catalog/service/{service}", capped(h.catalog_service)),
        ("GET", "/v1/catalog/nodes", capped(h.catalog_nodes)),
        ("GET", "/v1/catalog/node/{node}", capped(h.catalog_node)),
        ("GET", "/v1/catalog/datacenters", h.catalog_datacenters),
        ("GET", "/v1/coordinate/nodes", capped(h.coordinate_nodes)),
        ("GET", "/v1/status/leader", h.leader),
        ("GET", "/v1/status/peers", h.peers),
    ]
    for family, what in _NOT_IMPLEMENTED.items():
        for path in (f"/v1/{family}", f"/v1/{family}/{{rest:.*}}"):
            routes.append(("*", path, _not_implemented(what)))
    for path, what in _NOT_IMPLEMENTED_PATHS.items():
        routes.append(("*", path, _not_implemented(what)))
    return [r.add_route(method, path, _text_errors(handler)) for method, path, handler in routes]


def _not_implemented(what: str) -> Handler:
    async def handler(request: Request) -> Response:
        raise ApiError(501, f"meshd does not implement {what}; it is a discovery mesh only")

    return handler
