"""The exchange's guard: admission, per-peer limits and bans (core/admission.py), and TLS.

Owner: the data-plane loop (net/dataplane.py), like the Exchange that consults it. The daemon
publishes the admitted peers (a core Roster: connected PeerIDs and their certificate pins)
through ``DataPlane.set_roster``; any thread may read ``statistics()`` (a frozen GateStats).

- Responder: ``admit(sender, cost=bytes)`` before any other rule (and charges the bytes);
  ``ban_reason(peer, reason)`` is the hook for anything that finds a peer at fault (a
  digest or value check that failed, a stalled or too slow transfer, a clipped difference).
- Initiator: ``client_ssl(peer, url)`` is what aiohttp's ``ssl=`` gets for a request to that
  peer: the certificate fingerprint from its signed record, pinned; a plaintext URL only when
  this node runs with ``exchange.tls = false`` (a trusted LAN).
- ``ExchangeGuard.open(verifier)``: no admission, no TLS (tests and benchmarks that build an Exchange
  by hand, without a peer table).
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable

import aiohttp

from peerfed.core.admission import STALLED, Ban, GateStats, Limits, PeerGate, Roster
from peerfed.core.envelope import Verifier
from peerfed.core.exchange_rules import Refusal

log = logging.getLogger("peerfed.exchange")


class PeerNotPinned(ConnectionRefusedError):
    """We will not send weights to this peer's exchange URL (no pin, or plaintext)."""


class ExchangeGuard:
    def __init__(self, verifier: Verifier, limits: Limits | None, *, server_ssl: ssl.SSLContext | None,
                 require_tls: bool, clock: Callable[[], float] = time.time,
                 on_ban: Callable[[Ban], None] | None = None) -> None:
        self.verifier = verifier  # signatures, network, replay, allowlist (core/envelope.py)
        self._gate = PeerGate(limits) if limits is not None else None  # None: admit everyone
        self.server_ssl = server_ssl
        self._require_tls = require_tls
        self._clock = clock
        self._on_ban = on_ban
        # One Fingerprint object per pin: aiohttp pools connections by their ssl= value, which
        # compares by identity, so a new object per request would open a new TLS connection each time.
        self._fingerprints: dict[str, aiohttp.Fingerprint] = {}

    @classmethod
    def open(cls, verifier: Verifier) -> ExchangeGuard:
        return cls(verifier, None, server_ssl=None, require_tls=False)

    def set_roster(self, roster: Roster) -> None:
        if self._gate is not None:
            self._gate.set_roster(roster)
            self._gate.expire(self._clock())  # published often: ended bans leave the snapshot here

    def admit(self, sender: str, *, cost: int, unless: Refusal | None = None) -> Refusal | None:
        """None if ``sender`` (a verified signer) may push or download now, else the refusal:
        ours first (not a peer, banned, over its limits), then ``unless`` (the exchange rules'
        answer, e.g. busy). Only a request that goes ahead counts against the sender's limits,
        with ``cost``, the payload bytes it moves (both directions)."""
        if self._gate is None:
            return unless
        now = self._clock()
        refusal = self._gate.check(sender, now) or unless
        if refusal is None:
            self._gate.record(sender, cost, now)
        return refusal

    def ban_reason(self, peer_id: str, reason: str) -> None:
        """``peer_id`` was at fault for ``reason``; bans it at once or after a few strikes."""
        if self._gate is None or not peer_id:
            return
        ban = self._gate.offence(peer_id, reason, self._clock())
        if ban is not None:
            log.warning("banning %s for %.0f s: %s", peer_id, ban.until - ban.since, reason)
            if self._on_ban is not None:
                self._on_ban(ban)

    def transfer_failed(self, peer_id: str, exc: BaseException) -> None:
        """An exchange with ``peer_id`` broke off: a timeout (it stalled) is a strike."""
        if isinstance(exc, TimeoutError):
            self.ban_reason(peer_id, STALLED)

    def client_ssl(self, peer_id: str, url: str) -> aiohttp.Fingerprint | bool:
        """aiohttp's ``ssl=`` for a request to ``peer_id`` at ``url``; PeerNotPinned if none is safe."""
        if url.startswith("https://"):
            pin = self._pin_of(peer_id)
            if not pin:
                raise PeerNotPinned(f"{peer_id}'s peer record carries no TLS certificate fingerprint "
                                    "(an older peerfed?): its certificate cannot be checked")
            if pin not in self._fingerprints:
                if len(self._fingerprints) >= 4096:
                    self._fingerprints.clear()
                self._fingerprints[pin] = aiohttp.Fingerprint(bytes.fromhex(pin))
            return self._fingerprints[pin]
        if self._require_tls:
            raise PeerNotPinned(f"{peer_id} serves its exchange without TLS ({url}); this node requires "
                                "TLS (exchange.tls = true on both ends)")
        return True  # plaintext (http://): ssl= is not used

    def _pin_of(self, peer_id: str) -> str:
        return "" if self._gate is None else self._gate.roster.pins.get(peer_id, "")

    def statistics(self) -> GateStats:
        """The gate's published snapshot (any thread; a ban whose ``until`` passed is over)."""
        return GateStats() if self._gate is None else self._gate.statistics()
