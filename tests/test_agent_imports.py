"""What an idle agent imports: the modules it does not need stay unloaded.

Every module an agent imports stays resident for its whole life (code,
docstrings, tables), so the idle memory budget (benchmarks/RESULTS.md, issue
13) depends on imports made only where they are needed: dnspython behind
``--dns``, the filter language behind ``?filter=``, the TOML parser behind
``--config`` and policy files, importlib.metadata behind ``--version`` and
``/v1/agent/self``.  These tests fail if any of them comes back on the idle
path.  They check behaviour (which modules are loaded), not speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.agents import AgentProc, Certs, python_json

#: Modules an idle agent must not have loaded, and why each is kept out.
NOT_ON_THE_IDLE_PATH = {
    "dns": "dnspython: only agents started with --dns answer DNS",
    "meshd.api.dns": "only agents started with --dns answer DNS",
    "meshd.api.filter": "the filter language: only a ?filter= query needs it",
    "tomllib": "TOML: only --config and policy files are TOML",
    "difflib": "only a config file with an unknown key needs a suggestion",
    "importlib.metadata": "the version: only --version and /v1/agent/self ask",
    "meshd.gateway": "the gateway is another command",
    "aiohttp": "the API has its own HTTP server; only HTTP health checks use aiohttp's client",
    "multidict": "aiohttp's, never needed without it",
    "yarl": "aiohttp's, never needed without it",
    "meshd.testing": "the harness is for tests and simulations",
}


# Everything `meshd agent` imports up to serving, without binding a socket:
# the command line, the config, the runtime, the agent and the full HTTP app
# (every route, native and Consul) over the shared fake agent.
_START_PATH = """
import json, sys
from meshd.cli import build_parser
from meshd.agent.config import load_config
args = build_parser().parse_args(["agent", "--dev", "--node", "n1"])
load_config(vars(args))
import meshd.agent.run, meshd.agent.agent
from meshd.api.app import create_app
from tests.fakes import FakeAgent
create_app(FakeAgent())
{extra}
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(extra: str = "") -> set[str]:
    return set(python_json(_START_PATH.format(extra=extra)))


def _loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_the_agent_start_path_leaves_unneeded_modules_unloaded() -> None:
    modules = _modules_after()
    loaded = {name: why for name, why in NOT_ON_THE_IDLE_PATH.items() if _loaded(modules, name)}
    assert not loaded, f"imported on the agent's start path: {loaded}"
    # The check sees what it looks for: the agent's own modules are there.
    assert {"meshd.agent.agent", "meshd.api.consul", "meshd.api.connection"} <= modules


def test_each_lazy_import_still_loads_where_it_is_needed() -> None:
    # The other side of the test above: the names are right, and the code
    # that needs each module still gets it.
    modules = _modules_after(
        "from meshd.api.consul import _version; _version()\n"
        "import meshd.api.dns\n"
        "from meshd.policy.policy import load_policy_file\n"
        "import tempfile, pathlib\n"
        "p = pathlib.Path(tempfile.mkdtemp()) / 'p.toml'\n"
        "p.write_text('')\n"
        "load_policy_file(p)\n"
        "import asyncio\n"
        "from meshd.agent.checks import _default_session\n"
        "async def close(): await _default_session().close()\n"
        "asyncio.run(close())\n"
    )
    for name in ("importlib.metadata", "dns", "meshd.api.dns", "tomllib", "aiohttp"):
        assert _loaded(modules, name), name


@pytest.mark.e2e
def test_a_running_agent_answering_plain_queries_loads_none_of_them(
    tmp_path: Path, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real process: CPython reports every import on stderr
    # (PYTHONPROFILEIMPORTTIME), which the helper collects with the log.
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")
    agent = AgentProc(tmp_path, certs, "imports").start()
    try:
        agent.get("/v1/members")
        agent.get("/v1/catalog/services")
        agent.get("/v1/health/service/web")
        before = _imported(agent.lines)
        # A filtered query must load the filter language, so the parse above
        # would have seen it had the idle path loaded it.
        agent.get("/v1/agent/services?filter=Service%20%3D%3D%20%22web%22")
        after = _imported(agent.lines)
    finally:
        agent.stop()
    loaded = {name: why for name, why in NOT_ON_THE_IDLE_PATH.items() if _loaded(before, name)}
    assert not loaded, f"a running agent imported: {loaded}"
    assert "meshd.agent.agent" in before
    assert "meshd.api.filter" in after


def _imported(lines: list[str]) -> set[str]:
    # "import time:  self [us] | cumulative | imported package", names indented.
    return {
        line.rpartition("|")[2].strip()
        for line in list(lines)
        if line.startswith("import time:") and "|" in line
    }
