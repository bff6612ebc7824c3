"""Prometheus metrics for one node, served by the local API at /metrics.

Everything lives in a registry of its own (not prometheus_client's global one), so tests and
several nodes in one process never collide. Names follow Prometheus conventions: base units
(seconds, bytes, ratios 0..1), `_total` on counters.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

from peerfed import __version__
from peerfed.core.admission import Ban
from peerfed.core.exchange_rules import EXCHANGE_OUTCOMES, Outcome

__all__ = ["CONTENT_TYPE", "EXCHANGE_DURATION_BUCKETS", "EXCHANGE_OUTCOMES", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From a refused request on loopback (~10 ms) to a 1 GB transfer on a slow home uplink.
EXCHANGE_DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0,
)


def _torch_version() -> str:
    # Package metadata, not `import torch`: the daemon process need not pay for torch.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "none"


class _MonotonicCounter:
    """Feeds a Counter from absolute totals reported by the trainer. The first total is taken
    whole, so a daemon restarted from a checkpoint continues its series without a reset. When
    the totals go back (the trainer restarted from an older checkpoint) the counter stays where
    it is and counts on from the new total: it never decreases, and re-done work is counted."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._last: float | None = None

    def observe_total(self, total: float) -> None:
        if self._last is not None and total > self._last:
            self._counter.inc(total - self._last)
        elif self._last is None and total > 0:
            self._counter.inc(total)
        self._last = total


class _ExchangeMetrics:
    """Peers and weight exchanges: what the network side reports."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.peers_connected = Gauge(
            "peerfed_peers_connected", "Peers with an open libp2p connection.", registry=r
        )
        self.exchanges = Counter(
            "peerfed_exchanges", "Weight exchanges by outcome.", ["outcome"], registry=r
        )
        self.exchange_bytes = Counter(
            "peerfed_exchange_bytes", "Exchange payload bytes moved, as sent on the wire (encoded).", ["direction"], registry=r
        )
        self.exchange_duration = Histogram(
            "peerfed_exchange_duration_seconds",
            "Wall time of one exchange, by outcome.",
            ["outcome"],
            buckets=EXCHANGE_DURATION_BUCKETS,
            registry=r,
        )
        self.rejected_messages = Counter(
            "peerfed_rejected_messages", "Messages rejected by verification, by reason.", ["reason"],
            registry=r,
        )
        self.link_rate = Gauge(
            "peerfed_link_rate_bytes_per_second", "Payload bytes per second moved by the data plane, "
            "over the last 10 s (window=now) and since start (window=average).", ["direction", "window"], registry=r,
        )
        self.peers_banned = Gauge("peerfed_peers_banned", "Peers whose exchanges are refused now (a ban).", registry=r)
        self.peer_bans = Counter("peerfed_peer_bans", "Bans of peers, by the fault that started them.", ["reason"],
                                 registry=r)
        # Pre-create label children so each series exists at 0 from the first scrape
        # (rate() over a series that appears late misses its first increment).
        for outcome in EXCHANGE_OUTCOMES:
            self.exchanges.labels(outcome)
            self.exchange_duration.labels(outcome)
        for direction in ("sent", "received"):
            self.exchange_bytes.labels(direction)


class _TrainingMetrics:
    """The trainer's gauges and counters, fed from its absolute totals."""

    def __init__(self, r: CollectorRegistry, clock: Callable[[], float]) -> None:
        self.train_steps = Counter("peerfed_train_steps", "Optimizer steps taken.", registry=r)
        self.train_samples = Counter("peerfed_train_samples", "Training samples seen.", registry=r)
        self.train_loss = Gauge("peerfed_train_loss", "Latest training loss.", registry=r)
        self.eval_accuracy = Gauge(
            "peerfed_eval_accuracy", "Latest evaluation accuracy (ratio 0..1).", registry=r
        )
        self.checkpoint_age = Gauge(
            "peerfed_checkpoint_age_seconds",
            "Seconds since the last checkpoint was written (since start if none yet).",
            registry=r,
        )
        self.trainer_restarts = Counter(
            "peerfed_trainer_restarts", "Times the trainer process was restarted.", registry=r
        )
        self.merged = (  # merges, and those whose peer difference was clipped (merge.clip)
            _MonotonicCounter(Counter("peerfed_merges", "Exchanges merged into this node's weights.", registry=r)),
            _MonotonicCounter(Counter("peerfed_merges_clipped", "Merges whose peer difference was clipped "
                                      "(merge.clip).", registry=r)),
        )
        self.steps = _MonotonicCounter(self.train_steps)
        self.samples = _MonotonicCounter(self.train_samples)
        self.lock = threading.Lock()  # the two totals are observed together
        self.last_checkpoint = clock()
        self.checkpoint_age.set_function(lambda: max(0.0, clock() - self.last_checkpoint))


class Metrics:
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        Info("peerfed_build", "Versions this node runs.", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version(), "torch": _torch_version()}
        )
        self._exchange = _ExchangeMetrics(self.registry)
        self._training = _TrainingMetrics(self.registry, clock)

    def set_peers_connected(self, count: int) -> None:
        self._exchange.peers_connected.set(count)

    def exchange_finished(self, outcome: Outcome, duration_s: float, sent: int, received: int) -> None:
        if outcome not in EXCHANGE_OUTCOMES:
            raise ValueError(f"unknown exchange outcome {outcome!r}")
        ex = self._exchange
        ex.exchanges.labels(outcome).inc()
        ex.exchange_duration.labels(outcome).observe(duration_s)
        ex.exchange_bytes.labels("sent").inc(sent)
        ex.exchange_bytes.labels("received").inc(received)

    def update_link(self, upload_now: float, upload_avg: float, download_now: float, download_avg: float) -> None:
        """Payload bytes per second through the data plane: last 10 s ("now") and since start."""
        for direction, window, value in (("upload", "now", upload_now), ("upload", "average", upload_avg),
                                         ("download", "now", download_now), ("download", "average", download_avg)):
            self._exchange.link_rate.labels(direction, window).set(value)
    def set_peers_banned(self, count: int) -> None:
        self._exchange.peers_banned.set(count)

    def peer_banned(self, ban: Ban) -> None:
        """A ban started (any thread: the data plane's guard calls it)."""
        self._exchange.peer_bans.labels(ban.reason).inc()

    def rejected(self, reason: str) -> None:
        self._exchange.rejected_messages.labels(reason).inc()

    def update_training(
        self, step: int, samples: int, loss: float | None = None, accuracy: float | None = None
    ) -> None:
        """`step` and `samples` are the trainer's absolute totals (they may go back after a
        restart from a checkpoint; the counters do not)."""
        t = self._training
        with t.lock:
            t.steps.observe_total(step)
            t.samples.observe_total(samples)
        if loss is not None:
            t.train_loss.set(loss)
        if accuracy is not None:
            t.eval_accuracy.set(accuracy)

    def update_merges(self, merges: int, clipped: int) -> None:
        """Absolute totals of merges and clipped merges (the weights port's statistics)."""
        t = self._training
        with t.lock:
            t.merged[0].observe_total(merges)
            t.merged[1].observe_total(clipped)

    def trainer_restarted(self) -> None:
        self._training.trainer_restarts.inc()

    def checkpoint_saved(self, at: float | None = None) -> None:
        """Call after writing a checkpoint, and at start with the time of the one resumed from."""
        self._training.last_checkpoint = self._clock() if at is None else at

    def render(self) -> bytes:
        return generate_latest(self.registry)
