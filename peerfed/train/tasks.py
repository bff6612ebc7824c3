"""The Task API (what a node trains) and the built-in digits tasks.

A task factory is `factory(settings: TrainSettings, ctx: NodeContext) -> Task`. It runs inside
the trainer process; built-ins are "digits-lr" and "digits-mlp", anything else is
"package.module:factory".
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]
# (steps taken, seconds spent training) -> factor applied to the optimizer's configured lr
LrSchedule = Callable[[int, float], float]

# The 80/20 split and the Dirichlet split use fixed seeds so every node agrees on them,
# whatever its training seed (override with options "split_seed").
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
MIN_SHARD_SIZE = 10


@dataclass(frozen=True)
class TrainSettings:
    """The [train] and [checkpoint] settings the trainer needs (a picklable copy)."""

    task: str = "digits-mlp"
    device: str = "auto"
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    threads: int = 0  # 0 = half the CPUs
    eval_interval: float = 5.0
    init: str = "auto"
    node_index: int = 0
    node_count: int = 1
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    checkpoint_interval: float = 300.0
    checkpoint_keep: int = 3
    checkpoint_dir: Path | None = None  # None: no checkpoints
    config_digest: str = ""

    @classmethod
    def from_config(cls, cfg: Any) -> TrainSettings:
        """Read cfg.train, cfg.checkpoint and cfg.state_dir of a peerfed.config.Config."""
        t = cfg.train
        digest = cfg.digest() if callable(getattr(cfg, "digest", None)) else ""
        return cls(
            task=str(t.task),
            device=str(t.device),
            batch_size=int(t.batch_size),
            lr=float(t.lr),
            seed=int(t.seed),
            threads=int(t.threads),
            eval_interval=float(t.eval_interval),
            init=str(t.init),
            node_index=int(t.node_index),
            node_count=int(t.node_count),
            options=dict(t.options),
            checkpoint_interval=float(cfg.checkpoint.interval),
            checkpoint_keep=int(cfg.checkpoint.keep),
            checkpoint_dir=Path(cfg.state_dir) / "checkpoints",
            config_digest=digest,
        )


@dataclass(frozen=True)
class NodeContext:
    index: int
    count: int
    seed: int


@dataclass
class Task:
    model: nn.Module
    train_batches: Iterator[Batch]  # endless, CPU tensors
    evaluate: Callable[[nn.Module], dict[str, float]]  # at least "accuracy" and "loss"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    num_samples: int  # size of the local shard: this node's sample weight
    lr_schedule: LrSchedule | None = None  # None: the configured lr throughout


TaskFactory = Callable[[TrainSettings, NodeContext], Task]


class TaskLoadError(ValueError):
    """The task spec names nothing usable; the message names the spec."""


def load_task_factory(spec: str) -> TaskFactory:
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec]
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskLoadError(f"task {spec!r}: not a built-in task ({known}) nor 'module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise TaskLoadError(f"task {spec!r}: cannot import {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TaskLoadError(f"task {spec!r}: module {module_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise TaskLoadError(f"task {spec!r}: {attr!r} is not callable")
    return obj


# ---------------------------------------------------------------- learning-rate schedules

LR_SCHEDULES = ("constant", "cosine", "linear")


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


# ---------------------------------------------------------------- digits


@dataclass(frozen=True)
class DigitsData:
    x_train: np.ndarray  # float32 [1437, 64] in [0, 1]
    y_train: np.ndarray  # int64 [1437]
    x_test: np.ndarray  # float32 [360, 64]
    y_test: np.ndarray  # int64 [360]


@functools.lru_cache(maxsize=4)
def load_digits_split(seed: int = DIGITS_SPLIT_SEED) -> DigitsData:
    """scikit-learn's digits (no download), scaled to [0, 1], split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=seed, stratify=y
    )
    for a in (x_tr, x_te, y_tr, y_te):
        a.setflags(write=False)  # cached: callers must not change it
    return DigitsData(x_tr, y_tr, x_te, y_te)


def dirichlet_split(
    labels: np.ndarray, count: int, alpha: float | None, seed: int, min_size: int = MIN_SHARD_SIZE
) -> list[np.ndarray]:
    """Split sample indices over `count` shards: iid when alpha is None, else per label
    proportions drawn from Dirichlet(alpha). Every shard gets at least min(min_size, n // count)."""
    n = len(labels)
    if count < 1 or count > n:
        raise ValueError(f"cannot split {n} samples over {count} nodes")
    rng = np.random.default_rng(seed)
    if alpha is None:
        shards = [list(s) for s in np.array_split(rng.permutation(n), count)]
    else:
        if not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
        shards = [[] for _ in range(count)]
        for label in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet(np.full(count, alpha)))[:-1] * len(idx)).astype(int)
            for shard, part in zip(shards, np.split(idx, cuts)):
                shard.extend(part.tolist())
    # Top up tiny shards from the largest one so that every node has something to train on.
    floor = min(min_size, n // count)
    for shard in shards:
        while len(shard) < floor:
            donor = max(shards, key=len)
            shard.append(donor.pop(int(rng.integers(len(donor)))))
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def split_digits(count: int, alpha: float | None, seed: int = DIGITS_SPLIT_SEED) -> list[np.ndarray]:
    """Indices into the digits train set (1437 samples) for each of `count` nodes."""
    return dirichlet_split(load_digits_split().y_train, count, alpha, seed)


def parse_alpha(options: Mapping[str, Any]) -> float | None:
    value = options.get("alpha", "iid")
    if value is None or value == "iid":
        return None
    alpha = float(value)
    if not alpha > 0:
        raise ValueError(f"options.alpha must be > 0 or 'iid', got {value!r}")
    return alpha


def endless_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Batch]:
    """Shuffled mini-batches forever; a shard smaller than a batch is one batch."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    size = max(1, min(batch_size, n))
    while True:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - size + 1, size):
            idx = order[start : start + size]
            yield x[idx], y[idx]


def classification_evaluator(
    x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> Callable[[nn.Module], dict[str, float]]:
    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(x.to(device))
                target = y.to(device)
                loss = float(loss_fn(logits, target))
                accuracy = float((logits.argmax(dim=1) == target).float().mean())
        finally:
            model.train(was_training)
        return {"accuracy": accuracy, "loss": loss}

    return evaluate


def _digits_task(settings: TrainSettings, ctx: NodeContext, model: nn.Module) -> Task:
    options = settings.options
    data = load_digits_split()
    split_seed = int(options.get("split_seed", DIGITS_SPLIT_SEED))
    shard = dirichlet_split(data.y_train, ctx.count, parse_alpha(options), split_seed)[ctx.index]
    x = torch.from_numpy(data.x_train[shard].copy())
    y = torch.from_numpy(data.y_train[shard].copy())
    loss_fn = nn.CrossEntropyLoss()
    momentum = float(options.get("momentum", 0.0))
    weight_decay = float(options.get("weight_decay", 0.0))

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=settings.lr, momentum=momentum, weight_decay=weight_decay)

    return Task(
        model=model,
        # Same model init on every node (seed), different batch order per node.
        train_batches=endless_batches(x, y, settings.batch_size, ctx.seed * 100_003 + ctx.index + 1),
        evaluate=classification_evaluator(
            torch.from_numpy(data.x_test.copy()), torch.from_numpy(data.y_test.copy()), loss_fn
        ),
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        num_samples=len(shard),
        lr_schedule=lr_schedule_from_options(options),
    )


def _check_ctx(ctx: NodeContext) -> None:
    if not 0 <= ctx.index < ctx.count:
        raise ValueError(f"node_index {ctx.index} outside 0..{ctx.count - 1}")


def digits_lr(settings: TrainSettings, ctx: NodeContext) -> Task:
    """Logistic regression on digits: Linear 64 -> 10."""
    _check_ctx(ctx)
    torch.manual_seed(ctx.seed)
    return _digits_task(settings, ctx, nn.Linear(64, 10))


def digits_mlp(settings: TrainSettings, ctx: NodeContext) -> Task:
    """MLP 64-32-10 with ReLU on digits."""
    _check_ctx(ctx)
    torch.manual_seed(ctx.seed)
    return _digits_task(settings, ctx, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))


BUILTIN_TASKS: dict[str, TaskFactory] = {"digits-lr": digits_lr, "digits-mlp": digits_mlp}
