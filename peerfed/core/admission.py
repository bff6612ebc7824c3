"""Who may push to this node or download its model, how often, and who is banned for a while.

Bytes in, decisions out (like core/exchange_rules.py): no I/O, no clock; time is passed in.

- **Admission.** Only peers in the ``Roster`` may push or download: the PeerIDs that are
  connected in this node's peer table over libp2p, where the Noise handshake proved that the
  remote holds that PeerID's key (net/membership.py). A valid signature alone is not enough:
  anyone can make a key, but only a peer we are connected to is in the roster. The control
  plane publishes a new Roster (an immutable value) whenever that set changes; the roster also
  carries each peer's TLS certificate fingerprint from its signed peer record (net/tls.py pins it).
- **Per-peer limits.** Exchanges (pushes and model downloads) per minute and payload bytes per
  hour, each in a sliding window, so no one peer takes every slot or all of our uplink.
- **Bans with expiry.** ``offence(peer, reason)`` is the hook for whoever finds a peer at fault:
  a payload that fails its digest or the value check bans at once (``BAN_AT_ONCE``); softer
  faults (a stalled transfer, a difference that keeps getting clipped) are strikes, and
  ``strikes_to_ban`` of them within one ban period ban. A ban lasts ``ban_seconds``, then the
  peer is admitted again like any other.

Owner: the data-plane loop's Exchange (net/exchange.py) holds its PeerGate; other threads read
the frozen ``GateStats`` it publishes and publish Rosters through the DataPlane.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from peerfed.core.exchange_rules import Refusal

MINUTE = 60.0
HOUR = 3600.0
# Faults no honest peer makes: its own signed digest does not match what it sent, or what it
# sent is not a model (NaN, absurd norms). One is enough to ban.
BAN_AT_ONCE = frozenset({"digest_mismatch", "length_mismatch", "bad_values", "malformed_trailer"})
# The reasons others report, as this module names them (a stable vocabulary for /metrics).
STALLED = "stalled"
CLIPPED = "clipped"
MAX_TRACKED = 4096  # peers with windows kept; more (a flood of keys) drops the oldest windows


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-peer limits; 0 means no limit."""

    exchanges_per_minute: int = 0
    bytes_per_hour: int = 0
    ban_seconds: float = 600.0
    strikes_to_ban: int = 3


@dataclass(frozen=True, slots=True)
class Roster:
    """The peers admitted now: PeerID -> the TLS certificate fingerprint (hex SHA-256) its
    signed peer record carries ("" when its record has none)."""

    pins: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def of(cls, pins: Mapping[str, str]) -> Roster:
        return cls(MappingProxyType(dict(pins)))

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self.pins

    def __len__(self) -> int:
        return len(self.pins)


@dataclass(frozen=True, slots=True)
class Ban:
    peer_id: str
    reason: str
    since: float   # unix time
    until: float   # unix time it ends

    def as_json(self) -> dict[str, object]:
        return {"peer_id": self.peer_id, "reason": self.reason, "since": self.since, "until": self.until}


@dataclass(frozen=True, slots=True)
class GateStats:
    """What the gate decided so far; the mappings are copies made for this snapshot."""

    admitted: int = 0
    bans: tuple[Ban, ...] = ()               # in force when published (check ``until``)
    bans_total: Mapping[str, int] = field(default_factory=dict)   # by reason
    offences: Mapping[str, int] = field(default_factory=dict)     # by reason, bans or not

    def banned(self, peer_id: str, now: float) -> Ban | None:
        return next((b for b in self.bans if b.peer_id == peer_id and b.until > now), None)


def not_a_peer(peer_id: str) -> Refusal:
    return Refusal(401, "not_a_peer", f"{peer_id} is not a connected peer of this node (connect over libp2p first)")


class PeerGate:
    """Admission, per-peer windows and bans for one node (see the module docstring)."""

    def __init__(self, limits: Limits) -> None:
        if limits.ban_seconds <= 0 or limits.strikes_to_ban < 1:
            raise ValueError("ban_seconds must be > 0 and strikes_to_ban >= 1")
        self.limits = limits
        self.roster = Roster()
        self._starts: dict[str, deque[float]] = {}             # exchange start times, last minute
        self._bytes: dict[str, deque[tuple[float, int]]] = {}  # (time, bytes), last hour
        self._strikes: dict[str, deque[float]] = {}
        self._bans: dict[str, Ban] = {}
        self._stats = GateStats()

    def set_roster(self, roster: Roster) -> None:
        self.roster = roster
        self._stats = replace(self._stats, admitted=len(roster))

    def admit(self, peer_id: str, now: float, nbytes: int = 0) -> Refusal | None:
        """check, then record if admitted."""
        refusal = self.check(peer_id, now)
        if refusal is None:
            self.record(peer_id, nbytes, now)
        return refusal

    def check(self, peer_id: str, now: float) -> Refusal | None:
        """May ``peer_id`` (a verified sender) start an exchange or a download now? (Nothing
        is counted: ``record`` counts one that goes ahead.)"""
        ban = self._ban_of(peer_id, now)
        if ban is not None:
            return Refusal(403, "banned", f"banned for {ban.reason} until {ban.until:.0f} (unix time)")
        if peer_id not in self.roster:
            return not_a_peer(peer_id)
        limits = self.limits
        starts = _window(self._starts, peer_id, now - MINUTE)
        if limits.exchanges_per_minute and len(starts) >= limits.exchanges_per_minute:
            return Refusal(429, "peer_rate_limit", f"more than {limits.exchanges_per_minute} exchanges a minute")
        moved = _window(self._bytes, peer_id, now - HOUR)
        if limits.bytes_per_hour and sum(n for _, n in moved) >= limits.bytes_per_hour:
            return Refusal(429, "peer_byte_limit", f"more than {limits.bytes_per_hour} bytes an hour")
        return None

    def record(self, peer_id: str, nbytes: int, now: float) -> None:
        """An exchange or download by ``peer_id`` goes ahead: one start, ``nbytes`` payload bytes."""
        _window(self._starts, peer_id, now - MINUTE).append(now)
        self.charge(peer_id, nbytes, now)
        self._forget_oldest()

    def charge(self, peer_id: str, nbytes: int, now: float) -> None:
        """Payload bytes moved with ``peer_id`` (both directions), against its hourly limit."""
        if nbytes > 0 and self.limits.bytes_per_hour:
            _window(self._bytes, peer_id, now - HOUR).append((now, nbytes))

    def offence(self, peer_id: str, reason: str, now: float) -> Ban | None:
        """``peer_id`` was at fault for ``reason``; the ban this starts, if any."""
        stats = self._stats
        self._stats = replace(stats, offences=_bump(stats.offences, reason))
        if self._ban_of(peer_id, now) is not None:
            return None
        strikes = _window(self._strikes, peer_id, now - self.limits.ban_seconds)
        strikes.append(now)
        if reason not in BAN_AT_ONCE and len(strikes) < self.limits.strikes_to_ban:
            return None
        ban = Ban(peer_id, reason, since=now, until=now + self.limits.ban_seconds)
        self._bans[peer_id] = ban
        strikes.clear()
        self._publish_bans(now, bans_total=_bump(self._stats.bans_total, reason))
        return ban

    def statistics(self) -> GateStats:
        """The latest published snapshot (any thread may read it)."""
        return self._stats

    def _ban_of(self, peer_id: str, now: float) -> Ban | None:
        ban = self._bans.get(peer_id)
        if ban is not None and ban.until <= now:  # expired: forget it
            del self._bans[peer_id]
            self._publish_bans(now)
            return None
        return ban

    def expire(self, now: float) -> None:
        """Drop ended bans from the published snapshot (also happens on the next request)."""
        if any(b.until <= now for b in self._bans.values()):
            self._bans = {p: b for p, b in self._bans.items() if b.until > now}
            self._publish_bans(now)

    def _publish_bans(self, now: float, bans_total: Mapping[str, int] | None = None) -> None:
        bans = tuple(sorted((b for b in self._bans.values() if b.until > now), key=lambda b: b.peer_id))
        self._stats = replace(self._stats, bans=bans, bans_total=bans_total or self._stats.bans_total)

    def _forget_oldest(self) -> None:
        for windows in (self._starts, self._bytes, self._strikes):
            while len(windows) > MAX_TRACKED:
                del windows[next(iter(windows))]


def _window(windows: dict[str, deque], peer_id: str, horizon: float) -> deque:  # type: ignore[type-arg]
    """``peer_id``'s entries (times, or (time, n) pairs) after ``horizon``, older ones dropped."""
    entries = windows.setdefault(peer_id, deque())
    while entries and (entries[0][0] if isinstance(entries[0], tuple) else entries[0]) <= horizon:
        entries.popleft()
    return entries


def _bump(counts: Mapping[str, int], key: str) -> dict[str, int]:
    return {**counts, key: counts.get(key, 0) + 1}

