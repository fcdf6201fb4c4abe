"""The API's requests and responses, as handlers see them.

The local API is served by meshd's own small HTTP/1.1 server
(``connection.py`` reads and writes the bytes, ``routes.py`` picks the
handler, ``listener.py`` accepts connections) and not by ``aiohttp.web``:
aiohttp's package imports its whole client side with its server, and that
was 14 MB of an idle agent's memory (benchmarks/idle-memory.md).  Requests
are parsed by httptools, the binding to llhttp (Node.js's parser), so the
bytes of the protocol are read by code that the whole web reads with.

A handler takes a :class:`Request` and returns a :class:`Response`; the shape
is aiohttp's (``match_info``, ``query``, ``headers``, ``await read()``), so
handlers read as aiohttp handlers do.  A request's body is already in memory
when its handler runs, capped at the application's ``client_max_size``; past
it :meth:`Request.read` raises a 413, which each route family answers in its
own format.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, TypeVar, overload
from urllib.parse import parse_qsl, unquote

if TYPE_CHECKING:
    from meshd.api.routes import Route

__all__ = ["HTTPError", "Headers", "MatchInfo", "Query", "Request", "Response", "json_response"]

T = TypeVar("T")

#: Parameters one query string may carry.  Real clients send a handful; the
#: cap bounds the work a hostile target can cause (it is also capped in bytes).
MAX_QUERY_FIELDS = 256


class HTTPError(Exception):
    """A refusal by the HTTP layer itself: no route, wrong method, body too large.

    Raised inside the handler chain, so the application's error middleware
    answers it in the format of the route family (JSON or Consul's text).
    """

    def __init__(self, status: int, message: str, allowed: frozenset[str] = frozenset()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        #: For 405: the methods the path does accept.
        self.allowed_methods = allowed


class Headers(Mapping[str, str]):
    """A request's headers, looked up by name in any case.

    A header sent more than once reads as its values joined by ", ", as
    RFC 9110 section 5.3 allows a recipient to combine them.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        #: Lower-case name -> value.
        self._fields = fields

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str | T) -> str | T: ...
    def get(self, name: str, default: Any = None) -> Any:
        return self._fields.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


class Query(Mapping[str, str]):
    """A query string's parameters: the first value of each name, or all of them.

    ``+`` reads as a space and ``%XX`` as UTF-8 (bytes that are not UTF-8
    become U+FFFD), as every HTML form and Consul client encodes them.
    """

    __slots__ = ("_pairs", "_first")

    def __init__(self, text: str) -> None:
        try:
            pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ValueError:
            raise HTTPError(
                400, f"the query string has more than {MAX_QUERY_FIELDS} parameters"
            ) from None
        self._pairs = pairs
        first: dict[str, str] = {}
        for name, value in pairs:
            first.setdefault(name, value)
        self._first = first

    def __getitem__(self, name: str) -> str:
        return self._first[name]

    @overload
    def get(self, name: str) -> str | None: ...
    @overload
    def get(self, name: str, default: str | T) -> str | T: ...
    def get(self, name: str, default: Any = None) -> Any:
        return self._first.get(name, default)

    def getall(self, name: str, default: Any = None) -> Any:
        """Every value of ``name`` in the order sent; ``default`` (or KeyError) if none."""
        values = [v for n, v in self._pairs if n == name]
        if values:
            return values
        if default is None:
            raise KeyError(name)
        return default

    def __contains__(self, name: object) -> bool:
        return name in self._first

    def __iter__(self) -> Iterator[str]:
        return iter(self._first)

    def __len__(self) -> int:
        return len(self._first)


class MatchInfo(dict[str, str]):
    """A routed request's path variables, decoded, and the route it matched."""

    __slots__ = ("route",)

    def __init__(self, route: Route, values: dict[str, str]) -> None:
        super().__init__(values)
        self.route = route


#: A request's match before routing: empty, and with no route (the router
#: sets the real one before any handler or middleware runs).
_UNROUTED: MatchInfo = MatchInfo.__new__(MatchInfo)


class Request:
    """One request, read whole: the target, the headers and the (capped) body."""

    __slots__ = (
        "method",
        "raw_path",
        "path",
        "query_string",
        "headers",
        "version",
        "keep_alive",
        "body",
        "too_large",
        "limit",
        "remote",
        "match_info",
        "_query",
    )

    def __init__(
        self,
        method: str,
        target: str,
        headers: Headers,
        *,
        version: str = "1.1",
        keep_alive: bool = True,
        remote: str = "",
    ) -> None:
        self.method = method
        #: The target as sent: path and query, still percent-encoded.
        self.raw_path = target
        raw, _, self.query_string = target.partition("?")
        #: The path, percent-decoded.
        self.path = unquote(raw)
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.body = b""
        #: The body was larger than ``limit``; it was not kept.
        self.too_large = False
        self.limit = 0
        self.remote = remote
        self.match_info = _UNROUTED
        self._query: Query | None = None

    @property
    def query(self) -> Query:
        """The query string's parameters, parsed on first use."""
        query = self._query
        if query is None:
            query = self._query = Query(self.query_string)
        return query

    @property
    def host(self) -> str:
        """The ``Host`` the client named (empty if it named none)."""
        return str(self.headers.get("host", ""))

    async def read(self) -> bytes:
        """The body; a 413 if it was larger than the application takes."""
        if self.too_large:
            raise HTTPError(413, f"request body is larger than the limit of {self.limit} bytes")
        return self.body


class Response:
    """A whole response: status, headers and body.

    ``Content-Length``, ``Date``, ``Server`` and ``Connection`` are the
    connection's to write; a handler sets the rest.  ``text`` is encoded with
    ``charset`` (UTF-8 by default) and typed ``text/plain`` unless told
    otherwise; bytes without a ``content_type`` are ``application/octet-stream``.
    """

    __slots__ = ("status", "body", "headers")

    def __init__(
        self,
        *,
        body: bytes | None = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        text: str | None = None,
        content_type: str | None = None,
        charset: str | None = None,
    ) -> None:
        self.status = status
        fields = {} if headers is None else dict(headers)
        if text is not None:
            charset = charset or "utf-8"
            body = text.encode(charset)
            content_type = content_type or "text/plain"
        if content_type is not None:
            fields["Content-Type"] = (
                content_type if charset is None else f"{content_type}; charset={charset}"
            )
        elif (
            body
            and "Content-Type" not in fields
            and not any(k.lower() == "content-type" for k in fields)
        ):
            fields["Content-Type"] = "application/octet-stream"
        self.body = body or b""
        self.headers = fields

    @property
    def content_type(self) -> str:
        for name, value in self.headers.items():
            if name.lower() == "content-type":
                return value.partition(";")[0].strip()
        return ""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def json_response(
    data: Any,
    *,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    dumps: Callable[[Any], str] = json.dumps,
) -> Response:
    """``data`` as a JSON response."""
    return Response(
        body=dumps(data).encode(), status=status, headers=headers, content_type="application/json"
    )


@functools.cache  # a few statuses, all set by meshd's own code
def reason(status: int) -> str:
    """The reason phrase of a status code (``Unknown`` for one HTTP does not name)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
