"""End to end: real ``meshd agent`` processes over mutual TLS on 127.0.0.1.

Timing bounds come from ``meshd.protocol.bounds`` for the ``local`` profile
the agents run, plus a few seconds for process start and scheduling on a busy
two-core machine.
"""

from __future__ import annotations

import signal
import socket
import ssl
import threading
import time
from typing import Any

import pytest

from meshd.protocol.bounds import detection_bound, repair_bound
from meshd.protocol.config import Config
from meshd.wire import Gossip, Ping, encode_frame
from tests.agents import AgentProc, Certs, run_meshd, wait_until

pytestmark = pytest.mark.e2e

LOCAL = Config.local()
SLACK = 5.0  # process scheduling on a loaded 2-core machine


@pytest.fixture(scope="module")
def five(tmp_path_factory, certs):
    root = tmp_path_factory.mktemp("five")
    agents = [AgentProc(root, certs, "n0").start()]
    for i in range(1, 5):
        agents.append(AgentProc(root, certs, f"n{i}", join=[agents[0].gossip]).start())
    yield agents
    for a in agents:
        a.stop()


def all_alive(agents, n):
    return all(list(a.members().values()).count("alive") == n for a in agents if a.running)


def test_five_agents_form_a_cluster_and_resolve_everywhere(five):
    wait_until(lambda: all_alive(five, 5), repair_bound(5, LOCAL) + SLACK, "5 alive members")
    version = five[2].register("orders", "orders-1", 3500, meta={"v": "2"})
    assert version >= 1

    def everywhere():
        return all([e["instance"] for e in a.resolve("orders")] == ["orders-1"] for a in five)

    wait_until(everywhere, repair_bound(5, LOCAL) + SLACK, "orders-1 on all five")
    ep = five[4].resolve("orders")[0]
    assert ep["node"] == "n2" and ep["cluster"] == "east" and ep["port"] == 3500
    assert ep["meta"] == {"v": "2"} and ep["tier"] == "zone"
    assert five[2].resolve("orders")[0]["tier"] == "node"
    # The metrics a operator watches are there and moving.
    a = five[0]
    assert a.metric("meshd_members", status="alive") == 5
    assert a.metric("meshd_records", state="served") >= 1
    assert a.metric("meshd_messages_sent_total", type="Ping") > 0
    assert a.metric("meshd_bytes_received_total", type="Ack") > 0
    assert a.metric("meshd_lookup_seconds_count") > 0


def test_sighup_reloads_without_dropping_members(five):
    wait_until(lambda: all_alive(five, 5), repair_bound(5, LOCAL) + SLACK, "5 alive")
    target = five[4]
    target.signal(signal.SIGHUP)
    wait_until(
        lambda: any("reloaded certificates" in ln for ln in target.lines), 10, "reload logged"
    )
    assert target.running
    assert list(target.members().values()).count("alive") == 5
    assert all(a.members()["east/n4"] == "alive" for a in five)


def test_blocking_resolve_returns_within_a_second_of_a_change(five):
    wait_until(lambda: all_alive(five, 5), repair_bound(5, LOCAL) + SLACK, "5 alive")
    _, body, headers = five[1].call("GET", "/v1/resolve/payments")
    index = body["index"]
    assert int(headers["X-Meshd-Index"]) == index
    result: dict[str, Any] = {}

    def blocked():
        start = time.monotonic()
        status, answer, _ = five[1].call(
            "GET", f"/v1/resolve/payments?index={index}&wait=30s", timeout=40
        )
        result.update(status=status, answer=answer, returned=time.monotonic())
        result["waited"] = time.monotonic() - start

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.3)  # let the request reach the agent before the change (not a sync point)
    changed_at = time.monotonic()
    five[1].register("payments", "payments-1", 4000)
    t.join(35)
    assert result["status"] == 200
    assert [e["instance"] for e in result["answer"]["endpoints"]] == ["payments-1"]
    assert result["answer"]["index"] > index
    assert result["returned"] - changed_at < 1.0


def test_crash_restart_and_leave(five, tmp_path):
    victim = five[3]
    wait_until(lambda: all_alive(five, 5), repair_bound(5, LOCAL) + SLACK, "5 alive")
    victim.register("billing", "billing-1", 5000)
    others = [a for a in five if a is not victim]
    wait_until(
        lambda: all(a.resolve("billing") for a in others), repair_bound(5, LOCAL) + SLACK,
        "billing-1 everywhere",
    )  # fmt: skip

    victim.kill()  # SIGKILL: no leave, no goodbye
    bound = detection_bound(5, LOCAL) + SLACK
    wait_until(lambda: all(a.resolve("billing") == [] for a in others), bound, "billing gone")
    wait_until(lambda: all(a.members()["east/n3"] == "dead" for a in others), bound, "n3 dead")

    # Restart with the same state directory and no --join: it rejoins from its
    # saved peers and its registration reappears without anyone re-registering.
    victim.start(join=[])
    wait_until(
        lambda: all([e["instance"] for e in a.resolve("billing")] == ["billing-1"] for a in five),
        repair_bound(5, LOCAL) + SLACK,
        "billing-1 back everywhere",
    )
    wait_until(lambda: all(a.members()["east/n3"] == "alive" for a in five), SLACK, "n3 alive")

    # SIGTERM: graceful leave, exit 0, seen as left (not dead) by the others.
    victim.signal(signal.SIGTERM)
    assert victim.wait(15) == 0
    wait_until(lambda: all(a.members()["east/n3"] == "left" for a in others), 10, "n3 left")
    assert all(a.resolve("billing") == [] for a in others)
    victim.start(join=[five[0].gossip])  # leave the fixture as we found it


def test_agent_with_a_foreign_ca_cannot_join_and_its_records_never_appear(five, tmp_path):
    rogue_certs = Certs(tmp_path / "rogue")
    rogue = AgentProc(tmp_path, rogue_certs, "intruder", join=[five[0].gossip]).start()
    try:
        rogue.register("orders", "evil-1", 6666)
        # Give it the time a real member would need to spread a record.
        deadline = time.monotonic() + repair_bound(5, LOCAL)
        while time.monotonic() < deadline:
            assert "east/intruder" not in five[0].members()
            assert all(e["instance"] != "evil-1" for e in five[0].resolve("orders?all=1"))
            time.sleep(0.5)
        assert five[0].metric("meshd_rejected_total", reason="tls-handshake") >= 1
        assert list(rogue.members().values()) == ["alive"]  # alone
    finally:
        rogue.stop()


def _tls_client(certs, node=None, cluster="east"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(certs.ca_dir / "ca.pem")
    if node is not None:
        _, cert, key = certs.issue(node, cluster)
        ctx.load_cert_chain(cert, key)
    return ctx


def _connect(address, ctx=None):
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=5)
    if ctx is None:
        return raw
    return ctx.wrap_socket(raw, server_hostname=host)


def _closed_by_peer(sock, timeout=10.0):
    """True when the agent closes the connection (EOF or reset) within ``timeout``."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_bad_peers_are_disconnected_and_the_agent_keeps_serving(five, certs):
    target = five[0]
    before = target.metric("meshd_rejected_total")

    # A plain TCP client speaking nonsense.
    s = _connect(target.gossip)
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert _closed_by_peer(s)
    # Random bytes.
    s = _connect(target.gossip)
    s.sendall(bytes(range(256)) * 8)
    assert _closed_by_peer(s)
    # A TLS client without a certificate.
    s = _connect(target.gossip, _tls_client(certs))
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        s.sendall(b"\x00\x00\x00\x01\x00")
        s.settimeout(5)
        if not s.recv(1):
            raise ConnectionError("closed")
    s.close()
    # A valid member certificate, then a 100 MB length prefix.
    s = _connect(target.gossip, _tls_client(certs, "n1"))
    s.sendall((100 * 1024 * 1024).to_bytes(4, "big"))
    assert _closed_by_peer(s)
    # A valid member certificate, then a truncated frame and EOF.
    s = _connect(target.gossip, _tls_client(certs, "n1"))
    frame = encode_frame(Gossip("east/n1"))
    s.sendall(frame[:-2])
    s.shutdown(socket.SHUT_WR)
    assert _closed_by_peer(s)
    # An undecodable frame body.
    s = _connect(target.gossip, _tls_client(certs, "n1"))
    s.sendall((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")
    assert _closed_by_peer(s)

    wait_until(
        lambda: target.metric("meshd_rejected_total") >= before + 6, 10, "rejections counted"
    )
    for reason in ("tls-handshake", "oversized", "truncated", "undecodable"):
        assert target.metric("meshd_rejected_total", reason=reason) >= 1, reason
    assert target.get("/v1/health")["status"] == "ok"
    assert all_alive(five, 5)


def test_a_node_cannot_speak_for_another_node(five, certs):
    target = five[0]
    before = target.metric("meshd_rejected_total", reason="impersonation")
    s = _connect(target.gossip, _tls_client(certs, "n1"))
    # n1's certificate, but the message claims to come from n4.
    s.sendall(encode_frame(Ping("east/n4", seq=1, source_addr="127.0.0.1:9", target="east/n0")))
    wait_until(
        lambda: target.metric("meshd_rejected_total", reason="impersonation") > before,
        10,
        "impersonation counted",
    )
    s.close()


def test_config_and_start_errors_exit_2_with_one_line(five, certs, tmp_path):
    ca, cert, key = certs.issue("n9", "east")
    base = [
        "agent", "--node", "n9", "--cluster", "east", "--api", "127.0.0.1:0",
        "--state-dir", str(tmp_path / "s"), "--tls-ca", str(ca), "--tls-cert", str(cert),
        "--tls-key", str(key),
    ]  # fmt: skip
    taken = five[0].gossip
    cases = {
        "port in use": [*base, "--bind", taken],
        "missing cert": [*base[:-4], "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key",
                         str(key), "--bind", "127.0.0.1:0"],
        "bad flag": [*base, "--bind", "127.0.0.1:0", "--frobnicate"],
        "bad bind": [*base, "--bind", "not-a-port"],
        "cert for another node": [*base[:2], "other", *base[3:], "--bind", "127.0.0.1:0"],
    }  # fmt: skip
    for what, args in cases.items():
        proc = run_meshd(*args, check=False)
        assert proc.returncode == 2, f"{what}: exit {proc.returncode} {proc.stderr}"
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"{what}: {proc.stderr!r}"
        assert "meshd agent ready" not in proc.stderr
        assert lines[0].startswith("meshd: error: ") or "usage" in lines[0], lines[0]
    # Every failure happened before the state database was opened: nothing half-written.
    assert not (tmp_path / "s" / "meshd.db").exists()


def test_failing_checks_turn_the_instance_critical_everywhere(five):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    wait_until(lambda: all_alive(five, 5), repair_bound(5, LOCAL) + SLACK, "5 alive")
    state = {"code": 200}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            self.send_response(state["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    owner = five[1]
    try:
        owner.register("inventory", "inventory-1", 7000, check={"http": url, "interval": "500ms"})
        owner.register("reports", "reports-1", 7001, check={"ttl": "2s"})
        # TTL-checked instances are not routed to before they report (as Consul).
        assert owner.resolve("reports") == []
        status, _, _ = owner.call("PUT", "/v1/apps/reports-1/health", {"status": "passing"})
        assert status == 200
        spread = repair_bound(5, LOCAL) + SLACK

        def healthy_everywhere(app):
            return all(len(a.resolve(app)) == 1 for a in five)

        wait_until(lambda: healthy_everywhere("inventory"), spread, "inventory passing")
        wait_until(lambda: healthy_everywhere("reports"), spread, "reports passing")

        state["code"] = 500  # the app's health endpoint starts failing
        # ... and the TTL app stops reporting: critical after its 2 s TTL.
        bound = 2.0 + spread

        def critical_everywhere(app):
            return all(
                a.resolve(app) == []
                and [e["health"] for e in a.resolve(app, "?all=1")] == ["critical"]
                for a in five
            )

        wait_until(lambda: critical_everywhere("inventory"), bound, "inventory critical")
        wait_until(lambda: critical_everywhere("reports"), bound, "reports critical")
    finally:
        server.shutdown()
        server.server_close()


def test_a_policy_change_releases_waiting_lookups(tmp_path, certs):
    """A new policy reorders answers without new records: waiting blocking
    queries come back at once (same index) instead of at the end of their wait."""
    agent = AgentProc(tmp_path, certs, "p0").start()
    try:
        index = agent.get("/v1/resolve/orders")["index"]
        got: list[float] = []

        def blocked() -> None:
            start = time.monotonic()
            agent.call("GET", f"/v1/resolve/orders?index={index}&wait=120s", timeout=150)
            got.append(time.monotonic() - start)

        t = threading.Thread(target=blocked, daemon=True)
        t.start()
        wait_until(
            lambda: agent.metric("meshd_http_requests_total") > 0 and t.is_alive(), 10, "parked"
        )
        policy = agent.get("/v1/policy")
        status, _, _ = agent.call("PUT", "/v1/policy", policy)
        assert status == 200
        t.join(60)
        assert got and got[0] < 60, got  # released by the change, not by the 120 s wait
    finally:
        agent.stop()


def test_a_world_readable_key_is_named_at_start(tmp_path, certs):
    """Any local user who reads the node's key speaks as the node: the agent
    says so in its log (and still starts, as ssh-agent's users would expect
    a warning, not a lock-out); a key of mode 600 draws no such line."""
    import shutil

    _, _, key = certs.issue("keyed", "east")
    loose = tmp_path / "loose.key"
    shutil.copy(key, loose)
    loose.chmod(0o644)
    a = AgentProc(tmp_path, certs, "keyed", extra=["--tls-key", str(loose)]).start()
    try:
        assert any("is readable by every user (mode 644)" in line for line in a.lines), a.lines
    finally:
        a.stop()
    loose.chmod(0o600)
    b = AgentProc(tmp_path, certs, "keyed", extra=["--tls-key", str(loose)]).start()
    try:
        assert not any("readable by every user" in line for line in b.lines), b.lines
    finally:
        b.stop()
