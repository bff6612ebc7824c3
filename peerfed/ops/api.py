"""The local admin API: /healthz, /status, /peers, /metrics (and POST /exchange), loopback only.

It reads snapshots that the daemon hands it through callables and holds no state of its own;
the one action, POST /exchange, asks for an exchange the node would make anyway. The CLI's ``status`` and ``peers`` commands use
``fetch_json``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from peerfed.errors import NotRunningError
from peerfed.serving import serve

JSONSource = Callable[[], Any]


class LocalAPI:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        status: JSONSource,
        peers: JSONSource,
        metrics: Callable[[], tuple[bytes, str]] | None = None,
        exchange_now: Callable[[str | None], Awaitable[Any]] | None = None,
    ) -> None:
        self._host, self._port = host, port
        self._status, self._peers, self._metrics = status, peers, metrics
        self._exchange_now = exchange_now
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._json_of(self._status))
        app.router.add_get("/peers", self._json_of(self._peers))
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_post("/exchange", self._exchange_handler)
        self._runner, self.bound_port = await serve(app, self._host, self._port, setting="api.listen")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def _json_of(self, source: JSONSource) -> Callable[[web.Request], Any]:
        async def handler(_: web.Request) -> web.Response:
            return web.json_response(source(), dumps=lambda v: json.dumps(v, indent=1))

        return handler

    async def _exchange_handler(self, request: web.Request) -> web.Response:
        """One exchange now (optionally ?peer=PEERID): for operators, tests and benchmarks."""
        if self._exchange_now is None:
            raise web.HTTPNotFound(text="exchange is not enabled\n")
        return web.json_response(await self._exchange_now(request.query.get("peer")))

    async def _metrics_handler(self, _: web.Request) -> web.Response:
        if self._metrics is None:
            raise web.HTTPNotFound(text="metrics are not enabled\n")
        body, content_type = self._metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})


def fetch_json(host: str, port: int, path: str, timeout: float = 5.0) -> Any:
    """GET a local API path; NotRunningError if nothing answers there."""
    url = f"http://{_url_host(host)}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise NotRunningError(f"no peerfed daemon answers on {url} (is `peerfed run` running?)") from exc


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
