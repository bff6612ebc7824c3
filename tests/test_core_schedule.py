"""ExchangeScheduler: decisions read back from explicit times and a seeded rng."""

from __future__ import annotations

import collections
import pathlib
import random

import pytest
from test_layering import top_level_imports
from hypothesis import given, settings
from hypothesis import strategies as st

import peerfed.core.schedule as schedule_module
from peerfed.core.schedule import ExchangeScheduler

T0 = 1_700_000_000.0
PEERS = [f"12D3KooWpeer{i}" for i in range(8)]


def sched(interval: float = 10.0, seed: int = 0, **kw) -> ExchangeScheduler:
    return ExchangeScheduler(interval=interval, rng=random.Random(seed), now=T0, **kw)


def run_round(s: ExchangeScheduler, candidates, outcome: str = "ok") -> str | None:
    """Open the next round at its due time and finish one exchange with `outcome`."""
    now = s.next_due()
    peer = s.choose_peer(candidates, now)
    if peer is not None:
        s.begin(peer, now)
        s.on_result(peer, outcome, now)
    return peer


def test_first_round_within_one_interval_and_none_before():
    s = sched(interval=10.0, seed=3)
    assert T0 <= s.next_due() <= T0 + 10.0
    assert s.choose_peer(PEERS, s.next_due() - 0.001) is None
    assert s.choose_peer(PEERS, s.next_due()) in PEERS
    assert s.statistics()["rounds"] == 1


def test_first_rounds_of_nodes_started_together_are_spread():
    dues = {ExchangeScheduler(interval=10.0, rng=random.Random(i), now=T0).next_due()
            for i in range(20)}
    assert max(dues) - min(dues) > 5.0


def test_choice_is_uniform_over_candidates():
    s = sched(seed=11)
    counts = collections.Counter(run_round(s, PEERS) for _ in range(8000))
    assert set(counts) == set(PEERS)
    expected = 8000 / len(PEERS)
    chi2 = sum((counts[p] - expected) ** 2 / expected for p in PEERS)
    assert chi2 < 24.32  # chi-square, 7 degrees of freedom, p = 0.001
    assert s.statistics()["rounds"] == s.statistics()["ok"] == 8000


def test_choice_does_not_depend_on_candidate_order():
    a, b = sched(seed=5), sched(seed=5)
    picks_a = [run_round(a, PEERS) for _ in range(50)]
    picks_b = [run_round(b, list(reversed(PEERS)) + PEERS[:2]) for _ in range(50)]
    assert picks_a == picks_b


def test_interval_jitter_bounds():
    s = sched(interval=10.0, seed=2)
    gaps = []
    for _ in range(2000):
        start = s.next_due()
        run_round(s, PEERS)
        gaps.append(s.next_due() - start)
    assert all(9.0 <= g <= 11.0 for g in gaps)
    assert max(gaps) - min(gaps) > 1.5  # the jitter is really there
    assert abs(sum(gaps) / len(gaps) - 10.0) < 0.1


def test_late_caller_gets_no_burst_of_rounds():
    s = sched(interval=10.0)
    run_round(s, PEERS)
    late = s.next_due() + 1000.0
    peer = s.choose_peer(PEERS, late)
    s.begin(peer, late)
    s.on_result(peer, "ok", late)
    assert s.next_due() >= late + 9.0
    assert s.choose_peer(PEERS, late + 1.0) is None
    assert s.statistics()["rounds"] == 2


def test_busy_peer_is_skipped_and_another_is_chosen_at_once():
    s = sched(interval=10.0, seed=4, max_attempts=3)
    now = s.next_due()
    candidates = PEERS[:3]
    tried = []
    for _ in range(3):
        peer = s.choose_peer(candidates, now)
        assert peer is not None and peer not in tried
        tried.append(peer)
        s.begin(peer, now)
        s.on_result(peer, "busy", now)
        assert s.excluded_until(peer) == now + 5.0  # interval / 2
    assert sorted(tried) == sorted(candidates)
    assert s.choose_peer(candidates, now) is None  # everyone tried this round
    stats = s.statistics()
    assert stats["busy"] == 3 and stats["rounds"] == 1 and stats["skipped_no_peer"] == 0
    # next round: the busy marks (interval/2) have run out
    assert s.choose_peer(candidates, s.next_due()) in candidates


def test_peer_tried_this_round_is_not_chosen_again_even_without_exclusion():
    s = sched(seed=9, busy_exclusion=0.0, max_attempts=5)
    now = s.next_due()
    seen = []
    for _ in range(2):
        peer = s.choose_peer(PEERS[:2], now)
        assert peer not in seen
        seen.append(peer)
        s.begin(peer, now)
        s.on_result(peer, "busy", now)
    assert s.choose_peer(PEERS[:2], now) is None


def test_max_attempts_per_round():
    s = sched(max_attempts=2)
    now = s.next_due()
    for _ in range(2):
        peer = s.choose_peer(PEERS, now)
        s.begin(peer, now)
        s.on_result(peer, "failed", now)
    assert s.choose_peer(PEERS, now) is None


def test_ok_closes_the_round():
    s = sched()
    run_round(s, PEERS)
    assert s.choose_peer(PEERS, s.next_due() - 0.001) is None


def test_failed_peer_backs_off_until_its_time():
    s = sched(interval=10.0, backoff_base=10.0, backoff_max=1000.0)
    only = PEERS[:1]
    for n in range(1, 5):
        now = s.next_due()
        # all rounds before the backoff ends find nobody
        while now < s.excluded_until(only[0]):
            assert s.choose_peer(only, now) is None
            now = s.next_due()
        assert s.choose_peer(only, now) == only[0]
        s.begin(only[0], now)
        s.on_result(only[0], "refused" if n % 2 else "failed", now)
        delay = s.excluded_until(only[0]) - now
        assert 0.5 * 10.0 * 2 ** (n - 1) <= delay <= 10.0 * 2 ** (n - 1)
        assert s.failures(only[0]) == n
    stats = s.statistics()
    assert stats["refused"] == 2 and stats["failed"] == 2 and stats["skipped_no_peer"] > 0


def test_backoff_is_capped_and_reset_by_ok():
    s = sched(interval=1.0, backoff_base=1.0, backoff_max=30.0)
    peer = PEERS[0]
    for _ in range(20):
        now = max(s.next_due(), s.excluded_until(peer))
        while s.choose_peer([peer], now) is None:
            now = max(s.next_due(), s.excluded_until(peer))
        s.begin(peer, now)
        s.on_result(peer, "failed", now)
        assert s.excluded_until(peer) - now <= 30.0
    assert s.excluded_until(peer) - now >= 15.0
    now = max(s.next_due(), s.excluded_until(peer))
    while s.choose_peer([peer], now) is None:
        now = max(s.next_due(), s.excluded_until(peer))
    s.begin(peer, now)
    s.on_result(peer, "ok", now)
    assert s.failures(peer) == 0 and s.excluded_until(peer) == 0.0


def test_backoff_of_one_peer_leaves_others_chosen():
    s = sched(backoff_base=1000.0, backoff_max=1000.0)
    bad = PEERS[0]
    now = s.next_due()
    assert s.choose_peer([bad], now) == bad
    s.begin(bad, now)
    s.on_result(bad, "failed", now)
    picks = {run_round(s, PEERS[:3]) for _ in range(30)}
    assert bad not in picks and picks == set(PEERS[1:3])


def test_one_exchange_in_flight_at_a_time():
    s = sched()
    now = s.next_due()
    peer = s.choose_peer(PEERS, now)
    s.begin(peer, now)
    assert s.in_flight == peer and s.statistics()["in_flight"] == 1
    assert s.choose_peer(PEERS, now) is None
    assert s.choose_peer(PEERS, now + 1e6) is None  # even when the next round is due
    with pytest.raises(RuntimeError):
        s.begin(PEERS[0], now)
    other = next(p for p in PEERS if p != peer)
    with pytest.raises(ValueError):
        s.on_result(other, "ok", now)
    with pytest.raises(ValueError):
        s.on_result(peer, "maybe", now)
    s.on_result(peer, "ok", now)
    assert s.in_flight is None
    with pytest.raises(ValueError):
        s.on_result(peer, "ok", now)  # a stale second result


def test_cancelled_is_no_penalty_and_ends_round():
    s = sched()
    now = s.next_due()
    peer = s.choose_peer(PEERS, now)
    s.begin(peer, now)
    s.on_result(peer, "cancelled", now)
    assert s.failures(peer) == 0 and s.excluded_until(peer) == 0.0
    assert s.choose_peer(PEERS, now) is None


def test_no_candidates_counts_skipped_round():
    s = sched()
    assert s.choose_peer([], s.next_due()) is None
    assert s.choose_peer(PEERS, s.next_due() - 0.001) is None  # round over, wait for the next
    assert s.statistics()["skipped_no_peer"] == 1 and s.statistics()["rounds"] == 1


def test_set_interval_rescales_the_pending_round():
    # the pending round keeps its jitter factor, scaled to the new interval
    s2 = sched(interval=10.0)
    run_round(s2, PEERS)
    opened = s2.next_due()
    run_round(s2, PEERS)
    gap10 = s2.next_due() - opened
    s2.set_interval(100.0)
    assert s2.next_due() - opened == pytest.approx(gap10 * 10)
    assert s2.interval == 100.0
    with pytest.raises(ValueError):
        s2.set_interval(0.0)
    with pytest.raises(ValueError):
        s2.set_interval(float("nan"))


def test_memory_stays_bounded_with_many_transient_peers():
    s = sched(interval=1.0, backoff_base=1.0, backoff_max=10.0)
    for i in range(3000):
        peer = f"gone{i}"
        now = s.next_due()
        assert s.choose_peer([peer], now) == peer
        s.begin(peer, now)
        s.on_result(peer, "failed" if i % 2 else "busy", now)
    assert s.statistics()["peers_with_failures"] < 30
    assert len(s._marks.busy_until) < 5 and len(s._marks.backoff_until) < 30


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    ops=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=30.0),
            st.sets(st.sampled_from(PEERS), max_size=len(PEERS)),
            st.sampled_from(["ok", "busy", "refused", "failed", "cancelled", "skip"]),
        ),
        max_size=60,
    ),
)
def test_random_sequences_keep_invariants(seed, ops):
    s = ExchangeScheduler(interval=5.0, rng=random.Random(seed), now=T0)
    now = T0
    for dt, candidates, outcome in ops:
        now += dt
        peer = s.choose_peer(sorted(candidates), now)
        if peer is None:
            continue
        assert peer in candidates
        assert s.excluded_until(peer) <= now
        if outcome == "skip":
            continue
        s.begin(peer, now)
        assert s.choose_peer(PEERS, now) is None
        s.on_result(peer, outcome, now)
    stats = s.statistics()
    assert stats["ok"] <= stats["rounds"]
    assert stats["in_flight"] == 0


def test_constructor_rejects_bad_settings():
    rng = random.Random(0)
    for kw in ({"interval": 0}, {"interval": -1}, {"interval": 1, "jitter": 1.0},
               {"interval": 1, "max_attempts": 0},
               {"interval": 1, "backoff_base": 10.0, "backoff_max": 5.0}):
        with pytest.raises(ValueError):
            ExchangeScheduler(rng=rng, **kw)


def test_module_is_pure():
    imported = top_level_imports(pathlib.Path(schedule_module.__file__))
    assert imported <= {"__future__", "math", "random", "collections", "dataclasses", "peerfed"}
