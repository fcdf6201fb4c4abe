"""End to end: Dapr's consul name resolution across a real ``meshd gateway``.

Two clusters, east (e0 bridge, e1) and west (w0 bridge); east declares a
gateway.  An app in east has a real TCP echo server as its Dapr sidecar's
internal gRPC port and registers the way Dapr's resolver does (py-consul,
HTTP check, ``Meta.DAPR_PORT``).  From west, Dapr's lookup is replayed with
py-consul (``health.service(name, passing=True)``), the address computed as
the resolver computes it (``Service.Address`` else ``Node.Address``, then
``Meta.DAPR_PORT``), and bytes sent there must come back through the gateway
process.  The gateway listens on 127.0.0.9, the app on 127.0.0.1, so a
connection that reaches the app without the gateway cannot pass for one that
went through it.
"""

from __future__ import annotations

import http.server
import ipaddress
import os
import re
import signal
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import consul
import pytest

from meshd.protocol.bounds import detection_bound, repair_bound, spread_bound
from meshd.protocol.config import Config
from tests.agents import AgentProc, Certs, meshd_cmd, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 8.0
#: A change crosses: its LAN, the WAN pool, then the asker's LAN.
CROSS = detection_bound(2, LOCAL) + 2 * spread_bound(3, LOCAL) + repair_bound(3, LOCAL) + SLACK
GATEWAY_HOST = "127.0.0.9"
RANGE = 16
READY = re.compile(r"meshd gateway ready cluster=(\S+) routes=(\d+)")


def _wan_addr(agent: AgentProc) -> str:
    line = next(ln for ln in agent.lines if "bridge: WAN gossip on" in ln)
    return line.rsplit(" ", 1)[1]


def _free_range() -> tuple[int, int]:
    # The gateway skips a port it cannot bind, so a port taken meanwhile by
    # another test costs one port of the range, not a failure.
    with socket.socket() as s:
        s.bind((GATEWAY_HOST, 0))
        first = min(s.getsockname()[1], 65535 - RANGE)
    return first, first + RANGE - 1


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class GatewayProc:
    """One ``meshd gateway`` process, started for a test and stopped by its PID."""

    def __init__(self, api: str, ports: tuple[int, int], *apps: str) -> None:
        args = ["gateway", "--api", api, "--listen", GATEWAY_HOST]
        args += ["--ports", f"{ports[0]}-{ports[1]}", "--check-interval", "1s"]
        for app in apps:
            args += ["--app", app]
        self.ports = ports
        self.lines: list[str] = []
        self.ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*meshd_cmd(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        threading.Thread(target=self._pump, daemon=True).start()
        if not self.ready.wait(30) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError("gateway did not become ready: " + "\n".join(self.lines[-20:]))

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if READY.search(line):
                self.ready.set()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(5)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, AgentProc]]:
    root: Path = tmp_path_factory.mktemp("dapr-gw")
    certs = Certs(root / "pki")
    agents: dict[str, AgentProc] = {}
    east_gw = ["--gateway", f"{GATEWAY_HOST}:8443"]
    try:
        e0 = AgentProc(
            root, certs, "e0", cluster="east", region="east", zone="east-a",
            extra=["--wan-bind", "127.0.0.1:0", *east_gw],
        ).start()  # fmt: skip
        agents["e0"] = e0
        agents["e1"] = AgentProc(
            root, certs, "e1", cluster="east", region="east", zone="east-b",
            join=[e0.gossip], extra=east_gw,
        ).start()  # fmt: skip
        agents["w0"] = AgentProc(
            root, certs, "w0", cluster="west", region="west", zone="west-a",
            extra=["--wan-bind", "127.0.0.1:0", "--wan-join", _wan_addr(e0)],
        ).start()  # fmt: skip
        yield agents
    finally:
        for a in agents.values():
            a.stop()


def _client(agent: AgentProc) -> consul.Consul:
    url = urlsplit(agent.api)
    return consul.Consul(host=url.hostname, port=url.port)


def _serve(server: socketserver.TCPServer) -> tuple[socketserver.TCPServer, int]:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def _dapr_register(c: consul.Consul, app_id: str, host: str, http_port: int, dapr_port: int) -> str:
    """What components-contrib's consul resolver registers when selfRegister is on."""
    service_id = f"{app_id}-{host}-{http_port}"
    check = {
        "Name": "Dapr Health Status",
        "CheckID": f"daprHealth:{service_id}",
        "Interval": "1s",
        "HTTP": f"http://{host}:{http_port}/v1.0/healthz?appid={app_id}",
    }
    assert c.agent.service.register(
        app_id, service_id=service_id, address=host, port=6000,
        meta={"DAPR_PORT": str(dapr_port)}, check=check,
    )  # fmt: skip
    return service_id


def _dapr_address(entry: dict[str, Any]) -> tuple[str, int]:
    """ResolveID: Meta[DAPR_PORT], with Service.Address or else Node.Address."""
    port = entry["Service"]["Meta"]["DAPR_PORT"]
    address = entry["Service"]["Address"] or entry["Node"]["Address"]
    ipaddress.ip_address(address)  # formatAddress: an IP literal here
    return address, int(port)


def _echo_through(address: tuple[str, int], payload: bytes) -> bytes:
    with socket.create_connection(address, timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_dapr_lookup_from_west_reaches_the_app_through_the_gateway(clusters):
    e0, e1, w0 = clusters["e0"], clusters["e1"], clusters["w0"]
    echo, echo_port = _serve(socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo))
    healthz, health_port = _serve(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz))
    east, west = _client(e1), _client(w0)
    gateway: GatewayProc | None = None
    try:
        service_id = _dapr_register(east, "orders", "127.0.0.1", health_port, echo_port)
        # West's own sidecar registers too, as Dapr does on every start.
        _dapr_register(west, "checkout", "127.0.0.1", health_port, 50009)

        # West knows the instance, but without a gateway route nothing can
        # reach its DAPR_PORT: Dapr must not be offered it.
        wait_until(
            lambda: any(e["instance"] == service_id for e in w0.resolve("orders", "?all=1")),
            CROSS,
            "orders known in west",
        )
        assert west.health.service("orders", passing=True)[1] == []

        gateway = GatewayProc(e0.api, _free_range(), "orders")
        entries = wait_until(
            lambda: west.health.service("orders", passing=True)[1],
            CROSS,
            "orders passing in west through the gateway",
        )
        [entry] = entries
        address = _dapr_address(entry)
        lo, hi = gateway.ports
        assert address[0] == GATEWAY_HOST and lo <= address[1] <= hi
        payload = os.urandom(200_000)
        assert _echo_through(address, payload) == payload
        # Dapr's cached mode watches the checks of the apps it resolves.
        watch = 'ServiceName == "orders"'
        _, states = west.health.state("any", filter_expr=watch)
        assert [(c["ServiceID"], c["Status"]) for c in states] == [(service_id, "passing")]

        # Inside east nothing changed: Dapr there dials the app directly.
        [local] = east.health.service("orders", passing=True)[1]
        assert _dapr_address(local) == ("127.0.0.1", echo_port)

        # A stopped gateway takes its routes with it: west stops offering the app.
        assert gateway.stop() == 0
        wait_until(
            lambda: west.health.service("orders", passing=True)[1] == [],
            CROSS,
            "orders no longer passing in west",
        )
        with pytest.raises(OSError):
            _echo_through(address, b"x")

        # Dapr deregisters on close; west's blocking watch sees the app go.
        index, _ = west.health.state("any", filter_expr=watch)
        assert east.agent.service.deregister(service_id)

        def gone() -> bool:
            nonlocal index
            index, states = west.health.state("any", index=index, wait="5s", filter_expr=watch)
            return states == []

        wait_until(gone, CROSS, "orders gone from west's watch")
        assert west.health.service("orders")[1] == []
    finally:
        if gateway is not None:
            gateway.stop()
        echo.shutdown()
        healthz.shutdown()
