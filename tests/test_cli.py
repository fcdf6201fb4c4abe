"""The meshd command line: ca/cert files, client commands against a fake agent API."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509

from meshd import identity, revocation
from meshd.cli import format_table, main

# ---------------------------------------------------------------------------
# ca create, cert issue.


def fields(text: str) -> list[str]:
    return text.split()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1, err
    assert err.startswith("meshd") and ": error: " in err, err
    return err


def test_ca_create_and_cert_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "certs"
    assert main(["ca", "create", "--out", str(ca_dir), "--trust-domain", "corp.test"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(ca_dir / "ca.pem"), str(ca_dir / "ca.key")]
    assert mode(ca_dir / "ca.key") == 0o600
    assert identity.load_ca(ca_dir).trust_domain == "corp.test"

    argv = ["cert", "issue", "--ca", str(ca_dir), "--node", "n7", "--cluster", "east"]
    argv += ["--ip", "192.0.2.3", "--ip", "fd00::7", "--dns", "n7.east.example"]
    argv += ["--days", "30", "--out", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [str(out / "n7.pem"), str(out / "n7.key")]
    assert mode(out / "n7.key") == 0o600
    # The .pem is the chain: leaf, then the CA.
    assert len(x509.load_pem_x509_certificates((out / "n7.pem").read_bytes())) == 2

    nc = identity.load_node_cert(out / "n7.pem", out / "n7.key", ca_dir / "ca.pem")
    assert (nc.trust_domain, nc.cluster, nc.node) == ("corp.test", "east", "n7")
    san = nc.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("192.0.2.3"),
        ipaddress.ip_address("fd00::7"),
    }
    assert san.get_values_for_type(x509.DNSName) == ["n7.east.example"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://corp.test/cluster/east/node/n7"
    ]
    lifetime = nc.cert.not_valid_after_utc - nc.cert.not_valid_before_utc
    assert 30 <= lifetime.days <= 31  # 30 days plus the clock-skew backdating


def test_ca_create_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ca", "create", "--out", str(tmp_path)]) == 0
    before = (tmp_path / "ca.key").read_bytes()
    capsys.readouterr()
    assert main(["ca", "create", "--out", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "refusing to overwrite" in one_error_line(err)
    assert (tmp_path / "ca.key").read_bytes() == before


def test_cert_issue_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["cert", "issue", "--node", "n1", "--cluster", "east", "--out", str(tmp_path / "o")]
    assert main([*base, "--ca", str(tmp_path / "no-ca")]) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)

    assert main(["ca", "create", "--out", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    assert main([*base, "--ca", str(tmp_path / "ca"), "--ip", "not-an-ip"]) == 2
    assert "is not an IP address" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o" / "n1.key").exists()


# ---------------------------------------------------------------------------
# ca revoke.


@pytest.fixture
def pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A CA in tmp/ca and certificates for east/n1 and east/n2 in tmp/certs."""
    assert main(["ca", "create", "--out", str(tmp_path / "ca")]) == 0
    for node in ("n1", "n2"):
        argv = ["cert", "issue", "--ca", str(tmp_path / "ca"), "--node", node]
        assert main([*argv, "--cluster", "east", "--out", str(tmp_path / "certs")]) == 0
    capsys.readouterr()
    return tmp_path


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number


def test_ca_revoke_by_serial_and_by_cert(pki: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = identity.load_ca(pki / "ca")
    n1, n2 = serial_of(pki / "certs" / "n1.pem"), serial_of(pki / "certs" / "n2.pem")
    out = pki / "revocations.pem"
    argv = ["ca", "revoke", "--ca", str(pki / "ca"), "--out", str(out)]
    # By serial, in the colon form openssl prints.
    colons = ":".join(f"{n1:x}"[i : i + 2] for i in range(0, len(f"{n1:x}"), 2))
    assert main([*argv, "--serial", colons.upper()]) == 0
    assert capsys.readouterr().out == f"{out}: revocation list number 1 (1 revoked, 1 new)\n"
    first = revocation.load_revocation_list(out, ca.cert)
    assert first.number == 1 and first.serials == {n1}
    assert out.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert mode(out) == 0o644

    # By certificate file, continuing the list in place.
    assert main([*argv, "--cert", str(pki / "certs" / "n2.pem"), "--previous", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: revocation list number 2 (2 revoked, 1 new)\n"
    second = revocation.load_revocation_list(out, ca.cert)
    assert second.number == 2 and second.serials == {n1, n2}
    # Revoking again what is revoked still makes a newer list; nothing is dropped.
    assert main([*argv, "--serial", f"{n2:x}", "--previous", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}: revocation list number 3 (2 revoked, 0 new)\n"
    assert revocation.load_revocation_list(out, ca.cert).serials == {n1, n2}


def test_ca_revoke_errors_exit_2(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = pki / "revocations.pem"
    base = ["ca", "revoke", "--ca", str(pki / "ca"), "--out", str(out)]
    assert main(["ca", "create", "--out", str(tmp_path / "other")]) == 0
    argv = ["cert", "issue", "--ca", str(tmp_path / "other"), "--node", "x"]
    assert main([*argv, "--cluster", "east", "--out", str(tmp_path / "other")]) == 0
    assert main(["ca", "revoke", "--ca", str(tmp_path / "other"), "--serial", "1"]
                + ["--out", str(tmp_path / "other.pem")]) == 0  # fmt: skip
    (tmp_path / "junk.pem").write_text("hello")
    capsys.readouterr()
    cases = [
        ([], "--serial or --cert"),
        (["--serial", "xyz"], "argument --serial"),
        (["--serial", "0"], "argument --serial"),
        (["--cert", str(tmp_path / "nope.pem")], "does not exist"),
        (["--cert", str(tmp_path / "junk.pem")], "holds no certificate"),
        (["--cert", str(tmp_path / "other" / "x.pem")], "was not issued by the CA"),
        (["--cert", str(pki / "ca" / "ca.pem")], "is the CA certificate itself"),
        (["--serial", "1", "--previous", str(tmp_path / "other.pem")], "is refused"),
        (["--serial", "1", "--previous", str(tmp_path / "junk.pem")], "is refused"),
        (["--serial", "1", "--previous", str(tmp_path / "nope.pem")], "does not exist"),
    ]
    for extra, fragment in cases:
        assert main([*base, *extra]) == 2, extra
        captured = capsys.readouterr()
        assert captured.out == ""
        assert fragment in one_error_line(captured.err), (extra, captured.err)
    assert main(["ca", "revoke", "--ca", str(tmp_path / "no-ca"), "--serial", "1"]
                + ["--out", str(out)]) == 2  # fmt: skip
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    assert not out.exists()  # nothing half-written by any refused command


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["ca"], "required: COMMAND"),
        (["ca", "create"], "the following arguments are required: --out"),
        (["ca", "create", "--out", "x", "--days", "0"], "argument --days"),
        (["ca", "create", "--out", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["cert", "issue", "--ca", "c", "--cluster", "e", "--out", "o"], "--node"),
        (["cert", "issue", "--ca", "c", "--node", "a/b", "--cluster", "e", "--out", "o"], "a/b"),
        (["nosuch"], "invalid choice: 'nosuch'"),
        (["register", "orders", "--instance", "i", "--address", "a"], "--port"),
        (["register", "o", "--instance", "i", "--address", "a", "--port", "0"], "--port"),
        (["register", "o", "--instance", "i", "--address", "a", "--port", "1", "--meta", "x"], "K"),
        (
            ["register", "o", "--instance", "i", "--address", "a", "--port", "1"]
            + ["--check-ttl", "10s", "--check-http", "http://x/"],
            "not allowed with argument",
        ),
        (
            ["register", "o", "--instance", "i", "--address", "a", "--port", "1"]
            + ["--check-ttl", "ten"],
            "duration",
        ),
        (
            ["register", "o", "--instance", "i", "--address", "a", "--port", "1"]
            + ["--check-tcp", "host"],
            "HOST:PORT",
        ),
        (["resolve"], "required: APP"),
        (["members", "--cluster", "a b"], "--cluster"),
        (["members", "--clus", "x"], "unrecognized arguments: --clus"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert fragment in one_error_line(err)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("meshd ") and out.strip() != "meshd"


def test_format_table() -> None:
    text = format_table(["A", "LONGER", "C"], [["x", "", 0], ["wide-value", "y", None]])
    assert text.splitlines() == [
        "A            LONGER   C",
        "x            -        0",
        "wide-value   y        -",
    ]


@pytest.mark.parametrize("how", ["console-script", "python -m"])
def test_entry_point(tmp_path: Path, how: str) -> None:
    if how == "console-script":
        exe = shutil.which("meshd")
        if exe is None:
            pytest.skip("the meshd console script is not on PATH")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "meshd.cli"]
    done = subprocess.run(
        [*cmd, "ca", "create", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(tmp_path / "ca.pem"), str(tmp_path / "ca.key")]
    assert mode(tmp_path / "ca.key") == 0o600
    again = subprocess.run(
        [*cmd, "ca", "create", "--out", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2 and again.stderr.count("\n") == 1


# ---------------------------------------------------------------------------
# A fake agent API.

RESOLVE_HEADER = "INSTANCE ADDRESS PORT NODE CLUSTER ZONE HEALTH TIER"
ENDPOINTS = [
    {
        "instance": "orders-1",
        "address": "192.0.2.3",
        "port": 3500,
        "protocol": "http",
        "node": "n7",
        "cluster": "east",
        "region": "us-east",
        "zone": "us-east-1a",
        "health": "passing",
        "weight": 1,
        "meta": {},
        "tier": "zone",
    },
    {
        "instance": "orders-22",
        "address": "fd00::22",
        "port": 80,
        "protocol": "http",
        "node": "node-twenty-two",
        "cluster": "west",
        "region": "us-west",
        "zone": "",
        "health": "warning",
        "weight": 1,
        "meta": {"v": "2"},
        "tier": "failover",
        "gateway": {"address": "192.0.2.9", "port": 443, "sni": "orders.west"},
    },
]
MEMBERS = [
    {
        "node": "n1",
        "cluster": "east",
        "region": "us-east",
        "zone": "us-east-1a",
        "address": "192.0.2.1:7946",
        "status": "alive",
        "incarnation": 0,
    },
    {
        "node": "n2",
        "cluster": "east",
        "region": "us-east",
        "zone": "us-east-1b",
        "address": "192.0.2.2:7946",
        "status": "suspect",
        "incarnation": 12,
    },
]


@dataclass
class FakeAgent:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent(url="")

    async def record(request: web.Request) -> None:
        body = await request.read()
        fake.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "query": dict(request.query),
                "content_type": request.content_type,
                "json": json.loads(body) if body else None,
            }
        )

    async def put_app(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"instance": request.match_info["instance"], "version": 7})

    async def delete_app(request: web.Request) -> web.Response:
        await record(request)
        instance = request.match_info["instance"]
        if instance == "gone":
            return web.json_response(
                {"error": "instance gone is not registered on this node"}, status=404
            )
        if instance == "broken":
            return web.Response(status=500, text="<html>oops</html>")
        return web.json_response({"instance": instance})

    async def resolve(request: web.Request) -> web.Response:
        await record(request)
        app = request.match_info["app"]
        endpoints = ENDPOINTS if app == "orders" else []
        answer = {"app": app, "namespace": "default", "index": 42, "endpoints": endpoints}
        return web.json_response(answer, headers={"X-Meshd-Index": "42"})

    async def members(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response(MEMBERS)

    app = web.Application()
    app.router.add_put("/v1/apps/{instance}", put_app)
    app.router.add_delete("/v1/apps/{instance}", delete_app)
    app.router.add_get("/v1/resolve/{app}", resolve)
    app.router.add_get("/v1/members", members)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        await runner.cleanup()


async def run(*argv: str) -> int:
    # main() blocks in urllib; the fake server needs this loop to answer.
    return await asyncio.to_thread(main, list(argv))


async def test_register_sends_the_contract_body(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    code = await run(
        "register", "orders", "--instance", "orders-1", "--address", "192.0.2.3",
        "--port", "3500", "--namespace", "shop", "--protocol", "grpc",
        "--meta", "version=2", "--meta", "url=http://x/?a=b", "--meta", "empty=",
        "--weight", "5", "--check-ttl", "10s", "--api", agent.url,
    )  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out == "registered orders-1 (version 7)\n"
    (req,) = agent.requests
    assert (req["method"], req["path"], req["content_type"]) == (
        "PUT",
        "/v1/apps/orders-1",
        "application/json",
    )
    assert req["json"] == {
        "app": "orders",
        "address": "192.0.2.3",
        "port": 3500,
        "namespace": "shop",
        "protocol": "grpc",
        # Split on the first '=' only: values may contain '='.
        "meta": {"version": "2", "url": "http://x/?a=b", "empty": ""},
        "weight": 5,
        "check": {"ttl": "10s"},
    }


async def test_register_minimal_and_checks(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["register", "web", "--instance", "web-1", "--address", "::1", "--port", "80"]
    base += ["--api", agent.url]
    assert await run(*base) == 0
    assert await run(*base, "--check-http", "http://127.0.0.1:80/healthz") == 0
    assert await run(*base, "--check-tcp", "[::1]:80", "--check-interval", "2s") == 0
    assert await run(*base, "--check-http", "https://h/x", "--check-interval", "1m30s") == 0
    bodies = [r["json"] for r in agent.requests]
    # Unset optional fields are left out: the agent applies the defaults.
    assert bodies[0] == {"app": "web", "address": "::1", "port": 80}
    assert bodies[1]["check"] == {"http": "http://127.0.0.1:80/healthz", "interval": "10s"}
    assert bodies[2]["check"] == {"tcp": "[::1]:80", "interval": "2s"}
    assert bodies[3]["check"] == {"http": "https://h/x", "interval": "1m30s"}

    capsys.readouterr()
    assert await run(*base, "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"instance": "web-1", "version": 7}


async def test_register_local_usage_errors(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["register", "web", "--instance", "w", "--address", "a", "--port", "1"]
    base += ["--api", agent.url]
    assert await run(*base, "--check-ttl", "5s", "--check-interval", "1s") == 2
    assert "--check-interval needs" in one_error_line(capsys.readouterr().err)
    assert await run(*base, "--meta", "k=1", "--meta", "k=2") == 2
    assert "--meta key 'k' is given twice" in one_error_line(capsys.readouterr().err)
    assert agent.requests == []  # nothing was sent


async def test_resolve_table(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("resolve", "orders", "--api", agent.url) == 0
    lines = capsys.readouterr().out.splitlines()
    header = fields(RESOLVE_HEADER)
    assert lines[0].split() == header
    assert lines[1].split() == fields("orders-1 192.0.2.3 3500 n7 east us-east-1a passing zone")
    assert lines[2].split() == fields(
        "orders-22 fd00::22 80 node-twenty-two west - warning failover"
    )
    # Aligned: every column starts at the same offset on every line.
    for i, name in enumerate(header):
        start = lines[0].index(name)
        for line in lines[1:]:
            assert start == 0 or line[start - 1] == " ", (name, line)
            assert line[start:].split()[0] == line.split()[i]
    assert all(line == line.rstrip() for line in lines)
    assert agent.requests[0]["path"] == "/v1/resolve/orders"
    assert agent.requests[0]["query"] == {}


async def test_resolve_json_query_and_empty(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run("resolve", "orders", "--json", "--all", "--namespace", "shop",
                     "--api", agent.url) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert json.loads(out) == {
        "app": "orders",
        "namespace": "default",
        "index": 42,
        "endpoints": ENDPOINTS,
    }
    assert out.startswith('{\n  "app": "orders",\n  "namespace"')  # pretty, 2 spaces, in order
    assert agent.requests[0]["query"] == {"namespace": "shop", "all": "1"}

    assert await run("resolve", "nothing", "--api", agent.url) == 0
    assert capsys.readouterr().out.split() == fields(RESOLVE_HEADER)


async def test_members(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("members", "--cluster", "east", "--api", agent.url) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == fields("NODE CLUSTER REGION ZONE ADDRESS STATUS INCARNATION")
    assert lines[1].split() == fields("n1 east us-east us-east-1a 192.0.2.1:7946 alive 0")
    assert lines[2].split() == fields("n2 east us-east us-east-1b 192.0.2.2:7946 suspect 12")
    assert agent.requests[0]["query"] == {"cluster": "east"}

    assert await run("members", "--json", "--api", agent.url) == 0
    assert json.loads(capsys.readouterr().out) == MEMBERS
    assert agent.requests[1]["query"] == {}


async def test_deregister(agent: FakeAgent, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run("deregister", "orders-1", "--api", agent.url) == 0
    assert capsys.readouterr().out == "deregistered orders-1\n"
    assert agent.requests[0]["method"] == "DELETE"
    assert agent.requests[0]["path"] == "/v1/apps/orders-1"

    assert await run("deregister", "gone", "--api", agent.url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "meshd: error: instance gone is not registered on this node\n"

    # No JSON error sentence: still one line, naming the status.
    assert await run("deregister", "broken", "--api", agent.url) == 1
    assert "HTTP 500" in one_error_line(capsys.readouterr().err)


async def test_api_from_environment(
    agent: FakeAgent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without a scheme too: "HOST:PORT" is what people put in the variable.
    monkeypatch.setenv("MESHD_API", agent.url.removeprefix("http://"))
    assert await run("members") == 0
    assert len(agent.requests) == 1
    # The flag wins over the variable.
    monkeypatch.setenv("MESHD_API", "http://127.0.0.1:1")
    assert await run("members", "--api", agent.url + "/") == 0
    assert len(agent.requests) == 2
    capsys.readouterr()
    monkeypatch.setenv("MESHD_API", "ftp://x")
    assert await run("members") == 2
    assert "$MESHD_API must be an http:// URL" in one_error_line(capsys.readouterr().err)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["members"],
        ["resolve", "orders"],
        ["deregister", "x"],
        ["register", "a", "--instance", "i", "--address", "h", "--port", "1"],
    ],
)
async def test_unreachable_agent(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert await run(*argv, "--api", url) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"meshd: error: cannot reach the agent at {url}: ")
    assert "refused" in one_error_line(err).lower()


# ---------------------------------------------------------------------------
# The API token of write commands.

TOKEN = "cli-T0ken/+="


@pytest.fixture
async def guarded_agent(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeAgent]:
    """An API that wants TOKEN on writes and records the X-Consul-Token of each."""
    for name in ("MESHD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeAgent(url="")

    async def write(request: web.Request) -> web.Response:
        token = request.headers.get("X-Consul-Token")
        fake.requests.append({"method": request.method, "token": token})
        if token != TOKEN:
            return web.json_response({"error": "Permission denied: no token"}, status=403)
        return web.json_response({"instance": request.match_info["instance"], "version": 3})

    app = web.Application()
    app.router.add_put("/v1/apps/{instance}", write)
    app.router.add_delete("/v1/apps/{instance}", write)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield fake
    finally:
        await runner.cleanup()


def _register(url: str, *extra: str) -> list[str]:
    return ["register", "a", "--instance", "i", "--address", "h", "--port", "1", "--api", url,
            *extra]  # fmt: skip


async def test_write_commands_send_the_token_from_flag_file_or_environment(
    guarded_agent: FakeAgent,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = guarded_agent.url
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert await run(*_register(url, "--token", TOKEN)) == 0
    assert await run(*_register(url, "--token-file", str(path))) == 0
    assert await run("deregister", "i", "--api", url, "--token", TOKEN) == 0
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
    assert await run(*_register(url)) == 0
    assert await run("deregister", "i", "--api", url) == 0
    # meshd's own variable comes first, then a flag over both.
    monkeypatch.setenv("MESHD_HTTP_TOKEN", "meshd-one")
    assert await run(*_register(url)) == 1
    assert await run(*_register(url, "--token-file", str(path))) == 0
    sent = [r["token"] for r in guarded_agent.requests]
    assert sent == [TOKEN] * 5 + ["meshd-one", TOKEN]


async def test_refused_write_prints_the_agents_sentence(
    guarded_agent: FakeAgent, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run(*_register(guarded_agent.url)) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == "meshd: error: Permission denied: no token\n"
    assert await run("deregister", "i", "--api", guarded_agent.url, "--token", "wrong") == 1
    assert one_error_line(capsys.readouterr().err).endswith("Permission denied: no token\n")
    assert [r["token"] for r in guarded_agent.requests] == [None, "wrong"]


async def test_unusable_tokens_are_usage_errors(
    guarded_agent: FakeAgent,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    url = guarded_agent.url
    gone = tmp_path / "gone"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    cases = [
        (["--token", "a b"], "--token holds a space"),
        (["--token", ""], "--token is empty"),
        (["--token-file", str(gone)], f"--token-file file {gone} does not exist"),
        (["--token-file", str(empty)], f"--token-file file {empty} is empty"),
        (["--token", TOKEN, "--token-file", str(empty)], "not allowed with argument"),
    ]
    for extra, fragment in cases:
        assert await run(*_register(url, *extra)) == 2, extra
        assert fragment in one_error_line(capsys.readouterr().err)
    # A variable that would smuggle a second header line is refused, not sent.
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "t\r\nX-Evil: 1")
    assert await run("deregister", "i", "--api", url) == 2
    assert "$CONSUL_HTTP_TOKEN holds a space" in one_error_line(capsys.readouterr().err)
    assert guarded_agent.requests == []
