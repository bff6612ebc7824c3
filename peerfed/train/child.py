"""The trainer process: an ordinary PyTorch loop, read top to bottom in ``_Child.run``.

It builds the task, resumes from the newest valid checkpoint, attaches the shared weights,
reports Ready, waits for Start (after a state sync), then trains, evaluates, reports Stats
and writes checkpoints, never waiting for the network. Owner: the trainer process's one
thread; it talks to the daemon only through its DaemonLine (daemon_line.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Lock
from typing import Any

import torch
from torch import nn

from peerfed.averaging import FlatLayout
from peerfed.train.checkpoint import (
    first_checkpoint_delay,
    load_newest_valid,
    load_optimizer_state,
    save_checkpoint,
)
from peerfed.train.daemon_line import DaemonLine, ParentGone
from peerfed.train.messages import (
    Attach,
    CheckpointInfo,
    CheckpointSaved,
    Failed,
    Hello,
    Ready,
    ReadyInfo,
    SetClock,
    Start,
    Stats,
    Stop,
    Stopped,
    TrainerCommand,
    TrainerEvent,
)
from peerfed.train.shm import DONE, PROGRESS, SAMPLES, STEP
from peerfed.train.tasks import (
    NodeContext,
    TaskLoadError,
    TrainSettings,
    load_task_factory,
)
from peerfed.train.weight_store import WeightStore

log = logging.getLogger("peerfed.trainer")

STATS_INTERVAL_S = 1.0
HOUSEKEEPING_INTERVAL_S = 0.05
LOSS_EMA_DECAY = 0.98


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
    commands: Connection,
    events: Queue[TrainerEvent],
    control_name: str,
    lock: Lock,
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
    line = DaemonLine(commands, events, lock, control_name, parent_pid)
    child = _Child(settings, line)
    signal.signal(signal.SIGTERM, child.on_sigterm)
    code = 0
    try:
        child.run(force_mirror)
    except ParentGone:
        log.warning("the daemon is gone; writing a last checkpoint and exiting")
        child.last_checkpoint()
    except _Stopped:
        line.send(Stopped(checkpoint=None))
    except TaskLoadError as exc:  # it names train.task: the supervisor or the daemon says it, once
        line.send(Failed(str(exc)))
        code = 1
    except BaseException as exc:
        log.error("trainer failed: %s", exc, exc_info=True)
        line.send(Failed(f"{type(exc).__name__}: {exc}"))
        code = 1
    line.close()  # delivers the last events before exiting
    if code:
        raise SystemExit(code)


@dataclass
class Counters:
    """Where training stands; checkpointed, and resumed from the checkpoint."""

    step: int = 0
    samples: int = 0
    seconds_before: float = 0.0  # training time of earlier trainer processes (checkpointed)
    schedule_offset: int = 0  # lr schedule step - own step (a donor's clock after state sync)
    began: float | None = None  # when this process began training (monotonic)
    checkpointed_step: int = -1
    checkpointed_at: float | None = None  # unix time of the checkpoint we resumed from or wrote last

    @property
    def schedule_step(self) -> int:
        return self.step + self.schedule_offset

    def seconds_trained(self, now: float) -> float:
        """Training time so far, across restarts: a time-based lr schedule goes on where the
        last checkpoint left it instead of warming up again after every restart."""
        return self.seconds_before + (now - self.began if self.began is not None else 0.0)


@dataclass
class Evaluation:
    """The last evaluation and the training loss, for Stats."""

    metrics: dict[str, float] = field(default_factory=dict)
    evaluated_at: float | None = None  # unix time and step of the last evaluation
    evaluated_step: int = 0
    loss_ema: torch.Tensor | None = None  # stays on the device: no sync per step


@dataclass
class Timers:
    next_eval: float = 0.0
    next_checkpoint: float = 0.0
    last_stats: tuple[float, int] = (0.0, 0)  # (monotonic time, step) of the last Stats


class _Child:
    def __init__(self, settings: TrainSettings, line: DaemonLine) -> None:
        self.s = settings
        self.line = line
        self.started = False
        self.stop_requested = False
        self.store: WeightStore | None = None
        self.counters = Counters()
        self.evaluation = Evaluation()
        self.timers = Timers()

    @property
    def model(self) -> nn.Module:
        return self.task.model  # moved to the device in place

    def on_sigterm(self, signum: int, frame: Any) -> None:
        self.stop_requested = True  # e.g. systemd stopping the whole cgroup: checkpoint first

    def run(self, force_mirror: bool) -> None:
        s, line, counters = self.s, self.line, self.counters
        self.device = pick_device(s.device)
        self.task = load_task_factory(s.task)(s, NodeContext(s.node_index, s.node_count, s.seed))
        self.model.to(self.device)
        self.model.train()
        self.optimizer = self.task.make_optimizer(self.model.parameters())
        layout = FlatLayout.from_model(self.model)
        if layout.numel == 0:
            raise ValueError(f"task {s.task!r}: the model has no floating-point weights to average")
        self.fingerprint = layout.fingerprint()
        resumed_from = self._resume()
        mirror = force_mirror or self.device.type != "cpu" or not layout.all_float32
        line.send(Hello(self.fingerprint, layout.numel, mirror))
        shared, delta = line.attach(*self._wait_attach(), layout.numel)
        with line.locked():
            self.store = WeightStore(self.model, layout, shared, delta, mirror=mirror, device=self.device)
        line.control[STEP], line.control[SAMPLES] = counters.step, counters.samples
        line.send(Ready(ReadyInfo(
            fingerprint=self.fingerprint, nbytes=layout.nbytes, numel=layout.numel,
            num_samples=int(self.task.num_samples), device=str(self.device), mode=self.store.mode,
            resumed_step=counters.step, resumed_samples=counters.samples,
            resumed_seconds=counters.seconds_before, resumed_from=resumed_from,
        )))
        self._evaluate()
        now = time.monotonic()
        self.timers = Timers(next_eval=now + s.eval_interval, next_checkpoint=now + s.checkpoint.interval,
                             last_stats=(now, counters.step))
        self._send_stats(now)
        while not self.started:  # wait for Start: the daemon may load a peer's weights first
            for command in line.commands(timeout=0.005):
                self._obey(command)
            if self._housekeeping(time.monotonic()):
                return
        self._train()

    def _train(self) -> None:
        model, optimizer, loss_fn = self.model, self.optimizer, self.task.loss_fn
        control, counters, evaluation = self.line.control, self.counters, self.evaluation
        direct = self.store is not None and self.store.mode == "direct"
        schedule = self.task.lr_schedule
        base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        counters.began = now = time.monotonic()
        self.timers.next_checkpoint = now + first_checkpoint_delay(counters.checkpointed_at, time.time(),
                                                                   self.s.checkpoint.interval)
        next_housekeeping = 0.0
        for x, y in self.task.train_batches:
            if schedule is not None:  # per step: a few microseconds next to a step's milliseconds
                factor = schedule(counters.schedule_step, counters.seconds_trained(now))
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * factor
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if direct:
                with self.line.locked():  # the only write to the shared weights
                    optimizer.step()
            else:
                optimizer.step()
                self._serve()
            counters.step += 1
            counters.samples += int(y.shape[0])
            control[STEP], control[SAMPLES] = counters.step, counters.samples
            control[PROGRESS] = control[PROGRESS] + 1
            detached = loss.detach()
            if evaluation.loss_ema is None:
                evaluation.loss_ema = detached.clone()
            else:  # stays on the device: no sync per step
                evaluation.loss_ema.mul_(LOSS_EMA_DECAY).add_(detached, alpha=1 - LOSS_EMA_DECAY)
            now = time.monotonic()
            if now >= next_housekeeping:
                if self._housekeeping(now):
                    return
                next_housekeeping = now + HOUSEKEEPING_INTERVAL_S

    def _housekeeping(self, now: float) -> bool:
        """Commands, requests, timers. True when the trainer should exit now."""
        self.line.check_parent(now)
        self._serve()
        for command in self.line.commands():
            self._obey(command)
        timers = self.timers
        if self.stop_requested:
            self.line.send(Stopped(checkpoint=self._checkpoint()))
            return True
        if now >= timers.next_eval:
            self._evaluate()
            timers.next_eval = now + self.s.eval_interval
        if now >= timers.next_checkpoint:
            if self.counters.step != self.counters.checkpointed_step:
                self._checkpoint()
            timers.next_checkpoint = now + self.s.checkpoint.interval
        if now - timers.last_stats[0] >= STATS_INTERVAL_S:
            self._send_stats(now)
        return False

    def _obey(self, command: TrainerCommand) -> None:
        match command:
            case Start():
                self.started = True
            case SetClock(schedule_step, seconds_trained):
                self._set_clock(schedule_step, seconds_trained)
            case Stop():
                self.stop_requested = True
            case _:
                log.warning("ignoring an unexpected command from the daemon: %r", command)

    def _serve(self) -> None:
        control = self.line.control
        if self.store is None or self.store.mode == "direct" or control.pending_request() is None:
            return
        with self.line.locked():
            pending = control.pending_request()
            if pending is not None:
                seq, kind = pending
                self.store.serve(kind)
                control[DONE] = seq

    def _evaluate(self) -> None:
        evaluation = self.evaluation
        evaluation.metrics = {k: float(v) for k, v in self.task.evaluate(self.model).items()}
        evaluation.evaluated_at, evaluation.evaluated_step = time.time(), self.counters.step

    def _send_stats(self, now: float) -> None:
        counters, evaluation = self.counters, self.evaluation
        then, step_then = self.timers.last_stats
        self.timers.last_stats = (now, counters.step)
        self.line.send(Stats(
            step=counters.step, samples=counters.samples, metrics=dict(evaluation.metrics),
            loss=float(evaluation.loss_ema) if evaluation.loss_ema is not None else None,
            steps_per_s=(counters.step - step_then) / (now - then) if now > then else 0.0,
            evaluated_at=evaluation.evaluated_at, evaluated_step=evaluation.evaluated_step,
            lr=float(self.optimizer.param_groups[0]["lr"]),
            schedule_step=counters.schedule_step, seconds_trained=counters.seconds_trained(now),
        ))

    def _set_clock(self, schedule_step: int, seconds_trained: float) -> None:
        """Take over a state sync donor's lr clock: the lr goes on where the swarm's is."""
        if self.counters.began is not None:
            log.warning("lr clock from a donor came after training began; ignored")
            return
        self.counters.schedule_offset = schedule_step - self.counters.step
        self.counters.seconds_before = seconds_trained
        self._send_stats(time.monotonic())  # the daemon sees the new clock at once

    def _checkpoint(self, use_lock: bool = True) -> CheckpointInfo | None:
        directory = self.s.checkpoint.dir
        if directory is None:
            return None
        counters = self.counters
        try:
            direct = use_lock and self.store is not None and self.store.mode == "direct"
            with self.line.locked() if direct else contextlib.nullcontext():
                model_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            path = save_checkpoint(
                directory, model_state=model_state, optimizer_state=self.optimizer.state_dict(),
                step=counters.step, samples=counters.samples, schedule_step=counters.schedule_step,
                seconds_trained=counters.seconds_trained(time.monotonic()),
                config_digest=self.s.checkpoint.config_digest,
                fingerprint=self.fingerprint, keep=self.s.checkpoint.keep,
            )
        except ParentGone:
            raise
        except Exception as exc:  # e.g. disk full: keep training, say so
            log.error("cannot write a checkpoint: %s", exc)
            self.line.send(Failed(f"cannot write a checkpoint: {exc}"))
            return None
        counters.checkpointed_step, counters.checkpointed_at = counters.step, time.time()
        info = CheckpointInfo(path=str(path), step=counters.step, samples=counters.samples,
                              time=counters.checkpointed_at)
        self.line.send(CheckpointSaved(info))
        return info

    def last_checkpoint(self) -> None:
        """On the way out after the daemon died: nobody else writes the weights any more."""
        if self.store is not None:
            self._checkpoint(use_lock=False)

    def _resume(self) -> str | None:
        directory = self.s.checkpoint.dir
        found = load_newest_valid(directory) if directory is not None else None
        if found is None:
            return None
        path, data = found
        if data.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"checkpoint {path} holds a different model than task {self.s.task!r}; "
                f"move {directory} away to start from scratch"
            )
        if self.s.checkpoint.config_digest and data.get("config_digest") not in ("", self.s.checkpoint.config_digest):
            log.info("settings changed since %s; resuming anyway", path.name)
        self.model.load_state_dict(data["model"])
        load_optimizer_state(self.optimizer, data["optimizer"])
        counters = self.counters
        counters.step, counters.samples, counters.seconds_before = data["step"], data["samples"], data["seconds_trained"]
        counters.schedule_offset = data["schedule_step"] - counters.step
        counters.checkpointed_step = counters.step
        saved_at = data.get("time")
        counters.checkpointed_at = float(saved_at) if isinstance(saved_at, (int, float)) else None
        log.info("resumed from %s (step %d)", path, counters.step)
        return str(path)

    def _wait_attach(self, timeout: float = 120.0) -> tuple[str, str | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.line.check_parent(time.monotonic())
            for command in self.line.commands(timeout=0.05):
                match command:
                    case Attach(weights_name, delta_name):
                        return weights_name, delta_name
                    case Stop():
                        raise _Stopped()
        raise TimeoutError("the daemon did not hand over the shared weights")
