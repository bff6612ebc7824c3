"""Bandwidth caps in real daemons (issue 10): two nodes on 127.0.0.1 with a tiny upload cap;
each stretches its exchange interval so that its average upload stays below
max_upload_share x max_upload_rate, and /status ("link") shows the rates it measured."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from swarmtools import wait_until

from peerfed.core.exchange_rules import wire_length
from peerfed.core.rates import parse_rate
from peerfed.localswarm import LocalSwarm
from peerfed.train.tasks import NodeContext, TrainSettings, digits_mlp

CAP = "80kbit"  # 10 kB/s: digits-mlp's 9.6 kB model needs the stretch at interval 1 s
SHARE = 0.5
WINDOW_S = 40.0


def _model_bytes() -> int:
    model = digits_mlp(TrainSettings(), NodeContext(0, 1, 0)).model
    return sum(p.numel() * 4 for p in model.state_dict().values() if p.is_floating_point())


@pytest.mark.slow
def test_the_exchange_interval_is_stretched_to_the_upload_share(tmp_path: Path) -> None:
    cap = parse_rate(CAP)
    assert cap is not None
    expected_interval = 2 * wire_length(_model_bytes()) / (SHARE * cap)
    # float32: "auto" sends int8, whose 2.4 kB this cap carries without a stretch
    settings = {"train.init": "local", "train.threads": 1, "exchange.interval": 1.0, "exchange.encoding": "float32",
                "exchange.max_upload_rate": CAP, "exchange.max_download_rate": "1MB",
                "exchange.max_upload_share": SHARE}
    with LocalSwarm(tmp_path, network="link-test") as swarm:
        nodes = [swarm.add_node(settings={**settings, "train.seed": i}) for i in range(2)]
        swarm.start_all(timeout=180)
        swarm.wait_full_view(timeout=60)
        wait_until(lambda: all(n.get("/status")["exchanges"]["ok"] >= 1 for n in nodes), 60, "first exchanges")
        before = [n.get("/status") for n in nodes]
        time.sleep(WINDOW_S)
        after = [n.get("/status") for n in nodes]
    for node, b, a in zip(nodes, before, after, strict=True):
        link = a["link"]
        sent_rate = (a["bytes_sent"] - b["bytes_sent"]) / WINDOW_S
        own = a["exchanges"]["ok"] - b["exchanges"]["ok"]
        print(f"node {node.index}: interval {link['exchange_interval_s']:.2f} s (expected {expected_interval:.2f}); "
              f"{own} ok exchanges in {WINDOW_S:.0f} s; payload upload {sent_rate:.0f} B/s "
              f"(share x cap = {SHARE * cap:.0f}); link {link}")
        assert link["max_upload_rate"] == cap and link["max_download_rate"] == 1e6
        assert link["exchange_interval_s"] == pytest.approx(expected_interval, rel=1e-6)
        assert link["upload_rate_avg"] > 0 and link["download_rate_avg"] > 0
        assert sent_rate <= SHARE * cap * 1.15  # the stretch keeps the average below the share (jitter +-10%)
        assert own >= 0.5 * WINDOW_S / expected_interval  # and it still exchanges
