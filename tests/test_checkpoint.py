"""Checkpoint files: atomic writes, retention, fallback past a broken newest file."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from peerfed.train.checkpoint import (
    CORRUPT_SUFFIX,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_name,
    first_checkpoint_delay,
    list_checkpoints,
    load_checkpoint,
    load_newest_valid,
    save_checkpoint,
)


def save(directory: Path, step: int, keep: int = 3, model: nn.Module | None = None) -> Path:
    model = model or nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return save_checkpoint(
        directory, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
        step=step, samples=step * 32, seconds_trained=step / 10, config_digest="digest", fingerprint="fp", keep=keep,
    )


def test_names_sort_by_step() -> None:
    assert checkpoint_name(123) == "ckpt-000000123.pt"
    assert sorted([checkpoint_name(s) for s in (10, 9, 1000)]) == [checkpoint_name(s) for s in (9, 10, 1000)]


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    path = save(tmp_path, 7, model=model)
    data = load_checkpoint(path)
    assert data["format"] == FORMAT_VERSION and data["step"] == 7 and data["samples"] == 224
    assert data["config_digest"] == "digest" and data["fingerprint"] == "fp" and data["time"] > 0
    assert data["seconds_trained"] == 0.7 and data["schedule_step"] == 7  # defaults to the step
    assert torch.equal(data["model"]["weight"], model.weight.detach())
    fresh = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(data["optimizer"])  # momentum buffers came back
    assert len(fresh.state) == 2


def test_atomic_write_leaves_no_temp_and_failure_keeps_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save(tmp_path, 1)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]

    def broken_save(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save(tmp_path, 2)
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp file, no half file
    assert load_newest_valid(tmp_path)[0] == first  # type: ignore[index]


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")])
def test_a_failed_write_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    def full_disk(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as caught:
        save(tmp_path, 7)
    assert str(tmp_path / checkpoint_name(7)) in str(caught.value)
    if isinstance(failure, OSError):
        assert caught.value.errno == errno.ENOSPC and "No space left on device" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # no temp file


def test_a_started_trainers_first_checkpoint_counts_from_the_newest_one() -> None:
    now, interval = 10_000.0, 300.0
    assert first_checkpoint_delay(None, now, interval) == 0.0  # none yet: at once
    assert first_checkpoint_delay(now - 1000.0, now, interval) == 0.0  # overdue: at once
    assert first_checkpoint_delay(now - 100.0, now, interval) == 200.0  # the rest of its interval
    assert first_checkpoint_delay(now + 5000.0, now, interval) == interval  # clock set back: one interval at most


def test_keep_last_k(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20, 25):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(20), checkpoint_name(25)]


def test_stale_temp_files_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / f".{checkpoint_name(3)}.99999999.tmp"
    stale.write_bytes(b"junk")
    save(tmp_path, 4)
    assert not stale.exists()


def test_truncated_newest_falls_back_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save(tmp_path, 10)
    newest = save(tmp_path, 20)
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="peerfed.checkpoint"):
        found = load_newest_valid(tmp_path)
    assert found is not None
    path, data = found
    assert path.name == checkpoint_name(10) and data["step"] == 10
    assert any(checkpoint_name(20) in r.getMessage() for r in caplog.records)
    # set aside, so that it neither shadows nor displaces newer good files
    assert not newest.exists() and newest.with_name(newest.name + CORRUPT_SUFFIX).exists()


def test_garbage_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / checkpoint_name(1)).write_bytes(os.urandom(100))
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / checkpoint_name(1))
    torch.save({"format": 99}, tmp_path / checkpoint_name(2))
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(tmp_path / checkpoint_name(2))
    assert load_newest_valid(tmp_path, quarantine=False) is None
    assert load_newest_valid(tmp_path / "missing") is None


def test_lr_clock_defaults_for_old_checkpoints_and_is_validated(tmp_path: Path) -> None:
    path = save(tmp_path, 5)
    data = torch.load(path, weights_only=True)
    del data["seconds_trained"], data["schedule_step"]  # as written before the lr clock was checkpointed
    torch.save(data, path)
    loaded = load_checkpoint(path)
    assert loaded["seconds_trained"] == 0.0 and loaded["schedule_step"] == 5
    for field, bad in (("seconds_trained", -1.0), ("seconds_trained", float("nan")),
                       ("seconds_trained", float("inf")), ("seconds_trained", "12"),
                       ("schedule_step", -1), ("schedule_step", 2.0), ("schedule_step", True)):
        torch.save({**data, field: bad}, path)
        with pytest.raises(CheckpointError, match=field):
            load_checkpoint(path)
