"""Averaging math: one flat float32 buffer per model, its fingerprint, merge and checks.

Torch only, no I/O. The exchange moves and merges flat buffers, so everything on the hot path
(snapshot, merge, validation) is a handful of vectorised ops over one contiguous tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

LAYOUT_VERSION = 1
FLAT_DTYPE = torch.float32
FLAT_ITEMSIZE = 4
# Merge and checks work in slices of this many elements (4 MiB of float32): small temporaries
# instead of one as large as the model.
CHUNK_ELEMENTS = 1 << 20
# A model whose L2 norm exceeds this times sqrt(numel) is treated as garbage, not as weights.
MAX_NORM_PER_SQRT_N = 1e6


def averaged_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Floating-point parameters and buffers in state_dict order, as the live objects.

    Integer buffers (e.g. BatchNorm's num_batches_tracked) stay local. A tensor registered
    under two names (tied weights) appears once, under its first name.
    """
    seen: set[int] = set()
    result: list[tuple[str, torch.Tensor]] = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point() or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        result.append((name, tensor))
    return result


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int  # in elements of the flat buffer
    numel: int


@dataclass(frozen=True)
class FlatLayout:
    """Where each averaged tensor lives inside the flat float32 buffer."""

    slots: tuple[TensorSlot, ...]
    numel: int

    @classmethod
    def from_model(cls, model: nn.Module) -> FlatLayout:
        slots: list[TensorSlot] = []
        offset = 0
        for name, tensor in averaged_tensors(model):
            n = tensor.numel()
            slots.append(TensorSlot(name, tuple(tensor.shape), tensor.dtype, offset, n))
            offset += n
        return cls(tuple(slots), offset)

    @property
    def nbytes(self) -> int:
        return self.numel * FLAT_ITEMSIZE

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [s.shape for s in self.slots]

    @property
    def dtypes(self) -> list[torch.dtype]:
        return [s.dtype for s in self.slots]

    @property
    def offsets(self) -> list[int]:
        return [s.offset for s in self.slots]

    @property
    def all_float32(self) -> bool:
        return all(s.dtype == FLAT_DTYPE for s in self.slots)

    def new_buffer(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.zeros(self.numel, dtype=FLAT_DTYPE, device=device)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of `flat` shaped like each tensor (no copies)."""
        check_flat(flat, self.numel)
        return [flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]

    def describe(self) -> str:
        """Canonical text of names, shapes and dtypes (what the fingerprint hashes)."""
        return json.dumps(
            {
                "layout_version": LAYOUT_VERSION,
                "flat_dtype": str(FLAT_DTYPE),
                "tensors": [[s.name, list(s.shape), str(s.dtype)] for s in self.slots],
            },
            separators=(",", ":"),
        )

    def fingerprint(self) -> str:
        return hashlib.sha256(self.describe().encode()).hexdigest()


def fingerprint(model: nn.Module) -> str:
    """sha256 hex of the layout (names, shapes, dtypes, layout version); values do not count."""
    return FlatLayout.from_model(model).fingerprint()


def check_flat(flat: torch.Tensor, numel: int) -> None:
    if flat.dtype != FLAT_DTYPE or flat.dim() != 1 or not flat.is_contiguous():
        raise ValueError(f"flat buffer must be a contiguous 1-D float32 tensor, got {flat.dtype} {tuple(flat.shape)}")
    if flat.numel() != numel:
        raise ValueError(f"flat buffer has {flat.numel()} elements, model needs {numel}")


def _is_bound(tensors: list[torch.Tensor], views: list[torch.Tensor]) -> bool:
    return all(t.data_ptr() == v.data_ptr() and t.device == v.device for t, v in zip(tensors, views))


def flatten_into(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy the model's averaged tensors into `flat` (converting dtype and device)."""
    layout = FlatLayout.from_model(model)
    views = layout.views(flat)
    tensors = [t.detach() for _, t in averaged_tensors(model)]
    if not tensors or _is_bound(tensors, views):
        return  # already views into this buffer
    with torch.no_grad():
        torch._foreach_copy_(views, tensors)


def unflatten_from(flat: torch.Tensor, model: nn.Module) -> None:
    """Copy `flat` into the model's averaged tensors (converting dtype and device)."""
    layout = FlatLayout.from_model(model)
    views = layout.views(flat)
    tensors = [t.detach() for _, t in averaged_tensors(model)]
    if not tensors or _is_bound(tensors, views):
        return
    with torch.no_grad():
        torch._foreach_copy_(tensors, views)


def bind_to_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy the model's averaged tensors into `flat`, then make them views into it.

    Afterwards the optimizer's in-place updates write straight into `flat`, so publishing the
    weights needs no copy. Needs every averaged tensor to be float32 on `flat`'s device.
    """
    layout = FlatLayout.from_model(model)
    if not layout.all_float32:
        raise ValueError("bind_to_flat needs float32 tensors; use flatten_into/unflatten_from")
    views = layout.views(flat)
    by_id = {id(t): v for (_, t), v in zip(averaged_tensors(model), views)}
    flatten_into(model, flat)
    for name, tensor in model.state_dict(keep_vars=True).items():
        view = by_id.get(id(tensor))
        if view is None:
            continue
        if isinstance(tensor, nn.Parameter):
            tensor.data = view  # keeps the Parameter object, so optimizers still track it
        else:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            owner._buffers[leaf] = view


def mixing_weight(own_samples: float, peer_samples: float) -> float:
    """Share of the peer's model in a pairwise merge: peer / (own + peer); 0.5 when unknown."""
    own = own_samples if math.isfinite(own_samples) and own_samples > 0 else 0.0
    peer = peer_samples if math.isfinite(peer_samples) and peer_samples > 0 else 0.0
    total = own + peer
    if total <= 0.0:
        return 0.5
    return peer / total


# A peer declares its own sample weight. Both sides clamp the other's claim to within this
# factor of their own: honest peers of similar size keep the exact sample-weighted average,
# and no claim, however large, moves us more than 10/11 of the way in one exchange.
MAX_WEIGHT_RATIO = 10.0


def bounded_mixing_weight(own: float, claimed: float) -> float:
    own = max(own, 1.0)
    return mixing_weight(own, min(max(claimed, own / MAX_WEIGHT_RATIO), own * MAX_WEIGHT_RATIO))


def merge_(
    local: torch.Tensor,
    sent: torch.Tensor,
    received: torch.Tensor,
    alpha: float,
    *,
    chunk: int = CHUNK_ELEMENTS,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> torch.Tensor:
    """local += alpha * (received - sent), in place, slice by slice.

    `sent` is the snapshot we sent the peer; local steps taken since then are kept. `hold()`
    is entered around each slice's update of `local` (a lock shared with whoever else
    writes `local`): the update is additive, so steps taken between slices are kept too.
    """
    n = local.numel()
    check_flat(local, n)
    check_flat(sent, n)
    check_flat(received, n)
    scratch = torch.empty(min(chunk, n), dtype=local.dtype, device=local.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            part = scratch[: stop - start]
            torch.sub(received[start:stop], sent[start:stop], out=part)
            with hold():
                local[start:stop].add_(part, alpha=alpha)
    return local


def delta_into(
    out: torch.Tensor, sent: torch.Tensor, received: torch.Tensor, alpha: float
) -> torch.Tensor:
    """out = alpha * (received - sent), written into `out` without temporaries."""
    n = out.numel()
    check_flat(out, n)
    check_flat(sent, n)
    check_flat(received, n)
    with torch.no_grad():
        torch.sub(received, sent, out=out)
        out.mul_(alpha)
    return out


class ValueCheck:
    """check_values, fed front to back while a buffer fills (e.g. as its bytes arrive)."""

    def __init__(self, buf: torch.Tensor, *, max_norm_per_sqrt_n: float = MAX_NORM_PER_SQRT_N) -> None:
        self._flat = buf.reshape(-1)
        self._limit_per_sqrt_n = max_norm_per_sqrt_n
        self._done = 0  # elements [0, _done) are checked
        self._total = 0.0  # their sum of squares
        self._problem: str | None = None

    def advance(self, upto: int) -> None:
        """Check elements [done, upto): call it once they hold their final values."""
        upto = min(upto, self._flat.numel())
        with torch.no_grad():
            while self._done < upto and self._problem is None:
                start, stop = self._done, min(self._done + CHUNK_ELEMENTS, upto)
                part = self._flat[start:stop]
                squares = float(torch.dot(part, part))  # one pass, no temporary
                if not math.isfinite(squares):  # NaN/Inf inside, or a float32 overflow (absurd anyway)
                    finite = torch.isfinite(part)
                    if not bool(finite.all()):
                        bad = int(torch.nonzero(~finite)[0, 0]) + start
                        self._problem = f"non-finite value at index {bad} ({float(self._flat[bad])})"
                    squares = float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
                self._total += squares
                self._done = stop

    def problem(self) -> str | None:
        """Why the buffer must not be merged, else None (checks whatever is left first)."""
        self.advance(self._flat.numel())
        if self._problem is not None:
            return self._problem
        n = self._flat.numel()
        norm = math.sqrt(self._total)
        limit = self._limit_per_sqrt_n * math.sqrt(n)
        if n and (not math.isfinite(norm) or norm > limit):
            return f"norm {norm:.3g} exceeds limit {limit:.3g}"
        return None


def check_values(buf: torch.Tensor, *, max_norm_per_sqrt_n: float = MAX_NORM_PER_SQRT_N) -> str | None:
    """A reason the buffer must not be merged (non-finite values, absurd norm), else None."""
    return ValueCheck(buf, max_norm_per_sqrt_n=max_norm_per_sqrt_n).problem()


# ------------------------------------------------------------------ the outer step (merge.outer)

# DiLoCo's outer optimizer: SGD with Nesterov momentum, lr 0.7, momentum 0.9 (Douillard et al.,
# arXiv 2311.08105; the same in OpenDiLoCo's training script). NoLoCo's code used lr 0.7 with
# momentum 0.5 for pairs (jkolehm/noloco, configs/no_reduce_exp/*/…_mean_…).
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9


def start_outer_(outer: torch.Tensor, momentum: torch.Tensor, weights: torch.Tensor) -> None:
    """Begin (or restart, after a state sync) the outer loop at `weights`, with no momentum."""
    n = weights.numel()
    check_flat(outer, n)
    check_flat(momentum, n)
    with torch.no_grad():
        outer.copy_(weights)
        momentum.zero_()


def outer_step_(
    local: torch.Tensor,
    sent: torch.Tensor,
    received: torch.Tensor,
    alpha: float,
    outer: torch.Tensor,
    momentum: torch.Tensor,
    *,
    lr: float = OUTER_LR,
    beta: float = OUTER_MOMENTUM,
    nesterov: bool = True,
    chunk: int = CHUNK_ELEMENTS,
    hold: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> torch.Tensor:
    """An exchange's merge with an outer momentum step, in place, slice by slice.

    The node keeps outer weights phi and a momentum buffer m besides its weights x. At an
    exchange both sides send their weights (`sent` is ours, `received` the peer's), and:

        avg = sent + alpha * (received - sent)      the pair's average, as merge_ takes it
        g   = phi - avg                             the pseudo-gradient
        m   = beta * m + g
        phi = phi - lr * (g + beta * m)             Nesterov (nesterov=False: phi - lr * m)
        x   = x + (phi - sent)                      go on from phi, keeping the local steps
                                                    taken while the bytes were in flight

    DiLoCo (Douillard et al. 2023, arXiv 2311.08105) averages the workers' pseudo-gradients
    phi - x_i with an all-reduce every H inner steps and applies Nesterov SGD to phi (lr 0.7,
    momentum 0.9). NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911) drops the all-reduce:
    each replica averages with one random peer, and its modified Nesterov step also pulls phi
    towards the pair's mean phi. In the authors' code (jkolehm/noloco, sparse_optimizer_c.py)
    that step is m = beta m + lr (mean_pair(x - phi) + mean_pair(phi) - phi); phi += m. Since
    mean_pair(x - phi) + mean_pair(phi) - phi = mean_pair(x) - phi = -g, sending the weights x
    alone (one buffer each way, as today) gives exactly that update: nesterov=False here is
    NoLoCo's step (with its two lrs equal, as in its code), nesterov=True DiLoCo's optimizer
    on the pairwise average. With lr = 1, beta = 0 it is merge_ (phi becomes avg).

    Temporaries: one slice. `hold()` is entered around each slice's update of `local`, as in
    merge_. phi and m are the caller's (start them with start_outer_).
    """
    n = local.numel()
    for buf in (local, sent, received, outer, momentum):
        check_flat(buf, n)
    scratch = torch.empty(min(chunk, n), dtype=local.dtype, device=local.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            part, phi, m = scratch[: stop - start], outer[start:stop], momentum[start:stop]
            torch.sub(received[start:stop], sent[start:stop], out=part)
            part.mul_(alpha).add_(sent[start:stop])  # avg
            torch.sub(phi, part, out=part)  # g
            m.mul_(beta).add_(part)
            if nesterov:
                phi.sub_(part, alpha=lr).sub_(m, alpha=lr * beta)
            else:
                phi.sub_(m, alpha=lr)
            torch.sub(phi, sent[start:stop], out=part)
            with hold():
                local[start:stop].add_(part)
    return local
