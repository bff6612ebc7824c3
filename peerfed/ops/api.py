"""The local admin API: /healthz, /status, /peers, /metrics (and POST /exchange), loopback only,
and the dashboard: GET / (one self-contained page, dashboard.html) and /history.

It reads snapshots that the daemon hands it through callables. Its one state is the dashboard's
bounded History, which a task of its own samples from the status view while the API serves;
the one action, POST /exchange, asks for an exchange the node would make anyway. The CLI's
``status`` and ``peers`` commands use ``fetch_json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from aiohttp import web

from peerfed.errors import NotRunningError
from peerfed.ops.history import History, record_forever
from peerfed.serving import ConnectionLimits, serve

JSONSource = Callable[[], Any]

# The page may load nothing from elsewhere and only talk to this API (it works offline, and a
# peer-supplied string shown on it cannot pull in a script).
DASHBOARD_HEADERS = {
    "Content-Type": "text/html; charset=utf-8",
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


def dashboard_url(host: str, port: int) -> str:
    """Where a browser on this machine opens the node's dashboard."""
    return f"http://{_url_host(host)}:{port}/"


def dashboard_page() -> bytes:
    return files("peerfed.ops").joinpath("dashboard.html").read_bytes()


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
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self._host, self._port = host, port
        self._ready = ready  # /healthz: 503 "starting" until the node is up
        self._status, self._peers, self._metrics = status, peers, metrics
        self._exchange_now = exchange_now
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None
        self.history = History()
        self._recorder: asyncio.Task[None] | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[_loopback_host_only(self._host)])
        app.router.add_get("/", _page_of(dashboard_page()))
        app.router.add_get("/history", self._history_handler)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/status", self._json_of(self._status))
        app.router.add_get("/peers", self._json_of(self._peers))
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_post("/exchange", self._exchange_handler)
        # Loopback only, so the per-address cap is generous; the header timeout is what matters.
        self._runner, self.bound_port = await serve(app, self._host, self._port, setting="api.listen",
                                                    limits=ConnectionLimits(max_per_address=256, header_timeout=10.0))
        self._recorder = asyncio.create_task(record_forever(self.history, self._status), name="dashboard_history")

    async def stop(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
            self._recorder = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        if not self._ready():
            return web.Response(status=503, text="starting\n")
        return web.Response(text="ok\n")

    async def _history_handler(self, _: web.Request) -> web.Response:
        return web.json_response(self.history.snapshot(time.time()))

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


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _loopback_host_only(bound_host: str) -> Any:
    """Refuse requests whose Host header names another machine: a web page the operator
    opens elsewhere could otherwise reach this API through DNS rebinding (a hostile name
    that resolves to 127.0.0.1) and read /status or ask for exchanges."""
    allowed = LOOPBACK_NAMES | {bound_host.strip("[]")}

    @web.middleware
    async def check(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        host = request.headers.get("Host")
        if host is not None:
            name = host.rpartition("]")[0].lstrip("[") if host.startswith("[") else host.partition(":")[0]
            if name.lower() not in allowed:
                return web.Response(status=421, text="this API answers only to a loopback host name\n")
        return await handler(request)

    return check


def _page_of(page: bytes) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=page, headers=DASHBOARD_HEADERS)

    return handler


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
