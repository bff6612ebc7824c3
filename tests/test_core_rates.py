"""Rates: parsing, token-bucket pacing on a simulated clock, the interval stretch, the meter."""

from __future__ import annotations

import bisect
import pathlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layering import top_level_imports

import peerfed.core.rates as rates_module
from peerfed.core.rates import (
    RateMeter,
    TokenBucket,
    UploadBudget,
    ack_upload_bytes,
    check_share,
    default_burst,
    parse_rate,
    stretched_interval,
    wire_upload_bytes,
)


def test_rates_core_is_pure() -> None:
    assert top_level_imports(pathlib.Path(rates_module.__file__)) <= {"__future__", "collections", "math", "re"}


@pytest.mark.parametrize(("text", "expected"), [
    ("500kbit", 62_500.0), ("20Mbit", 2_500_000.0), ("1Gbit", 125_000_000.0),
    ("2.5MB", 2_500_000.0), ("1kB", 1000.0), ("3GB", 3e9), ("0.5Mbit", 62_500.0),
    (" 20 Mbit ", 2_500_000.0), (".5MB", 500_000.0), ("", None), ("   ", None),
])
def test_parse_rate_reads_decimal_units_bits_and_bytes(text: str, expected: float | None) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", [
    "20", "Mbit", "20mbit", "20MBit", "20Mbps", "20Mbit/s", "20 kb", "20Kbit", "20mb", "20 B",
    "-1Mbit", "0kbit", "0.0MB", "infMbit", "nanMB", "1e3kbit", "1,5MB", "20 Mbit x",
])
def test_parse_rate_refuses_anything_else_listing_the_allowed_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"kbit, Mbit, Gbit .* kB, MB, GB") as caught:
        parse_rate(text)
    assert repr(text) in str(caught.value)


@pytest.mark.parametrize("value", [20, 2.5, None, b"20Mbit"])
def test_parse_rate_wants_a_string(value: object) -> None:
    with pytest.raises(ValueError, match="allowed"):
        parse_rate(value)  # type: ignore[arg-type]


def simulate_send(bucket: TokenBucket, total: int, chunk: int, link_rate: float | None = None) -> list[tuple[float, int]]:
    """(time each chunk is released, its size) for a sender that sleeps as told; with
    `link_rate`, writing a chunk also takes its time on the link."""
    now, sent, events = 0.0, 0, []
    while sent < total:
        size = min(chunk, total - sent)
        now += bucket.delay_for(size, now)
        events.append((now, size))
        if link_rate is not None:
            now += size / link_rate
        sent += size
    return events


def busiest_window(events: list[tuple[float, int]], window: float) -> int:
    """The most bytes released within any [t, t + window) (the maximum starts at an event)."""
    times = [t for t, _ in events]
    prefix = [0]
    for _, size in events:
        prefix.append(prefix[-1] + size)
    return max(prefix[bisect.bisect_left(times, t + window)] - prefix[i] for i, t in enumerate(times))


@pytest.mark.parametrize(("rate_text", "chunk"), [("20Mbit", 64 * 1024), ("500kbit", 16 * 1024), ("1Gbit", 256 * 1024)])
@pytest.mark.parametrize("link_factor", [None, 10.0])
def test_a_long_send_never_exceeds_the_rate_over_a_10s_window(rate_text: str, chunk: int, link_factor: float | None) -> None:
    rate = parse_rate(rate_text)
    assert rate is not None
    bucket = TokenBucket(rate, default_burst(rate))
    total = int(rate * 95)  # 95 s worth, in chunks that do not divide it evenly
    events = simulate_send(bucket, total, chunk, None if link_factor is None else rate * link_factor)
    assert busiest_window(events, 10.0) <= rate * 10.0 * 1.05
    # ...and paces no slower than it must: the last chunk leaves within 1% of total / rate.
    assert events[-1][0] <= total / rate * 1.01


def test_the_first_burst_goes_at_once_then_the_rate_holds() -> None:
    bucket = TokenBucket(1000.0, 500.0, now=100.0)
    assert bucket.available(100.0) == 500.0
    assert bucket.delay_for(300, 100.0) == 0.0
    assert bucket.delay_for(200, 100.0) == 0.0  # the rest of the burst
    assert bucket.delay_for(100, 100.0) == pytest.approx(0.1)
    # The caller slept 0.1 s and sent; a long idle refills only up to the burst.
    assert bucket.delay_for(500, 1000.0) == 0.0
    assert bucket.delay_for(1, 1000.0) == pytest.approx(0.001)


def test_a_chunk_larger_than_the_burst_waits_for_a_full_bucket_then_overdraws() -> None:
    bucket = TokenBucket(1000.0, 100.0)
    assert bucket.delay_for(50, 0.0) == 0.0
    assert bucket.delay_for(1000, 0.0) == pytest.approx(0.05)  # full again at 0.05
    assert bucket.delay_for(100, 0.05) == pytest.approx(1.0)  # the 1000 bytes took 1 s of rate


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.floats(0, 2)), min_size=1, max_size=60))
def test_released_bytes_never_exceed_burst_plus_rate_times_time(sends: list[tuple[int, float]]) -> None:
    rate, burst = 1000.0, 5000.0
    bucket = TokenBucket(rate, burst)
    now, events = 0.0, []
    for size, idle in sends:
        now += idle
        now += bucket.delay_for(size, now)
        events.append((now, size))
    for i, (start, _) in enumerate(events):
        for j in range(i, len(events)):
            released = sum(size for _, size in events[i:j + 1])
            assert released <= burst + rate * (events[j][0] - start) + 1e-6


def test_bad_buckets_are_refused() -> None:
    for rate, burst in [(0.0, 1.0), (1.0, 0.0), (float("inf"), 1.0), (float("nan"), 1.0)]:
        with pytest.raises(ValueError):
            TokenBucket(rate, burst)
    with pytest.raises(ValueError):
        TokenBucket(1.0, 1.0).delay_for(-1, 0.0)


def test_stretched_interval_keeps_the_average_upload_under_the_share() -> None:
    rate = parse_rate("20Mbit")  # 2.5 MB/s
    assert stretched_interval(10.0, 44.7e6, None, 0.5) == 10.0  # unlimited
    assert stretched_interval(10.0, 1e6, rate, 0.5) == 10.0  # small model: 0.8 s of the link
    interval = stretched_interval(10.0, 2 * 44.7e6, rate, 0.5)  # ResNet-18, push + reply
    assert interval == pytest.approx(2 * 44.7e6 / (0.5 * 2.5e6))
    assert 2 * 44.7e6 / interval <= 0.5 * rate * (1 + 1e-12)
    assert stretched_interval(10.0, 2 * 44.7e6, rate, 1.0) == pytest.approx(interval / 2)


@pytest.mark.parametrize("share", [0, -0.5, 1.01, float("nan"), True, "0.5"])
def test_shares_outside_0_1_are_refused(share: object) -> None:
    with pytest.raises(ValueError, match="0 < x <= 1"):
        check_share(share)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stretched_interval(10.0, 1e6, 1e6, share)  # type: ignore[arg-type]


def test_rate_meter_reports_the_last_window_and_the_whole_run() -> None:
    meter = RateMeter(window=10.0, now=0.0)
    for second in range(30):  # 1000 B/s for 20 s, then 5000 B/s
        meter.add(1000 if second < 20 else 5000, second + 0.5)
    assert meter.current(30.0) == pytest.approx(5000.0)
    assert meter.average(30.0) == pytest.approx((20 * 1000 + 10 * 5000) / 30)
    assert meter.current(45.0) == 0.0  # idle for longer than the window
    assert meter.total == 70_000
    early = RateMeter(window=10.0, now=0.0)
    early.add(3000, 0.5)
    assert early.current(2.0) == pytest.approx(1500.0)  # 2 s since the start, not the whole window


def test_the_uplink_carries_headers_on_what_we_send_and_acks_for_what_we_receive() -> None:
    assert wire_upload_bytes(1448 * 1000) == pytest.approx(1514 * 1000)  # one full Ethernet frame per segment
    assert ack_upload_bytes(2 * 1448 * 1000) == pytest.approx(66 * 1000)  # one bare ACK per two segments
    # both at their caps with a 5x faster download: the ACKs are ~11% of the uplink's cap
    assert 0.10 < ack_upload_bytes(5 * 1_000_000) / 1_000_000 < 0.12


def test_bytes_charged_without_asking_delay_the_next_send() -> None:
    bucket = TokenBucket(1000.0, 100.0, now=0.0)
    assert bucket.delay_for(100, 0.0) == 0.0  # the burst
    bucket.charge(500, 0.0)  # our ACKs went out meanwhile
    assert bucket.delay_for(100, 0.0) == pytest.approx(0.6)
    idle = TokenBucket(1000.0, 100.0, now=0.0)
    idle.charge(50, 10.0)  # charged into a full bucket: half the burst is left
    assert idle.available(10.0) == pytest.approx(50.0)


def test_the_upload_budget_holds_the_share_over_the_last_window() -> None:
    budget = UploadBudget(1000.0, 0.5, window=60.0, now=0.0)  # 30 kB per minute
    assert budget.limit == pytest.approx(30_000)
    assert budget.allows(30_000, 0.0)
    budget.add(20_000, 1.0)
    assert budget.allows(10_000, 2.0) and not budget.allows(10_001, 2.0)
    assert budget.used_share(2.0) == pytest.approx(2 / 3)
    assert budget.allows(30_000, 62.5)  # a minute later the 20 kB are out of the window
    assert budget.used_share(62.5) == 0.0


def test_an_upload_larger_than_the_whole_budget_goes_alone_after_an_idle_window() -> None:
    budget = UploadBudget(1000.0, 0.5, window=60.0, now=0.0)
    assert budget.allows(100_000, 0.0)  # nothing in the window: one big model still goes
    budget.add(100_000, 0.5)
    assert not budget.allows(1, 30.0)
    assert budget.allows(100_000, 61.5)


@pytest.mark.parametrize("args", [(0.0, 0.5), (float("inf"), 0.5), (1000.0, 0.0), (1000.0, 1.5)])
def test_bad_budgets_are_refused(args: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        UploadBudget(*args)
