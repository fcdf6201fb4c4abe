"""The local HTTP API (contract: "Local HTTP API"): the application over AgentAPI.

Handlers are thin: parse and validate (``validation.py``), make one agent call,
answer JSON.  Everything that can go wrong becomes ``{"error": "<one sentence>"}``
in one middleware, which also counts every request by route pattern and status;
no HTML error page and no traceback ever reaches a client.

``GET /v1/resolve/{app}`` is the hot path: it does no I/O besides an optional
blocking wait, builds its answer with one ``json.dumps``, and times only the
agent's lookup, so ``meshd_lookup_seconds`` measures the index, not the network.
An answer is encoded once per agent generation; a request whose exact path and
query were already validated and answered in this generation (the common case:
a sidecar asking the same question again) is served from those bytes without
parsing its query again, so it costs little more than reading the request.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshd.agent.interface import AgentAPI, StorageError
from meshd.api.access import MAX_BLOCKING_QUERIES, BlockingQueries, require_token
from meshd.api.consul import add_consul_routes, text_error
from meshd.api.durations import parse_wait
from meshd.api.http import HTTPError, Request, Response, json_response
from meshd.api.revocations import add_revocation_routes
from meshd.api.routes import AppKey, Application, Handler, Middleware, Route
from meshd.api.validation import ApiError, parse_health, parse_registration
from meshd.metrics import Metrics
from meshd.wire import WireError, check_name

__all__ = ["create_app", "AGENT_KEY", "BLOCKING_KEY", "MAX_BODY_BYTES", "DEFAULT_WAIT", "MAX_WAIT"]

log = logging.getLogger("meshd.api")

#: Largest request body.  A registration is well under 8 KiB (meta caps at 4 KiB);
#: the limit only keeps a broken or hostile client from making us buffer much.
MAX_BODY_BYTES = 1 << 20
#: Blocking resolve: wait when ``index`` is given without ``wait`` (Consul's default).
DEFAULT_WAIT = 30.0
#: Longest blocking wait; longer requests are clamped, not refused, as Consul does.
MAX_WAIT = 300.0
#: The route label for requests that matched no route.  Never the raw path: a
#: scanner probing random paths must not create unbounded metric series.
UNMATCHED = "unmatched"

#: Lets later additions on the same listener (the Consul subset) reach the agent.
AGENT_KEY: AppKey[AgentAPI] = AppKey("meshd_agent")
#: The blocking-query cap of this listener (tests read how many are waiting).
BLOCKING_KEY: AppKey[BlockingQueries] = AppKey("meshd_blocking_queries")

# Compact separators: smaller answers, and slightly faster to produce.
_dumps = functools.partial(json.dumps, separators=(",", ":"))
_INDEX = re.compile(r"[0-9]{1,20}")
_MAX_INDEX = 2**64 - 1
_TRUE = frozenset(("", "1", "true"))  # "" is a bare ?all, which Consul-style flags treat as set
_FALSE = frozenset(("0", "false"))


#: Encoded resolve answers kept; past it the cache starts over (bounded memory
#: whatever names clients ask for).
MAX_CACHED_ANSWERS = 4096
#: Longest raw request target (path and query) whose answer is remembered by
#: its spelling.  Real clients send an app name and a few short parameters; a
#: longer target is still answered, only through the full parse, so hostile
#: spellings cannot make the cache's keys big.
MAX_HOT_TARGET = 320


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return json_response(data, status=status, headers=headers, dumps=_dumps)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status=status, headers=headers)


def _loads(raw: bytes) -> Any:
    def no_constants(name: str) -> Any:
        # NaN and Infinity are not JSON; Python's json would otherwise accept them.
        raise ValueError(f"{name} is not JSON")

    return json.loads(raw, parse_constant=no_constants)


async def _read_json(request: Request) -> Any:
    raw = await request.read()  # a 413 (HTTPError) past client_max_size
    if not raw.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    try:
        return _loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise ApiError(400, "request body is not valid JSON") from None


def _name(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except WireError as exc:
        raise ApiError(400, str(exc)) from None


def _from_http_error(request: Request, exc: HTTPError) -> Response:
    """The HTTP layer's own refusals (no route, wrong method, body too large) as JSON errors."""
    if exc.status == 405:
        allowed = sorted(exc.allowed_methods)
        return _error(
            405, f"{exc.message}; allowed: {', '.join(allowed)}", {"Allow": ",".join(allowed)}
        )
    return _error(exc.status, exc.message)


def _errors_and_counts(metrics: Metrics) -> Middleware:
    # Children of the counter, cached by route object: labels() takes a lock and
    # builds a key on every call.  Bounded by routes x statuses, both small fixed
    # sets; the routes made up for a request that matched none are new objects
    # every time, so those are looked up by label instead.
    counters: dict[tuple[Route, int], Any] = {}

    async def middleware(request: Request, handler: Handler) -> Response:
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error(exc.status, exc.message)
        except StorageError as exc:  # 507 full disk, 503 other; nothing was changed
            response = _error(exc.status, exc.message)
        except HTTPError as exc:
            response = _from_http_error(request, exc)
        except Exception:
            log.exception("unhandled error in %s %s", request.method, request.path[:200])
            response = _error(500, "internal error in the agent; its log has the details")
        route = request.match_info.route
        counter = counters.get((route, response.status))
        if counter is None:
            name = route.canonical or UNMATCHED
            counter = metrics.http_requests.labels(route=name, status=str(response.status))
            if route.canonical:
                counters[(route, response.status)] = counter
        counter.inc()
        return response

    return middleware


class _Handlers:
    """One method per route; closes over the agent so handlers skip an app lookup."""

    def __init__(self, agent: AgentAPI) -> None:
        self.agent = agent
        self.lookup_seconds = agent.metrics.lookup_seconds
        #: (app, namespace, policy, all) -> (generation, index, encoded body).
        #: An answer depends only on the key and on the agent's generation, so
        #: the hot path is a dict lookup and a write of ready bytes.
        self._answers: dict[tuple[str, str, str | None, bool], tuple[Any, int, bytes]] = {}
        #: Raw request target (path and query as sent) -> (encoded body, response
        #: headers), for non-blocking resolves that passed validation and were
        #: answered in ``_hot_generation``.  Routing and validation depend only on
        #: that string and on the policy (part of the generation), so a hit needs
        #: none of them again.  Bodies are the ones ``_answers`` holds (shared).
        self._hot: dict[str, tuple[bytes, dict[str, str]]] = {}
        self._hot_generation: Any = None
        #: The full resolve with its blocking-query cap; set by create_app.
        self.resolve_slow: Handler = self._resolve

    async def resolve(self, request: Request) -> Response:
        started = time.perf_counter()
        generation = self.agent.generation
        if generation != self._hot_generation:
            self._hot.clear()  # every remembered answer is stale at once
            self._hot_generation = generation
        hot = self._hot.get(request.raw_path)
        if hot is None:
            return await self.resolve_slow(request)
        self.lookup_seconds.observe(time.perf_counter() - started)
        # The headers are shared, not copied: the connection only reads them.
        return Response(body=hot[0], headers=hot[1])

    async def register(self, request: Request) -> Response:
        instance = request.match_info["instance"]
        reg = parse_registration(instance, await _read_json(request))
        try:
            version = await self.agent.register(reg)
        except ValueError as exc:  # the agent's own refusal, e.g. too many apps
            raise ApiError(400, str(exc) or "the agent refused the registration") from None
        return _json({"instance": instance, "version": version})

    async def deregister(self, request: Request) -> Response:
        instance = _name(request.match_info["instance"], "instance")
        if not await self.agent.deregister(instance):
            raise ApiError(404, f"instance {instance!r} is not registered on this node")
        return _json({"instance": instance, "deregistered": True})

    async def set_health(self, request: Request) -> Response:
        instance = _name(request.match_info["instance"], "instance")
        status = parse_health(await _read_json(request))
        if not await self.agent.set_health(instance, status):
            raise ApiError(404, f"instance {instance!r} is not registered on this node")
        return _json({"instance": instance, "status": status})

    async def list_apps(self, request: Request) -> Response:
        return _json([reg.to_json() for reg in self.agent.local_registrations()])

    async def _resolve(self, request: Request) -> Response:
        app = _name(request.match_info["app"], "app")
        query = request.query
        # An empty parameter (?namespace=) means "not given", as in Consul.
        namespace = _name(query.get("namespace") or "default", "namespace")
        policy = query.get("policy") or None
        include_unhealthy = _flag(query.get("all"), "all")
        wait = _wait(query.get("wait"))
        index_text = query.get("index")
        if index_text:
            if not _INDEX.fullmatch(index_text) or int(index_text) > _MAX_INDEX:
                raise ApiError(400, "index must be a non-negative integer")
            await self.agent.wait_for_index(int(index_text), wait)
        started = time.perf_counter()
        key = (app, namespace, policy, include_unhealthy)
        generation = self.agent.generation
        cached = self._answers.get(key)
        if cached is not None and cached[0] == generation:
            _, index, body = cached
        else:
            try:
                index, endpoints = self.agent.resolve(app, namespace, policy, include_unhealthy)
            except KeyError:
                if policy is None:
                    raise  # not a client mistake: a bug, answered as a 500
                raise ApiError(400, f"policy {policy[:64]!r} is not defined") from None
            answer = {
                "app": app,
                "namespace": namespace,
                "index": index,
                "endpoints": [e.to_json() for e in endpoints],
            }
            body = _dumps(answer).encode()
            if len(self._answers) >= MAX_CACHED_ANSWERS:
                self._answers.clear()  # bounded; refilled by what is asked next
            self._answers[key] = (generation, index, body)
        headers = {"Content-Type": "application/json", "X-Meshd-Index": str(index)}
        target = request.raw_path
        if not index_text and len(target) <= MAX_HOT_TARGET:
            if generation != self._hot_generation:
                self._hot.clear()
                self._hot_generation = generation
            if len(self._hot) >= MAX_CACHED_ANSWERS:
                self._hot.clear()  # bounded; refilled by what is asked next
            self._hot[target] = (body, headers)
        self.lookup_seconds.observe(time.perf_counter() - started)
        return Response(body=body, headers=headers)

    async def members(self, request: Request) -> Response:
        cluster = request.query.get("cluster") or None
        if cluster is not None:
            _name(cluster, "cluster")
        return _json([m.to_json() for m in self.agent.members(cluster)])

    async def clusters(self, request: Request) -> Response:
        return _json([c.to_json() for c in self.agent.clusters()])

    async def records(self, request: Request) -> Response:
        return _json(self.agent.records())

    async def get_policy(self, request: Request) -> Response:
        return _json(self.agent.policy_json())

    async def put_policy(self, request: Request) -> Response:
        data = await _read_json(request)
        if not isinstance(data, dict):
            raise ApiError(400, "the policy must be a JSON object")
        try:
            return _json(self.agent.put_policy(data))
        except ValueError as exc:  # PolicyError: one sentence naming the field
            raise ApiError(400, str(exc)) from None

    async def health(self, request: Request) -> Response:
        agent = self.agent
        reason = agent.storage_error
        if reason is not None:
            # Reads still work, but no change can be made: a load balancer or
            # supervisor watching this should see it.
            return _json(
                {
                    "status": "degraded",
                    "node": agent.node_name,
                    "cluster": agent.cluster,
                    "reason": reason,
                },
                status=503,
            )
        return _json({"status": "ok", "node": agent.node_name, "cluster": agent.cluster})

    async def metrics(self, request: Request) -> Response:
        # Set as a header: the content type carries parameters, which
        # Response(content_type=...) refuses.
        return Response(
            body=self.agent.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def _flag(value: str | None, what: str) -> bool:
    if value is None:
        return False
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ApiError(400, f"{what} must be 1, true, 0 or false")


def _wait(value: str | None) -> float:
    try:
        return parse_wait(value, DEFAULT_WAIT, MAX_WAIT)
    except ValueError:
        raise ApiError(400, 'wait must be a duration such as "200ms", "30s" or "5m"') from None


def _blocks(request: Request) -> bool:
    """A native resolve waits whenever it carries a well-formed ``index``."""
    text = request.query.get("index", "")
    return _INDEX.fullmatch(text) is not None and int(text) <= _MAX_INDEX


def create_app(
    agent: AgentAPI,
    *,
    api_token: str | None = None,
    max_blocking_queries: int = MAX_BLOCKING_QUERIES,
) -> Application:
    """The local API over ``agent``, ready for ``meshd.api.listener.ApiListener``.

    With ``api_token`` every write needs it (``meshd.api.access``); without,
    the API is open, which the agent allows only on a loopback address.
    ``max_blocking_queries`` caps the blocking queries waiting at once.
    """
    consul_routes: set[Route] = set()

    def refuse(request: Request, status: int, message: str) -> Response:
        # Each route family answers a refusal the way it answers its other errors.
        if request.match_info.route in consul_routes:
            return text_error(status, message)
        return _error(status, message)

    middlewares = [_errors_and_counts(agent.metrics)]
    if api_token is not None:
        # Inside the counting middleware, so refused writes are counted by route too.
        middlewares.append(require_token(api_token, agent.metrics, refuse))
    app = Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
    app[AGENT_KEY] = agent
    blocking = app[BLOCKING_KEY] = BlockingQueries(agent.metrics, max_blocking_queries)
    h = _Handlers(agent)
    r = app.router
    r.add_put("/v1/apps/{instance}", h.register)
    r.add_delete("/v1/apps/{instance}", h.deregister)
    r.add_put("/v1/apps/{instance}/health", h.set_health)
    r.add_get("/v1/apps", h.list_apps)
    # Only what the fast path cannot answer meets the blocking-query cap: a
    # remembered answer is never for a query carrying an index.
    h.resolve_slow = blocking.guard(h._resolve, _blocks, _error)
    r.add_get("/v1/resolve/{app}", h.resolve)
    r.add_get("/v1/members", h.members)
    r.add_get("/v1/clusters", h.clusters)
    r.add_get("/v1/health", h.health)
    r.add_get("/v1/records", h.records)
    r.add_get("/v1/policy", h.get_policy)
    r.add_put("/v1/policy", h.put_policy)
    r.add_get("/metrics", h.metrics)
    consul_routes.update(add_consul_routes(app, agent, blocking))
    add_revocation_routes(app, agent)
    return app
