"""The trainer process, its supervisor and its weights port: a real child process training digits-mlp on CPU."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peerfed.averaging import FlatLayout, check_values
from peerfed.errors import TrainerUnavailable
from peerfed.train.checkpoint import list_checkpoints, load_newest_valid
from peerfed.train.messages import (
    Attach,
    CheckpointInfo,
    CheckpointSaved,
    Failed,
    Hello,
    Ready,
    ReadyInfo,
    SetClock,
    Start,
    Stats,
    Stop,
    Stopped,
)
from peerfed.train.shm import REQ_LOAD, REQ_MERGE, REQ_SNAPSHOT, ControlBlock
from peerfed.train.supervisor import TrainerError, TrainerSupervisor
from peerfed.train.tasks import CheckpointSettings, TrainSettings
from peerfed.train.trainer_stats import Evaluation, ProcessState, Progress, TrainerStats
from peerfed.train.weight_store import WeightStore
from peerfed.train.weights_port import TrainerLink, WeightsPort

READY_TIMEOUT = 60.0


def settings(tmp_path: Path, *, checkpoint_interval: float = 0.5, checkpoints: bool = True,
             **kw: Any) -> TrainSettings:
    base: dict[str, Any] = dict(task="digits-mlp", device="cpu", threads=1, eval_interval=0.5)
    base.update(kw)
    checkpoint = CheckpointSettings(interval=checkpoint_interval, keep=3,
                                    dir=tmp_path / "checkpoints" if checkpoints else None)
    return TrainSettings(**base, checkpoint=checkpoint)


def wait_for(handle: TrainerSupervisor, condition: Callable[[TrainerStats], bool], timeout: float = 30.0) -> TrainerStats:
    deadline = time.monotonic() + timeout
    while True:
        handle.poll()
        stats = handle.statistics()
        if condition(stats):
            return stats
        assert time.monotonic() < deadline, f"timed out; last statistics: {stats}"
        time.sleep(0.02)


@pytest.fixture
def handles() -> Iterator[list[TrainerSupervisor]]:
    made: list[TrainerSupervisor] = []
    yield made
    for h in made:
        h.stop(timeout=5)


def test_trains_snapshots_survives_kill_and_stops_with_checkpoint(tmp_path: Path, handles: list[TrainerSupervisor]) -> None:
    handle = TrainerSupervisor(settings(tmp_path))
    handles.append(handle)
    with pytest.raises(TrainerUnavailable):
        handle.weights.snapshot_into(torch.empty(1))
    handle.start()
    info = handle.wait_ready(READY_TIMEOUT)
    assert info.mode == "direct" and info.device == "cpu" and info.num_samples == 1437
    assert info.nbytes == 4 * info.numel == 4 * (64 * 32 + 32 + 32 * 10 + 10)
    assert info.resumed_step == 0 and handle.weights.fingerprint == info.fingerprint
    time.sleep(0.3)
    assert handle.statistics().progress.step == 0  # waits for begin_training
    handle.begin_training()
    began = time.monotonic()
    stats = wait_for(handle, lambda s: s.progress.step > 300 and s.evaluation.metrics)
    assert 0.0 <= stats.evaluation.metrics["accuracy"] <= 1.0 and stats.process.alive and stats.process.training

    first, second = torch.empty(info.numel), torch.empty(info.numel)
    handle.weights.snapshot_into(first)
    wait_for(handle, lambda s: s.progress.step > stats.progress.step + 100)
    handle.weights.snapshot_into(second)
    assert check_values(first) is None and check_values(second) is None
    assert not torch.equal(first, second)  # taken while training
    with pytest.raises(ValueError):
        handle.weights.snapshot_into(torch.empty(info.numel + 1))

    # kill -9: restarted from its last checkpoint, training again without being told
    with_checkpoint = wait_for(handle, lambda s: s.process.last_checkpoint is not None and s.process.last_checkpoint.step > 0)
    progress = handle.progress_counter()
    os.kill(handle._process.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(handle, lambda s: not s.process.alive, timeout=5)
    killed_at = handle.statistics().progress.step
    checkpointed = handle.statistics().process.last_checkpoint.step
    assert checkpointed >= with_checkpoint.process.last_checkpoint.step
    with pytest.raises(TrainerUnavailable):
        handle.weights.snapshot_into(first)
    after = wait_for(handle, lambda s: s.process.ready, timeout=READY_TIMEOUT)
    assert after.process.restarts == 1
    resumed = handle.weights.ready_info.resumed_step
    assert checkpointed <= resumed <= killed_at  # (a checkpoint may land just before the kill)
    # the lr schedule's clock goes on from the checkpoint instead of starting over
    assert 0.0 < handle.weights.ready_info.resumed_seconds < time.monotonic() - began
    steps_per_interval = stats.progress.steps_per_s * 0.5
    assert killed_at - resumed <= max(2 * steps_per_interval, 2000)  # lost at most ~one interval
    wait_for(handle, lambda s: s.progress.step > checkpointed + 50)
    assert handle.progress_counter() > progress  # heartbeat keeps counting across restarts

    handle.stop(timeout=10)
    final_step = handle.statistics().process.last_checkpoint.step
    found = load_newest_valid(tmp_path / "checkpoints")
    assert found is not None
    path, data = found
    assert data["step"] == final_step > checkpointed and data["fingerprint"] == info.fingerprint
    assert len(list_checkpoints(tmp_path / "checkpoints")) <= 3
    assert not handle.statistics().process.alive


def test_a_restarted_trainers_first_checkpoint_counts_from_the_newest_one(
        tmp_path: Path, handles: list[TrainerSupervisor]) -> None:
    """A crash loop shorter than checkpoint.interval used to start the interval over at each
    restart, so the checkpoint never moved; now the interval counts from the newest checkpoint."""
    interval, directory = 600.0, tmp_path / "checkpoints"
    first = TrainerSupervisor(settings(tmp_path, checkpoint_interval=interval))
    handles.append(first)
    first.start()
    first.wait_ready(READY_TIMEOUT)
    first.begin_training()
    wait_for(first, lambda s: s.process.last_checkpoint is not None and s.process.last_checkpoint.step > 0)  # none yet: at once
    first.stop(timeout=10)  # and the final one

    # As if that one were written long ago (the node was down, or crashed for a while).
    newest = list_checkpoints(directory)[-1]
    data = torch.load(newest, map_location="cpu", weights_only=True)
    data["time"] -= 2 * interval
    torch.save(data, newest)
    second = TrainerSupervisor(settings(tmp_path, checkpoint_interval=interval))
    handles.append(second)
    second.start()
    resumed = second.wait_ready(READY_TIMEOUT).resumed_step
    assert resumed == data["step"]
    second.begin_training()
    saved = wait_for(second, lambda s: s.process.last_checkpoint is not None and s.process.last_checkpoint.step > resumed)
    assert saved.process.last_checkpoint is not None

    # That one is fresh: a trainer killed now and restarted waits for the rest of its interval.
    files = list_checkpoints(directory)
    os.kill(second._process.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(second, lambda s: not s.process.alive, timeout=5)
    again = wait_for(second, lambda s: s.process.ready, timeout=READY_TIMEOUT)
    wait_for(second, lambda s: s.progress.step > again.progress.step + 200)
    time.sleep(0.5)
    assert list_checkpoints(directory) == files


def test_a_donors_lr_clock_goes_on_and_survives_a_restart(tmp_path: Path, handles: list[TrainerSupervisor]) -> None:
    # cosine over 1M steps: taking over a donor's clock at step 500k starts at half the lr.
    options = {"lr_schedule": "cosine", "lr_schedule_steps": 1_000_000}
    handle = TrainerSupervisor(settings(tmp_path, lr=0.1, options=options))
    handles.append(handle)
    handle.start()
    handle.wait_ready(READY_TIMEOUT)
    own = torch.empty(handle.weights.numel)
    handle.weights.snapshot_into(own)
    handle.weights.load_weights(own, lr_clock=(500_000, 300.0))  # as state sync does
    began = time.monotonic()
    handle.begin_training()
    stats = wait_for(handle, lambda s: s.progress.step > 50 and s.lr_clock.seconds_trained > 300.0)  # stats of a trained step
    assert stats.lr_clock.schedule_step - stats.progress.step == 500_000
    assert stats.lr_clock.seconds_trained < 300.0 + (time.monotonic() - began)
    assert 0.04 < stats.lr_clock.lr < 0.05 + 1e-6  # 0.1 * cosine factor just past its middle, not 0.1
    assert handle.lr_clock()[0] >= stats.lr_clock.schedule_step

    # the clock is checkpointed: a restarted trainer goes on from it, not from its own step
    checkpointed = wait_for(handle, lambda s: s.process.last_checkpoint is not None and s.process.last_checkpoint.step > 0).process.last_checkpoint
    assert checkpointed is not None
    os.kill(handle._process.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
    wait_for(handle, lambda s: s.process.ready and s.process.restarts == 1, timeout=READY_TIMEOUT)
    after = wait_for(handle, lambda s: s.progress.step > handle.weights.ready_info.resumed_step)
    assert after.lr_clock.schedule_step - after.progress.step == 500_000
    assert handle.weights.ready_info.resumed_seconds > 300.0
    data = load_newest_valid(tmp_path / "checkpoints")
    assert data is not None and data[1]["schedule_step"] - data[1]["step"] == 500_000
    assert data[1]["step"] >= checkpointed.step


@pytest.mark.parametrize("mirror", [False, True], ids=["direct", "mirror"])
def test_load_and_merge_are_exact_on_a_frozen_trainer(tmp_path: Path, handles: list[TrainerSupervisor], mirror: bool) -> None:
    # lr = 0: steps run but leave the weights as they are, so the effects can be checked exactly.
    handle = TrainerSupervisor(settings(tmp_path, lr=0.0, checkpoints=False), _force_mirror=mirror)
    handles.append(handle)
    handle.start()
    info = handle.wait_ready(READY_TIMEOUT)
    assert info.mode == ("mirror" if mirror else "direct")

    peer = torch.randn(info.numel, generator=torch.Generator().manual_seed(7)) * 0.1
    handle.weights.load_weights(peer)  # state sync before the first step
    got = torch.empty(info.numel)
    handle.weights.snapshot_into(got)
    assert torch.equal(got, peer)

    handle.begin_training()
    wait_for(handle, lambda s: s.progress.step > 100)
    sent = torch.empty(info.numel)
    handle.weights.snapshot_into(sent)
    assert torch.equal(sent, peer)
    handle.weights.merge(sent + 1.0, sent, 0.25)  # while it trains
    handle.weights.snapshot_into(got)
    assert torch.allclose(got, sent + 0.25, atol=1e-6)
    # the trainer really trains on the merged weights: its evaluation sees them
    handle.weights.load_weights(torch.zeros(info.numel))
    wait_for(handle, lambda s: abs(s.evaluation.metrics.get("loss", 0.0) - 2.302585) < 1e-4, timeout=10)


def test_bad_task_fails_fast_with_its_name(tmp_path: Path, handles: list[TrainerSupervisor]) -> None:
    handle = TrainerSupervisor(settings(tmp_path, task="no_such_module_qq:factory"))
    handles.append(handle)
    handle.start()
    with pytest.raises(TrainerError, match="no_such_module_qq"):
        handle.wait_ready(READY_TIMEOUT)
    assert not handle.statistics().process.alive and handle.statistics().process.restarts == 0


def _run_daemon_then_die(checkpoint_dir: str, pid_file: str) -> None:
    handle = TrainerSupervisor(settings(Path(checkpoint_dir), checkpoint_interval=1000.0))
    handle.start()
    handle.wait_ready(READY_TIMEOUT)
    handle.begin_training()
    Path(pid_file).write_text(str(handle._process.process.pid))  # type: ignore[union-attr]
    time.sleep(60)


def test_trainer_exits_when_the_daemon_dies(tmp_path: Path) -> None:
    pid_file = tmp_path / "trainer.pid"
    daemon = mp.get_context("spawn").Process(target=_run_daemon_then_die, args=(str(tmp_path), str(pid_file)))
    daemon.start()
    deadline = time.monotonic() + READY_TIMEOUT
    while not pid_file.exists():
        assert time.monotonic() < deadline and daemon.is_alive()
        time.sleep(0.05)
    trainer_pid = int(pid_file.read_text())
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.join()
    deadline = time.monotonic() + 10
    while _alive(trainer_pid):
        assert time.monotonic() < deadline, "the trainer outlived its daemon"
        time.sleep(0.05)
    found = load_newest_valid(tmp_path / "checkpoints")  # no periodic one: written on the way out
    assert found is not None and found[1]["step"] > 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_before_ready_and_stop_twice(tmp_path: Path) -> None:
    handle = TrainerSupervisor(settings(tmp_path))
    handle.start()
    handle.stop(timeout=20)  # the child may still be importing torch
    handle.stop()
    assert not handle.statistics().process.alive
    with pytest.raises(TrainerUnavailable):
        handle.weights.snapshot_into(torch.empty(1))


# --------------------------------------------------------------- trainer-side weight store, in-process


def _store_setup(model: torch.nn.Module) -> tuple[WeightStore, torch.Tensor, torch.Tensor]:
    layout = FlatLayout.from_model(model)
    shared, delta = layout.new_buffer(), layout.new_buffer()
    return WeightStore(model, layout, shared, delta, mirror=True, device=torch.device("cpu")), shared, delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["mirror", "copy"])
def test_weight_store_serves_requests(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(dtype))
    store, shared, delta = _store_setup(model)
    assert store.mode == ("mirror" if dtype == torch.float32 else "copy")
    before = shared.clone()  # published at creation
    assert torch.allclose(before[:12], model[0].weight.reshape(-1))
    delta.fill_(0.5)
    store.serve(REQ_MERGE)
    store.serve(REQ_SNAPSHOT)
    assert torch.allclose(shared, before + 0.5, atol=1e-6)
    assert torch.allclose(model[1].bias, (before[-2:] + 0.5).to(dtype), atol=1e-6)
    shared.copy_(torch.arange(shared.numel(), dtype=torch.float32))
    store.serve(REQ_LOAD)
    assert model[1].bias[1].item() == shared.numel() - 1
    assert shared.data_ptr() != model[0].weight.data_ptr()  # mirrored, not shared


# --------------------------------------------------------------- the boundary's types and the port, in-process

STATUS_KEYS = [
    "step", "samples", "metrics", "loss", "steps_per_s", "evaluated_at", "evaluated_step", "lr", "schedule_step",
    "seconds_trained", "device", "mode", "num_samples", "alive", "ready", "training", "restarts", "progress",
    "last_progress_age_s", "last_checkpoint", "last_error",
]
INFO = ReadyInfo(fingerprint="f" * 64, nbytes=40, numel=10, num_samples=7, device="cpu", mode="direct",
                 resumed_step=0, resumed_samples=0, resumed_seconds=0.0, resumed_from=None)


def test_trainer_stats_keep_the_status_keys() -> None:
    stats = TrainerStats(evaluation=Evaluation(metrics={"accuracy": 0.5}),
                         process=ProcessState(last_checkpoint=CheckpointInfo("ckpt", 3, 96, 1.0)))
    view = stats.as_status()  # the daemon's /status "trainer" (tests, the demo, operators)
    assert list(view) == STATUS_KEYS
    assert view["last_checkpoint"] == {"path": "ckpt", "step": 3, "samples": 96, "time": 1.0}
    assert json.loads(json.dumps(view))["metrics"] == {"accuracy": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.progress.step = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.process = ProcessState()  # type: ignore[misc]
    view["metrics"]["accuracy"] = 0.0  # type: ignore[index]
    assert stats.evaluation.metrics == {"accuracy": 0.5}  # the view is a copy
    # the heartbeat keeps its status names
    beat = TrainerStats(progress=Progress(heartbeat=7, heartbeat_age_s=1.5)).as_status()
    assert (beat["progress"], beat["last_progress_age_s"]) == (7, 1.5)


def test_a_stats_report_lands_under_the_status_keys_of_its_field_names() -> None:
    report = Stats(step=3, samples=96, metrics={"loss": 2.3}, loss=2.5, steps_per_s=40.0, evaluated_at=1.0,
                   evaluated_step=2, lr=0.1, schedule_step=503, seconds_trained=9.5)
    before = TrainerStats(process=ProcessState(device="cpu", restarts=2), progress=Progress(heartbeat=11))
    view = before.with_report(report).as_status()
    for f in dataclasses.fields(Stats):
        assert view[f.name] == getattr(report, f.name), f.name
    assert (view["device"], view["restarts"], view["progress"]) == ("cpu", 2, 11)  # kept


@pytest.mark.parametrize("message", [
    Attach("peerfed_1_a", None), SetClock(500_000, 300.0), Start(), Stop(),
    Hello("f" * 64, 10, True), Ready(INFO), Stats(step=3, samples=96, metrics={"loss": 2.3}, lr=0.1),
    CheckpointSaved(CheckpointInfo("ckpt", 3, 96, 1.0)), Failed("boom"), Stopped(None),
], ids=lambda m: type(m).__name__)
def test_messages_cross_the_process_boundary_as_they_are(message: object) -> None:
    assert pickle.loads(pickle.dumps(message)) == message


def test_weights_port_refuses_unless_connected_to_a_live_trainer() -> None:
    control = ControlBlock.create()
    port = WeightsPort(lambda: (12, 3.5))
    sent: list[object] = []
    alive = [True]
    link = TrainerLink(threading.Lock(), lambda: alive[0], sent.append)
    try:
        with pytest.raises(TrainerUnavailable, match="not running"):
            port.snapshot_into(torch.empty(10))
        with pytest.raises(TrainerUnavailable, match="not ready yet"):
            port.fingerprint
        port.attach(control, 10, mirror=False)
        port.disconnect("trainer not ready")
        with pytest.raises(TrainerUnavailable, match="not ready"):
            port.load_weights(torch.ones(10))
        port.connect(link, INFO)
        assert (port.fingerprint, port.nbytes, port.numel, port.num_samples) == ("f" * 64, 40, 10, 7)
        assert port.lr_clock() == (12, 3.5)
        port.load_weights(torch.arange(10.0), lr_clock=(500, 2.0))
        assert sent == [SetClock(500, 2.0)]  # the donor's clock goes to the trainer
        got = torch.empty(10)
        port.snapshot_into(got)
        assert torch.equal(got, torch.arange(10.0))
        port.merge(got + 2.0, got, 0.5)
        port.begin_snapshot()
        port.snapshot_range(got, 0, 10)
        assert torch.equal(got, torch.arange(10.0) + 1.0)
        with pytest.raises(ValueError):
            port.merge(got, got, float("nan"))
        alive[0] = False  # died, and the supervisor has not noticed yet
        with pytest.raises(TrainerUnavailable, match="not running"):
            port.snapshot_into(got)
    finally:
        port.close()
        control.close()
    with pytest.raises(TrainerUnavailable, match="stopped"):
        port.snapshot_into(torch.empty(10))
