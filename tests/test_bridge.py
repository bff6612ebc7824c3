"""The asyncio <-> trio bridge: calls both ways, errors, cancellation, no stalls."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import trio

from peerfed.net.bridge import Bridge, BridgeClosed


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_calls_cross_both_ways_and_run_in_the_right_threads() -> None:
    async def main() -> None:
        bridge = Bridge()
        await bridge.start()
        main_thread = threading.get_ident()

        async def in_asyncio(x: int) -> tuple[int, int]:
            await asyncio.sleep(0)
            return x * 2, threading.get_ident()

        async def in_trio(x: int) -> tuple[int, int, int]:
            await trio.sleep(0.01)
            doubled, seen_thread = await bridge.run_asyncio(in_asyncio, x)
            return doubled + 1, threading.get_ident(), seen_thread

        value, trio_thread, back_thread = await bridge.run_trio(in_trio, 20)
        assert value == 41
        assert trio_thread != main_thread
        assert back_thread == main_thread
        await bridge.stop()
        assert not bridge.running

    run(main)


def test_errors_propagate_with_their_type() -> None:
    async def main() -> None:
        bridge = Bridge()
        await bridge.start()

        async def boom() -> None:
            raise ValueError("from trio")

        with pytest.raises(ValueError, match="from trio"):
            await bridge.run_trio(boom)
        await bridge.stop()

    run(main)


def test_cancelling_the_asyncio_side_cancels_the_trio_task() -> None:
    async def main() -> None:
        bridge = Bridge()
        await bridge.start()
        cancelled = threading.Event()

        async def forever() -> None:
            try:
                await trio.sleep(60)
            except trio.Cancelled:
                cancelled.set()
                raise

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(bridge.run_trio(forever), 0.2)
        assert await asyncio.to_thread(cancelled.wait, 5)
        await bridge.stop()

    run(main)


def test_many_concurrent_calls_and_after_stop_calls_fail_fast() -> None:
    async def main() -> None:
        bridge = Bridge()
        await bridge.start()

        async def echo(i: int) -> int:
            await trio.sleep(0.001)
            return i

        started = time.monotonic()
        results = await asyncio.gather(*(bridge.run_trio(echo, i) for i in range(500)))
        assert results == list(range(500))
        assert time.monotonic() - started < 10
        await bridge.stop()
        with pytest.raises(BridgeClosed):
            await bridge.run_trio(echo, 1)

    run(main)
