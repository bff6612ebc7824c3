"""State sync: a newcomer starts from a peer's model instead of its own random init.

``plan_state_sync`` decides (a pure function of the config and what the node knows);
``run_state_sync`` asks the candidates one after another for their weights (GET /v1/model
through the data plane), loads the first verified answer into the trainer together with
the donor's lr clock, and says how it went in one line for /status. Runs on the main loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch

from peerfed.core.manifest import Manifest
from peerfed.errors import TrainerUnavailable
from peerfed.train.weights_port import WeightsPort

log = logging.getLogger("peerfed.state_sync")

SYNC_WAIT_AUTO = 10.0  # train.init = auto: how long to look for a donor before starting alone
SAY_WAITING_AFTER_S = 60.0  # train.init = peer waits as long as it takes, and says so
SAY_WAITING_EVERY_S = 600.0

FetchModel = Callable[[str, str, torch.Tensor], Awaitable[Manifest | None]]


@dataclass(frozen=True)
class SyncPlan:
    sync: bool
    wait: float | None  # seconds to look for a donor; None: for ever (train.init = peer)
    status: str  # what /status says while (or instead of) syncing


def plan_state_sync(init: str, *, resumed: bool, peers_known: bool) -> SyncPlan:
    """Whether to fetch a peer's model first (train.init = peer | auto | local)."""
    if init == "peer" or (init == "auto" and not resumed and peers_known):
        return SyncPlan(True, None if init == "peer" else SYNC_WAIT_AUTO, "waiting for a peer's model")
    if resumed:
        return SyncPlan(False, None, "skipped (resumed from checkpoint)")
    return SyncPlan(False, None, "skipped (train.init = local)" if init == "local" else "skipped (no peers known)")


async def run_state_sync(weights: WeightsPort, fetch_model: FetchModel,
                         candidates: Callable[[], dict[str, str]], wait: float | None) -> str:
    """Until a donor's verified weights are loaded, or ``wait`` seconds pass; the outcome line."""
    deadline = None if wait is None else time.monotonic() + wait
    buffer = torch.empty(weights.numel, dtype=torch.float32)
    say_waiting_at = time.monotonic() + SAY_WAITING_AFTER_S
    while deadline is None or time.monotonic() < deadline:
        found = candidates()
        if time.monotonic() >= say_waiting_at:
            say_waiting_at += SAY_WAITING_EVERY_S
            log.warning("state sync: still waiting for a peer's model; %d peers with this model known, "
                        "none gave one (a peer that is itself waiting for one answers 'not ready')", len(found))
        for peer_id, url in found.items():
            manifest = await fetch_model(peer_id, url, buffer)
            if manifest is None:
                continue
            clock = (manifest.schedule_step, manifest.seconds_trained)
            try:
                await asyncio.to_thread(weights.load_weights, buffer, clock)
            except TrainerUnavailable as exc:  # it restarted meanwhile: fetch again once it is back
                log.warning("state sync: trainer unavailable (%s); trying again", exc)
                break
            log.info("state sync: starting from %s's model (its lr clock: step %d, %.0f s trained)",
                     peer_id, manifest.schedule_step, manifest.seconds_trained)
            return f"from {peer_id}"
        await asyncio.sleep(1.0)
    log.info("state sync: no peer with this model answered within %.0f s; starting from local init", wait)
    return "none (no donor)"
