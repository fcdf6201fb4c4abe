"""What a node publishes: one document per audience, the main one always."""

from __future__ import annotations

from meshd.protocol.documents import Publisher, by_scope, draft, drafts
from meshd.wire import AppRecord


def rec(instance: str, export: tuple[str, ...] | None = None) -> AppRecord:
    return AppRecord(app="orders", instance=instance, address="127.0.0.1", port=1, export=export)


def test_one_document_per_audience_sorted_and_the_main_one_always() -> None:
    who = Publisher("n1", "east", bridge=True, down=(("east/n9", 3),))
    apps = [rec("b"), rec("a"), rec("l", ()), rec("w", ("west",))]
    docs = drafts(who, apps)
    assert set(docs) == {"", "local", "to:west"}
    assert [a.instance for a in docs[""].apps] == ["a", "b"]
    # Only the main document carries a bridge's statements.
    assert docs[""].down == (("east/n9", 3),) and docs[""].bridge
    assert docs["local"].down == () and not docs["local"].bridge
    # A scope held before and now empty is drafted empty, not dropped.
    assert drafts(who, [rec("a")], held=["to:west"])["to:west"].apps == ()
    assert by_scope([]) == {"": []}
    assert draft(who, "", [rec("a")], version=7).version == 7
