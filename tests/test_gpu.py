"""Training on a CUDA GPU: two real daemons with train.device = "cuda" train and exchange, and the
pieces that touch a device (evaluators, the benchmarks' task, the demo's baselines) keep their
tensors on the model's device. Every test is skipped, with the reason, where CUDA is absent.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from peerfed.localswarm import LocalSwarm
from peerfed.train.tasks import NodeContext, TrainSettings, binary_logit_loss, classification_evaluator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device (torch.cuda.is_available() is False)")

ROOT = Path(__file__).resolve().parents[1]


def test_evaluators_benchmark_task_and_baselines_run_on_cuda() -> None:
    model = torch.nn.Linear(2, 1).cuda()
    x, y = torch.randn(64, 2), (torch.rand(64) > 0.5).float()  # CPU data, a CUDA model
    result = classification_evaluator(x, y, binary_logit_loss(), batch_size=16)(model)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["loss"] > 0

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import synthetic
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    task = synthetic.sized(TrainSettings(options={"mib": 1}), NodeContext(0, 1, 0))
    task.model.cuda()
    metrics = task.evaluate(task.model)  # its evaluation batch of indices follows the model
    assert 0.0 <= metrics["accuracy"] <= 1.0

    from peerfed.baselines import train_allreduce

    baseline = train_allreduce(TrainSettings(task="digits-mlp", device="cuda"), node_count=2, total_samples=64 * 50)
    assert baseline.steps == 50 and 0.0 <= baseline.accuracy <= 1.0


def status_of(node: Any) -> dict[str, Any]:
    return node.get("/status", timeout=5.0)


@pytest.mark.timeout(240)
def test_two_daemons_train_on_cuda_and_exchange(tmp_path: Path) -> None:
    settings = {"train.device": "cuda", "train.task": "digits-mlp", "train.threads": 1, "train.init": "local",
                "train.eval_interval": 1.0, "exchange.interval": 1.0}
    with LocalSwarm(tmp_path) as swarm:
        nodes = [swarm.add_node(settings=settings) for _ in range(2)]
        swarm.start_all(timeout=180.0)
        first = [status_of(n) for n in nodes]
        for status in first:
            assert status["trainer"]["device"].startswith("cuda"), status["trainer"]
            assert status["trainer"]["mode"] == "mirror"  # weights mirrored to shared memory
        deadline = time.monotonic() + 90.0
        while time.monotonic() < deadline:
            now = [status_of(n) for n in nodes]
            grew = all(b["step"] > a["step"] for a, b in zip(first, now, strict=True))
            exchanged = all((s.get("exchanges") or {}).get("ok", 0) >= 1 for s in now)
            if grew and exchanged:
                break
            time.sleep(1.0)
        else:
            pytest.fail(f"no steps or no exchange on CUDA within 90 s: {[s.get('exchanges') for s in now]}, "
                        f"steps {[s['step'] for s in now]}; logs:\n" + "\n".join(n.log_tail(20) for n in nodes))
        assert all(0.0 <= s["metrics"]["accuracy"] <= 1.0 for s in now)
        assert swarm.stop_all() == [0, 0]
