"""One trainer process and its two channels: start it, talk to it, end it.

TrainerHandle (trainer.py) decides when to start, restart or stop a trainer and what its
messages mean; this module only owns the OS process, the command pipe and the event queue.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from peerfed.train.child import run_child
from peerfed.train.shared import TrainerLink
from peerfed.train.tasks import TrainSettings

log = logging.getLogger("peerfed.trainer")


class TrainerProcess:
    """One generation of the trainer: a spawned child, daemon -> child pipe, child -> daemon queue."""

    def __init__(
        self,
        context: Any,  # multiprocessing spawn context
        number: int,
        settings: TrainSettings,
        force_mirror: bool,
        control_name: str,
        is_current: Callable[[TrainerProcess], bool],
    ) -> None:
        reader, self._commands = context.Pipe(duplex=False)
        self._events = context.Queue()
        lock = context.Lock()
        # Not daemonic: a task may start DataLoader workers. The handle's stop (or its atexit
        # hook) ends it, and it exits by itself when it sees that its parent is gone.
        self.process = context.Process(
            target=run_child,
            name=f"peerfed-trainer-{number}",
            args=(settings, force_mirror, reader, self._events, control_name, lock, os.getpid()),
        )
        self.process.start()
        reader.close()
        self.link = TrainerLink(lock, lambda: is_current(self) and self.process.is_alive())
        self.started_at = time.monotonic()
        self.ready = False
        self.error: str | None = None  # the last error it reported

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode  # type: ignore[no-any-return]

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self._commands.send(message)
        except (OSError, ValueError) as exc:  # the child is gone; the handle's poll will notice
            log.debug("cannot send %s to the trainer: %s", message[0], exc)

    def events(self, limit: int = 1000) -> Iterator[tuple[str, Any]]:
        """The messages it has sent so far (at most `limit`), without waiting."""
        for _ in range(limit):
            try:
                kind, body = self._events.get_nowait()
            except Exception:  # Empty, or a message cut short by a killed child
                return
            yield kind, body

    def wait_exit(self, timeout: float, while_waiting: Callable[[], None]) -> None:
        """After ("stop",): wait for it to exit; terminate, then kill, if it hangs."""
        deadline = time.monotonic() + timeout
        while self.process.is_alive() and time.monotonic() < deadline:
            while_waiting()
            self.process.join(0.05)
        if self.process.is_alive():
            log.warning("trainer did not stop within %.0f s; terminating it", timeout)
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)

    def join(self, timeout: float) -> None:
        self.process.join(timeout)

    def close(self) -> None:
        """Close both channels and reap the process if it has exited."""
        self.ready = False
        try:
            self._commands.close()
        except OSError:
            pass
        self._events.close()
        self._events.join_thread()
        self.process.join(0)
