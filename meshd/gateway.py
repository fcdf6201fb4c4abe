"""``meshd gateway``: one TCP port per instance, so Dapr can cross into this cluster.

Why ports and not SNI (docs/dapr-gateways.md has the sources): a Dapr
sidecar dials ``Service.Address:Meta.DAPR_PORT`` from a Consul answer, in
plain gRPC when its mTLS is off and with no SNI for an IP address when it is
on; it checks the peer's SPIFFE ID, never the host name.  So the only thing a
TCP gateway can route a sidecar's connection on is the port it arrives at.

What it does, next to one agent of the cluster it serves (the *local agent*):

1. Reads the instances of the apps the operator lists (``--app``) in the
   local agent's own cluster, with the native API's blocking
   ``GET /v1/resolve/{app}?all=1``, so it wakes on any change.
2. Gives each one a port of ``--ports LO-HI`` (:func:`allocate`: a port,
   once given, stays while the instance exists; a new one starts at a hash
   of its name, so a restarted gateway mostly picks the same ports again).
3. Listens on each port and pipes every accepted connection to the
   instance's ``DAPR_PORT`` (its ``port`` when it has none), bytes untouched:
   Dapr's mTLS runs end to end through it.
4. Publishes each route as a record of app ``meshd-gateway``
   (meshd/policy/gateway.py) on the local agent, with a TCP check of its
   port, so a dead gateway's routes turn critical and other clusters' Consul
   answers stop sending Dapr there; SIGTERM deregisters them.

Only listed apps are carried: a gateway is a door into the cluster, and an
instance nobody asked to expose (a ``--local-only`` one, say) must not get a
port.  Caps: at most :data:`MAX_ROUTES` routes and ``--max-connections`` open
connections (past it a new one is closed at once); a backend that does not
accept within :data:`CONNECT_TIMEOUT` closes the client's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import signal
import ssl
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp

from meshd.policy.gateway import ROUTE_APP, ROUTE_NAMESPACE, Route, route_of

log = logging.getLogger("meshd.gateway")

#: Routes one gateway carries at most: each is a listening socket (a file
#: descriptor) and a record on the local agent, which holds at most 512.
MAX_ROUTES = 256
#: Connections piped at once, unless ``--max-connections`` says otherwise.
DEFAULT_MAX_CONNECTIONS = 1024
#: Seconds a backend gets to accept before the client's connection is closed.
CONNECT_TIMEOUT = 5.0
#: Bytes read at once from either side of a piped connection.
CHUNK = 64 * 1024
#: Seconds a blocking query to the local agent waits (the agent caps it at 300).
WATCH_WAIT = 60
#: Seconds between retries while the local agent cannot be reached.
RETRY_MIN, RETRY_MAX = 0.5, 10.0
#: The meta key holding a Dapr sidecar's internal gRPC port.
DAPR_PORT_KEY = "DAPR_PORT"

#: What a failed or garbled exchange with the local agent raises: retried, never fatal.
_AGENT_ERRORS = (
    aiohttp.ClientError,
    OSError,
    TimeoutError,
    RuntimeError,
    ValueError,
    LookupError,
    TypeError,
)

#: (namespace, app, instance): what one route leads to.
Key = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    api: str
    #: (namespace, app) of every app the gateway carries.
    apps: tuple[tuple[str, str], ...]
    #: First and last port of the range routes take their ports from.
    ports: tuple[int, int]
    listen: str = "127.0.0.1"
    #: The address other clusters dial; the listen address unless that is 0.0.0.0/::.
    advertise: str = ""
    #: Route records are named ``<name>-<port>``: two gateways on one agent need two names.
    name: str = "gateway"
    token: str | None = None
    #: CA bundle an https:// API is checked against (None: the system's).
    api_ca: str | None = None
    check_interval: str = "10s"
    max_connections: int = DEFAULT_MAX_CONNECTIONS

    @property
    def public(self) -> str:
        return self.advertise or self.listen


@dataclass(frozen=True, slots=True)
class Target:
    """Where a route's connections go: one instance's address and port."""

    host: str
    port: int


def _dial_port(endpoint: Mapping[str, Any]) -> int | None:
    meta = endpoint.get("meta")
    dapr = meta.get(DAPR_PORT_KEY) if isinstance(meta, dict) else None
    if isinstance(dapr, str) and dapr.isascii() and dapr.isdecimal() and 0 < int(dapr) < 65536:
        return int(dapr)
    port = endpoint.get("port")
    return port if type(port) is int and 0 < port < 65536 else None


def targets_from(cluster: str, namespace: str, answer: Any) -> dict[Key, Target]:
    """The instances of one ``/v1/resolve`` answer that live in ``cluster``."""
    out: dict[Key, Target] = {}
    endpoints = answer.get("endpoints") if isinstance(answer, dict) else None
    for e in endpoints if isinstance(endpoints, list) else ():
        if not isinstance(e, dict) or e.get("cluster") != cluster or "gateway" in e:
            continue
        app, instance, host = e.get("app", answer.get("app")), e.get("instance"), e.get("address")
        port = _dial_port(e)
        if isinstance(app, str) and isinstance(instance, str) and isinstance(host, str) and port:
            out[(namespace, app, instance)] = Target(host, port)
    return out


def _start(key: Key, size: int) -> int:
    digest = hashlib.blake2b("\0".join(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % size


def allocate(
    keys: Iterable[Key],
    previous: Mapping[Key, int],
    ports: tuple[int, int],
    unusable: Iterable[int] = (),
) -> dict[Key, int]:
    """A port of ``ports`` (inclusive) for each key, at most :data:`MAX_ROUTES`.

    A key keeps the port ``previous`` gave it (a client holding it keeps
    working); a new key probes upwards from a hash of itself, so the result
    hardly depends on the order keys arrive in.  Keys that find no port are
    left out (the caller logs them); ``unusable`` ports are never given.
    """
    lo, hi = ports
    size = hi - lo + 1
    wanted = sorted(set(keys))
    bad = set(unusable)
    out: dict[Key, int] = {}
    taken: set[int] = set()
    for key in wanted:
        port = previous.get(key)
        if port is not None and lo <= port <= hi and port not in bad and port not in taken:
            out[key] = port
            taken.add(port)
    for key in wanted:
        if key in out or len(out) >= MAX_ROUTES:
            continue
        start = _start(key, size)
        for step in range(size):
            port = lo + (start + step) % size
            if port not in taken and port not in bad:
                out[key] = port
                taken.add(port)
                break
    return out


@dataclass(slots=True)
class _Listener:
    key: Key
    target: Target
    server: asyncio.Server
    published: bool = False


@dataclass(slots=True)
class Gateway:
    """The running gateway: its listeners, the routes it published, its connections."""

    config: GatewayConfig
    session: aiohttp.ClientSession
    cluster: str = ""
    listeners: dict[int, _Listener] = field(default_factory=dict)
    #: Ports that failed to bind (in use by something else): never given again.
    unusable: set[int] = field(default_factory=set)
    connections: int = 0
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    # -- the local agent -------------------------------------------------------

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"X-Consul-Token": self.config.token} if self.config.token else {}
        timeout = aiohttp.ClientTimeout(total=WATCH_WAIT + 30)
        async with self.session.request(
            method, self.config.api + path, json=body, headers=headers, timeout=timeout
        ) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path} answered {resp.status}: {text[:200]}")
            return await resp.json(content_type=None) if text else None

    def _record_name(self, port: int) -> str:
        return f"{self.config.name}-{port}"

    async def previous_routes(self) -> dict[Key, int]:
        """Routes this gateway published before a restart: their ports are reused."""
        out: dict[Key, int] = {}
        prefix = self.config.name + "-"
        for reg in await self._call("GET", "/v1/apps") or []:
            if not isinstance(reg, dict) or reg.get("app") != ROUTE_APP:
                continue
            if not str(reg.get("instance", "")).startswith(prefix):
                continue
            route = route_of(reg.get("meta") or {})
            if route is not None:
                out[(route.namespace, route.app, route.instance)] = route.port
        return out

    async def read_targets(self, index: int) -> tuple[int, dict[Key, Target]]:
        """Every carried instance; the first app's query blocks until the index passes ``index``."""
        targets: dict[Key, Target] = {}
        newest = index
        for i, (namespace, app) in enumerate(self.config.apps):
            query = f"?namespace={quote(namespace)}&all=1"
            if i == 0 and index > 0:
                query += f"&index={index}&wait={WATCH_WAIT}s"
            answer = await self._call("GET", f"/v1/resolve/{quote(app, safe='')}{query}")
            if isinstance(answer, dict) and type(answer.get("index")) is int:
                newest = max(newest, answer["index"])
            targets.update(targets_from(self.cluster, namespace, answer))
        return newest, targets

    # -- routes ----------------------------------------------------------------

    async def apply(self, targets: Mapping[Key, Target], previous: Mapping[Key, int]) -> None:
        """Make listeners and route records match ``targets``."""
        current = {lst.key: port for port, lst in self.listeners.items()}
        wanted = allocate(targets, {**previous, **current}, self.config.ports, self.unusable)
        for key in targets.keys() - wanted.keys():
            log.warning("gateway: no free port in %s-%s for %s", *self.config.ports, "/".join(key))
        for port in [p for p, lst in self.listeners.items() if wanted.get(lst.key) != p]:
            await self._remove(port)
        for key, port in wanted.items():
            lst = self.listeners.get(port)
            if lst is None:
                try:
                    server = await asyncio.start_server(
                        functools.partial(self._accept, port), self.config.listen, port
                    )
                except OSError as exc:
                    log.warning("gateway: cannot listen on port %d (%s); skipping it", port, exc)
                    self.unusable.add(port)
                    continue
                lst = self.listeners[port] = _Listener(key, targets[key], server)
            lst.target = targets[key]  # an instance that moved: new connections follow it
            if not lst.published:
                await self._publish(port, key)
                lst.published = True

    async def _publish(self, port: int, key: Key) -> None:
        route = Route(*key, address=self.config.public, port=port)
        check_host = (
            self.config.public if self.config.listen in ("0.0.0.0", "::") else self.config.listen
        )
        check_host = f"[{check_host}]" if ":" in check_host else check_host
        body = {
            "app": ROUTE_APP,
            "namespace": ROUTE_NAMESPACE,
            "address": self.config.public,
            "port": port,
            "protocol": "tcp",
            "meta": route.meta(),
            "check": {"tcp": f"{check_host}:{port}", "interval": self.config.check_interval},
        }
        await self._call("PUT", f"/v1/apps/{quote(self._record_name(port), safe='')}", body)

    async def _remove(self, port: int) -> None:
        lst = self.listeners.pop(port)
        lst.server.close()
        if lst.published:
            await self._deregister(port)

    async def _deregister(self, port: int) -> None:
        with contextlib.suppress(RuntimeError):  # already gone
            await self._call("DELETE", f"/v1/apps/{quote(self._record_name(port), safe='')}")

    async def forget_stale(self, previous: Mapping[Key, int]) -> None:
        """Deregister records of an earlier run that no longer carry a route."""
        live = {(lst.key, port) for port, lst in self.listeners.items()}
        for key, port in previous.items():
            if (key, port) not in live and port not in self.listeners:
                await self._deregister(port)

    async def close(self) -> None:
        for port in list(self.listeners):
            with contextlib.suppress(aiohttp.ClientError, OSError, RuntimeError):
                await self._remove(port)
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    # -- piping ----------------------------------------------------------------

    def _accept(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        lst = self.listeners.get(port)
        if lst is None or self.connections >= self.config.max_connections:
            writer.close()
            return
        self.connections += 1
        task = asyncio.ensure_future(self._pipe(lst.target, reader, writer))
        self._pipes.add(task)
        task.add_done_callback(self._pipes.discard)

    async def _pipe(
        self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT
            )
            upstream = up_writer
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        except (OSError, TimeoutError):
            pass  # the backend is down or went away: the client sees its connection close
        finally:
            self.connections -= 1
            for w in (writer, upstream):
                if w is not None:
                    w.close()


async def _copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Bytes from ``src`` to ``dst`` until EOF, then half-close ``dst``: the other way goes on."""
    try:
        while data := await src.read(CHUNK):
            dst.write(data)
            await dst.drain()  # back-pressure: never buffer more than one chunk per side
        if dst.can_write_eof():
            dst.write_eof()
    except OSError:
        dst.close()


async def run_gateway(config: GatewayConfig) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connector = None
    if config.api_ca is not None and config.api.startswith("https://"):
        connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=config.api_ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        gw = Gateway(config, session)
        watcher = asyncio.ensure_future(_watch(gw))
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({watcher, stopper}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await gw.close()
        if watcher.done() and not watcher.cancelled() and watcher.exception() is not None:
            print(f"meshd: error: {watcher.exception()}", file=sys.stderr)
            return 1
    return 0


async def _watch(gw: Gateway) -> None:
    delay = RETRY_MIN
    previous: dict[Key, int] = {}
    index = 0
    ready = False
    while True:
        try:
            if not gw.cluster:
                config = (await gw._call("GET", "/v1/agent/self"))["Config"]
                previous = await gw.previous_routes()
                gw.cluster = str(config["Datacenter"])
            index, targets = await gw.read_targets(index)
            # An earlier run's ports count once: afterwards the listeners'
            # own ports are the ones clients hold.
            await gw.apply(targets, {} if ready else previous)
            if not ready:
                await gw.forget_stale(previous)
                lo, hi = gw.config.ports
                print(
                    f"meshd gateway ready cluster={gw.cluster} routes={len(gw.listeners)}"
                    f" ports={lo}-{hi}",
                    file=sys.stderr,
                    flush=True,
                )
                ready = True
            delay = RETRY_MIN
        except _AGENT_ERRORS as exc:
            log.warning("gateway: local agent: %s; retrying in %.1f s", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
