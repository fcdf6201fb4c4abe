"""The ``meshd`` command line (README.md, "The agent" and "Local HTTP API").

Exit codes: 0 success; 1 the operation failed (agent unreachable, the agent
answered with an error); 2 the command itself is wrong (bad flag, bad config,
a file that cannot be used), always as one line on stderr.

Client commands (register, deregister, resolve, members) talk to the local
HTTP API with urllib: the CLI must start fast and needs no event loop.  The
API address is ``--api URL``, else ``$MESHD_API``, else http://127.0.0.1:7700;
an https:// API is checked against ``--api-ca FILE``, else ``$MESHD_API_CA``,
else the system's CA bundle.
Commands that write send the API token, if one is given (``--token``,
``--token-file``, ``$MESHD_HTTP_TOKEN``, ``$CONSUL_HTTP_TOKEN``, in that
order), as ``X-Consul-Token``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from meshd import identity, revocation, wire
from meshd.agent.config import (
    ConfigError,
    check_token,
    load_config,
    parse_hostport,
    read_token_file,
)
from meshd.api.durations import parse_duration
from meshd.api.validation import is_host

DEFAULT_API_URL = "http://127.0.0.1:7700"
API_ENV = "MESHD_API"
#: CA bundle that an https:// API's certificate is checked against (the mesh
#: CA for an agent started with --api-tls); unset: the system's bundle.
API_CA_ENV = "MESHD_API_CA"
#: Where write commands find the API token when no flag gives it: meshd's own
#: variable first, then Consul's, so a shell set up for Consul works as is.
TOKEN_ENVS = ("MESHD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")
#: Seconds to wait for the agent.  Nothing the CLI asks blocks on the server
#: side (no ``index``), so a slow answer means a stuck agent, not a busy one.
HTTP_TIMEOUT = 30.0
#: Interval sent with an HTTP or TCP check when --check-interval is absent
#: (Consul's usual 10s: frequent enough to notice, cheap for the app).
DEFAULT_CHECK_INTERVAL = "10s"
#: Columns are separated by this many spaces, like kubectl's tabwriter.
_COLUMN_GAP = 3

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the contract's "one clear line")."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class CommandError(Exception):
    """A failure to report as ``meshd: error: <message>`` with ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _version() -> str:
    # Imported here: importlib.metadata and its scan of every installed
    # distribution stay out of the agent's memory (benchmarks/RESULTS.md).
    from importlib import metadata

    try:
        return metadata.version("meshd")
    except metadata.PackageNotFoundError:  # running from a tree that was never installed
        return "unknown"


class _VersionAction(argparse.Action):
    """``--version``, with the version looked up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        print(f"meshd {_version()}")  # on stdout, as argparse's own version action
        parser.exit()


# ---------------------------------------------------------------------------
# Argument types.  Each raises ArgumentTypeError, which argparse turns into a
# one-line usage error naming the flag.


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdecimal()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, not {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not (text.isascii() and text.isdecimal()) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, not {text!r}")
    return int(text)


def _weight(text: str) -> int:
    if not (text.isascii() and text.isdecimal()):
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 up, not {text!r}")
    return int(text)


def _name(text: str) -> str:
    try:
        return wire.check_name(text, "name")
    except wire.WireError:
        raise argparse.ArgumentTypeError(
            f"must be 1-{wire.MAX_NAME_LEN} letters, digits, '.', '-' or '_',"
            f" starting and ending with a letter or digit, not {text!r:.60}"
        ) from None


def _duration(text: str) -> str:
    # Passed to the agent as written; checked here, with the agent's own
    # parser, so a typo is a usage error rather than a round trip.
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = 0.0
    if seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive duration like 10s, 500ms or 1m30s, not {text!r:.40}"
        )
    return text


def _meta(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"must be KEY=VALUE, not {text!r}")
    return key, value


def _hostport(text: str) -> str:
    try:
        _, port = parse_hostport(text, "HOST:PORT")
    except ConfigError:
        port = 0
    if port == 0:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT with a port from 1 to 65535, not {text!r:.80}"
        )
    return text


def _http_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"must be an http:// or https:// URL, not {text!r}")
    return text


# ---------------------------------------------------------------------------
# The parser.


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: the flags are a contract; "--clus" must not quietly
    # mean --cluster today and become ambiguous when a flag is added.
    parser = _Parser(
        prog="meshd",
        description="meshd: a gossip-based discovery mesh.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="show program's version number and exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ca = commands.add_parser("ca", help="manage the certificate authority", allow_abbrev=False)
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    ca_create = ca_commands.add_parser(
        "create", help="create a new CA (ca.pem, ca.key)", allow_abbrev=False
    )
    ca_create.add_argument("--out", required=True, metavar="DIR", help="directory to write to")
    ca_create.add_argument(
        "--trust-domain",
        default=identity.DEFAULT_TRUST_DOMAIN,
        metavar="DOMAIN",
        help="SPIFFE trust domain (default: %(default)s)",
    )
    ca_create.add_argument(
        "--days", type=_positive_int, default=3650, help="validity in days (default: %(default)s)"
    )
    ca_create.set_defaults(func=_cmd_ca_create)
    _add_ca_revoke_parser(ca_commands)

    cert = commands.add_parser("cert", help="manage node certificates", allow_abbrev=False)
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="COMMAND", required=True)
    issue = cert_commands.add_parser(
        "issue", help="issue a node certificate (NAME.pem, NAME.key)", allow_abbrev=False
    )
    issue.add_argument("--ca", required=True, metavar="DIR", help="directory with ca.pem, ca.key")
    issue.add_argument("--node", required=True, type=_name, metavar="NAME")
    issue.add_argument("--cluster", required=True, type=_name, metavar="NAME")
    issue.add_argument(
        "--ip", action="append", default=[], metavar="ADDR", help="IP SAN (repeatable)"
    )
    issue.add_argument(
        "--dns", action="append", default=[], metavar="NAME", help="DNS SAN (repeatable)"
    )
    issue.add_argument(
        "--days", type=_positive_int, default=365, help="validity in days (default: %(default)s)"
    )
    issue.add_argument(
        "--bridge",
        action="store_true",
        help="grant the bridge role: the node may run a WAN listener and state its cluster's"
        " liveness to other clusters",
    )
    issue.add_argument("--out", required=True, metavar="DIR", help="directory to write to")
    issue.set_defaults(func=_cmd_cert_issue)

    _add_agent_parser(commands)
    _add_client_parsers(commands)
    _add_revocation_parsers(commands)
    return parser


def _add_agent_parser(commands: Any) -> None:
    # Every default is None so load_config can tell "not given" from "given",
    # which is what lets the config file fill in what the flags leave out.
    agent = commands.add_parser("agent", help="run the agent", allow_abbrev=False)
    agent.add_argument("--config", metavar="FILE", help="TOML config file; flags override it")
    agent.add_argument(
        "--dev",
        action="store_true",
        default=None,
        help="development mode: loopback only, throwaway CA and state",
    )
    for flag in ("--node", "--cluster", "--region", "--zone"):
        agent.add_argument(flag, metavar="NAME")
    agent.add_argument("--bind", metavar="HOST:PORT", help="gossip listener (default 0.0.0.0:7946)")
    agent.add_argument("--advertise", metavar="HOST:PORT", help="gossip address peers should use")
    agent.add_argument("--join", action="append", metavar="HOST:PORT", help="peer (repeatable)")
    agent.add_argument("--wan-bind", metavar="HOST:PORT", help="WAN (bridge) listener")
    agent.add_argument("--wan-advertise", metavar="HOST:PORT")
    agent.add_argument("--wan-join", action="append", metavar="HOST:PORT", help="(repeatable)")
    agent.add_argument(
        "--gateway", metavar="HOST:PORT", help="gateway other clusters use to reach this one"
    )
    agent.add_argument("--api", metavar="HOST:PORT", help="HTTP API listener (127.0.0.1:7700)")
    agent.add_argument(
        "--api-tls",
        action="store_true",
        default=None,
        help="serve the API over HTTPS with this node's certificate (clients check it"
        " against the mesh CA)",
    )
    agent.add_argument(
        "--api-token-file",
        metavar="FILE",
        help="file with the token every API write must carry (required off loopback)",
    )
    agent.add_argument("--state-dir", metavar="DIR")
    agent.add_argument("--policy", metavar="FILE")
    agent.add_argument("--tls-ca", metavar="FILE")
    agent.add_argument("--tls-cert", metavar="FILE")
    agent.add_argument("--tls-key", metavar="FILE")
    agent.add_argument("--profile", choices=("lan", "wan", "local"))
    agent.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    agent.add_argument(
        "--dns", metavar="HOST:PORT", help="DNS listener, UDP and TCP (default: no DNS)"
    )
    agent.add_argument("--dns-ttl", metavar="SECONDS", help="TTL of DNS answers (default: 0)")
    agent.add_argument("--dns-domain", metavar="DOMAIN", help="DNS zone (default: consul)")
    agent.add_argument(
        "--node-meta",
        action="append",
        metavar="KEY=VALUE",
        help="node metadata shown to Consul clients (repeatable)",
    )
    agent.add_argument(
        "--reap-after",
        metavar="DURATION",
        help="how long a dead node's services stay listed critical (default: 72h)",
    )
    agent.set_defaults(func=_cmd_agent)


def _add_api_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        metavar="URL",
        help=f"agent API (default: ${API_ENV} or {DEFAULT_API_URL})",
    )
    parser.add_argument(
        "--api-ca",
        metavar="FILE",
        help=f"CA bundle to check an https:// API against (default: ${API_CA_ENV},"
        " else the system's)",
    )


def _add_token_flags(parser: argparse.ArgumentParser) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--token",
        metavar="TOKEN",
        help="API token for an agent started with --api-token-file"
        " (visible to other users in the process list: prefer --token-file)",
    )
    given.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"file holding the API token (default: ${TOKEN_ENVS[0]} or ${TOKEN_ENVS[1]})",
    )


def _add_client_parsers(commands: Any) -> None:
    reg = commands.add_parser("register", help="register an app instance", allow_abbrev=False)
    reg.add_argument("app", type=_name, metavar="APP")
    reg.add_argument("--instance", required=True, type=_name, metavar="ID")
    reg.add_argument("--address", required=True, metavar="ADDR")
    reg.add_argument("--port", required=True, type=_port, metavar="N")
    reg.add_argument("--namespace", type=_name, metavar="NS", help="(default: default)")
    reg.add_argument("--protocol", choices=("http", "grpc", "tcp"), help="(default: http)")
    reg.add_argument(
        "--meta", action="append", type=_meta, default=[], metavar="K=V", help="(repeatable)"
    )
    reg.add_argument("--weight", type=_weight, metavar="N", help="(default: 1)")
    scope = reg.add_mutually_exclusive_group()
    scope.add_argument(
        "--export",
        action="append",
        metavar="CLUSTER",
        help="let this cluster see the app (repeatable; default: every cluster)",
    )
    scope.add_argument("--local-only", action="store_true", help="keep the app inside this cluster")
    check = reg.add_mutually_exclusive_group()
    check.add_argument("--check-ttl", type=_duration, metavar="DUR", help="app reports health")
    check.add_argument("--check-http", type=_http_url, metavar="URL", help="agent GETs URL")
    check.add_argument("--check-tcp", type=_hostport, metavar="HOST:PORT", help="agent connects")
    reg.add_argument(
        "--check-interval",
        type=_duration,
        metavar="DUR",
        help=f"for --check-http/--check-tcp (default: {DEFAULT_CHECK_INTERVAL})",
    )
    reg.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(reg)
    _add_token_flags(reg)
    reg.set_defaults(func=_cmd_register)

    _add_gateway_parser(commands)

    dereg = commands.add_parser("deregister", help="remove an app instance", allow_abbrev=False)
    dereg.add_argument("instance", metavar="ID")
    dereg.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(dereg)
    _add_token_flags(dereg)
    dereg.set_defaults(func=_cmd_deregister)

    res = commands.add_parser("resolve", help="list an app's endpoints", allow_abbrev=False)
    res.add_argument("app", type=_name, metavar="APP")
    res.add_argument("--namespace", type=_name, metavar="NS", help="(default: default)")
    res.add_argument("--all", action="store_true", help="include unhealthy endpoints")
    res.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(res)
    res.set_defaults(func=_cmd_resolve)

    mem = commands.add_parser("members", help="list the mesh's members", allow_abbrev=False)
    mem.add_argument("--cluster", type=_name, metavar="NAME", help="only this cluster")
    mem.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(mem)
    mem.set_defaults(func=_cmd_members)


def _serial(text: str) -> int:
    try:
        return revocation.parse_serial(text)
    except revocation.RevocationError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_ca_revoke_parser(ca_commands: Any) -> None:
    revoke = ca_commands.add_parser(
        "revoke",
        help="make a CA-signed revocation list (a CRL) naming certificates no agent may trust",
        allow_abbrev=False,
    )
    revoke.add_argument("--ca", required=True, metavar="DIR", help="directory with ca.pem, ca.key")
    revoke.add_argument(
        "--serial",
        action="append",
        default=[],
        type=_serial,
        metavar="HEX",
        help="serial number of a certificate to revoke, in hex (repeatable)",
    )
    revoke.add_argument(
        "--cert",
        action="append",
        default=[],
        metavar="FILE",
        help="certificate file to revoke, e.g. NAME.pem from `meshd cert issue` (repeatable)",
    )
    revoke.add_argument(
        "--previous",
        metavar="FILE",
        help="the list in force: every serial it revokes stays revoked, and the new"
        " list's number is one higher (without it the new list is number 1)",
    )
    revoke.add_argument("--out", required=True, metavar="FILE", help="where to write the list")
    revoke.set_defaults(func=_cmd_ca_revoke)


def _add_revocation_parsers(commands: Any) -> None:
    rev = commands.add_parser(
        "revocation", help="hand an agent a revocation list, or show its list", allow_abbrev=False
    )
    rev_commands = rev.add_subparsers(dest="revocation_command", metavar="COMMAND", required=True)
    put = rev_commands.add_parser(
        "put", help="give the agent a list made by `meshd ca revoke`", allow_abbrev=False
    )
    put.add_argument("file", metavar="FILE", help="the revocation list (PEM or DER)")
    put.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(put)
    _add_token_flags(put)
    put.set_defaults(func=_cmd_revocation_put)
    show = rev_commands.add_parser(
        "show", help="show the revocation list in force on the agent", allow_abbrev=False
    )
    show.add_argument("--json", action="store_true", help="print the agent's answer as JSON")
    _add_api_flag(show)
    show.set_defaults(func=_cmd_revocation_show)


# ---------------------------------------------------------------------------
# ca, cert, agent.


def _cmd_ca_create(args: argparse.Namespace) -> int:
    try:
        ca = identity.create_ca(trust_domain=args.trust_domain, days=args.days)
        paths = identity.write_ca(ca, args.out)
    except identity.IdentityError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for path in paths:
        print(path)
    return EXIT_OK


def _cmd_cert_issue(args: argparse.Namespace) -> int:
    try:
        ca = identity.load_ca(args.ca)
        nc = identity.issue_node_cert(
            ca,
            node=args.node,
            cluster=args.cluster,
            ips=args.ip,
            dns=args.dns,
            days=args.days,
            bridge=args.bridge,
        )
        paths = identity.write_node_cert(nc, args.out)
    except identity.IdentityError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for path in paths:
        print(path)
    return EXIT_OK


def _revoked_cert_serial(path_text: str, ca: identity.CA, ca_dir: str) -> int:
    """The serial of the certificate in ``path_text`` (the first one of a chain)."""
    path = Path(path_text)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CommandError(f"certificate {path} does not exist", EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(f"cannot read certificate {path}: {exc.strerror}", EXIT_USAGE) from None
    try:
        if b"-----BEGIN" in data:
            cert = x509.load_pem_x509_certificates(data)[0]
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise CommandError(f"{path} holds no certificate", EXIT_USAGE) from None
    if cert == ca.cert:
        raise CommandError(
            f"{path} is the CA certificate itself; to stop trusting it, make a new CA", EXIT_USAGE
        )
    try:
        cert.verify_directly_issued_by(ca.cert)
    except Exception:  # another issuer or another key: this CA cannot revoke it
        raise CommandError(
            f"certificate {path} was not issued by the CA in {ca_dir}", EXIT_USAGE
        ) from None
    return cert.serial_number


def _cmd_ca_revoke(args: argparse.Namespace) -> int:
    if not args.serial and not args.cert:
        raise CommandError("name a certificate to revoke with --serial or --cert", EXIT_USAGE)
    try:
        ca = identity.load_ca(args.ca)
        serials = list(args.serial)
        serials += [_revoked_cert_serial(c, ca, args.ca) for c in args.cert]
        previous = None
        if args.previous is not None:
            previous = revocation.load_revocation_list(args.previous, ca.cert)
        rl = revocation.create_revocation_list(ca, serials, previous)
        out = revocation.write_revocation_list(args.out, rl)
    except identity.IdentityError as exc:  # RevocationError included
        raise CommandError(str(exc), EXIT_USAGE) from None
    added = len(rl.serials) - (len(previous.serials) if previous is not None else 0)
    print(f"{out}: revocation list number {rl.number} ({len(rl.serials)} revoked, {added} new)")
    return EXIT_OK


def _cmd_agent(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(vars(args))
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    # Imported here: the runtime pulls in the API server and the protocol
    # core, which the client commands do not need and should not wait for.
    from meshd.agent.run import run_agent

    return run_agent(cfg)


# ---------------------------------------------------------------------------
# The HTTP client.


def _api_base(args: argparse.Namespace) -> str:
    url = args.api or os.environ.get(API_ENV) or DEFAULT_API_URL
    source = "--api" if args.api else f"${API_ENV}" if os.environ.get(API_ENV) else "default"
    if "://" not in url:
        # "127.0.0.1:7700" is what people type; it can only mean plain HTTP.
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CommandError(f"{source} must be an http:// URL, not {url!r}", EXIT_USAGE)
    base = url.rstrip("/")
    ca = _api_ca(args)
    if ca is not None and parts.scheme == "https":
        _OPENERS[base] = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_ca_context(ca))
        )
    return base


def _api_ca(args: argparse.Namespace) -> str | None:
    given = getattr(args, "api_ca", None)
    return given or os.environ.get(API_CA_ENV) or None


def _ca_context(ca: str) -> Any:
    """A client context checking the server against the bundle ``ca`` only."""
    import ssl

    try:
        return ssl.create_default_context(cafile=ca)
    except FileNotFoundError:
        raise CommandError(f"API CA file {ca} does not exist", EXIT_USAGE) from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise CommandError(f"cannot use API CA file {ca}: {_reason(exc)}", EXIT_USAGE) from None


def _token(args: argparse.Namespace) -> str | None:
    """The API token for a write: a flag, else the first token variable set, else None."""
    try:
        if args.token is not None:
            return check_token(args.token, "--token")
        if args.token_file is not None:
            return read_token_file(Path(args.token_file), "--token-file")
        for name in TOKEN_ENVS:
            value = os.environ.get(name, "").strip()
            if value:
                return check_token(value, f"${name}")
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    return None


# The agent API is local: an http_proxy meant for the internet must not
# intercept calls to 127.0.0.1, so proxies from the environment are ignored.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: API base -> its opener, when an https:// API is checked against its own CA.
_OPENERS: dict[str, urllib.request.OpenerDirector] = {}


def _call(base: str, method: str, path: str, body: object = None, token: str | None = None) -> Any:
    """One API request with a JSON body (or none); the decoded JSON answer
    (None for an empty body).

    Raises CommandError with the agent's own ``error`` sentence on 4xx/5xx,
    and "cannot reach the agent" when there is no answer at all.
    """
    data = None if body is None else json.dumps(body).encode()
    return _call_bytes(base, method, path, data, "application/json", token)


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _error_sentence(exc: urllib.error.HTTPError) -> str:
    try:
        answer = json.loads(exc.read())
    except (ValueError, OSError):
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, str) and error:
        return error
    return f"the agent answered HTTP {exc.code} {exc.reason}"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, kubectl style; an empty cell shows as '-' so the
    output still splits into the same number of fields with awk."""
    cells = [list(headers)] + [[("-" if v in ("", None) else str(v)) for v in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    gap = " " * _COLUMN_GAP
    lines = [
        gap.join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _quote(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def _app_ref(text: str) -> tuple[str, str]:
    namespace, _, app = text.rpartition("/")
    return (_name(namespace) if namespace else "default"), _name(app)


def _port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    try:
        first, last = _port(lo), _port(hi)
    except argparse.ArgumentTypeError:
        sep = ""
    if not sep or first > last:
        raise argparse.ArgumentTypeError(
            f"must be LO-HI, two ports with LO <= HI, not {text!r:.40}"
        )
    return first, last


def _host(text: str) -> str:
    if not is_host(text):
        raise argparse.ArgumentTypeError(f"must be an IP address or a host name, not {text!r:.80}")
    return text


def _add_gateway_parser(commands: Any) -> None:
    gw = commands.add_parser(
        "gateway",
        help="carry other clusters' connections to this cluster's apps (docs/dapr-gateways.md)",
        allow_abbrev=False,
    )
    gw.add_argument(
        "--app", action="append", required=True, type=_app_ref, metavar="[NS/]APP",
        help="an app whose instances get a port (repeatable; nothing else is reachable)",
    )  # fmt: skip
    gw.add_argument("--ports", required=True, type=_port_range, metavar="LO-HI")
    gw.add_argument("--listen", type=_host, default="127.0.0.1", metavar="HOST")
    gw.add_argument("--advertise", type=_host, metavar="HOST", help="address other clusters dial")
    gw.add_argument("--name", type=_name, default="gateway", help="(default: gateway)")
    gw.add_argument("--check-interval", type=_duration, default="10s", metavar="DUR")
    gw.add_argument("--max-connections", type=_positive_int, metavar="N")
    _add_api_flag(gw)
    _add_token_flags(gw)
    gw.set_defaults(func=_cmd_gateway)


def _cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from meshd import gateway

    if args.listen in ("0.0.0.0", "::") and args.advertise is None:
        raise CommandError("--listen on every address needs --advertise HOST", EXIT_USAGE)
    config = gateway.GatewayConfig(
        api=_api_base(args),
        api_ca=_api_ca(args),
        apps=tuple(dict.fromkeys(args.app)),
        ports=args.ports,
        listen=args.listen,
        advertise=args.advertise or "",
        name=args.name,
        token=_token(args),
        check_interval=args.check_interval,
        max_connections=args.max_connections or gateway.DEFAULT_MAX_CONNECTIONS,
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return asyncio.run(gateway.run_gateway(config))


def _cmd_register(args: argparse.Namespace) -> int:
    if args.check_interval is not None and not (args.check_http or args.check_tcp):
        raise CommandError(
            "--check-interval needs --check-http or --check-tcp (a TTL check has no interval)",
            EXIT_USAGE,
        )
    meta: dict[str, str] = {}
    for key, value in args.meta:
        if key in meta:
            raise CommandError(f"--meta key {key!r} is given twice", EXIT_USAGE)
        meta[key] = value
    # Only what was given is sent: the agent owns the defaults (namespace,
    # protocol, weight), so there is one place that decides them.
    body: dict[str, Any] = {"app": args.app, "address": args.address, "port": args.port}
    if args.namespace is not None:
        body["namespace"] = args.namespace
    if args.protocol is not None:
        body["protocol"] = args.protocol
    if meta:
        body["meta"] = meta
    if args.weight is not None:
        body["weight"] = args.weight
    if args.local_only:
        body["export"] = []
    elif args.export:
        body["export"] = args.export
    interval = args.check_interval or DEFAULT_CHECK_INTERVAL
    if args.check_ttl:
        body["check"] = {"ttl": args.check_ttl}
    elif args.check_http:
        body["check"] = {"http": args.check_http, "interval": interval}
    elif args.check_tcp:
        body["check"] = {"tcp": args.check_tcp, "interval": interval}
    base = _api_base(args)
    answer = _call(base, "PUT", f"/v1/apps/{_quote(args.instance)}", body, _token(args))
    if args.json:
        _print_json(answer)
    else:
        version = answer.get("version") if isinstance(answer, dict) else None
        suffix = f" (version {version})" if version is not None else ""
        print(f"registered {args.instance}{suffix}")
    return EXIT_OK


def _cmd_deregister(args: argparse.Namespace) -> int:
    base = _api_base(args)
    answer = _call(base, "DELETE", f"/v1/apps/{_quote(args.instance)}", token=_token(args))
    if args.json:
        _print_json(answer)
    else:
        print(f"deregistered {args.instance}")
    return EXIT_OK


def _rows(answer: Any, key: str | None, what: str) -> list[dict[str, Any]]:
    items = answer.get(key) if key is not None and isinstance(answer, dict) else answer
    if items is None:
        items = []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CommandError(f"the agent's {what} answer is not in the expected form")
    return items


def _cmd_resolve(args: argparse.Namespace) -> int:
    query = {}
    if args.namespace is not None:
        query["namespace"] = args.namespace
    if args.all:
        query["all"] = "1"
    path = f"/v1/resolve/{_quote(args.app)}"
    if query:
        path += "?" + urllib.parse.urlencode(query)
    answer = _call(_api_base(args), "GET", path)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    columns = ("instance", "address", "port", "node", "cluster", "zone", "health", "tier")
    rows = [[e.get(c) for c in columns] for e in _rows(answer, "endpoints", "resolve")]
    print(format_table([c.upper() for c in columns], rows))
    return EXIT_OK


def _cmd_members(args: argparse.Namespace) -> int:
    path = "/v1/members"
    if args.cluster is not None:
        path += "?" + urllib.parse.urlencode({"cluster": args.cluster})
    answer = _call(_api_base(args), "GET", path)
    if args.json:
        _print_json(answer)
        return EXIT_OK
    columns = ("node", "cluster", "region", "zone", "address", "status", "incarnation")
    rows = [[m.get(c) for c in columns] for m in _rows(answer, None, "members")]
    print(format_table([c.upper() for c in columns], rows))
    return EXIT_OK


def _call_bytes(
    base: str,
    method: str,
    path: str,
    data: bytes | None,
    content_type: str,
    token: str | None = None,
) -> Any:
    """As :func:`_call`, for any body (a revocation list is PEM or DER)."""
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token is not None:
        request.add_header("X-Consul-Token", token)
    try:
        with _OPENERS.get(base, _OPENER).open(request, timeout=HTTP_TIMEOUT) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        raise CommandError(_error_sentence(exc)) from None
    except urllib.error.URLError as exc:
        raise CommandError(f"cannot reach the agent at {base}: {_reason(exc.reason)}") from None
    except OSError as exc:  # reset or timeout mid-answer
        raise CommandError(f"cannot reach the agent at {base}: {_reason(exc)}") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise CommandError(
            f"the agent at {base} answered {method} {path} with invalid JSON"
        ) from None


def _read_revocation_file(path: Path) -> tuple[bytes, str]:
    """The bytes of a list file to send, and their content type.  Only the form
    is checked here; the agent verifies the signature against its CA."""
    try:
        with path.open("rb") as f:
            data = f.read(revocation.MAX_CRL_BYTES * 2 + 1)
    except FileNotFoundError:
        raise CommandError(f"revocation list {path} does not exist", EXIT_USAGE) from None
    except OSError as exc:
        raise CommandError(
            f"cannot read revocation list {path}: {exc.strerror}", EXIT_USAGE
        ) from None
    if len(data) > revocation.MAX_CRL_BYTES * 2:
        raise CommandError(f"{path} is too large to be a revocation list", EXIT_USAGE)
    try:
        if b"-----BEGIN X509 CRL-----" in data:
            x509.load_pem_x509_crl(data)
            return data, "application/x-pem-file"
        x509.load_der_x509_crl(data)
    except ValueError:
        raise CommandError(
            f"{path} holds no revocation list (make one with `meshd ca revoke`)", EXIT_USAGE
        ) from None
    return data, "application/pkix-crl"


def _cmd_revocation_put(args: argparse.Namespace) -> int:
    data, content_type = _read_revocation_file(Path(args.file))
    base = _api_base(args)
    answer = _call_bytes(base, "PUT", "/v1/revocations", data, content_type, token=_token(args))
    if args.json:
        _print_json(answer)
        return EXIT_OK
    if not isinstance(answer, dict) or not isinstance(answer.get("number"), int):
        raise CommandError("the agent's revocation answer is not in the expected form")
    print(f"revocation list number {answer['number']} in force ({answer.get('revoked')} revoked)")
    return EXIT_OK


def _cmd_revocation_show(args: argparse.Namespace) -> int:
    answer = _call(_api_base(args), "GET", "/v1/revocations")
    if args.json:
        _print_json(answer)
        return EXIT_OK
    revoked = answer.get("revoked") if isinstance(answer, dict) else None
    number = answer.get("number") if isinstance(answer, dict) else None
    if not isinstance(number, int) or not isinstance(revoked, list):
        raise CommandError("the agent's revocation answer is not in the expected form")
    if number == 0:
        print("no revocation list")
        return EXIT_OK
    # The serials one a line after a header, so `tail -n +2` lists them alone.
    print(f"revocation list number {number} ({len(revoked)} revoked)")
    for serial in revoked:
        print(serial)
    return EXIT_OK


# ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    # The contract promises one line; a path or value with a newline in it
    # must not break that.
    return " ".join(text.split("\n"))


def main(argv: list[str] | None = None) -> int:
    """Run one ``meshd`` command; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: keep main() returning
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    try:
        return int(args.func(args))
    except CommandError as exc:
        print(f"meshd: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``meshd resolve --json | head``): not an error
        # of ours.  Point stdout at /dev/null so the interpreter's final flush
        # does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
