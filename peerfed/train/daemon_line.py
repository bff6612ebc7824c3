"""The trainer process's line to its daemon: commands in, events out, shared memory, the lock.

The daemon's side of the same line is process.py (the pipe and the queue), weights_port.py
(the shared buffers and the weights lock) and supervisor.py (what the messages mean).

Owner: the trainer process's one thread (child.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Lock

import torch

from peerfed.train.messages import TrainerCommand, TrainerEvent
from peerfed.train.shm import ControlBlock, SharedTensor

PARENT_CHECK_INTERVAL_S = 1.0


class ParentGone(Exception):
    """The daemon is gone (its pipe closed, or we were handed to init)."""


class DaemonLine:
    """Everything the trainer shares with the daemon, opened at start and closed at exit."""

    def __init__(self, commands: Connection, events: Queue[TrainerEvent], lock: Lock, control_name: str,
                 parent_pid: int) -> None:
        self._commands = commands
        self._events = events
        self._lock = lock
        self._parent_pid = parent_pid
        self._next_parent_check = 0.0
        self._buffers: list[SharedTensor] = []
        self.control = ControlBlock.attach(control_name)  # counters and the request mailbox

    def send(self, event: TrainerEvent) -> None:
        """Never blocks (the queue's feeder thread does the writing)."""
        self._events.put(event)

    def commands(self, timeout: float = 0.0) -> Iterator[TrainerCommand]:
        """The commands waiting now (waiting up to `timeout` for the first one)."""
        try:
            while self._commands.poll(timeout):
                timeout = 0.0
                yield self._commands.recv()
        except (EOFError, OSError):
            raise ParentGone() from None

    def attach(self, weights_name: str, delta_name: str | None, numel: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Open the shared buffers the daemon handed over (Attach)."""
        weights = SharedTensor.attach(weights_name, numel)
        self._buffers.append(weights)
        delta = None
        if delta_name is not None:
            delta = SharedTensor.attach(delta_name, numel)
            self._buffers.append(delta)
        assert weights.tensor is not None
        return weights.tensor, delta.tensor if delta is not None else None

    def check_parent(self, now: float) -> None:
        if now >= self._next_parent_check:
            self._next_parent_check = now + PARENT_CHECK_INTERVAL_S
            if os.getppid() != self._parent_pid:
                raise ParentGone()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The weights lock, shared with the daemon."""
        while not self._lock.acquire(timeout=1.0):
            self.check_parent(time.monotonic())  # the daemon may have died holding it
        try:
            yield
        finally:
            self._lock.release()

    def close(self) -> None:
        """Unmap the shared memory, then deliver the last events before the process exits."""
        for block in self._buffers:
            block.close()
        self.control.close()
        self._events.close()
        self._events.join_thread()
