"""Two small parts of membership (net/membership.py): who we are with our own signed record,
and the count of what we refused.

Owner: the Membership that holds them (the daemon's main loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerfed.core.envelope import PeerList, PeerRecord, seal
from peerfed.core.peerid import Signer
from peerfed.net.reachability import ReachabilityService


@dataclass
class Us:
    """Who we are, and our own signed record (signed again when stale or changed)."""

    signer: Signer
    network: str
    fields: dict[str, Any] = field(default_factory=lambda: {"exchange_url": "", "fingerprint": ""})
    record: bytes = b""   # b"": sign again before sending it
    record_time: float = 0.0
    reachability: ReachabilityService | None = None  # what the record says of our addresses

    def seal(self, body: PeerRecord | PeerList, now: float, recipient: str = "") -> bytes:
        return seal(self.signer, network=self.network, recipient=recipient, body=body, now=now)



class Rejections:
    """Peer lists and records we refused, by reason (also told to the metrics)."""

    def __init__(self, on_rejected: Callable[[str], None] | None) -> None:
        self.by_reason: dict[str, int] = {}
        self._on_rejected = on_rejected

    def count(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self._on_rejected is not None:
            self._on_rejected(reason)
