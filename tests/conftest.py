"""Fixtures shared by the test files, and the test tiers.

Tiers (markers declared in pyproject.toml):

- ``e2e``: runs real ``meshd agent`` processes on 127.0.0.1 (``tests/agents.py``);
- ``slow``: in-process, but takes about a second or more on a 2-core machine
  (long simulated scenarios, big property searches); where a parametrized
  test is slow, one case stays in the fast tier;
- everything else is the fast tier, for everyday work:
  ``python3 -m pytest -m "not e2e and not slow"``.  ``python3 -m pytest``
  still runs everything.

A file may override any fixture here by defining one of the same name; it
may also ask for the one it overrides, e.g. to seed the shared fake agent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient

from meshd.api.app import create_app
from tests.agents import Certs
from tests.api_server import api_client
from tests.fakes import FakeAgent


@pytest.fixture
def agent() -> FakeAgent:
    """A fresh in-memory agent (see tests/fakes.py)."""
    return FakeAgent()


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[TestClient]:
    """The real HTTP application over ``agent``, no API token."""
    async with api_client(create_app(agent)) as c:
        yield c


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and node certificates made by the real ``meshd ca``/``meshd cert`` commands."""
    return Certs(tmp_path_factory.mktemp("pki"))
