"""The partial view: which peers a node holds live connections to (issue 16).

Pure decisions in the style of h11: no I/O and no clock; membership (net/membership.py) asks
``plan()`` once per dial tick and carries out what it says. The peer table is the passive
view (signed records of up to ``p2p.max_peers`` peers); the active view is the set of live
connections, kept near ``p2p.max_connections`` whatever the swarm's size:

- below the target, dial peers drawn uniformly at random from those due for a dial (not the
  "most promising first" order of a full mesh: that order would send every newcomer to the
  same few peers, and the bootstrap node would hold the whole swarm);
- above target + slack (others dialed us), close random links that have lived a moment,
  so newcomers can still introduce themselves and swap peer lists before they are pruned;
- every ``rotate_every`` seconds (jittered), close one random link and dial one random
  passive peer: Cyclon's idea, done with the connections themselves. Exchange partners are
  drawn from the active view, so rotating it makes a node's partners close to uniform over
  the swarm over time, and peers that left are replaced as they are noticed.

Idle cost then depends on the view, not the swarm: pings and peer-list swaps go to live
connections only, and a peer list carries at most the passive view.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

MIN_LINK_AGE = 5.0  # seconds a link lives before the view may close it (a peer-list swap takes ms)


@dataclass(frozen=True, slots=True)
class ViewPlan:
    """What to do this tick: whom to dial, which links to close (and why, for the log)."""

    dial: tuple[str, ...] = ()
    close: tuple[str, ...] = ()
    reason: str = ""


@dataclass
class ViewCounters:
    dials_to_fill: int = 0
    closed_over_target: int = 0
    rotations: int = 0


@dataclass
class PartialView:
    """Keeps the active view near ``target`` live connections (see the module doc)."""

    target: int
    rotate_every: float = 20.0
    slack: int = -1  # links allowed above target before pruning; -1: max(2, target // 4)
    rng: random.Random = field(default_factory=random.Random)
    counters: ViewCounters = field(default_factory=ViewCounters)
    _next_rotation: float | None = None

    def __post_init__(self) -> None:
        if self.target < 1:
            raise ValueError("the view's target must be at least 1 connection")
        if self.rotate_every <= 0:
            raise ValueError("rotate_every must be > 0")
        if self.slack < 0:
            self.slack = max(2, self.target // 4)

    def plan(self, *, live: Mapping[str, float], dialing: Collection[str], due: Sequence[str],
             now: float, max_parallel: int, keep: Collection[str] = ()) -> ViewPlan:
        """``live``: connected peers and since when (seconds); ``dialing``: dials under way;
        ``due``: peers we could dial now (have addresses, backoff over, not live); ``keep``:
        links never to close (a relay holding our slot, a peer reachable only over its link)."""
        candidates = [p for p in due if p not in live and p not in dialing]
        room = max(0, max_parallel - len(dialing))
        missing = self.target - len(live) - len(dialing)
        if missing > 0:
            dial = self._sample(candidates, min(missing, room))
            self.counters.dials_to_fill += len(dial)
            self._next_rotation = None  # rotate only once the view is full
            return ViewPlan(dial=dial, reason="filling the view")
        closable = sorted(p for p, since in live.items() if now - since >= MIN_LINK_AGE and p not in keep)
        excess = len(live) - self.target
        if excess > self.slack and closable:
            close = self._sample(closable, excess)
            self.counters.closed_over_target += len(close)
            return ViewPlan(close=close, reason=f"{len(live)} connections, target {self.target}")
        if self._next_rotation is None:
            self._next_rotation = now + self._jittered()
        if now < self._next_rotation or not candidates or not closable or room == 0:
            return ViewPlan()
        self._next_rotation = now + self._jittered()
        self.counters.rotations += 1
        return ViewPlan(dial=self._sample(candidates, 1), close=self._sample(closable, 1), reason="rotating the view")

    def statistics(self) -> dict[str, int]:
        return {"target": self.target, "dials_to_fill": self.counters.dials_to_fill,
                "closed_over_target": self.counters.closed_over_target, "rotations": self.counters.rotations}

    def _jittered(self) -> float:
        return self.rotate_every * self.rng.uniform(0.75, 1.25)

    def _sample(self, peers: Sequence[str], k: int) -> tuple[str, ...]:
        return tuple(self.rng.sample(list(peers), min(k, len(peers))))
