"""A bridge between the daemon's asyncio loop and a trio loop in its own thread.

py-libp2p only runs on trio (design.md section 5), while the daemon runs on asyncio/uvloop.
The trio loop lives in a dedicated thread. Calls cross in both directions:

- asyncio -> trio: ``await bridge.run_trio(fn, *args)`` starts ``fn`` in the trio nursery
  through ``TrioToken.run_sync_soon`` and resolves an asyncio future when it finishes.
- trio -> asyncio: ``await bridge.run_asyncio(fn, *args)`` (called from trio code) schedules
  ``fn`` on the asyncio loop and wakes the trio task when it finishes.

Cancelling the waiting side cancels the work on the other side.

Owner: the Bridge belongs to the daemon's asyncio loop (start, stop and run_trio are called
from it); everything started in its nursery (the libp2p host) belongs to the trio thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class BridgeClosed(RuntimeError):
    """The trio thread is not running (never started, stopped or crashed)."""


class Bridge:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- lifecycle (called from the asyncio thread) ---------------------------------------

    async def start(self, name: str = "peerfed-trio") -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._error is not None:
            raise BridgeClosed(f"trio thread failed to start: {self._error!r}") from self._error

    async def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything still running in trio and join the thread."""
        token, stop = self._token, self._stop
        if token is not None and stop is not None:
            try:
                token.run_sync_soon(stop.set)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)
        self._token = None

    @property
    def nursery(self) -> trio.Nursery:
        """The trio nursery that long-lived trio services start in (use from trio only)."""
        if self._nursery is None:
            raise BridgeClosed("trio thread is not running")
        return self._nursery

    @property
    def running(self) -> bool:
        return self._token is not None and self._thread is not None and self._thread.is_alive()

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001 - reported to whoever waits
            self._error = exc
        finally:
            self._token = None
            self._started.set()

    async def _trio_main(self) -> None:
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    # -- asyncio -> trio ------------------------------------------------------------------

    async def run_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the trio thread and return its result here."""
        token, loop = self._token, self._loop
        if token is None or loop is None or self._nursery is None:
            raise BridgeClosed("trio thread is not running")
        future: asyncio.Future[T] = loop.create_future()
        scope_box: list[trio.CancelScope] = []

        def deliver(ok: bool, value: Any) -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        async def task() -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                try:
                    result = await fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    if isinstance(exc, trio.Cancelled):
                        loop.call_soon_threadsafe(deliver, False, BridgeClosed("cancelled in trio"))
                        raise
                    loop.call_soon_threadsafe(deliver, False, exc)
                    return
                loop.call_soon_threadsafe(deliver, True, result)

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(task)

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError as exc:
            raise BridgeClosed("trio thread has stopped") from exc
        try:
            return await future
        except asyncio.CancelledError:
            if scope_box:
                try:
                    token.run_sync_soon(scope_box[0].cancel)
                except trio.RunFinishedError:
                    pass
            raise

    # -- trio -> asyncio ------------------------------------------------------------------

    async def run_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From trio: run ``await fn(*args)`` on the asyncio loop and return its result."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise BridgeClosed("asyncio loop is not running")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        cfuture: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(_call(fn, *args), loop)

        def wake(_: concurrent.futures.Future[T]) -> None:
            try:
                token.run_sync_soon(done.set)
            except trio.RunFinishedError:
                pass

        cfuture.add_done_callback(wake)
        try:
            await done.wait()
        except trio.Cancelled:
            cfuture.cancel()
            raise
        return cfuture.result()

    def call_asyncio_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """From trio: run the plain callable ``fn(*args)`` on the asyncio loop, not waiting."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)


async def _call(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    return await fn(*args)
