"""Locality policy: which copies of an app a lookup returns, in what order, and which are active.

Pure functions over frozen values; the only I/O is :func:`load_policy_file`.

Theory of operation
-------------------

A lookup hands :func:`select` every endpoint of one app the asker may know of,
as :class:`Candidate` values, and the asker's :class:`~meshd.policy.locality.Topology`.
The answer is a total order of :class:`Ranked` endpoints, each marked ``active``
when traffic should go to it now.  The rules, and the complaint each answers
(users of Consul prepared queries, Istio locality failover and Cilium
ClusterMesh):

a. **Visibility.**  An endpoint not exported to the asker's cluster, or in a
   cluster outside ``allow``, is never returned, not even with
   ``include_unhealthy``.
b. **Health first.**  Healthy means ``passing`` or ``warning`` *and* the
   cluster is reachable.  Unhealthy endpoints come only on request, after
   every healthy one, and are never active.
c. **Tiers.**  Each endpoint gets its locality tier (:func:`locality.tier_of`).
   A tier the policy does not list folds into the next listed tier in the
   canonical order (no ``zone``: zone copies count as ``region``); an endpoint
   with no listed tier at or after its own (``any`` omitted) is excluded.
d. **Order.**  By the policy's tier order; in ``failover`` by the cluster's
   place in the failover list; in ``any`` by the cluster's measured round
   trip when known (*complaint 3: no way to prefer the nearest other
   cluster*), then by name.  Within that, by weighted rendezvous hashing
   (``order = "weight"``: every asker gets a stable order, and first choices
   spread across askers in proportion to weight) or by measured round trip
   (``order = "rtt"``).  Ties break on ``(cluster, node, instance)``.
e. **Spill.**  Tiers are walked in order, and in ``failover`` and ``any`` each
   cluster is a step of its own (so "fail over to west, then central" sends
   traffic to central only when west is not enough, and the nearest other
   cluster is used before farther ones).  The active set grows one step at a
   time until it holds at least ``min_healthy`` healthy endpoints *and* the
   step just added has at least ``min_healthy_fraction`` of its endpoints
   healthy (*complaints 1 and 2: remote copies used only once zero local
   copies remain; no minimum-healthy threshold*).  Counting never depends on
   ``include_unhealthy``.  When every step is taken, all healthy endpoints are
   active.  An active set with no healthy endpoint is never useful, so
   ``min_healthy = 0`` behaves as 1: the fraction alone decides.
f. **Determinism.**  The output depends on the set of candidates only, never
   on their input order, a clock or unseeded randomness.

The policy file is TOML.  Top-level keys are the defaults; ``[apps."orders"]``
or ``[apps."default/orders"]`` override some of them for one app (the
namespace-qualified section wins).  Every error names the field path.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshd.policy.locality import TIER_RANK, TIERS, Topology, tier_of
from meshd.wire import WireError, check_name

ORDERS = ("weight", "rtt")
HEALTHY = ("passing", "warning")
HEALTH_VALUES = ("passing", "warning", "critical")
#: In a policy file, ``allow = "*"`` means "any cluster" (TOML has no null).
ALLOW_ANY = "*"


class PolicyError(ValueError):
    """A policy that cannot be used.  The message is one sentence naming the field."""


# ---------------------------------------------------------------------------
# Policy values


@dataclass(frozen=True, slots=True)
class AppPolicy:
    """How lookups of one app are ordered.  Validated when built."""

    #: Tiers in preference order: a subset or permutation of ``locality.TIERS``.
    #: Unlisted tiers fold into the next listed one in the canonical order.
    tiers: tuple[str, ...] = TIERS
    #: Clusters to fail over to, most preferred first (tier ``failover``).
    failover: tuple[str, ...] = ()
    #: A step of the spill walk is enough only once this many healthy
    #: endpoints are active.  Default 1: the classic "use remote copies when no
    #: local copy is left", which operators raise to keep headroom.
    min_healthy: int = 1
    #: ...and only if the step just added has at least this fraction of its
    #: endpoints healthy (Envoy priority levels with overprovisioning).
    min_healthy_fraction: float = 0.0
    #: Order within a tier: "weight" (weighted rendezvous hashing) or "rtt".
    order: str = "weight"
    #: Clusters whose endpoints may be returned at all; None: any cluster.
    allow: tuple[str, ...] | None = None
    #: In tier "any", order clusters by measured round trip when known.
    nearest_first: bool = True

    def __post_init__(self) -> None:
        checked = _check_fields({f: getattr(self, f) for f in _FIELDS}, "")
        for name, value in checked.items():  # lists become tuples, ints floats
            object.__setattr__(self, name, value)


_FIELDS = (
    "tiers",
    "failover",
    "min_healthy",
    "min_healthy_fraction",
    "order",
    "allow",
    "nearest_first",
)


@dataclass(frozen=True, slots=True)
class Policy:
    """The default app policy plus per-app overrides, keyed "app" or "namespace/app"."""

    default: AppPolicy = field(default_factory=AppPolicy)
    apps: dict[str, AppPolicy] = field(default_factory=dict)

    def for_app(self, app: str, namespace: str) -> AppPolicy:
        """The policy of ``app`` in ``namespace``: "namespace/app", else "app", else default."""
        found = self.apps.get(f"{namespace}/{app}")
        if found is None:
            found = self.apps.get(app)
        return self.default if found is None else found


# ---------------------------------------------------------------------------
# Parsing and checking


def _key_path(prefix: str, key: str) -> str:
    """``prefix.key`` with the key quoted as TOML would need it."""
    bare = key and all(c.isascii() and (c.isalnum() or c in "-_") for c in key)
    part = key if bare else '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{prefix}.{part}" if prefix else part


def _names(value: object, path: str, what: str) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise PolicyError(f"{path} must be a list of {what} names")
    seen: set[str] = set()
    for i, item in enumerate(value):
        try:
            check_name(item, f"{path}[{i}]")
        except WireError as e:
            raise PolicyError(str(e)) from None
        if item in seen:
            raise PolicyError(f"{path} lists {what} {item!r} twice")
        seen.add(item)
    return tuple(value)


def _check_fields(values: Mapping[str, object], prefix: str) -> dict[str, Any]:
    """Check the AppPolicy fields present in ``values``; return them in their Python types.

    ``prefix`` is the field path of the section ("" for the top level,
    "apps.orders" for an app), so every message names the exact field.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        path = _key_path(prefix, key)
        if key == "tiers":
            if not isinstance(value, list | tuple) or not value:
                raise PolicyError(f"{path} must be a non-empty list of tiers")
            seen: set[str] = set()
            for tier in value:
                if not isinstance(tier, str) or tier not in TIER_RANK:
                    raise PolicyError(
                        f"{path} lists unknown tier {tier!r} (known: {', '.join(TIERS)})"
                    )
                if tier in seen:
                    raise PolicyError(f"{path} lists tier {tier!r} twice")
                seen.add(tier)
            out[key] = tuple(value)
        elif key == "failover":
            out[key] = _names(value, path, "cluster")
        elif key == "allow":
            if value is None or value == ALLOW_ANY:
                out[key] = None
            elif isinstance(value, str):
                raise PolicyError(f'{path} must be a list of cluster names or "{ALLOW_ANY}"')
            else:
                out[key] = _names(value, path, "cluster")
        elif key == "min_healthy":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise PolicyError(f"{path} must be a non-negative integer")
            out[key] = value
        elif key == "min_healthy_fraction":
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not 0.0 <= value <= 1.0  # also false for NaN
            ):
                raise PolicyError(f"{path} must be a number from 0 to 1")
            out[key] = float(value)
        elif key == "order":
            if value not in ORDERS:
                raise PolicyError(f"{path} must be one of {', '.join(map(repr, ORDERS))}")
            out[key] = value
        elif key == "nearest_first":
            if not isinstance(value, bool):
                raise PolicyError(f"{path} must be true or false")
            out[key] = value
        else:
            hint = ""
            if isinstance(value, dict) and prefix.startswith("apps."):
                hint = ' (write a namespace-qualified app as [apps."namespace/app"])'
            if not hint:
                hint = f" (known: {', '.join(_FIELDS)})"
            raise PolicyError(f"{path} is not a policy setting{hint}")
    return out


def _check_app_key(key: object) -> None:
    path = _key_path("apps", str(key))
    parts = key.split("/") if isinstance(key, str) else []
    if not 1 <= len(parts) <= 2:
        raise PolicyError(f'{path} must be named "app" or "namespace/app"')
    for part in parts:
        try:
            check_name(part, f"{path} name part {part!r}")
        except WireError as e:
            raise PolicyError(str(e)) from None


def parse_policy(data: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """A :class:`Policy` from a TOML-shaped mapping (a parsed file, a config table, JSON).

    Raises :class:`PolicyError` whose message starts with ``source`` and names
    the field path, e.g. ``apps.orders.min_healthy must be a non-negative integer``.
    """
    try:
        if not isinstance(data, Mapping):
            raise PolicyError("the policy must be a table")
        top = dict(data)
        apps_raw = top.pop("apps", {})
        base = _check_fields(top, "")
        default = AppPolicy(**base)
        if not isinstance(apps_raw, Mapping):
            raise PolicyError("apps must be a table of per-app tables")
        apps: dict[str, AppPolicy] = {}
        for key, section in apps_raw.items():
            _check_app_key(key)
            path = _key_path("apps", key)
            if not isinstance(section, Mapping):
                raise PolicyError(f"{path} must be a table of policy settings")
            merged = {**base, **_check_fields(section, path)}
            apps[key] = AppPolicy(**merged)
    except PolicyError as e:
        raise PolicyError(f"{source}: {e}") from None
    return Policy(default=default, apps=apps)


def load_policy_file(path: str | Path) -> Policy:
    """Read and parse a TOML policy file.  Every failure is a one-line :class:`PolicyError`."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"policy file {name} does not exist") from None
    except OSError as e:
        raise PolicyError(f"cannot read policy file {name}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{name}: not UTF-8 text (byte {e.start})") from None
    import tomllib  # only a policy file needs the TOML parser: kept out of the idle agent

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError(f"{name}: {e}") from None
    return parse_policy(data, source=name)


def _app_to_dict(p: AppPolicy) -> dict[str, Any]:
    return {
        "tiers": list(p.tiers),
        "failover": list(p.failover),
        "min_healthy": p.min_healthy,
        "min_healthy_fraction": p.min_healthy_fraction,
        "order": p.order,
        "allow": ALLOW_ANY if p.allow is None else list(p.allow),
        "nearest_first": p.nearest_first,
    }


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """JSON-serialisable form for ``GET /v1/policy``; :func:`parse_policy` reads it back.

    Each app section is written out in full (what applies to that app), not
    only the fields its file section set.
    """
    out = _app_to_dict(policy.default)
    out["apps"] = {key: _app_to_dict(p) for key, p in sorted(policy.apps.items())}
    return out


# ---------------------------------------------------------------------------
# Selection


@dataclass(frozen=True, slots=True)
class Candidate:
    """One endpoint of the app as the asker's record index knows it."""

    instance: str
    app: str
    namespace: str
    address: str
    port: int
    node: str
    cluster: str
    region: str = ""
    zone: str = ""
    health: str = "passing"
    weight: int = 1
    #: False when the endpoint's cluster is cut off from the asker.
    reachable: bool = True
    #: False when the app is not exported to the asker's cluster.
    exported_to_asker: bool = True
    #: Estimated round trip to the hosting node, seconds; None if unknown.
    rtt: float | None = None

    def __post_init__(self) -> None:
        if self.health not in HEALTH_VALUES:
            raise ValueError(f"health must be one of {', '.join(HEALTH_VALUES)}")
        if not isinstance(self.weight, int) or isinstance(self.weight, bool) or self.weight < 0:
            raise ValueError("weight must be a non-negative integer")
        if self.rtt is not None and not (self.rtt >= 0 and math.isfinite(self.rtt)):
            raise ValueError("rtt must be a finite non-negative number of seconds or None")

    @property
    def key(self) -> tuple[str, str, str]:
        """Unique per endpoint; the last tie-breaker of every order."""
        return (self.cluster, self.node, self.instance)

    @property
    def healthy(self) -> bool:
        return self.reachable and self.health in HEALTHY


@dataclass(frozen=True, slots=True)
class Ranked:
    """A candidate in the answer: its (folded) tier and whether traffic goes there now."""

    candidate: Candidate
    tier: str
    active: bool


def fold_tier(tier: str, tiers: tuple[str, ...]) -> str | None:
    """The listed tier that ``tier`` counts as: itself, else the next listed one
    in the canonical order; None if no listed tier comes at or after it."""
    rank = TIER_RANK[tier]
    later = [t for t in tiers if TIER_RANK[t] >= rank]
    return min(later, key=TIER_RANK.__getitem__) if later else None


def hrw_score(asker: Topology, candidate: Candidate) -> float:
    """Weighted rendezvous hashing score: lower is preferred.

    ``-ln(u) / weight`` with ``u`` uniform in (0, 1) from a stable hash of the
    asker and the endpoint.  Each score is an exponential variable with rate
    ``weight``, so the minimum over a tier falls on each endpoint with
    probability weight / total weight, and an asker's order changes only
    where endpoints come or go (Schindelhauer and Schomaker, 2005).
    """
    if candidate.weight <= 0:
        return math.inf
    h = hashlib.blake2b(digest_size=8)
    for part in (asker.cluster, asker.node, *candidate.key):
        b = part.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "big"))
        h.update(b)
    bits = int.from_bytes(h.digest(), "big") >> 12  # 52 bits: (bits + 0.5) / 2**52 is exact
    u = (bits + 0.5) / 2**52  # strictly inside (0, 1)
    return -math.log(u) / candidate.weight


def _tail(c: Candidate) -> tuple[Any, ...]:
    # Identical keys should not happen; if they do, order by every field so the
    # answer still does not depend on input order.
    return (
        c.key,
        c.app,
        c.namespace,
        c.address,
        c.port,
        c.region,
        c.zone,
        c.health,
        c.weight,
        c.reachable,
        c.rtt is None,
        c.rtt or 0.0,
    )


def select(
    asker: Topology,
    candidates: Iterable[Candidate],
    policy: AppPolicy,
    include_unhealthy: bool = False,
    cluster_rtt: Mapping[str, float] | None = None,
) -> list[Ranked]:
    """Rank the endpoints of one app for ``asker`` under ``policy`` (rules a-f above).

    ``cluster_rtt`` maps cluster name to a measured round trip in seconds; the
    asker's own cluster counts as 0 unless given.  Healthy endpoints come
    first, active ones before the rest; unhealthy ones only with
    ``include_unhealthy``.
    """
    rtts = dict(cluster_rtt or {})
    rtts.setdefault(asker.cluster, 0.0)
    tier_pos = {t: i for i, t in enumerate(policy.tiers)}
    failover_pos = {c: i for i, c in enumerate(policy.failover)}

    rows: list[tuple[tuple[Any, ...], tuple[Any, ...], str, Candidate]] = []
    for c in candidates:
        # (a) visibility
        if not c.exported_to_asker:
            continue
        if policy.allow is not None and c.cluster not in policy.allow:
            continue
        # (c) tier, folded into the policy's list
        raw = tier_of(asker, Topology(c.node, c.cluster, c.region, c.zone), policy.failover)
        tier = fold_tier(raw, policy.tiers)
        if tier is None:
            continue
        # (d) the spill step: a tier, or one cluster of "failover" / "any"
        group: tuple[Any, ...]
        if tier == "failover":
            # Clusters folded in from nearer tiers are not in the list: they go first.
            group = (failover_pos.get(c.cluster, -1), c.cluster)
        elif tier == "any":
            rtt = rtts.get(c.cluster) if policy.nearest_first else None
            group = (rtt is None, rtt or 0.0, c.cluster)
        else:
            group = ()
        step = (tier_pos[tier], *group)
        if policy.order == "rtt":
            within: tuple[Any, ...] = (c.rtt is None, c.rtt or 0.0)
        else:
            within = (hrw_score(asker, c),)
        rows.append((step, within, tier, c))

    rows.sort(key=lambda r: (r[0], r[1], _tail(r[3])))

    # (e) spill: per step, count healthy and total endpoints (unhealthy ones
    # count whether or not they are returned).
    steps: dict[tuple[Any, ...], list[int]] = {}
    for step, _, _, c in rows:
        counts = steps.setdefault(step, [0, 0])
        counts[0] += c.healthy
        counts[1] += 1
    need = max(policy.min_healthy, 1)
    active_steps: set[tuple[Any, ...]] = set()
    accumulated = 0
    for step in sorted(steps):
        healthy, total = steps[step]
        active_steps.add(step)
        accumulated += healthy
        # healthy / total, not fraction * total: an int ratio rounds exactly as
        # the operator's decimal does, so 7 of 10 meets 0.7.
        if accumulated >= need and healthy / total >= policy.min_healthy_fraction:
            break

    # (b) healthy first, then (only if asked) the unhealthy, never active
    out = [Ranked(c, tier, step in active_steps) for step, _, tier, c in rows if c.healthy]
    if include_unhealthy:
        out.extend(Ranked(c, tier, False) for _, _, tier, c in rows if not c.healthy)
    return out
