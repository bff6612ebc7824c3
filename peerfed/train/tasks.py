"""The Task API (what a node trains) and the built-in digits tasks.

A task factory is `factory(settings: TrainSettings, ctx: NodeContext) -> Task`. It runs inside
the trainer process (and once in `peerfed config check`, on the CPU, to catch a bad task
early); built-ins are "digits-lr", "digits-mlp" and "digits-wide"; anything else is
"package.module:factory", imported by the daemon's Python (PYTHONPATH or a package installed
in its environment).
`load_task_factory` wraps every factory so that a failure, or a result that is not a Task,
raises TaskLoadError naming `train.task`. Helpers for writing tasks (batches, evaluation,
losses, lr schedules) live in task_helpers.py and are re-exported here.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import numbers
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from peerfed.train.task_helpers import (
    LR_SCHEDULES,
    Batch,
    LossFn,
    LrSchedule,
    accuracy,
    binary_logit_loss,
    classification_evaluator,
    endless_batches,
    is_one_logit,
    lr_factor,
    lr_schedule_from_options,
    predicted_labels,
    true_labels,
)

__all__ = [
    "BUILTIN_TASKS", "LR_SCHEDULES", "Batch", "CheckpointSettings", "DigitsData", "LossFn", "LrSchedule", "NodeContext", "Task",
    "TaskFactory", "TaskLoadError", "TrainSettings", "accuracy", "binary_logit_loss", "check_task",
    "classification_evaluator", "digits_lr", "digits_mlp", "digits_wide", "dirichlet_split", "endless_batches",
    "is_one_logit", "load_digits_split", "load_task_factory", "lr_factor", "lr_schedule_from_options",
    "parse_alpha", "predicted_labels", "split_digits", "true_labels",
]

# The 80/20 split and the Dirichlet split use fixed seeds so every node agrees on them,
# whatever its training seed (override with options "split_seed").
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
MIN_SHARD_SIZE = 10


@dataclass(frozen=True)
class CheckpointSettings:
    """The [checkpoint] settings, and the config digest each checkpoint records (a resume
    from one written under other settings says so)."""

    interval: float = 300.0
    keep: int = 3
    dir: Path | None = None  # None: no checkpoints
    config_digest: str = ""


@dataclass(frozen=True)
class TrainSettings:
    """The node's [train] and [checkpoint] settings (a picklable copy), handed to the factory.

    A factory reads what it needs: batch_size, lr and seed for its batches and optimizer, and
    `options`, the free-form `[train.options]` table of the config (strings, numbers and
    booleans), for anything of its own (data paths, model width, ...). `device` is where the
    trainer will move the model (it does that itself: a factory builds on the CPU)."""

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
    checkpoint: CheckpointSettings = CheckpointSettings()  # the trainer's, not the factory's

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
            checkpoint=CheckpointSettings(
                interval=float(cfg.checkpoint.interval),
                keep=int(cfg.checkpoint.keep),
                dir=Path(cfg.state_dir) / "checkpoints",
                config_digest=digest,
            ),
        )


@dataclass(frozen=True)
class NodeContext:
    """Where this node stands in the swarm, from its config: `index` is `train.node_index`,
    `count` is `train.node_count`, `seed` is `train.seed`.

    With private data every node simply loads its own and may ignore index and count. When
    every node reads the same dataset (a benchmark, a demo), they pick this node's shard, e.g.
    `dirichlet_split(labels, ctx.count, alpha, seed)[ctx.index]`. Seed the model's init with
    `seed` so that every node starts from the same weights."""

    index: int
    count: int
    seed: int


@dataclass
class Task:
    """What a node trains. Every node of a swarm must build the same architecture (peers
    compare a fingerprint of parameter names, shapes and dtypes).

    model: the module; its floating-point parameters and buffers are averaged with peers.
    train_batches: an endless iterator of (x, y) CPU tensors (`endless_batches` makes one);
        the trainer moves each batch to the device and calls `loss_fn(model(x), y)`.
    evaluate: model -> metrics, at least "accuracy" and "loss" (`classification_evaluator`);
        called in the trainer with the model on its device, every `train.eval_interval` s.
    loss_fn: (model output, y) -> scalar loss to minimise.
    make_optimizer: parameters -> optimizer (called once; its state stays local).
    num_samples: size of this node's data: its weight when two nodes average.
    lr_schedule: (step, seconds trained) -> factor of the optimizer's lr; None keeps it
        constant (`lr_schedule_from_options` builds one from `[train.options]`)."""

    model: nn.Module
    train_batches: Iterator[Batch]
    evaluate: Callable[[nn.Module], dict[str, float]]
    loss_fn: LossFn
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
    num_samples: int
    lr_schedule: LrSchedule | None = None


TaskFactory = Callable[[TrainSettings, NodeContext], Task]


class TaskLoadError(ValueError):
    """train.task names nothing usable, or its factory failed; the message names train.task."""


def load_task_factory(spec: str) -> TaskFactory:
    """The factory that `train.task` names: a built-in name or "package.module:factory".

    The result is wrapped: if the factory raises, or returns something that is not a usable
    Task, the call raises TaskLoadError naming train.task and the cause (its __cause__ keeps
    the original exception and traceback)."""
    if spec in BUILTIN_TASKS:
        return _checked(spec, BUILTIN_TASKS[spec])
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        known = ", ".join(sorted(BUILTIN_TASKS))
        close = difflib.get_close_matches(spec, list(BUILTIN_TASKS), n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise TaskLoadError(f"train.task {spec!r}: not a built-in task ({known}) nor 'module:factory'{hint}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise TaskLoadError(
            f"train.task {spec!r}: cannot import {module_name!r}: {exc}; the daemon imports it, so its "
            f"folder must be on PYTHONPATH or its package installed in the daemon's Python") from exc
    except Exception as exc:
        raise TaskLoadError(f"train.task {spec!r}: importing {module_name!r} failed: "
                            f"{type(exc).__name__}: {exc}{_where(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(module) if not n.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise TaskLoadError(f"train.task {spec!r}: module {module_name!r} has no {attr!r}{hint}") from None
    if not callable(obj):
        raise TaskLoadError(f"train.task {spec!r}: {attr!r} is not callable")
    return _checked(spec, obj)


def _where(exc: BaseException) -> str:
    """' (at FILE:LINE in FUNCTION)': the innermost frame of exc's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno} in {last.name})"


def _checked(spec: str, factory: TaskFactory) -> TaskFactory:
    """`factory`, raising TaskLoadError (naming train.task) when it fails or returns no Task."""
    @functools.wraps(factory)
    def build(settings: TrainSettings, ctx: NodeContext) -> Task:
        try:
            task = factory(settings, ctx)
        except Exception as exc:
            raise TaskLoadError(f"train.task {spec!r}: the factory raised "
                                f"{type(exc).__name__}: {exc}{_where(exc)}") from exc
        problem = check_task(task)
        if problem:
            raise TaskLoadError(f"train.task {spec!r}: {problem}")
        return task

    return build


def check_task(task: object) -> str | None:
    """What is wrong with a factory's result, or None if it is a usable Task."""
    if not isinstance(task, Task):
        return f"the factory returned {type(task).__name__}, not a peerfed.train.tasks.Task"
    if not isinstance(task.model, nn.Module):
        return f"Task.model is {type(task.model).__name__}, not a torch.nn.Module"
    if not any(p.is_floating_point() for p in task.model.parameters()):
        return "the model has no floating-point parameters to train and average"
    for name in ("evaluate", "loss_fn", "make_optimizer"):
        if not callable(getattr(task, name)):
            return f"Task.{name} is not callable"
    if not isinstance(task.train_batches, Iterator):
        return "Task.train_batches is not an iterator (endless_batches(...) makes one; or a generator)"
    if isinstance(task.num_samples, bool) or not isinstance(task.num_samples, numbers.Integral) or task.num_samples < 1:
        return f"Task.num_samples must be a positive int (got {task.num_samples!r})"
    if task.lr_schedule is not None and not callable(task.lr_schedule):
        return "Task.lr_schedule is not callable"
    return None


# ---------------------------------------------------------------- digits


@dataclass(frozen=True)
class DigitsData:
    """scikit-learn's digits as the built-in tasks use them (read-only arrays)."""

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
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
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
    """`[train.options]` alpha of the built-in tasks: None for "iid" (the default), else the
    Dirichlet concentration (> 0; smaller means more skewed label shards)."""
    value = options.get("alpha", "iid")
    if value is None or value == "iid":
        return None
    alpha = float(value)
    if not alpha > 0:
        raise ValueError(f"options.alpha must be > 0 or 'iid', got {value!r}")
    return alpha


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
    """A node index within the count (config validation ensures it; direct callers may not)."""
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


def digits_wide(settings: TrainSettings, ctx: NodeContext) -> Task:
    """MLP 64-8192-10 with ReLU on digits: 614k weights (2.5 MB in float32), big enough that a
    scaled-down home uplink (benchmarks/bench_home_links.py: 18 s per float32 push at 1.1 Mbit/s)
    keeps a real one's proportions: libp2p's chatter a small share of it, the transfer floor
    (core/rates.py) about 0.15 of it, as for a ResNet-18 on 20 Mbit/s."""
    _check_ctx(ctx)
    torch.manual_seed(ctx.seed)
    return _digits_task(settings, ctx, nn.Sequential(nn.Linear(64, 8192), nn.ReLU(), nn.Linear(8192, 10)))


BUILTIN_TASKS: dict[str, TaskFactory] = {"digits-lr": digits_lr, "digits-mlp": digits_mlp, "digits-wide": digits_wide}
