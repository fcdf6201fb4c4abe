"""Which handler answers a request: routes, the router, and the application.

A route is a method and a pattern: literal text and variables, ``{name}``
for one path segment or ``{name:regex}`` for what the regular expression
matches (``{rest:.*}`` takes the remainder, slashes included).  Patterns
match the path as sent, still percent-encoded, so an encoded ``/`` never
splits a segment; each variable's value is then decoded.  A GET route also
answers HEAD; ``*`` takes every method.

The application runs its middlewares around the route's handler, in the
order given, outermost first, each called as ``middleware(request,
handler)``.  A path no route matches, or a method its routes do not take,
reaches the middlewares too, through a handler that raises the 404 or 405:
the error middleware answers and counts it like any other.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar
from urllib.parse import unquote

from meshd.api.http import HTTPError, MatchInfo, Request, Response

__all__ = ["AppKey", "Application", "Handler", "MatchInfo", "Middleware", "Route", "Router"]

Handler = Callable[[Request], Awaitable[Response]]
Middleware = Callable[[Request, Handler], Awaitable[Response]]
T = TypeVar("T")

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]+))?\}")


class Route:
    """A method and a path pattern, with the handler that answers them."""

    __slots__ = ("method", "canonical", "handler", "_regex", "_prefix", "chain")

    def __init__(self, method: str, pattern: str, handler: Handler) -> None:
        if not pattern.startswith("/"):
            raise ValueError(f"a route's pattern starts with /: {pattern!r}")
        self.method = method.upper()
        #: The pattern as written: the route's name in metrics.
        self.canonical = pattern
        self.handler = handler
        parts: list[str] = []
        at = 0
        for m in _VARIABLE.finditer(pattern):
            parts.append(re.escape(pattern[at : m.start()]))
            parts.append(f"(?P<{m.group(1)}>{m.group(2) or '[^/]+'})")
            at = m.end()
        parts.append(re.escape(pattern[at:]))
        first = _VARIABLE.search(pattern)
        #: None for a pattern without variables (matched by a dict lookup).
        self._regex = re.compile("".join(parts)) if first else None
        #: Literal text every matching path starts with: a cheap first test.
        self._prefix = pattern[: first.start()] if first else pattern
        #: The handler wrapped in the application's middlewares (set when added).
        self.chain: Handler = handler

    def match(self, raw_path: str) -> dict[str, str] | None:
        """The variables of ``raw_path`` (decoded) if this pattern matches it."""
        regex = self._regex
        if regex is None:
            return {} if raw_path == self._prefix else None
        if not raw_path.startswith(self._prefix):
            return None
        m = regex.fullmatch(raw_path)
        if m is None:
            return None
        return {name: unquote(value) for name, value in m.groupdict().items()}

    def takes(self, method: str) -> bool:
        own = self.method
        return own == method or own == "*" or (own == "GET" and method == "HEAD")

    def __repr__(self) -> str:
        return f"<Route {self.method} {self.canonical}>"


class Router:
    """Routes in the order added; the first that matches path and method answers."""

    def __init__(self) -> None:
        self._routes: list[Route] = []
        #: Literal path -> its routes (most API paths have no variable).
        self._static: dict[str, list[Route]] = {}
        self._dynamic: list[Route] = []
        self._wrap: Callable[[Route], None] = lambda route: None

    def add_route(self, method: str, pattern: str, handler: Handler) -> Route:
        route = Route(method, pattern, handler)
        self._routes.append(route)
        if route._regex is None:
            self._static.setdefault(pattern, []).append(route)
        else:
            self._dynamic.append(route)
        self._wrap(route)
        return route

    def add_get(self, pattern: str, handler: Handler) -> Route:
        return self.add_route("GET", pattern, handler)

    def add_put(self, pattern: str, handler: Handler) -> Route:
        return self.add_route("PUT", pattern, handler)

    def add_post(self, pattern: str, handler: Handler) -> Route:
        return self.add_route("POST", pattern, handler)

    def add_delete(self, pattern: str, handler: Handler) -> Route:
        return self.add_route("DELETE", pattern, handler)

    def routes(self) -> Sequence[Route]:
        return tuple(self._routes)

    def resolve(self, method: str, raw_path: str) -> tuple[Route, dict[str, str]] | None:
        """The route answering ``method`` on ``raw_path`` (the path, no query), or
        None with :meth:`refusal` to say why."""
        for route in self._static.get(raw_path, ()):
            if route.takes(method):
                return route, {}
        for route in self._dynamic:
            if route.takes(method):
                values = route.match(raw_path)
                if values is not None:
                    return route, values
        return None

    def refusal(self, method: str, raw_path: str, path: str) -> HTTPError:
        """Why no route answers: 405 with the methods the path takes, else 404."""
        allowed: set[str] = set()
        for route in self._static.get(raw_path, ()):
            allowed.add(route.method)
        for route in self._dynamic:
            if route.match(raw_path) is not None:
                allowed.add(route.method)
        if allowed and "*" not in allowed:
            if "GET" in allowed:
                allowed.add("HEAD")
            return HTTPError(
                405,
                f"method {method[:16]} is not allowed on {path[:200]}",
                frozenset(allowed),
            )
        return HTTPError(404, f"no API route matches {path[:200]}")


def _through(middleware: Middleware, handler: Handler, request: Request) -> Awaitable[Response]:
    # A plain function returning the middleware's coroutine: one frame fewer
    # per middleware per request than an async wrapper.
    return middleware(request, handler)


class AppKey(Generic[T]):
    """A typed key for what an application holds (``app[KEY]``)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<AppKey {self.name}>"


class Application:
    """Routes, the middlewares around them, and what the handlers share."""

    def __init__(
        self, *, middlewares: Sequence[Middleware] = (), client_max_size: int = 1 << 20
    ) -> None:
        self.middlewares = tuple(middlewares)
        #: Largest body kept; a larger one makes ``Request.read`` raise a 413.
        self.client_max_size = client_max_size
        self.router = Router()
        self.router._wrap = self._wrap
        #: Called (and awaited if they return awaitables) when the listener
        #: closes, after it stops accepting and before it waits for requests
        #: in progress: the place to release blocking queries.
        self.on_shutdown: list[Callable[[Application], Any]] = []
        self._state: dict[AppKey[Any], Any] = {}

    def __getitem__(self, key: AppKey[T]) -> T:
        value: T = self._state[key]
        return value

    def __setitem__(self, key: AppKey[T], value: T) -> None:
        self._state[key] = value

    def _wrap(self, route: Route) -> None:
        route.chain = self._chain(route.handler)

    def _chain(self, handler: Handler) -> Handler:
        for middleware in reversed(self.middlewares):
            handler = functools.partial(_through, middleware, handler)
        return handler

    async def handle(self, request: Request) -> Response:
        """Route ``request`` and answer it through the middlewares."""
        method = request.method
        raw = request.raw_path.partition("?")[0]
        found = self.router.resolve(method, raw)
        if found is None:
            error = self.router.refusal(method, raw, request.path)

            async def refuse(request: Request) -> Response:
                raise error

            route = Route("*", "/", refuse)
            route.canonical = ""  # an unmatched request has no route name
            request.match_info = MatchInfo(route, {})
            return await self._chain(refuse)(request)
        route, values = found
        request.match_info = MatchInfo(route, values)
        return await route.chain(request)
