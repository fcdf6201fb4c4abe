"""The gossip wire: message types, their fields, and the one place that decodes bytes.

A frame is a 4-byte big-endian length followed by one msgpack map
``{"v": WIRE_VERSION, "t": MsgType, ...fields}``.  Everything a peer sends is
untrusted: :func:`decode_message` and :class:`FrameDecoder` never raise on peer
input; they return a :class:`Rejection` naming the reason, which the caller
counts and logs.  Every size that a peer controls is capped by a named constant
below and enforced by msgpack's own unpacker limits *before* allocation, so a
hostile length prefix or a huge declared array costs nothing.

Messages and data are frozen, slotted dataclasses validated when built; a
value that violates an invariant raises ``ValueError`` (our own misuse), which
the decoder turns into a rejection (peer input).  :func:`unchecked` builds
without the checks, for a core's own probes and acks only (see there).

The numbers in :class:`MsgType` and :class:`Status` are protocol: append only,
never renumber, never reuse.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, cast

import msgpack

#: 2: member claims (alive, left) carry the member's own signature.  A
#: version-1 peer's unsigned claims could not enter a view, so it is refused
#: at the frame instead of being half-understood.
WIRE_VERSION = 2

# ---------------------------------------------------------------------------
# Caps.  Each is a protocol limit: a peer exceeding it is rejected, not served.

#: Largest frame body.  A full push-pull of 10,000 members is about 0.7 MiB.
MAX_FRAME_BYTES = 1 << 20
#: Longest string field (names, addresses, meta values).
MAX_STR_BYTES = 4096
#: Largest binary field: an origin-state body plus headroom.
MAX_BIN_BYTES = 256 * 1024
#: Longest list: members in a push-pull (fits 10,000-node pools with room).
MAX_LIST_LEN = 32768
#: Largest map: a record digest ``{origin: version}`` of a big mesh.
MAX_MAP_LEN = 65536
#: Longest node, cluster, region, zone, app, namespace or instance name.
MAX_NAME_LEN = 253
#: Most app records one origin may publish.
MAX_APPS_PER_ORIGIN = 512
#: Most meta pairs on one record, and their total size.
MAX_META_PAIRS = 64
MAX_META_BYTES = 4096
#: Largest encoded origin-state body.  Fits one piggyback-free frame with room.
MAX_ORIGIN_BODY_BYTES = 128 * 1024
#: Most clusters one app may be exported to by name (more: export to all).
MAX_EXPORT_CLUSTERS = 8
#: Longest document id: ``cluster/node#to:c1,c2,...`` (see OriginState.origin).
MAX_ORIGIN_ID_LEN = 2 * MAX_NAME_LEN + 1 + 4 + MAX_EXPORT_CLUSTERS * (MAX_NAME_LEN + 1)
#: Longest network coordinate: dimensions plus error and height.
MAX_COORD_LEN = 34
#: Most members one bridge may list as down in its own cluster.
MAX_DOWN_MEMBERS = 16384
#: Operator-set node metadata: at most this many pairs (Consul's node meta
#: has 64; a node's document carries it to every cluster, so fewer).
MAX_NODE_META_PAIRS = 16
#: Longest node meta key and value (Consul: 128 and 512).
MAX_NODE_META_KEY = 128
MAX_NODE_META_VALUE = 512
#: Largest signature and certificate chain carried with a state.
MAX_SIGNATURE_BYTES = 512
MAX_CERT_BYTES = 16 * 1024
#: Largest signed member-claim body: six short fields.
MAX_CLAIM_BODY_BYTES = 1024

_LEN = struct.Struct(">I")
_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.\-]{0,251}[A-Za-z0-9])?$")
HEALTH_VALUES = ("passing", "warning", "critical")
PROTOCOLS = ("http", "grpc", "tcp")


class MsgType(enum.IntEnum):
    """Message type numbers.  These are protocol: append only."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    GOSSIP = 5
    PUSH_PULL = 6
    PUSH_PULL_REPLY = 7
    REVOCATIONS = 8


class Status(enum.IntEnum):
    """Member status as carried on the wire.  Protocol numbers: append only."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class WireError(ValueError):
    """A value that cannot be put on, or taken off, the wire."""


def check_name(value: object, what: str) -> str:
    # fullmatch, not match: ``$`` also matches before a trailing newline.
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise WireError(f"{what} must be 1-{MAX_NAME_LEN} letters, digits, '.', '-' or '_'")
    return value


def _utf8_len(value: str) -> int:
    """Encoded size of ``value``; raises WireError if it cannot be UTF-8 (lone surrogates)."""
    if value.isascii():
        return len(value)
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise WireError("strings must be valid Unicode (no lone surrogates)") from None


def _check_str(value: object, what: str, max_len: int = MAX_STR_BYTES) -> str:
    # Counted in UTF-8 bytes, as the decoder's max_str_len counts them: a limit in
    # characters would let us build values that no peer can decode.
    if (
        not isinstance(value, str)
        or len(value) > max_len
        or (not value.isascii() and _utf8_len(value) > max_len)
    ):
        raise WireError(f"{what} must be a string of at most {max_len} UTF-8 bytes")
    return value


def _check_int(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise WireError(f"{what} must be an integer from {lo} to {hi}")
    return value


def _check_bytes(value: object, what: str, max_len: int) -> bytes:
    if not isinstance(value, bytes) or len(value) > max_len:
        raise WireError(f"{what} must be at most {max_len} bytes")
    return value


def _tuple_field(raw: Any, what: str) -> tuple[Any, ...]:
    if not isinstance(raw, list):
        raise WireError(f"{what} must be a list")
    return tuple(raw)


def scope_for(export: tuple[str, ...] | None) -> str:
    """The document scope an app record with this ``export`` belongs in."""
    if export is None:
        return ""
    if not export:
        return "local"
    return "to:" + ",".join(export)


def doc_member(origin: str) -> str:
    """The member id of a document id (``cluster/node#scope`` -> ``cluster/node``)."""
    return origin.partition("#")[0]


def may_reach(origin: str, cluster: str) -> bool:
    """May the document ``origin`` be held by a node of ``cluster``?

    The export rule, applied wherever a document could leave a node: the
    own cluster always, others only when the scope names them (or is "").
    """
    mid, _, scope = origin.partition("#")
    if not scope or mid.partition("/")[0] == cluster:
        return True
    if scope.startswith("to:"):
        return cluster in scope[3:].split(",")
    return False


def member_id(cluster: str, node: str) -> str:
    """The id of a node everywhere in the mesh: ``cluster/node``."""
    return f"{cluster}/{node}"


def split_member_id(mid: str) -> tuple[str, str]:
    """``cluster/node`` -> (cluster, node); raises WireError if malformed."""
    if not isinstance(mid, str):
        raise WireError("a member id is 'cluster/node'")
    cluster, sep, node = mid.partition("/")
    if not sep:
        raise WireError("a member id is 'cluster/node'")
    return check_name(cluster, "cluster"), check_name(node, "node")


# ---------------------------------------------------------------------------
# Records: what one origin publishes.


@dataclass(frozen=True, slots=True)
class AppRecord:
    """One app instance published by its node.  Meta is a sorted tuple of pairs."""

    app: str
    instance: str
    address: str
    port: int
    namespace: str = "default"
    protocol: str = "http"
    meta: tuple[tuple[str, str], ...] = ()
    weight: int = 1
    health: str = "passing"
    #: Clusters that may see this record: None for all, () for this cluster
    #: only, else the sorted names (the own cluster always may).
    export: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_name(self.app, "app")
        if self.export is not None:
            if not isinstance(self.export, tuple) or len(self.export) > MAX_EXPORT_CLUSTERS:
                raise WireError(f"export must list at most {MAX_EXPORT_CLUSTERS} clusters (or all)")
            for c in self.export:
                check_name(c, "export cluster")
            if list(self.export) != sorted(set(self.export)):
                raise WireError("export clusters must be unique and sorted")
        check_name(self.instance, "instance")
        check_name(self.namespace, "namespace")
        _check_str(self.address, "address", MAX_NAME_LEN)
        if not self.address:
            raise WireError("address must not be empty")
        _check_int(self.port, "port", 1, 65535)
        if self.protocol not in PROTOCOLS:
            raise WireError(f"protocol must be one of {', '.join(PROTOCOLS)}")
        _check_int(self.weight, "weight", 0, 1_000_000)
        if self.health not in HEALTH_VALUES:
            raise WireError(f"health must be one of {', '.join(HEALTH_VALUES)}")
        if not isinstance(self.meta, tuple) or len(self.meta) > MAX_META_PAIRS:
            raise WireError(f"meta must have at most {MAX_META_PAIRS} pairs")
        total = 0
        for pair in self.meta:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise WireError("meta must be string pairs")
            k, v = pair
            _check_str(k, "meta key", MAX_NAME_LEN)
            _check_str(v, "meta value")
            total += _utf8_len(k) + _utf8_len(v)
        if total > MAX_META_BYTES:
            raise WireError(f"meta must total at most {MAX_META_BYTES} UTF-8 bytes")
        if list(self.meta) != sorted(dict(self.meta).items()):
            raise WireError("meta keys must be unique and sorted")

    @staticmethod
    def make_meta(meta: dict[str, str] | None) -> tuple[tuple[str, str], ...]:
        return tuple(sorted((meta or {}).items()))

    def to_wire(self) -> list[Any]:
        return [
            self.app,
            self.instance,
            self.address,
            self.port,
            self.namespace,
            self.protocol,
            dict(self.meta),
            self.weight,
            self.health,
        ] + ([] if self.export is None else [list(self.export)])

    @classmethod
    def from_wire(cls, raw: Any) -> AppRecord:
        if not isinstance(raw, list) or len(raw) < 9:
            raise WireError("an app record is a list of 9 fields")
        app, instance, address, port, namespace, protocol, meta, weight, health = raw[:9]
        if not isinstance(meta, dict):
            raise WireError("meta must be a map")
        export = raw[9] if len(raw) > 9 else None
        if export is not None and not isinstance(export, list):
            raise WireError("export must be a list")
        return cls(
            export=None if export is None else tuple(export),
            app=app,
            instance=instance,
            address=address,
            port=port,
            namespace=namespace,
            protocol=protocol,
            meta=cls.make_meta(meta),
            weight=weight,
            health=health,
        )


def _signed_body(body: bytes, max_len: int, what: str) -> Any:
    """Unpack a signed body; WireError (only) when it is too large or undecodable."""
    if not isinstance(body, bytes) or len(body) > max_len:
        raise WireError(f"{what} body too large")
    try:
        return _unpack(body)
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise WireError(f"{what} body undecodable: {type(exc).__name__}") from None


@dataclass(frozen=True, slots=True)
class OriginState:
    """Everything one node publishes.  Only that node writes it; ``version`` only grows."""

    node: str
    cluster: str
    region: str
    zone: str
    version: int
    apps: tuple[AppRecord, ...] = ()
    #: Audience of this document: "" all clusters, "local" the own cluster,
    #: "to:a,b" the own cluster and those named.  A node publishes one
    #: document per audience so a bridge can forward or withhold each whole
    #: (a signature covers a document, so a relay cannot cut records out).
    scope: str = ""
    #: True when the node is a bridge (member of the WAN pool).
    bridge: bool = False
    #: Bridges only: (member, version) for members of the own cluster the
    #: bridge holds dead or left, with the highest version of theirs it held:
    #: "dead as of this version".  Every store that hears it tombstones those
    #: documents up to that version, so forgetting the statement later (the
    #: member reaped, a bridge restarted) cannot resurrect them, while a new
    #: life (a higher version) is served at once.  A statement about cluster
    #: C: only accepted signed by a certificate of cluster C.
    down: tuple[tuple[str, int], ...] = ()
    #: Bridges only: clusters the bridge knows of but cannot reach now.
    unreachable: tuple[str, ...] = ()
    #: "host:port" of the gateway other clusters use to reach this node's apps.
    gateway: str = ""
    #: Bridges only: (cluster, estimated round trip in microseconds) to the
    #: nearest bridge of each other cluster, from WAN coordinates; lets every
    #: node of this cluster prefer the nearest other cluster.
    rtt: tuple[tuple[str, int], ...] = ()
    #: The node's own address (a host, no port): what catalogs show as the
    #: node's address in other clusters, which do not see its membership.
    host: str = ""
    #: Operator-set node metadata (``--node-meta``), sorted unique pairs.
    node_meta: tuple[tuple[str, str], ...] = ()
    #: Bridges only: the members of ``down`` that left gracefully (the rest
    #: died), so other clusters deregister them instead of listing them dead.
    left: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.node, "node")
        check_name(self.cluster, "cluster")
        if not isinstance(self.scope, str) or (
            self.scope not in ("", "local") and not self.scope.startswith("to:")
        ):
            raise WireError("scope must be '', 'local' or 'to:<clusters>'")
        if self.scope.startswith("to:"):
            names = self.scope[3:].split(",")
            for c in names:
                check_name(c, "scope cluster")
            if names != sorted(set(names)) or len(names) > MAX_EXPORT_CLUSTERS:
                raise WireError("scope clusters must be unique, sorted and few")
        if not isinstance(self.bridge, bool):
            raise WireError("bridge must be a boolean")
        if not isinstance(self.down, tuple) or len(self.down) > MAX_DOWN_MEMBERS:
            raise WireError("down must be a short tuple of (member id, version)")
        for item in self.down:
            if not isinstance(item, tuple) or len(item) != 2:
                raise WireError("down entries are (member id, version) pairs")
            mid, ver = item
            _check_int(ver, "down version", 0)
            if split_member_id(mid)[0] != self.cluster:
                raise WireError("down may only name members of the own cluster")
        if not isinstance(self.unreachable, tuple) or len(self.unreachable) > MAX_LIST_LEN:
            raise WireError("unreachable must be a tuple of cluster names")
        for c in self.unreachable:
            check_name(c, "unreachable cluster")
        _check_str(self.gateway, "gateway", MAX_NAME_LEN + 6)
        if not isinstance(self.rtt, tuple) or len(self.rtt) > MAX_LIST_LEN:
            raise WireError("rtt must be a tuple of (cluster, microseconds)")
        for item in self.rtt:
            if not isinstance(item, tuple) or len(item) != 2:
                raise WireError("rtt entries are (cluster, microseconds) pairs")
            check_name(item[0], "rtt cluster")
            _check_int(item[1], "rtt microseconds", 0)
        _check_str(self.host, "host", MAX_NAME_LEN)
        if ":" in self.host and not _is_ipv6(self.host):
            raise WireError("host is an address or a name, without a port")
        check_node_meta(self.node_meta)
        if not isinstance(self.left, tuple) or len(self.left) > MAX_DOWN_MEMBERS:
            raise WireError("left must be a short tuple of member ids")
        for mid in self.left:
            if split_member_id(mid)[0] != self.cluster:
                raise WireError("left may only name members of the own cluster")
        # Empty means unknown; anything else (including None or 0) must be a name.
        if self.region != "":
            check_name(self.region, "region")
        if self.zone != "":
            check_name(self.zone, "zone")
        _check_int(self.version, "version", 0)
        if not isinstance(self.apps, tuple) or len(self.apps) > MAX_APPS_PER_ORIGIN:
            raise WireError(f"an origin publishes at most {MAX_APPS_PER_ORIGIN} app records")
        seen = set()
        for rec in self.apps:
            if not isinstance(rec, AppRecord):
                raise WireError("apps must be AppRecord values")
            if rec.instance in seen:
                raise WireError(f"instance {rec.instance!r} appears twice")
            seen.add(rec.instance)

    @property
    def origin(self) -> str:
        """The document id: ``cluster/node``, plus ``#scope`` for a scoped one."""
        mid = member_id(self.cluster, self.node)
        return f"{mid}#{self.scope}" if self.scope else mid

    @property
    def member(self) -> str:
        return member_id(self.cluster, self.node)

    def encode(self) -> bytes:
        """The canonical body that gets signed.  Same state, same bytes."""
        doc: dict[str, Any] = {
            "n": self.node,
            "c": self.cluster,
            "r": self.region,
            "z": self.zone,
            "ver": self.version,
            "a": [rec.to_wire() for rec in self.apps],
        }
        # Optional keys only when set: bodies stay small and older fields keep
        # their exact bytes.
        if self.scope:
            doc["sc"] = self.scope
        if self.bridge:
            doc["b"] = True
        if self.down:
            doc["dn"] = [[mid, ver] for mid, ver in self.down]
        if self.unreachable:
            doc["ur"] = list(self.unreachable)
        if self.gateway:
            doc["gw"] = self.gateway
        if self.rtt:
            doc["rt"] = [[c, us] for c, us in self.rtt]
        if self.host:
            doc["h"] = self.host
        if self.node_meta:
            doc["nm"] = dict(self.node_meta)
        if self.left:
            doc["lf"] = list(self.left)
        body = _pack(doc)
        if len(body) > MAX_ORIGIN_BODY_BYTES:
            raise WireError(f"an origin state encodes to at most {MAX_ORIGIN_BODY_BYTES} bytes")
        return body

    @classmethod
    def decode(cls, body: bytes) -> OriginState:
        """Decode a signed body.  Raises WireError (only) on anything malformed."""
        raw = _signed_body(body, MAX_ORIGIN_BODY_BYTES, "origin state")
        if not isinstance(raw, dict):
            raise WireError("origin state body is not a map")
        apps = raw.get("a")
        if not isinstance(apps, list):
            raise WireError("origin state apps must be a list")
        try:
            return cls(
                node=raw["n"],
                cluster=raw["c"],
                region=raw["r"],
                zone=raw["z"],
                version=raw["ver"],
                apps=tuple(AppRecord.from_wire(a) for a in apps),
                scope=raw.get("sc", ""),
                bridge=raw.get("b", False),
                down=tuple(
                    tuple(x) if isinstance(x, list) else x
                    for x in _tuple_field(raw.get("dn", []), "down")
                ),
                unreachable=_tuple_field(raw.get("ur", []), "unreachable"),
                gateway=raw.get("gw", ""),
                rtt=tuple(
                    tuple(x) if isinstance(x, list) else x
                    for x in _tuple_field(raw.get("rt", []), "rtt")
                ),
                host=raw.get("h", ""),
                node_meta=_node_meta_field(raw.get("nm", {})),
                left=_tuple_field(raw.get("lf", []), "left"),
            )
        except KeyError as exc:
            raise WireError(f"origin state lacks field {exc.args[0]!r}") from None
        except TypeError as exc:  # e.g. meta keys mixing str and bytes cannot be sorted
            raise WireError(f"origin state malformed: {exc}") from None


_NODE_META_KEY = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_NODE_META_KEY}}}")


def check_node_meta(meta: object) -> tuple[tuple[str, str], ...]:
    """Node metadata as a document carries it; raises WireError past Consul's
    rules (letters, digits, ``_``, ``-``) and our caps.  ``meshd-`` keys are
    the agent's own (cluster, region, zone) and cannot be set."""
    if not isinstance(meta, tuple) or len(meta) > MAX_NODE_META_PAIRS:
        raise WireError(f"node meta must have at most {MAX_NODE_META_PAIRS} pairs")
    for pair in meta:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise WireError("node meta must be string pairs")
        k, v = pair
        if not isinstance(k, str) or not _NODE_META_KEY.fullmatch(k):
            raise WireError("node meta keys are letters, digits, '_' and '-'")
        if k.startswith(("meshd-", "consul-")):
            raise WireError(f"node meta key {k!r} is reserved")
        _check_str(v, "node meta value", MAX_NODE_META_VALUE)
    if list(meta) != sorted(dict(meta).items()):
        raise WireError("node meta keys must be unique and sorted")
    return meta


def _node_meta_field(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, dict) or len(raw) > MAX_NODE_META_PAIRS:
        raise WireError("node meta must be a short map")
    try:
        return tuple(sorted(raw.items()))
    except TypeError:
        raise WireError("node meta keys must be strings") from None


def _is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class SignedState:
    """An origin state as it travels: the signed body, the signature, the signer's cert.

    Immutable and shared: however many nodes (or simulated nodes) hold a state,
    it is one object.  ``origin`` and ``version`` are copies of what the body
    says, for digests and merging without decoding; the verifier checks they
    agree with the body before the state is accepted.
    """

    origin: str
    version: int
    body: bytes
    signature: bytes
    cert: bytes
    size: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_str(self.origin, "origin", MAX_ORIGIN_ID_LEN)
        _check_int(self.version, "version", 0)
        _check_bytes(self.body, "body", MAX_ORIGIN_BODY_BYTES)
        _check_bytes(self.signature, "signature", MAX_SIGNATURE_BYTES)
        _check_bytes(self.cert, "cert", MAX_CERT_BYTES)
        object.__setattr__(self, "size", len(_pack(self.to_wire())))

    def to_wire(self) -> list[Any]:
        return [self.origin, self.version, self.body, self.signature, self.cert]

    @classmethod
    def from_wire(cls, raw: Any) -> SignedState:
        if not isinstance(raw, list) or len(raw) < 5:
            raise WireError("a signed state is a list of 5 fields")
        return cls(*raw[:5])


# ---------------------------------------------------------------------------
# Membership updates: what gossip says about one member.


@dataclass(frozen=True, slots=True)
class MemberClaim:
    """What a member says about itself, and signs: alive or left at an incarnation.

    The body (:meth:`encode`) is canonical, so the same claim signs to the same
    bytes.  Only the member raises its own incarnation, and it signs each one,
    so a claim is the proof that an incarnation exists: no receiver takes an
    incarnation, address, region or zone for a member from anyone else.

    ``pool`` names the gossip pool the claim is for (``lan`` or ``wan``): a
    bridge is a member of both, with an incarnation and an address in each,
    and a claim copied from one pool into the other must not move it there.
    """

    status: Status
    member: str
    incarnation: int
    address: str
    region: str = ""
    zone: str = ""
    pool: str = "lan"

    def __post_init__(self) -> None:
        if self.status not in (Status.ALIVE, Status.LEFT):
            raise WireError("a member claims only alive or left about itself")
        _mid(self.member)
        _check_int(self.incarnation, "incarnation", 0)
        _check_str(self.address, "address", MAX_NAME_LEN + 6)
        host, sep, port = self.address.rpartition(":")
        if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise WireError("a claim's address is host:port with a port from 1 to 65535")
        _check_str(self.region, "region", MAX_NAME_LEN)
        _check_str(self.zone, "zone", MAX_NAME_LEN)
        if self.pool not in ("lan", "wan"):
            raise WireError("a claim's pool is 'lan' or 'wan'")

    def encode(self) -> bytes:
        return _pack(
            [
                int(self.status),
                self.member,
                self.incarnation,
                self.address,
                self.region,
                self.zone,
                self.pool,
            ]
        )

    @classmethod
    def decode(cls, body: bytes) -> MemberClaim:
        """Decode a signed body.  Raises WireError (only) on anything malformed."""
        raw = _signed_body(body, MAX_CLAIM_BODY_BYTES, "claim")
        if not isinstance(raw, list) or len(raw) != 7:
            raise WireError("a claim body is a list of 7 fields")
        status = raw[0]
        if type(status) is not int or status not in Status._value2member_map_:
            raise WireError("unknown member status")
        try:
            return cls(Status(status), *raw[1:7])
        except TypeError as exc:
            raise WireError(f"claim malformed: {exc}") from None


@dataclass(frozen=True, slots=True)
class SignedClaim:
    """A :class:`MemberClaim` as it travels: body, the member's signature, its cert.

    Immutable and shared like :class:`SignedState`; verified against the
    certificate it carries (which must name the claimed member), never against
    the neighbour that relayed it.
    """

    body: bytes
    signature: bytes
    cert: bytes
    size: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_bytes(self.body, "claim body", MAX_CLAIM_BODY_BYTES)
        _check_bytes(self.signature, "signature", MAX_SIGNATURE_BYTES)
        _check_bytes(self.cert, "cert", MAX_CERT_BYTES)
        object.__setattr__(self, "size", len(self.body) + len(self.signature) + len(self.cert) + 10)

    def to_wire(self) -> list[Any]:
        return [self.body, self.signature, self.cert]

    @classmethod
    def from_wire(cls, raw: Any) -> SignedClaim:
        if not isinstance(raw, list) or len(raw) < 3:
            raise WireError("a signed claim is a list of 3 fields")
        return cls(*raw[:3])


@dataclass(frozen=True, slots=True)
class MemberUpdate:
    """A claim about a member: its status at an incarnation, said by ``by``.

    ``member`` is the member id ``cluster/node``.  ``address`` is where it listens
    for gossip (``host:port``).  ``by`` names who suspects or declares it dead
    (independent confirmations are counted by distinct ``by``); for alive and
    left it is the member itself.

    ``claim`` is the member's own signed word (see :class:`MemberClaim`): an
    alive or left update carries it and is believed only through it; a
    suspect or dead update (an accusation) carries none and counts only at an
    incarnation the receiver already holds a signed claim for.
    """

    status: Status
    member: str
    incarnation: int
    address: str
    region: str = ""
    zone: str = ""
    by: str = ""
    claim: SignedClaim | None = None
    size: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.status, Status):
            raise WireError("status must be a Status")
        _mid(self.member)
        _check_int(self.incarnation, "incarnation", 0)
        _check_str(self.address, "address", MAX_NAME_LEN + 6)
        _check_str(self.region, "region", MAX_NAME_LEN)
        _check_str(self.zone, "zone", MAX_NAME_LEN)
        _check_str(self.by, "by", 2 * MAX_NAME_LEN + 1)
        if self.claim is not None and not isinstance(self.claim, SignedClaim):
            raise WireError("claim must be a SignedClaim or None")
        object.__setattr__(self, "size", len(_pack(self.to_wire())))

    @property
    def cluster(self) -> str:
        return self.member.partition("/")[0]

    def to_wire(self) -> list[Any]:
        return [
            int(self.status),
            self.member,
            self.incarnation,
            self.address,
            self.region,
            self.zone,
            self.by,
            None if self.claim is None else self.claim.to_wire(),
        ]

    @classmethod
    def from_wire(cls, raw: Any) -> MemberUpdate:
        if not isinstance(raw, list) or len(raw) < 7:
            raise WireError("a member update is a list of 7 fields")
        status = raw[0]
        if type(status) is not int or status not in Status._value2member_map_:
            raise WireError("unknown member status")
        claim = raw[7] if len(raw) > 7 else None
        return cls(
            Status(status),
            raw[1],
            raw[2],
            raw[3],
            raw[4],
            raw[5],
            raw[6],
            None if claim is None else SignedClaim.from_wire(claim),
        )


# ---------------------------------------------------------------------------
# Messages.  One base class; each subclass declares its type and field codecs.


def _updates_to_wire(updates: tuple[MemberUpdate, ...]) -> list[Any]:
    return [u.to_wire() for u in updates]


def _updates_from_wire(raw: Any) -> tuple[MemberUpdate, ...]:
    if not isinstance(raw, list):
        raise WireError("member updates must be a list")
    return tuple(MemberUpdate.from_wire(u) for u in raw)


def _states_to_wire(states: tuple[SignedState, ...]) -> list[Any]:
    return [s.to_wire() for s in states]


def _states_from_wire(raw: Any) -> tuple[SignedState, ...]:
    if not isinstance(raw, list):
        raise WireError("states must be a list")
    return tuple(SignedState.from_wire(s) for s in raw)


def _digest_from_wire(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise WireError("a digest must be a map")
    return dict(raw)  # entries are checked by Message.__post_init__ (_digest)


def _digest(x: Any) -> dict[str, int]:
    if not isinstance(x, dict) or len(x) > MAX_MAP_LEN:
        raise WireError(f"a digest must be a map of at most {MAX_MAP_LEN} entries")
    if _plain_digest(x):
        return x
    for k, v in x.items():
        _check_str(k, "digest origin", MAX_ORIGIN_ID_LEN)
        _check_int(v, "digest version", 0)
    return x


def _plain_digest(x: dict[Any, Any]) -> bool:
    """Every key an ASCII string within the origin length, every value a plain
    int from 0 to 2**63 - 1: what the per-entry checks of ``_digest`` accept
    first, tested with C-level passes over the map.  A sync digest lists a
    whole mesh (tens of thousands of entries), so this is what it costs to
    check one; anything else takes the per-entry loop, which says what is
    wrong."""
    if not x:
        return True
    values = x.values()
    return (
        set(map(type, x)) == {str}
        and set(map(type, values)) == {int}
        and max(map(len, x)) <= MAX_ORIGIN_ID_LEN
        and all(map(str.isascii, x))
        and min(values) >= 0
        and max(values) <= 2**63 - 1
    )


def _tuple_of(kind: type, what: str) -> Any:
    def check(x: Any) -> Any:
        if type(x) is tuple and not x:
            return x  # most messages carry nothing here: no loop to set up
        # A tuple, not a list: decoding yields tuples, and a list would make the
        # frozen message mutable and unequal to its own round trip.
        if not isinstance(x, tuple) or len(x) > MAX_LIST_LEN:
            raise WireError(f"{what} must be a tuple of at most {MAX_LIST_LEN}")
        for item in x:
            if not isinstance(item, kind):
                raise WireError(f"{what} must hold {kind.__name__} values")
        return x

    return check


def _opt_update(x: Any) -> Any:
    if x is not None and not isinstance(x, MemberUpdate):
        raise WireError("suspicion must be a MemberUpdate or None")
    return x


def _opt_update_from_wire(raw: Any) -> MemberUpdate | None:
    return None if raw is None else MemberUpdate.from_wire(raw)


def _opt_update_to_wire(update: MemberUpdate | None) -> Any:
    return None if update is None else update.to_wire()


def _same(x: Any) -> Any:
    return x


def _bool(x: Any) -> bool:
    if not isinstance(x, bool):
        raise WireError("expected a boolean")
    return x


def _seq(x: Any) -> int:
    if type(x) is int and 0 <= x <= 0xFFFFFFFF:
        return x  # every probe and ack checks one: the common case without a call
    return _check_int(x, "seq", 0, 2**32 - 1)


#: Member ids already found well formed.  Every message names one or more and
#: a mesh has few, so checking each once saves a regex match per field;
#: bounded so that a peer sending many distinct ids cannot grow it.
_CHECKED_MIDS: set[str] = set()


def _mid(x: Any) -> str:
    if type(x) is str and x in _CHECKED_MIDS:
        return x
    split_member_id(x)
    mid = str(x)
    if len(_CHECKED_MIDS) >= 65536:
        _CHECKED_MIDS.clear()
    _CHECKED_MIDS.add(mid)
    return mid


def _addr(x: Any) -> str:
    if type(x) is str and len(x) <= MAX_NAME_LEN + 6 and x.isascii():
        return x  # what _check_str accepts first, without the call
    return _check_str(x, "address", MAX_NAME_LEN + 6)


def _opt_list(x: Any) -> Any:
    return None if x is None else list(x)


def _opt_tuple(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _coord(x: Any) -> Any:
    if x is None:
        return None
    if (
        not isinstance(x, tuple)
        or not 3 <= len(x) <= MAX_COORD_LEN
        or not set(map(type, x)) <= {float}  # map() and set: no Python loop per value
        or not all(map(math.isfinite, x))
    ):
        raise WireError(f"coord must be 3 to {MAX_COORD_LEN} finite floats")
    return x


def _view(x: Any) -> int:
    return _check_int(x, "view", 0, 2**64 - 1)


def _records(x: Any) -> int:
    return _check_int(x, "records", 0, 2**64 - 1)


def _revocations(x: Any) -> int:
    return _check_int(x, "revocations", 0)


def _crl(x: Any) -> bytes:
    return _check_bytes(x, "crl", MAX_BIN_BYTES)


def _opt_mid(x: Any) -> str:
    # "" is the field default (not set); anything else must be a member id.
    return x if x == "" else _mid(x)


#: field name -> (wire key, to-wire, from-wire, check).  Keys are protocol.
#: from-wire only rebuilds structure; ``check`` validates the built value in
#: Message.__post_init__, so a message is checked once whether built or decoded.
_CODECS: dict[str, tuple[str, Any, Any, Any]] = {
    "seq": ("s", _same, _same, _seq),
    "source": ("f", _same, _same, _mid),
    "source_addr": ("fa", _same, _same, _addr),
    "target": ("to", _same, _same, _opt_mid),
    "target_addr": ("ta", _same, _same, _addr),
    "nack": ("nk", _same, _same, _bool),
    "join": ("j", _same, _same, _bool),
    "sync": ("sy", _same, _same, _bool),
    "suspicion": ("bd", _opt_update_to_wire, _opt_update_from_wire, _opt_update),
    "digest": ("d", _same, _digest_from_wire, _digest),
    "view": ("vw", _same, _same, _view),
    "records": ("rc", _same, _same, _records),
    "revocations": ("rn", _same, _same, _revocations),
    "crl": ("cr", _same, _same, _crl),
    "coord": ("co", _opt_list, _opt_tuple, _coord),
    "members": ("m", _updates_to_wire, _updates_from_wire, _tuple_of(MemberUpdate, "members")),
    "states": ("st", _states_to_wire, _states_from_wire, _tuple_of(SignedState, "states")),
}


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every gossip message.  ``source`` is the sender's member id."""

    TYPE: ClassVar[MsgType]
    source: str

    def __post_init__(self) -> None:
        # Validated when built, so our own bad message raises here rather than
        # being encoded and rejected by every peer.
        _mid(self.source)
        # The bare base class has no TYPE (0 is no message type) and no fields.
        for name, check in _CHECKS.get(getattr(type(self), "TYPE", 0), ()):
            check(getattr(self, name))


@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Direct probe of ``target``.  ``suspicion`` is the buddy-system warning."""

    TYPE: ClassVar[MsgType] = MsgType.PING
    seq: int = 0
    source_addr: str = ""
    target: str = ""
    suspicion: MemberUpdate | None = None
    members: tuple[MemberUpdate, ...] = ()
    states: tuple[SignedState, ...] = ()


@dataclass(frozen=True, slots=True)
class IndirectPing(Message):
    """Ask a helper to probe ``target`` for us and relay the ack (or a nack)."""

    TYPE: ClassVar[MsgType] = MsgType.INDIRECT_PING
    seq: int = 0
    source_addr: str = ""
    target: str = ""
    target_addr: str = ""
    nack: bool = True
    members: tuple[MemberUpdate, ...] = ()
    states: tuple[SignedState, ...] = ()


@dataclass(frozen=True, slots=True)
class Ack(Message):
    TYPE: ClassVar[MsgType] = MsgType.ACK
    seq: int = 0
    members: tuple[MemberUpdate, ...] = ()
    states: tuple[SignedState, ...] = ()
    #: The acker's network coordinate (vector..., error, height; seconds), so
    #: the prober can place it from the round trip it just measured.
    coord: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class Nack(Message):
    """A helper could not reach the target: evidence about the helper's link, not ours."""

    TYPE: ClassVar[MsgType] = MsgType.NACK
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Gossip(Message):
    """Piggyback-only message: membership updates and origin states."""

    TYPE: ClassVar[MsgType] = MsgType.GOSSIP
    members: tuple[MemberUpdate, ...] = ()
    states: tuple[SignedState, ...] = ()
    #: True when the states answer an anti-entropy sync: store, do not re-gossip.
    sync: bool = False


@dataclass(frozen=True, slots=True)
class PushPull(Message):
    """Anti-entropy opener: our record digest, and on a full sync our member list."""

    TYPE: ClassVar[MsgType] = MsgType.PUSH_PULL
    source_addr: str = ""
    join: bool = False
    digest: dict[str, int] = field(default_factory=dict)
    members: tuple[MemberUpdate, ...] = ()
    #: Fingerprint of the sender's member view; a mismatch asks for member lists.
    view: int = 0
    #: Fingerprint of the sender's record store (``store.record_term``), set
    #: only toward its own cluster; 0 when not given.  With an empty digest it
    #: is all the opener offers: a mismatch asks for the digest.
    records: int = 0
    #: Number of the CA revocation list the sender holds (0: none): a peer
    #: holding a higher one sends it (``Revocations``).
    revocations: int = 0


@dataclass(frozen=True, slots=True)
class PushPullReply(Message):
    """Anti-entropy answer: our digest, the states the opener lacks, our members."""

    TYPE: ClassVar[MsgType] = MsgType.PUSH_PULL_REPLY
    digest: dict[str, int] = field(default_factory=dict)
    members: tuple[MemberUpdate, ...] = ()
    states: tuple[SignedState, ...] = ()
    view: int = 0
    #: As ``PushPull.records``; with an empty digest: "my store matches yours".
    records: int = 0
    revocations: int = 0


@dataclass(frozen=True, slots=True)
class Revocations(Message):
    """The CA's revocation list (an X.509 CRL, DER), pushed to peers holding an older one.

    Signed by the CA, not by the sender: the receiver's driver verifies it.
    """

    TYPE: ClassVar[MsgType] = MsgType.REVOCATIONS
    crl: bytes = b""


MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Ping, IndirectPing, Ack, Nack, Gossip, PushPull, PushPullReply, Revocations)
}


def _fields(cls: type[Message]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("source", "size"))


_FIELD_CACHE = {t: _fields(c) for t, c in MESSAGE_CLASSES.items()}
#: Per message type, (field, validator) pairs: every message is checked when built.
_CHECKS = {t: tuple((n, _CODECS[n][3]) for n in names) for t, names in _FIELD_CACHE.items()}

#: validator -> a test of the field's value ``x`` that holds only where the
#: validator accepts ``x`` without raising and without a side effect (the
#: common case: a short ASCII address, a seq in range, a known member id, an
#: empty tuple).  Where it does not hold, the validator itself runs, so a
#: message is accepted or refused exactly as by the plain loop of
#: ``Message.__post_init__`` (tests/test_wire.py compares the two).
_FAST_ACCEPT: dict[Any, str] = {
    _mid: "type(x) is str and x in _CHECKED_MIDS",
    _seq: "type(x) is int and 0 <= x <= 0xFFFFFFFF",
    _addr: f"type(x) is str and len(x) <= {MAX_NAME_LEN + 6} and x.isascii()",
    _opt_mid: 'x == "" or (type(x) is str and x in _CHECKED_MIDS)',
    _bool: "x is True or x is False",
    _opt_update: "x is None",
    # Floats only, and a finite sum: then none is infinite or NaN (either
    # would make the sum so).  A sum that overflows takes the full check.
    _coord: f"x is None or (type(x) is tuple and 3 <= len(x) <= {MAX_COORD_LEN}"
    " and set(map(type, x)) <= _FLOATS and _isfinite(sum(x)))",
    _view: f"type(x) is int and 0 <= x <= {2**64 - 1}",
    _records: f"type(x) is int and 0 <= x <= {2**64 - 1}",
    _revocations: f"type(x) is int and 0 <= x <= {2**63 - 1}",
    _CODECS["members"][3]: "type(x) is tuple and not x",
    _CODECS["states"][3]: "type(x) is tuple and not x",
}


def _post_init_of(cls: type[Message]) -> Any:
    """``cls.__post_init__``: the checks of ``_CHECKS`` for its type, spelled out.

    Every message we build runs its checks (a few per probe and ack), so
    each type gets one function, generated at import as wiresize.py does for
    sizes: per field, the validator's common case tested inline, the
    validator called otherwise.  Same checks, same order, same errors.
    """
    ns: dict[str, Any] = {
        "_CHECKED_MIDS": _CHECKED_MIDS,
        "_FLOATS": frozenset({float}),
        "_isfinite": math.isfinite,
    }
    lines = ["def __post_init__(self):"]
    for k, (name, check) in enumerate((("source", _mid), *_CHECKS[cls.TYPE])):
        ns[f"_check{k}"] = check
        lines.append(f"    x = self.{name}")
        fast = _FAST_ACCEPT.get(check)
        if fast is None:
            lines.append(f"    _check{k}(x)")
        else:
            lines.append(f"    if not ({fast}):")
            lines.append(f"        _check{k}(x)")
    exec(compile("\n".join(lines) + "\n", f"<wire checks {cls.__name__}>", "exec"), ns)
    return ns["__post_init__"]


def _message_checks(msg: Message) -> None:
    """The plain loop the generated checks must equal (kept for the tests)."""
    Message.__post_init__(msg)


def _slot_setter(cls: type[Message], name: str) -> Any:
    """The setter of field ``name``'s slot (on ``cls`` or the base declaring it)."""
    return next(c.__dict__[name] for c in cls.__mro__ if name in c.__dict__).__set__


def _init_of(cls: type[Message]) -> Any:
    """``cls.__init__`` as the dataclass writes it (same parameters, defaults
    and default factories, then ``__post_init__``), setting each field
    through its slot's own setter instead of ``object.__setattr__`` with the
    field's name: a third less time to build a probe or an ack."""
    ns: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    params, body = [], []
    for k, f in enumerate(dataclasses.fields(cls)):
        ns[f"_set{k}"] = _slot_setter(cls, f.name)
        if f.default is not dataclasses.MISSING:
            ns[f"_default{k}"] = f.default
            params.append(f"{f.name}=_default{k}")
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_factory{k}"] = f.default_factory
            params.append(f"{f.name}=_MISSING")
            body.append(f"    if {f.name} is _MISSING:")
            body.append(f"        {f.name} = _factory{k}()")
        else:
            params.append(f.name)
        body.append(f"    _set{k}(self, {f.name})")
    body.append("    self.__post_init__()")
    src = f"def __init__(self, {', '.join(params)}):\n" + "\n".join(body) + "\n"
    exec(compile(src, f"<wire init {cls.__name__}>", "exec"), ns)
    init = ns["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _unchecked_of(cls: type[Message]) -> Any:
    """A function building a ``cls`` from all its fields, positionally, that
    skips the checks (see :func:`unchecked`)."""
    ns: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    names = [f.name for f in dataclasses.fields(cls)]
    body = ["    m = _new(_cls)"]
    for k, name in enumerate(names):
        ns[f"_set{k}"] = _slot_setter(cls, name)
        body.append(f"    _set{k}(m, {name})")
    body.append("    return m")
    src = f"def build_{cls.__name__}({', '.join(names)}):\n" + "\n".join(body) + "\n"
    exec(compile(src, f"<wire unchecked {cls.__name__}>", "exec"), ns)
    return ns[f"build_{cls.__name__}"]


_M = TypeVar("_M", bound=Message)


def unchecked(cls: type[_M]) -> Callable[..., _M]:
    """A builder of ``cls`` taking every field positionally, in declaration
    order, that does not run the checks of ``__post_init__``.

    Only for a core's own probes and acks, built many times a second from
    values it checked already (its id and address, checked when it built its
    own claim; member ids from its table; updates and states from its
    queues; a sequence number it masked; its Vivaldi coordinate, checked by
    ``vivaldi.update``).  Whatever a peer sends is checked when decoded, as
    decoding builds through the checked ``__init__``.
    """
    return cast(Callable[..., _M], _UNCHECKED[cls])


#: The dataclass's own ``__init__`` of each type (the tests compare against them).
_DATACLASS_INITS = {cls: cls.__init__ for cls in MESSAGE_CLASSES.values()}
_UNCHECKED = {cls: _unchecked_of(cls) for cls in MESSAGE_CLASSES.values()}

for _cls in MESSAGE_CLASSES.values():
    # The dataclass __init__ looks __post_init__ up on the class when it runs.
    _cls.__post_init__ = _post_init_of(_cls)  # type: ignore[method-assign]
    _cls.__init__ = _init_of(_cls)  # type: ignore[method-assign]
del _cls


# ---------------------------------------------------------------------------
# Encoding and decoding.


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why bytes from a peer were refused.  ``reason`` is a short metric label."""

    reason: str
    detail: str = ""


def _pack(obj: Any) -> bytes:
    # msgpack ships no type information, so its packb is untyped; it returns bytes.
    body: bytes = msgpack.packb(obj, use_bin_type=True)
    return body


def _unpack(data: bytes) -> Any:
    # The caps make msgpack refuse oversized containers before allocating them.
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_str_len=MAX_STR_BYTES,
        max_bin_len=MAX_BIN_BYTES,
        max_array_len=MAX_LIST_LEN,
        max_map_len=MAX_MAP_LEN,
        max_ext_len=0,
    )


def message_to_wire(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"v": WIRE_VERSION, "t": int(msg.TYPE), "f": msg.source}
    for name in _FIELD_CACHE[msg.TYPE]:
        key, enc, _, _ = _CODECS[name]
        out[key] = enc(getattr(msg, name))
    return out


def encode_message(msg: Message) -> bytes:
    """The msgpack body of one message (no length prefix)."""
    body = _pack(message_to_wire(msg))
    if len(body) > MAX_FRAME_BYTES:
        raise WireError(f"message of {len(body)} bytes exceeds the frame limit")
    return body


def encode_frame(msg: Message) -> bytes:
    """A whole frame: length prefix and body."""
    body = encode_message(msg)
    return _LEN.pack(len(body)) + body


def decode_message(body: bytes) -> Message | Rejection:
    """Decode one frame body.  Never raises on peer input."""
    if len(body) > MAX_FRAME_BYTES:
        return Rejection("oversized", f"{len(body)} bytes")
    try:
        raw = _unpack(body)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        return Rejection("undecodable", type(exc).__name__)
    except Exception as exc:  # msgpack raises assorted types on hostile input
        return Rejection("undecodable", type(exc).__name__)
    if not isinstance(raw, dict):
        return Rejection("malformed", "frame is not a map")
    version = raw.get("v")
    # type() is int, not isinstance: True and 1.0 compare equal to 1 but are not it.
    if type(version) is not int or version != WIRE_VERSION:
        return Rejection("bad-version", repr(version)[:32])
    mtype = raw.get("t")
    cls = MESSAGE_CLASSES.get(mtype) if type(mtype) is int else None
    if cls is None:
        return Rejection("unknown-type", repr(mtype)[:32])
    kwargs: dict[str, Any] = {"source": raw.get("f")}
    try:
        for name in _FIELD_CACHE[cls.TYPE]:
            key, _, dec, _ = _CODECS[name]
            if key in raw:
                kwargs[name] = dec(raw[key])
        return cls(**kwargs)
    except (WireError, TypeError, ValueError) as exc:
        return Rejection("malformed", str(exc)[:120])


def message_size(msg: Message) -> int:
    """Bytes this message takes on the wire, length prefix included."""
    return _LEN.size + len(encode_message(msg))


class FrameDecoder:
    """Splits a byte stream into frames (sans-IO: feed bytes, pull results).

    An oversized length prefix is reported at once, before its body arrives,
    so the driver can close the connection without buffering anything.  After
    such an error the decoder is ``closed`` and ignores further input.

    A partial frame holds only the bytes received so far, never its declared
    length: a peer announcing 1 MiB and sending 10 bytes costs 10 bytes.  They
    are kept as the pieces they arrived in and joined once, when the frame is
    complete: a growing buffer would be copied to ever larger blocks as it
    fills, and hundreds of slowly filling buffers fragment the heap until the
    process holds far more memory than the bytes they contain.
    """

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._pieces: list[bytes] = []  # unconsumed input, in arrival order
        self._offset = 0  # bytes of _pieces[0] already consumed
        self._pending = 0  # unconsumed bytes in all pieces
        self._max = max_frame
        self.closed = False
        #: Frame sizes (prefix included) of the results of the last ``feed``
        #: or ``split``, in the same order, for byte accounting without
        #: re-encoding.
        self.sizes: list[int] = []

    def feed(self, data: bytes) -> list[Message | Rejection]:
        return [
            decode_message(body) if isinstance(body, bytes) else body for body in self.split(data)
        ]

    def split(self, data: bytes) -> list[bytes | Rejection]:
        """The complete frame bodies in ``data``, undecoded, so a driver can
        refuse a frame (a rate limit) before paying for its decoding."""
        self.sizes = []
        if self.closed:
            return []
        self._add(bytes(data))
        out: list[bytes | Rejection] = []
        while self._pending >= _LEN.size:
            (length,) = _LEN.unpack(self._peek(_LEN.size))
            if length > self._max:
                self.closed = True
                self._pieces, self._offset, self._pending = [], 0, 0
                out.append(Rejection("oversized", f"length prefix {length}"))
                self.sizes.append(_LEN.size)
                break
            if self._pending < _LEN.size + length:
                break
            self._consume(_LEN.size)
            out.append(self._consume(length))
            self.sizes.append(_LEN.size + length)
        if self._offset > _SMALL_PIECE:
            # What is left shares a piece with frames already taken: keep it alone.
            self._pieces[0] = self._pieces[0][self._offset :]
            self._offset = 0
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered for an incomplete frame (a truncated frame at EOF)."""
        return self._pending

    def _add(self, data: bytes) -> None:
        if not data:
            return
        pieces = self._pieces
        if pieces and len(data) < _SMALL_PIECE and len(pieces[-1]) < _SMALL_PIECE:
            # Trickled bytes: a few pieces, not an object per byte.
            pieces[-1] += data
        else:
            pieces.append(data)
        self._pending += len(data)

    def _peek(self, n: int) -> bytes:
        """The next ``n`` (<= pending) bytes, not consumed."""
        first = self._pieces[0]
        if len(first) - self._offset >= n:
            return first[self._offset : self._offset + n]
        head = bytearray(first[self._offset :])
        for piece in self._pieces[1:]:
            head += piece[: n - len(head)]
            if len(head) >= n:
                break
        return bytes(head)

    def _consume(self, n: int) -> bytes:
        """Take the next ``n`` (<= pending) bytes, joined into one object."""
        if n == 0:
            return b""
        pieces = self._pieces
        parts: list[memoryview] = []
        need = n
        used = 0  # pieces emptied
        while need:
            piece = pieces[used]
            avail = len(piece) - self._offset
            if avail <= need:
                parts.append(memoryview(piece)[self._offset :])
                need -= avail
                used += 1
                self._offset = 0
            else:
                parts.append(memoryview(piece)[self._offset : self._offset + need])
                self._offset += need
                need = 0
        del pieces[:used]
        self._pending -= n
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)


#: Pieces under this size are merged as they arrive (a trickle costs no
#: object per byte), and a remainder is copied out of a piece once more than
#: this much of it was consumed (a partial frame holds about what it received).
_SMALL_PIECE = 4096
