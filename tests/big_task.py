"""A task with a big model, for exchange tests that need a transfer that takes a while.

Daemons load it as ``train.task = "big_task:factory"`` with this folder on PYTHONPATH.
One bias-free ``Linear(dim, dim)`` learning the identity on random data: ``dim = 4096``
(``train.options.dim``) is 64 MiB of float32 weights. The data is random, so "accuracy"
(share of rows whose largest output sits where the input's largest value is) only tells
that evaluation runs; tests use this task to watch weights and counters, not learning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from peerfed.train.tasks import Batch, NodeContext, Task, TrainSettings

DEFAULT_DIM = 4096
EVAL_ROWS = 16


def _random_batches(dim: int, batch_size: int, seed: int) -> Iterator[Batch]:
    gen = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, dim, generator=gen)
        yield x, x


def factory(settings: TrainSettings, ctx: NodeContext) -> Task:
    dim = int(settings.options.get("dim", DEFAULT_DIM))
    torch.manual_seed(ctx.seed)  # the init depends on train.seed only, like the digits tasks
    model = nn.Linear(dim, dim, bias=False)
    loss_fn = nn.MSELoss()
    x_eval = torch.randn(EVAL_ROWS, dim, generator=torch.Generator().manual_seed(12345))

    def evaluate(m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            out = m(x_eval)
            return {"accuracy": float((out.argmax(1) == x_eval.argmax(1)).float().mean()),
                    "loss": float(loss_fn(out, x_eval))}

    def make_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=settings.lr)

    # Batches of at most 8 rows: a step stays ~0.1 s on one CPU thread, whatever train.batch_size.
    return Task(model=model, train_batches=_random_batches(dim, min(settings.batch_size, 8), ctx.seed + ctx.index),
                evaluate=evaluate, loss_fn=loss_fn, make_optimizer=make_optimizer, num_samples=1000)
