"""What the daemon and its trainer process share: memory blocks, a control block, the weights.

- `SharedTensor`: a named shared-memory block seen as a flat float32 tensor. The daemon creates
  it (and unlinks it); the trainer attaches by name.
- `ControlBlock`: a few int64 counters in shared memory: a progress counter the watchdog reads,
  the step counters, and a one-slot request mailbox for the mirror mode.
- `WeightStore`: the trainer's side of the weights. On CPU (direct mode) the model's averaged
  tensors are views into the shared buffer, so the daemon reads and merges them in place under
  the lock. Elsewhere (mirror mode) the model lives on the device and the trainer serves
  snapshot / merge / load requests between steps.
- `SharedWeights`: the daemon's side: snapshot, merge and load over those buffers.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peerfed.averaging import (
    FLAT_DTYPE,
    FLAT_ITEMSIZE,
    FlatLayout,
    averaged_tensors,
    bind_to_flat,
    check_flat,
    delta_into,
    flatten_into,
    merge_,
    unflatten_from,
)
from peerfed.errors import TrainerUnavailable

# Control block slots (int64 each).
PROGRESS = 0  # +1 per training step, never reset (the watchdog's heartbeat)
STEP = 1  # training step (resumes from checkpoints)
SAMPLES = 2  # samples processed (resumes from checkpoints)
REQUEST = 3  # (seq << KIND_BITS) | kind, written by the daemon under the lock
DONE = 4  # seq of the last request served, written by the trainer under the lock
CONTROL_SLOTS = 8

KIND_BITS = 3
REQ_NONE = 0
REQ_SNAPSHOT = 1  # device weights -> shared weights buffer
REQ_MERGE = 2  # device weights += shared delta buffer
REQ_LOAD = 3  # device weights = shared weights buffer


SEGMENT_PREFIX = "peerfed_"
SHM_DIR = Path("/dev/shm")


def new_segment_name() -> str:
    """Names carry the owner's pid, so segments left by a killed daemon can be found later."""
    return f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


def remove_stale_segments() -> list[str]:
    """Unlink our segments whose owner process is gone (SIGKILL of the whole process group
    leaves them behind, model-sized). Returns the names removed."""
    removed = []
    for path in SHM_DIR.glob(SEGMENT_PREFIX + "*"):
        try:
            owner = int(path.name[len(SEGMENT_PREFIX):].split("_", 1)[0])
        except ValueError:
            continue
        if owner != os.getpid() and not _pid_alive(owner):
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's: leave it alone
    return True


class SharedTensor:
    """A shared-memory block holding `numel` float32 values, as a torch tensor."""

    def __init__(self, shm: shared_memory.SharedMemory, numel: int, owner: bool) -> None:
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self.numel = numel
        self._owner = owner
        self.tensor: torch.Tensor | None = torch.frombuffer(shm.buf, dtype=FLAT_DTYPE, count=numel)

    @classmethod
    def create(cls, numel: int) -> SharedTensor:
        shm = shared_memory.SharedMemory(name=new_segment_name(), create=True,
                                         size=max(1, numel * FLAT_ITEMSIZE))
        return cls(shm, numel, owner=True)

    @classmethod
    def attach(cls, name: str, numel: int) -> SharedTensor:
        return cls(shared_memory.SharedMemory(name=name), numel, owner=False)

    def close(self) -> None:
        """Drop our tensor and mapping; the owner also unlinks the name."""
        shm, self._shm, self.tensor = self._shm, None, None
        if shm is None:
            return
        try:
            shm.close()
        except BufferError:
            # Tensors (e.g. the bound model) still view the mapping; it goes away with them.
            # Drop our handles so that SharedMemory.__del__ does not retry and complain.
            shm._mmap = None  # type: ignore[attr-defined]
            if getattr(shm, "_fd", -1) >= 0:
                os.close(shm._fd)  # type: ignore[attr-defined]
                shm._fd = -1  # type: ignore[attr-defined]
        if self._owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


class ControlBlock:
    """int64 slots in shared memory. Each slot has one writer; aligned 8-byte stores."""

    def __init__(self, shm: shared_memory.SharedMemory, owner: bool) -> None:
        self._shm: shared_memory.SharedMemory | None = shm
        self.name = shm.name
        self._owner = owner
        self._slots = shm.buf.cast("q")

    @classmethod
    def create(cls) -> ControlBlock:
        shm = shared_memory.SharedMemory(name=new_segment_name(), create=True, size=CONTROL_SLOTS * 8)
        block = cls(shm, owner=True)
        for i in range(CONTROL_SLOTS):
            block[i] = 0
        return block

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        return cls(shared_memory.SharedMemory(name=name), owner=False)

    def __getitem__(self, slot: int) -> int:
        try:
            return self._slots[slot]
        except ValueError:  # closed (the handle is stopping)
            return 0

    def __setitem__(self, slot: int, value: int) -> None:
        self._slots[slot] = value

    def pending_request(self) -> tuple[int, int] | None:
        """(seq, kind) of a request not served yet, else None."""
        request = self._slots[REQUEST]
        seq = request >> KIND_BITS
        if seq == self._slots[DONE]:
            return None
        return seq, request & ((1 << KIND_BITS) - 1)

    def close(self) -> None:
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._slots.release()
        shm.close()
        if self._owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass


# The daemon reads or changes the trainer's weights 1 MiB at a time, taking the lock for each
# slice: a trainer step waits a fraction of a millisecond at most, not for a 100 MiB pass.
LOCK_SLICE = 1 << 18  # elements


class WeightStore:
    """The trainer's weights and how they reach the shared buffer.

    modes: "direct" (CPU, float32: the model's tensors are views into the shared buffer),
    "mirror" (model tensors are views into a private flat buffer on the device),
    "copy" (mixed dtypes: tensors stay as they are, converted on each copy).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: FlatLayout,
        shared: torch.Tensor,
        delta: torch.Tensor | None,
        *,
        mirror: bool,
        device: torch.device,
    ) -> None:
        self.model = model
        self.layout = layout
        self.shared = shared
        self.delta = delta
        self.device = device
        self._scratch: torch.Tensor | None = None
        self.flat: torch.Tensor | None
        if not mirror:
            bind_to_flat(model, shared)
            self.mode, self.flat = "direct", shared
        elif layout.all_float32:
            self.flat = layout.new_buffer(device)
            bind_to_flat(model, self.flat)
            self.mode = "mirror"
        else:
            self.mode, self.flat = "copy", None
        if mirror and delta is None:
            raise ValueError("mirror mode needs a delta buffer")
        self.publish()

    def publish(self) -> None:
        """Make the shared buffer hold the current weights (a no-op in direct mode)."""
        if self.mode == "direct":
            return
        with torch.no_grad():
            if self.flat is not None:
                self.shared.copy_(self.flat)
            else:
                flatten_into(self.model, self.shared)

    def load(self) -> None:
        """Replace the weights with the shared buffer (state sync)."""
        if self.mode == "direct":
            return
        with torch.no_grad():
            if self.flat is not None:
                self.flat.copy_(self.shared)
            else:
                unflatten_from(self.shared, self.model)

    def add_delta(self) -> None:
        """weights += delta buffer (the daemon already scaled it by alpha)."""
        assert self.delta is not None
        with torch.no_grad():
            if self.flat is None:
                tensors = [t.detach() for _, t in averaged_tensors(self.model)]
                views = self.layout.views(self.delta)
                torch._foreach_add_(tensors, [v.to(t.device, t.dtype) for t, v in zip(tensors, views)])
            elif self.flat.device == self.delta.device:
                self.flat.add_(self.delta)
            else:
                if self._scratch is None:  # one device-side buffer reused for every merge
                    self._scratch = torch.empty_like(self.flat)
                self._scratch.copy_(self.delta)
                self.flat.add_(self._scratch)

    def serve(self, kind: int) -> None:
        if kind == REQ_SNAPSHOT:
            self.publish()
        elif kind == REQ_MERGE:
            self.add_delta()
        elif kind == REQ_LOAD:
            self.load()
        synchronize(self.device)  # the daemon reads the buffers right after DONE


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class TrainerLink:
    """The daemon's view of one trainer process: its weights lock and whether it still runs."""

    lock: Any  # multiprocessing.Lock shared with that process
    is_current: Callable[[], bool]  # alive and still the trainer we talk to


class SharedWeights:
    """The daemon's side of the weights: the shared buffers and how to read or change them.

    Direct mode: short flat copies under the lock. Mirror mode: prepare the shared buffer
    under the lock, post a request in the control block, wait until the trainer served it.
    Callers serialize operations (one at a time).
    """

    def __init__(self, control: ControlBlock, numel: int, *, mirror: bool, request_timeout: float) -> None:
        self.control = control
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

    def snapshot_into(self, dst: torch.Tensor, link: TrainerLink) -> None:
        self.begin_snapshot(link)
        self.snapshot_range(dst, 0, self.numel, link)

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float, link: TrainerLink) -> None:
        check_flat(received, self.numel)
        check_flat(sent, self.numel)
        if self.mirror:
            delta = self._tensor(self.delta)
            self._request(link, REQ_MERGE, prepare=lambda: delta_into(delta, sent, received, alpha))
            return
        merge_(self._tensor(self.weights), sent, received, alpha, chunk=LOCK_SLICE, hold=lambda: locked(link))

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
            if not link.is_current() or time.monotonic() >= deadline:
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
        if not link.is_current():
            raise TrainerUnavailable("trainer died")
    try:
        yield
    finally:
        link.lock.release()
