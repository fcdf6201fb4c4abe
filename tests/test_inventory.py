"""Tests for meshd.agent.inventory: the memory of dead nodes' services."""

from __future__ import annotations

import math

import pytest

from meshd.agent import inventory
from meshd.agent.inventory import DEREGISTER_AFTER_KEY, DeadNodes, deregister_after
from meshd.wire import AppRecord, OriginState


def doc(node: str, version: int = 1, *apps: AppRecord) -> OriginState:
    return OriginState(node=node, cluster="east", region="", zone="", version=version, apps=apps)


def rec(instance: str, after: int | None = None) -> AppRecord:
    meta = () if after is None else ((DEREGISTER_AFTER_KEY, str(after)),)
    return AppRecord("web", instance, "127.0.0.1", 8000, meta=meta)


def listed(dead: DeadNodes, now: float) -> list[str]:
    return sorted(r.instance for _, r in dead.records(now))


def test_a_dead_node_is_listed_until_it_is_reaped_or_comes_back() -> None:
    dead = DeadNodes(reap_after=100.0)
    dead.died("east/a", doc("a", 1, rec("web-a")), now=10.0)
    assert listed(dead, 50.0) == ["web-a"] and dead.next_deadline == 110.0
    assert dead.reap(109.0) is False  # nothing due: no scan, no change
    g = dead.generation
    assert dead.reap(110.0) is True and listed(dead, 110.0) == [] and len(dead) == 0
    assert dead.generation > g and dead.next_deadline == math.inf
    dead.died("east/b", doc("b", 1, rec("web-b")), now=0.0)
    dead.forget("east/b")  # live again
    assert listed(dead, 1.0) == []


def test_leaving_forgets_every_document_of_the_member() -> None:
    dead = DeadNodes()
    dead.died("east/a", doc("a", 1, rec("web-a")), now=0.0)
    dead.died("east/a#to:west", doc("a", 1, rec("web-a2")), now=0.0)
    dead.died("east/b", doc("b", 1, rec("web-b")), now=0.0)
    dead.left("east/a")
    assert listed(dead, 1.0) == ["web-b"]


def test_an_older_or_empty_document_changes_nothing() -> None:
    dead = DeadNodes()
    dead.died("east/a", doc("a", 5, rec("web-a")), now=0.0)
    g = dead.generation
    dead.died("east/a", doc("a", 4, rec("old")), now=1.0)
    assert listed(dead, 2.0) == ["web-a"] and dead.generation == g
    dead.died("east/a", doc("a", 6), now=1.0)  # nothing left to list
    assert len(dead) == 0


def test_a_newer_document_keeps_the_time_of_death() -> None:
    dead = DeadNodes(reap_after=100.0)
    dead.died("east/a", doc("a", 1, rec("web-a")), now=0.0)
    dead.died("east/a", doc("a", 2, rec("web-a"), rec("web-a2")), now=50.0)
    assert dead.next_deadline == 100.0
    assert dead.reap(100.0) and len(dead) == 0


def test_deregister_critical_service_after_drops_one_record_at_its_deadline() -> None:
    dead = DeadNodes(reap_after=100.0)
    dead.died("east/a", doc("a", 1, rec("short", after=5), rec("long")), now=0.0)
    assert dead.next_deadline == 5.0
    assert listed(dead, 4.9) == ["long", "short"]
    g = dead.generation
    assert dead.reap(5.0) is True and dead.generation > g  # the index moves with it
    assert listed(dead, 5.0) == ["long"] and dead.next_deadline == 100.0


def test_memory_is_bounded_and_the_longest_dead_go_first(monkeypatch) -> None:
    monkeypatch.setattr(inventory, "MAX_REMEMBERED", 3)
    dead = DeadNodes()
    for i in range(5):
        dead.died(f"east/n{i}", doc(f"n{i}", 1, rec(f"web-{i}")), now=float(i))
    assert len(dead) == 3 and listed(dead, 10.0) == ["web-2", "web-3", "web-4"]


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "x", "9" * 13, "１２"])
def test_a_malformed_deregister_after_is_ignored(raw: str) -> None:
    assert (
        deregister_after(AppRecord("w", "w-1", "h", 1, meta=((DEREGISTER_AFTER_KEY, raw),))) is None
    )


def test_the_reap_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        DeadNodes(reap_after=0)
