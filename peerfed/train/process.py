"""One trainer process and its two channels: start it, talk to it, end it.

The supervisor (supervisor.py) decides when to start, restart or stop a trainer and what its
events mean; this module only owns the OS process, the command pipe (daemon -> trainer) and
the event queue (trainer -> daemon), both carrying messages.py's typed messages.

Owner: the supervisor's thread, except `link` (for the weights port): its lock, `is_alive`
(a WNOHANG waitpid: asked from two threads, one of them merely learns it a call later) and
`send` (behind a lock of its own) are safe from any thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.context import SpawnContext

from peerfed.train.child import run_child
from peerfed.train.messages import TrainerCommand, TrainerEvent
from peerfed.train.shm import semaphores_named_by_pid
from peerfed.train.tasks import TrainSettings
from peerfed.train.weights_port import TrainerLink

log = logging.getLogger("peerfed.trainer")


class TrainerProcess:
    """One generation of the trainer: a spawned child, daemon -> child pipe, child -> daemon queue."""

    def __init__(
        self,
        context: SpawnContext,
        number: int,
        settings: TrainSettings,
        force_mirror: bool,
        control_name: str,
    ) -> None:
        reader, self._commands = context.Pipe(duplex=False)
        self._sending = threading.Lock()  # the supervisor and the weights port both send
        with semaphores_named_by_pid():  # swept after a SIGKILL of the whole group (shm.py)
            self._events = context.Queue()
            lock = context.Lock()
        # Not daemonic: a task may start DataLoader workers. The supervisor's stop (or its
        # atexit hook) ends it, and it exits by itself when it sees that its parent is gone.
        self.process = context.Process(
            target=run_child,
            name=f"peerfed-trainer-{number}",
            args=(settings, force_mirror, reader, self._events, control_name, lock, os.getpid()),
        )
        self.process.start()
        reader.close()
        self.link = TrainerLink(lock, self.is_alive, self.send)
        self.started_at = time.monotonic()
        self.ready = False
        self.error: str | None = None  # the last error it reported

    def is_alive(self) -> bool:
        return bool(self.process.is_alive())

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    def send(self, command: TrainerCommand) -> None:
        try:
            with self._sending:
                self._commands.send(command)
        except (OSError, ValueError) as exc:  # the child is gone; the supervisor's poll will notice
            log.debug("cannot send %s to the trainer: %s", type(command).__name__, exc)

    def events(self, limit: int = 1000) -> Iterator[TrainerEvent]:
        """The messages it has sent so far (at most `limit`), without waiting."""
        for _ in range(limit):
            try:
                event: TrainerEvent = self._events.get_nowait()
            except Exception:  # Empty, or a message cut short by a killed child
                return
            yield event

    def wait_exit(self, timeout: float, while_waiting: Callable[[], None]) -> None:
        """After Stop: wait for it to exit; terminate, then kill, if it hangs."""
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
            with self._sending:
                self._commands.close()
        except OSError:
            pass
        self._events.close()
        self._events.join_thread()
        self.process.join(0)
