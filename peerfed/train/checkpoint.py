"""Checkpoint files: one atomic file per checkpoint, newest valid one wins.

A checkpoint is one dict (nanoGPT style): model and optimizer state, step counters, the model
fingerprint, the config digest, a format version and the time. Files are named by step
(ckpt-000000123.pt) so names sort in training order. A write that fails (a full disk) leaves
no temp file behind and raises CheckpointWriteError, whose message names the file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{9,})\.pt$")
_TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"

log = logging.getLogger("peerfed.checkpoint")


class CheckpointError(Exception):
    """A checkpoint file is unreadable or not one of ours."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; its message names the file and the reason."""

    @classmethod
    def of(cls, path: Path, exc: BaseException) -> CheckpointWriteError:
        if isinstance(exc, OSError) and exc.errno is not None:
            return cls(exc.errno, exc.strerror, str(path))  # "[Errno 28] No space left on device: 'path'"
        return cls(f"cannot write {path}: {' '.join(str(exc).split()) or type(exc).__name__}")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:09d}.pt"


def first_checkpoint_delay(last_saved_at: float | None, now: float, interval: float) -> float:
    """Seconds from now (unix time) until a starting trainer's first checkpoint: the interval
    counts from the newest checkpoint's time, so one that is due already (or none at all) is
    due at once. A trainer restarted in a crash loop shorter than the interval still moves its
    checkpoint on, instead of starting a full interval over each time."""
    if last_saved_at is None:
        return 0.0
    return min(interval, max(0.0, last_saved_at + interval - now))  # a clock set back waits one interval at most


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, oldest (lowest step) first."""
    try:
        entries = list(Path(directory).iterdir())
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), p) for p in entries if (m := _NAME.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: Path,
    *,
    model_state: dict[str, Any],
    optimizer_state: dict[str, Any],
    step: int,
    samples: int,
    schedule_step: int | None = None,
    seconds_trained: float = 0.0,
    config_digest: str = "",
    fingerprint: str = "",
    keep: int = 3,
) -> Path:
    """Write a checkpoint atomically (temp file, fsync, rename, fsync folder); keep the last `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "model": model_state,
        "optimizer": optimizer_state,
        "step": int(step),
        "samples": int(samples),
        # The lr schedule's clock: steps (our own, or continued from a state sync's donor) and
        # training time, so that a restart does not warm the lr up again.
        "schedule_step": int(step if schedule_step is None else schedule_step),
        "seconds_trained": float(seconds_trained),
        "fingerprint": fingerprint,
        "config_digest": config_digest,
        "time": time.time(),
    }
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.{os.getpid()}{_TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(exc, (OSError, RuntimeError)):  # torch reports a failed write as RuntimeError
            raise CheckpointWriteError.of(final, exc) from exc
        raise
    _fsync_dir(directory)
    prune_checkpoints(directory, keep, protect=final)
    return final


def prune_checkpoints(directory: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never `protect`) and stale temp files."""
    directory = Path(directory)
    removed: list[Path] = []
    for stale in directory.glob(f".ckpt-*{_TMP_SUFFIX}"):
        if not stale.name.endswith(f".{os.getpid()}{_TMP_SUFFIX}"):
            stale.unlink(missing_ok=True)  # left by a writer that died mid-write
    files = list_checkpoints(directory)
    for path in files[: max(0, len(files) - max(keep, 1))]:
        if protect is not None and path == protect:
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and validate one checkpoint; raise CheckpointError if it is not usable."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    if data.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {data.get('format')!r}, expected {FORMAT_VERSION}")
    for key, kind in (("model", dict), ("optimizer", dict), ("step", int), ("samples", int)):
        if not isinstance(data.get(key), kind):
            raise CheckpointError(f"{path}: field {key!r} missing or not {kind.__name__}")
    # Both absent in checkpoints of earlier versions.
    schedule_step = data.setdefault("schedule_step", data["step"])
    if type(schedule_step) is not int or schedule_step < 0:
        raise CheckpointError(f"{path}: field 'schedule_step' is {schedule_step!r}, not an int >= 0")
    seconds = data.setdefault("seconds_trained", 0.0)
    if not isinstance(seconds, float) or not 0.0 <= seconds < math.inf:
        raise CheckpointError(f"{path}: field 'seconds_trained' is {seconds!r}, not a finite float >= 0")
    return data


def load_newest_valid(directory: Path, *, quarantine: bool = True) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a broken newer one is logged and, with `quarantine`,
    renamed to *.corrupt so that pruning and the next start leave it alone."""
    for path in reversed(list_checkpoints(Path(directory))):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            if quarantine:
                try:
                    path.rename(path.with_name(path.name + CORRUPT_SUFFIX))
                except OSError as rename_exc:
                    log.warning("cannot set aside %s: %s", path, rename_exc)
    return None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore the optimizer's state (momentum etc.) but keep the configured hyperparameters."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, settings in zip(optimizer.param_groups, configured):
        group.update(settings)
