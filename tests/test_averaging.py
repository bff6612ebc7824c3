"""Flat buffers, fingerprints, merge math, mixing weights, value checks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from peerfed.averaging import (
    FlatLayout,
    ValueCheck,
    averaged_tensors,
    bind_to_flat,
    check_values,
    delta_into,
    fingerprint,
    flatten_into,
    merge_,
    mixing_weight,
    unflatten_from,
)


def make_model(hidden: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_averaged_tensors_skip_integer_buffers_and_keep_state_dict_order() -> None:
    model = make_model()
    names = [name for name, _ in averaged_tensors(model)]
    assert "1.num_batches_tracked" not in names
    assert names == [k for k, v in model.state_dict().items() if v.is_floating_point()]
    assert "1.running_mean" in names and "1.running_var" in names


def test_tied_weights_appear_once() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    assert [n for n, _ in averaged_tensors(model)] == ["0.weight", "0.bias", "1.bias"]


def test_layout_offsets_and_sizes() -> None:
    layout = FlatLayout.from_model(make_model())
    expected = [20, 5, 5, 5, 5, 5, 15, 3]
    assert [s.numel for s in layout.slots] == expected
    assert layout.offsets == [sum(expected[:i]) for i in range(len(expected))]
    assert layout.numel == sum(expected) and layout.nbytes == 4 * sum(expected)


def test_flatten_unflatten_round_trip() -> None:
    source, target = make_model(), make_model()
    for p in source.parameters():
        p.data.normal_()
    source[1].running_mean.fill_(0.25)
    layout = FlatLayout.from_model(source)
    flat = layout.new_buffer()
    flatten_into(source, flat)
    unflatten_from(flat, target)
    for (name, a), (_, b) in zip(averaged_tensors(source), averaged_tensors(target)):
        assert torch.equal(a, b), name
    # integer buffers are not touched
    target[1].num_batches_tracked.fill_(7)
    unflatten_from(flat, target)
    assert int(target[1].num_batches_tracked) == 7


def test_flatten_converts_other_dtypes() -> None:
    model = nn.Linear(3, 2).to(torch.float64)
    flat = FlatLayout.from_model(model).new_buffer()
    flatten_into(model, flat)
    assert torch.allclose(flat[:6].double(), model.weight.reshape(-1), atol=1e-6)
    flat.fill_(0.5)
    unflatten_from(flat, model)
    assert model.weight.dtype == torch.float64 and bool((model.weight == 0.5).all())


def test_bind_to_flat_makes_optimizer_write_into_the_buffer() -> None:
    model = make_model()
    before = FlatLayout.from_model(model).new_buffer()
    flatten_into(model, before)
    flat = FlatLayout.from_model(model).new_buffer()
    bind_to_flat(model, flat)
    assert torch.equal(flat, before)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    opt.step()
    after = FlatLayout.from_model(model).new_buffer()
    flatten_into(model, after)
    assert torch.equal(after, flat) and not torch.equal(flat, before)
    # BatchNorm running stats (buffers) also live in the buffer
    assert model[1].running_mean.data_ptr() == flat[35:40].data_ptr()


def test_fingerprint_depends_on_layout_not_values() -> None:
    a, b = make_model(), make_model()
    for p in b.parameters():
        p.data.add_(1.0)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(make_model(hidden=6))
    assert fingerprint(a) != fingerprint(make_model().to(torch.float64))
    assert len(fingerprint(a)) == 64 and int(fingerprint(a), 16) >= 0


def test_merge_matches_formula_across_chunks() -> None:
    gen = torch.Generator().manual_seed(1)
    local, sent, received = (torch.randn(10_007, generator=gen) for _ in range(3))
    expected = local + 0.3 * (received - sent)
    merge_(local, sent, received, 0.3, chunk=1000)
    assert torch.allclose(local, expected, atol=1e-6)
    out = torch.empty(10_007)
    delta_into(out, sent, received, 0.3)
    assert torch.allclose(out, 0.3 * (received - sent), atol=1e-7)


def test_merge_takes_the_hold_per_slice_and_keeps_steps_taken_between_slices() -> None:
    gen = torch.Generator().manual_seed(2)
    local, sent, received = (torch.randn(10_007, generator=gen) for _ in range(3))
    expected = local + 0.3 * (received - sent) + 1.0  # + a "trainer step" of +1 everywhere
    holds: list[int] = []

    @contextmanager
    def hold() -> Iterator[None]:
        holds.append(1)
        yield
        if len(holds) == 4:  # between two slices, another writer changes all of `local`
            local.add_(1.0)

    merge_(local, sent, received, 0.3, chunk=1000, hold=hold)
    assert len(holds) == 11  # ceil(10_007 / 1000)
    assert torch.allclose(local, expected, atol=1e-5)


def test_merge_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError):
        merge_(torch.zeros(4), torch.zeros(4), torch.zeros(5), 0.5)
    with pytest.raises(ValueError):
        merge_(torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(4), 0.5)


def test_mixing_weight() -> None:
    assert mixing_weight(10, 10) == 0.5
    assert mixing_weight(10, 30) == pytest.approx(0.75)
    assert mixing_weight(10, 30) + mixing_weight(30, 10) == pytest.approx(1.0)
    assert mixing_weight(0, 0) == 0.5
    assert mixing_weight(5, 0) == 0.0 and mixing_weight(0, 5) == 1.0
    assert mixing_weight(float("nan"), -3) == 0.5


def test_pairwise_exchange_reaches_sample_weighted_mean() -> None:
    n_a, n_b = 100.0, 300.0
    x_a, x_b = torch.full((1000,), 1.0), torch.full((1000,), 5.0)
    sent_a, sent_b = x_a.clone(), x_b.clone()  # both snapshots, sent at the same time
    merge_(x_a, sent_a, sent_b, mixing_weight(n_a, n_b))
    merge_(x_b, sent_b, sent_a, mixing_weight(n_b, n_a))
    mean = (n_a * 1.0 + n_b * 5.0) / (n_a + n_b)
    assert torch.allclose(x_a, torch.full_like(x_a, mean)) and torch.allclose(x_b, x_a)


def test_merge_keeps_local_progress() -> None:
    sent = torch.zeros(10)
    local = sent + 0.1  # a local step taken while the bytes were in flight
    merge_(local, sent, torch.ones(10), 0.5)
    assert torch.allclose(local, torch.full((10,), 0.6))


def test_value_check_fed_in_pieces_agrees_with_check_values() -> None:
    gen = torch.Generator().manual_seed(3)
    for buf in (torch.randn(3_000_001, generator=gen), torch.full((2_500_000,), 1e8)):
        check = ValueCheck(buf)
        for upto in (1, 999_999, 1_000_000, 2_345_678, 2_345_678, 10**9):
            check.advance(upto)
        assert check.problem() == check_values(buf)
    bad = torch.zeros(2_100_000)
    bad[2_050_000] = float("inf")
    check = ValueCheck(bad)
    check.advance(2_000_000)
    assert check.problem() is not None and "2050000" in (check.problem() or "")


def test_check_values() -> None:
    good = torch.randn(3 * (1 << 20) + 5)
    assert check_values(good) is None
    bad = good.clone()
    bad[(1 << 20) + 3] = float("nan")
    reason = check_values(bad)
    assert reason is not None and "non-finite" in reason and str((1 << 20) + 3) in reason
    bad[(1 << 20) + 3] = float("inf")
    assert check_values(bad) is not None
    assert "norm" in (check_values(torch.full((100,), 1e8)) or "")
    assert check_values(torch.full((100,), 1e5)) is None
    assert check_values(torch.zeros(0)) is None
    assert math.isfinite(float(good.norm()))
