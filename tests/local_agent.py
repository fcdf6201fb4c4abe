"""An agent in this process: its core, its SQLite state and its HTTP API under
aiohttp's test client, without a CLI or a second process.

For tests that need the real agent behind the API (what ``FakeAgent`` cannot
show: storage, caching by generation) but no network peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from meshd.agent.agent import Agent
from meshd.agent.statedb import DB_FILE, StateDB
from meshd.agent.transport import Transport, make_client_context, make_server_context
from meshd.api.app import create_app
from meshd.identity import StateVerifier, create_ca, issue_node_cert, write_ca, write_node_cert
from meshd.metrics import Metrics
from meshd.policy.policy import Policy
from meshd.protocol.config import Config
from tests.api_server import api_client

#: What ``start_local`` takes: the node's certificate, then the CA, certificate
#: and key files.
TLS = tuple[Any, Path, Path, Path]


def write_tls(out: Path) -> TLS:
    """A CA and one node certificate (n1 of cluster east on 127.0.0.1) under ``out``."""
    ca = create_ca("mesh.local")
    ca_pem, _ = write_ca(ca, out)
    nc = issue_node_cert(ca, "n1", "east", ips=["127.0.0.1"])
    cert, key = write_node_cert(nc, out)
    return nc, ca_pem, cert, key


@dataclass
class Local:
    agent: Agent
    db: StateDB
    client: TestClient

    async def put(self, path: str, body: Any) -> tuple[int, Any]:
        resp = await self.client.put(path, json=body)
        ctype = resp.content_type
        return resp.status, await (resp.json() if ctype == "application/json" else resp.text())

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await self.client.get(path)
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()

    async def apps(self) -> list[dict[str, Any]]:
        status, body = await self.get("/v1/apps")
        assert status == 200
        return body

    def metric(self, text: str, line_start: str) -> float:
        for line in text.splitlines():
            if line.startswith(line_start):
                return float(line.rpartition(" ")[2])
        return 0.0


async def start_local(tls: TLS, state_dir: Path, policy: Policy | None = None) -> Local:
    nc, ca_pem, cert, key = tls
    metrics = Metrics()
    transport = Transport(
        server_ctx=make_server_context(str(ca_pem), str(cert), str(key)),
        client_ctx=make_client_context(str(ca_pem), str(cert), str(key)),
        ca_certs=[nc.ca_cert],
        trust_domain=nc.trust_domain,
        metrics=metrics,
        on_message=lambda peer, msg: None,
        on_refused=lambda addr: None,
    )
    host, port = await transport.listen("127.0.0.1", 0)
    agent = Agent(
        node_cert=nc,
        verifier=StateVerifier(nc.ca_cert, nc.trust_domain),
        transport=transport,
        metrics=metrics,
        protocol=Config.local(),
        region="r1",
        zone="z1",
        advertise=f"{host}:{port}",
        policy=policy,
    )
    db = StateDB.open(state_dir / DB_FILE)
    agent.attach_statedb(db)
    agent.start([])
    client = api_client(create_app(agent))
    await client.start_server()
    return Local(agent, db, client)


async def stop_local(local: Local) -> None:
    await local.client.close()
    await local.agent.stop(leave=False)
    local.db.close()
