"""The outer step (averaging.outer_step_): DiLoCo's Nesterov SGD and NoLoCo's step on the pair."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from peerfed.averaging import (
    OUTER_LR,
    OUTER_MOMENTUM,
    merge_,
    outer_step_,
    start_outer_,
)


def vectors(count: int, n: int = 5003, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) for _ in range(count)]


def test_lr_1_without_momentum_is_the_plain_merge() -> None:
    local, sent, received, outer = vectors(4)
    momentum = torch.zeros_like(local)
    expected = merge_(local.clone(), sent, received, 0.3)
    outer_step_(local, sent, received, 0.3, outer, momentum, lr=1.0, beta=0.0)
    assert torch.allclose(local, expected, atol=1e-6)
    assert torch.allclose(outer, sent + 0.3 * (received - sent), atol=1e-6)  # phi = the pair's average


@pytest.mark.parametrize(("lr", "beta"), [(OUTER_LR, OUTER_MOMENTUM), (0.5, 0.3)])
def test_nesterov_matches_torch_sgd_on_the_pseudo_gradient(lr: float, beta: float) -> None:
    """Several exchanges, each with local steps in between: phi follows torch.optim.SGD
    (nesterov=True) fed grad = phi - average, and the weights restart from phi."""
    (x,) = vectors(1, seed=1)
    outer, momentum = torch.empty_like(x), torch.empty_like(x)
    start_outer_(outer, momentum, x)
    reference = torch.nn.Parameter(x.clone())
    sgd = torch.optim.SGD([reference], lr=lr, momentum=beta, nesterov=True)
    for round_ in range(4):
        local_steps, peer = vectors(2, n=x.numel(), seed=10 + round_)
        x.add_(0.1 * local_steps)  # the inner optimizer's work since the last exchange
        sent = x.clone()
        average = sent + 0.5 * (peer - sent)
        outer_step_(x, sent, peer, 0.5, outer, momentum, lr=lr, beta=beta)
        sgd.zero_grad()
        reference.grad = reference.detach() - average
        sgd.step()
        assert torch.allclose(outer, reference.detach(), atol=1e-5)
        assert torch.allclose(x, outer, atol=1e-6)  # no steps in flight: x = phi


def test_without_nesterov_it_is_nolocos_step() -> None:
    """NoLoCo's code: m = beta m + lr (mean(x - phi) + mean(phi) - phi); phi += m, where each
    side sends both phi and x - phi. Sending x alone gives the same."""
    lr, beta = 0.7, 0.5
    x_a, x_b, phi_a, phi_b = vectors(4, seed=2)
    m_a = torch.randn_like(x_a) * 0.01
    mean_delta = 0.5 * ((x_a - phi_a) + (x_b - phi_b))
    mean_phi = 0.5 * (phi_a + phi_b)
    expected_m = beta * m_a + lr * (mean_delta + mean_phi - phi_a)
    expected_phi = phi_a + expected_m
    momentum = -m_a / lr  # ours keeps m in units of the pseudo-gradient: theirs = -lr * ours
    outer_step_(x_a, x_a.clone(), x_b, 0.5, phi_a, momentum, lr=lr, beta=beta, nesterov=False)
    assert torch.allclose(phi_a, expected_phi, atol=1e-5)
    assert torch.allclose(-lr * momentum, expected_m, atol=1e-5)
    assert torch.allclose(x_a, expected_phi, atol=1e-5)


def test_local_steps_taken_in_flight_are_kept() -> None:
    sent, received, outer = vectors(3, seed=3)
    in_flight = torch.full_like(sent, 0.25)
    local = sent + in_flight
    momentum = torch.zeros_like(sent)
    outer_step_(local, sent, received, 0.5, outer, momentum)
    assert torch.allclose(local, outer + in_flight, atol=1e-5)


def test_agreeing_nodes_at_rest_stay_put() -> None:
    (x,) = vectors(1, seed=4)
    outer, momentum = x.clone(), torch.zeros_like(x)
    local = x.clone()
    outer_step_(local, x, x, 0.5, outer, momentum)
    assert torch.equal(local, x) and torch.equal(outer, x) and not bool(momentum.any())


def test_slices_take_the_hold_and_give_the_same_result() -> None:
    local, sent, received, outer = vectors(4, seed=5)
    momentum = torch.randn_like(local)
    whole = [t.clone() for t in (local, outer, momentum)]
    outer_step_(whole[0], sent, received, 0.4, whole[1], whole[2])
    holds: list[int] = []

    @contextmanager
    def hold() -> Iterator[None]:
        holds.append(1)
        yield

    outer_step_(local, sent, received, 0.4, outer, momentum, chunk=1000, hold=hold)
    assert len(holds) == 6  # ceil(5003 / 1000)
    for got, expected in zip((local, outer, momentum), whole, strict=True):
        assert torch.allclose(got, expected, atol=1e-6)


def test_wrong_buffers_are_refused() -> None:
    a = torch.zeros(4)
    with pytest.raises(ValueError):
        outer_step_(a, a, a, 0.5, torch.zeros(5), torch.zeros(4))
    with pytest.raises(ValueError):
        outer_step_(a, a, a, 0.5, torch.zeros(4), torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError):
        start_outer_(torch.zeros(3), torch.zeros(4), a)
