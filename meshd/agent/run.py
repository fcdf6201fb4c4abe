"""``meshd agent``: start everything in order, or nothing at all.

Order matters for "nothing half-started": state directory and certificates
are checked first (no socket yet), then the gossip listener is bound, then
the API listener; only when both are bound does the core start and contact
peers.  A failure at any step closes what earlier steps opened and exits 2
with one line on stderr.  SIGTERM (and SIGINT) leave gracefully and exit 0
within a few seconds, whatever clients wait for: the API stops accepting
connections, every blocking query answers at once (the agent's
``stop_waiting``), requests still running get :data:`API_DRAIN_TIMEOUT`,
then the node leaves and the state directory is released;
SIGHUP, or a change of the certificate files, rotates to a renewed
certificate for the same node without touching membership (rotation.py).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import contextlib
import ipaddress
import logging
import math
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from meshd.agent.config import AgentConfig, ConfigError, is_loopback, read_token_file
from meshd.agent.rotation import CertificateRotator
from meshd.agent.statedb import StateDB, StateError, ensure_state_dir
from meshd.agent.transport import (
    MAX_INBOUND_CONNECTIONS,
    MAX_OUTBOUND_CONNECTIONS,
    Transport,
    make_client_context,
    make_server_context,
)
from meshd.api.listener import (
    MAX_API_CONNECTIONS,
    MAX_API_CONNECTIONS_PER_ADDRESS,
    ApiListener,
)
from meshd.identity import (
    IdentityError,
    NodeCert,
    StateVerifier,
    create_ca,
    issue_node_cert,
    load_node_cert,
    write_ca,
    write_node_cert,
)
from meshd.metrics import Metrics
from meshd.policy.policy import (
    AppPolicy,
    Policy,
    PolicyError,
    load_policy_file,
    parse_policy,
)
from meshd.protocol.config import Config

if TYPE_CHECKING:
    from meshd.agent.agent import Agent
    from meshd.api.dns import DNSServer

log = logging.getLogger("meshd.agent")

#: Seconds between checks of the policy file's modification time: an edit
#: applies within this (the issue asks for within a second).
POLICY_POLL_INTERVAL = 0.25
#: Seconds a request may still run once the agent stops accepting connections,
#: before it is cut.  Blocking queries are
#: answered at once; what remains is a write waiting on the disk, whose
#: client may retry.  Short: the state directory stays locked until then.
API_DRAIN_TIMEOUT = 1.0


class StartError(Exception):
    """A reason not to start, said in one sentence."""


def _protocol_config(profile: str) -> Config:
    return {"lan": Config.lan, "wan": Config.wan, "local": Config.local}[profile]()


def _dev_identity(cfg: AgentConfig, state_dir: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and node certificate kept in the state directory."""
    tls = state_dir / "tls"
    ca_pem, cert_pem, key_pem = tls / "ca.pem", tls / f"{cfg.node}.pem", tls / f"{cfg.node}.key"
    if not (ca_pem.exists() and cert_pem.exists() and key_pem.exists()):
        ca = create_ca("mesh.local")
        write_ca(ca, tls, overwrite=True)
        write_node_cert(
            issue_node_cert(
                ca,
                cfg.node,
                cfg.cluster,
                ips=["127.0.0.1"],
                dns=["localhost"],
                bridge=cfg.wan_bind is not None,
            ),
            tls,
        )
    return ca_pem, cert_pem, key_pem


def _wan_protocol_config(profile: str) -> Config:
    # The WAN pool uses WAN timings, except on one host (profile "local")
    # where both pools run on loopback and slow timings only slow tests down.
    return Config.local() if profile == "local" else Config.wan()


def _load_policy(cfg: AgentConfig) -> Policy:
    try:
        if cfg.policy_file is not None:
            return load_policy_file(cfg.policy_file)
        if cfg.policy_table is not None:
            return parse_policy(cfg.policy_table, source=f"{cfg.config_file} [policy]")
    except PolicyError as exc:
        raise StartError(str(exc)) from None
    return Policy(AppPolicy(), {})


def _reload_policy(cfg: AgentConfig, agent: Agent) -> None:
    """Re-read the policy file; an invalid one is refused and the old one stays."""
    if cfg.policy_file is None:
        return
    try:
        agent.set_policy(load_policy_file(cfg.policy_file))
        log.info("policy reloaded from %s", cfg.policy_file)
    except PolicyError as exc:
        log.error("policy not changed: %s", exc)


async def _watch_policy(cfg: AgentConfig, agent: Agent) -> None:
    """Apply an edited policy file within a second, without a restart or SIGHUP."""
    if cfg.policy_file is None:
        return
    path = Path(cfg.policy_file)

    def stamp() -> tuple[int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    last = stamp()
    while True:
        await asyncio.sleep(POLICY_POLL_INTERVAL)
        now = stamp()
        if now is not None and now != last:
            last = now
            _reload_policy(cfg, agent)


def _warn_if_world_readable(key_file: Path) -> None:
    """Say so when any local user can read this node's key: with it they speak
    as this node to the whole mesh.  Group access is left alone (Kubernetes
    mounts keys group-readable for the pod's fsGroup)."""
    try:
        mode = key_file.stat().st_mode
    except OSError:
        return  # load_node_cert says what is wrong with it
    if mode & 0o007:
        log.warning(
            "TLS key file %s is readable by every user (mode %o): anyone on this host"
            " can speak as this node; chmod 600 it",
            key_file,
            mode & 0o777,
        )


def _api_token(cfg: AgentConfig) -> str | None:
    """The API token: as load_config read it, or from the file when only its path is set."""
    if cfg.api_token_file is None:
        return cfg.api_token
    try:
        mode = cfg.api_token_file.stat().st_mode
    except OSError:
        mode = 0
    if mode & 0o077:
        # Anyone who can read the token can write to the API: worth a line,
        # not a refusal (a group-readable file may be deliberate).
        log.warning(
            "API token file %s is readable by other users (mode %o); chmod 600 it",
            cfg.api_token_file,
            mode & 0o777,
        )
    if cfg.api_token is not None:
        return cfg.api_token
    try:
        return read_token_file(cfg.api_token_file, "api_token_file")
    except ConfigError as exc:
        raise StartError(str(exc)) from None


def _advertise_of(given: tuple[str, int] | None, bound: tuple[str, int]) -> str:
    """The address peers should dial: ``given`` (its port 0: the bound one),
    else the bound address, with a wildcard replaced by the address our host
    name resolves to (a peer cannot dial 0.0.0.0); LAN and WAN alike."""
    if given is not None:
        host, port = given
        port = port or bound[1]
    else:
        host, port = bound
        if ipaddress.ip_address(host).is_unspecified:
            try:
                host = socket.gethostbyname(socket.gethostname())
            except OSError:
                host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _advertise(cfg: AgentConfig, bound: tuple[str, int]) -> str:
    return _advertise_of(cfg.advertise, bound)


def _why(exc: OSError) -> str:
    """The operating system's reason, without asyncio's wrapping of it."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _api_refusal(metrics: Metrics) -> Callable[[str], None]:
    """Count a connection refused at one of the API's caps; say so at most
    once a minute."""
    last = [-math.inf]

    def refused(reason: str) -> None:
        metrics.rejected.labels(reason).inc()
        now = time.monotonic()
        if now - last[0] >= 60.0:
            last[0] = now
            log.warning(
                "API connection refused (%s): at most %d open, %d from one address"
                " (meshd_rejected_total counts them)",
                reason,
                MAX_API_CONNECTIONS,
                MAX_API_CONNECTIONS_PER_ADDRESS,
            )

    return refused


def _api_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """The HTTPS API's server context: this node's certificate, TLS 1.2 or
    later (Consul clients in several languages speak 1.2), no client
    certificate asked for (writes carry the API token)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


#: File descriptors the caps can take: the API's connections, both
#: directions of a LAN and a WAN transport, and room for the state database,
#: the DNS sockets and the listeners.
FDS_NEEDED = MAX_API_CONNECTIONS + 2 * (MAX_INBOUND_CONNECTIONS + MAX_OUTBOUND_CONNECTIONS) + 256


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one, as Go servers (Serf,
    Consul) do at start: the caps decide how many connections we hold, and a
    soft limit below them (1024 is common) would fail accepts and connects
    first, gossip ones included.  Warn when even the hard limit is below."""
    import resource

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except OSError:  # a system call filter may refuse even the question
        return
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    if soft != resource.RLIM_INFINITY and soft < FDS_NEEDED:
        log.warning(
            "the open files limit is %d, below the %d the connection caps may take:"
            " raise it (LimitNOFILE=, ulimit -n) or floods may fail gossip connections",
            soft,
            FDS_NEEDED,
        )


async def _serve(cfg: AgentConfig) -> int:
    loop = asyncio.get_running_loop()
    _raise_open_files_limit()
    # Undo steps, sync or async (a coroutine result is awaited), run in reverse on failure.
    cleanup: list[Callable[[], object]] = []
    try:
        if cfg.state_dir is None:
            state_dir = Path(tempfile.mkdtemp(prefix="meshd-dev-"))
        else:
            state_dir = Path(cfg.state_dir)
        try:
            # 0700 whatever the umask: it holds the registrations and dev keys.
            ensure_state_dir(state_dir)
        except StateError as exc:
            raise StartError(str(exc)) from None

        if cfg.dev and cfg.tls_cert is None:
            ca_file, cert_file, key_file = _dev_identity(cfg, state_dir)
        else:
            assert cfg.tls_ca and cfg.tls_cert and cfg.tls_key
            ca_file, cert_file, key_file = cfg.tls_ca, cfg.tls_cert, cfg.tls_key
        _warn_if_world_readable(key_file)
        try:
            node_cert: NodeCert = load_node_cert(cert_file, key_file, ca_file)
            server_ctx = make_server_context(str(ca_file), str(cert_file), str(key_file))
            client_ctx = make_client_context(str(ca_file), str(cert_file), str(key_file))
            api_ctx = _api_context(cert_file, key_file) if cfg.api_tls else None
        except IdentityError as exc:
            raise StartError(str(exc)) from None
        except ssl.SSLError as exc:
            raise StartError(f"cannot use the TLS files: {exc}") from None
        if node_cert.node != cfg.node or node_cert.cluster != cfg.cluster:
            raise StartError(
                f"certificate {cert_file} is for node {node_cert.node!r} in cluster "
                f"{node_cert.cluster!r}, not node {cfg.node!r} in cluster {cfg.cluster!r}"
            )
        if cfg.wan_bind is not None and not node_cert.bridge:
            raise StartError(
                f"certificate {cert_file} does not grant the bridge role that --wan-bind needs"
                " (issue it with `meshd cert issue --bridge`)"
            )

        metrics = Metrics()

        async def listener(what: str, bind: tuple[str, int]) -> tuple[Transport, tuple[str, int]]:
            # The agent wires the callbacks once its cores exist.
            t = Transport(
                server_ctx=server_ctx,
                client_ctx=client_ctx,
                ca_certs=[node_cert.ca_cert],
                trust_domain=node_cert.trust_domain,
                metrics=metrics,
                on_message=lambda peer, msg: None,
                on_refused=lambda addr: None,
            )
            try:
                bound = await t.listen(*bind)
            except OSError as exc:
                raise StartError(
                    f"cannot listen for {what} on {_fmt(*bind)}: {_why(exc)}"
                ) from None
            cleanup.append(t.close)
            return t, bound

        transport, bound = await listener("gossip", cfg.bind)
        advertise = _advertise(cfg, bound)
        wan_transport = None
        wan_advertise = ""
        if cfg.wan_bind is not None:
            wan_transport, wan_bound = await listener("WAN gossip", cfg.wan_bind)
            wan_advertise = _advertise_of(cfg.wan_advertise, wan_bound)

        policy = _load_policy(cfg)
        api_token = _api_token(cfg)

        from meshd.agent.agent import Agent
        from meshd.api.app import create_app

        agent = Agent(
            node_cert=node_cert,
            # The wall clock: a signer whose certificate has expired is refused
            # at every verification, not only at the TLS handshake.
            verifier=StateVerifier(
                node_cert.ca_cert, node_cert.trust_domain, clock=lambda: datetime.now(UTC)
            ),
            transport=transport,
            metrics=metrics,
            protocol=_protocol_config(cfg.profile),
            region=cfg.region,
            zone=cfg.zone,
            advertise=advertise,
            wan_transport=wan_transport,
            wan_protocol=_wan_protocol_config(cfg.profile),
            wan_advertise=wan_advertise,
            gateway=_fmt(*cfg.gateway) if cfg.gateway else "",
            policy=policy,
            reap_after=cfg.reap_after,
            node_meta=cfg.node_meta,
        )
        # No access log: a ?token= in a logged URL would hand the token to
        # whoever reads the log.
        app = create_app(agent, api_token=api_token)

        # on_shutdown runs after the listener stopped accepting and before it
        # waits for the requests in progress.
        app.on_shutdown.append(lambda app: agent.stop_waiting())
        api_listener = ApiListener(
            app, cfg.api[0], cfg.api[1], ssl_context=api_ctx, on_refused=_api_refusal(metrics)
        )
        try:
            await api_listener.start()
        except OSError as exc:
            raise StartError(
                f"cannot listen for the API on {_fmt(*cfg.api)}: {_why(exc)}"
            ) from None
        cleanup.append(api_listener.close)
        api_host, api_port = api_listener.address
        dns_server, dns_bound = await _start_dns(cfg, agent, metrics)
        if dns_server is not None:
            cleanup.append(dns_server.close)

        # Last, so that a port in use or a bad certificate leaves no state behind.
        try:
            db = StateDB.open(state_dir / "meshd.db")
        except StateError as exc:
            raise StartError(str(exc)) from None
        cleanup.append(db.close)
        agent.attach_statedb(db)

        try:
            agent.start(list(cfg.join), list(cfg.wan_join))
        except StateError as exc:  # e.g. a full disk: versions cannot be reserved
            raise StartError(str(exc)) from None
        cleanup.remove(transport.close)  # the agent closes it on stop
        if wan_transport is not None:
            cleanup.remove(wan_transport.close)
    except StartError:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                r = fn()
                if asyncio.iscoroutine(r):
                    await r
        raise

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    rotator = CertificateRotator(
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        current=node_cert,
        transports=[transport, wan_transport],
        api_contexts=[api_ctx] if api_ctx is not None else [],
        agent=agent,
        revoked=lambda serial: (
            (held := agent.revocations()) is not None and held.is_revoked(serial)
        ),
    )
    watchers = [
        loop.create_task(_watch_policy(cfg, agent)),
        loop.create_task(rotator.watch()),
    ]

    def reload() -> None:
        _reload_policy(cfg, agent)
        rotator.reload_soon("SIGHUP")

    loop.add_signal_handler(signal.SIGHUP, reload)
    if wan_transport is not None:
        log.info("bridge: WAN gossip on %s", wan_advertise)
    # The DNS address is appended only when DNS is on, so the contract's line
    # stays as it was for everyone else.
    dns_part = "" if dns_bound is None else f" dns={_fmt(*dns_bound)}"
    scheme = "https" if api_ctx is not None else "http"
    print(
        f"meshd agent ready api={scheme}://{_fmt(api_host, api_port)} gossip={advertise}{dns_part}",
        file=sys.stderr,
        flush=True,
    )
    if cfg.dev:
        log.info("dev mode: state and throwaway certificates in %s", state_dir)
    await stop.wait()
    for task in watchers:
        task.cancel()
    try:
        # The API and DNS first: a client's wait must not hold up the leave,
        # nor the state directory a restarted agent needs.
        await api_listener.close(API_DRAIN_TIMEOUT)
        if dns_server is not None:
            await dns_server.close()
        log.info("leaving the mesh")
        await agent.stop(leave=True)
    finally:
        db.close()
    if cfg.state_dir is None:  # a throwaway dev directory dies with its agent
        shutil.rmtree(state_dir, ignore_errors=True)
    return 0


async def _start_dns(
    cfg: AgentConfig, agent: Agent, metrics: Metrics
) -> tuple[DNSServer | None, tuple[str, int] | None]:
    """The DNS listener when ``--dns`` is set: bound now, or StartError."""
    if cfg.dns is None:
        return None, None
    # Imported here: dnspython is only loaded by agents that answer DNS.
    from meshd.api.dns import DNSConfig, DNSServer

    server = DNSServer(agent, DNSConfig(domain=cfg.dns_domain, ttl=cfg.dns_ttl), metrics)
    try:
        bound = await server.start(*cfg.dns)
    except OSError as exc:
        raise StartError(f"cannot listen for DNS on {_fmt(*cfg.dns)}: {_why(exc)}") from None
    if not is_loopback(cfg.dns[0]):
        # Unauthenticated and UDP: whoever reaches it reads the inventory, and a
        # forged source address can aim its answers at someone else.
        log.warning(
            "DNS answers on %s, off loopback: anyone who reaches it can list the"
            " apps this node sees",
            _fmt(*bound),
        )
    return server, bound


#: Read buffer of one TLS connection: the most bytes taken from the socket in
#: one go.  CPython's asyncio gives each a zero-filled (so resident) 256 KiB
#: buffer; an agent keeps up to two gossip connections per peer, which made
#: idle memory grow by about 0.6 MB per peer (benchmarks/RESULTS.md).  Idle
#: gossip frames are far smaller than a page, and a larger frame (a push-pull)
#: still arrives, in page-sized pieces, at the cost of a few more reads: 4 KiB
#: instead of 16 KiB saved 24 KB per pair of connections, 0.7 MB at 32 agents.
TLS_READ_BUFFER = 4 * 1024


def run_agent(cfg: AgentConfig) -> int:
    logging.basicConfig(
        level=getattr(logging, cfg.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A class attribute asyncio reads when it builds each TLS protocol; the
    # agent process is ours, so the whole process gets the smaller buffer.
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    try:
        return asyncio.run(_serve(cfg))
    except StartError as exc:
        print(f"meshd: error: {exc}", file=sys.stderr, flush=True)
        return 2
