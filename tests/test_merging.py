"""The merge a node applies (train/merging.py, clipping.py): the clip radius from its own
movement, the outer Nesterov step, and both through the WeightsPort as the exchange calls it."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from peerfed.averaging import merge_, outer_step_, start_outer_
from peerfed.clipping import clipped_weight, distance
from peerfed.train.merging import Merger, MergeRule, MergeStats
from peerfed.train.messages import ReadyInfo
from peerfed.train.shm import ControlBlock
from peerfed.train.weights_port import TrainerLink, WeightsPort

N = 3001  # not a multiple of the slice sizes used below


def randn(seed: int, scale: float = 1.0, n: int = N) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def test_distance_is_the_l2_norm_of_the_difference_slice_by_slice() -> None:
    a, b = randn(1), randn(2)
    assert distance(a, b, chunk=64) == pytest.approx(float(torch.linalg.vector_norm(a - b)), rel=1e-6)
    assert distance(a, a) == 0.0


def test_clipped_weight_keeps_small_differences_and_shrinks_large_ones() -> None:
    assert clipped_weight(0.5, 1.0, 2.0) == 0.5
    assert clipped_weight(0.5, 4.0, 2.0) == pytest.approx(0.125)  # moved by 0.125 * 4 = 0.5: half the radius
    assert clipped_weight(0.5, 8.0, 2.0) == pytest.approx(0.03125)  # farther off moves us less
    assert clipped_weight(0.5, 1.0, 0.0) == 0.0
    assert clipped_weight(0.5, math.inf, 2.0) == 0.0 and clipped_weight(0.5, math.nan, 2.0) == 0.0


def test_a_poisoned_model_moves_us_by_at_most_alpha_times_the_radius() -> None:
    start = randn(3)
    merger = Merger(MergeRule(clip=2.0), N)
    merger.restart(start)
    local = start + randn(4, 0.01)  # our training since the start
    sent = local.clone()
    poison = sent * 50.0  # "x50 under the value check"
    weight = merger.weight(sent, poison, 10 / 11)  # and the largest mixing weight a claim can get
    before = local.clone()
    merger.apply_(local, sent, poison, weight, chunk=500)
    moved = distance(local, before)
    radius = 2.0 * distance(sent, start)  # the first merge: only our own movement to go by
    assert merger.statistics().last_radius == pytest.approx(radius)
    assert moved == pytest.approx(10 / 11 * radius * radius / distance(poison, sent), rel=1e-4)
    assert moved < 1e-3 * radius  # vs ~45x the model unclipped
    stats = merger.statistics()
    assert (stats.merges, stats.clipped) == (1, 1) and stats.last_kept < 1e-3


def test_an_honest_peer_within_the_radius_is_merged_exactly() -> None:
    start = randn(5)
    merger = Merger(MergeRule(clip=2.0), N)
    merger.restart(start)
    sent = start + randn(6, 0.1)  # we moved |0.1 * randn| ~ 5.5
    peer = start + randn(7, 0.1)  # so did the peer: the two differ by ~7.7 < 11
    local = sent.clone()
    weight = merger.weight(sent, peer, 0.5)
    assert weight == 0.5
    merger.apply_(local, sent, peer, weight)
    assert torch.allclose(local, merge_(sent.clone(), sent, peer, 0.5))
    assert (merger.statistics().merges, merger.statistics().clipped) == (1, 0)


def test_an_inflated_claim_moves_us_no_further_than_an_equal_peer_at_the_radius() -> None:
    start = randn(41)
    merger = Merger(MergeRule(clip=2.0), N)
    merger.restart(start)
    sent = start + randn(42, 0.1)
    radius = 2.0 * distance(sent, start)
    peer = sent + randn(43, 0.1) * (0.8 * radius / distance(randn(43, 0.1), torch.zeros(N)))  # inside the radius
    local = sent.clone()
    merger.apply_(local, sent, peer, merger.weight(sent, peer, 10 / 11))
    assert distance(local, sent) == pytest.approx(radius / 2, rel=1e-4)  # not 10/11 x 0.8 radius
    assert merger.statistics().clipped == 1


def test_the_radius_follows_the_swarms_spread_not_one_poisoned_peer() -> None:
    """Honest peers 10 apart (far more than our own movement between merges, as on non-iid
    shards): the radius grows to about 2 x 10 (doubling at most every half window) and honest
    merges then go through whole; a poisoned peer (every third merge) stays clipped all along
    and cannot widen the radius past the honest spread."""
    merger = Merger(MergeRule(clip=2.0), N)
    local = randn(40)
    merger.restart(local)
    radii, kept = [], []
    for i in range(90):
        local.add_(randn(100 + i, 0.001))  # a little training between merges
        sent = local.clone()
        poisoned = i % 3 == 2
        peer = sent * 50.0 if poisoned else sent + randn(200 + i, 10.0 / math.sqrt(N))
        merger.apply_(local, sent, peer, merger.weight(sent, peer, 0.5))
        radii.append(merger.statistics().last_radius)
        kept.append((poisoned, merger.statistics().last_kept))
    assert all(18 < r < 22 for r in radii[70:]), [round(r, 2) for r in radii]
    assert all(k == 1.0 for poisoned, k in kept[70:] if not poisoned)
    assert all(k < 1e-3 for poisoned, k in kept if poisoned)


def test_clip_0_is_the_plain_merge_and_counts() -> None:
    merger = Merger(MergeRule(), N)
    sent, peer = randn(10), randn(11) * 100
    local = sent.clone()
    merger.apply_(local, sent, peer, merger.weight(sent, peer, 0.5))
    assert torch.allclose(local, merge_(sent.clone(), sent, peer, 0.5))
    assert merger.statistics() == MergeStats(merges=1)


def test_nesterov_merge_is_the_outer_step_and_restarts_at_the_weights() -> None:
    rule = MergeRule(outer="nesterov", outer_lr=0.7, outer_momentum=0.9, clip=0.0)
    merger = Merger(rule, N)
    x = randn(12)
    merger.restart(x)
    phi, m = torch.empty_like(x), torch.empty_like(x)
    start_outer_(phi, m, x)
    expected = x.clone()
    for i in range(3):  # several exchanges with local steps between: momentum builds up
        step = randn(20 + i, 0.05)
        x.add_(step)
        expected.add_(step)
        sent, peer = x.clone(), x + randn(30 + i, 0.2)
        merger.apply_(x, sent, peer, merger.weight(sent, peer, 0.5), chunk=700)
        outer_step_(expected, sent, peer, 0.5, phi, m, lr=0.7, beta=0.9)
    assert torch.allclose(x, expected, atol=1e-6)
    # into a zeroed delta buffer (mirror mode): the same change
    delta = torch.zeros_like(x)
    sent, peer = x.clone(), x + 1.0
    merger.apply_(delta, sent, peer, 0.5)
    outer_step_(expected, sent, peer, 0.5, phi, m, lr=0.7, beta=0.9)
    assert torch.allclose(x + delta, expected, atol=1e-5)


def test_nesterov_with_clip_measures_movement_from_the_outer_weights() -> None:
    merger = Merger(MergeRule(outer="nesterov", clip=1.0), N)
    x = randn(13)
    merger.restart(x)
    sent = x + randn(14, 0.01)
    poison = sent * 50.0
    assert merger.weight(sent, poison, 0.5) == pytest.approx(0.5 * (distance(sent, x) / distance(poison, sent)) ** 2)


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="outer"):
        MergeRule(outer="adam")
    with pytest.raises(ValueError, match="clip"):
        MergeRule(clip=-1.0)


INFO = ReadyInfo(fingerprint="f" * 64, nbytes=4 * N, numel=N, num_samples=7, device="cpu", mode="direct",
                 resumed_step=0, resumed_samples=0, resumed_seconds=0.0, resumed_from=None)


def test_the_port_clips_steps_outer_and_counts_as_the_exchange_calls_it() -> None:
    """Direct mode, as on CPU: the port's merge goes through the Merger; a state sync restarts it."""
    control = ControlBlock.create()
    port = WeightsPort(lambda: (0, 0.0), merge_rule=MergeRule(outer="nesterov", clip=2.0))
    link = TrainerLink(threading.Lock(), lambda: True, lambda command: None)
    try:
        port.attach(control, N, mirror=False)
        port.connect(link, INFO)
        donor = randn(15)
        port.load_weights(donor)  # state sync: the outer weights start at the donor's model
        weights = port._buffers.weights.tensor  # what the trainer trains (a view of shared memory)
        assert weights is not None
        weights.add_(randn(16, 0.01))  # the trainer took steps
        sent = torch.empty(N)
        port.snapshot_into(sent)
        kept = port.merge(sent * 50.0, sent, 0.5)  # poison
        assert 0 < kept < 0.01
        after = torch.empty(N)
        port.snapshot_into(after)
        assert distance(after, donor) < 3 * distance(sent, donor)  # not ~50x the model
        port.snapshot_into(sent)
        assert port.merge(sent.clone(), sent, 0.5) == 1.0  # a peer that agrees: nothing to clip
        stats = port.merge_statistics()
        assert (stats.merges, stats.clipped) == (2, 1)
    finally:
        port.close()
        control.close()
