"""What an idle agent holds per process and per connection (issue 13, memory).

Each test pins one saving measured in benchmarks/RESULTS.md and fails if it
is undone: gossip servers that send no TLS session tickets and page-sized
TLS read buffers; and HTTP checks, the one user of aiohttp's client in an
agent (tests/test_agent_imports.py keeps it off the idle path), still verify
against the system's CA certificates.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from meshd.agent import run
from meshd.agent.checks import _default_session
from meshd.agent.transport import make_client_context, make_server_context
from meshd.identity import create_ca, issue_node_cert, write_ca, write_node_cert


def _system_cas() -> int:
    return int(ssl.create_default_context().cert_store_stats()["x509_ca"])


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
