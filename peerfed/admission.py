"""Wiring of the exchange's guard for a node that trains: who is admitted, limits, TLS.

Composition-level helpers for training.py (it builds the Exchange): ``open_guard`` makes the
ExchangeGuard from the config (TLS certificate from the state folder, per-peer limits, bans
counted in /metrics), ``roster_of`` turns the peer table's connected peers into the Roster the
data plane admits (with the certificate pin from each one's signed record), and
``why_not_exchange`` says why the gossip loop must skip a peer (banned; plaintext or unpinned
URL). Runs on the daemon's main loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from peerfed.config import Config
from peerfed.core.admission import Ban, GateStats, Limits, Roster
from peerfed.core.envelope import Verifier, decode
from peerfed.core.records import PeerRecord
from peerfed.net.guard import ExchangeGuard
from peerfed.net.membership import Membership
from peerfed.net.tls import load_or_make_server_tls

log = logging.getLogger("peerfed.training")

MIN_PEER_EXCHANGES_PER_MINUTE = 60  # the derived default never goes below one a second
PLAINTEXT_WARNING = ("exchange.tls = false: model weights travel unencrypted and anyone on the path can read "
                     "or change the connection; use it only on a trusted LAN, on every node of the swarm")


@dataclass(frozen=True)
class GuardSetup:
    guard: ExchangeGuard
    tls_fingerprint: str  # "" without TLS
    scheme: str           # of our exchange URL: https, or http on a trusted LAN


def peer_limits(config: Config) -> Limits:
    """Per-peer limits from the config; exchanges a minute default to twice our own rate."""
    limits = config.admission
    per_minute = limits.peer_exchanges_per_minute or max(MIN_PEER_EXCHANGES_PER_MINUTE,
                                                         math.ceil(2 * 60 / config.exchange.interval))
    return Limits(exchanges_per_minute=per_minute, bytes_per_hour=int(limits.peer_mib_per_hour * 2**20),
                  ban_seconds=limits.ban_duration)


def open_guard(config: Config, *, peer_id: str, verifier: Verifier, on_ban: Callable[[Ban], None]) -> GuardSetup:
    """The guard of this node's exchange; warns once if it runs without TLS."""
    limits = peer_limits(config)
    if not config.exchange.tls:
        log.warning(PLAINTEXT_WARNING)
        return GuardSetup(ExchangeGuard(verifier, limits, server_ssl=None, require_tls=False, on_ban=on_ban),
                          "", "http")
    tls = load_or_make_server_tls(config.state_dir / "tls", peer_id)
    guard = ExchangeGuard(verifier, limits, server_ssl=tls.context, require_tls=True, on_ban=on_ban)
    if config.exchange.advertise_url.startswith("http://"):
        log.warning("exchange.advertise_url %s is http:// but exchange.tls is on: peers will not reach us; "
                    "use https://", config.exchange.advertise_url)
    return GuardSetup(guard, tls.fingerprint, "https")


def tls_pin_of(record: bytes) -> str:
    """The certificate fingerprint a stored (already verified) peer record carries, or ""."""
    if not record:
        return ""
    try:
        body = decode(record, max_size=len(record)).body
    except Exception:  # noqa: BLE001 - a record we stored verified: this is only defensive
        return ""
    return body.tls_fingerprint if isinstance(body, PeerRecord) else ""


class RosterPublisher:
    """Builds the Roster from the peer table and hands it to the data plane when it changed
    (or when asked to anyway: the periodic publish also drops ended bans there)."""

    def __init__(self, publish: Callable[[Roster], None]) -> None:
        self._publish = publish
        self._last = Roster()
        self._pins: dict[bytes, str] = {}  # record -> its pin (decoded once per record)

    def update(self, membership: Membership, *, force: bool = False) -> Roster:
        """The peers to admit now: connected (libp2p proved their PeerID; a verified record) -> pin."""
        table = membership.table
        pins = {}
        for peer_id in membership.connected_peers():
            info = table.get(peer_id)
            record = info.record.envelope if info is not None else b""
            if record not in self._pins:
                if len(self._pins) > 4 * table.max_peers:
                    self._pins.clear()
                self._pins[record] = tls_pin_of(record)
            pins[peer_id] = self._pins[record]
        if force or pins != dict(self._last.pins):
            self._last = Roster.of(pins)
            self._publish(self._last)
        return self._last


def why_not_exchange(peer_id: str, url: str, *, pin: str, gate: GateStats, require_tls: bool,
                     now: float) -> str | None:
    """Why we must not exchange with this candidate now, or None."""
    ban = gate.banned(peer_id, now)
    if ban is not None:
        return f"banned for {ban.reason} for {ban.until - now:.0f} s more"
    if url.startswith("https://") and not pin:
        return "its peer record carries no TLS certificate fingerprint (an older peerfed?)"
    if url.startswith("http://") and require_tls:
        return "it serves its exchange without TLS (exchange.tls = false there; both ends must agree)"
    return None
