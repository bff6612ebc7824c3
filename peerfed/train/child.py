"""The trainer process: an ordinary PyTorch loop, read top to bottom in ``_Child.run``.

It sets torch's thread count before its first op, builds the task, resumes from the newest
valid checkpoint, reports ready, waits for "start" (the daemon may first load a peer's weights:
state sync), then trains continuously, evaluates every eval_interval, publishes statistics,
writes checkpoints, and never waits for the network. The daemon's side is trainer.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import torch

from peerfed.averaging import FlatLayout
from peerfed.train.checkpoint import load_newest_valid, save_checkpoint
from peerfed.train.shared import DONE, PROGRESS, SAMPLES, STEP, ControlBlock, SharedTensor, WeightStore
from peerfed.train.tasks import NodeContext, TaskLoadError, TrainSettings, load_task_factory

log = logging.getLogger("peerfed.trainer")
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
        self.seconds_before = 0.0  # training time of earlier trainer processes (checkpointed)
        self.schedule_offset = 0  # lr schedule step - own step (a donor's clock after state sync)
        self.train_began: float | None = None  # when this process began training (monotonic)
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
            "resumed_step": self.step, "resumed_samples": self.samples, "resumed_seconds": self.seconds_before,
            "resumed_from": resumed_from,
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
        self.train_began = now = time.monotonic()
        next_housekeeping = 0.0
        for x, y in self.task.train_batches:
            if schedule is not None:  # per step: a few microseconds next to a step's milliseconds
                factor = schedule(self.step + self.schedule_offset, self._seconds_trained(now))
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
                message = self.commands.recv()
                command = message[0]
                if command == "start":
                    self.started = True
                elif command == "clock":
                    self._set_clock(int(message[1]), float(message[2]))
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
            "schedule_step": self.step + self.schedule_offset, "seconds_trained": self._seconds_trained(now),
        }))

    def _seconds_trained(self, now: float) -> float:
        """Training time so far, across restarts: a time-based lr schedule goes on where the
        last checkpoint left it instead of warming up again after every restart."""
        return self.seconds_before + (now - self.train_began if self.train_began is not None else 0.0)

    def _set_clock(self, schedule_step: int, seconds_trained: float) -> None:
        """Take over a state sync donor's lr clock: the lr goes on where the swarm's is."""
        if self.train_began is not None:
            log.warning("lr clock from a donor came after training began; ignored")
            return
        self.schedule_offset = schedule_step - self.step
        self.seconds_before = seconds_trained
        self._publish_stats(time.monotonic())  # the daemon sees the new clock at once

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
                step=self.step, samples=self.samples, schedule_step=self.step + self.schedule_offset,
                seconds_trained=self._seconds_trained(time.monotonic()),
                config_digest=self.s.config_digest,
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
        self.step, self.samples, self.seconds_before = data["step"], data["samples"], data["seconds_trained"]
        self.schedule_offset = data["schedule_step"] - self.step
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
