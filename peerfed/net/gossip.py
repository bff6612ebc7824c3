"""The gossip loop: every interval, one push-pull with a random live peer.

Decisions (when, with whom, backoff after failures, another peer when one is busy) are the
core scheduler's; this loop only reads the clock, asks for candidates and runs exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from peerfed.core.schedule import ExchangeScheduler

log = logging.getLogger("peerfed.gossip")

# peer_id -> exchange URL of live peers that train the same model
Candidates = Callable[[], Mapping[str, str]]
RunExchange = Callable[[str, str], Awaitable[str]]


class GossipLoop:
    def __init__(
        self,
        *,
        scheduler: ExchangeScheduler,
        candidates: Candidates,
        run_exchange: RunExchange,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.scheduler = scheduler
        self._candidates = candidates
        self._run_exchange = run_exchange
        self._clock = clock
        self.enabled = True

    async def run(self) -> None:
        while True:
            now = self._clock()
            peers = self._candidates() if self.enabled else {}
            peer = self.scheduler.choose_peer(list(peers), now) if peers else None
            if peer is None:
                await asyncio.sleep(max(0.05, min(0.5, self.scheduler.next_due() - now)))
                continue
            self.scheduler.begin(peer, now)
            outcome = "failed"
            try:
                outcome = await self._run_exchange(peer, peers[peer])
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            except Exception:  # noqa: BLE001 - a bug in one exchange must not stop gossip
                log.exception("exchange with %s crashed", peer)
            finally:
                self.scheduler.on_result(peer, outcome, self._clock())
