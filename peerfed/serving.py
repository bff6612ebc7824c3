"""Start an aiohttp server with errors an operator can act on (the exchange and the local API).

A bottom-layer helper like errors.py: drivers in net/ and ops/ both use it, so it lives
beside them rather than in either.
"""

from __future__ import annotations

import errno
import logging

from aiohttp import web

from peerfed.errors import AddressInUseError, ConfigError


async def serve(app: web.Application, host: str, port: int, *, setting: str, shutdown_timeout: float = 60.0,
                logger: logging.Logger | logging.LoggerAdapter | None = None,  # type: ignore[type-arg]
                ) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on host:port; returns the runner and the bound port (port 0 picks one).
    A port in use is AddressInUseError and any other bind failure a ConfigError, both naming
    the config ``setting``. ``logger`` replaces aiohttp's server logger (what it says about
    bad requests and handler errors)."""
    options = {} if logger is None else {"logger": logger}
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout,
                           **options)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(f"{setting}: {host}:{port} is already in use") from exc
        raise ConfigError(f"{setting}: cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets = getattr(site._server, "sockets", None) or []  # aiohttp keeps the asyncio server here
    return runner, (sockets[0].getsockname()[1] if sockets else port)
