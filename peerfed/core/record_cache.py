"""Signed peer records already verified, by their bytes (no I/O; membership owns one)."""

from __future__ import annotations


class VerifiedRecords:
    """Peer records whose signature we checked: every peer list repeats most of what we hold,
    and checking each record again was most of an idle node's CPU. Bounded: cleared when full."""

    def __init__(self, *, max_age: float, limit: int) -> None:
        self._max_age, self._limit = max_age, limit
        self._by_bytes: dict[bytes, tuple[str, float]] = {}  # record -> (subject, its timestamp)

    def subject(self, raw: bytes, now: float) -> str | None:
        """Whose record ``raw`` is, if we verified it before and it is still young enough."""
        got = self._by_bytes.get(raw)
        return got[0] if got is not None and now - got[1] <= self._max_age else None

    def clear(self) -> None:  # the allowlist changed: check every record again
        self._by_bytes.clear()

    def add(self, raw: bytes, subject: str, timestamp: float) -> None:
        if len(self._by_bytes) >= self._limit:
            self._by_bytes.clear()
        self._by_bytes[raw] = (subject, timestamp)
