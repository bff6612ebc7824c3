"""The peer-list swap pace (core/gossip_pace.py): fast while lists bring news, slow once quiet."""

from __future__ import annotations

import random

import pytest

from peerfed.core.gossip_pace import JITTER, GossipPace


def swaps_in(pace: GossipPace, start: float, seconds: float, *, news_at: float | None = None) -> list[float]:
    """When swaps fall due over `seconds` polled once a second; every swap's reply has no news
    except the one heard at `news_at`."""
    due = []
    for t in range(int(start), int(start + seconds)):
        if news_at is not None and t == news_at:
            pace.heard(True, t)
        if pace.due(t):
            due.append(float(t))
            pace.heard(False, t)
    return due


def test_quiet_lists_slow_the_swaps_down_to_the_ceiling() -> None:
    pace = GossipPace(5.0, 60.0, random.Random(1), now=0.0)
    first = swaps_in(pace, 0, 600)
    assert pace.interval == 60.0
    late = [t for t in first if t >= 300]
    assert len(late) <= 300 / (60 * (1 - JITTER)) + 1  # one swap a minute once settled
    assert len(first) < 600 / 5 / 5  # far fewer than a fixed 5 s pace would make


def test_news_brings_the_next_swap_forward_at_once() -> None:
    pace = GossipPace(5.0, 60.0, random.Random(2), now=0.0)
    swaps_in(pace, 0, 600)
    assert pace.interval == 60.0
    due = swaps_in(pace, 600, 60, news_at=610)
    assert due and due[0] <= 610 + 5 * (1 + JITTER) + 1  # not up to 72 s later
    stats = pace.statistics()
    assert stats.news == 1 and stats.quiet > 0


def test_every_list_without_news_doubles_the_interval() -> None:
    pace = GossipPace(5.0, 60.0, random.Random(3), now=0.0)
    seen = []
    for _ in range(6):
        pace.heard(False, 0.0)
        seen.append(pace.interval)
    assert seen == [10.0, 20.0, 40.0, 60.0, 60.0, 60.0]
    pace.heard(True, 0.0)
    assert pace.interval == 5.0


@pytest.mark.parametrize(("base", "ceiling"), [(0.0, 60.0), (10.0, 5.0), (5.0, float("inf")), (float("nan"), 5.0)])
def test_bad_bounds_are_refused(base: float, ceiling: float) -> None:
    with pytest.raises(ValueError):
        GossipPace(base, ceiling, random.Random(), now=0.0)
