"""Can this node publish that set of apps?  Asked before anything is stored.

A node signs one document per audience (``OriginState.scope``) holding its
app records, and the wire caps a node at :data:`~meshd.wire.MAX_APPS_PER_ORIGIN`
records and a document at :data:`~meshd.wire.MAX_ORIGIN_BODY_BYTES` encoded
bytes.  The core finds out only when it signs, after the registration was
stored and its app set changed, which once left an agent refusing every
later write and failing to start.  So the agent asks :func:`publish_problem`
first, about the whole would-be set, and refuses the request with its answer.

The drafts are built by the core's own functions (``meshd.protocol.documents``:
one per scope, sorted by instance, the main one carrying a bridge's
statements) but at their worst:
every record at the longest health value and the version at its largest, so
an app set accepted here still fits after any later health flip or version.
A bridge's statements (``down``, ``unreachable``, ``rtt``) are taken as they
are now; their later growth is the core's to bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from meshd.protocol.documents import Publisher, by_scope, draft
from meshd.wire import (
    HEALTH_VALUES,
    MAX_APPS_PER_ORIGIN,
    MAX_ORIGIN_BODY_BYTES,
    AppRecord,
    WireError,
    scope_for,
)

__all__ = ["Publisher", "publish_problem"]  # Publisher: from meshd.protocol.documents

#: The longest health value: a record's encoded size at its worst.
_WORST_HEALTH = max(HEALTH_VALUES, key=len)
#: The largest version a document can carry (an unsigned wire integer below 2**63).
_WORST_VERSION = 2**63 - 1


def _audience(scope: str) -> str:
    if scope == "":
        return "every cluster"
    if scope == "local":
        return "its own cluster only"
    return "clusters " + scope.removeprefix("to:").replace(",", ", ")


def publish_problem(
    apps: Iterable[AppRecord], who: Publisher, only: AppRecord | None = None
) -> str | None:
    """None when ``who`` can sign documents holding ``apps``, else one sentence why not.

    ``only``: the record just added to a set known to fit; only its audience's
    document can have grown, so only that one is encoded (a few milliseconds
    saved per request at hundreds of records).
    """
    records = sorted(apps, key=lambda a: a.instance)
    if len(records) > MAX_APPS_PER_ORIGIN:
        return (
            f"this node already publishes {MAX_APPS_PER_ORIGIN} app records, "
            "the most one node may publish"
        )
    wanted = None if only is None else scope_for(only.export)
    worst = [dataclasses.replace(rec, health=_WORST_HEALTH) for rec in records]
    scopes = by_scope(worst)
    if wanted is not None:
        scopes = {wanted: scopes.get(wanted, [])}
    for scope, recs in sorted(scopes.items()):
        try:
            document = draft(who, scope, recs, _WORST_VERSION)
        except WireError as exc:  # a record the wire refuses: not expected after validation
            return str(exc)
        try:
            document.encode()  # raises only past the byte cap
        except WireError:
            return (
                f"the node's document for {_audience(scope)} would exceed "
                f"{MAX_ORIGIN_BODY_BYTES} bytes, the most a signed document may hold; "
                "use less meta or fewer instances"
            )
    return None
