"""Helpers for writing a task (re-exported by peerfed.train.tasks): endless mini-batches, an
evaluator and an accuracy that fit both model shapes a classifier has, a binary loss that takes
any target shape, and learning-rate schedules.

Two kinds of classifier output are told apart by the logits' shape:
- multi-class, ``[N, C]`` with C >= 2 (e.g. ``Linear(..., 10)`` + ``CrossEntropyLoss``): the
  prediction is the argmax; targets are class indices ``[N]`` (or one-hot/probabilities ``[N, C]``);
- binary with one logit, ``[N]`` or ``[N, 1]`` (``Linear(..., 1)`` + ``BCEWithLogitsLoss``): the
  prediction is ``logit > 0``; targets are 0/1, as floats or ints, of shape ``[N]`` or ``[N, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

Batch = tuple[torch.Tensor, torch.Tensor]
# (steps taken, seconds spent training) -> factor applied to the optimizer's configured lr
LrSchedule = Callable[[int, float], float]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LR_SCHEDULES = ("constant", "cosine", "linear")


# ---------------------------------------------------------------- batches


def endless_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Shuffled mini-batches of (x, y) forever, in an order fixed by `seed`; a shard smaller
    than a batch is one batch. Give CPU tensors: the trainer moves each batch to its device."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    size = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield x[idx], y[idx]


# ---------------------------------------------------------------- classification


def is_one_logit(logits: torch.Tensor) -> bool:
    """True for a binary model's output with one logit per sample: shape [N] or [N, 1]."""
    return logits.dim() == 1 or (logits.dim() == 2 and logits.shape[1] == 1)


def predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class per sample, shape [N]: `logit > 0` (as 0/1) for one logit, else the argmax."""
    if is_one_logit(logits):
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


def true_labels(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Class per sample, shape [N]: 0/1 targets (float or int, [N] or [N, 1]) of a one-logit
    model as 0/1; class indices as they are; one-hot or probability rows as their argmax."""
    if is_one_logit(logits):
        return (target.reshape(-1) > 0.5).long()
    if target.dim() == 2 and target.shape == logits.shape:
        return target.argmax(dim=1)
    return target.reshape(-1).long()


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Share of samples classified right, for one-logit binary and multi-class outputs alike."""
    if len(target) == 0:
        return math.nan
    return float((predicted_labels(logits) == true_labels(target, logits)).float().mean())


def binary_logit_loss(pos_weight: torch.Tensor | None = None) -> LossFn:
    """BCEWithLogitsLoss for a one-logit model that takes targets as they come: 0/1 as floats
    or ints, shape [N] or [N, 1] (the plain loss wants floats of exactly the logits' shape)."""

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = pos_weight.to(logits.device) if pos_weight is not None else None
        return F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype).reshape(logits.shape), pos_weight=weight)

    return loss


def classification_evaluator(
    x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn, *, batch_size: int | None = None
) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate` for Task: {"accuracy", "loss"} of the model on (x, y), in eval mode and
    without gradients, on the model's device (the data is copied there once, then reused).

    Works for multi-class models ([N, C] logits) and one-logit binary models ([N] or [N, 1]:
    accuracy by `logit > 0`). `loss_fn` gets the logits and `y` as given, so pair a one-logit
    model with `binary_logit_loss()` (or give `y` as floats of the logits' shape).
    `batch_size` evaluates in chunks (a big test set need not fit the device at once); the
    loss is then the sample-weighted mean of the chunks' losses."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    cached: dict[torch.device, Batch] = {}

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        if device not in cached:
            cached.clear()  # the model moved: one copy at a time
            cached[device] = (x.to(device), y.to(device))
        xs, ys = cached[device]
        step = batch_size or max(1, len(xs))
        was_training = model.training
        model.eval()
        loss_sum, right, seen = 0.0, 0, 0
        try:
            with torch.no_grad():
                for start in range(0, len(xs), step):
                    xb, yb = xs[start : start + step], ys[start : start + step]
                    logits = model(xb)
                    loss_sum += float(loss_fn(logits, yb)) * len(xb)
                    right += int((predicted_labels(logits) == true_labels(yb, logits)).sum())
                    seen += len(xb)
        finally:
            model.train(was_training)
        if seen == 0:
            return {"accuracy": math.nan, "loss": math.nan}
        return {"accuracy": right / seen, "loss": loss_sum / seen}

    return evaluate


# ---------------------------------------------------------------- learning-rate schedules


def lr_factor(kind: str, progress: float, min_factor: float = 0.0) -> float:
    """Factor of the base lr at `progress` (0 = start, >= 1 = end, where it stays at min_factor)."""
    p = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif kind == "linear":
        shape = 1.0 - p
    else:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
    return min_factor + (1.0 - min_factor) * shape


def lr_schedule_from_options(options: Mapping[str, Any]) -> LrSchedule | None:
    """Options lr_schedule ("constant" | "cosine" | "linear"), with exactly one of
    lr_schedule_steps (decay over that many steps) or lr_schedule_seconds (over that much
    training time; checkpoints keep that clock and a state sync hands a newcomer its donor's,
    so neither a restart nor a late joiner starts it over),
    and lr_min (fraction of the lr kept once the decay is over, default 0).
    None for "constant" (the configured lr throughout); ValueError for bad options.

    A decaying lr lets gossiping nodes on skewed shards settle: late local steps drift less, so
    pairwise averaging pulls the nodes' models together."""
    kind = str(options.get("lr_schedule", "constant"))
    lr_factor(kind, 0.0)  # validates the name
    if kind == "constant":
        return None
    steps, seconds = options.get("lr_schedule_steps"), options.get("lr_schedule_seconds")
    if (steps is None) == (seconds is None):
        raise ValueError(f"lr_schedule {kind!r} needs exactly one of lr_schedule_steps, lr_schedule_seconds")
    length = float(steps if steps is not None else seconds)
    if not length > 0:
        raise ValueError(f"lr_schedule length must be > 0, got {length!r}")
    min_factor = float(options.get("lr_min", 0.0))
    if not 0.0 <= min_factor <= 1.0:
        raise ValueError(f"lr_min must be within [0, 1], got {min_factor!r}")
    by_steps = steps is not None

    def schedule(step: int, seconds_trained: float) -> float:
        return lr_factor(kind, (step if by_steps else seconds_trained) / length, min_factor)

    return schedule
