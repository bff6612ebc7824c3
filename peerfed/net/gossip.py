"""The gossip loop: every interval, one push-pull with a random live peer.

Owner: the daemon's main loop; the GossipLoop and its scheduler are touched only from it.

Decisions (when, with whom, backoff after failures, another peer when one is busy) are the
core scheduler's; this loop only reads the clock, asks for candidates and runs exchanges.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from peerfed.core.exchange_rules import Outcome
from peerfed.core.schedule import ExchangeScheduler

log = logging.getLogger("peerfed.gossip")

# peer_id -> exchange URL of live peers that train the same model
Candidates = Callable[[], Mapping[str, str]]
RunExchange = Callable[[str, str], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class GossipStats:
    """The scheduler's counts: rounds opened, rounds with nobody to ask, exchanges by outcome."""

    interval: float
    rounds: int
    skipped_no_peer: int
    ok: int
    busy: int
    refused: int
    failed: int
    cancelled: int
    in_flight: int
    peers_with_failures: int
    slow_peers: int  # peers whose exchanges take longer than the interval, on average


class GossipLoop:
    def __init__(
        self,
        *,
        scheduler: ExchangeScheduler,
        candidates: Candidates,
        run_exchange: RunExchange,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scheduler = scheduler
        self._candidates = candidates
        self._run_exchange = run_exchange
        self._clock = clock

    def set_interval(self, interval: float) -> None:
        """Config reload: the pending round moves to the same point of the new interval."""
        self._scheduler.set_interval(interval)

    def statistics(self) -> GossipStats:
        return GossipStats(interval=self._scheduler.interval, **self._scheduler.statistics())

    async def run(self) -> None:
        while True:
            now = self._clock()
            peers = self._candidates()
            peer = self._scheduler.choose_peer(list(peers), now) if peers else None
            if peer is None:
                await asyncio.sleep(max(0.05, min(0.5, self._scheduler.next_due() - now)))
                continue
            self._scheduler.begin(peer, now)
            outcome = Outcome.FAILED
            try:
                outcome = await self._run_exchange(peer, peers[peer])
            except asyncio.CancelledError:
                outcome = Outcome.CANCELLED
                raise
            except Exception:  # noqa: BLE001 - a bug in one exchange must not stop gossip
                log.exception("exchange with %s crashed", peer)
            finally:
                self._scheduler.on_result(peer, outcome, self._clock())
