"""What an idle agent holds per process and per connection (issue 13, memory).

Each test pins one saving measured in benchmarks/RESULTS.md and fails if it
is undone: aiohttp imported by ``meshd agent`` without the system's CA bundle
(while HTTP checks still verify against it), gossip servers that send no TLS
session tickets, and page-sized TLS read buffers.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path

import pytest

from meshd.agent import run
from meshd.agent.checks import _default_session
from meshd.agent.transport import make_client_context, make_server_context
from meshd.identity import create_ca, issue_node_cert, write_ca, write_node_cert
from tests.agents import python_json

_AGENT_IMPORT = """
import json, os, ssl
names = ("SSL_CERT_FILE", "SSL_CERT_DIR")
before = {n: os.environ.get(n) for n in names}
from meshd.cli import _without_system_ca_bundle
with _without_system_ca_bundle():
    import meshd.agent.run
import aiohttp.connector as c
print(json.dumps({
    "verified": c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    "unverified": c._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509_ca"],
    "env_restored": before == {n: os.environ.get(n) for n in names},
    "system": ssl.create_default_context().cert_store_stats()["x509_ca"],
}))
"""


def _system_cas() -> int:
    return int(ssl.create_default_context().cert_store_stats()["x509_ca"])


@pytest.mark.parametrize("set_env", [True, False], ids=["SSL_CERT_FILE set", "unset"])
def test_the_agent_imports_aiohttp_without_the_system_ca_bundle(set_env: bool) -> None:
    if _system_cas() == 0:
        pytest.skip("this system has no CA bundle: nothing to leave out")
    env = dict(os.environ)
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        env.pop(name, None)
    if set_env:
        env["SSL_CERT_FILE"] = ssl.get_default_verify_paths().cafile or ""
    seen = python_json(_AGENT_IMPORT, env)
    assert seen["verified"] == 0 and seen["unverified"] == 0
    # The environment is as it was: whatever the agent starts later finds the
    # system's CA certificates again.
    assert seen["env_restored"]
    assert seen["system"] > 0


_CMD_AGENT = """
import json, os, sys, types
import meshd.agent
seen = {}
# A stand-in for the runtime, already "imported": the name is looked up
# inside the command's import statement, which is where aiohttp is imported.
stub = types.ModuleType("meshd.agent.run")
def lookup(name):
    seen[name] = os.environ.get("SSL_CERT_FILE")
    return lambda cfg: 0
stub.__getattr__ = lookup
sys.modules["meshd.agent.run"] = stub
from meshd.cli import main
code = main(["agent", "--dev", "--node", "n1"])
print(json.dumps({"code": code, "seen": seen, "after": os.environ.get("SSL_CERT_FILE")}))
"""


def test_meshd_agent_imports_its_runtime_without_the_ca_bundle() -> None:
    out = python_json(
        _CMD_AGENT, dict(os.environ, SSL_CERT_FILE="/etc/ssl/certs/ca-certificates.crt")
    )
    assert out["code"] == 0
    assert out["seen"]["run_agent"] == os.devnull
    assert out["after"] == "/etc/ssl/certs/ca-certificates.crt"


async def test_http_checks_still_verify_against_the_system_cas() -> None:
    session = _default_session()
    try:
        tls = session.connector._ssl  # type: ignore[union-attr]
        assert isinstance(tls, ssl.SSLContext)
        assert tls.verify_mode == ssl.CERT_REQUIRED and tls.check_hostname
        assert tls.cert_store_stats()["x509_ca"] == _system_cas()
    finally:
        await session.close()


def test_the_tls_read_buffer_is_a_page() -> None:
    assert run.TLS_READ_BUFFER == 4096


async def test_gossip_servers_send_no_session_tickets(tmp_path: Path) -> None:
    ca = create_ca("mesh.local")
    write_ca(ca, tmp_path)
    write_node_cert(issue_node_cert(ca, "n1", "c1", ips=["127.0.0.1"]), tmp_path)
    files = (str(tmp_path / "ca.pem"), str(tmp_path / "n1.pem"), str(tmp_path / "n1.key"))
    server_ctx, client_ctx = make_server_context(*files), make_client_context(*files)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname="n1"
        )
        writer.write(b"ping")
        # Tickets arrive after the handshake, before application data: once
        # the echo is read, any ticket the server sent has been processed.
        assert await reader.readexactly(4) == b"ping"
        session = writer.get_extra_info("ssl_object").session
        assert session is not None and not session.has_ticket
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
