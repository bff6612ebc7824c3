"""merge.outer = "nesterov" with real daemons: a swarm on harsh non-iid shards converges.

Three digits-mlp daemons on Dirichlet(0.1) shards (alone, each knows ~3 of the 10 digits:
local-only training ends near 30% accuracy), with the outer Nesterov step and the default
clip, gossiping every 0.5 s: every node must reach 85% on the whole test set, which no node
can without what the others learned, and the merges must have gone through the outer step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from swarmtools import wait_until

from peerfed.localswarm import LocalSwarm

NODES = 3


@pytest.mark.slow
def test_nesterov_outer_step_converges_on_non_iid_digits(tmp_path: Path) -> None:
    common = {"train.task": "digits-mlp", "train.threads": 1, "train.init": "local", "train.seed": 0,
              "train.node_count": NODES, "train.options": {"alpha": 0.1}, "train.eval_interval": 1.0,
              "exchange.interval": 0.5, "merge.outer": "nesterov", "checkpoint.interval": 3600.0,
              "log_level": "warning"}
    with LocalSwarm(tmp_path, network="outer-test") as swarm:
        nodes = [swarm.add_node(settings={**common, "train.node_index": i}) for i in range(NODES)]
        swarm.start_all(timeout=120)
        swarm.wait_full_view(timeout=60)

        def accuracies() -> list[float]:
            return [float(n.get("/status")["metrics"].get("accuracy") or 0.0) for n in nodes]

        wait_until(lambda: min(accuracies()) > 0.85, 150, f"every node above 85% (now {accuracies()})")
        statuses = [n.get("/status") for n in nodes]
        assert all(s["merges"]["merges"] >= 5 and s["merges"]["outer"] == "nesterov" for s in statuses), \
            [s["merges"] for s in statuses]
        assert all(s["exchanges"]["ok"] >= 5 for s in statuses)
        assert swarm.stop_all() == [0] * NODES
