"""Task API, digits split and the built-in digits tasks."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from peerfed.train.tasks import (
    NodeContext,
    TaskLoadError,
    TrainSettings,
    digits_mlp,
    load_digits_split,
    load_task_factory,
    split_digits,
)


def test_digits_split_sizes_and_scaling() -> None:
    data = load_digits_split()
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.dtype == np.float32 and 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert set(np.unique(data.y_test)) == set(range(10))


@pytest.mark.parametrize("alpha", [None, 1.0, 0.1])
def test_shards_deterministic_disjoint_cover_nonempty(alpha: float | None) -> None:
    shards = split_digits(16, alpha, seed=3)
    again = split_digits(16, alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again))
    joined = np.concatenate(shards)
    assert len(joined) == 1437 and len(np.unique(joined)) == 1437  # disjoint and covering
    assert min(len(s) for s in shards) >= 10
    other = split_digits(16, alpha, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(shards, other))


def test_dirichlet_small_alpha_is_skewed_and_iid_is_not() -> None:
    labels = load_digits_split().y_train

    def top3_share(shards: list[np.ndarray]) -> list[float]:
        shares = []
        for s in shards:
            counts = np.sort(np.bincount(labels[s], minlength=10))[::-1]
            shares.append(counts[:3].sum() / counts.sum())
        return shares

    harsh = top3_share(split_digits(10, 0.1, seed=0))
    assert sum(share >= 0.75 for share in harsh) >= 7  # most shards: three labels or fewer
    iid = top3_share(split_digits(10, None, seed=0))
    assert max(iid) < 0.5


def test_too_many_nodes_is_an_error() -> None:
    with pytest.raises(ValueError):
        split_digits(2000, None)


def test_builtin_and_module_factories(tmp_path, monkeypatch) -> None:
    assert load_task_factory("digits-mlp") is digits_mlp
    (tmp_path / "mytask_mod.py").write_text(textwrap.dedent("""
        from peerfed.train.tasks import digits_lr
        def factory(settings, ctx):
            return digits_lr(settings, ctx)
        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = load_task_factory("mytask_mod:factory")
    task = factory(TrainSettings(), NodeContext(0, 1, 0))
    assert task.num_samples == 1437
    for spec, words in [
        ("no_such_module_xyz:factory", "cannot import"),
        ("mytask_mod:missing", "no 'missing'"),
        ("mytask_mod:not_callable", "not callable"),
        ("nonsense", "not a built-in"),
    ]:
        with pytest.raises(TaskLoadError, match=words) as info:
            load_task_factory(spec)
        assert spec in str(info.value)
    sys.modules.pop("mytask_mod", None)


def test_node_shards_match_split_and_batches_are_endless() -> None:
    settings = TrainSettings(batch_size=16, options={"alpha": 0.5})
    tasks = [digits_mlp(settings, NodeContext(i, 4, 0)) for i in range(4)]
    assert [t.num_samples for t in tasks] == [len(s) for s in split_digits(4, 0.5)]
    x, y = next(tasks[0].train_batches)
    assert x.shape == (16, 64) and y.shape == (16,) and y.dtype == torch.int64
    assert len(list(itertools.islice(tasks[0].train_batches, 500))) == 500
    # same initial model on every node (same seed)
    assert all(torch.equal(a, b) for a, b in zip(tasks[0].model.state_dict().values(), tasks[1].model.state_dict().values()))
    with pytest.raises(ValueError):
        digits_mlp(settings, NodeContext(4, 4, 0))


@pytest.fixture
def one_thread() -> Iterator[None]:
    # Small models are much slower with several threads on a busy 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_digits_mlp_alone_learns(one_thread: None) -> None:
    task = digits_mlp(TrainSettings(), NodeContext(0, 1, 0))  # default lr 0.05, batch 32
    before = task.evaluate(task.model)
    optimizer = task.make_optimizer(task.model.parameters())
    for x, y in itertools.islice(task.train_batches, 600):
        loss = task.loss_fn(task.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = task.evaluate(task.model)
    assert set(after) >= {"accuracy", "loss"}
    assert after["accuracy"] > 0.85, after
    assert after["loss"] < before["loss"]


def test_settings_from_config_reads_attributes(tmp_path) -> None:
    class Obj:
        def __init__(self, **kw: object) -> None:
            self.__dict__.update(kw)

    cfg = Obj(
        train=Obj(task="digits-lr", device="cpu", batch_size=8, lr=0.2, seed=5, threads=1, eval_interval=2.0,
                  init="local", node_index=1, node_count=3, options={"alpha": 0.1}),
        checkpoint=Obj(interval=60.0, keep=2),
        state_dir=tmp_path,
        digest=lambda: "abc",
    )
    s = TrainSettings.from_config(cfg)
    assert (s.task, s.batch_size, s.node_index, s.checkpoint_keep, s.config_digest) == ("digits-lr", 8, 1, 2, "abc")
    assert s.checkpoint_dir == tmp_path / "checkpoints" and s.options == {"alpha": 0.1}
    hash(s)  # usable as a key despite the options dict


def test_settings_from_the_real_config(tmp_path) -> None:
    config = pytest.importorskip("peerfed.config")
    cfg = config.Config()
    s = TrainSettings.from_config(cfg)
    assert s.task == cfg.train.task and s.checkpoint_interval == cfg.checkpoint.interval
    assert s.checkpoint_dir is not None and s.checkpoint_dir.name == "checkpoints"
    assert s.config_digest == cfg.digest()
