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

    Our own exchange has a slot of its own (``own_slot``): what others ask of us (pushes,
    model downloads) only ever takes ``free_slots``, so however long a peer holds those, our
    own exchanges never wait for it (issue 12)."""

    free_slots: list[Slot]
    max_incoming: int
    own_slot: Slot | None = None  # None while our own exchange runs
    incoming: int = 0
    outgoing: bool = False
    accepting: bool = True
    # Until state sync is done (or skipped) our weights are a random init: averaging them
    # into a trained peer, or handing them to a newcomer, would set the swarm back.
    weights_ready: bool = False

    @classmethod
    def for_model(cls, nbytes: int, max_incoming: int) -> Occupancy:
        """Buffers for max_incoming incoming exchanges and a model download, and our own
        exchange's (each allocated on first use)."""
        return cls([Slot(nbytes // 4) for _ in range(max_incoming + 1)], max_incoming, Slot(nbytes // 4))

    def take(self, *, incoming: bool = False, outgoing: bool = False) -> Slot:
        """A free slot for an exchange we answer (incoming), start (outgoing), or a model we send."""
        if outgoing:
            assert self.own_slot is not None, "one outgoing exchange at a time"
            slot, self.own_slot, self.outgoing = self.own_slot, None, True
            return slot
        slot = self.free_slots.pop()
        self.incoming += int(incoming)
        return slot

    def give_back(self, slot: Slot, *, incoming: bool = False, outgoing: bool = False) -> None:
        if outgoing:
            self.own_slot, self.outgoing = slot, False
            return
        self.free_slots.append(slot)
        self.incoming -= int(incoming)

    def room(self) -> Room:
        """The plain values the exchange rules decide on (core/exchange_rules.py)."""
        return Room(accepting=self.accepting, weights_ready=self.weights_ready, incoming=self.incoming,
                    max_incoming=self.max_incoming, outgoing=self.outgoing, free_slots=len(self.free_slots))
