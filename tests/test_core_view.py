"""The partial view's decisions (core/view.py): fill, prune, rotate; and, simulated over many
nodes with the real policy, a connected overlay whose links and partners stay random."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from peerfed.core.view import MIN_LINK_AGE, PartialView


def peers(n: int, prefix: str = "p") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_fills_up_to_the_target_with_random_due_peers() -> None:
    view = PartialView(target=4, rng=random.Random(1))
    plan = view.plan(live={"a": 0.0}, dialing={"b"}, due=peers(50), now=10.0, max_parallel=8)
    assert len(plan.dial) == 2 and not plan.close
    assert set(plan.dial) <= set(peers(50))
    # not "the first of the list": over many plans the picks spread over all due peers
    picks = Counter(p for _ in range(200) for p in view.plan(live={}, dialing=(), due=peers(50), now=0.0,
                                                             max_parallel=8).dial)
    assert len(picks) == 50


def test_never_dials_more_than_the_parallel_limit_or_live_or_dialing_peers() -> None:
    view = PartialView(target=20, rng=random.Random(2))
    plan = view.plan(live={"p0": 0.0}, dialing={"p1", "p2"}, due=peers(30), now=0.0, max_parallel=5)
    assert len(plan.dial) == 3
    assert not {"p0", "p1", "p2"} & set(plan.dial)


def test_prunes_only_above_slack_and_only_links_that_lived_a_moment() -> None:
    view = PartialView(target=4, slack=2, rng=random.Random(3))
    six = {p: 0.0 for p in peers(6)}
    assert view.plan(live=six, dialing=(), due=[], now=100.0, max_parallel=8).close == ()  # within slack
    seven_new = {p: 99.0 for p in peers(7)}
    assert view.plan(live=seven_new, dialing=(), due=[], now=100.0, max_parallel=8).close == ()  # too young
    seven = {p: 100.0 - MIN_LINK_AGE for p in peers(7)}
    plan = view.plan(live=seven, dialing=(), due=[], now=100.0, max_parallel=8)
    assert len(plan.close) == 3 and set(plan.close) <= set(seven)
    assert view.statistics()["closed_over_target"] == 3


def test_rotates_one_link_per_period_once_full() -> None:
    view = PartialView(target=3, rotate_every=10.0, rng=random.Random(4))
    live = {p: 0.0 for p in peers(3)}
    due = peers(5, "q")
    assert view.plan(live=live, dialing=(), due=due, now=100.0, max_parallel=8).dial == ()  # arms the timer
    rotations = [view.plan(live=live, dialing=(), due=due, now=100.0 + t, max_parallel=8) for t in range(1, 60)]
    done = [r for r in rotations if r.dial]
    assert 4 <= len(done) <= 8  # every 7.5-12.5 s over 59 s
    for r in done:
        assert len(r.dial) == 1 and len(r.close) == 1 and r.dial[0] in due and r.close[0] in live


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        PartialView(target=0)
    with pytest.raises(ValueError):
        PartialView(target=4, rotate_every=0)


def simulate(n: int, target: int, seconds: int, seed: int = 0, *, bootstrap_only: bool = True,
             kill: set[int] | None = None, kill_at: int = 10**9) -> tuple[list[set[int]], list[Counter[int]]]:
    """Membership in one process with the real PartialView: every node knows only node 0 at
    first, learns peers from the records of the nodes it is linked to (a passive view capped
    at 64), dials (instant) and closes links as its view says, once per second. Each node
    exchanges with a random linked peer every 10 s. Returns the final links and partner counts."""
    rng = random.Random(seed)
    views = [PartialView(target=target, rng=random.Random(rng.random())) for _ in range(n)]
    known: list[set[int]] = [{0} - {i} for i in range(n)] if bootstrap_only else [set(range(n)) - {i} for i in range(n)]
    links: list[dict[int, float]] = [{} for _ in range(n)]
    partners: list[Counter[int]] = [Counter() for _ in range(n)]
    dead: set[int] = set()
    for now in range(seconds):
        if now == kill_at and kill:
            dead |= kill
            for i in kill:
                for j in list(links[i]):
                    links[j].pop(i, None)
                links[i].clear()
        for i in rng.sample(range(n), n):
            if i in dead:
                continue
            due = sorted(p for p in known[i] if p not in links[i] and p not in dead)
            live = {str(p): since for p, since in links[i].items()}
            plan = views[i].plan(live=live, dialing=(), due=[str(p) for p in due], now=float(now), max_parallel=8)
            for p in map(int, plan.close):
                links[i].pop(p, None)
                links[p].pop(i, None)
            for p in map(int, plan.dial):
                if len(links[p]) < target + 8:  # the host's hard cap (net/p2p.py)
                    links[i][p] = links[p][i] = float(now)
            for p in links[i]:  # peer-list swap: each sends its own record and those it knows
                for a, b in ((i, p), (p, i)):
                    known[a] |= ({b} | known[b]) - {a}
                    if len(known[a]) > 64:  # the passive view (p2p.max_peers)
                        known[a] = set(rng.sample(sorted(known[a]), 64))
            if now % 10 == i % 10 and links[i]:  # an exchange: a partner for both sides
                p = rng.choice(sorted(links[i]))
                partners[i][p] += 1
                partners[p][i] += 1
    alive = [set(links[i]) if i not in dead else set() for i in range(n)]
    return alive, partners


def connected(links: list[set[int]], nodes: set[int]) -> bool:
    start = next(iter(nodes))
    seen, todo = {start}, [start]
    while todo:
        for p in links[todo.pop()]:
            if p not in seen:
                seen.add(p)
                todo.append(p)
    return nodes <= seen


def test_simulated_swarm_from_one_bootstrap_gets_full_random_views_and_stays_connected() -> None:
    n, target = 64, 8
    links, partners = simulate(n, target, seconds=300)
    sizes = [len(x) for x in links]
    assert min(sizes) >= target - 1 and max(sizes) <= target + 8
    assert connected(links, set(range(n)))
    assert len(links[0]) <= target + 8  # node 0, everyone's bootstrap, does not hold the swarm
    # Partners close to uniform: every node is chosen about as often as any other.
    chosen = Counter(p for c in partners for p, k in c.items() for _ in range(k))
    assert max(chosen.values()) < 2 * min(chosen.values())


def test_partners_spread_over_the_swarm_in_ten_minutes() -> None:
    # the case: 32 nodes, max_connections 8, an exchange every 10 s per node
    _, partners = simulate(32, 8, seconds=600, seed=1)
    assert min(len(c) for c in partners) >= 24


def test_view_repairs_after_a_third_of_the_nodes_die() -> None:
    n, target = 48, 8
    kill = set(range(1, n, 3))
    links, _ = simulate(n, target, seconds=240, kill=kill, kill_at=120)
    alive = set(range(n)) - kill
    assert all(not (links[i] & kill) for i in alive)
    assert min(len(links[i]) for i in alive) >= target - 1
    assert connected(links, alive)


def test_verified_records_are_remembered_by_their_bytes_until_too_old() -> None:
    from peerfed.core.record_cache import VerifiedRecords

    cache = VerifiedRecords(max_age=100.0, limit=3)
    cache.add(b"rec-a", "A", timestamp=1000.0)
    assert cache.subject(b"rec-a", now=1050.0) == "A"
    assert cache.subject(b"rec-a", now=1101.0) is None  # expired records are checked again (and refused)
    assert cache.subject(b"rec-b", now=1050.0) is None
    for i in range(3):
        cache.add(f"r{i}".encode(), "X", timestamp=1000.0)
    assert cache.subject(b"rec-a", now=1050.0) is None  # bounded: cleared when full
    cache.clear()
    assert cache.subject(b"r2", now=1050.0) is None


def test_links_to_keep_are_never_closed() -> None:
    view = PartialView(target=2, slack=0, rotate_every=1.0, rng=random.Random(5))
    live = {"relay": 0.0, "a": 0.0, "b": 0.0, "c": 0.0}
    for t in range(50):
        plan = view.plan(live=live, dialing=(), due=["x", "y"], now=100.0 + t, max_parallel=8, keep={"relay"})
        assert "relay" not in plan.close
