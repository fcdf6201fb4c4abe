"""The baselines for bench_lookup: a bare aiohttp app with one precomputed answer.

``python benchmarks/bare_server.py BODY_FILE [--index N] [--raw]`` serves
``GET /v1/resolve/{app}`` with the bytes of BODY_FILE (a real answer fetched from
an agent) as application/json plus the same ``X-Meshd-Index`` header, on
127.0.0.1 with an OS-chosen port, access log off, and prints
``bare ready http://HOST:PORT`` on stderr.  Runs until SIGTERM/SIGINT.

This is the floor for "an aiohttp handler answering that many bytes": whatever
the agent costs beyond it is routing-middleware, validation, lookup and JSON.

With ``--raw`` it is instead an asyncio Protocol that answers every request
(any path) with the same bytes as a canned HTTP/1.1 response, no HTTP parsing
beyond finding the blank line: not a web server, but a calibration target whose
own cost is near zero, so what the load generator measures against it is the
load generator's (and the machine's) own floor.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from aiohttp import web


class _Canned(asyncio.Protocol):
    """Answers each request head (up to a blank line) with ``response``."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.pending = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        data = self.pending + data
        heads = data.count(b"\r\n\r\n")  # GET requests have no body
        self.pending = data[data.rfind(b"\r\n\r\n") + 4 :] if heads else data[-65536:]
        if heads:
            self.transport.write(self.response * heads)


async def serve_raw(body: bytes, index: str) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"X-Meshd-Index: %s\r\nContent-Length: %d\r\n\r\n" % (index.encode(), len(body))
    ) + body
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Canned(response), "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare ready http://{host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    server.close()


async def serve(body: bytes, index: str) -> None:
    headers = {"X-Meshd-Index": index}

    async def resolve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json", headers=headers)

    app = web.Application()
    app.router.add_get("/v1/resolve/{app}", resolve)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare ready http://{host}:{port}", file=sys.stderr, flush=True)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("body_file", type=Path)
    parser.add_argument("--index", default="0", help="value of the X-Meshd-Index header")
    parser.add_argument("--raw", action="store_true", help="canned asyncio Protocol instead")
    args = parser.parse_args()
    run = serve_raw if args.raw else serve
    asyncio.run(run(args.body_file.read_bytes(), args.index))


if __name__ == "__main__":
    main()
