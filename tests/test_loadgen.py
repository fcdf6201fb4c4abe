"""The socket client of benchmarks/loadgen.py against small canned servers.

The benchmark's verdicts rest on this client counting honestly: every answer
that is not a whole 200 is an error, a broken connection is replaced (and
counted) rather than ending the run, and an open loop sends exactly the
scheduled number of requests.  Each run here lasts well under a second.
"""

from __future__ import annotations

import importlib.util
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

LOADGEN = Path(__file__).resolve().parent.parent / "benchmarks" / "loadgen.py"


def _load() -> ModuleType:
    # benchmarks/ is not a package: load the file itself.
    spec = importlib.util.spec_from_file_location("loadgen", LOADGEN)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lg = _load()
BODY = b'{"endpoints":[]}'


def _answer(status: bytes, body: bytes = BODY, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, size, body)


#: How a canned server answers one request path; None closes the connection.
Answer = Callable[[bytes], bytes | None]


def _ok_for_app_000(path: bytes) -> bytes | None:
    return _answer(b"200 OK") if path.endswith(b"app-000") else _answer(b"500 Oops")


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], str]]:
    """Start a keep-alive HTTP server on 127.0.0.1 answering with ``answer(path)``."""
    servers: list[socketserver.ThreadingTCPServer] = []

    def start(answer: Answer) -> str:
        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                pending = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pending += data
                    while b"\r\n\r\n" in pending:
                        head, _, pending = pending.partition(b"\r\n\r\n")
                        reply = answer(head.split(b" ")[1])
                        if reply is None:
                            sock.close()
                            return
                        sock.sendall(reply)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        port = server.server_address[1]
        return f"http://127.0.0.1:{port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_closed_loop_counts_only_whole_200s(serve: Callable[[Answer], str]) -> None:
    client = lg.SocketClient(serve(_ok_for_app_000), apps=1, connections=4)
    try:
        result = lg.sock_closed_loop(client, 0.3, seed=1)
    finally:
        client.close()
    assert result["requests"] > 0 and result["errors"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_closed_loop_counts_other_statuses_as_errors(serve: Callable[[Answer], str]) -> None:
    # app-001 answers 500: about half of all answers, each one an error.
    client = lg.SocketClient(serve(_ok_for_app_000), apps=2, connections=4)
    try:
        result = lg.sock_closed_loop(client, 0.3, seed=1)
    finally:
        client.close()
    assert result["requests"] > 0 and result["errors"] > 0


def test_open_loop_sends_exactly_what_was_scheduled(serve: Callable[[Answer], str]) -> None:
    client = lg.SocketClient(serve(_ok_for_app_000), apps=1, connections=4)
    try:
        result = lg.sock_open_loop(client, 0.5, rate=200.0, seed=1)
    finally:
        client.close()
    assert result["requests"] == 100 and result["errors"] == 0
    # Latency from the scheduled time includes the client's own lag.
    assert result["p99_ms"] >= result["p99_send_ms"] > 0


def _twice(path: bytes) -> bytes:
    return _answer(b"200 OK") * 2


@pytest.mark.parametrize(
    "answer",
    [
        lambda path: None,  # the server hangs up instead of answering
        lambda path: _answer(b"200 OK", length=lg.MAX_ANSWER_BYTES + 1),  # absurd length
        lambda path: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        _twice,  # bytes nobody asked for
    ],
    ids=["hang-up", "oversized", "no-length", "extra-bytes"],
)
def test_broken_answers_are_errors_and_the_run_goes_on(
    serve: Callable[[Answer], str], answer: Answer
) -> None:
    client = lg.SocketClient(serve(answer), apps=1, connections=2)
    try:
        result = lg.sock_closed_loop(client, 0.2, seed=1)
        assert len(client.conns) == 2  # every broken connection was replaced
    finally:
        client.close()
    assert result["errors"] > 0
    if answer is not _twice:  # the extra answer could in theory arrive in a later read
        assert result["requests"] == 0
