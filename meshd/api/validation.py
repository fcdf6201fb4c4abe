"""Turning untrusted request bodies and query values into agent values, or a 400.

Everything here is pure: JSON values in, :class:`Registration` / :class:`CheckSpec`
/ plain values out, or an :class:`ApiError` whose message is one sentence that
names the offending field.  Nothing reaches the agent until a whole request
has passed, so a rejected request never half-registers anything.

Messages follow the wire module's style ("port must be ...") because a
:class:`~meshd.wire.WireError` from building the record is passed through as is.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlsplit

from meshd.agent.interface import HEALTH, CheckKind, CheckSpec, Registration
from meshd.api.durations import parse_duration
from meshd.wire import (
    MAX_EXPORT_CLUSTERS,
    MAX_NAME_LEN,
    PROTOCOLS,
    AppRecord,
    WireError,
    check_name,
)

__all__ = [
    "ApiError",
    "CHECK_MIN_SECONDS",
    "CHECK_MAX_SECONDS",
    "is_host",
    "parse_check",
    "parse_health",
    "parse_registration",
]

#: Shortest TTL or probe interval.  Below this a check costs more than the app.
CHECK_MIN_SECONDS = 0.1
#: Longest TTL or probe interval: a check slower than a day checks nothing.
CHECK_MAX_SECONDS = 24 * 3600.0
#: Longest check URL; longer ones are almost surely a mistake and get logged often.
MAX_URL_LEN = 2048
#: Largest weight; the same bound AppRecord enforces, repeated for a clear message.
MAX_WEIGHT = 1_000_000

_REQUIRED = ("app", "address", "port")
_FIELDS = frozenset(
    ("app", "address", "port", "namespace", "protocol", "meta", "weight", "check", "export")
)
_CHECK_KINDS: tuple[CheckKind, ...] = ("ttl", "http", "tcp")
# RFC 1123 label: letters, digits, hyphens; no leading or trailing hyphen; 1-63 long.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# Printable ASCII without space: a URL with anything else must be percent-encoded,
# and a raw control character in a URL we later log or fetch is trouble.
_URL_CHARS = re.compile(r"[!-~]+")
_PORT = re.compile(r"[0-9]{1,5}")


class ApiError(Exception):
    """A request the API refuses: an HTTP status and one sentence for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def _shown(key: str) -> str:
    """A client-chosen key, quoted and cut short, safe to put in an error sentence."""
    return repr(key[:64] + ("..." if len(key) > 64 else ""))


def is_host(value: str) -> bool:
    """True for an IP address or an RFC 1123 host name."""
    # ASCII only: names must be punycode on the wire, and an IPv6 scope id is an
    # interface name; anything else is a typo or an attack on whoever logs it.
    if not value or len(value) > MAX_NAME_LEN or not value.isascii():
        return False
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        pass
    labels = value.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    # An all-numeric last label is a mistyped IPv4 address ("10.0.0.256"), not a
    # name: no top-level domain is numeric (RFC 3696 section 2).
    return not labels[-1].isdigit()


def _utf8_ok(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except WireError as exc:
        raise _bad(str(exc)) from None


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    # bool is an int in Python but never what a client meant by a port or weight.
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(f"{what} must be an integer from {lo} to {hi}")
    return value


def _check_duration(raw: dict[str, Any], key: str) -> float:
    value = raw[key]
    what = f"check.{key}"
    if not isinstance(value, str):
        raise _bad(f'{what} must be a duration string such as "10s"')
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise _bad(f'{what} must be a duration such as "500ms", "10s" or "1m30s"') from None
    if not CHECK_MIN_SECONDS <= seconds <= CHECK_MAX_SECONDS:
        raise _bad(f"{what} must be from 100ms to 24h")
    return seconds


def _http_target(value: Any) -> str:
    message = "check.http must be an http:// or https:// URL with a valid host"
    if not isinstance(value, str) or len(value) > MAX_URL_LEN or not _URL_CHARS.fullmatch(value):
        raise _bad(message)
    try:
        url = urlsplit(value)
        port = url.port  # raises ValueError on a port that is not 0-65535
    except ValueError:
        raise _bad(message) from None
    if port == 0:
        raise _bad(message)
    host = url.hostname or ""
    if url.scheme not in ("http", "https") or not is_host(host):
        raise _bad(message)
    return value


def _tcp_target(value: Any) -> str:
    message = "check.tcp must be HOST:PORT with a valid host and a port from 1 to 65535"
    if not isinstance(value, str):
        raise _bad(message)
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [v6]:port, the only way to write an IPv6 host with a port
        if ":" not in host:
            raise _bad(message)
    elif ":" in host:
        raise _bad(message)  # an unbracketed IPv6 address is ambiguous with the port
    if not sep or not is_host(host) or not _PORT.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise _bad(message)
    return value


def parse_check(raw: Any) -> CheckSpec:
    """A ``check`` object: ``{"ttl": D}``, ``{"http": URL, "interval": D}`` or ``{"tcp": ...}``."""
    if not isinstance(raw, dict):
        raise _bad("check must be an object with one of ttl, http or tcp")
    kinds = [k for k in _CHECK_KINDS if k in raw]
    if len(kinds) != 1:
        raise _bad("check must have exactly one of ttl, http or tcp")
    kind = kinds[0]
    allowed = ("ttl",) if kind == "ttl" else (kind, "interval")
    for key in raw:
        if key not in allowed:
            raise _bad(f"check has unknown field {_shown(key)} for a {kind} check")
    if kind == "ttl":
        return CheckSpec(kind="ttl", ttl=_check_duration(raw, "ttl"))
    # Interval is required, as in Consul: a silent default would hide a typo'd key.
    if "interval" not in raw:
        raise _bad(f"check.interval is required for a {kind} check")
    interval = _check_duration(raw, "interval")
    target = _http_target(raw["http"]) if kind == "http" else _tcp_target(raw["tcp"])
    return CheckSpec(kind=kind, target=target, interval=interval)


def parse_registration(instance: str, body: Any) -> Registration:
    """The body of ``PUT /v1/apps/{instance}`` as a Registration; ApiError(400) if invalid.

    An optional field given as JSON ``null`` takes its default, as if omitted.
    The record starts "passing": the agent applies its check policy on register.
    """
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    _name(instance, "instance")
    for key in body:
        if key not in _FIELDS:
            raise _bad(f"unknown field {_shown(key)} in registration")
    for key in _REQUIRED:
        if body.get(key) is None:
            raise _bad(f"missing required field {key!r}")
    app = _name(body["app"], "app")
    address = body["address"]
    if not isinstance(address, str) or not is_host(address):
        raise _bad("address must be an IP address or a host name")
    port = _int(body["port"], "port", 1, 65535)
    namespace = body.get("namespace")
    namespace = "default" if namespace is None else _name(namespace, "namespace")
    protocol = body.get("protocol")
    if protocol is None:
        protocol = "http"
    elif protocol not in PROTOCOLS:  # `in` on a tuple of str is safe for any JSON value
        raise _bad(f"protocol must be one of {', '.join(PROTOCOLS)}")
    meta = body.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad("meta must be an object mapping strings to strings")
    elif not all(_utf8_ok(k) and _utf8_ok(v) for k, v in meta.items()):
        # JSON's \ud800 escapes decode to lone surrogates, which cannot go on the wire.
        raise _bad("meta keys and values must be valid Unicode (no lone surrogates)")
    weight = body.get("weight")
    weight = 1 if weight is None else _int(weight, "weight", 0, MAX_WEIGHT)
    check_raw = body.get("check")
    check = None if check_raw is None else parse_check(check_raw)
    export = parse_export(body.get("export"))
    try:
        record = AppRecord(
            app=app,
            instance=instance,
            address=address,
            port=port,
            namespace=namespace,
            protocol=protocol,
            meta=AppRecord.make_meta(meta),
            weight=weight,
            health="passing",
            export=export,
        )
    except WireError as exc:  # meta size and count caps, and anything the wire adds later
        raise _bad(str(exc)) from None
    return Registration(record, check)


def parse_export(raw: Any) -> tuple[str, ...] | None:
    """``export``: absent, null or "*" for every cluster; a list of cluster
    names (``[]`` for this cluster only)."""
    if raw is None or raw == "*":
        return None
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise _bad('export must be a list of cluster names, or "*" for all clusters')
    if len(raw) > MAX_EXPORT_CLUSTERS:
        raise _bad(f'export may name at most {MAX_EXPORT_CLUSTERS} clusters (or "*" for all)')
    for c in raw:
        _name(c, "export cluster")
    return tuple(sorted(set(raw)))


def parse_health(body: Any) -> str:
    """The body of ``PUT /v1/apps/{instance}/health``: the reported status."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    for key in body:
        if key != "status":
            raise _bad(f"unknown field {_shown(key)} in health report")
    status = body.get("status")
    if not isinstance(status, str) or status not in HEALTH:
        raise _bad(f"status must be one of {', '.join(HEALTH)}")
    return status
