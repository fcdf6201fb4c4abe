"""The local API's application served on 127.0.0.1 for tests, behind aiohttp's test client.

``ApiTestServer(create_app(agent))`` stands where aiohttp's ``TestServer``
stood: ``api_client(app)`` sends real HTTP over loopback to
meshd's own listener (meshd/api/listener.py), so every test of the API goes
through the same parser, caps and connection handling as a running agent.
"""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import BaseTestServer, TestClient
from aiohttp.web_runner import BaseRunner
from yarl import URL

from meshd.api.listener import ApiListener
from meshd.api.routes import Application


class ApiTestServer(BaseTestServer):
    """``app`` on a free port of 127.0.0.1 for as long as the test client lives."""

    def __init__(self, app: Application, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.listener: ApiListener | None = None

    async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
        if self.listener is not None:
            return
        self.listener = ApiListener(self.app, self.host, 0)
        await self.listener.start()
        self.port = self.listener.address[1]
        self.scheme = "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        raise NotImplementedError("served by ApiListener, not an aiohttp runner")

    @property
    def started(self) -> bool:
        return self.listener is not None

    async def close(self) -> None:
        if self.listener is not None and not self._closed:
            await self.listener.close(drain_timeout=1.0)
            self._closed = True


def api_client(app: Application) -> TestClient[Any, None]:
    """aiohttp's test client over ``app`` served by :class:`ApiTestServer`."""
    return TestClient(ApiTestServer(app))
