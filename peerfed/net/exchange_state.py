"""What an Exchange keeps between requests: its buffers and occupancy, and its counters.

Owner: the data-plane loop (net/dataplane.py). Only the Exchange on that loop changes an
``Occupancy``; after every change it publishes a new ``ExchangeStats``, a frozen value that
any thread may read (the daemon's /status, the gossip loop's "are we busy" question).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from peerfed.core.exchange_rules import Outcome, Room
from peerfed.net.transfer import Slot

Role = Literal["initiator", "responder"]


@dataclass(frozen=True, slots=True)
class LastExchange:
    peer_id: str
    role: Role
    outcome: Outcome
    duration_s: float
    at: float  # unix time it ended


@dataclass(frozen=True, slots=True)
class ExchangeStats:
    """One node's exchanges so far, and what runs now. ``rejected`` is a copy made for this
    snapshot (reason -> count); no one changes it after."""

    ok: int = 0
    busy: int = 0
    refused: int = 0
    failed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rejected: Mapping[str, int] = field(default_factory=dict)
    incoming_now: int = 0
    outgoing_now: int = 0
    last: LastExchange | None = None

    @property
    def busy_now(self) -> bool:
        """An exchange runs now, in either role."""
        return self.outgoing_now > 0 or self.incoming_now > 0

    def finished(self, last: LastExchange, sent: int, received: int) -> ExchangeStats:
        """These stats with one more exchange ended (counted under its outcome)."""
        outcome = last.outcome.value
        return replace(self, **{outcome: getattr(self, outcome) + 1}, last=last,  # type: ignore[arg-type]
                       bytes_sent=self.bytes_sent + sent, bytes_received=self.bytes_received + received)

    def moved(self, sent: int = 0, received: int = 0) -> ExchangeStats:
        """These stats with payload bytes moved outside an exchange (state sync)."""
        return replace(self, bytes_sent=self.bytes_sent + sent, bytes_received=self.bytes_received + received)

    def with_rejection(self, reason: str) -> ExchangeStats:
        return replace(self, rejected={**self.rejected, reason: self.rejected.get(reason, 0) + 1})

    def occupied(self, occupancy: Occupancy) -> ExchangeStats:
        return replace(self, incoming_now=occupancy.incoming, outgoing_now=int(occupancy.outgoing))


@dataclass
class Occupancy:
    """The exchange buffers not in use, who uses the others, and whether we take exchanges.

    One free slot is always kept for our own exchange: what others ask of us (pushes, model
    downloads) never takes the last one, so however long a peer holds a slot, our own
    exchanges never wait for it (issue 12). Slots are reused last-in first-out and allocated
    on first use: a node whose exchanges do not overlap holds one slot's memory."""

    free_slots: list[Slot]
    max_incoming: int
    incoming: int = 0
    outgoing: bool = False
    accepting: bool = True
    # Until state sync is done (or skipped) our weights are a random init: averaging them
    # into a trained peer, or handing them to a newcomer, would set the swarm back.
    weights_ready: bool = False

    @classmethod
    def for_model(cls, nbytes: int, max_incoming: int) -> Occupancy:
        """Buffers for max_incoming incoming exchanges, a model download, and our own exchange."""
        return cls([Slot(nbytes // 4) for _ in range(max_incoming + 2)], max_incoming)

    def take(self, *, incoming: bool = False, outgoing: bool = False) -> Slot:
        """A free slot for an exchange we answer (incoming), start (outgoing), or a model we send."""
        slot = self.free_slots.pop()
        self.incoming += int(incoming)
        self.outgoing = self.outgoing or outgoing
        return slot

    def give_back(self, slot: Slot, *, incoming: bool = False, outgoing: bool = False) -> None:
        self.free_slots.append(slot)
        self.incoming -= int(incoming)
        self.outgoing = self.outgoing and not outgoing

    def room(self) -> Room:
        """The plain values the exchange rules decide on (core/exchange_rules.py)."""
        kept_for_ours = 0 if self.outgoing else 1
        return Room(accepting=self.accepting, weights_ready=self.weights_ready, incoming=self.incoming,
                    max_incoming=self.max_incoming, outgoing=self.outgoing,
                    free_slots=max(0, len(self.free_slots) - kept_for_ours))
