"""Local API access control (meshd.api.access) and the blocking-query cap.

In-process tests run the real application (``create_app``) over an in-memory
fake agent: every write route is refused without the token and with a wrong
one (403, one sentence, nothing reaching the agent, the state read back
unchanged) and accepted with each of the three forms Consul clients use;
reads stay open.  py-consul, the real client, is driven with and without its
token.  End-to-end tests run real ``meshd agent`` processes on 127.0.0.1: the
start-up refusals (exit 2, one line) and the CLI's token flags and variables.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import consul
import pytest
from aiohttp.test_utils import TestClient

from meshd.api.access import (
    MAX_BLOCKING_QUERIES,
    MISSING_TOKEN,
    RETRY_AFTER_SECONDS,
    WRONG_TOKEN,
    BlockingQueries,
    presented_token,
    require_token,
)
from meshd.api.app import BLOCKING_KEY, create_app
from meshd.api.http import Headers, Request, Response, json_response
from meshd.metrics import Metrics
from tests.agents import AgentProc, Certs, meshd_cmd, run_meshd, wait_until
from tests.api_server import api_client
from tests.fakes import FakeAgent

TOKEN = "s3cr3t-Token+/="
WRONG = "s3cr3t-Token+/-"  # same length, one character off
TOKEN_ENVS = ("MESHD_HTTP_TOKEN", "CONSUL_HTTP_TOKEN")


@pytest.fixture(autouse=True)
def no_token_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # py-consul and the CLI read these (py-consul even prefers $CONSUL_HTTP_TOKEN
    # to the token it is given): a developer's shell must not decide a test.
    for name in TOKEN_ENVS:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------
# The shared fake agent (tests/fakes.py), seeded with web-1, behind a token.


@pytest.fixture
def agent(agent: FakeAgent) -> FakeAgent:
    agent.seed()
    return agent


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[TestClient]:
    async with api_client(create_app(agent, api_token=TOKEN)) as c:
        yield c


def state(agent: FakeAgent) -> tuple[Any, ...]:
    """Everything a write could change, to compare before and after."""
    regs = {
        k: (r.record.app, r.record.port, r.record.health) for k, r in agent.registrations.items()
    }
    return regs, agent.policy, agent.index


async def api_state(client: TestClient) -> tuple[Any, ...]:
    """The same, read back through the API (no token: reads are open)."""
    apps = await (await client.get("/v1/apps")).json()
    policy = await (await client.get("/v1/policy")).json()
    index = (await client.get("/v1/resolve/web")).headers["X-Meshd-Index"]
    return sorted((a["instance"], a["health"]) for a in apps), policy, index


def with_token(form: str, token: str, path: str) -> tuple[str, dict[str, str]]:
    """``path`` and headers carrying ``token`` in one of the three accepted forms."""
    if form == "header":
        return path, {"X-Consul-Token": token}
    if form == "bearer":
        return path, {"Authorization": f"Bearer {token}"}
    assert form == "query"
    # Encoded, as a client must: "+" in a query string means a space.
    return path + ("&" if "?" in path else "?") + f"token={quote(token, safe='')}", {}


FORMS = ("header", "bearer", "query")
# (method, path, body, what the agent does when it is accepted, native JSON errors?)
WRITES: list[tuple[str, str, Any, str, bool]] = [
    ("PUT", "/v1/apps/orders-1", {"app": "orders", "address": "192.0.2.9", "port": 81},
     "register orders-1", True),
    ("DELETE", "/v1/apps/web-1", None, "deregister web-1", True),
    ("PUT", "/v1/apps/web-1/health", {"status": "critical"}, "health web-1 critical", True),
    ("PUT", "/v1/policy", {"failover": ["west"]}, "policy", True),
    ("PUT", "/v1/agent/service/register",
     {"Name": "orders", "ID": "orders-1", "Address": "192.0.2.9", "Port": 81},
     "register orders-1", False),
    ("PUT", "/v1/agent/service/deregister/web-1", None, "deregister web-1", False),
    ("PUT", "/v1/agent/check/pass/service:web-1", None, "health web-1 passing", False),
    ("PUT", "/v1/agent/check/warn/service:web-1", None, "health web-1 warning", False),
    ("PUT", "/v1/agent/check/fail/service:web-1", None, "health web-1 critical", False),
    ("PUT", "/v1/agent/check/update/service:web-1", {"Status": "warning"},
     "health web-1 warning", False),
]  # fmt: skip
WRITE_IDS = [f"{m} {p}" for m, p, *_ in WRITES]


async def send(
    client: TestClient, method: str, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, str, str]:
    data = None if body is None else json.dumps(body)
    resp = await client.request(method, path, data=data, headers=headers or {})
    return resp.status, resp.content_type, await resp.text()


def assert_refusal(status: int, ctype: str, text: str, native: bool, sentence: str) -> None:
    assert status == 403
    if native:
        assert ctype == "application/json" and json.loads(text) == {"error": sentence}
    else:  # the Consul subset answers errors as plain text, as Consul does
        assert ctype == "text/plain" and text == sentence
    assert "\n" not in sentence and sentence.startswith("Permission denied: ")


def denied(agent: FakeAgent) -> float:
    value = agent.metrics.registry.get_sample_value("meshd_rejected_total", {"reason": "api-token"})
    return value or 0.0


# ---------------------------------------------------------------------------
# Writes need the token


@pytest.mark.parametrize(("method", "path", "body", "call", "native"), WRITES, ids=WRITE_IDS)
async def test_write_without_token_is_refused_and_stores_nothing(
    client: TestClient,
    agent: FakeAgent,
    method: str,
    path: str,
    body: Any,
    call: str,
    native: bool,
) -> None:
    before, seen = state(agent), await api_state(client)
    assert_refusal(*await send(client, method, path, body), native, MISSING_TOKEN)
    # An empty token is no token (Consul's clients send none when unset).
    empty = await send(client, method, path, body, {"X-Consul-Token": ""})
    assert_refusal(*empty, native, MISSING_TOKEN)
    assert agent.calls == []
    assert state(agent) == before and await api_state(client) == seen
    assert denied(agent) == 2


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("method", "path", "body", "call", "native"), WRITES, ids=WRITE_IDS)
async def test_write_with_wrong_token_is_refused_and_stores_nothing(
    client: TestClient,
    agent: FakeAgent,
    method: str,
    path: str,
    body: Any,
    call: str,
    native: bool,
    form: str,
) -> None:
    before, seen = state(agent), await api_state(client)
    target, headers = with_token(form, WRONG, path)
    assert_refusal(*await send(client, method, target, body, headers), native, WRONG_TOKEN)
    assert agent.calls == []
    assert state(agent) == before and await api_state(client) == seen
    assert denied(agent) == 1


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize(("method", "path", "body", "call", "native"), WRITES, ids=WRITE_IDS)
async def test_write_with_the_token_is_accepted(
    client: TestClient,
    agent: FakeAgent,
    method: str,
    path: str,
    body: Any,
    call: str,
    native: bool,
    form: str,
) -> None:
    seen = await api_state(client)
    target, headers = with_token(form, TOKEN, path)
    status, _, text = await send(client, method, target, body, headers)
    assert status == 200, text
    assert agent.calls == [call]
    assert await api_state(client) != seen  # the write is visible to a reader
    assert denied(agent) == 0


async def test_refused_writes_are_counted_by_route_too(
    client: TestClient, agent: FakeAgent
) -> None:
    await send(client, "DELETE", "/v1/apps/web-1", None)
    text = agent.metrics.exposition().decode()
    assert 'meshd_rejected_total{reason="api-token"} 1.0' in text
    assert 'route="/v1/apps/{instance}",status="403"' in text


async def test_reads_stay_open(client: TestClient, agent: FakeAgent) -> None:
    for path in (
        "/v1/apps", "/v1/resolve/web", "/v1/members", "/v1/clusters", "/v1/health",
        "/v1/records", "/v1/policy", "/metrics", "/v1/agent/self", "/v1/agent/services",
        "/v1/agent/checks", "/v1/health/service/web", "/v1/catalog/services",
        "/v1/catalog/service/web", "/v1/status/leader",
    ):  # fmt: skip
        resp = await client.get(path)
        assert resp.status == 200, path
        # A wrong token on a read is ignored, not refused: reads do not check it.
        resp = await client.get(path, headers={"X-Consul-Token": WRONG})
        assert resp.status == 200, path
    assert (await client.head("/v1/resolve/web")).status == 200
    assert denied(agent) == 0
    assert [
        e["instance"] for e in (await (await client.get("/v1/resolve/web")).json())["endpoints"]
    ] == ["web-1"]


async def test_a_write_route_added_later_is_protected_by_default(agent: FakeAgent) -> None:
    app = create_app(agent, api_token=TOKEN)
    reached: list[str] = []

    async def revoke(request: Request) -> Response:
        reached.append(request.method)
        return json_response({"ok": True})

    app.router.add_post("/v1/revocations", revoke)
    async with api_client(app) as c:
        status, _, text = await send(c, "POST", "/v1/revocations", {"serial": 1})
        assert_refusal(status, "application/json", text, True, MISSING_TOKEN)
        assert reached == []
        resp = await c.post("/v1/revocations", headers={"X-Consul-Token": TOKEN})
        assert resp.status == 200 and reached == ["POST"]
        # A write to no route at all is refused before it can learn that.
        assert (await c.put("/v1/nothing")).status == 403
        assert (await c.put("/v1/nothing", headers={"X-Consul-Token": TOKEN})).status == 404


async def test_without_a_token_configured_writes_are_open(agent: FakeAgent) -> None:
    async with api_client(create_app(agent)) as c:
        status, _, _ = await send(c, "DELETE", "/v1/apps/web-1", None)
        assert status == 200 and agent.calls == ["deregister web-1"]


def request_with(path: str = "/v1/apps/x", **headers: str) -> Request:
    return Request("PUT", path, Headers({k.lower(): v for k, v in headers.items()}))


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        ("/x", {}, None),
        ("/x", {"X-Consul-Token": "a"}, "a"),
        ("/x", {"Authorization": "Bearer a"}, "a"),
        ("/x", {"Authorization": "bearer   a  "}, "a"),  # scheme is case-insensitive
        ("/x", {"Authorization": "Bearer a b"}, "a"),  # a bearer token has no spaces
        ("/x", {"Authorization": "Basic YTpi"}, None),  # not a token at all
        ("/x", {"Authorization": "Bearer"}, None),
        ("/x?token=q", {}, "q"),
        # Consul's order: the query parameter, then X-Consul-Token, then Bearer.
        ("/x?token=q", {"X-Consul-Token": "h", "Authorization": "Bearer b"}, "q"),
        ("/x", {"X-Consul-Token": "h", "Authorization": "Bearer b"}, "h"),
        ("/x?token=", {"X-Consul-Token": "", "Authorization": "Bearer b"}, "b"),
    ],
)
def test_presented_token(path: str, headers: dict[str, str], expected: str | None) -> None:
    assert presented_token(request_with(path, **headers)) == expected


async def test_token_comparison_survives_any_presented_value(
    client: TestClient, agent: FakeAgent
) -> None:
    # Non-ASCII, very long, or a prefix of the real token: refused, never a 500.
    for bad in ("é" * 3, "x" * 4000, TOKEN[:-1], TOKEN + "x"):
        status, _, text = await send(
            client, "DELETE", "/v1/apps/web-1", None, {"Authorization": f"Bearer {bad}"}
        )
        assert status == 403 and WRONG_TOKEN in text
    assert agent.calls == []


def test_misuse_raises() -> None:
    with pytest.raises(ValueError):
        require_token("", Metrics(), lambda r, s, m: Response())
    with pytest.raises(ValueError):
        BlockingQueries(Metrics(), 0)
    assert BlockingQueries(Metrics()).limit == MAX_BLOCKING_QUERIES


# ---------------------------------------------------------------------------
# py-consul, the real client


def port_of(client: TestClient) -> int:
    assert client.port is not None
    return client.port


def py_consul_session(port: int, token: str | None) -> list[Any]:
    """What py-consul's blocking client gets for each write (run in a thread)."""
    c = consul.Consul(host="127.0.0.1", port=port, token=token)
    results: list[Any] = []
    calls = [
        lambda: c.agent.service.register(
            "orders",
            service_id="orders-1",
            address="192.0.2.9",
            port=81,
            check=consul.Check.ttl("10s"),
        ),
        lambda: c.agent.check.ttl_warn("service:orders-1"),
        lambda: c.agent.service.deregister("web-1"),
    ]
    for call in calls:
        try:
            results.append(call())
        except consul.ACLPermissionDenied as exc:
            results.append(exc)
    # Reads need no token either way.
    results.append(sorted(c.agent.services()))
    return results


async def test_py_consul_without_its_token_is_refused(client: TestClient, agent: FakeAgent) -> None:
    register, warn, deregister, services = await asyncio.to_thread(
        py_consul_session, port_of(client), None
    )
    for refused in (register, warn, deregister):
        assert isinstance(refused, consul.ACLPermissionDenied)
        assert MISSING_TOKEN in str(refused)
    assert services == ["web-1"] and agent.calls == []


async def test_py_consul_with_a_wrong_token_is_refused(
    client: TestClient, agent: FakeAgent
) -> None:
    register, *_ = await asyncio.to_thread(py_consul_session, port_of(client), WRONG)
    assert isinstance(register, consul.ACLPermissionDenied) and WRONG_TOKEN in str(register)
    assert agent.calls == []


async def test_py_consul_with_its_token_writes(client: TestClient, agent: FakeAgent) -> None:
    register, warn, deregister, services = await asyncio.to_thread(
        py_consul_session, port_of(client), TOKEN
    )
    assert (register, warn, deregister) == (True, True, True)
    assert services == ["orders-1"]
    assert agent.registrations["orders-1"].record.health == "warning"


# ---------------------------------------------------------------------------
# The blocking-query cap


async def test_blocking_queries_past_the_cap_get_503_and_others_still_answer() -> None:
    agent = FakeAgent()
    agent.seed()
    app = create_app(agent, max_blocking_queries=2)
    cap = app[BLOCKING_KEY]
    async with api_client(app) as c:
        index = agent.index
        native = f"/v1/resolve/web?index={index}&wait=20s"
        consul_blocking = f"/v1/health/service/web?index={index + 1}&wait=20s"
        waiting = [
            asyncio.create_task(c.get(native)),
            asyncio.create_task(c.get(consul_blocking)),
        ]
        await asyncio.wait_for(_until(lambda: cap.in_flight == 2), 10)

        resp = await c.get(native)
        assert resp.status == 503
        assert resp.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
        message = (await resp.json())["error"]
        assert "too many blocking queries" in message and "\n" not in message
        resp = await c.get(consul_blocking)
        assert resp.status == 503 and resp.content_type == "text/plain"
        assert resp.headers["Retry-After"] == str(RETRY_AFTER_SECONDS)

        # Queries that do not block are never refused by the cap.
        for path in (
            "/v1/resolve/web",
            "/v1/health/service/web",
            "/v1/health/service/web?index=0",  # Consul's "no index"
            "/v1/catalog/services",
            "/v1/resolve/web?index=abc",  # malformed: a 400, not a 503
        ):
            resp = await c.get(path)
            assert resp.status in (200, 400) and resp.status != 503, path
        assert cap.in_flight == 2
        refused = agent.metrics.registry.get_sample_value(
            "meshd_rejected_total", {"reason": "blocking-queries"}
        )
        assert refused == 2

        agent.bump()  # a change releases both waiters
        for task in waiting:
            assert (await asyncio.wait_for(task, 10)).status == 200
        assert cap.in_flight == 0
        # Their slots are free again.
        resp = await c.get(f"/v1/resolve/web?index={agent.index}&wait=50ms")
        assert resp.status == 200 and cap.in_flight == 0


async def test_a_failing_blocking_query_frees_its_slot() -> None:
    agent = FakeAgent()
    app = create_app(agent, max_blocking_queries=1)

    async def broken(index: int, timeout: float) -> int:
        raise RuntimeError("boom")

    agent.wait_for_index = broken  # type: ignore[method-assign]
    async with api_client(app) as c:
        for _ in range(3):
            assert (await c.get("/v1/resolve/web?index=1")).status == 500
        assert app[BLOCKING_KEY].in_flight == 0


async def _until(pred: Any) -> None:
    while not pred():
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------
# End to end: real agents on 127.0.0.1


def token_file(directory: Path, content: str = TOKEN + "\n") -> Path:
    path = directory / "api-token"
    path.write_text(content)
    path.chmod(0o600)
    return path


def agent_exit(certs: Certs, root: Path, api: str, *extra: str) -> tuple[int, str]:
    """Run an agent that must refuse to start, its API on ``api``; exit code and stderr."""
    args = AgentProc(root, certs, "n1").args
    args[args.index("--api") + 1] = api
    proc = subprocess.run(
        [*meshd_cmd(), *args, *extra], capture_output=True, text=True, timeout=60, check=False
    )
    return proc.returncode, proc.stderr


@pytest.mark.e2e
def test_non_loopback_api_without_token_exits_2(certs: Certs, tmp_path: Path) -> None:
    # Refused before anything is bound, so this 0.0.0.0 never listens.
    code, err = agent_exit(certs, tmp_path, "0.0.0.0:0")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("meshd: error: ")
    assert "--api 0.0.0.0:0 is not a loopback address" in err
    assert "--api-token-file" in err
    # Nothing half-started: refused before the state directory was made.
    assert not (tmp_path / "state").exists()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("  \n\t\n", "is empty"),
        ("two words\n", "printable ASCII"),
        ("tok\x07en", "printable ASCII"),
    ],
)
def test_bad_token_file_exits_2(
    certs: Certs, tmp_path: Path, content: str | None, fragment: str
) -> None:
    path = tmp_path / "api-token" if content is None else token_file(tmp_path, content)
    code, err = agent_exit(certs, tmp_path, "127.0.0.1:0", "--api-token-file", str(path))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("meshd: error: --api-token-file file ")
    assert fragment in err
    assert not (tmp_path / "state").exists()


@pytest.fixture(scope="module")
def guarded(
    certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[AgentProc, Path]]:
    root = tmp_path_factory.mktemp("guarded")
    path = token_file(root)
    a = AgentProc(root, certs, "n1", extra=["--api-token-file", str(path)]).start()
    yield a, path
    a.stop()


def cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    base = {k: v for k, v in os.environ.items() if k not in TOKEN_ENVS}
    proc = subprocess.run(
        [*meshd_cmd(), *argv], capture_output=True, text=True, timeout=60, check=False,
        env=base | (env or {}),
    )  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.e2e
def test_agent_with_token_file_refuses_open_writes(guarded: tuple[AgentProc, Path]) -> None:
    a, _ = guarded
    before = a.metric("meshd_rejected_total", reason="api-token")
    body = {"app": "raw", "address": "127.0.0.1", "port": 9}
    status, answer, _ = a.call("PUT", "/v1/apps/raw-1", body)
    assert status == 403 and answer == {"error": MISSING_TOKEN}
    status, answer, _ = a.call("PUT", "/v1/agent/service/register", {"Name": "raw", "Port": 9})
    assert status == 403 and answer == MISSING_TOKEN
    assert a.resolve("raw") == [] and a.get("/v1/apps") == []
    assert a.metric("meshd_rejected_total", reason="api-token") == before + 2
    assert "raw" not in a.get("/v1/catalog/services")


@pytest.mark.e2e
def test_cli_register_with_and_without_the_token(guarded: tuple[AgentProc, Path]) -> None:
    a, path = guarded
    reg = ["register", "orders", "--address", "127.0.0.1", "--api", a.api]

    code, out, err = cli(*reg, "--instance", "o-0", "--port", "3500")
    assert code == 1 and out == ""
    assert err == f"meshd: error: {MISSING_TOKEN}\n"
    code, _, err = cli(*reg, "--instance", "o-0", "--port", "3500", "--token", WRONG)
    assert code == 1 and err == f"meshd: error: {WRONG_TOKEN}\n"
    assert a.resolve("orders") == []

    ways: list[tuple[list[str], dict[str, str]]] = [
        (["--token", TOKEN], {}),
        (["--token-file", str(path)], {}),
        ([], {"MESHD_HTTP_TOKEN": TOKEN}),
        ([], {"CONSUL_HTTP_TOKEN": TOKEN}),
        # A flag wins over a stale variable.
        (["--token", TOKEN], {"CONSUL_HTTP_TOKEN": WRONG}),
    ]
    for i, (flags, env) in enumerate(ways, start=1):
        code, out, err = cli(*reg, "--instance", f"o-{i}", "--port", str(3500 + i), *flags, env=env)
        assert code == 0, err
        assert out.startswith(f"registered o-{i} ")
    assert sorted(e["instance"] for e in a.resolve("orders")) == [f"o-{i}" for i in range(1, 6)]

    # Reads need no token.
    code, out, _ = cli("resolve", "orders", "--api", a.api)
    assert code == 0 and "o-5" in out

    code, _, err = cli("deregister", "o-5", "--api", a.api)
    assert code == 1 and MISSING_TOKEN in err
    code, out, _ = cli("deregister", "o-5", "--api", a.api, env={"CONSUL_HTTP_TOKEN": TOKEN})
    assert code == 0 and out == "deregistered o-5\n"
    wait_until(lambda: len(a.resolve("orders")) == 4, 10, "o-5 gone")


@pytest.mark.e2e
def test_real_agent_with_py_consul(guarded: tuple[AgentProc, Path]) -> None:
    a, _ = guarded
    port = int(a.api.rpartition(":")[2])
    register, warn, deregister, _ = py_consul_session(port, None)
    assert all(isinstance(r, consul.ACLPermissionDenied) for r in (register, warn, deregister))
    assert "orders-1" not in a.get("/v1/agent/services")
    register, warn, _, services = py_consul_session(port, TOKEN)
    assert (register, warn) == (True, True) and "orders-1" in services
    assert [e["health"] for e in a.resolve("orders", "?all=1") if e["instance"] == "orders-1"] == [
        "warning"
    ]
    assert run_meshd("deregister", "orders-1", "--api", a.api, "--token", TOKEN).returncode == 0
