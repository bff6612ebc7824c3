"""serving.ConnectionLimits on a real aiohttp server: connections over the per-address cap are
closed at once, half-sent requests after the header timeout, complete requests are served."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from peerfed.serving import ConnectionLimits, serve


async def _closed_after(reader: asyncio.StreamReader, started: float, limit: float) -> float | None:
    try:
        while await asyncio.wait_for(reader.read(4096), limit):
            pass
    except (TimeoutError, ConnectionError):
        return None if not reader.at_eof() else time.monotonic() - started
    return time.monotonic() - started


def test_the_cap_per_address_and_the_header_timeout() -> None:
    async def main() -> None:
        async def ok(request: web.Request) -> web.Response:
            return web.Response(text="fine")

        app = web.Application()
        app.router.add_get("/ok", ok)
        limits = ConnectionLimits(max_per_address=4, header_timeout=1.0)
        runner, port = await serve(app, "127.0.0.1", 0, setting="test.listen", limits=limits)
        try:
            started = time.monotonic()
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
            for _, writer in conns:
                writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n")  # headers never finished
            closed = await asyncio.gather(*(_closed_after(r, started, 4.0) for r, _ in conns))
            assert all(t is not None for t in closed), closed
            at_once = sorted(t for t in closed if t is not None and t < 0.5)
            timed_out = sorted(t for t in closed if t is not None and t >= 0.5)
            assert len(at_once) == 8 and len(timed_out) == 4, closed  # 4 admitted, 8 over the cap
            assert all(0.9 <= t <= 2.5 for t in timed_out), timed_out
            assert limits.refused == 8 and not limits.open_by_address
            for _, writer in conns:
                writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)  # the slots are free again
            writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await reader.read()).endswith(b"fine")
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(main())
