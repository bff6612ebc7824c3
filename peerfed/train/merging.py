"""This node's side of every merge: the outer step (merge.outer) and the clip (merge.clip).

`Merger` turns one exchange's (sent, received, mixing weight) into the change of our weights:
- merge.outer = "none": x += a' (received - sent), as averaging.merge_;
- merge.outer = "nesterov": averaging.outer_step_ on the outer weights phi and momentum m
  that the Merger keeps (DiLoCo's Nesterov SGD on the pseudo-gradient phi - pair average; with
  NoLoCo's pairing), after which the trainer goes on from phi (plus the steps it took while the
  bytes were in flight).
What travels is the same in both: the trainer's current weights x. Outer weights are not sent:
as averaging.outer_step_ shows, the pair average of x is all NoLoCo's and DiLoCo's updates need.

a' is the mixing weight with the peer's difference clipped (clipping.py): to merge.clip x
the median of our own movement since the last merge and the peer distances of our recent
merges, shrinking further beyond. Our movement is measured from an anchor: phi with the outer
step (x restarts from phi at every exchange), else a buffer holding where the last merge left
us. The anchor (and phi, m) restart at the weights whenever the trainer (re)connects or a
state sync loads a peer's model.

Outer state is not written into checkpoints: the trainer process writes checkpoints and this
lives next to the daemon's merge (weights_port.py). After a restart, the outer loop starts
again at the resumed weights with no momentum, as DiLoCo does after a state sync (a few
exchanges of lost momentum, measured in BENCHMARKS.md).

Owner: the WeightsPort, which calls it under its lock (one operation at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch

from peerfed.averaging import (
    CHUNK_ELEMENTS,
    OUTER_LR,
    OUTER_MOMENTUM,
    merge_,
    outer_step_,
    start_outer_,
)
from peerfed.clipping import ClipScale, clipped_weight, distance


@dataclass(frozen=True, slots=True)
class MergeRule:
    """How this node merges (from merge.outer, outer_lr, outer_momentum, clip)."""

    outer: str = "none"  # "none" | "nesterov"
    outer_lr: float = OUTER_LR
    outer_momentum: float = OUTER_MOMENTUM
    clip: float = 0.0  # radius factor; 0 = no clipping

    def __post_init__(self) -> None:
        if self.outer not in ("none", "nesterov"):
            raise ValueError(f"outer must be 'none' or 'nesterov', got {self.outer!r}")
        if not self.clip >= 0:
            raise ValueError(f"clip must be >= 0, got {self.clip!r}")


@dataclass(frozen=True, slots=True)
class MergeStats:
    """Merges so far (this daemon's lifetime) and how the last one went."""

    merges: int = 0
    clipped: int = 0  # merges whose peer difference was cut to the radius
    last_kept: float = 1.0  # share of the peer's difference the last merge kept (1: not clipped)
    last_radius: float | None = None  # the last merge's clip radius (L2), None without clipping


class Merger:
    def __init__(self, rule: MergeRule, numel: int) -> None:
        self.rule = rule
        self.numel = numel
        self._outer: tuple[torch.Tensor, torch.Tensor] | None = None  # phi, m (outer = "nesterov")
        self._anchor: torch.Tensor | None = None  # where the last merge left us (clip, outer "none")
        self._stats = MergeStats()
        self._scale = ClipScale()  # recent distances: the radius's scale (clipping.py)

    def statistics(self) -> MergeStats:
        return self._stats

    def restart(self, weights: torch.Tensor) -> None:
        """The weights were (re)loaded: the outer loop and the clip's anchor start there."""
        if self.rule.outer == "nesterov":
            if self._outer is None:
                self._outer = (torch.empty_like(weights), torch.empty_like(weights))
            start_outer_(*self._outer, weights)
        elif self.rule.clip > 0:
            if self._anchor is None:
                self._anchor = torch.empty_like(weights)
            self._anchor.copy_(weights)

    def weight(self, sent: torch.Tensor, received: torch.Tensor, alpha: float) -> float:
        """The mixing weight this merge uses: `alpha`, or less where the clip cuts the peer's
        difference. Counts the merge."""
        stats = self._stats
        if self.rule.clip <= 0:
            self._stats = replace(stats, merges=stats.merges + 1)
            return alpha
        anchor = self._outer[0] if self._outer is not None else self._anchor
        if anchor is None:
            raise RuntimeError("Merger.restart must come before the first merge")
        radius = self._scale.radius(self.rule.clip, distance(sent, anchor))
        difference = distance(received, sent)
        self._scale.observe(difference, radius)
        kept = clipped_weight(1.0, difference, radius)
        if alpha * kept * difference > radius / 2:  # a heavy claim moves us no further than a peer
            kept = radius / (2 * alpha * difference)  # of equal weight at the radius would
        self._stats = MergeStats(stats.merges + 1, stats.clipped + (kept < 1.0), kept, radius)
        return alpha * kept

    def apply_(self, local: torch.Tensor, sent: torch.Tensor, received: torch.Tensor, weight: float, *,
               chunk: int = CHUNK_ELEMENTS,
               hold: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        """local += this merge's change, slice by slice (`hold` around each slice's update).
        `weight` comes from weight(). For a delta buffer, pass local zeroed."""
        rule = self.rule
        if self._outer is not None:
            outer_step_(local, sent, received, weight, *self._outer, lr=rule.outer_lr, beta=rule.outer_momentum,
                        chunk=chunk, hold=hold)
            return
        merge_(local, sent, received, weight, chunk=chunk, hold=hold)
        if self._anchor is not None:  # where this merge leaves us, but for the steps in flight:
            torch.lerp(sent, received, weight, out=self._anchor)  # sent + weight (received - sent)
