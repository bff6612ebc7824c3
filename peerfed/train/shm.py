"""Shared-memory primitives the daemon and its trainer process both use.

- `SharedTensor`: a named shared-memory block seen as a flat float32 tensor. The daemon creates
  it (and unlinks it); the trainer attaches by name.
- `ControlBlock`: a few int64 slots in shared memory, each with one writer: the progress counter
  the watchdog reads, the step counters, and a one-slot request mailbox for the mirror mode
  (the daemon posts REQUEST under the weights lock, the trainer answers in DONE).
- `remove_stale_segments`: segment names carry their creator's pid, so a daemon finds and
  unlinks the ones a killed daemon left behind. The named semaphores behind multiprocessing's
  locks and queues (4 per trainer: its lock, the event queue's two locks and its counter) do
  too when `semaphores_named_by_pid` is around their creation, and are swept alike.

Owner: none; these are plain handles. Whoever opens one closes it (weights_port.py and
supervisor.py on the daemon's side, child.py in the trainer).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import shared_memory, synchronize
from pathlib import Path

import torch

from peerfed.averaging import FLAT_DTYPE, FLAT_ITEMSIZE

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
SEMAPHORE_FILE_PREFIX = "sem." + SEGMENT_PREFIX  # /dev/shm/sem.peerfed_<pid>-<random>
SHM_DIR = Path("/dev/shm")


def new_segment_name() -> str:
    """Names carry the owner's pid, so segments left by a killed daemon can be found later."""
    return f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


@contextmanager
def semaphores_named_by_pid() -> Iterator[None]:
    """Within this block, multiprocessing names the semaphores it creates (locks, and a
    queue's two locks and counter) ``/peerfed_<pid>-XXXXXXXX`` instead of ``/mp-XXXXXXXX``, so
    the ones a SIGKILLed daemon leaves in /dev/shm (its resource tracker dies with it) can be
    told from others' and swept once their creator is gone.

    multiprocessing makes a name in ``SemLock._make_name`` (joblib's loky replaces it too, for
    the same reason); we set ours for the block only, so nothing else is named our way.
    """
    original = synchronize.SemLock.__dict__["_make_name"]  # the staticmethod itself, not its function
    ours = staticmethod(lambda: f"/{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
    setattr(synchronize.SemLock, "_make_name", ours)  # noqa: B010 - a private hook, set for the block
    try:
        yield
    finally:
        if synchronize.SemLock.__dict__.get("_make_name") is ours:  # unless someone replaced it meanwhile
            setattr(synchronize.SemLock, "_make_name", original)  # noqa: B010


def remove_stale_segments() -> list[str]:
    """Unlink our segments and semaphores whose owner process is gone (SIGKILL of the whole
    process group leaves them behind; segments are model-sized). Returns the names removed.

    Only a dead owner's names go: a process that has a semaphore open keeps it after the
    name is unlinked, and only the owner (dead) would hand the name to a new process.
    """
    removed = []
    for path in [*SHM_DIR.glob(SEGMENT_PREFIX + "*"), *SHM_DIR.glob(SEMAPHORE_FILE_PREFIX + "*")]:
        prefix = SEMAPHORE_FILE_PREFIX if path.name.startswith(SEMAPHORE_FILE_PREFIX) else SEGMENT_PREFIX
        try:
            owner = int(path.name[len(prefix):].replace("-", "_").split("_", 1)[0])
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

    def counters(self) -> tuple[int, int, int] | None:
        """(progress, step, samples), or None once closed: any thread may ask."""
        try:
            return self._slots[PROGRESS], self._slots[STEP], self._slots[SAMPLES]
        except ValueError:  # released by close() meanwhile
            return None

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
