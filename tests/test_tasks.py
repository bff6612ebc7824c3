"""Task API, digits split and the built-in digits tasks."""

from __future__ import annotations

import dataclasses
import itertools
import pickle
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from peerfed.train.tasks import (
    CheckpointSettings,
    NodeContext,
    TaskLoadError,
    TrainSettings,
    accuracy,
    binary_logit_loss,
    check_task,
    classification_evaluator,
    digits_lr,
    digits_mlp,
    endless_batches,
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
    builtin = load_task_factory("digits-mlp")
    assert builtin.__wrapped__ is digits_mlp  # wrapped: failures name train.task
    (tmp_path / "mytask_mod.py").write_text(textwrap.dedent("""
        from peerfed.train.tasks import digits_lr
        def factory(settings, ctx):
            return digits_lr(settings, ctx)
        def raises(settings, ctx):
            raise RuntimeError("no data at /srv/data")
        def returns_none(settings, ctx):
            return None
        not_callable = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    factory = load_task_factory("mytask_mod:factory")
    task = factory(TrainSettings(), NodeContext(0, 1, 0))
    assert task.num_samples == 1437
    for spec, words in [
        ("no_such_module_xyz:factory", "cannot import .*PYTHONPATH"),
        ("mytask_mod:missing", "no 'missing'"),
        ("mytask_mod:factroy", "did you mean 'factory'"),
        ("mytask_mod:not_callable", "not callable"),
        ("nonsense", "not a built-in"),
        ("digits_mlp", "did you mean 'digits-mlp'"),
    ]:
        with pytest.raises(TaskLoadError, match=words) as info:
            load_task_factory(spec)
        assert str(info.value).startswith(f"train.task {spec!r}: ")
    with pytest.raises(TaskLoadError, match=r"the factory raised RuntimeError: no data at /srv/data \(at .*mytask_mod.py:6 in raises"):
        load_task_factory("mytask_mod:raises")(TrainSettings(), NodeContext(0, 1, 0))
    with pytest.raises(TaskLoadError, match="train.task 'mytask_mod:returns_none': the factory returned NoneType"):
        load_task_factory("mytask_mod:returns_none")(TrainSettings(), NodeContext(0, 1, 0))
    with pytest.raises(TaskLoadError, match="train.task 'digits-lr': the factory raised ValueError: options.alpha"):
        load_task_factory("digits-lr")(TrainSettings(options={"alpha": -1}), NodeContext(0, 1, 0))
    sys.modules.pop("mytask_mod", None)


def test_check_task_names_what_is_wrong() -> None:
    good = digits_lr(TrainSettings(), NodeContext(0, 1, 0))
    assert check_task(good) is None
    assert "positive int" in check_task(dataclasses.replace(good, num_samples=0))
    assert check_task(dataclasses.replace(good, num_samples=np.int64(5))) is None
    assert "not an iterator" in check_task(dataclasses.replace(good, train_batches=[(1, 2)]))
    assert "not callable" in check_task(dataclasses.replace(good, evaluate=None))
    assert "floating-point" in check_task(dataclasses.replace(good, model=torch.nn.ReLU()))


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
    assert (s.task, s.batch_size, s.node_index, s.options) == ("digits-lr", 8, 1, {"alpha": 0.1})
    assert s.checkpoint == CheckpointSettings(interval=60.0, keep=2, dir=tmp_path / "checkpoints", config_digest="abc")
    hash(s)  # usable as a key despite the options dict
    assert pickle.loads(pickle.dumps(s)) == s  # it travels to the trainer process


def test_settings_from_the_real_config(tmp_path) -> None:
    config = pytest.importorskip("peerfed.config")
    cfg = config.Config()
    s = TrainSettings.from_config(cfg)
    assert s.task == cfg.train.task and s.checkpoint.interval == cfg.checkpoint.interval
    assert s.checkpoint.dir is not None and s.checkpoint.dir.name == "checkpoints"
    assert s.checkpoint.config_digest == cfg.digest()


def test_one_logit_binary_model_accuracy_and_loss_are_right() -> None:
    # A fixed Linear(2, 1): logit = x0 - x1. Labels say "x0 > x1" except for 3 of 10 rows,
    # so the true accuracy is 0.7 (argmax over one column would say 1.0 or 0.0).
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.0]]))
        model.bias.zero_()
    x = torch.tensor([[float(i), float(9 - i)] for i in range(10)])  # x0 > x1 for i >= 5
    truth = (x[:, 0] > x[:, 1]).float()
    y = truth.clone()
    y[[0, 5, 9]] = 1 - y[[0, 5, 9]]  # three wrong labels
    with torch.no_grad():
        logits = model(x)
    expected_loss = float(torch.nn.BCEWithLogitsLoss()(logits, y.reshape(-1, 1)))
    for targets in (y, y.reshape(-1, 1), y.long()):  # floats [N], floats [N, 1], ints [N]
        assert accuracy(logits, targets) == pytest.approx(0.7)
        assert accuracy(logits.reshape(-1), targets) == pytest.approx(0.7)
        result = classification_evaluator(x, targets, binary_logit_loss())(model)
        assert result["accuracy"] == pytest.approx(0.7)
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-6)
        chunked = classification_evaluator(x, targets, binary_logit_loss(), batch_size=3)(model)
        assert chunked["accuracy"] == pytest.approx(0.7) and chunked["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert model.training  # the evaluator restores the mode


def test_multi_class_accuracy_with_indices_and_one_hot_targets() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    y = torch.tensor([0, 1, 1, 2])
    assert accuracy(logits, y) == pytest.approx(0.5)
    assert accuracy(logits, torch.nn.functional.one_hot(y, 3).float()) == pytest.approx(0.5)
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    result = classification_evaluator(logits, y, torch.nn.CrossEntropyLoss())(model)
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["loss"] == pytest.approx(float(torch.nn.CrossEntropyLoss()(logits, y)), rel=1e-6)


def test_a_one_logit_model_trains_with_the_helpers(one_thread: None) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).float()  # targets as [N] floats; the model outputs [N, 1]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    loss_fn = binary_logit_loss()
    evaluate = classification_evaluator(x, y, loss_fn)
    before = evaluate(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for xb, yb in itertools.islice(endless_batches(x, y, 32, seed=1), 300):
        loss = loss_fn(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = evaluate(model)
    assert after["accuracy"] > 0.95 and after["loss"] < before["loss"]
