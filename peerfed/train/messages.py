"""What the daemon and its trainer process say to each other: two small tagged unions.

daemon -> trainer (`TrainerCommand`, over a multiprocessing Pipe):
  Attach (the shared buffers to use), SetClock (a state sync donor's lr clock), Start, Stop.
trainer -> daemon (`TrainerEvent`, over a multiprocessing Queue: put never blocks the trainer):
  Hello (the model's shape: which buffers it needs), Ready, Stats (about once a second),
  CheckpointSaved, Failed, Stopped (its last words, with the final checkpoint).

The messages are frozen dataclasses, pickled by multiprocessing as they are; each side
dispatches them with `match` (supervisor.py, child.py). The weights themselves never travel
here: they live in shared memory (shm.py, weights_port.py, weight_store.py).

Owner: none; values only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ------------------------------------------------------------------ daemon -> trainer


@dataclass(frozen=True, slots=True)
class Attach:
    """Use these shared-memory blocks for the weights (and, in mirror mode, the merge delta)."""

    weights_name: str
    delta_name: str | None


@dataclass(frozen=True, slots=True)
class SetClock:
    """Take over a state sync donor's lr schedule clock (before the first step)."""

    schedule_step: int
    seconds_trained: float


@dataclass(frozen=True, slots=True)
class Start:
    """Begin taking steps (after an optional state sync into the shared weights)."""


@dataclass(frozen=True, slots=True)
class Stop:
    """Write a final checkpoint and exit."""


TrainerCommand = Attach | SetClock | Start | Stop

# ------------------------------------------------------------------ trainer -> daemon


@dataclass(frozen=True, slots=True)
class Hello:
    """The model is built: the daemon answers with Attach (buffers of `numel` float32 values)."""

    fingerprint: str
    numel: int
    mirror: bool  # the trainer serves requests between steps (not a direct view of the buffer)


@dataclass(frozen=True, slots=True)
class ReadyInfo:
    """What the trainer reported when it became ready (once per trainer process)."""

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


@dataclass(frozen=True, slots=True)
class Ready:
    """Attached and resumed: weight operations may begin; steps wait for Start."""

    info: ReadyInfo


@dataclass(frozen=True, slots=True)
class Stats:
    """Where training stands, about once a second (and at once after SetClock)."""

    step: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)  # of the last evaluation
    loss: float | None = None  # moving average of the training loss
    steps_per_s: float = 0.0
    evaluated_at: float | None = None  # unix time of the last evaluation
    evaluated_step: int | None = None
    lr: float | None = None
    schedule_step: int = 0  # the lr schedule's clock: steps (a donor's, after state sync) ...
    seconds_trained: float = 0.0  # ... and training time across restarts


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    path: str
    step: int
    samples: int
    time: float  # unix time


@dataclass(frozen=True, slots=True)
class CheckpointSaved:
    checkpoint: CheckpointInfo


@dataclass(frozen=True, slots=True)
class Failed:
    """Something went wrong; before Ready it is fatal (a restart would fail the same way)."""

    error: str


@dataclass(frozen=True, slots=True)
class Stopped:
    """The trainer is exiting as asked, after its final checkpoint (None: nothing to save)."""

    checkpoint: CheckpointInfo | None


TrainerEvent = Hello | Ready | Stats | CheckpointSaved | Failed | Stopped
