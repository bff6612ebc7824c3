"""A hostile digits task for real daemons in bench_attack.py (``train.task = "hostile:digits"``).

TEST-ONLY: daemons import it with ``PYTHONPATH=<repo>/benchmarks``; nothing in peerfed ships or
loads it. The daemon around it is the ordinary one (it merges what peers send, as any node);
only its training is harmful, and its values pass the exchange's checks. ``options.attack``:

- ``ascent``: gradient ascent on its shard, the weights rescaled after each step to the norm
  they had before it (so they keep an honest model's norm: they are merged with honest ones)
- ``scale50``: the weights x50 every step, capped at RMS 1e4 (the value check allows 1e6)
- ``noise``: Gaussian noise with the weights' norm, fresh every step
- ``replay``: the initial weights, put back every step (old weights)

``options.claim``: the sample count it declares (num_samples), e.g. 1e9 for an inflated claim.
Other options as for ``synthetic:digits`` (``base``, ``step_sleep``, ``go_file``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from synthetic import digits as honest_digits
from torch import nn

from peerfed.train.tasks import NodeContext, Task, TrainSettings

ATTACKS = ("ascent", "scale50", "noise", "replay")
MAX_RMS = 1e4


class HostileStep(torch.optim.Optimizer):
    """SGD (ascent for "ascent", via the task's negated loss) and then the attack on the weights."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, attack: str) -> None:
        super().__init__(list(params), {"lr": lr})
        self.attack = attack
        self.initial = [p.detach().clone() for group in self.param_groups for p in group["params"]]
        self.gen = torch.Generator().manual_seed(4242)

    @torch.no_grad()
    def step(self, closure: object = None) -> None:  # type: ignore[override]
        params = [p for group in self.param_groups for p in group["params"]]
        norm = math.sqrt(sum(float(p.pow(2).sum()) for p in params))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        if self.attack == "ascent":
            new = math.sqrt(sum(float(p.pow(2).sum()) for p in params))
            for p in params:
                p.mul_(norm / new if new > 0 else 1.0)
        elif self.attack == "scale50":
            numel = sum(p.numel() for p in params)
            rms = math.sqrt(sum(float(p.pow(2).sum()) for p in params) / numel) * 50
            for p in params:
                p.mul_(50.0 * min(1.0, MAX_RMS / rms) if rms > 0 else 1.0)
        elif self.attack == "noise":
            noise = [torch.randn(p.shape, generator=self.gen) for p in params]
            scale = norm / math.sqrt(sum(float(n.pow(2).sum()) for n in noise))
            for p, n in zip(params, noise, strict=True):
                p.copy_(n * scale)
        elif self.attack == "replay":
            for p, old in zip(params, self.initial, strict=True):
                p.copy_(old)


def digits(settings: TrainSettings, ctx: NodeContext) -> Task:
    attack = str(settings.options.get("attack", "ascent"))
    if attack not in ATTACKS:
        raise ValueError(f"train.options.attack: {attack!r}; allowed {', '.join(ATTACKS)}")
    task = honest_digits(settings, ctx)
    if attack == "ascent":
        honest_loss = task.loss_fn
        task.loss_fn = lambda output, y: -honest_loss(output, y)
    task.make_optimizer = lambda params: HostileStep(params, settings.lr, attack)
    task.num_samples = int(float(settings.options.get("claim", task.num_samples)))
    return task
