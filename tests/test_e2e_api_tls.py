"""End to end: the API over HTTPS (``meshd agent --api-tls``).

A real agent serves its API with its own certificate.  Clients that check it
against the mesh CA work unchanged: the test's urllib client, the ``meshd``
CLI (``--api-ca``, ``$MESHD_API_CA``) and py-consul (``scheme="https"``,
``verify=CA``).  A client trusting only the system's bundle is refused, and
plain HTTP on the port gets no answer, so a token never crosses the network
in clear.
"""

from __future__ import annotations

import http.client
import os
import ssl
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import consul
import pytest

from tests.agents import AgentProc, Certs, meshd_cmd, run_meshd

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> Iterator[AgentProc]:
    a = AgentProc(tmp_path_factory.mktemp("tls"), certs, "tls1", extra=["--api-tls"]).start()
    yield a
    a.stop()


def _hostport(agent: AgentProc) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(agent.api)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def test_the_ready_line_names_https_and_checked_clients_work(agent: AgentProc) -> None:
    assert agent.api.startswith("https://127.0.0.1:")
    agent.register("orders", "orders-tls1", 9400)
    assert [e["instance"] for e in agent.resolve("orders")] == ["orders-tls1"]


def test_plain_http_and_unchecked_clients_get_nothing(agent: AgentProc) -> None:
    host, port = _hostport(agent)
    plain = http.client.HTTPConnection(host, port, timeout=5)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        plain.request("GET", "/v1/health")
        plain.getresponse()
    plain.close()
    system_only = http.client.HTTPSConnection(
        host, port, timeout=5, context=ssl.create_default_context()
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        system_only.request("GET", "/v1/health")
    system_only.close()


def test_the_cli_checks_the_api_against_the_ca_it_is_given(agent: AgentProc) -> None:
    ca = str(agent.ca)
    shown = run_meshd("resolve", "orders", "--api", agent.api, "--api-ca", ca)
    assert "orders-tls1" in shown.stdout
    by_env = subprocess.run(
        [*meshd_cmd(), "resolve", "orders", "--api", agent.api],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, MESHD_API_CA=ca),
    )
    assert by_env.returncode == 0 and "orders-tls1" in by_env.stdout, by_env.stderr
    unchecked = run_meshd("resolve", "orders", "--api", agent.api, check=False)
    assert unchecked.returncode == 1
    assert "cannot reach the agent" in unchecked.stderr and "CERTIFICATE" in unchecked.stderr
    missing = run_meshd(
        "resolve", "orders", "--api", agent.api, "--api-ca", "/nonexistent", check=False
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_py_consul_over_https(agent: AgentProc) -> None:
    host, port = _hostport(agent)
    c = consul.Consul(host=host, port=port, scheme="https", verify=str(Path(agent.ca)))
    assert c.agent.service.register(
        "billing", service_id="billing-1", address="127.0.0.1", port=9401
    )
    _, nodes = c.catalog.service("billing")
    assert [n["ServiceID"] for n in nodes] == ["billing-1"]
    assert c.agent.service.deregister("billing-1")
