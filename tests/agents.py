"""Helpers for end-to-end tests: real ``meshd agent`` processes on 127.0.0.1.

Certificates are made with the real ``meshd ca create`` / ``meshd cert issue``
commands.  Every agent binds port 0 and reports its ports on the ready line,
so tests never race for ports.  Waiting is always for a condition, bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import consul

READY = re.compile(r"meshd agent ready api=(https?://\S+) gossip=(\S+)")


def meshd_cmd() -> list[str]:
    exe = shutil.which("meshd")
    return [exe] if exe else [sys.executable, "-m", "meshd.cli"]


def run_meshd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*meshd_cmd(), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"meshd {' '.join(args)} failed: {proc.stderr}")
    return proc


def python_json(code: str, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh interpreter against this tree (``env`` or ours,
    with the repository first on PYTHONPATH); the JSON its last line prints."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``pred`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = pred()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last_exc = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} ({last_exc})")


class Certs:
    """A CA made by ``meshd ca create`` and node certificates issued from it."""

    def __init__(self, root: Path, trust_domain: str = "mesh.local") -> None:
        self.root = root
        self.ca_dir = root / "ca"
        run_meshd("ca", "create", "--out", str(self.ca_dir), "--trust-domain", trust_domain)

    def issue(self, node: str, cluster: str, bridge: bool = False) -> tuple[Path, Path, Path]:
        out = self.root / "certs" / cluster
        if not (out / f"{node}.pem").exists():
            run_meshd(
                "cert", "issue", "--ca", str(self.ca_dir), "--node", node,
                "--cluster", cluster, "--ip", "127.0.0.1", "--out", str(out),
                *(["--bridge"] if bridge else []),
            )  # fmt: skip
        return self.ca_dir / "ca.pem", out / f"{node}.pem", out / f"{node}.key"


class AgentProc:
    """One ``meshd agent`` process with its own state directory."""

    def __init__(
        self,
        root: Path,
        certs: Certs,
        node: str,
        cluster: str = "east",
        region: str = "r1",
        zone: str = "z1",
        join: list[str] | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.node = node
        self.cluster = cluster
        self.state_dir = root / "state" / f"{cluster}-{node}"
        # A WAN listener needs the bridge role in the certificate.
        ca, cert, key = certs.issue(node, cluster, bridge="--wan-bind" in (extra or []))
        #: The mesh CA: what an agent started with --api-tls is checked against.
        self.ca = ca
        self.args = [
            "agent", "--node", node, "--cluster", cluster, "--region", region, "--zone", zone,
            "--bind", "127.0.0.1:0", "--api", "127.0.0.1:0", "--profile", "local",
            "--state-dir", str(self.state_dir),
            "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key),
        ]  # fmt: skip
        for j in join or []:
            self.args += ["--join", j]
        self.args += extra or []
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.api = ""
        self.gossip = ""

    def start(
        self,
        timeout: float = 30.0,
        join: list[str] | None = None,
        wan_join: list[str] | None = None,
    ) -> AgentProc:
        args = list(self.args)
        for flag, values in (("--join", join), ("--wan-join", wan_join)):
            if values is not None:  # replace the original list of this flag
                args = [a for i, a in enumerate(args) if a != flag and args[i - 1] != flag]
                for v in values:
                    args += [flag, v]
        self.lines = []
        ready = threading.Event()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [*meshd_cmd(), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

        def pump(stream: Any) -> None:
            for line in stream:
                self.lines.append(line.rstrip("\n"))
                m = READY.search(line)
                if m:
                    self.api, self.gossip = m.group(1), m.group(2)
                    ready.set()

        threading.Thread(target=pump, args=(self.proc.stderr,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"agent {self.node} did not become ready: " + "\n".join(self.lines[-20:])
                )
        return self

    # -- process control (only our own PIDs) ----------------------------------

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- API -------------------------------------------------------------------

    def call(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, Any, dict[str, str]]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            context = (
                ssl.create_default_context(cafile=str(self.ca))
                if self.api.startswith("https://")
                else None
            )
            with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
                raw = resp.read()
                ctype = resp.headers.get("Content-Type", "")
                payload = json.loads(raw) if "json" in ctype else raw.decode()
                return resp.status, payload, dict(resp.headers)
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            return err.code, payload, dict(err.headers)

    def get(self, path: str) -> Any:
        status, body, _ = self.call("GET", path)
        assert status == 200, f"GET {path} -> {status} {body}"
        return body

    def members(self) -> dict[str, str]:
        return {f"{m['cluster']}/{m['node']}": m["status"] for m in self.get("/v1/members")}

    def resolve(self, app: str, query: str = "") -> list[dict[str, Any]]:
        return self.get(f"/v1/resolve/{app}{query}")["endpoints"]

    def register(self, app: str, instance: str, port: int, **extra: Any) -> int:
        body = {"app": app, "address": "127.0.0.1", "port": port, **extra}
        status, answer, _ = self.call("PUT", f"/v1/apps/{instance}", body)
        assert status == 200, f"register {instance}: {status} {answer}"
        return int(answer["version"])

    def metric(self, name: str, **labels: str) -> float:
        text = self.call("GET", "/metrics")[1]
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            key, _, value = line.rpartition(" ")
            if want and "{" in key:
                got = ",".join(sorted(key[key.index("{") + 1 : -1].split(",")))
                if got != want:
                    continue
            elif want:
                continue
            total += float(value)
        return total


def start_in_cluster(
    root: Path,
    certs: Certs,
    name: str,
    cluster: str,
    *,
    bridge: bool = False,
    join: list[str] | None = None,
    wan_join: list[str] | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> AgentProc:
    """Start one agent of ``cluster`` (region named after it, zone ``<cluster>-a``).

    A bridge gets a WAN listener (and with it the bridge role in its
    certificate) and joins the WAN pool through ``wan_join``.
    """
    args = list(extra)
    if bridge:
        args += ["--wan-bind", "127.0.0.1:0"]
        for w in wan_join or []:
            args += ["--wan-join", w]
    return AgentProc(
        root, certs, name, cluster=cluster, region=cluster, zone=f"{cluster}-a",
        join=join, extra=args,
    ).start()  # fmt: skip


def client_for(agent: AgentProc) -> consul.Consul:
    """py-consul pointed at ``agent``'s API (its Consul-compatible subset)."""
    url = urlsplit(agent.api)
    return consul.Consul(host=url.hostname, port=url.port)


@contextlib.contextmanager
def two_agents(
    root: Path, names: tuple[str, str], zones: tuple[str, str] = ("z1", "z1")
) -> Iterator[tuple[AgentProc, AgentProc]]:
    """Two agents of cluster ``east`` on 127.0.0.1, B joined to A, once both
    list two alive members (within a repair bound of the ``local`` profile,
    plus slack); stopped afterwards."""
    from meshd.protocol.bounds import repair_bound
    from meshd.protocol.config import Config

    certs = Certs(root / "pki")
    a = AgentProc(root, certs, names[0], zone=zones[0]).start()
    try:
        b = AgentProc(root, certs, names[1], zone=zones[1], join=[a.gossip]).start()
        try:
            wait_until(
                lambda: all(list(x.members().values()).count("alive") == 2 for x in (a, b)),
                repair_bound(2, Config.local()) + 5.0,
                "2 alive members",
            )
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()
