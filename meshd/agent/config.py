"""Agent configuration: one documented dataclass, built from a TOML file and flags.

Precedence is flags over the config file over the defaults below, key by key;
a repeatable flag (``--join``) replaces the file's list rather than adding to
it, so what one sees on the command line is what the agent does.

Everything that can be checked before the agent starts is checked here, so a
bad setting is one :class:`ConfigError` sentence and exit 2 with nothing
half-started (README.md, "The agent"): names, addresses, the TLS files
(read and checked to belong together), the policy file, the API token file
(read once, here) and that an API off loopback has one.  Binding ports is left
to the agent, which is the only one that can tell whether a port is in use.

Relative paths in the config file are taken relative to the file's own
directory, so a unit file can start ``meshd agent --config /etc/meshd/a.toml``
from any working directory.  Paths given as flags are relative to the working
directory, as usual for a command line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshd import identity, wire
from meshd.agent.inventory import DEFAULT_REAP_AFTER
from meshd.api.durations import parse_wait

#: Gossip port when none is given (Serf/Consul LAN convention).
DEFAULT_GOSSIP_PORT = 7946
#: Local HTTP API port (README.md, "Local HTTP API").
DEFAULT_API_PORT = 7700
PROFILES = ("lan", "wan", "local")
#: Largest API token file.  A token is one short line (Consul's are 36
#: characters, ``head -c 32 /dev/urandom | base64`` makes 44); the cap keeps a
#: wrong path (a log, a device) from being read whole.
MAX_TOKEN_BYTES = 1024
# Printable ASCII without space: what goes into an HTTP header unchanged and
# cannot be split by a Bearer scheme or a shell.
_TOKEN_RE = re.compile(r"[!-~]+")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Largest DNS TTL (meshd.api.dns.MAX_TTL, repeated so the config does not
#: import the DNS library): a day-old discovery answer routes around nothing.
#: Longest reap interval: ten years.
MAX_REAP_AFTER = 10 * 365 * 86400.0
MAX_DNS_TTL = 86400
_DNS_LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?")


class ConfigError(Exception):
    """A setting the agent cannot start with.  The message is one sentence that
    names the flag, config key or file at fault, fit to print after ``meshd: error:``."""


def _host_node_name() -> str:
    """This host's name, made into a valid node name.

    Host names may carry characters a node name may not (``_`` is fine, but a
    container's name may have spaces or start with a dash); those become '-'.
    An unusable host name falls back to "node" rather than failing the start.
    """
    raw = socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9_.\-]", "-", raw)
    name = name.strip("-_.")[: wire.MAX_NAME_LEN].strip("-_.")
    return name or "node"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything ``meshd agent`` needs to start.  Addresses are (host, port) pairs.

    Built by :func:`load_config` from flags and a TOML file, or directly (tests,
    embedding).  ``__post_init__`` enforces the invariants below; checks that
    need the file system (do the TLS files exist and match) live in
    :func:`load_config`, so building a config does no I/O.
    """

    #: This node's name, unique within its cluster.  Default: the host name
    #: (made valid), because one agent per host is the normal deployment and
    #: the host name is what operators recognise in ``meshd members``.
    node: str = field(default_factory=_host_node_name)
    #: The cluster this node belongs to.  "default" so a single-cluster mesh
    #: needs no setting.
    cluster: str = "default"
    #: Locality labels used to order lookups (node, zone, region, cluster).
    #: Empty means unknown: the node is then only "same cluster" to anyone.
    region: str = ""
    zone: str = ""
    #: Gossip listener.  Default 0.0.0.0:7946 so peers on other hosts can reach
    #: it; in dev 127.0.0.1:7946, because a dev agent has a throwaway CA and
    #: must not be reachable from the network.  Port 0 picks a free port.
    bind: tuple[str, int] = ("0.0.0.0", DEFAULT_GOSSIP_PORT)
    #: Address peers should use to reach ``bind``, when it differs (NAT,
    #: containers, or ``bind`` on 0.0.0.0).  None: the agent works it out.
    advertise: tuple[str, int] | None = None
    #: Peers to join at start, each "HOST:PORT" (port defaulted to 7946 by
    #: load_config).  Empty: start a new cluster and wait to be joined.
    join: tuple[str, ...] = ()
    #: WAN (cross-cluster bridge) listener, its advertised address and peers.
    #: None/empty: this node is not a bridge.
    wan_bind: tuple[str, int] | None = None
    wan_advertise: tuple[str, int] | None = None
    wan_join: tuple[str, ...] = ()
    #: Gateway through which other clusters reach this cluster's apps
    #: ("HOST:PORT"); None: they are reached directly.  Every node of the
    #: cluster should set the same value (each publishes it with its records).
    gateway: tuple[str, int] | None = None
    #: Local HTTP API listener.  Loopback by default, so only processes on
    #: this host can reach it; any other address needs an API token.
    api: tuple[str, int] = ("127.0.0.1", DEFAULT_API_PORT)
    #: File holding the API token every write must carry (docs/access-control.md).
    #: None: writes are open to whoever can reach the API, which is allowed
    #: only on a loopback address.
    api_token_file: Path | None = None
    #: The token itself, read from ``api_token_file`` once by load_config (the
    #: agent reads the file itself when only the path is given).  Kept out of
    #: repr so a logged config never shows it.
    api_token: str | None = field(default=None, repr=False)
    #: Serve the API over HTTPS with this node's certificate and key (the
    #: ``tls_cert``/``tls_key`` pair, or dev's throwaway one), so a token sent
    #: off loopback is not readable on the network.  Clients check the server
    #: against the mesh CA; the certificate must name the API's address
    #: (``meshd cert issue --ip``/``--dns``).
    api_tls: bool = False
    #: Directory for durable state (registrations, incarnation).  Required
    #: except in dev, where None makes the agent use a throwaway directory.
    state_dir: Path | None = None
    #: Policy, either as a file or as the config file's ``[policy]`` table,
    #: passed through untouched (the policy layer parses it).  At most one.
    policy_file: Path | None = None
    policy_table: dict[str, Any] | None = None
    #: CA bundle, this node's certificate chain and key (``meshd cert issue``).
    #: All three required unless dev; in dev, omitted means the agent makes a
    #: throwaway CA.  Given in dev, all three are used as in production.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Development mode: loopback only, throwaway CA and state.  Never for
    #: production: anyone who can read the state dir can mint identities.
    dev: bool = False
    #: Protocol timing profile (meshd.protocol.config.Config.lan/wan/local).
    #: "lan" suits one data centre; dev defaults to "local" (loopback timings).
    profile: str = "lan"
    #: Log threshold: debug, info, warning or error.
    log_level: str = "info"
    #: DNS listener, UDP and TCP on the same port (docs/dns.md).  None: no DNS,
    #: the default, because a port answering the inventory to anyone who can
    #: reach it is for the operator to open (Consul's is 127.0.0.1:8600).
    dns: tuple[str, int] | None = None
    #: TTL of DNS answers, seconds.  0 as Consul's default: never cached, so a
    #: dead instance leaves answers as fast as it leaves resolve.
    dns_ttl: int = 0
    #: The zone the DNS interface answers: "consul" so Consul's names work.
    dns_domain: str = "consul"
    #: Seconds a dead node's instances stay listed (critical) in the
    #: inventory before they are reaped: Consul's 72 h by default.
    reap_after: float = DEFAULT_REAP_AFTER
    #: Operator-set node metadata, published with this node's documents and
    #: shown as Consul's node meta (``--node-meta KEY=VALUE``).
    node_meta: tuple[tuple[str, str], ...] = ()
    #: The TOML file this came from, if any (for messages and reloads).
    config_file: Path | None = None

    def __post_init__(self) -> None:
        for what in ("node", "cluster"):
            _check_name(getattr(self, what), what)
        for what in ("region", "zone"):
            if getattr(self, what):
                _check_name(getattr(self, what), what)
        for what in ("bind", "api"):
            _check_addr(getattr(self, what), what)
        for what in ("advertise", "wan_bind", "wan_advertise", "dns"):
            if getattr(self, what) is not None:
                _check_addr(getattr(self, what), what)
        if self.api_token is not None:
            check_token(self.api_token, "api_token")
        if self.api_token is None and self.api_token_file is None and not is_loopback(self.api[0]):
            raise ConfigError(
                f"api {format_hostport(*self.api)} is not a loopback address:"
                " set api_token_file so writes need a token"
            )
        if self.profile not in PROFILES:
            raise ConfigError(f"profile must be one of {', '.join(PROFILES)}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not (isinstance(self.dns_ttl, int) and 0 <= self.dns_ttl <= MAX_DNS_TTL):
            raise ConfigError(f"dns_ttl must be 0-{MAX_DNS_TTL} seconds")
        _check_dns_domain(self.dns_domain, "dns_domain")
        if not (
            isinstance(self.reap_after, float | int) and 1 <= self.reap_after <= MAX_REAP_AFTER
        ):
            raise ConfigError("reap_after must be from 1 s to 10 years")
        if self.policy_file is not None and self.policy_table is not None:
            raise ConfigError("give policy_file or policy_table, not both")
        tls = (self.tls_ca, self.tls_cert, self.tls_key)
        if not self.dev:
            for name, value in zip(("tls_ca", "tls_cert", "tls_key"), tls, strict=True):
                if value is None:
                    raise ConfigError(f"{name} is required unless dev is set")
            if self.state_dir is None:
                raise ConfigError("state_dir is required unless dev is set")
        elif any(v is not None for v in tls) and not all(v is not None for v in tls):
            raise ConfigError("tls_ca, tls_cert and tls_key go together: give all three or none")

    @classmethod
    def development(cls, **overrides: Any) -> AgentConfig:
        """A dev agent: loopback gossip, local timings, no TLS files or state dir needed."""
        base: dict[str, Any] = {
            "dev": True,
            "bind": ("127.0.0.1", DEFAULT_GOSSIP_PORT),
            "profile": "local",
        }
        return cls(**(base | overrides))

    def replace(self, **changes: Any) -> AgentConfig:
        return dataclasses.replace(self, **changes)


def _check_dns_domain(value: object, what: str) -> str:
    text = value.rstrip(".") if isinstance(value, str) else ""
    if not (
        text
        and len(text) <= 200
        and all(_DNS_LABEL_RE.fullmatch(label) for label in text.split("."))
    ):
        raise ConfigError(
            f"{what} must be DNS labels (letters, digits, '-') separated by dots,"
            f" such as consul or mesh.example, not {value!r:.60}"
        )
    return text.lower()


def _reap_after(value: object, what: str) -> float:
    """A duration from a flag or the file ("72h", "90s", or whole seconds)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = f"{value}s"
    try:
        if not isinstance(value, str):
            raise ValueError
        seconds = parse_wait(value, DEFAULT_REAP_AFTER, MAX_REAP_AFTER)
    except ValueError:
        raise ConfigError(f'{what} must be a duration such as "72h" or "90s"') from None
    if seconds < 1:
        raise ConfigError(f"{what} must be at least 1s")
    return seconds


def _dns_ttl(value: object, what: str) -> int:
    """Seconds from a flag (text) or the file (an integer)."""
    if isinstance(value, str) and value.isascii() and value.isdecimal():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DNS_TTL:
        raise ConfigError(f"{what} must be a whole number of seconds from 0 to {MAX_DNS_TTL}")
    return value


def _check_name(value: object, what: str) -> str:
    try:
        return wire.check_name(value, what)
    except wire.WireError as exc:
        raise ConfigError(f"{exc}, not {value!r:.60}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine: 127.0.0.0/8, ::1, localhost.

    Other names are not resolved: what they resolve to may change after
    start, so only the one name that means loopback by convention counts.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback


def check_token(value: str | bytes, what: str) -> str:
    """An API token as given, or ConfigError naming ``what`` if it is unusable."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if not text:
        raise ConfigError(f"{what} is empty")
    if len(text) > MAX_TOKEN_BYTES:
        raise ConfigError(f"{what} is longer than {MAX_TOKEN_BYTES} characters")
    if not _TOKEN_RE.fullmatch(text):
        raise ConfigError(
            f"{what} holds a space, a control character or a non-ASCII character;"
            " a token must be printable ASCII (letters, digits, punctuation)"
        )
    return text


def read_token_file(path: Path, what: str) -> str:
    """The token in ``path``: its content without surrounding whitespace.

    ``what`` names the flag or config key for messages.  Missing, unreadable,
    oversized, empty or non-printable: ConfigError, one sentence.
    """
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKEN_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_TOKEN_BYTES:
        raise ConfigError(
            f"{what} file {path} is larger than {MAX_TOKEN_BYTES} bytes; it should hold one token"
        )
    token = raw.strip()
    if not token:
        raise ConfigError(
            f"{what} file {path} is empty; write a token into it, for example with"
            f" head -c 32 /dev/urandom | base64 > {path}"
        )
    return check_token(token, f"{what} file {path}")


def _check_addr(value: object, what: str) -> None:
    ok = (
        isinstance(value, tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and value[0] != ""
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
        and 0 <= value[1] <= 65535
    )
    if not ok:
        raise ConfigError(f"{what} must be a (host, port) pair with port 0-65535, not {value!r}")


# ---------------------------------------------------------------------------
# HOST:PORT.

_HOST_RE = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9\-.]*[A-Za-z0-9])?\.?\Z")


def parse_hostport(value: str, what: str, default_port: int | None = None) -> tuple[str, int]:
    """``"HOST:PORT"`` or ``"[IPv6]:PORT"`` -> (host, port); the host comes back unbracketed.

    With ``default_port``, a bare host (``"10.0.0.1"``, ``"[::1]"``, ``"::1"``)
    is accepted too.  Port 0 is allowed (bind to a free port, as tests do);
    callers that must connect refuse it themselves.  ``what`` names the flag or
    key in the error.
    """
    example = "HOST:PORT (e.g. 127.0.0.1:7946 or [::1]:7946)"
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigError(f"{what} must be {example}, not {value!r:.80}")
    port_text: str | None
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ConfigError(f"{what} has an unclosed '[' in {value!r:.80}")
        host, rest = value[1:close], value[close + 1 :]
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ConfigError(f"{what} must be {example}, not {value!r:.80}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{what} has {host!r:.60} in brackets, not an IPv6 address") from None
    elif value.count(":") > 1:
        # A bare IPv6 address: only unambiguous when no port is expected.
        if default_port is None:
            raise ConfigError(f"{what} needs brackets around an IPv6 address, as in [::1]:7946")
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise ConfigError(f"{what} must be {example}, not {value!r:.80}") from None
        host, port_text = value, None
    else:
        host, sep, port_text_raw = value.partition(":")
        port_text = port_text_raw if sep else None
        if not _HOST_RE.match(host) or len(host) > 253:
            raise ConfigError(f"{what} must be {example}, not {value!r:.80}")
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"{what} needs a port: {example}, not {value!r:.80}")
        return host, default_port
    # isdecimal() alone would pass non-ASCII digits that int() then accepts.
    if not (port_text.isascii() and port_text.isdecimal()) or int(port_text) > 65535:
        raise ConfigError(f"{what} port must be a number from 0 to 65535, not {port_text!r:.20}")
    return host, int(port_text)


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport`: brackets an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---------------------------------------------------------------------------
# The TOML file.

#: Top-level keys and their TOML types.  ``policy`` is a file path (string)
#: or an inline ``[policy]`` table; ``tls`` is checked separately.
_FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "node": str,
    "cluster": str,
    "region": str,
    "zone": str,
    "bind": str,
    "advertise": str,
    "join": list,
    "wan_bind": str,
    "wan_advertise": str,
    "wan_join": list,
    "gateway": str,
    "api": str,
    "api_token_file": str,
    "api_tls": bool,
    "state_dir": str,
    "policy": (str, dict),
    "dev": bool,
    "profile": str,
    "log_level": str,
    "dns": str,
    "dns_ttl": int,
    "dns_domain": str,
    "reap_after": (str, int),
    "node_meta": (list, dict),
    "tls": dict,
}
_TLS_KEYS = ("ca", "cert", "key")
_TYPE_NAMES = {
    str: "a string",
    list: "a list of strings",
    bool: "true or false",
    dict: "a table",
    int: "an integer",
}


def _unknown_key(path: Path, key: str, known: list[str]) -> ConfigError:
    import difflib  # only a bad config file needs it: kept out of the agent's memory

    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"config file {path}: unknown key {key!r}{hint}")


def _read_file(path: Path) -> dict[str, Any]:
    """The file's settings, type-checked, with ``[tls]`` flattened to ``tls_*``."""
    import tomllib  # only agents started with --config read TOML: kept out of the others' memory

    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message is one line and ends with "(at line L, column C)".
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not valid UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None

    out: dict[str, Any] = {}
    for key, value in data.items():
        expected = _FILE_KEYS.get(key)
        if expected is None:
            raise _unknown_key(path, key, list(_FILE_KEYS))
        if (
            not isinstance(value, expected)
            or (isinstance(value, list) and not all(isinstance(v, str) for v in value))
            or (expected is int and isinstance(value, bool))
        ):
            names = expected if isinstance(expected, tuple) else (expected,)
            kinds = " or ".join(_TYPE_NAMES[t] for t in names)
            raise ConfigError(f"config file {path}: key {key!r} must be {kinds}")
        if key == "tls":
            assert isinstance(value, dict)
            for tkey, tvalue in value.items():
                if tkey not in _TLS_KEYS:
                    raise _unknown_key(path, f"tls.{tkey}", list(_TLS_KEYS))
                if not isinstance(tvalue, str):
                    raise ConfigError(f"config file {path}: key 'tls.{tkey}' must be a string")
                out[f"tls_{tkey}"] = tvalue
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------
# Putting it together.

#: Setting -> the flag that sets it, for messages.
_FLAGS = {
    "node": "--node",
    "cluster": "--cluster",
    "region": "--region",
    "zone": "--zone",
    "bind": "--bind",
    "advertise": "--advertise",
    "join": "--join",
    "wan_bind": "--wan-bind",
    "wan_advertise": "--wan-advertise",
    "wan_join": "--wan-join",
    "gateway": "--gateway",
    "api": "--api",
    "api_token_file": "--api-token-file",
    "api_tls": "--api-tls",
    "state_dir": "--state-dir",
    "policy": "--policy",
    "dev": "--dev",
    "profile": "--profile",
    "log_level": "--log-level",
    "dns": "--dns",
    "dns_ttl": "--dns-ttl",
    "dns_domain": "--dns-domain",
    "reap_after": "--reap-after",
    "node_meta": "--node-meta",
    "tls_ca": "--tls-ca",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
}


class _Settings:
    """Merged flag and file values, remembering where each came from for messages."""

    def __init__(self, flags: dict[str, Any], file_values: dict[str, Any], path: Path | None):
        self._flags = flags
        self._file = file_values
        self._path = path

    def from_flag(self, key: str) -> bool:
        return self._flags.get(key) is not None

    def get(self, key: str) -> Any:
        value = self._flags.get(key)
        return value if value is not None else self._file.get(key)

    def what(self, key: str) -> str:
        """How to name ``key`` in an error: the flag, or the key in the file."""
        if self.from_flag(key) or key not in self._file:
            return _FLAGS[key]
        file_key = key.replace("tls_", "tls.", 1) if key.startswith("tls_") else key
        return f"config file {self._path}: key {file_key!r}"

    def path(self, key: str) -> Path | None:
        value = self.get(key)
        if value is None:
            return None
        p = Path(value)
        # File paths are relative to the file; flag paths to the working dir.
        if not self.from_flag(key) and self._path is not None and not p.is_absolute():
            p = self._path.parent / p
        return p


def _addr(s: _Settings, key: str, default_port: int | None = None) -> tuple[str, int] | None:
    value = s.get(key)
    if value is None:
        return None
    return parse_hostport(value, s.what(key), default_port)


def _peers(s: _Settings, key: str, default_port: int | None) -> tuple[str, ...]:
    out = []
    for value in s.get(key) or ():
        host, port = parse_hostport(value, s.what(key), default_port)
        if port == 0:
            raise ConfigError(f"{s.what(key)} {value!r:.80} has port 0, which cannot be joined")
        out.append(format_hostport(host, port))
    return tuple(out)


def _node_meta(s: _Settings) -> tuple[tuple[str, str], ...]:
    """``--node-meta KEY=VALUE`` (repeatable) or a ``node_meta`` table in the file."""
    raw = s.get("node_meta")
    if raw is None:
        return ()
    what = s.what("node_meta")
    pairs: dict[str, str] = {}
    if isinstance(raw, dict):
        for k, v in raw.items():
            if not isinstance(v, str):
                raise ConfigError(f"{what}: value of {k!r:.60} must be a string")
            pairs[k] = v
    else:
        for item in raw:
            k, sep, v = str(item).partition("=")
            if not sep:
                raise ConfigError(f"{what} must be KEY=VALUE, not {item!r:.80}")
            pairs[k] = v
    meta = tuple(sorted(pairs.items()))
    try:
        return wire.check_node_meta(meta)
    except wire.WireError as exc:
        raise ConfigError(f"{what}: {exc}") from None


def _check_readable(path: Path, what: str) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def load_config(flags: dict[str, Any]) -> AgentConfig:
    """Build the agent's configuration from parsed flags and, if named, a TOML file.

    ``flags`` maps setting names (argparse dests: ``node``, ``bind``,
    ``tls_cert``, ``config``...) to values, None when not given; repeatable
    flags are lists.  Keys it does not know are ignored, so argparse's whole
    namespace can be passed.  Raises :class:`ConfigError`.
    """
    config_file: Path | None = None
    file_values: dict[str, Any] = {}
    if flags.get("config") is not None:
        config_file = Path(flags["config"])
        file_values = _read_file(config_file)
    s = _Settings(flags, file_values, config_file)

    dev = bool(s.get("dev"))
    names: dict[str, str] = {}
    for key in ("node", "cluster", "region", "zone"):
        value = s.get(key)
        if value is not None and (value != "" or key in ("node", "cluster")):
            names[key] = _check_name(value, s.what(key))
        elif value is not None:
            names[key] = ""

    profile = s.get("profile") or ("local" if dev else "lan")
    if profile not in PROFILES:
        raise ConfigError(f"{s.what('profile')} must be one of {', '.join(PROFILES)}")
    log_level = s.get("log_level") or "info"
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"{s.what('log_level')} must be one of {', '.join(LOG_LEVELS)}")

    bind = _addr(s, "bind", DEFAULT_GOSSIP_PORT) or (
        ("127.0.0.1" if dev else "0.0.0.0"),
        DEFAULT_GOSSIP_PORT,
    )
    api = _addr(s, "api", DEFAULT_API_PORT) or ("127.0.0.1", DEFAULT_API_PORT)
    api_token_file = s.path("api_token_file")
    api_token = None
    if api_token_file is not None:
        api_token = read_token_file(api_token_file, s.what("api_token_file"))
    elif not is_loopback(api[0]):
        # Anyone who can reach an open API can deregister every instance and
        # rewrite the policy; off loopback that is the whole network.
        raise ConfigError(
            f"{s.what('api')} {format_hostport(*api)} is not a loopback address, so the API"
            " needs a token: give --api-token-file FILE (or api_token_file in the config file)"
        )
    wan_bind = _addr(s, "wan_bind")
    advertise = _addr(s, "advertise", bind[1])
    wan_advertise = _addr(s, "wan_advertise", wan_bind[1] if wan_bind else None)
    for key, adv in (("advertise", advertise), ("wan_advertise", wan_advertise)):
        # Peers cannot connect to "any address" or to port 0.
        if adv is not None and (_is_unspecified(adv[0]) or adv[1] == 0):
            raise ConfigError(f"{s.what(key)} must be an address peers can reach, not {adv[0]}")
    join = _peers(s, "join", DEFAULT_GOSSIP_PORT)
    wan_join = _peers(s, "wan_join", wan_bind[1] if wan_bind else None)
    if wan_join and wan_bind is None:
        raise ConfigError(f"{s.what('wan_join')} needs --wan-bind: only a bridge joins the WAN")

    gateway = _addr(s, "gateway")
    if gateway is not None and (_is_unspecified(gateway[0]) or gateway[1] == 0):
        raise ConfigError(f"{s.what('gateway')} must be an address other clusters can reach")

    dns = _addr(s, "dns")
    reap_after = (
        DEFAULT_REAP_AFTER
        if s.get("reap_after") is None
        else _reap_after(s.get("reap_after"), s.what("reap_after"))
    )
    dns_ttl = 0 if s.get("dns_ttl") is None else _dns_ttl(s.get("dns_ttl"), s.what("dns_ttl"))
    dns_domain = (
        "consul"
        if s.get("dns_domain") is None
        else _check_dns_domain(s.get("dns_domain"), s.what("dns_domain"))
    )

    state_dir = s.path("state_dir")
    if state_dir is None and not dev:
        raise ConfigError("--state-dir is required unless --dev (or set state_dir in the file)")
    if state_dir is not None and state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"{s.what('state_dir')} {state_dir} is not a directory")

    policy_file: Path | None = None
    policy_table: dict[str, Any] | None = None
    policy = s.get("policy")
    if isinstance(policy, dict):
        policy_table = policy
    elif policy is not None:
        policy_file = s.path("policy")
        assert policy_file is not None
        _check_readable(policy_file, s.what("policy"))

    tls = {key: s.path(key) for key in ("tls_ca", "tls_cert", "tls_key")}
    given = [key for key, p in tls.items() if p is not None]
    if not dev and len(given) < 3:
        missing = next(key for key in tls if tls[key] is None)
        raise ConfigError(
            f"{_FLAGS[missing]} is required unless --dev"
            f" (or set [tls] {missing[4:]} in the config file)"
        )
    if given and len(given) < 3:
        missing = next(key for key in tls if tls[key] is None)
        raise ConfigError(f"{_FLAGS[missing]} is required when {_FLAGS[given[0]]} is given")
    if given:
        for key, p in tls.items():
            assert p is not None
            _check_readable(p, _FLAGS[key])
        node_cert = _load_node_cert(tls)
        # The certificate is the node's identity; a config naming another node
        # or cluster would sign states every peer rejects.  Unset names are
        # taken from the certificate instead of the host name.
        for key in ("cluster", "node"):
            cert_value = getattr(node_cert, key)
            if key not in names:
                names[key] = cert_value
            elif names[key] != cert_value:
                raise ConfigError(
                    f"{s.what(key)} is {names[key]!r} but certificate {tls['tls_cert']}"
                    f" is for {key} {cert_value!r}"
                )

    try:
        return AgentConfig(
            **names,
            bind=bind,
            advertise=advertise,
            join=join,
            wan_bind=wan_bind,
            wan_advertise=wan_advertise,
            wan_join=wan_join,
            gateway=gateway,
            api=api,
            api_token_file=api_token_file,
            api_token=api_token,
            api_tls=bool(s.get("api_tls")),
            state_dir=state_dir,
            policy_file=policy_file,
            policy_table=policy_table,
            tls_ca=tls["tls_ca"],
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
            dev=dev,
            profile=profile,
            log_level=log_level,
            dns=dns,
            dns_ttl=dns_ttl,
            dns_domain=dns_domain,
            reap_after=reap_after,
            node_meta=_node_meta(s),
            config_file=config_file,
        )
    except TypeError as exc:  # pragma: no cover - a bug here, not a user error
        raise ConfigError(str(exc)) from None


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _load_node_cert(tls: dict[str, Path | None]) -> identity.NodeCert:
    cert, key, ca = tls["tls_cert"], tls["tls_key"], tls["tls_ca"]
    assert cert is not None and key is not None and ca is not None
    try:
        # Checked now, with the clock, so an expired certificate is a clear
        # start-up error rather than every peer silently refusing us.
        return identity.load_node_cert(cert, key, ca, now=datetime.now(UTC))
    except identity.IdentityError as exc:
        raise ConfigError(str(exc)) from None


__all__ = [
    "DEFAULT_API_PORT",
    "DEFAULT_GOSSIP_PORT",
    "LOG_LEVELS",
    "MAX_DNS_TTL",
    "PROFILES",
    "MAX_TOKEN_BYTES",
    "AgentConfig",
    "ConfigError",
    "check_token",
    "format_hostport",
    "is_loopback",
    "load_config",
    "parse_hostport",
    "read_token_file",
]
