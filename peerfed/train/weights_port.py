"""The daemon's side of the shared weights: snapshot, merge and load, while the trainer trains.

`WeightsPort` is the one object the rest of the daemon uses to reach the trainer's weights
(the exchange gets it as its `Weights`, state sync loads through it). Each operation takes the
port's lock, so they run one at a time; it refuses with `TrainerUnavailable` while no trainer
process is ready (starting, restarting, stopped) or when the one it talks to has died.
The supervisor connects the port to each trainer process once it is ready and disconnects it
when that process dies or is stopped, under the same lock, so no operation straddles two.

`SharedWeights` does the work. Direct mode (CPU): short flat copies under the trainer's
weights lock (a multiprocessing lock), 1 MiB at a time, so a training step waits a fraction
of a millisecond at most. Mirror mode (GPU/MPS): prepare the shared buffer under that lock,
post a request in the control block, wait until the trainer served it between two steps.

Owner: any thread may call the port; its one lock serializes them. The supervisor calls
attach/connect/disconnect/close (taking the port's lock after its own, never the reverse).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from peerfed.averaging import check_flat
from peerfed.errors import TrainerUnavailable
from peerfed.train.merging import Merger, MergeRule, MergeStats
from peerfed.train.messages import ReadyInfo, SetClock, TrainerCommand
from peerfed.train.shm import (
    DONE,
    KIND_BITS,
    REQ_LOAD,
    REQ_MERGE,
    REQ_SNAPSHOT,
    REQUEST,
    ControlBlock,
    SharedTensor,
)

# The daemon reads or changes the trainer's weights 1 MiB at a time, taking the lock for each
# slice: a trainer step waits a fraction of a millisecond at most, not for a 100 MiB pass.
LOCK_SLICE = 1 << 18  # elements


class ProcessLock(Protocol):
    """A multiprocessing lock (shared with one trainer process)."""

    def acquire(self, block: bool = True, timeout: float | None = None) -> bool: ...
    def release(self) -> None: ...


@dataclass(frozen=True)
class TrainerLink:
    """The port's line to one trainer process: its weights lock, whether it still runs, and its
    command pipe (for SetClock). Built by process.py; every callable is safe from any thread."""

    lock: ProcessLock
    is_alive: Callable[[], bool]
    send: Callable[[TrainerCommand], None]


class WeightsPort:
    """Snapshot, merge and load the trainer's weights; refuses while no trainer is ready."""

    def __init__(self, clock: Callable[[], tuple[int, float]], *, request_timeout: float = 60.0,
                 merge_rule: MergeRule | None = None) -> None:
        self._clock = clock  # the supervisor's lr clock (lock-free)
        self._request_timeout = request_timeout
        self._merge_rule = merge_rule or MergeRule()  # merge.outer and merge.clip
        self._lock = threading.Lock()  # one operation at a time; guards the fields below
        self._buffers: SharedWeights | None = None
        self._link: TrainerLink | None = None
        self._unavailable = "trainer not running"  # why operations are refused while unlinked
        self._info: ReadyInfo | None = None  # published: replaced whole, read without the lock

    # ------------------------------------------------------------ what the model is (any thread)

    @property
    def info(self) -> ReadyInfo | None:
        """The last ready trainer's report (None before the first one was ready)."""
        return self._info

    @property
    def ready_info(self) -> ReadyInfo:
        info = self._info
        if info is None:
            raise TrainerUnavailable("trainer not ready yet")
        return info

    @property
    def fingerprint(self) -> str:
        return self.ready_info.fingerprint

    @property
    def nbytes(self) -> int:
        return self.ready_info.nbytes

    @property
    def numel(self) -> int:
        return self.ready_info.numel

    @property
    def num_samples(self) -> int:
        return self.ready_info.num_samples

    def lr_clock(self) -> tuple[int, float]:
        """Our lr schedule's clock (steps live, seconds as of the last stats, a second or two
        old): a state sync donor sends it with its weights."""
        return self._clock()

    # ------------------------------------------------------------ operations (any thread)

    def begin_snapshot(self) -> None:
        """Before snapshot_range: make the shared copy current (mirror mode; else nothing)."""
        with self._ready() as (buffers, link):
            buffers.begin_snapshot(link)

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None:
        """Copy elements [start, stop) of the weights into `dst`, consistent between two steps."""
        with self._ready() as (buffers, link):
            buffers.snapshot_range(dst, start, stop, link)

    def snapshot_into(self, dst: torch.Tensor) -> None:
        """Copy the current weights into `dst` (flat float32), consistent between two steps."""
        with self._ready() as (buffers, link):
            buffers.begin_snapshot(link)
            buffers.snapshot_range(dst, 0, buffers.numel, link)

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> float:
        """weights += alpha * (received - sent) (steps taken since `sent` was taken are kept),
        with the peer's difference clipped and the outer step as merge.clip and merge.outer
        say (merging.py). Returns the share of the peer's difference kept (1.0: not clipped)."""
        if not -1e3 < alpha < 1e3:
            raise ValueError(f"bad mixing weight {alpha!r}")
        with self._ready() as (buffers, link):
            return buffers.merge(received, sent, alpha, link)

    def merge_statistics(self) -> MergeStats:
        """Merges and clipped merges so far (any thread: a published frozen value)."""
        buffers = self._buffers
        return buffers.merger.statistics() if buffers is not None else MergeStats()

    def load_weights(self, src: torch.Tensor, lr_clock: tuple[int, float] | None = None) -> None:
        """Replace the weights entirely (state sync from a peer, before the first step) and take
        over the donor's lr clock (steps, seconds): its schedule goes on instead of ours from 0."""
        with self._ready() as (buffers, link):
            buffers.load(src, link)
            buffers.merger.restart(src)  # the outer loop and the clip's anchor start at the peer's model
            if lr_clock is not None:
                link.send(SetClock(int(lr_clock[0]), float(lr_clock[1])))

    @contextmanager
    def _ready(self) -> Iterator[tuple[SharedWeights, TrainerLink]]:
        with self._lock:
            buffers, link = self._buffers, self._link
            if buffers is None or link is None:
                raise TrainerUnavailable(self._unavailable)
            # dead but not yet noticed by the supervisor: its buffer is no longer trained,
            # and its lock may be held forever
            if not link.is_alive():
                raise TrainerUnavailable("trainer not running")
            yield buffers, link

    # ------------------------------------------------------------ the supervisor's

    def attach(self, control: ControlBlock, numel: int, mirror: bool) -> tuple[str, str | None]:
        """Buffers for a trainer process that said hello (kept across restarts when they fit);
        returns their names for its Attach."""
        with self._lock:
            buffers = self._buffers
            if buffers is None or buffers.numel != numel or buffers.mirror != mirror:
                if buffers is not None:
                    buffers.close()
                buffers = self._buffers = SharedWeights(control, numel, mirror=mirror,
                                                        request_timeout=self._request_timeout,
                                                        merger=Merger(self._merge_rule, numel))
            buffers.reset_requests()  # a new process starts with an empty mailbox
            return buffers.names

    def connect(self, link: TrainerLink, info: ReadyInfo) -> None:
        """That process is ready: operations go to it from now on. Its weights (fresh,
        resumed, or a restart's checkpoint) are where the outer loop and the clip start."""
        with self._lock:
            self._link, self._info = link, info
            buffers = self._buffers
            if buffers is not None:
                buffers.restart_merger(link)

    def disconnect(self, why: str) -> None:
        """No process to talk to (`why` is what operations answer); waits for one in flight."""
        with self._lock:
            self._link, self._unavailable = None, why

    def close(self) -> None:
        """For good: free the shared buffers."""
        with self._lock:
            self._link, self._unavailable = None, "trainer stopped"
            if self._buffers is not None:
                self._buffers.close()
            self._buffers = None


class SharedWeights:
    """The shared buffers of one model and how to read or change them. Callers (the port)
    serialize operations: one at a time."""

    def __init__(self, control: ControlBlock, numel: int, *, mirror: bool, request_timeout: float,
                 merger: Merger) -> None:
        self.control = control
        self.merger = merger
        self.numel = numel
        self.mirror = mirror
        self.request_timeout = request_timeout
        self.weights = SharedTensor.create(numel)
        self.delta = SharedTensor.create(numel) if mirror else None
        self._seq = 0

    @property
    def names(self) -> tuple[str, str | None]:
        return self.weights.name, self.delta.name if self.delta is not None else None

    def reset_requests(self) -> None:
        """Before a new trainer process attaches: nothing pending."""
        self.control[REQUEST] = 0
        self.control[DONE] = 0
        self._seq = 0

    def begin_snapshot(self, link: TrainerLink) -> None:
        """Make the shared buffer current before snapshot_range reads it (mirror mode)."""
        if self.mirror:
            self._request(link, REQ_SNAPSHOT)

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int, link: TrainerLink) -> None:
        """dst[start:stop] = weights[start:stop], taking the lock per 1 MiB slice."""
        check_flat(dst, self.numel)
        weights = self._tensor(self.weights)
        for first in range(start, stop, LOCK_SLICE):
            last = min(first + LOCK_SLICE, stop)
            with locked(link):
                dst[first:last].copy_(weights[first:last])

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float, link: TrainerLink) -> float:
        """The merger's change (plain or outer step, clipped) added to the weights; returns the
        share of the peer's difference kept."""
        check_flat(received, self.numel)
        check_flat(sent, self.numel)
        weight = self.merger.weight(sent, received, alpha)
        if self.mirror:
            delta = self._tensor(self.delta)

            def prepare() -> None:
                delta.zero_()
                self.merger.apply_(delta, sent, received, weight)

            self._request(link, REQ_MERGE, prepare=prepare)
        else:
            self.merger.apply_(self._tensor(self.weights), sent, received, weight, chunk=LOCK_SLICE,
                               hold=lambda: locked(link))
        return weight / alpha if alpha else 1.0

    def restart_merger(self, link: TrainerLink) -> None:
        """Start the merger at the weights the shared buffer holds (a trainer that just became
        ready published them and has taken no step yet)."""
        if self.merger.rule.outer == "none" and self.merger.rule.clip <= 0:
            return  # nothing to keep
        current = torch.empty(self.numel, dtype=torch.float32)
        self.snapshot_range(current, 0, self.numel, link)
        self.merger.restart(current)

    def load(self, src: torch.Tensor, link: TrainerLink) -> None:
        check_flat(src, self.numel)
        weights = self._tensor(self.weights)
        if self.mirror:
            self._request(link, REQ_LOAD, prepare=lambda: weights.copy_(src))
        else:
            with locked(link):
                weights.copy_(src)

    def close(self) -> None:
        self.weights.close()
        if self.delta is not None:
            self.delta.close()

    @staticmethod
    def _tensor(block: SharedTensor | None) -> torch.Tensor:
        if block is None or block.tensor is None:
            raise RuntimeError("shared weights are closed")
        return block.tensor

    def _request(self, link: TrainerLink, kind: int, prepare: Callable[[], object] | None = None) -> None:
        self._seq += 1
        seq = self._seq
        with locked(link):
            if prepare is not None:
                prepare()
            self.control[REQUEST] = (seq << KIND_BITS) | kind
        deadline = time.monotonic() + self.request_timeout
        pause = 0.0002
        while self.control[DONE] != seq:
            if not link.is_alive() or time.monotonic() >= deadline:
                self._withdraw(link, seq)
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.005)

    def _withdraw(self, link: TrainerLink, seq: int) -> None:
        """Take back a request the trainer did not serve (it died or hangs)."""
        try:
            with locked(link):
                if self.control[DONE] == seq:
                    return  # served after all
                self.control[REQUEST] = self.control[DONE] << KIND_BITS
        except TrainerUnavailable:
            pass  # dead: a restarted trainer starts with a clean mailbox
        raise TrainerUnavailable("trainer did not serve the request")


@contextmanager
def locked(link: TrainerLink) -> Iterator[None]:
    """The weights lock; gives up if the trainer dies (it may have died holding it)."""
    while not link.lock.acquire(timeout=0.1):
        if not link.is_alive():
            raise TrainerUnavailable("trainer died")
    try:
        yield
    finally:
        link.lock.release()
