"""What a node publishes: one document per audience, drafted from its apps.

A node signs one :class:`~meshd.wire.OriginState` per audience (``scope``:
every cluster, its own cluster only, or named clusters), so that a bridge can
forward or withhold each whole (a signature covers a document, so a relay
cannot cut records out).  The main document (scope "") always exists and
carries a bridge's statements.  A scope whose apps all went away is drafted
empty, not dropped: a CRDT cannot forget, only supersede.

Pure: the core drafts with :func:`drafts` before it signs, and the agent asks
the same functions, at their worst, whether a registration would still fit
(``meshd.agent.limits``), so the two can never disagree on what a node's
documents hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshd.wire import AppRecord, OriginState, scope_for

if TYPE_CHECKING:
    from meshd.protocol.core import Core

__all__ = ["Publisher", "draft", "drafts", "by_scope"]


@dataclass(frozen=True, slots=True)
class Publisher:
    """What a node's documents carry besides its apps."""

    node: str
    cluster: str
    region: str = ""
    zone: str = ""
    gateway: str = ""
    bridge: bool = False
    down: tuple[tuple[str, int], ...] = ()
    unreachable: tuple[str, ...] = ()
    rtt: tuple[tuple[str, int], ...] = ()
    host: str = ""
    node_meta: tuple[tuple[str, str], ...] = ()
    left: tuple[str, ...] = ()

    @classmethod
    def of(cls, core: Core) -> Publisher:
        """The publisher a running core is (its public attributes only)."""
        return cls(
            node=core.node_name,
            cluster=core.cluster,
            region=core.region,
            zone=core.zone,
            gateway=core.gateway,
            bridge=core.bridge,
            down=core.down,
            unreachable=core.unreachable,
            rtt=core.rtt_statement,
            host=core.host,
            node_meta=core.node_meta,
            left=core.left_statement,
        )


def draft(who: Publisher, scope: str, apps: Sequence[AppRecord], version: int = 0) -> OriginState:
    """The document of ``who`` for audience ``scope`` holding ``apps`` (in that order).

    Raises WireError when the wire refuses it (too many records, a bad name).
    """
    main = scope == ""
    return OriginState(
        node=who.node,
        cluster=who.cluster,
        region=who.region,
        zone=who.zone,
        version=version,
        apps=tuple(apps),
        scope=scope,
        bridge=who.bridge and main,
        down=who.down if main else (),
        unreachable=who.unreachable if main else (),
        rtt=who.rtt if main else (),
        gateway=who.gateway,
        host=who.host,
        node_meta=who.node_meta,
        left=who.left if main else (),
    )


def by_scope(apps: Iterable[AppRecord], held: Iterable[str] = ()) -> dict[str, list[AppRecord]]:
    """Apps by the audience of their document, sorted by instance; the main
    scope and every scope in ``held`` present even when empty."""
    out: dict[str, list[AppRecord]] = {"": []}
    for scope in held:
        out.setdefault(scope, [])
    for rec in sorted(apps, key=lambda a: a.instance):
        out.setdefault(scope_for(rec.export), []).append(rec)
    return out


def drafts(
    who: Publisher, apps: Iterable[AppRecord], held: Iterable[str] = ()
) -> dict[str, OriginState]:
    """Every document of ``who`` at version 0: one per audience of ``apps``,
    the main one, and every scope already published (``held``)."""
    return {scope: draft(who, scope, recs) for scope, recs in by_scope(apps, held).items()}
