"""One peer as the peer table knows it (PeerInfo), and its saved form in peers.json.

Pure data, no I/O: core/peers.py decides what happens to peers, this module only says what
a peer is and how one is written down and read back.
"""

from __future__ import annotations

import base64
import binascii
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# A signed record is at most 16 KiB anyway; this keeps one peer from filling the dial queue.
MAX_ADDRS = 16


class PeerState(str, enum.Enum):
    KNOWN = "known"  # not connected; no failure since the last success
    CONNECTED = "connected"
    FAILED = "failed"  # the last dial or ping failed


@dataclass(frozen=True)
class SignedRecord:
    """A peer's signed peer_record envelope, relayed as is, and its timestamp (only a strictly
    newer one replaces it)."""

    envelope: bytes = b""
    time: float = 0.0


NO_RECORD = SignedRecord()


@dataclass
class PeerInfo:
    peer_id: str
    addrs: tuple[str, ...] = ()
    exchange_url: str = ""
    fingerprint: str = ""
    state: PeerState = PeerState.KNOWN
    last_seen: float | None = None  # last time it was connected or answered a ping
    rtt_ms: float | None = None
    failures: int = 0  # consecutive failures since the last success
    next_attempt: float = 0.0  # earliest time to dial it again
    record: SignedRecord = NO_RECORD
    first_seen: float = 0.0  # when it entered the table (eviction clock for never-seen peers)
    # A bootstrap peer from the config (never evicted or replaced) has its config addresses
    # here, kept across records; None: not pinned.
    pinned_addrs: tuple[str, ...] | None = None

    @property
    def pinned(self) -> bool:
        return self.pinned_addrs is not None


def merge_addrs(*groups: Iterable[str]) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for group in groups:
        for addr in group:
            out.setdefault(addr, None)
    return tuple(out)[:MAX_ADDRS]


def to_entry(p: PeerInfo) -> dict[str, Any]:
    """The saved form of one peer (JSON-able). Connection state and pins are not saved."""
    return {
        "peer_id": p.peer_id,
        "addrs": list(p.addrs),
        "exchange_url": p.exchange_url,
        "fingerprint": p.fingerprint,
        "last_seen": p.last_seen,
        "rtt_ms": p.rtt_ms,
        "failures": p.failures,
        "next_attempt": p.next_attempt,
        "record": base64.b64encode(p.record.envelope).decode("ascii"),
        "record_time": p.record.time,
        "first_seen": p.first_seen,
    }


class _Invalid(ValueError):
    pass


def _number(value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Invalid(value)
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(value)
    return value


def from_entry(entry: Any) -> PeerInfo | None:
    """One saved peer, or None if anything in it is the wrong type. Missing optional fields
    take defaults so a hand-edited or older file still loads."""
    try:
        if not isinstance(entry, dict):
            raise _Invalid(entry)
        peer_id = _text(entry.get("peer_id"))
        addrs = entry.get("addrs", [])
        if not peer_id or not isinstance(addrs, list):
            raise _Invalid(entry)
        failures = entry.get("failures", 0)
        if type(failures) is not int or failures < 0:
            raise _Invalid(failures)
        rtt_ms = _number(entry.get("rtt_ms"), optional=True)
        if rtt_ms is not None and rtt_ms < 0:
            raise _Invalid(rtt_ms)
        record = base64.b64decode(_text(entry.get("record", "")), validate=True)
        return PeerInfo(
            peer_id=peer_id,
            addrs=merge_addrs(_text(a) for a in addrs),
            exchange_url=_text(entry.get("exchange_url", "")),
            fingerprint=_text(entry.get("fingerprint", "")),
            state=PeerState.KNOWN,
            last_seen=_number(entry.get("last_seen"), optional=True),
            rtt_ms=rtt_ms,
            failures=failures,
            next_attempt=_number(entry.get("next_attempt", 0.0)) or 0.0,
            record=SignedRecord(record, _number(entry.get("record_time", 0.0)) or 0.0),
            first_seen=_number(entry.get("first_seen", 0.0)) or 0.0,
        )
    except (_Invalid, binascii.Error, ValueError):
        return None
