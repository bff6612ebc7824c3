"""Exchange scheduler: when to start a gossip round and whom to contact. Decisions only.

Every `interval` seconds (times a random factor in [1 - jitter, 1 + jitter], so nodes started
together drift apart) a round opens. In a round the caller asks `choose_peer` for a uniformly
random candidate that is not backing off, calls `begin` when it starts the exchange and
`on_result` when it ends. "ok" closes the round; "busy", "refused" and "failed" leave it open
so the caller can try another peer at once (up to `max_attempts` per round). At most one
outgoing exchange is in flight. No I/O, no clock: `now` (unix seconds) is passed in.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from peerfed.core.exchange_rules import Outcome
from peerfed.core.peers import jittered_backoff


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
        self._interval = interval
        self._rng = rng
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._busy_exclusion = busy_exclusion
        self._jitter = jitter
        self._max_attempts = max_attempts
        # next round = _base + interval * _factor, kept apart so set_interval can rescale it.
        self._base = now
        self._factor = rng.uniform(0.0, 1.0)
        self._round_open = False
        self._tried: set[str] = set()
        self._attempts = 0
        self._in_flight: str | None = None
        self._failures: dict[str, int] = {}
        self._backoff_until: dict[str, float] = {}
        self._busy_until: dict[str, float] = {}
        self._stats = {"rounds": 0, "skipped_no_peer": 0} | {o.value: 0 for o in Outcome}

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def in_flight(self) -> str | None:
        """The peer of the outgoing exchange in progress, if any."""
        return self._in_flight

    def next_due(self) -> float:
        """When the next round opens."""
        return self._base + self._interval * self._factor

    def set_interval(self, interval: float) -> None:
        """Config reload: the pending round moves to the same jittered point of the new interval."""
        _check_interval(interval)
        self._interval = interval

    def choose_peer(self, candidates: Sequence[str], now: float) -> str | None:
        """A uniformly random candidate to exchange with now, or None: one is in flight, no
        round is due, or the round has nobody left (not in backoff, not tried this round).
        `candidates` are the live peers with our model fingerprint."""
        if self._in_flight is not None:
            return None
        if now >= self.next_due():
            self._open_round(now)
        if not self._round_open:
            return None
        eligible = sorted(
            {c for c in candidates if c not in self._tried and self.excluded_until(c) <= now}
        )
        if not eligible or self._attempts >= self._max_attempts:
            if self._attempts == 0:
                self._stats["skipped_no_peer"] += 1
            self._round_open = False
            return None
        return self._rng.choice(eligible)

    def begin(self, peer_id: str, now: float) -> None:
        """The caller starts an exchange with `peer_id` (normally what choose_peer returned)."""
        if self._in_flight is not None:
            raise RuntimeError(f"an exchange with {self._in_flight} is already in flight")
        self._in_flight = peer_id
        self._tried.add(peer_id)
        self._attempts += 1

    def on_result(self, peer_id: str, outcome: Outcome | str, now: float) -> None:
        """outcome: an Outcome (or its value); CANCELLED (aborted, e.g. at shutdown): no
        penalty, round over."""
        if outcome not in tuple(Outcome):
            raise ValueError(f"unknown outcome {outcome!r}")
        if peer_id != self._in_flight:
            raise ValueError(f"no exchange with {peer_id} in flight")
        self._in_flight = None
        self._stats[outcome] += 1
        if outcome == "ok":
            self._failures.pop(peer_id, None)
            self._backoff_until.pop(peer_id, None)
            self._busy_until.pop(peer_id, None)
            self._round_open = False
        elif outcome == "busy":
            self._busy_until[peer_id] = now + self._busy_for()
        elif outcome in ("refused", "failed"):
            failures = self._failures.get(peer_id, 0) + 1
            self._failures[peer_id] = failures
            base = self._backoff_base if self._backoff_base is not None else self._interval
            delay = jittered_backoff(
                failures, base=base, cap=max(base, self._backoff_max), rng=self._rng
            )
            self._backoff_until[peer_id] = now + delay
        else:  # cancelled
            self._round_open = False

    def excluded_until(self, peer_id: str) -> float:
        """Until when `peer_id` is not chosen (backoff or busy); 0.0 if it may be chosen."""
        return max(self._backoff_until.get(peer_id, 0.0), self._busy_until.get(peer_id, 0.0))

    def failures(self, peer_id: str) -> int:
        return self._failures.get(peer_id, 0)

    def forget(self, peer_id: str) -> None:
        """Drop what we know of `peer_id` (it left the table)."""
        self._failures.pop(peer_id, None)
        self._backoff_until.pop(peer_id, None)
        self._busy_until.pop(peer_id, None)

    def statistics(self) -> dict[str, int]:
        return dict(self._stats) | {
            "in_flight": int(self._in_flight is not None),
            "peers_with_failures": len(self._failures),
        }

    def _busy_for(self) -> float:
        return self._busy_exclusion if self._busy_exclusion is not None else self._interval / 2

    def _open_round(self, now: float) -> None:
        # Scheduled from now, not from the missed due time: a late caller gets no burst.
        self._stats["rounds"] += 1
        self._round_open = True
        self._tried.clear()
        self._attempts = 0
        self._base = now
        self._factor = self._rng.uniform(1.0 - self._jitter, 1.0 + self._jitter)
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Bounded memory over months: forget busy marks that ran out, and failures whose
        backoff ended long ago (a peer that comes back starts from a short backoff)."""
        self._busy_until = {k: t for k, t in self._busy_until.items() if t > now}
        stale = [k for k, t in self._backoff_until.items() if t + self._backoff_max < now]
        for peer_id in stale:
            self.forget(peer_id)


def _check_interval(interval: float) -> None:
    if not (math.isfinite(interval) and interval > 0):
        raise ValueError("interval must be a positive number of seconds")
