"""End to end: Prometheus's own tools against a real agent's ``/metrics``.

``promtool check metrics`` lints the exposition (names, types, help, the
``_total`` of counters), and a real ``prometheus`` server scrapes the agent
and answers a query for the agent's figures: what an operator's monitoring
does.  Needs Debian's ``prometheus`` package (promtool comes with it); the
test skips without it and says so.  The server listens on 127.0.0.1 only,
keeps its data in the test's directory, and is stopped by its PID.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.agents import AgentProc, Certs, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("prom-agent")
    a = AgentProc(root, Certs(root / "pki"), "p1").start()
    try:
        a.register("orders", "o1", 3500)
        a.get("/v1/resolve/orders")  # a lookup, so its histogram has a sample
        yield a
    finally:
        a.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_promtool_finds_nothing_to_say(agent: AgentProc) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    status, text, _ = agent.call("GET", "/metrics")
    assert status == 200
    done = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_a_prometheus_server_scrapes_the_agent(agent: AgentProc, tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    target = agent.api.removeprefix("http://").rstrip("/")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: meshd\n    static_configs: [{{targets: ['{target}']}}]\n"
    )
    port = _free_port()
    server = subprocess.Popen(
        [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def query(expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def answered(expr: str) -> list[dict[str, Any]] | None:
        try:
            return query(expr) or None
        except OSError:
            return None  # not listening yet

    try:
        [up] = wait_until(lambda: answered('up{job="meshd"}'), 60, "the agent scraped")
        assert up["value"][1] == "1"
        # The agent's own figures, as the server stored them: its one record
        # and itself, alive.
        [records] = wait_until(
            lambda: answered('meshd_records{job="meshd", state="served"}'), 30, "records scraped"
        )
        assert records["value"][1] == "1"
        [alive] = query('meshd_members{job="meshd", status="alive"}')
        assert alive["value"][1] == "1"
        assert query('count({job="meshd", __name__=~"meshd_.+"})')[0]["value"][1] != "0"
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)
