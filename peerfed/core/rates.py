"""Transfer rates: the config's rate strings, pacing a transfer, stretching the exchange interval.

Decisions only: no I/O, no clock (`now`, in seconds on any monotonic clock, is passed in).

- `parse_rate("20Mbit")` -> bytes per second (decimal units: k = 1000). "kbit", "Mbit",
  "Gbit" are bits per second, "kB", "MB", "GB" bytes per second; "" means unlimited (None).
- `TokenBucket(rate, burst)`: the sender asks `delay_for(nbytes, now)` before each chunk and
  sleeps that long before writing it. The bucket holds at most `burst` bytes of credit and
  refills at `rate`, so the bytes released in any window of T seconds are at most
  burst + rate * T (chunks no larger than burst): a 10 s window stays within 5% of the rate
  when burst <= 0.5 s of it (`default_burst` gives 0.1 s).
- `stretched_interval`: the time between this node's exchanges, made long enough that its
  average upload stays below max_upload_share x max_upload_rate.
- `RateMeter`: bytes per second over the last few seconds and since the start (for /status).
- `wire_upload_bytes`, `ack_upload_bytes`: what the uplink really carries for a payload sent
  (TCP/IP and Ethernet headers) and for one received (our ACKs), so a cap holds on the wire.
- `UploadBudget`: max_upload_share as a rule over a sliding minute: an upload starts only
  when it fits in the share of the rate that the last minute left over.
"""

from __future__ import annotations

import math
import re
from collections import deque

RATE_UNITS: dict[str, float] = {  # bytes per second per unit
    "kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8,
    "kB": 1e3, "MB": 1e6, "GB": 1e9,
}
RATE_FORMS = ('"" (unlimited), or a positive number and a unit: kbit, Mbit, Gbit (bits per second) '
              'or kB, MB, GB (bytes per second), e.g. "500kbit", "20Mbit", "1Gbit", "2.5MB"')
_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(" + "|".join(RATE_UNITS) + r")\s*")
BURST_SECONDS = 0.1
MIN_BURST = 16 * 1024


def parse_rate(text: str) -> float | None:
    """Bytes per second for a rate string; None for "" (unlimited). ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"a rate must be a string, not {text!r}; allowed: {RATE_FORMS}")
    if not text.strip():
        return None
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"rate {text!r} not understood; allowed: {RATE_FORMS}")
    rate = float(match.group(1)) * RATE_UNITS[match.group(2)]
    if not rate > 0:
        raise ValueError(f"rate {text!r} must be above zero (\"\" means unlimited); allowed: {RATE_FORMS}")
    return rate


def check_share(share: float) -> float:
    """`share` if 0 < share <= 1, else ValueError (exchange.max_upload_share)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"a share must be a number with 0 < x <= 1, not {share!r}")
    return float(share)


def default_burst(rate: float) -> float:
    """Credit a bucket may hold: 0.1 s of the rate, at least 16 KiB (so chunks fit)."""
    return max(rate * BURST_SECONDS, MIN_BURST)


class TokenBucket:
    """Paces a sender to `rate` bytes per second with up to `burst` bytes sent at once.

    Kept as the time at which the bucket is full again (generic cell rate algorithm): one
    float of state, exact at any rate, no ticking.
    """

    def __init__(self, rate: float, burst: float, *, now: float = 0.0) -> None:
        if not (math.isfinite(rate) and rate > 0 and math.isfinite(burst) and burst > 0):
            raise ValueError("rate and burst must be positive and finite")
        self.rate = rate
        self.burst = burst
        self._full_at = now  # starts full

    def delay_for(self, nbytes: int, now: float) -> float:
        """Reserve `nbytes`; return the seconds to wait before sending them (0 = now).

        A chunk larger than the burst waits for a full bucket and then overdraws it, so the
        following chunks wait longer: the average rate holds either way.
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        need = min(nbytes, self.burst)
        send_at = max(now, self._full_at - (self.burst - need) / self.rate)
        self._full_at = max(self._full_at, send_at) + nbytes / self.rate
        return send_at - now

    def charge(self, nbytes: float, now: float) -> None:
        """Count `nbytes` that went out without asking (our ACKs): later sends wait for them."""
        self._full_at = max(self._full_at, now) + nbytes / self.rate

    def available(self, now: float) -> float:
        """Bytes that could go out at `now` without waiting."""
        return max(0.0, self.burst - max(0.0, self._full_at - now) * self.rate)


def stretched_interval(base_interval: float, bytes_per_exchange: float,
                       max_upload_rate: float | None, max_upload_share: float) -> float:
    """Seconds between this node's exchanges: `base_interval`, or longer, so that uploading
    `bytes_per_exchange` per interval averages at most max_upload_share x max_upload_rate.

    `bytes_per_exchange` is everything this node uploads per interval: its push, plus the
    replies it sends to others' pushes (in a swarm of alike nodes, about one per own push:
    twice the wire length of a model).
    """
    share = check_share(max_upload_share)
    if max_upload_rate is None:
        return base_interval
    if not max_upload_rate > 0:
        raise ValueError("max_upload_rate must be > 0 (None: unlimited)")
    return max(base_interval, bytes_per_exchange / (share * max_upload_rate))


class RateMeter:
    """Bytes per second over the last `window` seconds (`current`) and since `start`
    (`average`), kept in `resolution`-second buckets: memory bounded by window/resolution."""

    def __init__(self, *, window: float = 10.0, resolution: float = 1.0, now: float = 0.0) -> None:
        if not 0 < resolution <= window:
            raise ValueError("need 0 < resolution <= window")
        self.window = window
        self.resolution = resolution
        self.start = now
        self.total = 0
        self._buckets: deque[tuple[int, int]] = deque()  # (bucket index, bytes), oldest first

    def add(self, nbytes: int, now: float) -> None:
        self.total += nbytes
        index = math.floor(now / self.resolution)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1] = (index, self._buckets[-1][1] + nbytes)
        else:
            self._buckets.append((index, nbytes))
        self._drop_old(now)

    def current(self, now: float) -> float:
        """Bytes per second over the buckets that overlap the last `window` seconds."""
        oldest = self._drop_old(now)
        span = now - max(self.start, oldest * self.resolution)
        return sum(nbytes for _, nbytes in self._buckets) / span if span > 0 else 0.0

    def recent_bytes(self, now: float) -> int:
        """Bytes in the buckets that overlap the last `window` seconds."""
        self._drop_old(now)
        return sum(nbytes for _, nbytes in self._buckets)

    def average(self, now: float) -> float:
        elapsed = now - self.start
        return self.total / elapsed if elapsed > 0 else 0.0

    def _drop_old(self, now: float) -> int:
        """Drop buckets that end before the window; return the oldest index kept."""
        oldest = math.floor((now - self.window) / self.resolution)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()
        return oldest


# -- what the uplink carries beyond the payload (issue 10: a cap holds on the wire) -----------

SEGMENT_PAYLOAD = 1448  # TCP payload per segment: 1500-byte MTU, IPv4, timestamps on
SEGMENT_HEADERS = 66    # Ethernet 14 + IPv4 20 + TCP 20 + timestamp option 12 (IPv6: 20 more)
SEGMENTS_PER_ACK = 2    # delayed ACKs: one pure ACK per two full segments received


def wire_upload_bytes(payload: int) -> float:
    """Bytes our uplink carries to send `payload` bytes of TCP payload."""
    return payload * (1 + SEGMENT_HEADERS / SEGMENT_PAYLOAD)


def ack_upload_bytes(downloaded: int) -> float:
    """Bytes our uplink carries acknowledging `downloaded` bytes (with a 5x faster download,
    about 11% of the uplink when both run at their caps: not to be left out)."""
    return downloaded * SEGMENT_HEADERS / (SEGMENTS_PER_ACK * SEGMENT_PAYLOAD)


BUDGET_WINDOW = 60.0  # seconds over which max_upload_share holds


class UploadBudget:
    """max_upload_share x max_upload_rate as an average over any `window` seconds: an upload
    of n bytes (our push, or the reply to a peer's) may start when the uplink's bytes of the
    last window plus n fit in share x rate x window, or when the last window was idle (an
    upload larger than the whole budget still goes, alone)."""

    def __init__(self, rate: float, share: float, *, window: float = BUDGET_WINDOW, now: float = 0.0) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError("rate must be positive and finite")
        self.limit = check_share(share) * rate * window  # bytes per window
        self.meter = RateMeter(window=window, resolution=1.0, now=now)

    def add(self, nbytes: float, now: float) -> None:
        self.meter.add(round(nbytes), now)

    def allows(self, nbytes: float, now: float) -> bool:
        used = self.meter.recent_bytes(now)
        return used == 0 or used + nbytes <= self.limit

    def used_share(self, now: float) -> float:
        """The last window's bytes as a share of the budget (1.0: all of it)."""
        return self.meter.recent_bytes(now) / self.limit


# -- the minimum rate of a transfer (issue 12: a slot cannot be held) ------------------------

ABSOLUTE_FLOOR = 16_000.0  # bytes per second: no honest transfer is slower (128 kbit/s)
FLOOR_WINDOW = 4.0  # seconds a transfer may go below its floor before it is cut
FLOOR_SHARE_OF_LIMIT = 0.25  # never demand more than this share of our own configured rate


def transfer_floor(wire_bytes: int, transfer_timeout: float, own_limit: float | None) -> float:
    """Bytes per second a transfer of `wire_bytes` must keep up: enough to finish within
    `transfer_timeout`, at least ABSOLUTE_FLOOR, and at most a quarter of our own cap on that
    direction (`own_limit`; None: unlimited), so that our own pacing, shared by a few
    transfers at once, never makes us cut an honest peer."""
    floor = max(ABSOLUTE_FLOOR, wire_bytes / transfer_timeout)
    return floor if own_limit is None else min(floor, FLOOR_SHARE_OF_LIMIT * own_limit)


class TransferFloor:
    """Whether a transfer keeps up its floor, as time credit: it starts with `window`
    seconds, every byte moved earns 1/floor s (never more than `window` in hand), and every
    second spent waiting on the peer (a read or write pending) spends one. Out of credit =
    below the floor for about `window` seconds: cut it. Waits that overlap (both directions
    of one exchange) are counted once; time in our own pacing or workers is never counted.
    """

    def __init__(self, floor: float, *, window: float = FLOOR_WINDOW, now: float = 0.0) -> None:
        if not (math.isfinite(floor) and floor > 0 and window > 0):
            raise ValueError("floor and window must be positive")
        self.floor = floor
        self.window = window
        self.moved = 0
        self.waited = 0.0
        self._credit = window
        self._waiting = 0
        self._since = now

    def begin_wait(self, now: float) -> None:
        self._settle(now)
        self._waiting += 1

    def end_wait(self, nbytes: int, now: float) -> None:
        self._settle(now)
        self._waiting = max(0, self._waiting - 1)
        self.moved += nbytes
        self._credit = min(self.window, self._credit + nbytes / self.floor)

    def deadline(self, now: float) -> float:
        """When the credit runs out if nothing more moves (inf while nobody waits)."""
        self._settle(now)
        return now + self._credit if self._waiting else math.inf

    def too_slow(self, now: float) -> bool:
        return self.deadline(now) <= now

    def describe(self) -> str:
        return (f"transfer below the minimum rate: {self.moved} bytes in {self.waited:.1f} s of waiting "
                f"on the peer (floor {self.floor:.0f} B/s over {self.window:.0f} s)")

    def _settle(self, now: float) -> None:
        if self._waiting and now > self._since:
            self._credit -= now - self._since
            self.waited += now - self._since
        self._since = max(self._since, now)
