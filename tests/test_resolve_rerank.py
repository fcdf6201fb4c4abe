"""Answers ranked by round trips are ranked again as the estimates move.

Resolve answers are cached per ``Agent.generation`` (meshd/api/app.py), which
follows records, policy, dead nodes and membership.  Vivaldi estimates move
with every ack and are in none of them, so a policy with ``order = "rtt"``
makes the generation move every ``RTT_RERANK_INTERVAL``; any other policy
keeps one answer until something it depends on changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshd.agent.agent import RTT_RERANK_INTERVAL
from meshd.policy.policy import AppPolicy, Policy
from tests.local_agent import TLS, Local, start_local, stop_local, write_tls


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    return write_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def local(tls: TLS, tmp_path: Path) -> AsyncIterator[Local]:
    node = await start_local(tls, tmp_path / "state", policy=Policy(AppPolicy(), {}))
    try:
        yield node
    finally:
        await stop_local(node)


async def _resolves_counted(local: Local, clock: list[float]) -> list[int]:
    """Ask the same question at the clock's current value; count the real resolves."""
    agent = local.agent
    calls: list[int] = []
    real = agent.resolve

    def counted(*args: Any) -> Any:
        calls.append(1)
        return real(*args)

    agent.resolve = counted  # type: ignore[method-assign, assignment]
    agent.clock = lambda: clock[0]
    counts = []
    for t in (100.0, 100.0 + RTT_RERANK_INTERVAL / 2, 100.0 + RTT_RERANK_INTERVAL):
        clock[0] = t
        for _ in range(2):
            status, _ = await local.get("/v1/resolve/orders")
            assert status == 200
        counts.append(len(calls))
    return counts


async def test_an_rtt_ranked_answer_is_ranked_again_after_the_interval(local: Local) -> None:
    status, _ = await local.put(
        "/v1/apps/orders-1", {"app": "orders", "address": "127.0.0.1", "port": 3500}
    )
    assert status == 200
    # Weight order: one resolve, then the cached bytes, whatever the clock says.
    assert await _resolves_counted(local, [0.0]) == [1, 1, 1]
    # Round-trip order (a policy change is itself a new generation): ranked
    # once per interval, cached within it.
    local.agent.set_policy(Policy(AppPolicy(order="rtt"), {}))
    assert await _resolves_counted(local, [0.0]) == [1, 1, 2]
    # And back: a weight policy stops the reranking.
    local.agent.set_policy(Policy(AppPolicy(), {"other": AppPolicy(order="rtt")}))
    gen = local.agent.generation
    local.agent.clock = lambda: 1e6
    assert local.agent.generation != gen  # "other" ranks by round trip
    local.agent.set_policy(Policy(AppPolicy(), {}))
    gen = local.agent.generation
    local.agent.clock = lambda: 2e6
    assert local.agent.generation == gen
