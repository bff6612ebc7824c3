"""Start an aiohttp server with errors an operator can act on (the exchange and the local API).

A bottom-layer helper like errors.py: drivers in net/ and ops/ both use it, so it lives
beside them rather than in either. ``bind_listener`` takes a port early (the daemon binds
every port before the trainer's slow start, so a taken port is reported in a second);
``serve`` then serves an app on that socket, or binds host:port itself.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl

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
                ssl_context: ssl.SSLContext | None = None,  # TLS on this port (the exchange's)
                ) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on ``sock`` (from bind_listener) or else on host:port; returns the runner
    and the bound port. Bind failures raise as in bind_listener. ``logger`` replaces aiohttp's
    server logger (what it says about bad requests and handler errors)."""
    options = {} if logger is None else {"logger": logger}
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           **options)
    await runner.setup()
    site: web.BaseSite = (web.SockSite(runner, sock, ssl_context=ssl_context) if sock is not None
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
