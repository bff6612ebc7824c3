"""Pacing and guarding every transfer of the data plane: rate caps, and a floor no peer may go below.

Owner: the data-plane loop (net/dataplane.py) owns the node's ``Pacing`` and everything it
hands out; ``statistics()`` may be called from any thread (the meters sit behind a lock).

- One token bucket per direction per node (core/rates.py, exchange.max_upload_rate and
  max_download_rate): every transfer, exchange and state sync alike, writes through a
  ``PacedWriter`` and reads through a ``PacedReader``, which wait for the bucket before each
  piece. A reader that waits lets TCP's window push back on the sender.
- Every transfer has a ``TransferGuard``: a floor in bytes per second (from the model's size,
  the transfer timeout and our own caps: core.rates.transfer_floor) that the peer must keep
  up, as time credit (core.rates.TransferFloor). A read or write pending past the credit is
  cut with ``TransferTooSlow`` (a ConnectionError: the exchange fails, nothing is merged, the
  slot is freed) within about FLOOR_WINDOW seconds, instead of holding the slot for the
  whole transfer timeout. Both directions of one exchange share one guard, so a reply held
  back by its last byte while our push is still uploading is not mistaken for a stall.
- A peer whose push was cut is answered 429 ``slow_peer`` for a while (doubling per cut), so
  an immediate retry cannot take the slot again.
- The upload bucket counts what the uplink carries, not only payload: TCP/IP headers on what
  we send and the ACKs for what we receive (core.rates.wire_upload_bytes, ack_upload_bytes).
- With a max_upload_rate, exchange.max_upload_share holds over any minute
  (core.rates.UploadBudget): our own push waits for room (``upload_budget_allows``) and a
  peer's push, whose reply we would upload, is answered 429 ``upload_budget`` while none is left.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from peerfed.core.exchange_rules import Refusal, wire_length
from peerfed.core.rates import (
    FLOOR_WINDOW,
    RateMeter,
    TokenBucket,
    TransferFloor,
    UploadBudget,
    ack_upload_bytes,
    default_burst,
    transfer_floor,
    wire_upload_bytes,
)
from peerfed.serving import ConnectionLimits

T = TypeVar("T")

MIN_PIECE = 16 * 1024
MAX_PIECE = 1 << 20
SLOW_COOLDOWN_S = 30.0  # a peer cut for a slow push is refused this long, doubling per cut
SLOW_COOLDOWN_MAX_S = 600.0
MAX_SLOW_PEERS = 1024  # memory bound of the cooldown table (oldest forgotten first)
# Our client drops an idle connection before a peer's server does (its header timeout, 10 s by
# default, also closes idle connections): we never reuse one the peer is just closing.
CLIENT_IDLE_S = 4.0


UPLOAD_BUDGET_SPENT = Refusal(429, "upload_budget", "our upload budget (exchange.max_upload_share) is spent "
                              "for this minute; try another peer")


class TransferTooSlow(ConnectionError):
    """The peer moved fewer bytes than the transfer's floor for about FLOOR_WINDOW seconds."""


@dataclass(frozen=True, slots=True)
class LinkStats:
    """Payload bytes per second through this node's data plane: over the last 10 s and
    since start; the caps (None: unlimited); transfers cut for going below their floor;
    the share of the upload budget the last minute used (None: no max_upload_rate)."""

    upload_now: float = 0.0
    upload_avg: float = 0.0
    download_now: float = 0.0
    download_avg: float = 0.0
    max_upload_rate: float | None = None
    max_download_rate: float | None = None
    slow_cuts: int = 0
    upload_budget_used: float | None = None


class TransferGuard:
    """The floor of one transfer (both directions of an exchange share one)."""

    def __init__(self, floor: TransferFloor, clock: Callable[[], float],
                 on_cut: Callable[[], None], pacing: Pacing | None = None) -> None:
        self.floor = floor
        self._clock = clock
        self._on_cut = on_cut
        self._cut = False
        self._pacing = pacing if pacing is not None else Pacing(clock=clock)

    def writer(self, inner: Any) -> PacedWriter:
        """``inner`` (an aiohttp writer or StreamResponse) paced by the node's upload bucket, guarded."""
        return PacedWriter(inner, self._pacing, self)

    def reader(self, inner: Any) -> PacedReader:
        """``inner`` (an aiohttp StreamReader) paced by the node's download bucket, guarded."""
        return PacedReader(inner, self._pacing, self)

    async def run(self, op: Awaitable[T], nbytes: Callable[[T], int]) -> T:
        """Await ``op`` (one read or write) while the floor holds; TransferTooSlow otherwise."""
        task = asyncio.ensure_future(op)
        self.floor.begin_wait(self._clock())
        moved = 0
        try:
            while True:
                if task.done():
                    result = task.result()
                    moved = nbytes(result)
                    return result
                remaining = self.floor.deadline(self._clock()) - self._clock()
                if remaining <= 0 or self._cut:
                    # Out of credit. If our own loop was starved, what the peer sent meanwhile is
                    # waiting in callbacks already due: let them run before blaming the peer.
                    await asyncio.sleep(0)
                    if task.done():
                        continue
                    self._cut_now()
                await asyncio.wait({task}, timeout=remaining)
        finally:
            if not task.done():
                task.cancel()
            self.floor.end_wait(moved, self._clock())

    async def run_retryable(self, op: Callable[[], Awaitable[T]], nbytes: Callable[[T], int]) -> T:
        """``run`` for an operation that may be cancelled and started again without loss (a
        StreamReader's readchunk): a timer instead of a task per call, cheap for many small reads."""
        self.floor.begin_wait(self._clock())
        moved = 0
        try:
            while True:
                remaining = self.floor.deadline(self._clock()) - self._clock()
                # Out of credit: one last try that only succeeds without waiting (data that came
                # while our own loop was starved is already buffered), then the cut.
                last_try = remaining <= 0 or self._cut
                timer = asyncio.timeout(max(0.0, remaining))
                try:
                    async with timer:
                        result = await op()
                except TimeoutError:
                    if not timer.expired():
                        raise  # the operation's own
                    if last_try:
                        self._cut_now()
                    continue  # the other direction may have moved meanwhile: look again
                moved = nbytes(result)
                return result
        finally:
            self.floor.end_wait(moved, self._clock())

    def _cut_now(self) -> None:
        if not self._cut:
            self._cut = True
            self._on_cut()
        raise TransferTooSlow(self.floor.describe())


class PacedWriter:
    """An aiohttp writer (or StreamResponse) whose writes go out paced and guarded, in pieces."""

    def __init__(self, inner: Any, pacing: Pacing, guard: TransferGuard) -> None:
        self._inner, self._pacing, self._guard = inner, pacing, guard
        piece = guard.floor.floor * guard.floor.window / 4  # one piece at the floor: a quarter of the credit
        if pacing.upload is not None:
            piece = min(piece, pacing.upload.burst)
        self._piece = int(min(MAX_PIECE, max(MIN_PIECE, piece)))

    async def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for start in range(0, view.nbytes, self._piece):
            part = view[start:start + self._piece]
            await self._pacing.wait_upload(part.nbytes)
            size = part.nbytes
            await self._guard.run(self._inner.write(part), lambda _, size=size: size)
            self._pacing.uploaded(size)


class PacedReader:
    """An aiohttp StreamReader whose ``readchunk`` is guarded and paced (what receive_into uses)."""

    def __init__(self, inner: Any, pacing: Pacing, guard: TransferGuard) -> None:
        self._inner, self._pacing, self._guard = inner, pacing, guard

    async def readchunk(self) -> tuple[bytes, bool]:
        data, end = await self._guard.run_retryable(self._inner.readchunk, lambda got: len(got[0]))
        if data:
            self._pacing.downloaded(len(data))
            await self._pacing.wait_download(len(data))  # not reading meanwhile slows the sender
        return data, end


class Pacing:
    """The node's two token buckets, rate meters and slow-peer cooldowns (see the module doc)."""

    def __init__(self, *, max_upload_rate: float | None = None, max_download_rate: float | None = None,
                 max_upload_share: float = 1.0, transfer_timeout: float = 120.0,
                 connections: ConnectionLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # The exchange server's header timeout and per-address cap (serving.py)
        self.connections = connections or ConnectionLimits(max_per_address=16, header_timeout=10.0)
        now = clock()
        self.upload = None if max_upload_rate is None else \
            TokenBucket(max_upload_rate, default_burst(max_upload_rate), now=now)
        self.download = None if max_download_rate is None else \
            TokenBucket(max_download_rate, default_burst(max_download_rate), now=now)
        self.budget = None if max_upload_rate is None else \
            UploadBudget(max_upload_rate, max_upload_share, now=now)
        self._transfer_timeout = transfer_timeout
        self._lock = threading.Lock()  # the meters: fed on the data plane, read by statistics()
        self._meters = (RateMeter(now=now), RateMeter(now=now))  # upload, download
        self._cooldowns: OrderedDict[str, tuple[float, int]] = OrderedDict()  # peer -> (until, cuts)
        self._slow_cuts = 0

    # -- per transfer ----------------------------------------------------------------------

    def guard(self, peer_id: str, payload_bytes: int, *, refuse_after_cut: bool = False) -> TransferGuard:
        """A guard for one transfer of ``payload_bytes`` each way with ``peer_id`` (its
        reader() and writer() pace and guard it); with ``refuse_after_cut``, a cut puts the
        peer in cooldown (its pushes are refused for a while)."""
        limits = [r.rate for r in (self.upload, self.download) if r is not None]
        floor = transfer_floor(wire_length(payload_bytes), self._transfer_timeout, min(limits) if limits else None)

        def on_cut() -> None:
            self._slow_cuts += 1
            if refuse_after_cut:
                self._cool_down(peer_id)

        return TransferGuard(TransferFloor(floor, window=FLOOR_WINDOW, now=self._clock()), self._clock, on_cut, self)

    async def wait_upload(self, nbytes: int) -> None:
        if self.upload is not None and (delay := self.upload.delay_for(wire_upload_bytes(nbytes), self._clock())) > 0:
            await asyncio.sleep(delay)

    async def wait_download(self, nbytes: int) -> None:
        if self.download is not None and (delay := self.download.delay_for(nbytes, self._clock())) > 0:
            await asyncio.sleep(delay)

    def uploaded(self, nbytes: int) -> None:
        now = self._clock()
        with self._lock:
            self._meters[0].add(nbytes, now)
            if self.budget is not None:
                self.budget.add(wire_upload_bytes(nbytes), now)

    def downloaded(self, nbytes: int) -> None:
        now, acks = self._clock(), ack_upload_bytes(nbytes)
        with self._lock:
            self._meters[1].add(nbytes, now)
            if self.budget is not None:
                self.budget.add(acks, now)
        if self.upload is not None:
            self.upload.charge(acks, now)

    def upload_budget_allows(self, payload_bytes: int) -> bool:
        """Whether uploading ``payload_bytes`` now keeps max_upload_share over the last minute."""
        if self.budget is None:
            return True
        with self._lock:
            return self.budget.allows(wire_upload_bytes(payload_bytes), self._clock())

    # -- slow peers ------------------------------------------------------------------------

    def refusal(self, peer_id: str, reply_bytes: int = 0) -> Refusal | None:
        """429 slow_peer while ``peer_id`` is in cooldown after a push cut for slowness;
        429 upload_budget while uploading our ``reply_bytes`` would break max_upload_share."""
        until, _ = self._cooldowns.get(peer_id, (0.0, 0))
        if (left := until - self._clock()) > 0:
            return Refusal(429, "slow_peer", f"your last push was below the minimum rate; try again in {math.ceil(left)} s")
        if not self.upload_budget_allows(reply_bytes):
            return UPLOAD_BUDGET_SPENT
        return None

    def _cool_down(self, peer_id: str) -> None:
        _, cuts = self._cooldowns.pop(peer_id, (0.0, 0))
        cooldown = min(SLOW_COOLDOWN_MAX_S, SLOW_COOLDOWN_S * 2 ** cuts)
        self._cooldowns[peer_id] = (self._clock() + cooldown, cuts + 1)
        while len(self._cooldowns) > MAX_SLOW_PEERS:
            self._cooldowns.popitem(last=False)

    # -- published -------------------------------------------------------------------------

    def statistics(self) -> LinkStats:
        now = self._clock()
        with self._lock:
            up, down = self._meters
            return LinkStats(upload_now=up.current(now), upload_avg=up.average(now),
                             download_now=down.current(now), download_avg=down.average(now),
                             max_upload_rate=None if self.upload is None else self.upload.rate,
                             max_download_rate=None if self.download is None else self.download.rate,
                             slow_cuts=self._slow_cuts,
                             upload_budget_used=None if self.budget is None else self.budget.used_share(now))
