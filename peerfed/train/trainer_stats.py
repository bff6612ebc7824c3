"""The trainer as the daemon sees it: a frozen TrainerStats of four named parts.

The supervisor (supervisor.py) rebuilds one after each change and publishes it whole; any
thread may read it. Its parts: `progress` (step and samples, live from shared memory, the
training loss and speed, the watchdog's heartbeat), `evaluation` (the last evaluation's
metrics), `lr_clock` (the lr schedule's clock, handed on by a state sync) and `process` (what
the trainer process is and did last). `as_status()` is the flat /status `trainer` view that
the dashboard, the CLI, the demo and operators read: its keys do not change with this shape.

Owner: none; values only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from peerfed.train.messages import CheckpointInfo, Stats


@dataclass(frozen=True, slots=True)
class Progress:
    """How far training got and how fast."""

    step: int = 0
    samples: int = 0
    loss: float | None = None  # moving average of the training loss
    steps_per_s: float = 0.0
    heartbeat: int = 0  # +1 per training step, never reset (across restarts)
    heartbeat_age_s: float = 0.0  # since the heartbeat last moved


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The last evaluation."""

    metrics: dict[str, float] = field(default_factory=dict)  # never mutated
    at: float | None = None  # unix time
    step: int | None = None


@dataclass(frozen=True, slots=True)
class LrClock:
    """The lr schedule's clock (steps, seconds trained) and the lr it gives; a state sync
    donor hands the clock on."""

    lr: float | None = None
    schedule_step: int = 0
    seconds_trained: float = 0.0


@dataclass(frozen=True, slots=True)
class ProcessState:
    """The trainer process: where it runs, whether it is up, what it did last."""

    device: str | None = None
    mode: str | None = None  # "direct" | "mirror" | "copy"
    num_samples: int | None = None
    alive: bool = False
    ready: bool = False
    training: bool = False
    restarts: int = 0
    last_checkpoint: CheckpointInfo | None = None
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class TrainerStats:
    progress: Progress = field(default_factory=Progress)
    evaluation: Evaluation = field(default_factory=Evaluation)
    lr_clock: LrClock = field(default_factory=LrClock)
    process: ProcessState = field(default_factory=ProcessState)

    def with_report(self, report: Stats) -> TrainerStats:
        """These stats as the trainer's periodic Stats report updates them."""
        return replace(
            self,
            progress=replace(self.progress, step=report.step, samples=report.samples, loss=report.loss,
                             steps_per_s=report.steps_per_s),
            evaluation=Evaluation(report.metrics, report.evaluated_at, report.evaluated_step),
            lr_clock=LrClock(report.lr, report.schedule_step, report.seconds_trained),
        )

    def as_status(self) -> dict[str, object]:
        """The /status `trainer` view: flat keys, JSON-able (a copy; changing it changes nothing)."""
        p, e, c, s = self.progress, self.evaluation, self.lr_clock, self.process
        return {
            "step": p.step, "samples": p.samples, "metrics": dict(e.metrics), "loss": p.loss,
            "steps_per_s": p.steps_per_s, "evaluated_at": e.at, "evaluated_step": e.step,
            "lr": c.lr, "schedule_step": c.schedule_step, "seconds_trained": c.seconds_trained,
            "device": s.device, "mode": s.mode, "num_samples": s.num_samples,
            "alive": s.alive, "ready": s.ready, "training": s.training, "restarts": s.restarts,
            "progress": p.heartbeat, "last_progress_age_s": p.heartbeat_age_s,
            "last_checkpoint": asdict(s.last_checkpoint) if s.last_checkpoint is not None else None,
            "last_error": s.last_error,
        }
