"""The data plane on a thread of its own: an Exchange served by its own event loop.

Moving 100 MiB each way costs the event loop that does it tens of milliseconds of CPU
(socket copies, aiohttp), and on a machine with no idle core that time comes out of the
trainer's. So the exchange runs on its own thread and loop at a lower CPU priority (nice
+10, net/priority.py; its copy/hash workers inherit it), while the main loop - control plane,
local API, systemd watchdog - keeps the daemon's priority and answers peers promptly however
busy the trainer is. The daemon calls the Exchange only through this class: each coroutine
runs on the data-plane loop, and cancelling the caller cancels it there.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch
import uvloop

from peerfed.core.manifest import Manifest
from peerfed.net.exchange import Exchange
from peerfed.net.priority import DATA_PLANE_NICE_STEP, lower_thread_priority

T = TypeVar("T")


class DataPlane:
    """Owns the data-plane thread and forwards calls to the Exchange living on it."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="peerfed-dataplane", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority(DATA_PLANE_NICE_STEP)
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _on_plane(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def start_server(self, host: str, port: int) -> int:
        return await self._on_plane(self.exchange.start_server(host, port))

    async def exchange_with(self, peer_id: str, url: str) -> str:
        return await self._on_plane(self.exchange.exchange_with(peer_id, url))

    async def fetch_model(self, peer_id: str, url: str, dst: torch.Tensor) -> Manifest | None:
        return await self._on_plane(self.exchange.fetch_model(peer_id, url, dst))

    async def close(self) -> None:
        """Close the Exchange, end what still runs on the plane, stop its loop and thread.

        Ending every task there also ends the callers waiting on them (an exchange asked for
        through the local API), so nothing on the main loop waits for a loop that is gone.
        """
        try:
            await self._on_plane(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 5.0)
            if not self._thread.is_alive():
                self._loop.close()

    async def _shutdown(self) -> None:
        await self.exchange.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=3.0)
