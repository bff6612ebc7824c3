"""Exchange scheduler: when to start a gossip round and whom to contact. Decisions only.

Every `interval` seconds (times a random factor in [1 - jitter, 1 + jitter], so nodes started
together drift apart) a round opens. In a round the caller asks `choose_peer` for a uniformly
random candidate that is not backing off, calls `begin` when it starts the exchange and
`on_result` when it ends. "ok" closes the round; "busy", "refused" and "failed" leave it open
so the caller can try another peer at once (up to `max_attempts` per round). At most one
outgoing exchange is in flight. No I/O, no clock: `now` (unix seconds) is passed in.

Slow peers never slow fast ones (issue 10): the scheduler learns each peer's exchange time
(an EWMA of begin -> on_result) and picks among the peers that finish within the interval,
except for an `explore` share of rounds that picks among all, so a slow peer that got faster
is noticed again and is never starved for good.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from peerfed.core.exchange_rules import Outcome
from peerfed.core.peers import jittered_backoff

SPEED_EWMA = 0.3  # weight of the newest exchange time in a peer's average
EXPLORE = 0.1  # share of choices made among all peers, slow ones included
MAX_TIMED_PEERS = 4096


@dataclass(frozen=True)
class SchedulePolicy:
    """The timing rules: round length and jitter, attempts per round, how long a peer that
    failed or was busy is left alone. `backoff_base` and `busy_exclusion` None: interval and
    interval/2 (they follow set_interval)."""

    interval: float
    jitter: float = 0.1
    max_attempts: int = 3
    backoff_base: float | None = None
    backoff_max: float = 300.0
    busy_exclusion: float | None = None

    def busy_for(self) -> float:
        return self.busy_exclusion if self.busy_exclusion is not None else self.interval / 2

    def backoff(self, failures: int, rng: random.Random) -> float:
        base = self.backoff_base if self.backoff_base is not None else self.interval
        return jittered_backoff(failures, base=base, cap=max(base, self.backoff_max), rng=rng)


@dataclass
class _Round:
    """The round in progress: whom it tried, how many times."""

    open: bool = False
    tried: set[str] = field(default_factory=set)
    attempts: int = 0


@dataclass
class _PeerMarks:
    """Per peer: consecutive failures, and until when it is left alone (backoff, busy)."""

    failures: dict[str, int] = field(default_factory=dict)
    backoff_until: dict[str, float] = field(default_factory=dict)
    busy_until: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # EWMA of its exchange time

    def excluded_until(self, peer_id: str) -> float:
        return max(self.backoff_until.get(peer_id, 0.0), self.busy_until.get(peer_id, 0.0))

    def forget(self, peer_id: str) -> None:
        self.failures.pop(peer_id, None)
        self.backoff_until.pop(peer_id, None)
        self.busy_until.pop(peer_id, None)

    def timed(self, peer_id: str, seconds: float) -> None:
        before = self.seconds.pop(peer_id, None)  # re-inserted last: the dict runs oldest first
        self.seconds[peer_id] = seconds if before is None else before + SPEED_EWMA * (seconds - before)
        while len(self.seconds) > MAX_TIMED_PEERS:  # bounded over months of churn
            del self.seconds[next(iter(self.seconds))]

    def prune(self, now: float, backoff_max: float) -> None:
        """Bounded memory over months: forget busy marks that ran out, and failures whose
        backoff ended long ago (a peer that comes back starts from a short backoff)."""
        self.busy_until = {k: t for k, t in self.busy_until.items() if t > now}
        stale = [k for k, t in self.backoff_until.items() if t + backoff_max < now]
        for peer_id in stale:
            self.forget(peer_id)


class ExchangeScheduler:
    def __init__(
        self,
        *,
        interval: float,
        rng: random.Random,
        backoff_base: float | None = None,
        backoff_max: float = 300.0,
        busy_exclusion: float | None = None,
        jitter: float = 0.1,
        max_attempts: int = 3,
        now: float = 0.0,
    ) -> None:
        """`backoff_base` and `busy_exclusion` default to interval and interval/2 and follow
        set_interval(). The first round opens at a random point within one interval of `now`."""
        _check_interval(interval)
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if backoff_base is not None and not 0 < backoff_base <= backoff_max:
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if busy_exclusion is not None and busy_exclusion < 0:
            raise ValueError("busy_exclusion must be >= 0")
        self._policy = SchedulePolicy(interval=interval, jitter=jitter, max_attempts=max_attempts,
                                      backoff_base=backoff_base, backoff_max=backoff_max,
                                      busy_exclusion=busy_exclusion)
        self._rng = rng
        # next round = _base + interval * _factor, kept apart so set_interval can rescale it.
        self._base = now
        self._factor = rng.uniform(0.0, 1.0)
        self._round = _Round()
        self._in_flight: str | None = None
        self._began = now  # when the exchange in flight began (its time teaches us the peer's speed)
        self._marks = _PeerMarks()
        self._stats = {"rounds": 0, "skipped_no_peer": 0} | {o.value: 0 for o in Outcome}

    @property
    def interval(self) -> float:
        return self._policy.interval

    @property
    def in_flight(self) -> str | None:
        """The peer of the outgoing exchange in progress, if any."""
        return self._in_flight

    def next_due(self) -> float:
        """When the next round opens."""
        return self._base + self._policy.interval * self._factor

    def set_interval(self, interval: float) -> None:
        """Config reload: the pending round moves to the same jittered point of the new interval."""
        _check_interval(interval)
        self._policy = replace(self._policy, interval=interval)

    def choose_peer(self, candidates: Sequence[str], now: float) -> str | None:
        """A random candidate to exchange with now, or None: one is in flight, no round is
        due, or the round has nobody left (not in backoff, not tried this round). Peers whose
        exchanges take longer than the interval are chosen only when no other is eligible,
        or in an `EXPLORE` share of choices. `candidates` are the live peers with our model
        fingerprint."""
        if self._in_flight is not None:
            return None
        if now >= self.next_due():
            self._open_round(now)
        rnd = self._round
        if not rnd.open:
            return None
        eligible = sorted(
            {c for c in candidates if c not in rnd.tried and self.excluded_until(c) <= now}
        )
        if not eligible or rnd.attempts >= self._policy.max_attempts:
            if rnd.attempts == 0:
                self._stats["skipped_no_peer"] += 1
            rnd.open = False
            return None
        fast = [c for c in eligible if not self.is_slow(c)]
        if fast and len(fast) < len(eligible) and self._rng.random() >= EXPLORE:
            return self._rng.choice(fast)
        return self._rng.choice(eligible)

    def is_slow(self, peer_id: str) -> bool:
        """Its exchanges take longer than the interval, on average."""
        return self._marks.seconds.get(peer_id, 0.0) > self._policy.interval

    def exchange_seconds(self, peer_id: str) -> float | None:
        """The average time of an exchange with `peer_id` (None: not measured yet)."""
        return self._marks.seconds.get(peer_id)

    def begin(self, peer_id: str, now: float) -> None:
        """The caller starts an exchange with `peer_id` (normally what choose_peer returned)."""
        if self._in_flight is not None:
            raise RuntimeError(f"an exchange with {self._in_flight} is already in flight")
        self._in_flight = peer_id
        self._began = now
        self._round.tried.add(peer_id)
        self._round.attempts += 1

    def on_result(self, peer_id: str, outcome: Outcome | str, now: float) -> None:
        """outcome: an Outcome (or its value); CANCELLED (aborted, e.g. at shutdown): no
        penalty, round over."""
        if outcome not in tuple(Outcome):
            raise ValueError(f"unknown outcome {outcome!r}")
        if peer_id != self._in_flight:
            raise ValueError(f"no exchange with {peer_id} in flight")
        self._in_flight = None
        self._stats[outcome] += 1
        marks = self._marks
        took = max(0.0, now - self._began)
        # An exchange that ended well teaches its time; one that failed only if it was slow (a
        # refused connection is quick and says nothing about the link).
        if outcome == "ok" or (outcome in ("refused", "failed") and took > self._policy.interval):
            marks.timed(peer_id, took)
        if outcome == "ok":
            marks.forget(peer_id)
            self._round.open = False
        elif outcome == "busy":
            marks.busy_until[peer_id] = now + self._policy.busy_for()
        elif outcome in ("refused", "failed"):
            failures = marks.failures.get(peer_id, 0) + 1
            marks.failures[peer_id] = failures
            marks.backoff_until[peer_id] = now + self._policy.backoff(failures, self._rng)
        else:  # cancelled
            self._round.open = False

    def excluded_until(self, peer_id: str) -> float:
        """Until when `peer_id` is not chosen (backoff or busy); 0.0 if it may be chosen."""
        return self._marks.excluded_until(peer_id)

    def failures(self, peer_id: str) -> int:
        return self._marks.failures.get(peer_id, 0)

    def forget(self, peer_id: str) -> None:
        """Drop what we know of `peer_id` (it left the table)."""
        self._marks.forget(peer_id)
        self._marks.seconds.pop(peer_id, None)

    def statistics(self) -> dict[str, int]:
        return dict(self._stats) | {
            "in_flight": int(self._in_flight is not None),
            "peers_with_failures": len(self._marks.failures),
            "slow_peers": sum(self.is_slow(p) for p in self._marks.seconds),
        }

    def _open_round(self, now: float) -> None:
        # Scheduled from now, not from the missed due time: a late caller gets no burst.
        self._stats["rounds"] += 1
        self._round = _Round(open=True)
        self._base = now
        jitter = self._policy.jitter
        self._factor = self._rng.uniform(1.0 - jitter, 1.0 + jitter)
        self._marks.prune(now, self._policy.backoff_max)


def _check_interval(interval: float) -> None:
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError("interval must be a positive number of seconds")
