"""Scenario files: TOML in, frozen dataclasses out, every mistake named by its field.

A scenario says what to build (topology, protocol profile, network model),
how to warm it up, what to measure (records published, apps with a failover
order) and which faults to inject when.  Times in the file are virtual
seconds from the end of the warm-up (the start of the measured window).

Loading is strict: an unknown key, a value of the wrong type or out of range
raises :class:`ScenarioError` whose message names the field path
(``faults[2].at_s``) in one sentence.  ``extends = "base.toml"`` starts from
another file (tables merge key by key, arrays are replaced), and overrides
given as ``path=value`` (the CLI's ``--set`` and ``--nodes``) are applied to
the raw document before validation, so they are checked the same way.

The schema, with defaults::

    name = "<file stem>"        description = ""
    seed = 1                    duration_s = 300.0

    [topology]  nodes = 100  clusters = ["east"] (or a count: c0..)  bridges = 1
                zones = 2
    [protocol]  lifeguard = true   [protocol.lan] / [protocol.wan]: Config fields
    [network]   loss = 0.0
                lan_latency = {kind = "lognormal", median_ms = 0.5, sigma = 0.5}
                wan_latency = {kind = "lognormal", median_ms = 40.0, sigma = 0.3}
                [[network.wan_pairs]] clusters = ["a", "b"], kind = ..., (latency)
                [network.burst] mean_good_s, mean_bad_s, loss_good = 0, loss_bad = 1,
                                scope = "node" | "link"
                latency kinds: fixed {ms}, uniform {lo_ms, hi_ms},
                               lognormal {median_ms, sigma, floor_ms = 0, cap_ms}
    [warmup]    mode = "join" | "preset"  max_s = 600.0  settle_s = 10.0
                join_window_s = 0.0  clean_network = true
    [[apps]]    name, clusters = all, per_cluster = 1, failover = [] (measured when set)
    [[publish]] at_s, node = "random", app = "probe", every_s, until_s
    [[faults]]  at_s, kind, then per kind (see FAULT_FIELDS); every_s/until_s repeat it.

Node selectors: an index, ``"random"``, ``"random:<cluster>"``, ``"bridge:<cluster>"``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from meshd.protocol.config import Config
from meshd.wire import WireError, check_name
from simulations.network import BurstLoss, Distribution, Fixed, LogNormal, Uniform


class ScenarioError(ValueError):
    """A scenario that cannot run; the message names the field and says why."""


# ----------------------------------------------------------------------
# The scenario


@dataclass(frozen=True)
class Topology:
    nodes: int
    clusters: tuple[str, ...]
    bridges: int
    zones: int

    def sizes(self) -> dict[str, int]:
        """Nodes per cluster: ``nodes`` split evenly, the first clusters take the rest."""
        k = len(self.clusters)
        base, extra = divmod(self.nodes, k)
        return {c: base + (1 if i < extra else 0) for i, c in enumerate(self.clusters)}


@dataclass(frozen=True)
class NetworkSpec:
    lan: Distribution
    wan: Distribution
    wan_pairs: tuple[tuple[str, str, Distribution], ...]
    loss: float
    burst: BurstLoss | None


@dataclass(frozen=True)
class Warmup:
    mode: str  # "join": cold join through seeds; "preset": one full sync from a seed
    max_s: float
    settle_s: float
    join_window_s: float
    clean_network: bool


@dataclass(frozen=True)
class AppSpec:
    name: str
    clusters: tuple[str, ...]
    per_cluster: int
    failover: tuple[str, ...]


@dataclass(frozen=True)
class Publish:
    at_s: float
    node: str
    app: str
    every_s: float | None
    until_s: float | None


@dataclass(frozen=True)
class Fault:
    """One fault (or a repeating one).  Fields not used by ``kind`` keep their defaults."""

    at_s: float
    kind: str
    node: str = "random"
    count: int = 1
    share: float | None = None  # instead of count: this share of the eligible nodes
    every_s: float | None = None
    until_s: float | None = None
    restart_after_s: float | None = None
    duration_s: float = 5.0
    rate_per_s: float = 0.0
    down_s: float = 30.0
    leave_fraction: float = 0.0
    cluster: str = ""
    mode: str = "crash"
    sides: tuple[tuple[str, ...], ...] = ()
    fraction: float = 0.5
    one_way: bool = False
    heal_after_s: float | None = None
    rate: float = 0.0
    delay_s: float = 2.0


#: Fields each fault kind accepts besides ``at_s`` and ``kind``.
FAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "crash": ("node", "count", "share", "every_s", "until_s", "restart_after_s"),
    "leave": ("node", "count", "share", "every_s", "until_s", "restart_after_s"),
    "restart": ("node",),
    "pause": ("node", "count", "share", "every_s", "until_s", "duration_s"),
    "slow": ("node", "count", "share", "every_s", "until_s", "duration_s", "delay_s"),
    "churn": ("rate_per_s", "until_s", "down_s", "leave_fraction", "cluster"),
    "lose_cluster": ("cluster", "mode", "restart_after_s"),
    "lose_bridge": ("cluster", "count", "restart_after_s"),
    "partition": ("sides", "fraction", "cluster", "one_way", "heal_after_s"),
    "heal": (),
    "loss": ("rate",),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    duration_s: float
    topology: Topology
    lan: Config
    wan: Config
    network: NetworkSpec
    warmup: Warmup
    apps: tuple[AppSpec, ...]
    publish: tuple[Publish, ...]
    faults: tuple[Fault, ...]
    source: str = ""

    def summary(self) -> dict[str, Any]:
        """The scenario as plain data, for results.json."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and math.isinf(x):
        return None
    return x


# ----------------------------------------------------------------------
# Reading raw TOML with field paths


_MISSING = object()


def _type_name(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


class _Reader:
    """One TOML table: typed getters that record what was read, then ``finish``."""

    def __init__(self, raw: object, path: str, source: str) -> None:
        self.path = path
        self.source = source
        if not isinstance(raw, dict):
            self.fail(None, f"must be a table, not {_type_name(raw)}")
        self.raw: dict[str, Any] = raw
        self.used: set[str] = set()

    def where(self, key: str | None) -> str:
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str | None, why: str) -> NoReturn:
        raise ScenarioError(f"{self.source}: {self.where(key)}: {why}.")

    def get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key, _MISSING)

    def number(
        self,
        key: str,
        default: float | None | object = _MISSING,
        lo: float | None = None,
        hi: float | None = None,
        above: float | None = None,
    ) -> Any:
        v = self.get(key)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(key, "is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.fail(key, f"must be a number, not {_type_name(v)}")
        if not math.isfinite(v):
            self.fail(key, "must be finite")
        if lo is not None and v < lo:
            self.fail(key, f"must be at least {lo:g}, not {v:g}")
        if hi is not None and v > hi:
            self.fail(key, f"must be at most {hi:g}, not {v:g}")
        if above is not None and v <= above:
            self.fail(key, f"must be greater than {above:g}, not {v:g}")
        return float(v)

    def integer(
        self,
        key: str,
        default: int | object = _MISSING,
        lo: int | None = None,
        hi: int | None = None,
    ) -> Any:
        v = self.get(key)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(key, "is required")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, not {_type_name(v)}")
        if lo is not None and v < lo:
            self.fail(key, f"must be at least {lo}, not {v}")
        if hi is not None and v > hi:
            self.fail(key, f"must be at most {hi}, not {v}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.get(key)
        if v is _MISSING:
            return default
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, not {_type_name(v)}")
        return v

    def string(
        self, key: str, default: str | object = _MISSING, choices: Iterable[str] | None = None
    ) -> Any:
        v = self.get(key)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(key, "is required")
            return default
        if not isinstance(v, str):
            self.fail(key, f"must be a string, not {_type_name(v)}")
        if choices is not None:
            options = tuple(choices)
            if v not in options:
                self.fail(key, f"must be one of {', '.join(options)}, not {v!r}")
        return v

    def names(self, key: str, default: tuple[str, ...] | object = _MISSING) -> Any:
        v = self.get(key)
        if v is _MISSING:
            if default is _MISSING:
                self.fail(key, "is required")
            return default
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.fail(key, f"must be an array of strings, not {_type_name(v)}")
        return tuple(v)

    def table(self, key: str) -> _Reader:
        v = self.get(key)
        return _Reader({} if v is _MISSING else v, self.where(key), self.source)

    def tables(self, key: str) -> list[_Reader]:
        v = self.get(key)
        if v is _MISSING:
            return []
        if not isinstance(v, list):
            self.fail(key, f"must be an array of tables ([[{key}]]), not {_type_name(v)}")
        return [_Reader(x, f"{self.where(key)}[{i}]", self.source) for i, x in enumerate(v)]

    def finish(self, allowed: Iterable[str] | None = None) -> None:
        known = set(self.used if allowed is None else allowed)
        for key in self.raw:
            if key not in known:
                opts = ", ".join(sorted(known)) or "none"
                self.fail(key, f"unknown field (expected one of: {opts})")


# ----------------------------------------------------------------------
# Raw documents: files, extends, overrides


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_raw(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ScenarioError(f"{path.name}: extends: the files extend each other in a loop.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario file ({exc.strerror}).") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path.name}: not valid TOML ({exc}).") from None
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ScenarioError(f"{path.name}: extends: must be a file name, not {_type_name(base)}.")
    parent = _read_raw(path.parent / base, (*seen, path))
    parent.pop("name", None)  # a derived scenario is named after its own file
    return _merge(parent, raw)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", value), the value read as TOML (bare words as strings)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ScenarioError(f"--set {item!r}: expected FIELD=VALUE, e.g. protocol.lifeguard=false.")
    try:
        value = tomllib.loads(f"x = {text.strip()}")["x"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    raw = _merge(raw, {})
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ScenarioError(f"--set {dotted}: {where} is not a table.")
            else:
                nxt = dict(nxt)
            node[part] = nxt
            node = nxt
        node[parts[-1]] = value
    return raw


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Scenario:
    """Read, merge, override and validate a scenario file."""
    p = Path(path)
    raw = apply_overrides(_read_raw(p), overrides or {})
    raw.setdefault("name", p.stem)
    return parse_scenario(raw, source=p.name)


# ----------------------------------------------------------------------
# Validation


def _latency(r: _Reader, extra: tuple[str, ...] = ()) -> Distribution:
    kind = r.string("kind", "lognormal", ("fixed", "uniform", "lognormal"))
    ms = 1e-3
    if kind == "fixed":
        d: Distribution = Fixed(r.number("ms", lo=0) * ms)
        r.finish({"kind", "ms", *extra})
    elif kind == "uniform":
        lo = r.number("lo_ms", lo=0)
        hi = r.number("hi_ms", lo=0)
        if hi < lo:
            r.fail("hi_ms", f"must be at least lo_ms ({lo:g}), not {hi:g}")
        d = Uniform(lo * ms, hi * ms)
        r.finish({"kind", "lo_ms", "hi_ms", *extra})
    else:
        median = r.number("median_ms", above=0)
        sigma = r.number("sigma", 0.5, lo=0, hi=5)
        floor = r.number("floor_ms", 0.0, lo=0)
        cap = r.number("cap_ms", math.inf, above=0)
        if cap < floor:
            r.fail("cap_ms", f"must be at least floor_ms ({floor:g}), not {cap:g}")
        d = LogNormal(median * ms, sigma, floor * ms, cap * ms)
        r.finish({"kind", "median_ms", "sigma", "floor_ms", "cap_ms", *extra})
    return d


def _config(r: _Reader, base: Config, lifeguard: bool) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {"lifeguard": lifeguard}
    for key in r.raw:
        if key not in fields:
            r.fail(key, f"is not a protocol setting (one of: {', '.join(sorted(fields))})")
        default = getattr(base, key)
        if isinstance(default, bool):
            values[key] = r.boolean(key, default)
        elif isinstance(default, int):
            values[key] = r.integer(key, lo=0)
        else:
            values[key] = r.number(key, lo=0)
    try:
        return dataclasses.replace(base, **values)
    except ValueError as exc:
        r.fail(None, str(exc))
        raise  # unreachable: fail raises


def _check_cluster(r: _Reader, key: str, name: str, clusters: tuple[str, ...]) -> str:
    if name not in clusters:
        r.fail(key, f"names cluster {name!r}, which is not in topology.clusters")
    return name


def _selector(r: _Reader, key: str, sel: Any, topo: Topology) -> str:
    if isinstance(sel, bool) or not isinstance(sel, int | str):
        r.fail(key, f"must be a node index or a selector string, not {_type_name(sel)}")
    if isinstance(sel, int):
        if not 0 <= sel < topo.nodes:
            r.fail(key, f"node index must be from 0 to {topo.nodes - 1}, not {sel}")
        return str(sel)
    kind, _, cluster = sel.partition(":")
    if kind == "random" and not cluster:
        return sel
    if kind in ("random", "bridge") and cluster:
        _check_cluster(r, key, cluster, topo.clusters)
        if kind == "bridge" and topo.bridges == 0:
            r.fail(key, "selects a bridge, but topology.bridges is 0")
        return sel
    r.fail(
        key, f"must be an index, 'random', 'random:<cluster>' or 'bridge:<cluster>', not {sel!r}"
    )
    raise AssertionError


def _topology(r: _Reader) -> Topology:
    nodes = r.integer("nodes", 100, lo=2, hi=1_000_000)
    raw_clusters = r.get("clusters")
    if raw_clusters is _MISSING:
        clusters: tuple[str, ...] = ("east",)
    elif isinstance(raw_clusters, int) and not isinstance(raw_clusters, bool):
        if not 1 <= raw_clusters <= 64:
            r.fail("clusters", f"must be from 1 to 64 clusters, not {raw_clusters}")
        clusters = tuple(f"c{i}" for i in range(raw_clusters))
    elif isinstance(raw_clusters, list) and raw_clusters:
        for i, c in enumerate(raw_clusters):
            try:
                check_name(c, "cluster")
            except WireError as exc:
                r.fail(f"clusters[{i}]", str(exc))
        if len(set(raw_clusters)) != len(raw_clusters):
            r.fail("clusters", "names must be unique")
        clusters = tuple(raw_clusters)
    else:
        r.fail("clusters", f"must be a count or an array of names, not {_type_name(raw_clusters)}")
        raise AssertionError
    default_bridges = 1 if len(clusters) > 1 else 0
    bridges = r.integer("bridges", default_bridges, lo=0)
    zones = r.integer("zones", 2, lo=1, hi=26)
    r.finish()
    topo = Topology(nodes, clusters, bridges, zones)
    smallest = min(topo.sizes().values())
    if smallest < 2:
        r.fail("nodes", f"{nodes} nodes leave a cluster with fewer than 2 of {len(clusters)}")
    if len(clusters) > 1 and bridges < 1:
        r.fail("bridges", "must be at least 1 when there are several clusters")
    if bridges >= smallest:
        r.fail("bridges", f"must be below the smallest cluster's size ({smallest}), not {bridges}")
    return topo


def _fault(r: _Reader, topo: Topology, duration: float) -> Fault:
    at = r.number("at_s", lo=0)
    kind = r.string("kind", choices=FAULT_FIELDS)
    allowed = {"at_s", "kind", *FAULT_FIELDS[kind]}
    for key in r.raw:
        if key not in allowed:
            fields = ", ".join(sorted(allowed))
            r.fail(key, f"is not a field of a {kind!r} fault (it has: {fields})")
    kw: dict[str, Any] = {}
    if "node" in r.raw:
        kw["node"] = _selector(r, "node", r.get("node"), topo)
    if kind == "restart" and "node" not in r.raw:
        r.fail("node", "is required for a restart (an index)")
    if kind == "restart" and not kw["node"].isdigit():
        r.fail("node", "of a restart must be a node index")
    if "count" in r.raw:
        kw["count"] = r.integer("count", lo=1, hi=topo.nodes)
    if "share" in r.raw:
        if "count" in r.raw:
            r.fail("share", "cannot be given with count")
        kw["share"] = r.number("share", above=0, hi=1)
    for key in ("every_s", "restart_after_s", "heal_after_s"):
        if key in r.raw:
            kw[key] = r.number(key, above=0)
    if "until_s" in r.raw:
        kw["until_s"] = r.number("until_s", lo=at)
    if "duration_s" in r.raw:
        kw["duration_s"] = r.number("duration_s", above=0)
    if "delay_s" in r.raw:
        kw["delay_s"] = r.number("delay_s", above=0)
    if "down_s" in r.raw:
        kw["down_s"] = r.number("down_s", above=0)
    if kind == "churn":
        kw["rate_per_s"] = r.number("rate_per_s", above=0)
    if "leave_fraction" in r.raw:
        kw["leave_fraction"] = r.number("leave_fraction", lo=0, hi=1)
    if "cluster" in r.raw:
        kw["cluster"] = _check_cluster(r, "cluster", r.string("cluster"), topo.clusters)
    elif kind in ("lose_cluster", "lose_bridge"):
        r.fail("cluster", f"is required for {kind}")
    if kind == "lose_bridge" and topo.bridges == 0:
        r.fail("kind", "lose_bridge needs bridges (topology.bridges)")
    if "mode" in r.raw:
        kw["mode"] = r.string("mode", choices=("crash", "cut"))
    if kind == "partition":
        if "sides" in r.raw:
            sides = r.get("sides")
            ok = (
                isinstance(sides, list)
                and len(sides) == 2
                and all(isinstance(s, list) and s for s in sides)
            )
            if not ok:
                r.fail("sides", "must be two non-empty arrays of cluster names")
            for i, side in enumerate(sides):
                for c in side:
                    if not isinstance(c, str):
                        r.fail(f"sides[{i}]", f"must hold cluster names, not {_type_name(c)}")
                    _check_cluster(r, f"sides[{i}]", c, topo.clusters)
            if set(sides[0]) & set(sides[1]):
                r.fail("sides", "a cluster cannot be on both sides")
            if "fraction" in r.raw:
                r.fail("fraction", "cannot be given with sides (one splits clusters, one nodes)")
            kw["sides"] = (tuple(sides[0]), tuple(sides[1]))
        else:
            kw["fraction"] = r.number("fraction", 0.5, above=0, hi=0.99)
        if "one_way" in r.raw:
            kw["one_way"] = r.boolean("one_way", False)
    if kind == "loss":
        kw["rate"] = r.number("rate", lo=0, hi=1)
    r.finish(allowed)
    if at > duration:
        r.fail("at_s", f"is after the end of the run (duration_s = {duration:g})")
    return Fault(at_s=at, kind=kind, **kw)


def parse_scenario(raw: Mapping[str, Any], source: str = "<scenario>") -> Scenario:
    """Validate a raw scenario document (as TOML decodes it)."""
    top = _Reader(dict(raw), "", source)
    name = top.string("name", "scenario")
    description = top.string("description", "")
    seed = top.integer("seed", 1, lo=0, hi=2**63 - 1)
    duration = top.number("duration_s", 300.0, above=0, hi=1e7)

    topo = _topology(top.table("topology"))

    pr = top.table("protocol")
    lifeguard = pr.boolean("lifeguard", True)
    lan = _config(pr.table("lan"), Config.lan(), lifeguard)
    wan = _config(pr.table("wan"), Config.wan(), lifeguard)
    pr.finish()

    nr = top.table("network")
    lan_lat = _latency(nr.table("lan_latency")) if "lan_latency" in nr.raw else None
    nr.get("lan_latency")
    wan_lat = _latency(nr.table("wan_latency")) if "wan_latency" in nr.raw else None
    nr.get("wan_latency")
    pairs = []
    for pr_ in nr.tables("wan_pairs"):
        cs = pr_.names("clusters")
        if len(cs) != 2 or cs[0] == cs[1]:
            pr_.fail("clusters", "must name two different clusters")
        for c in cs:
            _check_cluster(pr_, "clusters", c, topo.clusters)
        pairs.append((cs[0], cs[1], _latency(pr_, ("clusters",))))
    loss = nr.number("loss", 0.0, lo=0, hi=1)
    burst = None
    if "burst" in nr.raw:
        br = nr.table("burst")
        good = br.number("mean_good_s", above=0)
        bad = br.number("mean_bad_s", above=0)
        burst = BurstLoss(
            good,
            bad,
            br.number("loss_good", 0.0, lo=0, hi=1),
            br.number("loss_bad", 1.0, lo=0, hi=1),
            br.string("scope", "node", ("node", "link")),
        )
        br.finish()
    else:
        nr.get("burst")
    nr.finish()
    network = NetworkSpec(
        lan=lan_lat or LogNormal(0.0005, 0.5, 0.0001, 0.05),
        wan=wan_lat or LogNormal(0.040, 0.3, 0.005, 1.0),
        wan_pairs=tuple(pairs),
        loss=loss,
        burst=burst,
    )

    wr = top.table("warmup")
    warmup = Warmup(
        mode=wr.string("mode", "join", ("join", "preset")),
        max_s=wr.number("max_s", 600.0, above=0),
        settle_s=wr.number("settle_s", 10.0, lo=0),
        join_window_s=wr.number("join_window_s", 0.0, lo=0),
        clean_network=wr.boolean("clean_network", True),
    )
    wr.finish()

    apps = []
    for ar in top.tables("apps"):
        aname = ar.string("name")
        try:
            check_name(aname, "app")
        except WireError as exc:
            ar.fail("name", str(exc))
        acl = ar.names("clusters", topo.clusters)
        for c in acl:
            _check_cluster(ar, "clusters", c, topo.clusters)
        per = ar.integer("per_cluster", 1, lo=1)
        fo = ar.names("failover", ())
        for c in fo:
            _check_cluster(ar, "failover", c, topo.clusters)
        if fo and len(fo) < 2:
            ar.fail("failover", "must list at least two clusters (primary, then the next)")
        for c in fo[:2]:
            if c not in acl:
                ar.fail("failover", f"names {c!r}, where the app does not run")
        ar.finish()
        apps.append(AppSpec(aname, acl, per, fo))
    if len({a.name for a in apps}) != len(apps):
        top.fail("apps", "app names must be unique")

    publish = []
    for pr2 in top.tables("publish"):
        at = pr2.number("at_s", lo=0)
        if at > duration:
            pr2.fail("at_s", f"is after the end of the run (duration_s = {duration:g})")
        node = _selector(pr2, "node", pr2.get("node") if "node" in pr2.raw else "random", topo)
        app = pr2.string("app", "probe")
        try:
            check_name(app, "app")
        except WireError as exc:
            pr2.fail("app", str(exc))
        every = pr2.number("every_s", None, above=0)
        until = pr2.number("until_s", None, lo=at)
        pr2.finish()
        publish.append(Publish(at, node, app, every, until))

    faults = tuple(_fault(fr, topo, duration) for fr in top.tables("faults"))
    top.finish()
    return Scenario(
        name=name,
        description=description,
        seed=seed,
        duration_s=duration,
        topology=topo,
        lan=lan,
        wan=wan,
        network=network,
        warmup=warmup,
        apps=tuple(apps),
        publish=tuple(publish),
        faults=faults,
        source=source,
    )
