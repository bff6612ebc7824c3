"""Robust merge math (exchange.clip): bound how far one peer can move this node in one merge.

ClippedGossip (He, Karimireddy and Jaggi, 2022, arXiv 2202.01545) merges a neighbour's model
as x += a * clip(peer - x, tau): whatever a peer sends, it moves us by at most a * tau. Our
merge is x += a * (received - sent) (averaging.merge_), so clipping the peer's difference is a
smaller mixing weight: a * min(1, tau / |received - sent|), and the merge itself is unchanged.

The radius is this node's own recent movement: tau = factor * |sent - anchor|, where the
anchor is where the last merge (or the start, or a state sync) left the weights. So a peer may
pull us, per merge, about as far as our own training moved us since the last one: an honest
pair (whose models differ by roughly what their local steps moved them) is rarely clipped,
while a poisoned model (scaled, noise, an ascent, an old replay) moves us by no more than
honest training would; and a peer that exchanges 40 times as often gets 40 small radii, not
40 large ones, because each radius only spans the training since the merge before it.

Torch only, no I/O (at the level of averaging.py).
"""

from __future__ import annotations

import math

import torch

from peerfed.averaging import CHUNK_ELEMENTS, check_flat

# Default exchange.clip: measured with benchmarks/bench_convergence.py --clip and bench_attack.py
# (BENCHMARKS.md, "Robust merge"): honest-only accuracy within 0.5 points of no clipping.
CLIP_FACTOR = 2.0


def distance(a: torch.Tensor, b: torch.Tensor, *, chunk: int = CHUNK_ELEMENTS) -> float:
    """|a - b| (L2), slice by slice: one slice-sized temporary, float64 accumulation."""
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
            total += float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def clip_radius(sent: torch.Tensor, anchor: torch.Tensor, factor: float) -> float:
    """How far a peer may pull us in this merge: factor x our own movement since `anchor`."""
    return factor * distance(sent, anchor)


def clipped_weight(alpha: float, difference: float, radius: float) -> float:
    """The mixing weight that clips a peer's difference of norm `difference` to `radius`."""
    if not math.isfinite(difference) or not math.isfinite(radius):
        return 0.0
    if difference <= radius:
        return alpha
    return alpha * radius / difference
