"""One HTTP/1.1 connection of the local API: bytes in, requests out, responses back.

An asyncio protocol around an httptools parser (llhttp).  llhttp refuses
what makes requests ambiguous (a body length given twice, ``Content-Length``
with ``Transfer-Encoding``, bare CR or LF, unknown methods, bad chunk
sizes); this module adds the caps a server owes its host, each answered
with one sentence and the connection closed:

- a request target longer than ``MAX_TARGET_BYTES``: 414;
- more than ``MAX_HEADERS`` header lines or ``MAX_HEADER_BYTES`` of them: 431;
- a body above the application's ``client_max_size``: the request goes to
  its handler at once, marked too large, so the route answers a 413 in its
  own format; the rest of the body is never read;
- a request that takes more than ``REQUEST_TIMEOUT`` from its first byte to
  its last, or a connection idle for ``KEEPALIVE_TIMEOUT``: closed;
- requests sent ahead of their answers (pipelining) are answered in order;
  past ``MAX_PIPELINED`` waiting, or while the client does not read what was
  written to it, nothing more is read.

A read request (GET, HEAD, OPTIONS) whose client goes away (or only stops
sending) is cancelled, so a blocking query nobody waits for frees its slot
at once; a write is left to finish, so it is either wholly done or not begun.
A connection closed with input unread is half-closed first and its input
drained for a moment, so the client reads its answer rather than a reset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import httptools

from meshd.api.http import Headers, Request, Response, reason
from meshd.api.routes import Application

__all__ = [
    "HttpConnection",
    "KEEPALIVE_TIMEOUT",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "MAX_PIPELINED",
    "MAX_TARGET_BYTES",
    "REQUEST_TIMEOUT",
]

log = logging.getLogger("meshd.api")

#: Longest request target (path and query).  Real clients stay far below;
#: aiohttp's and Go's own line limits are 8 KiB.
MAX_TARGET_BYTES = 8192
#: Header lines one request may carry.
MAX_HEADERS = 100
#: Bytes of header names and values in one request.
MAX_HEADER_BYTES = 65536
#: The parser is fed at most this many bytes at a time, so what a request's
#: head takes is known to within one slice.
FEED_SLICE = 8192
#: Bytes a request's head (request line and headers) may take in all.  The
#: parser gathers a header's name and value before it reports them, so this
#: is checked on what it was fed, not only on what it reported: a header
#: line that never ends is cut off here.  (Room for the largest head the
#: other caps allow, plus the one slice that may also hold an earlier request.)
MAX_HEAD_BYTES = MAX_TARGET_BYTES + MAX_HEADER_BYTES + 4 * MAX_HEADERS + 64 + FEED_SLICE
#: Requests read ahead of their answers before reading pauses.
MAX_PIPELINED = 16
#: Seconds a connection may sit with no request before it is closed (aiohttp's default).
KEEPALIVE_TIMEOUT = 75.0
#: Seconds from a request's first byte to its last.  A client trickling a
#: request byte by byte would otherwise hold its connection forever.
REQUEST_TIMEOUT = 60.0
#: After the last answer on a connection closed with input unread (a body
#: over the limit, a request that cannot be read): seconds, and bytes, of the
#: client's input read and dropped before the socket closes.  Closing a
#: socket with unread input makes the kernel send a reset, which can destroy
#: the answer before the client reads it (RFC 9112, section 9.6).
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 << 20

_READS = frozenset(("GET", "HEAD", "OPTIONS"))
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_date: tuple[int, str] = (0, "")


def http_date(now: float) -> str:
    """``now`` as an HTTP date (RFC 9110 5.6.7), in English whatever the locale."""
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year}"
        f" {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _now_date() -> str:
    global _date
    second = int(time.time())
    if _date[0] != second:
        _date = (second, http_date(second))
    return _date[1]


def head_of(response: Response, *, keep_alive: bool, version: str, length: int) -> bytes:
    """The status line and headers of ``response`` as written to the client.

    Raises ValueError for a header value that would break the framing (a CR
    or LF in it): nothing a handler sets may add a header or a response.
    """
    status = response.status
    lines = [f"HTTP/1.1 {status} {reason(status)}\r\n"]
    for name, value in response.headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name[:40]!r} has a value that would break the response")
        lines.append(f"{name}: {value}\r\n")
    lines.append(f"Content-Length: {length}\r\nDate: {_now_date()}\r\nServer: meshd\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif version == "1.0":
        lines.append("Connection: keep-alive\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _refusal(status: int, message: str) -> bytes:
    body = b'{"error": "%s"}\n' % message.encode()
    head = head_of(
        Response(status=status, content_type="application/json"),
        keep_alive=False,
        version="1.1",
        length=len(body),
    )
    return head + body


class _Refuse(Exception):
    """Raised inside a parser callback: answer ``status`` and close."""

    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


class _Stop(Exception):
    """Raised inside a parser callback: read nothing more (the request is dispatched)."""


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1 on one transport, answering through ``app``."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self.limit = app.client_max_size
        self.transport: asyncio.Transport | None = None
        self.remote = ""
        self.parser = httptools.HttpRequestParser(self)
        # The request being read.
        self._url: list[bytes] = []
        self._url_bytes = 0
        self._fields: dict[str, str] = {}
        self._field_count = 0
        self._field_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._request: Request | None = None
        #: Between a request's first byte and the end of its headers, and the
        #: bytes fed to the parser meanwhile (MAX_HEAD_BYTES).
        self._in_head = False
        self._head_bytes = 0
        # Requests read and not yet answered, the task answering them, and
        # the one it answers now.
        self._pending: deque[Request] = deque()
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        #: No more requests are read; the connection closes once those read are answered.
        self.closing = False
        self._write_paused = False
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = KEEPALIVE_TIMEOUT
        #: What to write before closing: the refusal of a request that could
        #: not be read while an earlier one was being answered.
        self._last_words = b""
        #: Bytes read and not yet given to the parser: kept back while
        #: MAX_PIPELINED requests wait for their answers.
        self._unfed = b""
        #: Half-closed, reading and dropping the client's input (LINGER_*).
        self._lingering = False
        self._lingered = 0
        self._loop = asyncio.get_running_loop()

    # -- asyncio -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.remote = str(peer[0]) if peer else ""
        self._arm(KEEPALIVE_TIMEOUT)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            if self._lingering:
                self._lingered += len(data)
                if self._lingered > LINGER_BYTES and self.transport is not None:
                    self.transport.close()
            return
        if self._unfed:
            data = self._unfed + data
            self._unfed = b""
        self._consume(data)

    def _consume(self, data: bytes) -> None:
        """Feed ``data`` to the parser a slice at a time, keeping back what comes
        once MAX_PIPELINED requests wait, so one read of many small requests
        cannot queue thousands."""
        try:
            if len(data) <= FEED_SLICE and len(self._pending) < MAX_PIPELINED:
                self._feed(data)
            else:
                view = memoryview(data)
                for at in range(0, len(data), FEED_SLICE):
                    if self.closing:
                        break
                    if len(self._pending) >= MAX_PIPELINED:
                        self._unfed = bytes(view[at:])  # fed as answers go out
                        break
                    self._feed(view[at : at + FEED_SLICE])
        except _Refuse as refusal:
            self._refuse(refusal.status, refusal.message)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, _Refuse):
                self._refuse(cause.status, cause.message)
            elif isinstance(cause, _Stop):
                self._stop_reading()
            else:
                log.error("HTTP parser callback failed", exc_info=cause)
                self._refuse(500, "internal error in the agent; its log has the details")
        except httptools.HttpParserUpgrade:
            # Upgrade (h2c, websocket) and CONNECT are not offered: what was
            # read is answered as HTTP/1.1, then the connection closes.
            self._stop_reading()
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {_parser_reason(exc)}")
        self._update_reading()

    def _feed(self, data: bytes | memoryview) -> None:
        self.parser.feed_data(data)
        if self._in_head:  # the slice ends inside a head: count all of it
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                raise _Refuse(431, f"the request's head is larger than {MAX_HEAD_BYTES} bytes")

    def eof_received(self) -> bool | None:
        # The client sends no more.  As in Go's net/http, that ends a read in
        # progress (a long poll whose client left must free its slot); a
        # write in progress finishes and is answered (True keeps the
        # transport open until then), then the connection closes.
        if self._lingering:
            return None
        self.closing = True
        self._disarm()
        current = self._current
        if self._task is None or current is None or current.method in _READS:
            return None  # the transport closes; connection_lost cancels a read
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        self._pending.clear()
        current, task = self._current, self._task
        if task is not None and current is not None and current.method in _READS:
            task.cancel()

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = []
        self._url_bytes = 0
        self._fields = {}
        self._field_count = 0
        self._field_bytes = 0
        self._body = []
        self._body_bytes = 0
        self._in_head = True
        self._head_bytes = 0
        self._arm(REQUEST_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > MAX_TARGET_BYTES:
            raise _Refuse(414, f"the request target is longer than {MAX_TARGET_BYTES} bytes")
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_count += 1
        self._field_bytes += len(name) + len(value)
        if self._field_count > MAX_HEADERS:
            raise _Refuse(431, f"the request has more than {MAX_HEADERS} header lines")
        if self._field_bytes > MAX_HEADER_BYTES:
            raise _Refuse(431, f"the request's headers are larger than {MAX_HEADER_BYTES} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        fields = self._fields
        if key in fields:
            fields[key] = f"{fields[key]}, {text}"
        else:
            fields[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        target = b"".join(self._url).decode("latin-1")
        request = Request(
            parser.get_method().decode("ascii"),
            target,
            Headers(self._fields),
            version=parser.get_http_version(),
            keep_alive=parser.should_keep_alive(),
            remote=self.remote,
        )
        request.limit = self.limit
        self._request = request
        if not target.startswith("/"):
            # Absolute-form and asterisk-form targets name no API path.
            raise _Refuse(400, "the request target must be a path starting with /")
        length = self._fields.get("content-length")
        # (llhttp has checked it is a number that fits 64 bits; isascii keeps
        # digits of other scripts, which int() would read, out all the same.)
        if (
            length is not None
            and length.isascii()
            and length.isdigit()
            and int(length) > self.limit
        ):
            self._too_large(request)
        if (
            self._fields.get("expect", "").lower() == "100-continue"
            and request.version == "1.1"
            and self._task is None
            and self.transport is not None
        ):
            # Only when nothing is being answered: a 100 must not overtake an
            # answer to an earlier request.  A client that gets none sends its
            # body anyway after a short wait (curl: 1 s).
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limit:
            assert self._request is not None
            self._too_large(self._request)
        self._body.append(body)

    def on_message_complete(self) -> None:
        request = self._request
        assert request is not None
        self._request = None
        request.body = b"".join(self._body)
        self._body = []
        self._disarm()
        self._dispatch(request)
        if not request.keep_alive:
            raise _Stop

    # -- answering -------------------------------------------------------------------

    def _too_large(self, request: Request) -> None:
        request.too_large = True
        request.keep_alive = False
        self._body = []
        self._request = None
        self._disarm()
        self._dispatch(request)
        raise _Stop

    def _dispatch(self, request: Request) -> None:
        self._pending.append(request)
        if self._task is None:
            self._task = self._loop.create_task(self._answer())
        self._update_reading()

    async def _answer(self) -> None:
        pending = self._pending
        try:
            while pending:
                request = self._current = pending.popleft()
                if self._unfed and not self.closing:
                    unfed, self._unfed = self._unfed, b""
                    self._consume(unfed)  # may queue more; this loop answers them
                self._update_reading()
                try:
                    response = await self.app.handle(request)
                except Exception:
                    log.exception("unhandled error in %s %s", request.method, request.path[:200])
                    response = Response(
                        status=500,
                        body=b'{"error": "internal error in the agent; its log has the details"}',
                        content_type="application/json",
                    )
                self._write(request, response)
                if not request.keep_alive:
                    self._close()
                    return
        finally:
            self._current = None
            self._task = None
        if self.closing:
            self._close()
        elif self._request is None:
            self._arm(KEEPALIVE_TIMEOUT)

    def _write(self, request: Request, response: Response) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = response.body
        # Closing (no more is read): the last answer says so; those before it
        # answer requests the client already sent and keep their framing.
        keep_alive = request.keep_alive and not (self.closing and not self._pending)
        request.keep_alive = keep_alive
        try:
            head = head_of(
                response, keep_alive=keep_alive, version=request.version, length=len(body)
            )
        except (ValueError, UnicodeEncodeError):
            log.exception("a handler's response cannot be written for %s", request.path[:200])
            request.keep_alive = False
            transport.write(_refusal(500, "internal error in the agent; its log has the details"))
            return
        transport.write(head if request.method == "HEAD" else head + body)

    def _refuse(self, status: int, message: str) -> None:
        """Answer a request that cannot be read, once what came before is answered."""
        self._last_words = _refusal(status, message)
        self.closing = True
        if self._task is None:
            self._close()
        # else: the task answers what was read, then this, then closes.

    def _stop_reading(self) -> None:
        self.closing = True
        self._disarm()
        if self._task is None:
            self._close()

    def _close(self) -> None:
        self.closing = True
        self._disarm()
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        if self._last_words:
            transport.write(self._last_words)
            self._last_words = b""
        if not transport.can_write_eof():  # TLS: close_notify, then the close
            transport.close()
            return
        # Half-close: the answer and a FIN go out; what the client still
        # sends is read and dropped for a moment (LINGER_*), then the close.
        transport.write_eof()
        self._lingering = True
        if self._read_paused:
            self._read_paused = False
            transport.resume_reading()
        # Its own timer: nothing that disarms the request clocks may cancel it.
        self._loop.call_later(LINGER_SECONDS, transport.close)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._lingering:
            return
        wanted_pause = (
            self._write_paused or len(self._pending) >= MAX_PIPELINED or bool(self._unfed)
        )
        if wanted_pause and not self._read_paused:
            self._read_paused = True
            transport.pause_reading()
        elif not wanted_pause and self._read_paused:
            self._read_paused = False
            transport.resume_reading()

    # -- timeouts --------------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timeout = seconds
        self._timer = self._loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._task is None:
            self._close()
        else:  # a request read while an earlier one is answered: its clock restarts
            self._arm(self._timeout)

    def shut(self) -> None:
        """Stop reading; close once the request in progress is answered (or now if none)."""
        self._stop_reading()


def _parser_reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    return text[:120].lower()
