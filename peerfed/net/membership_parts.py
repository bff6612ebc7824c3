"""Small parts of membership (net/membership.py): who we are with our own signed record, our
connections, and the count of what we refused.

Owner: the Membership that holds them (the daemon's main loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerfed.core.envelope import PeerList, PeerRecord, seal
from peerfed.core.gossip_pace import GossipPace
from peerfed.core.peerid import Signer
from peerfed.core.view import PartialView
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


@dataclass
class Links:
    """Our libp2p connections as membership sees them, the view that decides them, and the
    pace of peer-list swaps over them."""

    view: PartialView
    pace: GossipPace
    live: set[str] = field(default_factory=set)  # PeerIDs with an open libp2p connection
    # live connections whose peer has not shown a verified record yet: since when
    unverified_since: dict[str, float] = field(default_factory=dict)
    dialing: set[str] = field(default_factory=set)
    since: dict[str, float] = field(default_factory=dict)  # when each live connection came up


class Rejections:
    """Peer lists and records we refused, by reason (also told to the metrics)."""

    def __init__(self, on_rejected: Callable[[str], None] | None) -> None:
        self.by_reason: dict[str, int] = {}
        self._on_rejected = on_rejected

    def count(self, reason: str) -> None:
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        if self._on_rejected is not None:
            self._on_rejected(reason)
