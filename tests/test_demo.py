"""`peerfed demo`: the lr schedule it relies on, the baselines, and one real run (slow)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from peerfed import demo
from peerfed.baselines import options_over_steps, train_allreduce, train_local_only
from peerfed.core.peerid import is_valid_peer_id
from peerfed.demo import DemoSettings, DemoTraining, add_demo_arguments, cmd_demo
from peerfed.demo_report import NodeView, accuracy_figure
from peerfed.train.supervisor import TrainerSupervisor
from peerfed.train.tasks import TrainSettings, lr_factor, lr_schedule_from_options
from peerfed.train.trainer_stats import TrainerStats

ROOT = Path(__file__).resolve().parents[1]
DIGITS_TRAIN_SIZE = 1437


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="peerfed demo")
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_arguments_defaults_and_validation(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse()
    assert (args.nodes, args.task, args.alpha, args.seed, args.out) == (8, "digits-mlp", 0.1, 0, None)
    assert parse("--alpha", "iid").alpha is None and parse("--alpha", "1.0").alpha == 1.0
    assert parse("--out", "d", "--duration", "40").out == Path("d")
    assert args.device == "cpu" and parse("--device", "cuda").device == "cuda"
    for bad in (["--alpha", "0"], ["--alpha", "x"], ["--nodes", "0"], ["--duration", "-1"], ["--device", "gpu"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    assert "alpha" in capsys.readouterr().err
    assert callable(cmd_demo)


def test_node_config_puts_every_node_on_its_shard_with_the_schedule() -> None:
    s = DemoSettings(nodes=3, alpha=None, duration=30.0)
    configs = [s.node_config(i) for i in range(3)]
    assert [c["train.node_index"] for c in configs] == [0, 1, 2]
    assert all(c["train.node_count"] == 3 and c["train.threads"] == 1 for c in configs)
    assert configs[0]["train.options"] == {"alpha": "iid", "lr_schedule": "cosine",
                                           "lr_schedule_seconds": 30.0, "lr_min": 0.0}
    assert DemoSettings(training=DemoTraining(lr_schedule="constant")).task_options() == {"alpha": 0.1}
    assert configs[0]["train.device"] == "cpu"
    assert DemoSettings(training=DemoTraining(device="cuda")).node_config(0)["train.device"] == "cuda"


def test_report_settings_stay_one_flat_table() -> None:
    report = DemoSettings(nodes=3, training=DemoTraining(lr=0.1, device="cuda")).as_report()
    assert list(report) == ["nodes", "task", "alpha", "duration", "seed", "lr", "batch_size", "lr_schedule",
                            "lr_min", "exchange_interval", "eval_interval", "threads", "device",
                            "local_only_max_steps", "task_options", "encoding"]
    assert (report["nodes"], report["lr"], report["device"], report["threads"]) == (3, 0.1, "cuda", 1)
    assert report["task_options"]["alpha"] == 0.1


def test_lr_schedules() -> None:
    assert lr_factor("constant", 0.7) == 1.0
    assert lr_factor("cosine", 0.0) == 1.0 and lr_factor("cosine", 1.0) == pytest.approx(0.0)
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5) and lr_factor("linear", 0.25) == 0.75
    assert lr_factor("cosine", 3.0, min_factor=0.1) == pytest.approx(0.1)  # stays at the floor
    assert lr_schedule_from_options({"alpha": 0.1}) is None
    by_steps = lr_schedule_from_options({"lr_schedule": "linear", "lr_schedule_steps": 100})
    by_time = lr_schedule_from_options({"lr_schedule": "cosine", "lr_schedule_seconds": 10.0, "lr_min": 0.2})
    assert by_steps is not None and by_time is not None
    assert by_steps(50, 999.0) == 0.5 and by_steps(200, 0.0) == 0.0
    assert by_time(10**6, 5.0) == pytest.approx(0.6) and by_time(0, 20.0) == pytest.approx(0.2)
    for bad in ({"lr_schedule": "cosine"}, {"lr_schedule": "step", "lr_schedule_steps": 1},
                {"lr_schedule": "cosine", "lr_schedule_steps": 5, "lr_schedule_seconds": 5},
                {"lr_schedule": "cosine", "lr_schedule_steps": 0},
                {"lr_schedule": "cosine", "lr_schedule_steps": 5, "lr_min": 2}):
        with pytest.raises(ValueError):
            lr_schedule_from_options(bad)


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what the demo uses; a tiny model is slower on more threads
    yield
    torch.set_num_threads(before)


def test_baselines_use_the_schedule_over_their_own_steps(one_thread: None) -> None:
    options = {"alpha": 0.1, "lr_schedule": "cosine", "lr_schedule_seconds": 60.0}
    assert options_over_steps(options, 300) == {"alpha": 0.1, "lr_schedule": "cosine", "lr_schedule_steps": 300}
    assert options_over_steps({"alpha": 0.1}, 300) == {"alpha": 0.1}
    settings = TrainSettings(task="digits-mlp", device="cpu", options=options)
    allreduce = train_allreduce(settings, node_count=4, total_samples=4 * 32 * 300)
    assert (allreduce.steps, allreduce.batch_size, allreduce.samples) == (300, 128, 38400)
    assert allreduce.accuracy > 0.7  # the union is easy, even in 300 steps
    local = train_local_only(settings, node_count=4, samples_per_node=[32 * 300, 32 * 50, 320, 3200], max_steps=100)
    assert [r.steps for r in local] == [100, 50, 10, 100]
    assert [r.capped for r in local] == [True, False, False, False]
    assert all(0.0 <= r.accuracy <= 1.0 for r in local)
    assert sum(r.accuracy for r in local) / 4 < allreduce.accuracy - 0.2  # skewed shards


def test_trainer_follows_the_schedule_and_stamps_evaluations(tmp_path: Path) -> None:
    settings = TrainSettings(
        task="digits-mlp", device="cpu", threads=1, eval_interval=0.2, lr=0.05,
        options={"lr_schedule": "linear", "lr_schedule_steps": 200, "lr_min": 0.1},
    )
    with TrainerSupervisor(settings) as handle:
        handle.start()
        handle.wait_ready(60.0)
        handle.begin_training()
        deadline = time.monotonic() + 60.0
        seen: list[TrainerStats] = []
        while time.monotonic() < deadline:
            handle.poll()
            stats = handle.statistics()
            seen.append(stats)
            if stats.progress.step > 400 and stats.evaluation.step and stats.evaluation.step > 250:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"trainer did not get past 400 steps: {seen[-1]}")
    assert stats.lr_clock.lr == pytest.approx(0.005)  # 0.05 * lr_min once the 200 steps are over
    stamps = [s.evaluation.at for s in seen if s.evaluation.at is not None]
    assert stamps and stamps == sorted(stamps) and stamps[-1] > stamps[0]
    assert abs(stamps[-1] - time.time()) < 30


@pytest.mark.slow
@pytest.mark.timeout(290)
def test_demo_runs_a_real_swarm_and_meets_the_targets(tmp_path: Path) -> None:
    """4 daemons for the default 60 s (the default 8 nodes is the issue's run; 4 keep CI shorter). At
    40 s the 2-point target failed 2 runs of 3 on a slow 2-core machine (mean 2.1 and 2.9 points under)."""
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "peerfed", "demo", "--nodes", "4", "--alpha", "0.1", "--duration", "60",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "t=" in proc.stdout  # not a terminal: plain progress lines
    assert "every daemon stopped cleanly" in proc.stdout

    report = json.loads((out / "report.json").read_text())
    mean, worst = report["mean_accuracy"], report["worst_accuracy"]
    allreduce, local = report["baselines"]["allreduce"], report["baselines"]["local_only"]
    for value in (mean, worst, allreduce, local):
        assert 0.0 <= value <= 1.0
    nodes = report["nodes"]
    assert len(nodes) == 4 and len({n["peer_id"] for n in nodes}) == 4
    for n in nodes:
        assert is_valid_peer_id(n["peer_id"])
        assert 0.0 <= n["accuracy"] <= 1.0
        assert n["exchanges"]["ok"] > 0 and n["bytes_sent"] > 0
        assert set(n["exchanges"]) >= {"ok", "refused", "failed"}
        assert n["exit_code"] == 0 and not n["died"]
        assert n["curve"] and all(0.0 <= a <= 1.0 for _, a in n["curve"])
        assert (out / "nodes" / f"node{n['index']}" / "daemon.log").stat().st_size > 0  # logs kept
    accuracies = [n["accuracy"] for n in nodes]
    assert mean == pytest.approx(sum(accuracies) / 4) and worst == min(accuracies)
    assert report["samples"] == sum(n["samples"] for n in nodes) > 0
    assert report["epochs"] == pytest.approx(report["samples"] / DIGITS_TRAIN_SIZE)
    assert report["settings"]["nodes"] == 4 and report["settings"]["alpha"] == 0.1
    assert report["duration"] > 60 and report["clean_exit"] is True
    assert report["final_reading"]["stale"] == []
    # The targets: gossip tracks all-reduce, and clearly beats training alone.
    assert mean >= allreduce - 0.020, report["baselines"]
    assert worst >= allreduce - 0.040, report["baselines"]
    assert local <= mean - 0.30, report["baselines"]
    assert all(report["acceptance"].values())

    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


class FakeNode:
    """Enough of a LocalNode for wait_all_up: up after `up_after` polls, or exits."""

    def __init__(self, index: int, up_after: int, exit_code: int | None = None) -> None:
        self.index, self.up_after, self.polls = index, up_after, 0
        self.process = SimpleNamespace(poll=lambda: exit_code, returncode=exit_code)

    def is_up(self) -> bool:
        self.polls += 1
        return self.polls > self.up_after

    def log_tail(self, lines: int = 30) -> str:
        return f"log of node {self.index}"


def test_start_up_prints_progress_and_names_a_node_that_died(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "PLAIN_LINE_EVERY_S", 0.3)
    console = Console(record=True, width=200)
    swarm = SimpleNamespace(nodes=[FakeNode(0, 0), FakeNode(1, 6)])
    demo.wait_all_up(swarm, 30.0, console)
    lines = console.export_text().splitlines()
    assert lines and all("1/2 nodes up after" in line for line in lines)
    dead = SimpleNamespace(nodes=[FakeNode(0, 0), FakeNode(1, 99, exit_code=3)])
    with pytest.raises(RuntimeError, match="node 1 exited with 3:\nlog of node 1"):
        demo.wait_all_up(dead, 30.0, console)


def test_baselines_print_progress(one_thread: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "PLAIN_LINE_EVERY_S", 0.5)
    console = Console(record=True, width=200)
    views = [NodeView(i, f"peer{i}", status={"samples": 32 * 60}) for i in range(2)]
    result = demo.run_baselines(DemoSettings(nodes=2), views, console)
    text = console.export_text()
    assert "all-reduce: " in text and "local-only: mean " in text
    assert "baselines: " in text and "models trained" in text  # the ticker ran while they trained
    assert len(result["local_only"]) == 2 and result["allreduce"].steps == 60


def test_plot_starts_at_training_and_draws_baselines_as_end_points() -> None:
    from peerfed.baselines import BaselineResult

    views = [NodeView(0, "a", curve=[(-3.0, 0.1), (0.5, 0.3), (20.0, 0.9)]), NodeView(1, "b", curve=[(1.0, 0.2)])]
    baselines = {"allreduce": BaselineResult(0.95, 100, 64, 1.0),
                 "local_only": [BaselineResult(0.3, 50, 32, 1.0), BaselineResult(0.5, 50, 32, 1.0)]}
    fig = accuracy_figure(views, baselines, DemoSettings(nodes=2, duration=20.0), ended_at=21.0)
    ax = fig.axes[0]
    assert ax.get_xlim()[0] == 0.0  # not the start-up before it
    labels = {line.get_label(): line for line in ax.lines}
    for name in ("all-reduce, final (95.0%)", "local-only, final (mean 40.0%; dots: each node)"):
        xs = list(labels[name].get_xdata())
        assert xs == [21.0], name  # one point at the end, not a line across the run
    assert not [line for line in ax.lines if len(set(line.get_xdata())) > 1 and len(set(line.get_ydata())) == 1]
