"""Who may use the local API, and how much of it at once.

Two admission rules, applied before any handler runs, so a refused request
reaches the agent not at all (nothing is read, parsed or stored):

**Writes need the token** (:func:`require_token`).  Once the agent has an API
token (``--api-token-file``), every request whose method is not GET, HEAD or
OPTIONS must carry it, on the native routes and the Consul subset alike.  The
rule keys on the method, not on a list of routes, so a write route added
later is protected without anyone remembering to protect it.  The token is
taken where Consul takes it, in Consul's order: the ``token`` query
parameter, else the ``X-Consul-Token`` header, else ``Authorization: Bearer``.
A refusal is a 403 with one sentence (JSON on native routes, plain text on
Consul routes, as each answers every other error) and counts in
``meshd_rejected_total{reason="api-token"}``.

Reads stay open: a lookup answers only what every node of the mesh already
holds and serves (records are spread to every node allowed to see them), so
a token would protect nothing a local process could not learn from any
other agent, while every Dapr sidecar and Consul client would need one.

**Blocking queries are capped** (:class:`BlockingQueries`).  A blocking query
(``?index=``) holds a connection, a task and its request for up to its
``wait``; without a cap a local process could open them until the agent runs
out of file descriptors and stops answering everyone.  Past the cap a new
blocking query gets 503 with ``Retry-After`` and counts in
``meshd_rejected_total{reason="blocking-queries"}``; a query without an index
never waits, so it is never refused by this cap.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from meshd.api.http import Request, Response
from meshd.api.routes import Handler, Middleware
from meshd.metrics import Metrics

__all__ = [
    "BlockingQueries",
    "MAX_BLOCKING_QUERIES",
    "READ_METHODS",
    "RETRY_AFTER_SECONDS",
    "TOKEN_HEADER",
    "presented_token",
    "require_token",
]

#: Methods that change nothing and so need no token.  Everything else is a write.
READ_METHODS = frozenset(("GET", "HEAD", "OPTIONS"))
#: The header Consul clients (the Go api package, py-consul, Dapr) send the token in.
TOKEN_HEADER = "X-Consul-Token"
#: Concurrent blocking queries one agent holds open.  Each costs a socket, a
#: task and a parked request (a few KiB); a node runs tens to a few hundred
#: sidecars, each with one or two watches, so 1024 is far above honest use and
#: far below the file descriptors and memory an agent can spare.
MAX_BLOCKING_QUERIES = 1024
#: What a refused blocking query is told to wait before trying again: long
#: enough that a crowd of retries does not hammer a full agent, short next to
#: a blocking query's own wait (30 s native, 5 min Consul by default).
RETRY_AFTER_SECONDS = 5

MISSING_TOKEN = (
    "Permission denied: writes to this agent need its API token"
    f" (send it as the {TOKEN_HEADER} header, Authorization: Bearer, or ?token=)"
)
WRONG_TOKEN = "Permission denied: the API token sent is not this agent's token"

#: How a refusal is answered on the route a request matched (JSON or text).
Refusal = Callable[[int, str, dict[str, str] | None], Response]


def presented_token(request: Request) -> str | None:
    """The token a request carries, looked up as Consul does; None if it has none.

    An empty value counts as absent, as in Consul (its clients send the header
    only when a token is set).
    """
    token = request.query.get("token")
    if token:
        return token
    token = request.headers.get(TOKEN_HEADER)
    if token:
        return token
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        # RFC 6750: a bearer token has no spaces; anything after one is not it.
        parts = value.split()
        if parts:
            return parts[0]
    return None


def _digest(token: str) -> bytes:
    # Hashing first makes the comparison take the same time whatever the
    # presented token's length, and lets any string (even one that is not
    # ASCII) be compared without an exception.
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def require_token(
    token: str, metrics: Metrics, refuse: Callable[[Request, int, str], Response]
) -> Middleware:
    """Middleware refusing every write that does not carry ``token`` (see the module doc).

    ``refuse(request, status, sentence)`` answers in the format of the route
    the request matched, so Consul clients get Consul's plain-text errors.
    """
    if not token:
        raise ValueError("the API token must not be empty")
    expected = _digest(token)
    denied = metrics.rejected.labels("api-token")

    async def middleware(request: Request, handler: Handler) -> Response:
        if request.method in READ_METHODS:
            return await handler(request)
        presented = presented_token(request)
        if presented is not None and hmac.compare_digest(_digest(presented), expected):
            return await handler(request)
        denied.inc()
        return refuse(request, 403, MISSING_TOKEN if presented is None else WRONG_TOKEN)

    return middleware


class BlockingQueries:
    """A cap on the blocking queries in progress, shared by every route that blocks.

    The event loop is single-threaded and the count changes only between
    awaits, so a plain integer is exact without a lock.
    """

    def __init__(self, metrics: Metrics, limit: int = MAX_BLOCKING_QUERIES) -> None:
        if limit < 1:
            raise ValueError("the blocking query limit must be at least 1")
        self.limit = limit
        #: Blocking queries admitted and not yet answered.
        self.in_flight = 0
        self._refused = metrics.rejected.labels("blocking-queries")

    def guard(
        self, handler: Handler, blocks: Callable[[Request], bool], refuse: Refusal
    ) -> Handler:
        """``handler``, with requests for which ``blocks(request)`` holds counted against
        the cap and refused with 503 past it; other requests pass straight through."""

        async def guarded(request: Request) -> Response:
            if not blocks(request):
                return await handler(request)
            if self.in_flight >= self.limit:
                self._refused.inc()
                return refuse(
                    503,
                    f"too many blocking queries are waiting on this agent (limit {self.limit});"
                    f" retry in {RETRY_AFTER_SECONDS} seconds",
                    {"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.in_flight += 1
            try:
                return await handler(request)
            finally:
                self.in_flight -= 1

        return guarded
