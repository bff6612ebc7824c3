"""The dashboard's memory: a bounded series of samples of this node, so that its charts show
accuracy, loss and bandwidth over time from the moment the page opens.

``History.observe(status, now)`` reads the local API's /status view (the plain dict the daemon
hands the API). It appends a ``Sample`` once ``interval`` seconds have passed since the last one,
and it remembers each peer's last exchange (/status only holds the node's latest). When the
series reaches ``capacity`` samples, every second one is dropped and the interval doubles: memory
stays bounded and the chart still spans the node's whole life, at a coarser grain the longer it
runs (360 samples 2 s apart: 12 minutes at full grain; after a day, 4-8 minutes apart).
Counters in a sample are cumulative, so a rate between any two kept samples stays exact.

``record_forever`` is the asyncio task that feeds it; the local API runs it while it serves.
Only that task and the API's handlers (one event loop) touch a History.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, fields
from typing import Any

log = logging.getLogger("peerfed.ops.history")

SAMPLE_INTERVAL = 2.0   # seconds between samples while the series is young
CAPACITY = 360
OBSERVE_EVERY = 1.0     # how often the recorder reads /status (the per-peer last exchange)
MAX_PEERS_REMEMBERED = 256


@dataclass(frozen=True, slots=True)
class Sample:
    """One moment of the node. Training fields are None on a node that does not train (or has
    not evaluated yet); byte and exchange counters are cumulative since the daemon started."""

    t: float                     # wall-clock time (the same clock as /status and /peers)
    step: int | None
    accuracy: float | None       # the trainer's last evaluation on the test set
    test_loss: float | None
    train_loss: float | None     # the last training batch's loss
    peers: int
    bytes_sent: int
    bytes_received: int
    ok: int
    busy: int
    refused: int
    failed: int


SAMPLE_FIELDS = tuple(f.name for f in fields(Sample))


def sample_of(status: Mapping[str, Any], now: float) -> Sample:
    """A Sample from a /status view; missing parts (no trainer, no exchange) read as None or 0."""
    metrics = status.get("metrics") or {}
    exchanges = status.get("exchanges") or {}
    return Sample(
        t=now, step=status.get("step"), accuracy=_number(metrics.get("accuracy")),
        test_loss=_number(metrics.get("loss")), train_loss=_number(status.get("loss")),
        peers=int(status.get("peers_connected", 0)),
        bytes_sent=int(status.get("bytes_sent", 0)), bytes_received=int(status.get("bytes_received", 0)),
        ok=int(exchanges.get("ok", 0)), busy=int(exchanges.get("busy", 0)),
        refused=int(exchanges.get("refused", 0)), failed=int(exchanges.get("failed", 0)),
    )


def _number(value: object) -> float | None:
    # NaN or inf would not survive JSON (the page could not parse it): read them as "no value"
    if isinstance(value, int | float) and value == value and abs(value) != float("inf"):
        return float(value)
    return None


class History:
    def __init__(self, *, interval: float = SAMPLE_INTERVAL, capacity: int = CAPACITY) -> None:
        if capacity < 2:
            raise ValueError("capacity must be at least 2")
        self.interval = interval
        self.capacity = capacity
        self._samples: list[Sample] = []
        self._last_exchange_by_peer: dict[str, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def observe(self, status: Mapping[str, Any], now: float) -> None:
        last = status.get("last_exchange")
        if isinstance(last, Mapping) and isinstance(last.get("peer_id"), str):
            self._remember_exchange(dict(last))
        if self._samples and now - self._samples[-1].t < self.interval:
            return
        if len(self._samples) >= self.capacity:
            # keep the first sample (the chart starts where the node did) and every second one
            del self._samples[1::2]
            self.interval *= 2
        self._samples.append(sample_of(status, now))

    def _remember_exchange(self, last: dict[str, Any]) -> None:
        peer_id = last["peer_id"]
        self._last_exchange_by_peer.pop(peer_id, None)   # re-insert: dict order is recency
        self._last_exchange_by_peer[peer_id] = last
        if len(self._last_exchange_by_peer) > MAX_PEERS_REMEMBERED:
            del self._last_exchange_by_peer[next(iter(self._last_exchange_by_peer))]

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON for GET /history: one array per Sample field (compact, and what a chart wants)."""
        columns = list(zip(*(astuple(s) for s in self._samples), strict=True)) or [()] * len(SAMPLE_FIELDS)
        return {
            "now": now,
            "interval_s": self.interval,
            "capacity": self.capacity,
            "samples": {name: list(column) for name, column in zip(SAMPLE_FIELDS, columns, strict=True)},
            "last_exchange_by_peer": dict(self._last_exchange_by_peer),
        }


async def record_forever(history: History, status: Callable[[], Mapping[str, Any]],
                         *, every: float = OBSERVE_EVERY, clock: Callable[[], float] = time.time) -> None:
    """Feed ``history`` from ``status()`` every ``every`` seconds until cancelled."""
    complained = False
    while True:
        try:
            history.observe(status(), clock())
        except Exception:  # a view that fails once must not end the dashboard's history
            if not complained:
                log.warning("dashboard history: reading the status view failed", exc_info=True)
                complained = True
        await asyncio.sleep(every)
