"""The data plane on a thread of its own: an Exchange served by its own event loop.

Owner: the data-plane thread and its loop own the Exchange; the DataPlane object itself is
the daemon's (its methods are called from the daemon's loop and hand work to the plane's).

Moving 100 MiB each way costs the event loop that does it tens of milliseconds of CPU
(socket copies, aiohttp), and on a machine with no idle core that time comes out of the
trainer's. So the exchange runs on its own thread and loop at a lower CPU priority (nice
+10, net/priority.py; its copy/hash workers inherit it), while the main loop - control plane,
local API, systemd watchdog - keeps the daemon's priority and answers peers promptly however
busy the trainer is. The daemon reaches the Exchange only through this class: coroutines run
on the plane's loop (cancelling the caller cancels them there), state changes are callbacks
queued on it in call order, and ``statistics()`` returns the snapshot the Exchange published.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import torch
import uvloop

from peerfed.core.admission import GateStats, Roster
from peerfed.core.exchange_rules import Outcome
from peerfed.core.manifest import Manifest
from peerfed.net.exchange import Exchange
from peerfed.net.exchange_state import ExchangeStats
from peerfed.net.priority import DATA_PLANE_NICE_STEP, lower_thread_priority

T = TypeVar("T")


class DataPlane:
    """Owns the data-plane thread and forwards calls to the Exchange living on it."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="peerfed-dataplane", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        lower_thread_priority(DATA_PLANE_NICE_STEP)
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _on_plane(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def _soon_on_plane(self, fn: Callable[..., None], *args: Any) -> None:
        """Queue ``fn(*args)`` on the plane's loop (after the work queued before it)."""
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # -- work -----------------------------------------------------------------------------

    async def start_server(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        return await self._on_plane(self._exchange.start_server(host, port, sock))

    async def exchange_with(self, peer_id: str, url: str) -> Outcome:
        return await self._on_plane(self._exchange.exchange_with(peer_id, url))

    async def fetch_model(self, peer_id: str, url: str, dst: torch.Tensor) -> Manifest | None:
        return await self._on_plane(self._exchange.fetch_model(peer_id, url, dst))

    # -- state changes (queued, in call order) and the published snapshot -----------------

    def set_weights_ready(self, ready: bool) -> None:
        """Whether our weights may be shared (not while a state sync replaces a random init)."""
        self._soon_on_plane(self._exchange.set_weights_ready, ready)

    def stop_accepting(self) -> None:
        """Refuse new exchanges from now on (the first step of shutting down)."""
        self._soon_on_plane(self._exchange.stop_accepting)

    def set_allowlist(self, allowlist: frozenset[str] | None) -> None:
        self._soon_on_plane(self._exchange.guard.verifier.set_allowlist, allowlist)

    def set_roster(self, roster: Roster) -> None:
        """The peers admitted from now on (connected over libp2p) and their certificate pins."""
        self._soon_on_plane(self._exchange.guard.set_roster, roster)

    def ban_reason(self, peer_id: str, reason: str) -> None:
        """Report ``peer_id`` at fault for ``reason`` (a strike, or a ban at once; core/admission.py)."""
        self._soon_on_plane(self._exchange.guard.ban_reason, peer_id, reason)

    def gate_statistics(self) -> GateStats:
        """Admission and bans as last published (immutable; read from any thread)."""
        return self._exchange.guard.statistics()

    def statistics(self) -> ExchangeStats:
        """The Exchange's latest published snapshot (immutable; read from any thread)."""
        return self._exchange.statistics()

    # -- end ------------------------------------------------------------------------------

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
        await self._exchange.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=3.0)
