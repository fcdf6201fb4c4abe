"""The DNS interface: Consul's names answered from the locality policy.

Two halves, like the rest of the agent.  :func:`answer` is sans-IO: it turns
one parsed query into one response using only :class:`AgentAPI` (``resolve``,
``app_names``, ``members``, ``clusters``), so it is tested with a fake agent
and no sockets.  :func:`render` turns that response into bytes for a
transport, trimming it to the UDP size the asker can take.  :class:`DNSServer`
is the thin asyncio driver: one UDP endpoint and one TCP listener on the same
port, each bounded (see the caps below and docs/dns.md).

Names (``<domain>`` is ``consul`` unless ``--dns-domain`` says otherwise;
brackets are optional parts)::

    [<tag>.]<app>.service[.<ns>.ns][.<cluster>.dc].<domain>
    [<tag>.]<app>.service.<cluster>.<domain>          Consul's older cluster form
    _<app>._<tag>.service[...].<domain>                RFC 2782; _tcp means any tag
    <node>.node[.<cluster>[.dc]].<domain>

What must stay true:

- Only healthy endpoints are answered (passing or warning, as Consul's
  default ``only_passing = false``), in the order ``resolve`` gave them: the
  policy's locality order, never shuffled.  Without a cluster in the name the
  answer is the policy's active set (standbys left out); with one, every
  healthy endpoint of that cluster.
- NXDOMAIN when the name can hold no answer: an unknown app, or one whose
  endpoints are all unhealthy or filtered out (Consul has done so since its
  GH-1143, so that resolvers do not cache an empty answer as "exists"), an
  unknown node or cluster, a name of no known form.  NOERROR with no records
  when the name is answered but not with that type (AAAA of an IPv4-only app,
  TXT).  Negative answers carry the zone's SOA in the authority section.
- Names outside the domain are REFUSED: the agent is no recursor.
- Nothing a client sends raises out of here: a query we cannot understand is
  answered FORMERR/NOTIMP/REFUSED, an agent failure SERVFAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from meshd.agent.interface import AgentAPI, Endpoint
from meshd.agent.ratelimit import TokenBucket
from meshd.api.consul import TAGS_KEY, decode_tags
from meshd.metrics import Metrics

__all__ = [
    "DEFAULT_DOMAIN",
    "DEFAULT_TTL",
    "MAX_ANSWERS",
    "MAX_QUERY_BYTES",
    "MAX_TCP_CONNECTIONS",
    "MAX_TTL",
    "MAX_UDP_PAYLOAD",
    "MIN_UDP_PAYLOAD",
    "QUERY_BURST",
    "QUERY_RATE",
    "TCP_IDLE_TIMEOUT",
    "DNSConfig",
    "DNSServer",
    "answer",
    "check_domain",
    "render",
]

log = logging.getLogger("meshd.api.dns")

#: Consul's DNS domain, so clients and forwarders configured for Consul work.
DEFAULT_DOMAIN = "consul"
#: Seconds a client may cache an answer.  0 as Consul's ``service_ttl`` and
#: ``node_ttl`` defaults: an answer is never older than the mesh's own view,
#: so a dead instance leaves DNS answers as fast as it leaves ``resolve``.
DEFAULT_TTL = 0
#: Largest TTL accepted (one day): a discovery answer cached longer outlives
#: any failure it should route around.
MAX_TTL = 86400
#: Records of one kind in one answer (Consul's ``a_record_limit``; ours is
#: never unlimited): the first ones in policy order are kept, the rest cut
#: silently, as Consul does.  64 SRV records with glue fill ~4 KB.
MAX_ANSWERS = 64
#: Classic DNS UDP size (RFC 1035) and the EDNS size we accept at most: 1232
#: is the 2020 DNS flag day's value, which fits any path's MTU unfragmented.
MIN_UDP_PAYLOAD = 512
MAX_UDP_PAYLOAD = 1232
#: Largest query accepted, over UDP or TCP.  A query is one question (a name
#: of at most 255 bytes) and perhaps an EDNS record: a few hundred bytes.
MAX_QUERY_BYTES = 1024
#: TCP connections open at once; a new one past it is closed at once.  DNS
#: over TCP is the fallback after a truncated UDP answer, one short exchange.
MAX_TCP_CONNECTIONS = 128
#: A TCP connection that sends no complete query for this long is closed
#: (RFC 7766 asks for seconds, not minutes); it also bounds a slow writer.
TCP_IDLE_TIMEOUT = 10.0
#: Queries per second the server answers, UDP and TCP together, and the
#: burst: an answer costs tens of microseconds of the agent's one event loop,
#: so this keeps a flood from starving gossip.  Excess is dropped unanswered.
QUERY_RATE = 2000.0
QUERY_BURST = 4000.0
#: SOA timers (Consul's defaults); the minimum (negative-cache TTL) is the TTL.
SOA_REFRESH, SOA_RETRY, SOA_EXPIRE = 3600, 600, 86400

#: Query types counted by name in ``meshd_dns_queries_total``; any other is
#: "other", so a client cannot grow the label set.
_COUNTED_TYPES = frozenset({"A", "AAAA", "SRV", "ANY", "SOA", "NS", "TXT", "PTR", "CNAME", "MX"})
#: The bytes a label of a name we answer may hold (meshd names, '_' of RFC 2782).
_LABEL_RE = re.compile(rb"[A-Za-z0-9_\-]{1,63}")
_DOMAIN_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?")
_IN = dns.rdataclass.IN


def check_domain(value: str) -> str:
    """The domain as answered (lower case, no trailing dot), or ValueError (one sentence)."""
    text = value.strip().rstrip(".").lower() if isinstance(value, str) else ""
    labels = text.split(".") if text else []
    if not labels or len(text) > 200 or not all(_DOMAIN_LABEL_RE.fullmatch(x) for x in labels):
        raise ValueError(
            "the DNS domain must be labels of letters, digits and '-' separated by dots"
            f" (at most 200 characters), such as consul or mesh.example, not {value!r:.60}"
        )
    return text


@dataclass(frozen=True, slots=True)
class DNSConfig:
    """How the DNS interface answers.  Built from ``--dns-domain`` and ``--dns-ttl``."""

    #: The zone answered, without a trailing dot.
    domain: str = DEFAULT_DOMAIN
    #: TTL of every record, positive and negative (seconds).
    ttl: int = DEFAULT_TTL
    #: Records of one type in one answer (see MAX_ANSWERS).
    max_answers: int = MAX_ANSWERS
    origin: dns.name.Name = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "domain", check_domain(self.domain))
        if not (isinstance(self.ttl, int) and 0 <= self.ttl <= MAX_TTL):
            raise ValueError(f"the DNS TTL must be 0-{MAX_TTL} seconds, not {self.ttl!r}")
        if not 1 <= self.max_answers <= 1000:
            raise ValueError("max_answers must be 1-1000")
        object.__setattr__(self, "origin", dns.name.from_text(self.domain + "."))


# ---------------------------------------------------------------------------
# Names.


@dataclass(frozen=True, slots=True)
class _Service:
    """``[tag.]app.service[.ns.ns][.cluster[.dc]]``; ``prefix`` holds tag and app unsplit."""

    prefix: tuple[str, ...]
    rfc2782_tag: str | None  # the tag of _app._tag (None: not that form; "": _tcp)
    namespace: str
    cluster: str | None


@dataclass(frozen=True, slots=True)
class _Node:
    node: str
    cluster: str | None


@dataclass(frozen=True, slots=True)
class _Addr:
    """``<hex>.addr[.<cluster>]``: the SRV target of an address no node name can stand for."""

    address: str


@dataclass(frozen=True, slots=True)
class _Apex:
    """The domain itself: SOA and NS live here."""


_Parsed = _Service | _Node | _Addr | _Apex | None  # None: a name of no form we answer


def _parse(labels: tuple[str, ...]) -> _Parsed:
    """The lookup a name (relative to the domain, lower case) asks for."""
    if not labels:
        return _Apex()
    if 2 <= len(labels) <= 4 and labels[1] == "addr":
        return _addr(labels[0])
    for keyword in ("service", "node"):
        # The last occurrence: names before it may themselves be "service".
        if keyword not in labels:
            continue
        at = len(labels) - 1 - labels[::-1].index(keyword)
        prefix, suffix = labels[:at], labels[at + 1 :]
        if not prefix:
            return None
        namespace, cluster = _tenancy(suffix, allow_namespace=keyword == "service")
        if keyword == "node":
            return _Node(".".join(prefix), cluster)
        tag = None
        if len(prefix) == 2 and prefix[0].startswith("_") and prefix[1].startswith("_"):
            app, proto = prefix[0][1:], prefix[1][1:]
            if not app or not proto:
                return None
            prefix, tag = (app,), ("" if proto == "tcp" else proto)
        return _Service(prefix, tag, namespace, cluster)
    return None


def _addr(label: str) -> _Addr | None:
    """The IP address in a label of 8 (IPv4) or 32 (IPv6) hex digits, as Consul encodes it."""
    if len(label) not in (8, 32):
        return None
    try:
        packed = bytes.fromhex(label)
    except ValueError:
        return None
    return _Addr(str(ipaddress.ip_address(packed)))


def _tenancy(suffix: tuple[str, ...], allow_namespace: bool) -> tuple[str, str | None]:
    """(namespace, cluster) of the labels after ``service``/``node``.

    ``[<ns>.ns][.<cluster>.dc]`` as Consul Enterprise spells it, or the older
    bare ``<cluster>``.  Names may hold dots, so each part is the labels up to
    its keyword.
    """
    namespace = "default"
    rest = suffix
    if allow_namespace and "ns" in rest[1:]:
        at = rest.index("ns", 1)
        namespace, rest = ".".join(rest[:at]), rest[at + 1 :]
    if len(rest) > 1 and rest[-1] == "dc":
        rest = rest[:-1]
    cluster = ".".join(rest) if rest else None
    return namespace, cluster


# ---------------------------------------------------------------------------
# The answer.


class _Reply:
    """A response under construction, with the config it is built for."""

    def __init__(self, query: dns.message.Message, cfg: DNSConfig, serial: int) -> None:
        self.cfg = cfg
        self.serial = serial % 2**32
        self.msg = dns.message.make_response(query, our_payload=MAX_UDP_PAYLOAD)
        self.msg.flags |= dns.flags.AA
        self.msg.flags &= ~dns.flags.RA

    def rcode(self, code: dns.rcode.Rcode) -> dns.message.Message:
        self.msg.set_rcode(code)
        return self.msg

    def negative(self, code: dns.rcode.Rcode) -> dns.message.Message:
        """NXDOMAIN or an empty NOERROR, with the SOA that says how long to cache it."""
        self.msg.authority.append(self.soa_rrset())
        return self.rcode(code)

    def soa_rrset(self, name: dns.name.Name | None = None) -> dns.rrset.RRset:
        """The zone's SOA, owned by ``name`` (default: the zone itself)."""
        origin = self.cfg.origin
        soa = _rdata(
            dns.rdatatype.SOA,
            f"ns.{origin} hostmaster.{origin} {self.serial}"
            f" {SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {self.cfg.ttl}",
        )
        rrset = dns.rrset.RRset(name or origin, _IN, dns.rdatatype.SOA)
        rrset.add(soa, self.cfg.ttl)
        return rrset

    def add(self, section: list[dns.rrset.RRset], name: dns.name.Name, rd: dns.rdata.Rdata) -> None:
        """Add a record to the RRset of its name and type (created in first-seen order)."""
        for rrset in section:
            if rrset.name == name and rrset.rdtype == rd.rdtype:
                rrset.add(rd, self.cfg.ttl)
                return
        rrset = dns.rrset.RRset(name, _IN, rd.rdtype)
        rrset.add(rd, self.cfg.ttl)
        section.append(rrset)


def _ip_rdata(address: str) -> dns.rdata.Rdata | None:
    """An A or AAAA record of ``address``, or None when it is not an IP address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    v4 = isinstance(ip, ipaddress.IPv4Address)
    return _rdata(dns.rdatatype.A if v4 else dns.rdatatype.AAAA, str(ip))


def _rdata(rdtype: dns.rdatatype.RdataType, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(_IN, rdtype, text)


def _wants(qtype: int, rd: dns.rdata.Rdata) -> bool:
    return qtype == rd.rdtype or (
        qtype == dns.rdatatype.ANY and rd.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
    )


def _host_of(address: str) -> str:
    """The host of a member's ``HOST:PORT`` (``[v6]:port`` too)."""
    if address.startswith("["):
        return address[1 : address.find("]")]
    host, sep, _ = address.rpartition(":")
    return host if sep else address


def _name(*parts: str, origin: dns.name.Name) -> dns.name.Name | None:
    """``parts.origin`` as a name, or None when it cannot be one (too long)."""
    try:
        return dns.name.from_text(".".join(parts), origin=origin)
    except dns.exception.DNSException:
        return None


def answer(
    query: dns.message.Message, agent: AgentAPI, config: DNSConfig | None = None
) -> dns.message.Message:
    """The response to ``query``.  Raises only on a bug of ours, never on client input."""
    cfg = config or DNSConfig()
    reply = _Reply(query, cfg, agent.index)
    if query.opcode() != dns.opcode.QUERY:
        return reply.rcode(dns.rcode.NOTIMP)
    if len(query.question) != 1:
        return reply.rcode(dns.rcode.FORMERR)
    q = query.question[0]
    if q.rdclass not in (dns.rdataclass.IN, dns.rdataclass.ANY):
        return reply.rcode(dns.rcode.REFUSED)
    if not q.name.is_subdomain(cfg.origin):
        return reply.rcode(dns.rcode.REFUSED)
    if q.rdtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
        return reply.rcode(dns.rcode.REFUSED)  # no zone transfers: the zone is computed
    relative = q.name.relativize(cfg.origin).labels
    if relative == (b"@",) or relative == ():
        relative = ()
    if not all(_LABEL_RE.fullmatch(label) for label in relative):
        return reply.negative(dns.rcode.NXDOMAIN)
    parsed = _parse(tuple(label.decode("ascii").lower() for label in relative))
    if isinstance(parsed, _Apex):
        return _apex(reply, agent, q.name, q.rdtype)
    if q.rdtype in (dns.rdatatype.SOA, dns.rdatatype.NS):
        # Consul answers the zone's SOA and NS whatever name in it is asked.
        return _apex(reply, agent, cfg.origin, q.rdtype)
    if parsed is None:
        return reply.negative(dns.rcode.NXDOMAIN)
    if isinstance(parsed, _Addr):
        rd = _ip_rdata(parsed.address)
        assert rd is not None
        if not _wants(q.rdtype, rd):
            return reply.negative(dns.rcode.NOERROR)
        reply.add(reply.msg.answer, q.name, rd)
        return reply.msg
    if parsed.cluster is not None and not _known_cluster(agent, parsed.cluster):
        return reply.negative(dns.rcode.NXDOMAIN)
    if isinstance(parsed, _Node):
        return _node(reply, agent, parsed, q.name, q.rdtype)
    return _service(reply, agent, parsed, q.name, q.rdtype)


def _known_cluster(agent: AgentAPI, cluster: str) -> bool:
    names = {agent.cluster.lower()} | {c.cluster.lower() for c in agent.clusters()}
    return cluster in names


def _cluster_name(agent: AgentAPI, cluster: str | None) -> str:
    """The cluster's name as the agent spells it (DNS names come lower-cased)."""
    if cluster is None:
        return agent.cluster
    for name in [agent.cluster, *(c.cluster for c in agent.clusters())]:
        if name.lower() == cluster:
            return name
    return cluster


def _apex(reply: _Reply, agent: AgentAPI, qname: dns.name.Name, qtype: int) -> dns.message.Message:
    msg, cfg = reply.msg, reply.cfg
    if qtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
        msg.answer.append(reply.soa_rrset(qname))
    if qtype in (dns.rdatatype.NS, dns.rdatatype.ANY):
        # The agent answers for the zone itself: its own node name is the server.
        target = _name(agent.node_name, "node", agent.cluster, origin=cfg.origin)
        if target is not None:
            reply.add(msg.answer, qname, _rdata(dns.rdatatype.NS, target.to_text()))
            for member in agent.members(agent.cluster):
                if member.node == agent.node_name:
                    rd = _ip_rdata(_host_of(member.address))
                    if rd is not None:
                        reply.add(msg.additional, target, rd)
    if not msg.answer:
        return reply.negative(dns.rcode.NOERROR)
    return msg


def _node(
    reply: _Reply, agent: AgentAPI, want: _Node, qname: dns.name.Name, qtype: int
) -> dns.message.Message:
    cluster = _cluster_name(agent, want.cluster)
    found = [
        m
        for m in agent.members(cluster)
        if m.node.lower() == want.node and m.status in ("alive", "suspect")
    ]
    if not found:
        return reply.negative(dns.rcode.NXDOMAIN)
    rd = _ip_rdata(_host_of(found[0].address))
    if rd is None or not _wants(qtype, rd):
        return reply.negative(dns.rcode.NOERROR)
    reply.add(reply.msg.answer, qname, rd)
    return reply.msg


def _endpoints(agent: AgentAPI, want: _Service) -> list[Endpoint]:
    """Healthy endpoints the name asks for, in the policy's order."""
    names = agent.app_names()
    # Every (namespace, app) the name could mean: DNS is case-insensitive,
    # meshd names are not, so apps differing only in case are answered together.
    candidates: list[tuple[str, str, str | None]] = []  # (namespace, app, tag)
    for namespace, apps in sorted(names.items()):
        if namespace.lower() != want.namespace:
            continue
        whole = ".".join(want.prefix)
        for app in sorted(apps):
            if app.lower() == whole:
                candidates.append((namespace, app, want.rfc2782_tag or None))
            elif (
                # <tag>.<app>: the first label is a tag, unless the whole
                # prefix names an app (a meshd name may hold dots).
                want.rfc2782_tag is None
                and len(want.prefix) > 1
                and app.lower() == ".".join(want.prefix[1:])
            ):
                candidates.append((namespace, app, want.prefix[0]))
    exact = [c for c in candidates if c[2] is None]
    rows: list[Endpoint] = []
    for namespace, app, tag in exact or candidates:
        _, endpoints = agent.resolve(app, namespace, None, include_unhealthy=False)
        for e in endpoints:
            if e.health not in ("passing", "warning") or not e.reachable:
                continue
            if tag is not None and tag not in (
                t.lower() for t in decode_tags(e.meta.get(TAGS_KEY))
            ):
                continue
            rows.append(e)
    if want.cluster is not None:
        return [e for e in rows if e.cluster.lower() == want.cluster]
    # The policy's active set; standbys only if it has none (never in practice:
    # the policy activates the best healthy endpoints first).
    active = [e for e in rows if e.active]
    return active or rows


def _priorities(endpoints: Iterable[Endpoint]) -> list[int]:
    """SRV priority of each endpoint: 1 for the best tier present, then 2, ...

    RFC 2782 clients try lower priorities first and spread by weight within
    one, so this carries the policy's locality order to clients that reorder.
    """
    out: list[int] = []
    rank = 0
    last: str | None = None
    for e in endpoints:
        if e.tier != last:
            rank, last = rank + 1, e.tier
        out.append(min(rank, 65535))
    return out


def _service(
    reply: _Reply, agent: AgentAPI, want: _Service, qname: dns.name.Name, qtype: int
) -> dns.message.Message:
    endpoints = _endpoints(agent, want)
    if not endpoints:
        return reply.negative(dns.rcode.NXDOMAIN)
    msg, cfg = reply.msg, reply.cfg
    limit = cfg.max_answers
    if qtype == dns.rdatatype.SRV:
        # A node name stands for one address; a node whose endpoints here have
        # several (one per interface, a gateway) gets address targets instead.
        addresses: dict[tuple[str, str], set[str]] = {}
        for e in endpoints:
            addresses.setdefault((e.cluster, e.node), set()).add(e.address)
        count = 0
        for e, priority in zip(endpoints, _priorities(endpoints), strict=True):
            if count == limit:
                break
            rd = _ip_rdata(e.address)
            if rd is None:  # a host name: the target itself, for the client to resolve
                target = _name(e.address, origin=dns.name.root)
            elif len(addresses[(e.cluster, e.node)]) == 1:
                target = _name(e.node, "node", e.cluster, origin=cfg.origin)
            else:
                hexed = ipaddress.ip_address(e.address).packed.hex()
                target = _name(hexed, "addr", e.cluster, origin=cfg.origin)
            if target is None:
                continue
            weight = max(0, min(e.weight, 65535))
            srv = _rdata(dns.rdatatype.SRV, f"{priority} {weight} {e.port} {target.to_text()}")
            reply.add(msg.answer, qname, srv)
            if rd is not None:
                reply.add(msg.additional, target, rd)
            count += 1
    else:
        count = 0
        for e in endpoints:
            rd = _ip_rdata(e.address)
            if rd is None or not _wants(qtype, rd) or count == limit:
                continue
            before = sum(len(r) for r in msg.answer)
            reply.add(msg.answer, qname, rd)
            count += sum(len(r) for r in msg.answer) - before  # duplicates add nothing
    if not msg.answer:
        return reply.negative(dns.rcode.NOERROR)
    return msg


# ---------------------------------------------------------------------------
# Wire format and truncation.


def udp_limit(query: dns.message.Message | None) -> int:
    """Bytes a UDP answer to ``query`` may take: 512, or its EDNS size up to our cap."""
    if query is None or query.edns < 0:
        return MIN_UDP_PAYLOAD
    return max(MIN_UDP_PAYLOAD, min(query.payload, MAX_UDP_PAYLOAD))


def _fits(msg: dns.message.Message, limit: int) -> bytes | None:
    try:
        # want_shuffle: dnspython shuffles the records of an RRset by default;
        # their order is the policy's and must reach the client as it is.
        return msg.to_wire(max_size=limit, want_shuffle=False)
    except dns.exception.TooBig:
        return None


def render(response: dns.message.Message, limit: int | None) -> tuple[bytes, bool]:
    """``response`` as wire bytes of at most ``limit`` (None: TCP's 65535), and
    whether answers had to be cut (the TC bit is then set).

    Answers are cut from the end, so the best endpoints stay; the glue of the
    kept SRV records goes with them, and is dropped before any answer is.
    """
    wire = _fits(response, limit or 65535)
    if wire is not None:
        return wire, False
    records = [(rrset, rd) for rrset in response.answer for rd in rrset]
    glue = [(rrset.name, rd, rrset.ttl) for rrset in response.additional for rd in rrset]
    question = response.question[0] if response.question else None

    def cut(keep: int, with_glue: bool) -> dns.message.Message:
        out = dns.message.Message(id=response.id)
        out.flags = response.flags | dns.flags.TC
        out.set_rcode(response.rcode())
        if question is not None:
            out.question = [question]
        out.use_edns(
            response.edns, response.ednsflags, response.payload, options=list(response.options)
        )
        kept_targets: set[dns.name.Name] = set()
        for rrset, rd in records[:keep]:
            found = out.find_rrset(out.answer, rrset.name, rrset.rdclass, rrset.rdtype, create=True)
            found.add(rd, rrset.ttl)
            target = getattr(rd, "target", None)
            if isinstance(target, dns.name.Name):
                kept_targets.add(target)
        if with_glue:
            for name, rd, ttl in glue:
                if name in kept_targets:
                    found = out.find_rrset(out.additional, name, _IN, rd.rdtype, create=True)
                    found.add(rd, ttl)
        return out

    # Without the glue first: a resolver can still look the targets up.
    whole = cut(len(records), with_glue=False)
    whole.flags &= ~dns.flags.TC
    wire = _fits(whole, limit or 65535)
    if wire is not None:
        return wire, False
    low, high = 0, len(records)  # the largest number of answers that fits, with glue
    best = _fits(cut(0, with_glue=False), limit or 65535)
    assert best is not None, "a header and one question always fit 512 bytes"
    while low < high:
        mid = (low + high + 1) // 2
        attempt = _fits(cut(mid, with_glue=True), limit or 65535)
        if attempt is None:
            high = mid - 1
        else:
            low, best = mid, attempt
    return best, True


def parse_query(data: bytes) -> dns.message.Message:
    """A query from the wire; raises DNSException or ValueError on anything malformed."""
    if len(data) > MAX_QUERY_BYTES:
        raise ValueError(f"a query of {len(data)} bytes")
    msg = dns.message.from_wire(data, ignore_trailing=False)
    if msg.flags & dns.flags.QR:
        # A response sent to us: answering it could loop two servers forever.
        raise ValueError("a response, not a query")
    return msg


# ---------------------------------------------------------------------------
# The server.


class DNSServer:
    """UDP and TCP on one port, feeding :func:`answer`; every failure is counted, none raises."""

    def __init__(
        self,
        agent: AgentAPI,
        config: DNSConfig,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.config = config
        self.metrics = metrics
        self._clock = clock
        self._bucket = TokenBucket(QUERY_RATE, QUERY_BURST, clock())
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._last_log: dict[str, float] = {}

    # -- answering (shared by both transports) --------------------------------

    def handle(self, data: bytes, udp: bool) -> bytes | None:
        """The reply to one query's bytes, or None to stay silent."""
        if not self._bucket.take(1, self._clock()):
            self._drop("rate-limit")
            return None
        try:
            query = parse_query(data)
        except Exception:  # dnspython raises several families for bad bytes
            self._drop("oversized" if len(data) > MAX_QUERY_BYTES else "malformed")
            return None
        try:
            response = answer(query, self.agent, self.config)
        except Exception:
            self._note("error", "DNS answer failed", exc_info=True)
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
        try:
            wire, truncated = render(response, udp_limit(query) if udp else None)
        except Exception:
            self._note("error", "DNS answer could not be encoded", exc_info=True)
            self._drop("unencodable")
            return None
        if truncated:
            self.metrics.dns_truncated.inc()
        qtype = dns.rdatatype.to_text(query.question[0].rdtype) if query.question else "none"
        self.metrics.dns_queries.labels(
            type=qtype if qtype in _COUNTED_TYPES else "other",
            rcode=dns.rcode.to_text(response.rcode()),
        ).inc()
        return wire

    def _drop(self, reason: str) -> None:
        self.metrics.dns_dropped.labels(reason=reason).inc()
        self._note(reason, f"DNS: dropped ({reason})")

    def _note(self, key: str, message: str, exc_info: bool = False) -> None:
        """Log at most once a minute per kind, so a flood cannot fill the log."""
        now = self._clock()
        if now - self._last_log.get(key, -1e9) >= 60.0:
            self._last_log[key] = now
            log.warning(message, exc_info=exc_info)

    # -- lifecycle ------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (UDP and TCP); port 0 picks one free for both.

        Raises OSError when either cannot be bound; nothing stays open then.
        """
        loop = asyncio.get_running_loop()
        for attempt in range(8):
            tcp = await asyncio.start_server(self._serve_tcp, host, port, limit=MAX_QUERY_BYTES + 2)
            bound = tcp.sockets[0].getsockname()
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UDP(self), local_addr=(host, bound[1])
                )
            except OSError:
                tcp.close()
                await tcp.wait_closed()
                if port != 0 or attempt == 7:
                    raise
                continue  # the free TCP port was taken for UDP: try another
            self._tcp, self._udp = tcp, udp
            return bound[0], bound[1]
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._conns):
            task.cancel()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # -- TCP --------------------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_TCP_CONNECTIONS:
            self._drop("tcp-connections")
            writer.transport.abort()
            return
        self._conns.add(task)
        self.metrics.dns_tcp_connections.set(len(self._conns))
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        head = await reader.readexactly(2)
                        size = int.from_bytes(head, "big")
                        if size > MAX_QUERY_BYTES:
                            self._drop("oversized")
                            return
                        data = await reader.readexactly(size)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return  # end of stream, idle or a slow sender: close
                reply = self.handle(data, udp=False)
                if reply is None:
                    return  # malformed or over the rate: a stream has no resync
                writer.write(len(reply).to_bytes(2, "big") + reply)
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        await writer.drain()
                except (TimeoutError, ConnectionError):
                    return
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            self.metrics.dns_tcp_connections.set(len(self._conns))
            writer.transport.abort()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not derive from the
        # public DatagramTransport class, though it has its methods.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        try:
            reply = self.server.handle(data, udp=True)
            if reply is not None and self.transport is not None:
                self.transport.sendto(reply, addr)
        except Exception:  # nothing a datagram holds may stop the server
            self.server._note("error", "DNS: failed to answer a datagram", exc_info=True)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable for an earlier answer: the asker left; nothing to do.
        with contextlib.suppress(Exception):
            self.server.metrics.dns_dropped.labels(reason="send-failed").inc()
