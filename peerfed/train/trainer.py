"""The trainer process and the daemon's handle on it.

The daemon starts the trainer as a child (spawn), hands it shared memory for the weights and
restarts it from its last checkpoint if it dies. The child trains without ever waiting for the
network: the daemon snapshots and merges the shared weights under one lock (direct mode, CPU),
or the child serves those requests between steps (mirror mode, GPU/MPS); see shared.py.

child -> daemon, a multiprocessing Queue (put never blocks the trainer):
  ("hello", info) ("ready", ReadyInfo fields) ("stats", dict) ("checkpoint", {path, step})
  ("error", text) ("stopped", {checkpoint})
daemon -> child, a Pipe: ("attach", weights_name, delta_name | None) ("clock", schedule_step, seconds)
  ("start",) ("checkpoint",) ("stop",)
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from peerfed.train.process import TrainerProcess
from peerfed.train.shared import (
    PROGRESS,
    SAMPLES,
    STEP,
    ControlBlock,
    SharedWeights,
    TrainerLink,
    TrainerUnavailable,
    remove_stale_segments,
)
from peerfed.train.tasks import TrainSettings

__all__ = ["ReadyInfo", "TrainerError", "TrainerHandle", "TrainerUnavailable"]

log = logging.getLogger("peerfed.trainer")

STABLE_AFTER_S = 30.0  # a trainer that ran this long before dying is restarted at once
RESTART_BACKOFF_S = 0.5  # otherwise wait 0.5, 1, 2, ... s
MAX_RESTART_BACKOFF_S = 30.0


class TrainerError(RuntimeError):
    """The trainer could not start (bad task, bad device, ...); the message says why."""


@dataclass(frozen=True)
class ReadyInfo:
    fingerprint: str
    nbytes: int
    numel: int
    num_samples: int
    device: str
    mode: str  # "direct" | "mirror" | "copy"
    resumed_step: int
    resumed_samples: int
    resumed_seconds: float  # training time before this start (the clock of a time-based lr schedule)
    resumed_from: str | None  # checkpoint path


class TrainerHandle:
    """The daemon's side. Methods block briefly; call them from asyncio via asyncio.to_thread."""

    def __init__(self, settings: TrainSettings, *, request_timeout: float = 60.0, _force_mirror: bool = False) -> None:
        self._settings = settings
        self._request_timeout = request_timeout
        self._force_mirror = _force_mirror  # tests: exercise the GPU code path on CPU
        self._mp = mp.get_context("spawn")
        self._state = threading.RLock()  # handle fields and the command pipe
        self._ops = threading.Lock()  # one weight operation at a time; taken before _state
        self._control: ControlBlock | None = None
        self._shared: SharedWeights | None = None
        self._gen: TrainerProcess | None = None
        self._generations = 0
        self._info: ReadyInfo | None = None
        self._began = False
        self._stopped = False
        self._fatal: str | None = None
        self._last_error: str | None = None
        self._restarts = 0
        self._quick_failures = 0
        self._restart_at: float | None = None
        self._stats: dict[str, Any] = {}
        self._last_checkpoint: dict[str, Any] | None = None
        self._progress_seen = (-1, time.monotonic())
        self._atexit: Any = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        with self._ops, self._state:
            if self._gen is not None or self._stopped or self._control is not None:
                raise RuntimeError("a TrainerHandle starts once")
            stale = remove_stale_segments()
            if stale:
                log.info("removed %d shared-memory segments left by a killed daemon", len(stale))
            self._control = ControlBlock.create()
            self._spawn()
            ref = weakref.ref(self)

            def stop_at_exit() -> None:
                handle = ref()
                if handle is not None:
                    handle.stop(timeout=5.0)

            # Registered after multiprocessing's own hook, so it runs first: the child is
            # stopped before multiprocessing joins it.
            self._atexit = stop_at_exit
            atexit.register(stop_at_exit)

    def wait_ready(self, timeout: float = 60.0) -> ReadyInfo:
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            with self._state:
                if self._fatal is not None:
                    gen = self._gen
                    if gen is not None:  # it is on its way out: reap it for a clean state
                        gen.join(5.0)
                    self.poll()
                    raise TrainerError(self._fatal)
                if self._gen is not None and self._gen.ready and self._info is not None:
                    return self._info
                if self._stopped:
                    raise TrainerError("trainer was stopped")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"trainer not ready after {timeout:.0f} s")
            time.sleep(0.02)

    def begin_training(self) -> None:
        """Let the trainer take steps (after an optional load_weights for state sync)."""
        with self._state:
            self._began = True
            if self._gen is not None and self._gen.ready:
                self._gen.send(("start",))

    def lr_clock(self) -> tuple[int, float]:
        """Our lr schedule's clock (steps live, seconds as of the last stats, a second or two
        old): a state sync donor sends it with its weights."""
        stats = self.statistics()
        return int(stats["schedule_step"]), float(stats["seconds_trained"])

    def request_checkpoint(self) -> None:
        with self._state:
            if self._gen is not None and self._gen.ready:
                self._gen.send(("checkpoint",))

    def stop(self, timeout: float = 10.0) -> None:
        """Ask for a final checkpoint and wait for it; terminate, then kill, if the trainer hangs."""
        with self._ops, self._state:
            if self._stopped:
                return
            self._stopped = True
            gen, self._gen = self._gen, None
        if self._atexit is not None:
            atexit.unregister(self._atexit)
        if gen is not None:
            if gen.is_alive():
                gen.send(("stop",))
            gen.wait_exit(timeout, lambda: self._drain(gen))
            self._drain(gen)
            gen.close()
        with self._state:
            if self._shared is not None:
                self._shared.close()
            if self._control is not None:
                self._control.close()
            self._shared = self._control = None

    def __enter__(self) -> TrainerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ watching

    def poll(self) -> None:
        """Drain the trainer's messages; restart it (from its checkpoint) if it died."""
        with self._state:
            if self._stopped:
                return
            gen = self._gen
            if gen is not None:
                alive = gen.is_alive()  # before draining: keeps its last words
                self._drain(gen)
                if not alive:
                    self._on_death(gen)
            self._observe_progress()
            due = self._gen is None and self._restart_at is not None and time.monotonic() >= self._restart_at
        if due:
            with self._ops, self._state:
                if self._gen is None and not self._stopped and self._fatal is None:
                    self._restarts += 1
                    self._restart_at = None
                    log.info("restarting the trainer (restart %d)", self._restarts)
                    self._spawn()

    def progress_counter(self) -> int:
        """+1 per training step, never reset (across restarts): the watchdog's heartbeat."""
        control = self._control
        return control[PROGRESS] if control is not None else 0

    def statistics(self) -> dict[str, Any]:
        with self._state:
            self._observe_progress()
            control, gen, info, stats = self._control, self._gen, self._info, self._stats
            step = control[STEP] if control is not None else stats.get("step", 0)
            # the lr clock's offset from our own step only changes at a state sync or a resume
            clock_offset = stats.get("schedule_step", 0) - stats.get("step", 0)
            return {
                "step": step,
                "samples": control[SAMPLES] if control is not None else stats.get("samples", 0),
                "metrics": dict(stats.get("metrics", {})),
                "loss": stats.get("loss"),
                "steps_per_s": stats.get("steps_per_s", 0.0),
                "evaluated_at": stats.get("evaluated_at"),  # unix time of the metrics' evaluation
                "evaluated_step": stats.get("evaluated_step"),
                "lr": stats.get("lr"),
                # the lr schedule's clock (steps, seconds); a state sync hands it to a newcomer
                "schedule_step": step + clock_offset,
                "seconds_trained": stats.get("seconds_trained", 0.0),
                "device": info.device if info else None,
                "mode": info.mode if info else None,
                "num_samples": info.num_samples if info else None,
                "alive": gen is not None and gen.is_alive(),
                "ready": gen is not None and gen.ready,
                "training": self._began and gen is not None and gen.ready,
                "restarts": self._restarts,
                "progress": self.progress_counter(),
                "last_progress_age_s": time.monotonic() - self._progress_seen[1],
                "last_checkpoint": dict(self._last_checkpoint) if self._last_checkpoint else None,
                "last_error": self._last_error,
            }

    @property
    def ready_info(self) -> ReadyInfo:
        if self._info is None:
            raise TrainerUnavailable("trainer not ready yet")
        return self._info

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

    # ------------------------------------------------------------ weights

    def begin_snapshot(self) -> None:
        """Before snapshot_range: make the shared copy current (mirror mode; else nothing)."""
        with self._ops:
            shared, link = self._ready()
            shared.begin_snapshot(link)

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None:
        """Copy elements [start, stop) of the weights into `dst`, consistent between two steps."""
        with self._ops:
            shared, link = self._ready()
            shared.snapshot_range(dst, start, stop, link)

    def snapshot_into(self, dst: torch.Tensor) -> None:
        """Copy the current weights into `dst` (flat float32), consistent between two steps."""
        with self._ops:
            shared, link = self._ready()
            shared.snapshot_into(dst, link)

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None:
        """weights += alpha * (received - sent): steps taken since `sent` was taken are kept."""
        if not -1e3 < alpha < 1e3:
            raise ValueError(f"bad mixing weight {alpha!r}")
        with self._ops:
            shared, link = self._ready()
            shared.merge(received, sent, alpha, link)

    def load_weights(self, src: torch.Tensor, lr_clock: tuple[int, float] | None = None) -> None:
        """Replace the weights entirely (state sync from a peer, before the first step) and take
        over the donor's lr clock (steps, seconds): its schedule goes on instead of ours from 0."""
        with self._ops:
            shared, link = self._ready()
            shared.load(src, link)
            if lr_clock is not None:
                with self._state:
                    if self._gen is not None:
                        self._gen.send(("clock", int(lr_clock[0]), float(lr_clock[1])))

    # ------------------------------------------------------------ internals

    def _ready(self) -> tuple[SharedWeights, TrainerLink]:
        with self._state:
            gen, shared = self._gen, self._shared
            if gen is None or not gen.ready or shared is None:
                raise TrainerUnavailable("trainer not running" if gen is None else "trainer not ready")
            # dead but not yet polled: its buffer is no longer trained, and its lock may be held forever
            if not gen.is_alive():
                raise TrainerUnavailable("trainer not running")
            return shared, gen.link

    def _spawn(self) -> None:
        """Start one trainer process. Caller holds _ops and _state."""
        assert self._control is not None
        if self._shared is not None:
            self._shared.reset_requests()
        self._generations += 1
        self._gen = TrainerProcess(
            self._mp, self._generations, self._settings, self._force_mirror, self._control.name,
            is_current=lambda process: process is self._gen,
        )

    def _drain(self, gen: TrainerProcess) -> None:
        for kind, body in gen.events():
            self._on_event(gen, kind, body)

    def _on_event(self, gen: TrainerProcess, kind: str, body: Any) -> None:
        if kind == "hello":
            self._on_hello(gen, body)
        elif kind == "ready":
            self._info = ReadyInfo(**body)
            gen.ready = True
            log.info(
                "trainer ready: %s on %s (%s mode), %d local samples, step %d",
                self._settings.task, self._info.device, self._info.mode, self._info.num_samples,
                self._info.resumed_step,
            )
            if self._began:
                gen.send(("start",))
        elif kind == "stats":
            self._stats = body
        elif kind in ("checkpoint", "stopped"):
            checkpoint = body if kind == "checkpoint" else body.get("checkpoint")
            if checkpoint:
                self._last_checkpoint = checkpoint
        elif kind == "error":
            self._last_error = gen.error = str(body)
            if self._info is None:  # never got going: a restart would fail the same way
                self._fatal = str(body)
            log.error("trainer: %s", body)

    def _on_hello(self, gen: TrainerProcess, hello: dict[str, Any]) -> None:
        numel, mirror = int(hello["numel"]), bool(hello["mirror"])
        if self._stopped:
            return  # stop() already asked it to go
        if self._info is not None and hello["fingerprint"] != self._info.fingerprint:
            self._fatal = "the restarted trainer has a different model (fingerprint changed)"
            gen.send(("stop",))
            return
        if self._shared is None or self._shared.numel != numel or self._shared.mirror != mirror:
            if self._shared is not None:
                self._shared.close()
            assert self._control is not None
            self._shared = SharedWeights(self._control, numel, mirror=mirror, request_timeout=self._request_timeout)
        gen.send(("attach", *self._shared.names))

    def _on_death(self, gen: TrainerProcess) -> None:
        code = gen.exitcode
        lived = time.monotonic() - gen.started_at
        was_ready = gen.ready
        gen.close()
        self._gen = None
        if self._fatal is None and self._info is None:  # never got going: it would fail again
            self._fatal = gen.error or f"trainer exited with code {code} before it was ready"
        if self._fatal is not None:
            log.error("trainer exited (code %s) and will not be restarted: %s", code, self._fatal)
            return
        self._last_error = f"trainer exited with code {code}" + (f": {gen.error}" if gen.error else "")
        if was_ready and lived >= STABLE_AFTER_S:
            self._quick_failures = 0
            delay = 0.0
        else:
            delay = min(MAX_RESTART_BACKOFF_S, RESTART_BACKOFF_S * 2**self._quick_failures)
            self._quick_failures += 1
        log.warning("trainer exited with code %s after %.1f s; restarting in %.1f s", code, lived, delay)
        self._restart_at = time.monotonic() + delay

    def _observe_progress(self) -> None:
        value = self.progress_counter()
        if value != self._progress_seen[0]:
            self._progress_seen = (value, time.monotonic())
