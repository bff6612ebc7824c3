"""Starts, watches, restarts and stops the trainer process: the daemon's side of the trainer.

The daemon starts the trainer as a child (spawn, process.py), hands it shared memory for the
weights and restarts it from its last checkpoint if it dies: at once after a long stable run,
else after 0.5, 1, 2, ... s. Commands and events cross the process boundary as messages.py's
typed messages, dispatched here with `match`. The weights themselves are reached through
`weights` (a WeightsPort, weights_port.py), which this supervisor connects to each trainer
process once it is ready and disconnects when it dies or stops.

Owner: the lifecycle calls (start, wait_ready, begin_training, poll, stop) take turns under
one lock; the daemon makes them from its main loop or a to_thread worker. Any thread may call
statistics(), lr_clock() and progress_counter(): they read a published frozen TrainerStats
(trainer_stats.py, rebuilt on each change) and lock-free shared-memory counters. Other threads reach the
weights only through `weights`.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import threading
import time
from dataclasses import replace

from peerfed.train.merging import MergeRule
from peerfed.train.messages import (
    Attach,
    CheckpointSaved,
    Failed,
    Hello,
    Ready,
    ReadyInfo,
    Start,
    Stats,
    Stop,
    Stopped,
    TrainerEvent,
)
from peerfed.train.process import TrainerProcess
from peerfed.train.shm import ControlBlock, remove_stale_segments
from peerfed.train.tasks import TrainSettings
from peerfed.train.trainer_stats import TrainerStats
from peerfed.train.weights_port import WeightsPort

log = logging.getLogger("peerfed.trainer")

STABLE_AFTER_S = 30.0  # a trainer that ran this long before dying is restarted at once
RESTART_BACKOFF_S = 0.5  # otherwise wait 0.5, 1, 2, ... s
MAX_RESTART_BACKOFF_S = 30.0


class TrainerError(RuntimeError):
    """The trainer could not start (bad task, bad device, ...); the message says why."""


class RestartBackoff:
    """When to start a trainer again after it died, and how many times we did."""

    def __init__(self) -> None:
        self.restarts = 0
        self._quick_failures = 0
        self._due_at: float | None = None

    def after_death(self, now: float, lived: float, was_ready: bool) -> float:
        """Schedule the restart; returns its delay."""
        if was_ready and lived >= STABLE_AFTER_S:
            self._quick_failures = 0
            delay = 0.0
        else:
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2**self._quick_failures)
            self._quick_failures += 1
        self._due_at = now + delay
        return delay

    def take_due(self, now: float) -> bool:
        """True (once) when a scheduled restart is due; counts it."""
        if self._due_at is None or now < self._due_at:
            return False
        self._due_at = None
        self.restarts += 1
        return True


class TrainerSupervisor:
    """The daemon's handle on its trainer. Blocking calls (wait_ready, stop) belong in a
    worker thread (asyncio.to_thread); the others return at once."""

    def __init__(self, settings: TrainSettings, *, request_timeout: float = 60.0, merge_rule: MergeRule | None = None,
                 _force_mirror: bool = False) -> None:
        self._settings = settings
        self._force_mirror = _force_mirror  # tests: exercise the GPU code path on CPU
        self._lock = threading.Lock()  # lifecycle calls take turns; taken before the port's
        self._control: ControlBlock | None = None
        self._process: TrainerProcess | None = None
        self._backoff = RestartBackoff()
        self._began = False
        self._stopped = False
        self._fatal: str | None = None  # why it will not be restarted
        self._published = TrainerStats()  # replaced whole under the lock; read without it
        self._progress_seen = (-1, time.monotonic())  # (progress counter, when it last changed)
        self.weights = WeightsPort(self.lr_clock, request_timeout=request_timeout, merge_rule=merge_rule)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._lock:
            if self._process is not None or self._stopped or self._control is not None:
                raise RuntimeError("a TrainerSupervisor starts once")
            stale = remove_stale_segments()
            if stale:
                log.info("removed %d shared-memory segments left by a killed daemon", len(stale))
            self._control = ControlBlock.create()
            self._spawn()
            # Registered after multiprocessing's own hook, so it runs first: the child is
            # stopped before multiprocessing joins it.
            atexit.register(self._stop_at_exit)

    def wait_ready(self, timeout: float = 60.0) -> ReadyInfo:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._poll()
                if self._fatal is not None:
                    if self._process is not None:  # it is on its way out: reap it for a clean state
                        self._process.join(5.0)
                    self._poll()
                    raise TrainerError(self._fatal)
                info = self.weights.info
                if self._process is not None and self._process.ready and info is not None:
                    return info
                if self._stopped:
                    raise TrainerError("trainer was stopped")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"trainer not ready after {timeout:.0f} s")
            time.sleep(0.02)

    def begin_training(self) -> None:
        """Let the trainer take steps (after an optional load_weights for state sync)."""
        with self._lock:
            self._began = True
            if self._process is not None and self._process.ready:
                self._process.send(Start())
            self._publish()

    def poll(self) -> None:
        """Drain the trainer's events; restart it (from its checkpoint) if it died."""
        if self._stopped:
            return  # stop() may hold the lock for seconds while the trainer exits
        with self._lock:
            self._poll()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask for a final checkpoint and wait for it; terminate, then kill, if the trainer hangs."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            atexit.unregister(self._stop_at_exit)
            process, self._process = self._process, None
            self.weights.disconnect("trainer stopped")  # waits for an operation in flight
            if process is not None:
                if process.is_alive():
                    process.send(Stop())
                process.wait_exit(timeout, lambda: self._drain(process))
                self._drain(process)
                process.close()
            self.weights.close()
            self._publish()  # the last counters, before their block goes
            control, self._control = self._control, None
            if control is not None:
                control.close()

    def _stop_at_exit(self) -> None:
        self.stop(timeout=5.0)

    def __enter__(self) -> TrainerSupervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ any thread

    def statistics(self) -> TrainerStats:
        stats = self._with_counters(self._published)
        process = self._process
        alive = process is not None and process.is_alive()
        return stats if alive == stats.process.alive else replace(stats, process=replace(stats.process, alive=alive))

    def lr_clock(self) -> tuple[int, float]:
        """Our lr schedule's clock (steps live, seconds as of the last stats, a second or two
        old): a state sync donor sends it with its weights."""
        clock = self.statistics().lr_clock
        return clock.schedule_step, clock.seconds_trained

    def progress_counter(self) -> int:
        """+1 per training step, never reset (across restarts): the watchdog's heartbeat."""
        control = self._control
        counters = control.counters() if control is not None else None
        return counters[0] if counters is not None else 0

    # ------------------------------------------------------------ under the lock

    def _poll(self) -> None:
        if self._stopped:
            return
        process = self._process
        if process is not None:
            alive = process.is_alive()  # before draining: keeps its last words
            self._drain(process)
            if not alive:
                self._on_death(process)
        if self._process is None and self._fatal is None and self._backoff.take_due(time.monotonic()):
            log.info("restarting the trainer (restart %d)", self._backoff.restarts)
            self._spawn()
        self._publish()

    def _spawn(self) -> None:
        assert self._control is not None
        self.weights.disconnect("trainer not ready")
        self._process = TrainerProcess(
            mp.get_context("spawn"), self._backoff.restarts + 1, self._settings, self._force_mirror,
            self._control.name,
        )

    def _drain(self, process: TrainerProcess) -> None:
        for event in process.events():
            self._on_event(process, event)

    def _on_event(self, process: TrainerProcess, event: TrainerEvent) -> None:
        match event:
            case Hello():
                self._on_hello(process, event)
            case Ready(info):
                if self._stopped:
                    return  # too late: stop() has disconnected the port for good
                process.ready = True
                self.weights.connect(process.link, info)
                log.info("trainer ready: %s on %s (%s mode), %d local samples, step %d",
                         self._settings.task, info.device, info.mode, info.num_samples, info.resumed_step)
                self._publish(device=info.device, mode=info.mode, num_samples=info.num_samples)
                if self._began:
                    process.send(Start())
            case Stats():
                self._published = self._published.with_report(event)
                self._publish()
            case CheckpointSaved(checkpoint=saved) | Stopped(checkpoint=saved):
                if saved is not None:
                    self._publish(last_checkpoint=saved)
            case Failed(error):
                process.error = error
                self._publish(last_error=error)
                if self.weights.info is None:  # never got going: a restart would fail the same way
                    self._fatal = error
                    log.debug("trainer failed before it was ready: %s", error)  # wait_ready raises it
                else:
                    log.error("trainer: %s", error)

    def _on_hello(self, process: TrainerProcess, hello: Hello) -> None:
        if self._stopped:
            return  # stop() already asked it to go
        info = self.weights.info
        if info is not None and hello.fingerprint != info.fingerprint:
            self._fatal = "the restarted trainer has a different model (fingerprint changed)"
            process.send(Stop())
            return
        assert self._control is not None
        process.send(Attach(*self.weights.attach(self._control, hello.numel, hello.mirror)))

    def _on_death(self, process: TrainerProcess) -> None:
        code = process.exitcode
        lived = time.monotonic() - process.started_at
        was_ready = process.ready
        self.weights.disconnect("trainer not running")
        process.close()
        self._process = None
        if self._fatal is None and self.weights.info is None:  # never got going: it would fail again
            self._fatal = process.error or f"trainer exited with code {code} before it was ready"
        if self._fatal is not None:
            if self.weights.info is not None:  # else wait_ready raises it: said once, by its caller
                log.error("trainer exited (code %s) and will not be restarted: %s", code, self._fatal)
            return
        self._publish(last_error=f"trainer exited with code {code}" + (f": {process.error}" if process.error else ""))
        delay = self._backoff.after_death(time.monotonic(), lived, was_ready)
        log.warning("trainer exited with code %s after %.1f s; restarting in %.1f s", code, lived, delay)

    def _publish(self, **process_changes: object) -> None:
        """Rebuild the published snapshot from our state, the counters and `process_changes`
        (fields of its ProcessState)."""
        progress = self.progress_counter()
        if progress != self._progress_seen[0]:
            self._progress_seen = (progress, time.monotonic())
        process = self._process
        ready = process is not None and process.ready
        stats = self._published
        state = replace(stats.process, alive=process is not None and process.is_alive(), ready=ready,
                        training=self._began and ready, restarts=self._backoff.restarts, **process_changes)
        self._published = self._with_counters(replace(stats, process=state))

    def _with_counters(self, stats: TrainerStats) -> TrainerStats:
        """`stats` with the live step counters (shared memory, any thread)."""
        progress_seen, seen_at = self._progress_seen
        control = self._control
        counters = control.counters() if control is not None else None
        p, clock = stats.progress, stats.lr_clock
        if counters is None:
            return replace(stats, progress=replace(p, heartbeat_age_s=time.monotonic() - seen_at))
        heartbeat, step, samples = counters
        age = 0.0 if heartbeat != progress_seen else time.monotonic() - seen_at
        # the lr clock's offset from our own step only changes at a state sync or a resume
        return replace(stats, progress=replace(p, step=step, samples=samples, heartbeat=heartbeat, heartbeat_age_s=age),
                       lr_clock=replace(clock, schedule_step=step + clock.schedule_step - p.step))
