"""The trainer process and the daemon's handle on it.

The daemon starts the trainer as a child (spawn), hands it shared memory for the weights and
restarts it from its last checkpoint if it dies. The child trains without ever waiting for the
network: the daemon snapshots and merges the shared weights under one lock (direct mode, CPU),
or the child serves those requests between steps (mirror mode, GPU/MPS); see shared.py.

child -> daemon, a multiprocessing Queue (put never blocks the trainer):
  ("hello", info) ("ready", ReadyInfo fields) ("stats", dict) ("checkpoint", {path, step})
  ("error", text) ("stopped", {checkpoint})
daemon -> child, a Pipe: ("attach", weights_name, delta_name | None) ("start",) ("checkpoint",) ("stop",)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from peerfed.averaging import FlatLayout
from peerfed.train.checkpoint import load_newest_valid, save_checkpoint
from peerfed.train.shared import (
    DONE,
    PROGRESS,
    SAMPLES,
    STEP,
    ControlBlock,
    SharedTensor,
    SharedWeights,
    TrainerLink,
    TrainerUnavailable,
    WeightStore,
    remove_stale_segments,
)
from peerfed.train.tasks import NodeContext, TaskLoadError, TrainSettings, load_task_factory

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
    resumed_from: str | None  # checkpoint path


@dataclass
class _Generation:
    """One trainer process and its plumbing."""

    number: int
    process: Any  # multiprocessing.Process (spawn context)
    commands: Any  # Connection, daemon -> child
    events: Any  # multiprocessing.Queue, child -> daemon
    link: TrainerLink
    started_at: float
    ready: bool = False
    error: str | None = None  # the last error it reported


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
        self._gen: _Generation | None = None
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
                        gen.process.join(5.0)
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
                self._send(self._gen, ("start",))

    def request_checkpoint(self) -> None:
        with self._state:
            if self._gen is not None and self._gen.ready:
                self._send(self._gen, ("checkpoint",))

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
            if gen.process.is_alive():
                self._send(gen, ("stop",))
                deadline = time.monotonic() + timeout
                while gen.process.is_alive() and time.monotonic() < deadline:
                    self._drain(gen)
                    gen.process.join(0.05)
            if gen.process.is_alive():
                log.warning("trainer did not stop within %.0f s; terminating it", timeout)
                gen.process.terminate()
                gen.process.join(2.0)
            if gen.process.is_alive():
                gen.process.kill()
                gen.process.join(2.0)
            self._drain(gen)
            self._close_generation(gen)
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
                alive = gen.process.is_alive()  # before draining: keeps its last words
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
            return {
                "step": control[STEP] if control is not None else stats.get("step", 0),
                "samples": control[SAMPLES] if control is not None else stats.get("samples", 0),
                "metrics": dict(stats.get("metrics", {})),
                "loss": stats.get("loss"),
                "steps_per_s": stats.get("steps_per_s", 0.0),
                "evaluated_at": stats.get("evaluated_at"),  # unix time of the metrics' evaluation
                "evaluated_step": stats.get("evaluated_step"),
                "lr": stats.get("lr"),
                "device": info.device if info else None,
                "mode": info.mode if info else None,
                "num_samples": info.num_samples if info else None,
                "alive": gen is not None and gen.process.is_alive(),
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

    def load_weights(self, src: torch.Tensor) -> None:
        """Replace the weights entirely (state sync from a peer)."""
        with self._ops:
            shared, link = self._ready()
            shared.load(src, link)

    # ------------------------------------------------------------ internals

    def _ready(self) -> tuple[SharedWeights, TrainerLink]:
        with self._state:
            gen, shared = self._gen, self._shared
            if gen is None or not gen.ready or shared is None:
                raise TrainerUnavailable("trainer not running" if gen is None else "trainer not ready")
            return shared, gen.link

    def _spawn(self) -> None:
        """Start one trainer process. Caller holds _ops and _state."""
        assert self._control is not None
        if self._shared is not None:
            self._shared.reset_requests()
        self._generations += 1
        reader, writer = self._mp.Pipe(duplex=False)
        events = self._mp.Queue()
        lock = self._mp.Lock()
        # Not daemonic: a task may start DataLoader workers. stop() (or the atexit hook) ends it,
        # and it exits by itself when it sees that its parent is gone.
        process = self._mp.Process(
            target=run_child,
            name=f"peerfed-trainer-{self._generations}",
            args=(self._settings, self._force_mirror, reader, events, self._control.name, lock, os.getpid()),
        )
        process.start()
        reader.close()
        gen_box: list[_Generation] = []
        link = TrainerLink(lock, lambda: bool(gen_box) and gen_box[0] is self._gen and process.is_alive())
        gen = _Generation(self._generations, process, writer, events, link, time.monotonic())
        gen_box.append(gen)
        self._gen = gen

    def _send(self, gen: _Generation, message: tuple[Any, ...]) -> None:
        try:
            gen.commands.send(message)
        except (OSError, ValueError) as exc:  # the child is gone; poll() will notice
            log.debug("cannot send %s to the trainer: %s", message[0], exc)

    def _drain(self, gen: _Generation, limit: int = 1000) -> None:
        for _ in range(limit):
            try:
                kind, body = gen.events.get_nowait()
            except Exception:  # Empty, or a message cut short by a killed child
                return
            self._on_event(gen, kind, body)

    def _on_event(self, gen: _Generation, kind: str, body: Any) -> None:
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
                self._send(gen, ("start",))
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

    def _on_hello(self, gen: _Generation, hello: dict[str, Any]) -> None:
        numel, mirror = int(hello["numel"]), bool(hello["mirror"])
        if self._stopped:
            return  # stop() already asked it to go
        if self._info is not None and hello["fingerprint"] != self._info.fingerprint:
            self._fatal = "the restarted trainer has a different model (fingerprint changed)"
            self._send(gen, ("stop",))
            return
        if self._shared is None or self._shared.numel != numel or self._shared.mirror != mirror:
            if self._shared is not None:
                self._shared.close()
            assert self._control is not None
            self._shared = SharedWeights(self._control, numel, mirror=mirror, request_timeout=self._request_timeout)
        self._send(gen, ("attach", *self._shared.names))

    def _on_death(self, gen: _Generation) -> None:
        code = gen.process.exitcode
        lived = time.monotonic() - gen.started_at
        was_ready = gen.ready
        self._close_generation(gen)
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

    def _close_generation(self, gen: _Generation) -> None:
        gen.ready = False
        try:
            gen.commands.close()
        except OSError:
            pass
        gen.events.close()
        gen.events.join_thread()
        gen.process.join(0)  # reap

    def _observe_progress(self) -> None:
        value = self.progress_counter()
        if value != self._progress_seen[0]:
            self._progress_seen = (value, time.monotonic())


# ==================================================================== the trainer process
# Everything below runs in the child. It only talks to the daemon through the queue, the pipe,
# the control block and the lock.

STATS_INTERVAL_S = 1.0
HOUSEKEEPING_INTERVAL_S = 0.05
PARENT_CHECK_INTERVAL_S = 1.0
LOSS_EMA_DECAY = 0.98


class _ParentGone(Exception):
    pass


class _Stopped(Exception):
    """Told to stop before there was anything to checkpoint."""


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


def pick_device(spec: str) -> torch.device:
    """"auto": cuda, then mps, then cpu; otherwise the named device, which must exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {spec!r}: CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {spec!r}: MPS is not available")
    return device


def run_child(
    settings: TrainSettings,
    force_mirror: bool,
    commands: Any,
    events: Any,
    control_name: str,
    lock: Any,
    parent_pid: int,
) -> None:
    """Entry point of the trainer process."""
    # First torch op of the process: set later, it does not reach threads that already ran
    # (design.md section 5).
    torch.set_num_threads(settings.threads or default_threads())
    # Ctrl+C and a closed terminal (or `systemctl kill -s HUP`) hit the whole group; the daemon decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="peerfed-trainer: %(levelname)s %(name)s: %(message)s")
    child = _Child(settings, force_mirror, commands, events, control_name, lock, parent_pid)
    signal.signal(signal.SIGTERM, child.on_sigterm)
    code = 0
    try:
        child.run()
    except _ParentGone:
        log.warning("the daemon is gone; writing a last checkpoint and exiting")
        child.last_checkpoint()
    except _Stopped:
        events.put(("stopped", {"checkpoint": None}))
    except BaseException as exc:
        log.error("trainer failed: %s", exc, exc_info=not isinstance(exc, TaskLoadError))
        events.put(("error", f"{type(exc).__name__}: {exc}"))
        code = 1
    child.close()
    events.close()
    events.join_thread()  # deliver the last messages before exiting
    if code:
        raise SystemExit(code)


class _Child:
    def __init__(
        self, settings: TrainSettings, force_mirror: bool, commands: Any, events: Any,
        control_name: str, lock: Any, parent_pid: int,
    ) -> None:
        self.s = settings
        self.force_mirror = force_mirror
        self.commands = commands
        self.events = events
        self.lock = lock
        self.parent_pid = parent_pid
        self.control = ControlBlock.attach(control_name)
        self.started = False
        self.stop_requested = False
        self.store: WeightStore | None = None
        self.buffers: list[SharedTensor] = []
        self.step = self.samples = 0
        self.checkpoint_step = -1
        self.metrics: dict[str, float] = {}
        self.evaluated_at: float | None = None  # unix time and step of the last evaluation
        self.evaluated_step = 0
        self.loss_ema: torch.Tensor | None = None
        self.next_parent_check = 0.0

    def close(self) -> None:
        for block in self.buffers:
            block.close()
        self.control.close()

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True  # e.g. systemd stopping the whole cgroup: checkpoint first

    def run(self) -> None:
        s = self.s
        self.device = pick_device(s.device)
        self.task = load_task_factory(s.task)(s, NodeContext(s.node_index, s.node_count, s.seed))
        self.model = self.task.model.to(self.device)
        self.model.train()
        self.optimizer = self.task.make_optimizer(self.model.parameters())
        layout = FlatLayout.from_model(self.model)
        if layout.numel == 0:
            raise ValueError(f"task {s.task!r}: the model has no floating-point weights to average")
        self.fingerprint = layout.fingerprint()
        resumed_from = self._resume()
        mirror = self.force_mirror or self.device.type != "cpu" or not layout.all_float32
        self.events.put(("hello", {"fingerprint": self.fingerprint, "numel": layout.numel, "mirror": mirror}))
        weights_name, delta_name = self._wait_attach()
        self.buffers = [SharedTensor.attach(weights_name, layout.numel)]
        delta = None
        if delta_name is not None:
            self.buffers.append(SharedTensor.attach(delta_name, layout.numel))
            delta = self.buffers[1].tensor
        with self._locked():
            shared = self.buffers[0].tensor
            assert shared is not None
            self.store = WeightStore(self.model, layout, shared, delta, mirror=mirror, device=self.device)
        self.control[STEP], self.control[SAMPLES] = self.step, self.samples
        self.events.put(("ready", {
            "fingerprint": self.fingerprint, "nbytes": layout.nbytes, "numel": layout.numel,
            "num_samples": int(self.task.num_samples), "device": str(self.device), "mode": self.store.mode,
            "resumed_step": self.step, "resumed_samples": self.samples, "resumed_from": resumed_from,
        }))
        self._evaluate()
        now = time.monotonic()
        self.next_eval = now + s.eval_interval
        self.next_checkpoint = now + s.checkpoint_interval
        self.last_stats = (now, self.step)
        self._publish_stats(now)
        while not self.started:  # wait for "start": the daemon may load a peer's weights first
            self.commands.poll(0.005)
            if self._housekeeping(time.monotonic()):
                return
        self._train()

    def _train(self) -> None:
        model, optimizer, loss_fn = self.model, self.optimizer, self.task.loss_fn
        direct = self.store is not None and self.store.mode == "direct"
        schedule = self.task.lr_schedule
        base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        began = now = time.monotonic()
        next_housekeeping = 0.0
        for x, y in self.task.train_batches:
            if schedule is not None:  # per step: a few microseconds next to a step's milliseconds
                factor = schedule(self.step, now - began)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if direct:
                with self._locked():  # the only write to the shared weights
                    optimizer.step()
            else:
                optimizer.step()
                self._serve()
            self.step += 1
            self.samples += int(y.shape[0])
            self.control[STEP], self.control[SAMPLES] = self.step, self.samples
            self.control[PROGRESS] = self.control[PROGRESS] + 1
            detached = loss.detach()
            if self.loss_ema is None:
                self.loss_ema = detached.clone()
            else:  # stays on the device: no sync per step
                self.loss_ema.mul_(LOSS_EMA_DECAY).add_(detached, alpha=1 - LOSS_EMA_DECAY)
            now = time.monotonic()
            if now >= next_housekeeping:
                if self._housekeeping(now):
                    return
                next_housekeeping = now + HOUSEKEEPING_INTERVAL_S

    def _housekeeping(self, now: float) -> bool:
        """Commands, requests, timers. True when the trainer should exit now."""
        self._check_parent(now)
        self._serve()
        try:
            while self.commands.poll(0):
                command = self.commands.recv()[0]
                if command == "start":
                    self.started = True
                elif command == "checkpoint":
                    self._checkpoint()
                elif command == "stop":
                    self.stop_requested = True
        except (EOFError, OSError):
            raise _ParentGone() from None
        if self.stop_requested:
            info = self._checkpoint()
            self.events.put(("stopped", {"checkpoint": info}))
            return True
        if now >= self.next_eval:
            self._evaluate()
            self.next_eval = now + self.s.eval_interval
        if now >= self.next_checkpoint:
            if self.step != self.checkpoint_step:
                self._checkpoint()
            self.next_checkpoint = now + self.s.checkpoint_interval
        if now - self.last_stats[0] >= STATS_INTERVAL_S:
            self._publish_stats(now)
        return False

    def _serve(self) -> None:
        if self.store is None or self.store.mode == "direct" or self.control.pending_request() is None:
            return
        with self._locked():
            pending = self.control.pending_request()
            if pending is not None:
                seq, kind = pending
                self.store.serve(kind)
                self.control[DONE] = seq

    def _evaluate(self) -> None:
        self.metrics = {k: float(v) for k, v in self.task.evaluate(self.model).items()}
        self.evaluated_at, self.evaluated_step = time.time(), self.step

    def _publish_stats(self, now: float) -> None:
        then, step_then = self.last_stats
        self.last_stats = (now, self.step)
        self.events.put(("stats", {
            "step": self.step, "samples": self.samples, "metrics": dict(self.metrics),
            "loss": float(self.loss_ema) if self.loss_ema is not None else None,
            "steps_per_s": (self.step - step_then) / (now - then) if now > then else 0.0,
            "evaluated_at": self.evaluated_at, "evaluated_step": self.evaluated_step,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }))

    def _checkpoint(self, use_lock: bool = True) -> dict[str, Any] | None:
        directory = self.s.checkpoint_dir
        if directory is None:
            return None
        try:
            direct = use_lock and self.store is not None and self.store.mode == "direct"
            with self._locked() if direct else contextlib.nullcontext():
                model_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            path = save_checkpoint(
                directory, model_state=model_state, optimizer_state=self.optimizer.state_dict(),
                step=self.step, samples=self.samples, config_digest=self.s.config_digest,
                fingerprint=self.fingerprint, keep=self.s.checkpoint_keep,
            )
        except _ParentGone:
            raise
        except Exception as exc:  # e.g. disk full: keep training, say so
            log.error("cannot write a checkpoint: %s", exc)
            self.events.put(("error", f"cannot write a checkpoint: {exc}"))
            return None
        self.checkpoint_step = self.step
        info = {"path": str(path), "step": self.step, "samples": self.samples, "time": time.time()}
        self.events.put(("checkpoint", info))
        return info

    def last_checkpoint(self) -> None:
        """On the way out after the daemon died: nobody else writes the weights any more."""
        if self.store is not None:
            self._checkpoint(use_lock=False)

    def _resume(self) -> str | None:
        directory = self.s.checkpoint_dir
        found = load_newest_valid(directory) if directory is not None else None
        if found is None:
            return None
        path, data = found
        if data.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} holds a different model than task {self.s.task!r}; "
                f"move {directory} away to start from scratch"
            )
        if self.s.config_digest and data.get("config_digest") not in ("", self.s.config_digest):
            log.info("settings changed since %s; resuming anyway", path.name)
        self.model.load_state_dict(data["model"])
        load_optimizer_state(self.optimizer, data["optimizer"])
        self.step, self.samples = data["step"], data["samples"]
        self.checkpoint_step = self.step
        log.info("resumed from %s (step %d)", path, self.step)
        return str(path)

    def _wait_attach(self, timeout: float = 120.0) -> tuple[str, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_parent(time.monotonic())
            try:
                if self.commands.poll(0.05):
                    message = self.commands.recv()
                    if message[0] == "attach":
                        return message[1], message[2]
                    if message[0] == "stop":
                        raise _Stopped()
            except (EOFError, OSError):
                raise _ParentGone() from None
        raise TimeoutError("the daemon did not hand over the shared weights")

    def _check_parent(self, now: float) -> None:
        if now >= self.next_parent_check:
            self.next_parent_check = now + PARENT_CHECK_INTERVAL_S
            if os.getppid() != self.parent_pid:
                raise _ParentGone()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        while not self.lock.acquire(timeout=1.0):
            self._check_parent(time.monotonic())  # the daemon may have died holding it
        try:
            yield
        finally:
            self.lock.release()


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore the optimizer's state (momentum etc.) but keep the configured hyperparameters."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
