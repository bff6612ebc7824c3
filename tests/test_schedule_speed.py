"""The scheduler learns each peer's exchange time and prefers peers that finish within the
interval, still trying slow ones now and then (issue 10: slow peers never slow fast ones)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peerfed.core.exchange_rules import Outcome
from peerfed.core.schedule import EXPLORE, MAX_TIMED_PEERS, ExchangeScheduler

INTERVAL = 10.0


def scheduler(seed: int = 0) -> ExchangeScheduler:
    return ExchangeScheduler(interval=INTERVAL, rng=random.Random(seed), jitter=0.0, now=0.0)


def exchange(s: ExchangeScheduler, peer: str, start: float, seconds: float, outcome: Outcome = Outcome.OK) -> None:
    s.begin(peer, start)
    s.on_result(peer, outcome, start + seconds)


def choices(s: ExchangeScheduler, peers: list[str], rounds: int, start: float) -> Counter[str]:
    """Whom each of `rounds` rounds picks first (each round ends ok, in no time)."""
    seen: Counter[str] = Counter()
    now = start
    for _ in range(rounds):
        now += INTERVAL
        peer = s.choose_peer(peers, now)
        assert peer is not None
        seen[peer] += 1
        s.begin(peer, now)
        s.on_result(peer, Outcome.OK, now)  # a 0 s exchange: pulls the average down a little
        if peer == "slow":
            s._marks.seconds["slow"] = 25.0  # keep it slow for the count
    return seen


def test_the_exchange_time_is_learned_as_an_average() -> None:
    s = scheduler()
    assert s.exchange_seconds("a") is None and not s.is_slow("a")
    exchange(s, "a", 0.0, 20.0)
    assert s.exchange_seconds("a") == pytest.approx(20.0) and s.is_slow("a")
    exchange(s, "a", 100.0, 0.0)
    assert s.exchange_seconds("a") == pytest.approx(14.0)  # 20 + 0.3 * (0 - 20)
    exchange(s, "a", 200.0, 0.0)
    assert s.exchange_seconds("a") == pytest.approx(9.8) and not s.is_slow("a")
    assert s.statistics()["slow_peers"] == 0


def test_peers_that_finish_within_the_interval_are_preferred_and_slow_ones_still_tried() -> None:
    s = scheduler()
    exchange(s, "slow", 0.0, 25.0)
    seen = choices(s, ["fast1", "fast2", "slow"], 2000, 100.0)
    share = seen["slow"] / 2000
    # a third of the EXPLORE share (the slow one among three), never zero
    assert 0.5 * EXPLORE / 3 <= share <= 2 * EXPLORE / 3, seen
    assert seen["fast1"] > 800 and seen["fast2"] > 800
    assert s.statistics()["slow_peers"] == 1


def test_with_only_slow_peers_left_one_of_them_is_chosen() -> None:
    s = scheduler()
    exchange(s, "slow", 0.0, 25.0)
    assert s.choose_peer(["slow"], 100.0) == "slow"


def test_a_quick_failure_says_nothing_of_the_link_but_a_slow_one_does() -> None:
    s = scheduler()
    exchange(s, "refusing", 0.0, 0.01, Outcome.FAILED)
    assert s.exchange_seconds("refusing") is None
    exchange(s, "stalling", 0.0, 15.0, Outcome.FAILED)  # e.g. cut for going below the floor
    assert s.is_slow("stalling")
    exchange(s, "busy", 0.0, 30.0, Outcome.BUSY)
    assert s.exchange_seconds("busy") is None


def test_memory_of_exchange_times_is_bounded_and_forgetting_a_peer_drops_it() -> None:
    s = scheduler()
    for i in range(MAX_TIMED_PEERS + 10):
        exchange(s, f"p{i}", float(i), 1.0)
    assert s.exchange_seconds("p0") is None and s.exchange_seconds(f"p{MAX_TIMED_PEERS + 9}") == 1.0
    s.forget(f"p{MAX_TIMED_PEERS + 9}")
    assert s.exchange_seconds(f"p{MAX_TIMED_PEERS + 9}") is None
