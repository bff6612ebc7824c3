"""The trainer's side of the shared weights: how the model's tensors reach the shared buffer.

On CPU with float32 weights (direct mode) the model's averaged tensors are views into the
shared buffer itself, so the daemon reads and merges them in place under the weights lock and
the trainer has nothing to do. Elsewhere (mirror mode: the model lives on a GPU or MPS device;
copy mode: mixed dtypes) the trainer serves the daemon's snapshot / merge / load requests
between steps, from the control block's mailbox (shm.py). The daemon's side is weights_port.py.

Owner: the trainer process's one thread (child.py), which calls serve() holding the weights lock.
"""

from __future__ import annotations

import torch
from torch import nn

from peerfed.averaging import (
    FlatLayout,
    averaged_tensors,
    bind_to_flat,
    flatten_into,
    unflatten_from,
)
from peerfed.train.shm import REQ_LOAD, REQ_MERGE, REQ_SNAPSHOT


class WeightStore:
    """The trainer's weights and how they reach the shared buffer.

    modes: "direct" (CPU, float32: the model's tensors are views into the shared buffer),
    "mirror" (model tensors are views into a private flat buffer on the device),
    "copy" (mixed dtypes: tensors stay as they are, converted on each copy).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: FlatLayout,
        shared: torch.Tensor,
        delta: torch.Tensor | None,
        *,
        mirror: bool,
        device: torch.device,
    ) -> None:
        self.model = model
        self.layout = layout
        self.shared = shared
        self.delta = delta
        self.device = device
        self._scratch: torch.Tensor | None = None
        self.flat: torch.Tensor | None
        if not mirror:
            bind_to_flat(model, shared)
            self.mode, self.flat = "direct", shared
        elif layout.all_float32:
            self.flat = layout.new_buffer(device)
            bind_to_flat(model, self.flat)
            self.mode = "mirror"
        else:
            self.mode, self.flat = "copy", None
        if mirror and delta is None:
            raise ValueError("mirror mode needs a delta buffer")
        self.publish()

    def publish(self) -> None:
        """Make the shared buffer hold the current weights (a no-op in direct mode)."""
        if self.mode == "direct":
            return
        with torch.no_grad():
            if self.flat is not None:
                self.shared.copy_(self.flat)
            else:
                flatten_into(self.model, self.shared)

    def load(self) -> None:
        """Replace the weights with the shared buffer (state sync)."""
        if self.mode == "direct":
            return
        with torch.no_grad():
            if self.flat is not None:
                self.flat.copy_(self.shared)
            else:
                unflatten_from(self.shared, self.model)

    def add_delta(self) -> None:
        """weights += delta buffer (the daemon already scaled it by alpha)."""
        assert self.delta is not None
        with torch.no_grad():
            if self.flat is None:
                tensors = [t.detach() for _, t in averaged_tensors(self.model)]
                views = self.layout.views(self.delta)
                torch._foreach_add_(tensors, [v.to(t.device, t.dtype) for t, v in zip(tensors, views)])
            elif self.flat.device == self.delta.device:
                self.flat.add_(self.delta)
            else:
                if self._scratch is None:  # one device-side buffer reused for every merge
                    self._scratch = torch.empty_like(self.flat)
                self._scratch.copy_(self.delta)
                self.flat.add_(self._scratch)

    def serve(self, kind: int) -> None:
        """Carry out one mailbox request (shm.REQ_*)."""
        if kind == REQ_SNAPSHOT:
            self.publish()
        elif kind == REQ_MERGE:
            self.add_delta()
        elif kind == REQ_LOAD:
            self.load()
        synchronize(self.device)  # the daemon reads the buffers right after DONE


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
