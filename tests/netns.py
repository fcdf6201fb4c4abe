"""Separate hosts on one machine: network namespaces, a router, and agents bound to them.

``tests/agents.py`` runs every agent on 127.0.0.1, where no packet is ever
lost and every agent reaches every other.  This module builds the layout
meshd is meant for instead, out of Linux network namespaces, so each host
has its own stack, its own address and its own firewall:

- one namespace per host, with an ``eth0`` veth into its subnet's switch and
  a default route through the router;
- one switch namespace per subnet, holding a Linux bridge device.  The
  switch is its own namespace, not part of the router, so traffic inside a
  subnet never meets the router's nftables rules (on a machine with
  ``br_netfilter`` loaded, bridged frames would otherwise go through them);
- one router namespace, with a leg in every switch, forwarding between
  subnets with an nftables ``forward`` policy of drop that accepts only
  packets between two bridge hosts: ordinary nodes of different clusters
  cannot reach each other, as on real separate networks;
- "pod" namespaces, each with a /30 veth to its node, whose only route is
  through the node, so a client in a pod reaches its node's agent at the
  node's address (hostPort / host networking in Kubernetes).

Everything is named with a random per-run suffix, so a run cannot collide
with a parallel or an interrupted one; the veths are created inside the
namespaces, so the root namespace never gets an interface, an address or
a route of ours.  :meth:`Topology.close` kills our agents by PID, then
deletes every namespace it created, which removes every veth, bridge and
nftables table with it.

The test process talks HTTP *from inside* a namespace: a one-thread executor
per namespace whose thread entered it with ``setns(2)``, so every socket it
opens lives there.  Network namespaces are per thread, so the rest of the
test process stays in the root namespace.

Faults are nftables tables added to and removed from a namespace by name,
so a fault is undone by deleting exactly what made it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.agents import READY, Certs, meshd_cmd, run_meshd

T = TypeVar("T")

#: From <sched.h>: setns(2) into a network namespace.
CLONE_NEWNET = 0x40000000
#: Ports every agent uses on its own address (the documented defaults).
GOSSIP_PORT = 7946
WAN_PORT = 7947
API_PORT = 7700


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def nft(ns: str, script: str) -> str:
    """Run an nft script inside namespace ``ns``; return its stdout."""
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=script,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {ns}: {proc.stderr.strip()}\n{script}")
    return proc.stdout


def nft_json(ns: str, *args: str) -> Any:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft -j {' '.join(args)} in {ns}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def unavailable() -> str | None:
    """Why this machine cannot build the topology, or None when it can."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (run the e2e host tests as root)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing: install the {package} package"
    probe = f"mhprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", probe)
    except (RuntimeError, OSError) as exc:
        return f"`ip netns add` is not permitted here: {exc}"
    try:
        nft(probe, "table inet probe {\n chain c { type filter hook input priority 0; }\n}\n")
    except (RuntimeError, OSError) as exc:
        return f"nftables does not work inside a namespace here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None


def _enter(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {errno.errorcode.get(err, err)}")
    finally:
        os.close(fd)


class Inside:
    """Runs callables on one thread that lives in namespace ``ns``."""

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self._pool = ThreadPoolExecutor(1, f"ns-{ns}", initializer=_enter, initargs=(ns,))

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        return self._pool.submit(fn, *args).result()

    def http(
        self,
        method: str,
        url: str,
        body: Any = None,
        token: str | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, Any]:
        """One HTTP request from inside the namespace: (status, JSON or text)."""
        return self.run(_http, method, url, body, token, timeout)

    def connects(self, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from this namespace to address:port opens."""
        return self.run(_connects, address, port, timeout)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _connects(address: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http(method: str, url: str, body: Any, token: str | None, timeout: float) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
            return resp.status, json.loads(raw) if "json" in ctype else raw.decode()
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


@dataclass
class Host:
    """One host namespace: its address, its agent's settings, and its process."""

    name: str
    cluster: str
    subnet: int  # third octet of 10.231.<subnet>.0/24
    index: int  # host part of the address
    bridge: bool
    ns: str = ""
    inside: Inside | None = None
    proc: subprocess.Popen[str] | None = None
    lines: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"10.231.{self.subnet}.{self.index}"

    @property
    def api(self) -> str:
        return f"http://{self.address}:{API_PORT}"

    @property
    def gossip(self) -> str:
        return f"{self.address}:{GOSSIP_PORT}"

    @property
    def wan(self) -> str:
        return f"{self.address}:{WAN_PORT}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- the agent ---------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Host:
        self.lines = []
        ready = threading.Event()
        # `setpriv` and `ip netns exec` each exec the next command in place:
        # the PID we hold is the agent's own, so a signal to it reaches meshd
        # and nothing else.  The parent-death signal kills the agent if the
        # test process dies before close() runs; otherwise the agent would
        # keep its namespace alive forever.
        orphan_guard = ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []
        self.proc = subprocess.Popen(
            [*orphan_guard, "ip", "netns", "exec", self.ns, *meshd_cmd(), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

        def pump(stream: Any) -> None:
            for line in stream:
                self.lines.append(line.rstrip("\n"))
                if READY.search(line):
                    ready.set()

        threading.Thread(target=pump, args=(self.proc.stderr,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"agent {self.name} did not become ready: " + "\n".join(self.lines[-20:])
                )
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    # -- its API, called from its own namespace -------------------------------

    def get(self, path: str) -> Any:
        assert self.inside is not None
        status, body = self.inside.http("GET", self.api + path)
        assert status == 200, f"GET {path} on {self.name} -> {status} {body}"
        return body

    def members(self) -> dict[str, str]:
        return {f"{m['cluster']}/{m['node']}": m["status"] for m in self.get("/v1/members")}

    def instances(self, app: str) -> list[str]:
        return [e["instance"] for e in self.get(f"/v1/resolve/{app}")["endpoints"]]

    def metric(self, name: str, **labels: str) -> float:
        text = self.get("/metrics")
        want = sorted(f'{k}="{v}"' for k, v in labels.items())
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name + ("{" if want else "")):
                continue
            key, _, value = line.rpartition(" ")
            if want and sorted(key[key.index("{") + 1 : -1].split(",")) != want:
                continue
            total += float(value)
        return total


@dataclass
class Pod:
    """A client namespace whose only way out is its node."""

    name: str
    node: Host
    ns: str
    address: str
    inside: Inside

    def http(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """Call the node's agent at the node's address, as a sidecar would."""
        return self.inside.http(method, self.node.api + path, body, token)


class Topology:
    """Namespaces, links, routes and agents; built by :meth:`build`, undone by :meth:`close`."""

    SUBNETS = {"east": 1, "west": 2, "vm": 3}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suffix = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.pods: dict[str, Pod] = {}
        self.router = self._name("r")
        self.token = secrets.token_urlsafe(24)
        self.token_file = root / "api-token"
        self._insides: list[Inside] = []

    def _name(self, short: str) -> str:
        # Namespace names are global on the machine: the suffix keeps runs apart.
        return f"mh{self.suffix}-{short}"

    def _netns(self, short: str) -> str:
        ns = self._name(short)
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def _inside(self, ns: str) -> Inside:
        inside = Inside(ns)
        self._insides.append(inside)
        return inside

    # -- links -------------------------------------------------------------

    def build(self, layout: list[Host]) -> None:
        router = self._netns("r")
        assert router == self.router
        self._inside(router).run(_write, "/proc/sys/net/ipv4/ip_forward", "1")
        for cluster, subnet in self.SUBNETS.items():
            sw = self._netns(f"sw{subnet}")
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            # The router's leg in this subnet.
            _ip("-n", router, "link", "add", cluster, "type", "veth", "peer", "name", "r",
                "netns", sw)  # fmt: skip
            self._port(sw, "r")
            _ip("-n", router, "addr", "add", f"10.231.{subnet}.1/24", "dev", cluster)
            _ip("-n", router, "link", "set", cluster, "up")
        for host in layout:
            host.ns = self._netns(host.name)
            sw = self._name(f"sw{host.subnet}")
            _ip("-n", host.ns, "link", "add", "eth0", "type", "veth", "peer", "name", host.name,
                "netns", sw)  # fmt: skip
            self._port(sw, host.name)
            _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "route", "add", "default", "via", f"10.231.{host.subnet}.1")
            host.inside = self._inside(host.ns)
            self.hosts[host.name] = host
        bridges = ", ".join(h.address for h in layout if h.bridge)
        # Only bridges talk across subnets; everything else forwarded is dropped.
        nft(
            router,
            f"""table inet meshd_router {{
                set bridges {{ type ipv4_addr; elements = {{ {bridges} }}; }}
                chain forward {{
                    type filter hook forward priority 0; policy drop;
                    ip saddr @bridges ip daddr @bridges accept
                }}
            }}""",
        )

    def _port(self, sw: str, ifname: str) -> None:
        _ip("-n", sw, "link", "set", ifname, "master", "br0")
        _ip("-n", sw, "link", "set", ifname, "up")

    def add_pod(self, name: str, node: Host, slot: int) -> Pod:
        """A pod on ``node``: a /30 (10.231.9.4*slot) between them, the pod's route via the node."""
        ns = self._netns(name)
        base = 4 * slot
        node_end, pod_end = f"10.231.9.{base + 1}", f"10.231.9.{base + 2}"
        _ip("-n", node.ns, "link", "add", f"v{name}", "type", "veth", "peer", "name", "eth0",
            "netns", ns)  # fmt: skip
        _ip("-n", node.ns, "addr", "add", f"{node_end}/30", "dev", f"v{name}")
        _ip("-n", node.ns, "link", "set", f"v{name}", "up")
        _ip("-n", ns, "addr", "add", f"{pod_end}/30", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "default", "via", node_end)
        pod = Pod(name, node, ns, pod_end, self._inside(ns))
        self.pods[name] = pod
        return pod

    # -- agents ------------------------------------------------------------

    def configure(
        self,
        certs: Certs,
        host: Host,
        join: list[Host],
        wan_join: list[Host],
        policy: Path | None = None,
    ) -> None:
        ca = certs.ca_dir
        out = self.root / "certs" / host.cluster
        run_meshd(
            "cert", "issue", "--ca", str(ca), "--node", host.name, "--cluster", host.cluster,
            "--ip", host.address, "--out", str(out), *(["--bridge"] if host.bridge else []),
        )  # fmt: skip
        host.args = [
            "agent", "--node", host.name, "--cluster", host.cluster,
            "--region", host.cluster, "--zone", f"{host.cluster}-a",
            "--bind", host.gossip, "--api", f"{host.address}:{API_PORT}",
            "--api-token-file", str(self.token_file), "--profile", "local",
            "--state-dir", str(self.root / "state" / host.name),
            "--tls-ca", str(ca / "ca.pem"), "--tls-cert", str(out / f"{host.name}.pem"),
            "--tls-key", str(out / f"{host.name}.key"),
        ]  # fmt: skip
        for seed in join:
            host.args += ["--join", seed.gossip]
        if host.bridge:
            host.args += ["--wan-bind", host.wan]
            for seed in wan_join:
                host.args += ["--wan-join", seed.wan]
        if policy is not None:
            host.args += ["--policy", str(policy)]

    # -- faults --------------------------------------------------------------

    def cut_subnet(self, cluster: str) -> None:
        """The router drops everything to and from ``cluster``'s subnet."""
        net = f"10.231.{self.SUBNETS[cluster]}.0/24"
        nft(
            self.router,
            f"""table inet meshd_cut {{
                chain forward {{
                    type filter hook forward priority -10; policy accept;
                    ip saddr {net} drop
                    ip daddr {net} drop
                }}
            }}""",
        )

    def heal_subnet(self) -> None:
        nft(self.router, "delete table inet meshd_cut")

    def start_loss(self, one_in: int = 10) -> None:
        """Every host drops a random 1 in ``one_in`` of the packets it receives on eth0.

        Receive side only, so a packet between two hosts is lost with that
        probability once, whichever way it goes; the pod links are spared.
        The first rule counts what arrives, the second what it drops.
        """
        for host in self.hosts.values():
            nft(
                host.ns,
                f"""table inet meshd_loss {{
                    chain input {{
                        type filter hook input priority -10; policy accept;
                        iifname "eth0" counter
                        iifname "eth0" numgen random mod {one_in} < 1 counter drop
                    }}
                }}""",
            )

    def stop_loss(self) -> tuple[int, int]:
        """Remove the loss rules; return (packets received, packets dropped) on all hosts."""
        seen = dropped = 0
        for host in self.hosts.values():
            rules = [
                item["rule"]
                for item in nft_json(host.ns, "list", "table", "inet", "meshd_loss")["nftables"]
                if "rule" in item
            ]
            counts = [
                next(e["counter"]["packets"] for e in r["expr"] if "counter" in e) for r in rules
            ]
            seen += counts[0]
            dropped += counts[1]
            nft(host.ns, "delete table inet meshd_loss")
        return seen, dropped

    def cut_wan(self, host: Host) -> None:
        """``host`` (a bridge) loses all its WAN traffic, both ways; its LAN stays."""
        nft(
            host.ns,
            f"""table inet meshd_wan_cut {{
                chain input {{
                    type filter hook input priority -10; policy accept;
                    tcp dport {WAN_PORT} drop
                    tcp sport {WAN_PORT} drop
                }}
                chain output {{
                    type filter hook output priority -10; policy accept;
                    tcp dport {WAN_PORT} drop
                    tcp sport {WAN_PORT} drop
                }}
            }}""",
        )

    def heal_wan(self, host: Host) -> None:
        nft(host.ns, "delete table inet meshd_wan_cut")

    # -- teardown ------------------------------------------------------------

    def close(self) -> None:
        """Stop our agents (by PID), then delete every namespace we made."""
        for host in self.hosts.values():
            host.stop()
        for inside in self._insides:
            inside.close()
        failed = []
        for ns in reversed(self.namespaces):
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            if proc.returncode != 0:
                failed.append(ns)
        if failed:
            raise RuntimeError(f"could not delete namespaces {failed}")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
