"""Benchmark tasks for real daemons (``train.task = "synthetic:<factory>"``).

Daemons import this module when started with ``PYTHONPATH=<repo>/benchmarks``.

- ``sized``: a model whose flat float32 size is ``options.mib`` MiB (an embedding table with
  sparse gradients plus a tiny head), so a step stays cheap whatever the size: the exchange is
  big, the training step is not. ``options.tower`` > 0 adds that many Linear(width, width)
  layers between the table and the head: compute-heavy steps on a model of the same size
  (the table shrinks by the tower's share).
- ``digits``: a built-in digits task (``options.base``, default digits-mlp) with the same
  model, hence the same fingerprint, as the built-in, plus the throttle below.

Batches are CPU tensors (the trainer moves them to its device); ``evaluate`` moves its batch
to wherever the model is, so both tasks run on a GPU too.

Options for both: ``step_sleep`` (seconds slept before each batch: a light trainer that
leaves the CPU to the daemons), ``go_file`` (the first batch waits until this file exists,
so nodes started one after another begin training together).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peerfed.train.tasks import BUILTIN_TASKS, Batch, NodeContext, Task, TrainSettings

EMBED_DIM = 64
CLASSES = 10
TOKENS = 8  # table rows looked up per sample
EVAL_SAMPLES = 256


class SizedModel(nn.Module):
    """Embedding table (the bulk of the bytes) -> optional Linear tower -> Linear head."""

    def __init__(self, rows: int, tower: int, width: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, EMBED_DIM, sparse=True)
        layers: list[nn.Module] = []
        dim = EMBED_DIM
        for _ in range(tower):
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self.tower = nn.Sequential(*layers)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(self.table(idx).mean(dim=1)))


def _small_numel(tower: int, width: int) -> int:
    """Floats outside the table: the tower and the head."""
    return sum(p.numel() for p in SizedModel(1, tower, width).parameters()) - EMBED_DIM


def rows_for(mib: float, tower: int = 0, width: int = 512) -> int:
    """Table rows so that the whole flat buffer is ``mib`` MiB of float32 (to within 256 B)."""
    return max(1, (int(mib * 2**20) // 4 - _small_numel(tower, width)) // EMBED_DIM)


def flat_bytes(mib: float, tower: int = 0, width: int = 512) -> int:
    """The exchanged size of ``sized`` with these options (what the daemon reports as nbytes)."""
    return 4 * (rows_for(mib, tower, width) * EMBED_DIM + _small_numel(tower, width))


def _throttled(batches: Iterator[Batch], options: Mapping[str, Any]) -> Iterator[Batch]:
    sleep = float(options.get("step_sleep", 0.0))
    go_file = options.get("go_file")
    if go_file:
        while not Path(str(go_file)).exists():
            time.sleep(0.02)
    for batch in batches:
        if sleep > 0:
            time.sleep(sleep)
        yield batch


def _random_batches(rows: int, batch_size: int, seed: int) -> Iterator[Batch]:
    """Random table rows; the label is a function of the first row, so the loss can drop."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, rows, (batch_size, TOKENS), generator=gen)
        yield idx, idx[:, 0] % CLASSES


def sized(settings: TrainSettings, ctx: NodeContext) -> Task:
    options = settings.options
    mib = float(options.get("mib", 16))
    tower, width = int(options.get("tower", 0)), int(options.get("width", 512))
    rows = rows_for(mib, tower, width)
    torch.manual_seed(ctx.seed)  # the same init on every node
    with torch.no_grad():
        model = SizedModel(rows, tower, width)
    loss_fn = nn.CrossEntropyLoss()
    eval_x, eval_y = next(_random_batches(rows, EVAL_SAMPLES, 12345))

    def evaluate(m: nn.Module) -> dict[str, float]:
        # The trainer moved the model (cuda, mps): the evaluation batch, indices included, follows it.
        device = next(m.parameters()).device
        x, y = eval_x.to(device), eval_y.to(device)
        with torch.no_grad():
            logits = m(x)
            return {"accuracy": float((logits.argmax(1) == y).float().mean()),
                    "loss": float(loss_fn(logits, y))}

    return Task(
        model=model,
        train_batches=_throttled(_random_batches(rows, settings.batch_size, ctx.seed * 1000 + ctx.index), options),
        evaluate=evaluate,
        loss_fn=loss_fn,
        # Plain SGD applies the table's sparse gradient to the touched rows only: cheap steps.
        make_optimizer=lambda params: torch.optim.SGD(params, lr=settings.lr),
        num_samples=1000,
    )


def digits(settings: TrainSettings, ctx: NodeContext) -> Task:
    base = str(settings.options.get("base", "digits-mlp"))
    task = BUILTIN_TASKS[base](settings, ctx)
    task.train_batches = _throttled(task.train_batches, settings.options)
    return task
