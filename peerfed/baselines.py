"""The two baselines `peerfed demo` trains in-process next to the swarm (design.md section 6).

all-reduce: one model on the union of the train set, with the samples all nodes processed
together: what synchronous data-parallel training (batch = nodes * batch_size, same lr) gives.
local-only: each node's model trained alone on its own shard, with the samples it processed.

Both use the very task factory the daemons use (same model, init, shards and batch order), and
the nodes' learning-rate schedule stretched over their own steps.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from peerfed.train.tasks import NodeContext, Task, TrainSettings, load_task_factory


@dataclass(frozen=True)
class BaselineResult:
    accuracy: float
    steps: int
    batch_size: int
    seconds: float
    capped: bool = False  # fewer steps than the samples asked for (to keep the demo short)

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size


def options_over_steps(options: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """The same lr schedule shape, counted in this baseline's own steps (the nodes may count
    it in seconds of training, which means nothing to an in-process loop)."""
    out = {k: v for k, v in options.items() if k not in ("lr_schedule_steps", "lr_schedule_seconds")}
    if str(out.get("lr_schedule", "constant")) != "constant":
        out["lr_schedule_steps"] = max(1, steps)
    return out


def baseline_device(spec: str) -> torch.device:
    """The nodes' train.device: "auto" is cuda, then mps, then cpu (as the trainer picks)."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def train_steps(task: Task, steps: int, device: str = "cpu") -> float:
    """The trainer's loop, minus the shared memory: `steps` steps on `device`, then the test accuracy."""
    where = baseline_device(device)
    model, loss_fn = task.model.to(where), task.loss_fn
    model.train()
    optimizer = task.make_optimizer(model.parameters())
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    batches = task.train_batches
    for step in range(steps):
        if task.lr_schedule is not None:
            factor = task.lr_schedule(step, 0.0)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
        x, y = next(batches)
        x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(task.evaluate(model)["accuracy"])


def train_allreduce(settings: TrainSettings, node_count: int, total_samples: int) -> BaselineResult:
    """One model on the union (shard 0 of 1, iid), batch = node_count * batch_size."""
    batch = node_count * settings.batch_size
    steps = max(1, round(total_samples / batch))
    options = {**options_over_steps(settings.options, steps), "alpha": "iid"}
    s = dataclasses.replace(settings, batch_size=batch, node_index=0, node_count=1, options=options)
    started = time.monotonic()
    task = load_task_factory(s.task)(s, NodeContext(0, 1, s.seed))
    accuracy = train_steps(task, steps, s.device)
    return BaselineResult(accuracy, steps, batch, time.monotonic() - started)


def train_local_only(
    settings: TrainSettings, node_count: int, samples_per_node: Sequence[int], max_steps: int | None = None,
) -> list[BaselineResult]:
    """Node i's model alone on shard i for the samples node i processed (at most max_steps)."""
    return [train_local_one(settings, node_count, index, samples, max_steps)
            for index, samples in enumerate(samples_per_node)]


def train_local_one(
    settings: TrainSettings, node_count: int, index: int, samples: int, max_steps: int | None = None,
) -> BaselineResult:
    """One node of the local-only baseline (the demo runs them one by one to show progress)."""
    wanted = max(1, round(samples / settings.batch_size))
    steps = wanted if max_steps is None else min(wanted, max_steps)
    options = options_over_steps(settings.options, steps)
    s = dataclasses.replace(settings, node_index=index, node_count=node_count, options=options)
    started = time.monotonic()
    task = load_task_factory(s.task)(s, NodeContext(index, node_count, s.seed))
    accuracy = train_steps(task, steps, s.device)
    return BaselineResult(accuracy, steps, settings.batch_size, time.monotonic() - started, capped=steps < wanted)


def set_baseline_threads(threads: int = 1) -> None:
    """Before any torch op (design.md section 5): a small model is fastest on one thread."""
    torch.set_num_threads(threads)


def init_baseline_worker() -> None:
    """A helper process: one thread, and Ctrl+C is its parent's to handle (it terminates us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    set_baseline_threads(1)
