"""Pacing and the transfer floor: core/rates.py's TransferFloor and net/pacing.py's paced
reader and writer (fake aiohttp objects, a real event loop, short windows)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from peerfed.core.rates import ABSOLUTE_FLOOR, TransferFloor, transfer_floor
from peerfed.net.pacing import Pacing, TransferGuard, TransferTooSlow

# ---------------------------------------------------------------- the floor, on a fake clock


def test_floor_follows_the_model_size_and_never_asks_more_than_a_quarter_of_our_cap() -> None:
    assert transfer_floor(1_000, 120.0, None) == ABSOLUTE_FLOOR  # tiny model: the absolute floor
    assert transfer_floor(120_000_000, 120.0, None) == 1_000_000  # finish within the transfer timeout
    assert transfer_floor(120_000_000, 120.0, 2_000_000) == 500_000  # a quarter of our own cap
    assert transfer_floor(1_000, 120.0, 8_000) == 2_000


def test_credit_runs_out_after_the_window_when_nothing_moves() -> None:
    floor = TransferFloor(1000.0, window=4.0, now=0.0)
    assert floor.deadline(0.0) == math.inf  # nobody waits: no clock runs
    floor.begin_wait(10.0)
    assert floor.deadline(10.0) == pytest.approx(14.0)
    assert not floor.too_slow(13.9)
    assert floor.too_slow(14.0)
    assert "0 bytes in 4.0 s" in floor.describe()


def test_bytes_earn_credit_up_to_the_window_and_only_waiting_spends_it() -> None:
    floor = TransferFloor(1000.0, window=4.0, now=0.0)
    floor.begin_wait(0.0)
    floor.end_wait(500, 1.0)  # 1 s waited for 500 bytes: 3 + 0.5 s left
    floor.begin_wait(101.0)  # 100 s in our own work: not counted
    assert floor.deadline(101.0) == pytest.approx(104.5)
    floor.end_wait(1_000_000, 102.0)  # a burst: credit capped at the window
    floor.begin_wait(102.0)
    assert floor.deadline(102.0) == pytest.approx(106.0)


def test_overlapping_waits_are_counted_once() -> None:
    floor = TransferFloor(1000.0, window=4.0, now=0.0)
    floor.begin_wait(0.0)
    floor.begin_wait(0.0)  # both directions of one exchange wait at once
    floor.end_wait(0, 2.0)
    assert floor.deadline(2.0) == pytest.approx(4.0)
    assert floor.waited == pytest.approx(2.0)


@pytest.mark.parametrize("floor_bps", [0.0, -1.0, math.inf, math.nan])
def test_a_floor_must_be_a_positive_rate(floor_bps: float) -> None:
    with pytest.raises(ValueError):
        TransferFloor(floor_bps)


# ---------------------------------------------------------------- paced objects, real loop


class FakeWriter:
    def __init__(self, stall_after: int | None = None) -> None:
        self.written = bytearray()
        self.times: list[float] = []
        self._stall_after = stall_after

    async def write(self, data: memoryview) -> None:
        if self._stall_after is not None and len(self.written) >= self._stall_after:
            await asyncio.sleep(3600)  # a peer that stopped reading
        self.written += data
        self.times.append(time.monotonic())


class TrickleReader:
    """A StreamReader whose peer sends `size` bytes every `every` seconds (None: nothing)."""

    def __init__(self, every: float | None, size: int = 1, total: int = 10**9) -> None:
        self._every, self._size, self._left = every, size, total

    async def readchunk(self) -> tuple[bytes, bool]:
        if self._left <= 0:
            return b"", False
        await asyncio.sleep(3600 if self._every is None else self._every)
        self._left -= self._size
        return b"x" * self._size, False


def guard(floor: float, window: float, cuts: list[int] | None = None, pacing: Pacing | None = None) -> TransferGuard:
    record = cuts if cuts is not None else []
    return TransferGuard(TransferFloor(floor, window=window, now=time.monotonic()), time.monotonic,
                         lambda: record.append(1), pacing)


def test_the_writer_keeps_the_upload_cap_and_meters_what_it_sent() -> None:
    pacing = Pacing(max_upload_rate=400_000.0)

    async def main() -> float:
        writer = guard(1000.0, 4.0, pacing=pacing).writer(FakeWriter())
        started = time.monotonic()
        await writer.write(b"y" * 200_000)
        await writer.write(memoryview(b"z" * 200_000))
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    # 400 kB at 400 kB/s, less the 40 kB (0.1 s) the full bucket lets out at once
    assert 0.85 <= elapsed <= 1.2, elapsed
    stats = pacing.statistics()
    assert stats.max_upload_rate == 400_000.0 and stats.max_download_rate is None
    assert stats.upload_now > 0 and stats.download_now == 0


def test_the_writer_sends_every_byte_in_order() -> None:
    inner = FakeWriter()
    data = bytes(range(256)) * 1000

    async def main() -> None:
        await guard(1000.0, 4.0).writer(inner).write(memoryview(data))

    asyncio.run(main())
    assert bytes(inner.written) == data
    assert len(inner.times) > 1  # in pieces: a stalled peer is seen between them


def test_the_reader_keeps_the_download_cap() -> None:
    pacing = Pacing(max_download_rate=100_000.0)

    async def main() -> float:
        reader = guard(1000.0, 4.0, pacing=pacing).reader(TrickleReader(every=0.0, size=10_000, total=60_000))
        started = time.monotonic()
        while (await reader.readchunk())[0]:
            pass
        return time.monotonic() - started

    elapsed = asyncio.run(main())
    assert 0.4 <= elapsed <= 0.8, elapsed  # 60 kB at 100 kB/s, less the 10 kB burst


def test_a_trickling_peer_is_cut_within_the_window_with_a_reason() -> None:
    cuts: list[int] = []

    async def main() -> tuple[float, str]:
        reader = guard(1000.0, 0.5, cuts).reader(TrickleReader(every=0.05))
        started = time.monotonic()
        with pytest.raises(TransferTooSlow) as caught:
            while True:
                await reader.readchunk()
        return time.monotonic() - started, str(caught.value)

    elapsed, reason = asyncio.run(main())
    assert 0.45 <= elapsed <= 1.0, elapsed
    assert "below the minimum rate" in reason and "floor 1000 B/s" in reason
    assert cuts == [1]
    assert isinstance(TransferTooSlow(reason), ConnectionError)  # the exchange's failure path


def test_a_peer_that_stops_reading_is_cut() -> None:
    async def main() -> float:
        writer = guard(10_000.0, 0.5).writer(FakeWriter(stall_after=50_000))
        started = time.monotonic()
        with pytest.raises(TransferTooSlow):
            await writer.write(b"q" * 200_000)
        return time.monotonic() - started

    assert asyncio.run(main()) <= 1.0


def test_a_read_that_waits_while_the_other_direction_moves_is_not_cut() -> None:
    """The initiator waits for the reply's last byte while its own push still uploads."""
    pacing = Pacing(max_upload_rate=40_000.0)
    shared = guard(10_000.0, 0.6, pacing=pacing)  # 1.1 s of pushing in 16 KiB pieces: twice the window

    async def main() -> None:
        reader = shared.reader(TrickleReader(every=None))
        waiting = asyncio.create_task(reader.readchunk())
        started = time.monotonic()
        await shared.writer(FakeWriter()).write(b"p" * 60_000)
        assert time.monotonic() - started > 1.0
        assert not waiting.done()
        with pytest.raises(TransferTooSlow):  # nothing moves any more: now it is cut
            await waiting

    asyncio.run(main())


def test_a_cut_pusher_is_refused_for_a_while_and_longer_each_time() -> None:
    now = [1000.0]
    pacing = Pacing(clock=lambda: now[0])
    assert pacing.refusal("peer-a") is None
    for expected in (30, 60):
        g = pacing.guard("peer-a", 10_000, refuse_after_cut=True)
        with pytest.raises(TransferTooSlow):
            g._cut_now()
        refusal = pacing.refusal("peer-a")
        assert refusal is not None and (refusal.status, refusal.reason) == (429, "slow_peer")
        assert f"try again in {expected} s" in refusal.detail
        now[0] += expected + 1
        assert pacing.refusal("peer-a") is None
    other = pacing.guard("peer-b", 10_000)  # our own push cut: the peer is not refused
    with pytest.raises(TransferTooSlow):
        other._cut_now()
    assert pacing.refusal("peer-b") is None
    assert pacing.statistics().slow_cuts == 3


def test_data_that_came_while_our_loop_was_starved_is_not_blamed_on_the_peer() -> None:
    """Our loop blocked past the whole window (a busy machine) while the peer's bytes arrived:
    the read finds them buffered and is not cut."""

    class Buffered:
        def __init__(self) -> None:
            self.ready = asyncio.Event()

        async def readchunk(self) -> tuple[bytes, bool]:
            await self.ready.wait()
            return b"d" * 1000, False

    async def main() -> bytes:
        inner = Buffered()
        reader = guard(1000.0, 0.2).reader(inner)
        asyncio.get_running_loop().call_later(0.05, inner.ready.set)
        reading = asyncio.create_task(reader.readchunk())
        await asyncio.sleep(0.01)  # the read is waiting
        time.sleep(0.5)  # noqa: ASYNC251 - our loop starved past the window on purpose; the data came meanwhile
        return (await reading)[0]

    assert asyncio.run(main()) == b"d" * 1000


def test_a_push_we_could_not_afford_to_answer_is_refused_for_the_upload_budget() -> None:
    now = [0.0]
    pacing = Pacing(max_upload_rate=1000.0, max_upload_share=0.5, clock=lambda: now[0])  # 30 kB a minute
    assert pacing.refusal("peer-a", reply_bytes=20_000) is None and pacing.upload_budget_allows(20_000)
    pacing.uploaded(20_000)  # one reply sent (20.9 kB on the wire with its headers)
    assert not pacing.upload_budget_allows(9_000)
    refusal = pacing.refusal("peer-a", reply_bytes=9_000)
    assert refusal is not None and (refusal.status, refusal.reason) == (429, "upload_budget")
    assert not refusal.counted  # about us, not the peer's message
    assert pacing.statistics().upload_budget_used == pytest.approx(20_000 * 1514 / 1448 / 30_000, rel=1e-4)
    now[0] = 61.5
    assert pacing.refusal("peer-a", reply_bytes=9_000) is None


def test_without_a_cap_there_is_no_budget_and_downloads_charge_the_upload_bucket_with_acks() -> None:
    free = Pacing()
    free.downloaded(10**9)
    assert free.upload_budget_allows(10**12) and free.statistics().upload_budget_used is None
    now = [0.0]
    capped = Pacing(max_upload_rate=10_000.0, clock=lambda: now[0])
    capped.downloaded(2 * 1448 * 100)  # 100 ACKs of 66 bytes went up
    assert capped.upload is not None and capped.upload.available(0.0) == pytest.approx(16_384 - 6_600)
