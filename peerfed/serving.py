"""Start an aiohttp server with errors an operator can act on (the exchange and the local API).

A bottom-layer helper like errors.py: drivers in net/ and ops/ both use it, so it lives
beside them rather than in either. ``bind_listener`` takes a port early (the daemon binds
every port before the trainer's slow start, so a taken port is reported in a second);
``serve`` then serves an app on that socket, or binds host:port itself.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from peerfed.errors import AddressInUseError, ConfigError


def bind_listener(host: str, port: int, *, setting: str) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks one). A port in use is
    AddressInUseError and any other bind failure a ConfigError, both naming ``setting``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host or "0.0.0.0", port), family=family, backlog=128)
    except OSError as exc:
        raise _bind_error(exc, setting, host, port) from exc


async def serve(app: web.Application, host: str, port: int, *, setting: str, shutdown_timeout: float = 60.0,
                sock: socket.socket | None = None,
                logger: logging.Logger | logging.LoggerAdapter | None = None,  # type: ignore[type-arg]
                limits: ConnectionLimits | None = None,
                ssl_context: ssl.SSLContext | None = None,  # TLS on this port (the exchange's)
                ) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``sock`` (from bind_listener) or else on host:port; returns the runner
    and the bound port. Bind failures raise as in bind_listener. ``logger`` replaces aiohttp's
    server logger (what it says about bad requests and handler errors). ``limits``: a header
    timeout and a cap on connections per remote address (see ConnectionLimits)."""
    options: dict[str, object] = {} if logger is None else {"logger": logger}
    if limits is not None:
        # aiohttp closes a connection that has no complete request after keepalive_timeout
        # (also counted from its start): that is the read timeout for a request's headers.
        options["keepalive_timeout"] = limits.header_timeout
        # After a refused or cut request, how long its unread body is drained before closing
        # (aiohttp's default is 10 s; a trickling peer would keep its connection that long).
        options["lingering_time"] = limits.lingering_time
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           **options)  # type: ignore[arg-type]
    await runner.setup()
    if limits is not None:
        sock = sock if sock is not None else bind_listener(host, port, setting=setting)
        site: web.BaseSite = _LimitedSite(runner, sock, limits, ssl_context)
    else:
        site = (web.SockSite(runner, sock, ssl_context=ssl_context) if sock is not None
                else web.TCPSite(runner, host, port, ssl_context=ssl_context))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise _bind_error(exc, setting, host, port) from exc
    if sock is not None:
        return runner, int(sock.getsockname()[1])
    sockets = getattr(site._server, "sockets", None) or []  # aiohttp keeps the asyncio server here
    return runner, (sockets[0].getsockname()[1] if sockets else port)


def _bind_error(exc: OSError, setting: str, host: str, port: int) -> AddressInUseError | ConfigError:
    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(f"{setting}: {host}:{port} is already in use")
    return ConfigError(f"{setting}: cannot listen on {host}:{port}: {exc.strerror}")


@dataclass
class ConnectionLimits:
    """What one server lets a remote address hold (issue 12: slots cannot be held): at most
    ``max_per_address`` open connections from one IP address (more are closed at once), and
    ``header_timeout`` seconds for each request's headers (and idle keep-alive), and at most
    ``lingering_time`` seconds draining the body of a request answered early. Owned by the
    server's loop; ``refused`` counts the connections closed for the cap."""

    max_per_address: int
    header_timeout: float
    lingering_time: float = 2.0
    refused: int = 0
    open_by_address: Counter[str] = field(default_factory=Counter)

    def admit(self, address: str) -> bool:
        if self.open_by_address[address] >= self.max_per_address:
            self.refused += 1
            return False
        self.open_by_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open_by_address[address] -= 1
        if self.open_by_address[address] <= 0:
            del self.open_by_address[address]


class _CappedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, admitted only under the per-address cap."""

    def __init__(self, inner: Any, limits: ConnectionLimits) -> None:
        self._inner, self._limits = inner, limits
        self._address: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if not self._limits.admit(address):
            transport.abort()  # before aiohttp sees it: no task, no buffers
            return
        self._address = address
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is not None:
            self._limits.release(self._address)
            self._address = None
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class _LimitedSite(web.SockSite):
    """A SockSite whose connections pass ConnectionLimits first (aiohttp 3.14's SockSite.start
    with the protocol factory wrapped)."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, limits: ConnectionLimits,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, sock, ssl_context=ssl_context)
        self._limits = limits

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server: Callable[[], Any] | None = self._runner.server
        assert server is not None
        limits = self._limits
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _CappedProtocol(server(), limits), sock=self._sock, ssl=self._ssl_context, backlog=self._backlog)
