"""How often a node swaps peer lists: often while they bring news, rarely once they stop.

A swap sends every record we hold, so a settled swarm that kept swapping every 5 s spent
~4 kB/s of each node's uplink on lists that changed nothing (8 nodes, measured with
bench_home_links' link meter), and more in larger swarms. News (a peer we did not know, or
one whose addresses, exchange URL or model changed) brings the interval back to `base` at
once, so a newcomer or a moved peer still spreads epidemically; every list without news
doubles it, up to `ceiling`. A re-signed record with the same contents is not news: it ages
fine at the slow pace (records live an hour, are re-signed every 10 minutes).

Decisions only: the membership loop reads the clock and asks `due(now)`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

JITTER = 0.2  # +-20%: nodes started together do not swap in lockstep


@dataclass(frozen=True, slots=True)
class PaceStats:
    interval: float
    news: int
    quiet: int


class GossipPace:
    def __init__(self, base: float, ceiling: float, rng: random.Random, now: float) -> None:
        if not (math.isfinite(base) and 0 < base <= ceiling and math.isfinite(ceiling)):
            raise ValueError("need 0 < base <= ceiling, both finite")
        self.base, self.ceiling = base, ceiling
        self.interval = base
        self._rng = rng
        self._due = now + self._jittered(base)
        self._news = self._quiet = 0

    def _jittered(self, seconds: float) -> float:
        return seconds * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def due(self, now: float) -> bool:
        """Whether our next swap is due; if so, the one after it is scheduled."""
        if now < self._due:
            return False
        self._due = now + self._jittered(self.interval)
        return True

    def heard(self, news: bool, now: float) -> None:
        """A peer list arrived (a reply to our swap, or another's swap): speed up or slow down."""
        if news:
            self._news += 1
            self.interval = self.base
            self._due = min(self._due, now + self._jittered(self.base))
        else:
            self._quiet += 1
            self.interval = min(self.ceiling, 2 * self.interval)

    def statistics(self) -> PaceStats:
        return PaceStats(self.interval, self._news, self._quiet)
