"""Checking `train.task` before a node trains: `peerfed config check` and `peerfed run`.

`find_task_module` is cheap and imports neither torch nor the task's module (only its parent
packages, to find it): `run` calls it before it starts anything, so a module the daemon cannot
import is one clear config error at once. `build_task` does what the trainer would do first:
it imports the module, calls the factory with this node's settings and context on the CPU
(no device, no training) and checks that the result is a usable Task with float weights to
average. Every failure is a ConfigError that names the config file and `train.task`.
"""

from __future__ import annotations

import importlib.util
import sys
import traceback
from dataclasses import dataclass

from peerfed.config import BUILTIN_TASK_NAMES, Config
from peerfed.errors import ConfigError


@dataclass(frozen=True)
class TaskSummary:
    """What `build_task` found: enough for the operator to recognise the model."""

    task: str
    model: str  # the model's class name
    numel: int  # floats averaged with peers
    nbytes: int
    fingerprint: str
    num_samples: int


def _error(cfg: Config, text: str) -> ConfigError:
    where = f"{cfg.path}: " if cfg.path is not None else ""
    return ConfigError(f"{where}train.task: {text}")


def find_task_module(cfg: Config) -> None:
    """ConfigError unless train.task is a built-in or names a module this Python can find.
    Imports no torch; imports the module's parent packages only."""
    spec = cfg.train.task
    if spec in BUILTIN_TASK_NAMES:
        return
    module_name = spec.partition(":")[0]
    try:
        found = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        found = None
    except Exception as exc:  # a parent package that fails to import
        raise _error(cfg, f"cannot import {module_name!r}: {type(exc).__name__}: {exc} (got {spec!r})") from None
    if found is None:
        raise _error(cfg, f"no module named {module_name!r} (got {spec!r}); the daemon imports it, so put its "
                          f"folder on PYTHONPATH or install its package into the daemon's Python "
                          f"({sys.executable})")


def build_task(cfg: Config) -> TaskSummary:
    """Import train.task and build it once on the CPU, as the trainer would, without training.

    ConfigError names train.task and the cause; when the factory itself raised, the original
    exception is the ConfigError's __cause__ (for a traceback)."""
    find_task_module(cfg)
    from peerfed.averaging import FlatLayout
    from peerfed.train.tasks import (
        NodeContext,
        TaskLoadError,
        TrainSettings,
        load_task_factory,
    )

    settings = TrainSettings.from_config(cfg)
    try:
        task = load_task_factory(settings.task)(
            settings, NodeContext(settings.node_index, settings.node_count, settings.seed))
    except TaskLoadError as exc:
        text = str(exc).removeprefix(f"train.task {settings.task!r}: ")
        raise _error(cfg, f"{text} (got {settings.task!r})") from exc.__cause__
    layout = FlatLayout.from_model(task.model)
    if layout.numel == 0:
        raise _error(cfg, f"the model has no floating-point weights to average (got {settings.task!r})")
    return TaskSummary(task=settings.task, model=type(task.model).__name__, numel=layout.numel,
                       nbytes=layout.nbytes, fingerprint=layout.fingerprint(), num_samples=task.num_samples)


def format_cause(exc: BaseException) -> str:
    """The traceback of what a factory raised, for the operator to debug it ('' if none)."""
    cause = exc.__cause__
    if cause is None or cause.__traceback__ is None:
        return ""
    return "".join(traceback.format_exception(cause)).rstrip()
