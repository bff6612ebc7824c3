"""Prometheus metrics: parseable output, names, counters that never go down."""

from __future__ import annotations

import importlib.metadata
import platform

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from peerfed import __version__
from peerfed.ops.metrics import CONTENT_TYPE, Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode("utf-8")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_render_parses_and_names_follow_conventions() -> None:
    torch_version = importlib.metadata.version("torch")
    metrics = Metrics()
    text = metrics.render().decode("utf-8")
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(text)
        if not f.name.endswith("_created")  # prometheus_client's creation timestamps
    }
    assert families == {
        "peerfed_build_info": "gauge",
        "peerfed_peers_connected": "gauge",
        "peerfed_link_rate_bytes_per_second": "gauge",
        "peerfed_exchanges": "counter",
        "peerfed_exchange_bytes": "counter",
        "peerfed_exchange_duration_seconds": "histogram",
        "peerfed_rejected_messages": "counter",
        "peerfed_peers_banned": "gauge",
        "peerfed_peer_bans": "counter",
        "peerfed_train_steps": "counter",
        "peerfed_train_samples": "counter",
        "peerfed_train_loss": "gauge",
        "peerfed_eval_accuracy": "gauge",
        "peerfed_checkpoint_age_seconds": "gauge",
        "peerfed_trainer_restarts": "counter",
        "peerfed_merges": "counter",
        "peerfed_merges_clipped": "counter",
    }
    assert "peerfed_exchanges_total{outcome=\"busy\"} 0.0" in text
    assert CONTENT_TYPE.startswith("text/plain")
    [(labels, build)] = [(dict(k[1]), v) for k, v in samples(metrics).items() if k[0] == "peerfed_build_info"]
    assert build == 1.0
    assert labels["version"] == __version__
    assert labels["python"] == platform.python_version()
    assert labels["torch"].split("+")[0] == torch_version.split("+")[0]


def test_own_registry_not_the_global_one() -> None:
    Metrics()
    Metrics()  # a second node in the same process must not collide
    assert REGISTRY.get_sample_value("peerfed_peers_connected") is None


def test_exchange_counters_and_histogram() -> None:
    metrics = Metrics()
    metrics.exchange_finished("ok", 1.5, sent=1000, received=2000)
    metrics.exchange_finished("ok", 0.02, sent=10, received=20)
    metrics.exchange_finished("busy", 0.005, sent=0, received=0)
    metrics.rejected("replay")
    metrics.rejected("replay")
    metrics.set_peers_connected(3)
    assert value(metrics, "peerfed_exchanges_total", outcome="ok") == 2
    assert value(metrics, "peerfed_exchanges_total", outcome="busy") == 1
    assert value(metrics, "peerfed_exchanges_total", outcome="failed") == 0
    assert value(metrics, "peerfed_exchange_bytes_total", direction="sent") == 1010
    assert value(metrics, "peerfed_exchange_bytes_total", direction="received") == 2020
    assert value(metrics, "peerfed_exchange_duration_seconds_count", outcome="ok") == 2
    assert value(metrics, "peerfed_exchange_duration_seconds_bucket", outcome="ok", le="0.025") == 1
    assert value(metrics, "peerfed_exchange_duration_seconds_bucket", outcome="ok", le="600.0") == 2
    assert value(metrics, "peerfed_exchange_duration_seconds_bucket", outcome="busy", le="0.01") == 1
    assert value(metrics, "peerfed_rejected_messages_total", reason="replay") == 2
    assert value(metrics, "peerfed_peers_connected") == 3
    with pytest.raises(ValueError):
        metrics.exchange_finished("lost", 1.0, 0, 0)


def test_training_counters_never_go_down_after_trainer_restart() -> None:
    metrics = Metrics()
    metrics.update_training(step=100, samples=3200, loss=0.9, accuracy=0.5)
    assert value(metrics, "peerfed_train_steps_total") == 100
    metrics.update_training(step=150, samples=4800, loss=0.7, accuracy=0.6)
    assert value(metrics, "peerfed_train_steps_total") == 150
    assert value(metrics, "peerfed_train_samples_total") == 4800
    assert value(metrics, "peerfed_train_loss") == pytest.approx(0.7)
    assert value(metrics, "peerfed_eval_accuracy") == pytest.approx(0.6)

    # The trainer crashed and came back from the checkpoint at step 120.
    metrics.trainer_restarted()
    metrics.update_training(step=120, samples=3840)
    assert value(metrics, "peerfed_train_steps_total") == 150
    assert value(metrics, "peerfed_train_samples_total") == 4800
    assert value(metrics, "peerfed_trainer_restarts_total") == 1
    # Re-done steps are real work: counted again as they happen.
    metrics.update_training(step=130, samples=4160)
    assert value(metrics, "peerfed_train_steps_total") == 160
    assert value(metrics, "peerfed_train_samples_total") == 5120
    # Loss/accuracy left alone when not given.
    assert value(metrics, "peerfed_train_loss") == pytest.approx(0.7)


def test_checkpoint_age_follows_the_clock() -> None:
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    now[0] = 1030.0
    assert value(metrics, "peerfed_checkpoint_age_seconds") == 30  # none yet: since start
    metrics.checkpoint_saved()
    now[0] = 1042.5
    assert value(metrics, "peerfed_checkpoint_age_seconds") == 12.5
    metrics.checkpoint_saved(at=900.0)  # resumed from an older checkpoint file
    assert value(metrics, "peerfed_checkpoint_age_seconds") == 142.5


def test_merges_and_clipped_merges_count_from_the_ports_totals() -> None:
    metrics = Metrics()
    metrics.update_merges(5, 2)
    metrics.update_merges(9, 3)
    metrics.update_merges(1, 0)  # a new port after a restart: the counters do not go back
    assert value(metrics, "peerfed_merges_total") == 9
    assert value(metrics, "peerfed_merges_clipped_total") == 3


def test_link_rates_are_shown_by_direction_and_window() -> None:
    metrics = Metrics()
    metrics.update_link(1000.0, 500.0, 250.0, 125.0)
    assert value(metrics, "peerfed_link_rate_bytes_per_second", direction="upload", window="now") == 1000.0
    assert value(metrics, "peerfed_link_rate_bytes_per_second", direction="download", window="average") == 125.0
def test_bans_are_counted_by_reason_and_the_gauge_says_how_many_are_in_force() -> None:
    from peerfed.core.admission import Ban

    metrics = Metrics()
    metrics.peer_banned(Ban("p", "bad_values", since=0.0, until=10.0))
    metrics.peer_banned(Ban("q", "bad_values", since=0.0, until=10.0))
    metrics.set_peers_banned(2)
    assert value(metrics, "peerfed_peer_bans_total", reason="bad_values") == 2.0
    assert value(metrics, "peerfed_peers_banned") == 2.0
