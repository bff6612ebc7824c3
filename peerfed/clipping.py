"""Robust merge math (merge.clip): bound how far one peer can move this node in one merge.

ClippedGossip (He, Karimireddy and Jaggi, 2022, arXiv 2202.01545) merges a neighbour's model
as x += a * clip(peer - x, tau). Our merge is x += a * (received - sent) (averaging.merge_),
so clipping the peer's difference d = received - sent is a smaller mixing weight, and the merge
itself is unchanged: a * min(1, tau / |d|). Beyond the radius we shrink further, as
a * (tau / |d|) ** 2 (a redescending clip): a model far outside the swarm's spread (x50, an
old replay late in training) moves us by tau * tau / |d|, less than one at the radius does.

The radius: tau = factor x the median of (a) this node's own movement since its last merge
(|sent - anchor|: the anchor is where the last merge, the start or a state sync left it;
with merge.outer = "nesterov", the outer weights) and (b) the peer distances |d| of its
last RECENT_MERGES merges, each counted at most at the radius it was clipped to. Why not the
own movement alone, as ClippedGossip's analysis suggests: on non-iid shards (Dirichlet 0.1)
honest peers differ by far more than a node moves between two merges (a radius of 2x that
movement left the simulation near local-only accuracy, 27% against 84%; BENCHMARKS.md), so
the radius has to follow the swarm's honest spread, which the median of recent merges does
while fewer than half of them come from one attacker. A poisoned peer cannot widen it past
the factor per merge it wins. And whatever sample weight a peer claims (the exchange lets a
claim raise its mixing weight to 10/11), one merge moves us by at most radius / 2: no more
than a peer of equal weight at the radius (train/merging.py).

Torch only, no I/O (at the level of averaging.py).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

import torch

from peerfed.averaging import CHUNK_ELEMENTS, check_flat

# merge.clip's default (config.py): honest-only accuracy within 0.5 points of no clipping in
# benchmarks/bench_convergence.py --clip and bench_attack.py (BENCHMARKS.md, "Robust merge").
CLIP_FACTOR = 2.0
REDESCEND = 2  # beyond the radius, a difference d moves us by radius x (radius / d) ** (REDESCEND - 1)


def distance(a: torch.Tensor, b: torch.Tensor, *, chunk: int = CHUNK_ELEMENTS) -> float:
    """|a - b| (L2), slice by slice: one slice-sized temporary; each slice's sum of squares in
    the tensors' dtype (a dot product: half the time of a float64 norm), summed in float64."""
    n = a.numel()
    check_flat(a, n)
    check_flat(b, n)
    total = 0.0
    scratch = torch.empty(min(chunk, n), dtype=a.dtype, device=a.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            part = scratch[: stop - start]
            torch.sub(a[start:stop], b[start:stop], out=part)
            total += float(torch.dot(part, part))
    return math.sqrt(total)


def clipped_weight(alpha: float, difference: float, radius: float) -> float:
    """The mixing weight for a peer's difference of norm `difference`: `alpha` within the
    radius, alpha * (radius / difference) ** REDESCEND beyond it (0 for a non-finite one)."""
    if not math.isfinite(difference) or not math.isfinite(radius):
        return 0.0
    if difference <= radius:
        return alpha
    return alpha * (radius / difference) ** REDESCEND


# How many recent peer distances the radius looks back on.
RECENT_MERGES = 16


class ClipScale:
    """The radius of the next merge (see the module's docstring)."""

    def __init__(self, window: int = RECENT_MERGES) -> None:
        self._recent: deque[float] = deque(maxlen=window)

    def radius(self, factor: float, own_movement: float) -> float:
        return factor * statistics.median([*self._recent, own_movement])

    def observe(self, difference: float, radius: float) -> None:
        if math.isfinite(difference):
            self._recent.append(min(difference, radius))
