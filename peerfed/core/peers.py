"""Peer table: whom we know, who is live, when to dial whom again, whom to forget.

Pure bookkeeping in the style of h11: no I/O and no clock. Time (`now`, unix seconds) and
randomness (a `random.Random`) are passed in, so the same inputs give the same decisions, in
tests and in a daemon that runs for months.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterable
from typing import Any

from peerfed.core.peerinfo import (
    PeerInfo,
    PeerState,
    SignedRecord,
    from_entry,
    merge_addrs,
    to_entry,
)

FORMAT_VERSION = 1
# Records stamped further ahead than this are ignored: stored, they would block that peer's
# real updates (no rollback) until our clock caught up.
RECORD_FUTURE_TOLERANCE = 300.0


def jittered_backoff(failures: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Delay after `failures` consecutive failures: base * 2**(failures-1), capped at `cap`,
    times a random factor in [0.5, 1.0] so that peers which failed together retry apart."""
    if failures <= 0:
        return 0.0
    raw = base * 2.0 ** min(failures - 1, 64)  # exponent clamped: no float overflow
    return rng.uniform(0.5, 1.0) * min(raw, cap)


def _keep_score(p: PeerInfo) -> tuple[bool, float, float, str]:
    """Lower = first to go: failed ones, then the least recently seen (never seen first)."""
    seen = p.last_seen if p.last_seen is not None else -math.inf
    return (p.failures == 0, seen, p.first_seen, p.peer_id)


class PeerTable:
    def __init__(
        self,
        own_peer_id: str,
        *,
        max_peers: int = 64,
        base_backoff: float = 1.0,
        max_backoff: float = 300.0,
        evict_after: float = 3600.0,
        unreached_limit: int = 8,
        rng: random.Random | None = None,
    ) -> None:
        if max_peers < 1:
            raise ValueError("max_peers must be at least 1")
        if not 0 < base_backoff <= max_backoff:
            raise ValueError("need 0 < base_backoff <= max_backoff")
        if evict_after <= 0 or unreached_limit < 1:
            raise ValueError("evict_after must be > 0 and unreached_limit >= 1")
        self.own_peer_id = own_peer_id
        self.max_peers = max_peers
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.evict_after = evict_after
        self.unreached_limit = unreached_limit
        self._rng = rng if rng is not None else random.Random()
        self._peers: dict[str, PeerInfo] = {}
        self._counters = {
            "dropped_full": 0,
            "replaced": 0,
            "evicted": 0,
            "skipped_on_load": 0,
            "ignored_future": 0,
        }

    # -- learning about peers -------------------------------------------------------------

    def add_record(
        self,
        peer_id: str,
        *,
        addrs: Iterable[str],
        exchange_url: str,
        fingerprint: str,
        record: bytes,
        record_time: float,
        now: float,
        may_replace: bool = False,
    ) -> bool:
        """Store a verified peer record. Only a strictly newer record replaces the stored one
        (so relaying old records cannot roll a peer back); liveness fields are kept.
        ``may_replace``: a new peer may take the place of the least recently seen one that is
        neither connected nor pinned when the table is full (membership allows a few per peer
        list, so the passive view keeps changing in a swarm larger than it without a flood of
        records ever replacing it). Returns True if the table changed."""
        if peer_id == self.own_peer_id:
            return False
        if not math.isfinite(record_time) or record_time > now + RECORD_FUTURE_TOLERANCE:
            self._counters["ignored_future"] += 1
            return False
        info = self._peers.get(peer_id)
        if info is None:
            info = self._admit(peer_id, now, strong=may_replace)
            if info is None:
                return False
        elif info.record.envelope and record_time <= info.record.time:
            return False
        self._set_addrs(info, merge_addrs(addrs, info.pinned_addrs or ()), now)
        info.exchange_url = exchange_url
        info.fingerprint = fingerprint
        info.record = SignedRecord(bytes(record), record_time)
        return True

    def add_address(
        self, peer_id: str, addrs: Iterable[str], now: float, *, pinned: bool = False
    ) -> None:
        """Learn addresses without a record (bootstrap list, identify). `pinned` marks a
        bootstrap peer from the config: never evicted nor replaced, addresses kept."""
        if peer_id == self.own_peer_id:
            return
        addrs = tuple(addrs)
        info = self._peers.get(peer_id) or self._admit(peer_id, now, strong=pinned)
        if info is None:
            return
        if pinned:
            info.pinned_addrs = merge_addrs(info.pinned_addrs or (), addrs)
        self._set_addrs(info, merge_addrs(info.addrs, addrs), now)

    def unpin(self, peer_id: str) -> None:
        """The peer left the bootstrap list (config reload): it ages like any other."""
        info = self._peers.get(peer_id)
        if info is not None:
            info.pinned_addrs = None

    def remove(self, peer_id: str) -> bool:
        return self._peers.pop(peer_id, None) is not None

    # -- liveness -------------------------------------------------------------------------

    def mark_connected(self, peer_id: str, now: float) -> bool:
        """A connection is up (either direction). Unknown peers are added. Returns False only
        if the table is full of connected/pinned peers and it could not be tracked."""
        if peer_id == self.own_peer_id:
            return False
        info = self._peers.get(peer_id) or self._admit(peer_id, now, strong=True)
        if info is None:
            return False
        info.state = PeerState.CONNECTED
        info.last_seen = now
        info.failures = 0
        info.next_attempt = now
        return True

    def mark_disconnected(self, peer_id: str, now: float) -> None:
        info = self._peers.get(peer_id)
        if info is None or info.state is not PeerState.CONNECTED:
            return
        info.state = PeerState.KNOWN
        info.last_seen = now
        # Not at once: a peer that keeps closing on us would otherwise be redialled in a loop.
        info.next_attempt = now + jittered_backoff(
            1, base=self.base_backoff, cap=self.max_backoff, rng=self._rng
        )

    def record_ping(self, peer_id: str, rtt_ms: float, now: float) -> None:
        """A ping answered: the peer is connected and live."""
        if not self.mark_connected(peer_id, now):
            return
        if math.isfinite(rtt_ms) and rtt_ms >= 0:
            self._peers[peer_id].rtt_ms = float(rtt_ms)

    def record_failure(self, peer_id: str, now: float) -> float:
        """A dial or ping failed: back off. Returns the time of the next attempt
        (math.inf for a peer not in the table)."""
        info = self._peers.get(peer_id)
        if info is None:
            return math.inf
        info.failures += 1
        info.state = PeerState.FAILED
        info.next_attempt = now + jittered_backoff(
            info.failures, base=self.base_backoff, cap=self.max_backoff, rng=self._rng
        )
        return info.next_attempt

    def due_for_dial(self, now: float) -> list[str]:
        """Peers to dial now: not connected, with an address, backoff over. Most promising
        first: fewest failures, bootstrap peers, most recently seen, longest waiting."""
        due = [
            p
            for p in self._peers.values()
            if p.state is not PeerState.CONNECTED and p.addrs and p.next_attempt <= now
        ]
        due.sort(
            key=lambda p: (
                p.failures,
                not p.pinned,
                -(p.last_seen if p.last_seen is not None else -math.inf),
                p.next_attempt,
                p.peer_id,
            )
        )
        return [p.peer_id for p in due]

    def evict_stale(self, now: float) -> list[str]:
        """Forget peers that keep failing: failed and unseen for `evict_after` seconds, or never
        reached after `unreached_limit` failures. Connected and pinned peers always stay."""
        gone = []
        for p in self._peers.values():
            if p.state is PeerState.CONNECTED or p.pinned or p.failures == 0:
                continue
            seen = p.last_seen if p.last_seen is not None else p.first_seen
            never_reached = p.last_seen is None and p.failures >= self.unreached_limit
            if now - seen >= self.evict_after or never_reached:
                gone.append(p.peer_id)
        for peer_id in gone:
            del self._peers[peer_id]
        self._counters["evicted"] += len(gone)
        return sorted(gone)

    # -- reading --------------------------------------------------------------------------

    def connected(self) -> list[str]:
        return sorted(k for k, p in self._peers.items() if p.state is PeerState.CONNECTED)

    def exchange_candidates(self, fingerprint: str) -> list[str]:
        """Connected peers with this model fingerprint and an exchange URL (for the scheduler)."""
        return sorted(
            k
            for k, p in self._peers.items()
            if p.state is PeerState.CONNECTED and p.exchange_url and p.fingerprint == fingerprint
        )

    def get(self, peer_id: str) -> PeerInfo | None:
        """A copy: changing it does not change the table."""
        info = self._peers.get(peer_id)
        return dataclasses.replace(info) if info is not None else None

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._peers

    def records_for_exchange(self, limit: int | None = None) -> list[bytes]:
        """Signed records worth relaying: peers we reached ourselves and that are not failing,
        connected ones first, then the most recently seen. Never our own (we hold none)."""
        good = [
            p
            for p in self._peers.values()
            if p.record.envelope and p.last_seen is not None and p.failures == 0
        ]
        good.sort(key=lambda p: (p.state is not PeerState.CONNECTED, -(p.last_seen or 0.0)))
        return [p.record.envelope for p in good[:limit]]

    def snapshot(self) -> list[dict[str, Any]]:
        """For the local API (/peers): one JSON-able dict per peer, sorted by peer_id."""
        return [
            {
                "peer_id": p.peer_id,
                "addrs": list(p.addrs),
                "state": p.state.value,
                "last_seen": p.last_seen,
                "rtt_ms": p.rtt_ms,
                "failures": p.failures,
                "next_attempt": p.next_attempt,
                "exchange_url": p.exchange_url,
                "fingerprint": p.fingerprint,
                "pinned": p.pinned,
            }
            for p in sorted(self._peers.values(), key=lambda p: p.peer_id)
        ]

    def statistics(self) -> dict[str, int]:
        by_state = {s.value: 0 for s in PeerState}
        for p in self._peers.values():
            by_state[p.state.value] += 1
        return {"total": len(self._peers), **by_state, **self._counters}

    # -- persistence ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-able. Connection state and pins are not saved: after a restart every peer is
        KNOWN and the config re-pins the bootstrap peers."""
        return {
            "version": FORMAT_VERSION,
            "peers": [to_entry(p) for p in sorted(self._peers.values(), key=lambda p: p.peer_id)],
        }

    @classmethod
    def from_dict(cls, data: Any, own_peer_id: str, **kwargs: Any) -> PeerTable:
        """Rebuild from to_dict() output. Bad entries (and a wrong version or shape, which
        skips everything) are counted in statistics()["skipped_on_load"], never fatal."""
        table = cls(own_peer_id, **kwargs)
        peers = data.get("peers") if isinstance(data, dict) else None
        version = data.get("version") if isinstance(data, dict) else None
        if type(version) is not int or version != FORMAT_VERSION or not isinstance(peers, list):
            table._counters["skipped_on_load"] += len(peers) if isinstance(peers, list) else 1
            return table
        loaded: dict[str, PeerInfo] = {}
        skipped = 0
        for entry in peers:
            info = from_entry(entry)
            if info is None or info.peer_id == own_peer_id or info.peer_id in loaded:
                skipped += 1
                continue
            loaded[info.peer_id] = info
        # max_peers may have been lowered since the save: keep the best ones.
        best = sorted(loaded.values(), key=_keep_score, reverse=True)
        skipped += max(0, len(best) - table.max_peers)
        for info in best[: table.max_peers]:
            table._peers[info.peer_id] = info
        table._counters["skipped_on_load"] += skipped
        return table

    # -- internals ------------------------------------------------------------------------

    def _set_addrs(self, info: PeerInfo, addrs: tuple[str, ...], now: float) -> None:
        # New addresses deserve a prompt try even mid-backoff (e.g. it restarted on a new port);
        # only the subject can sign a record, so nobody else can trigger this for it.
        if addrs != info.addrs and info.state is not PeerState.CONNECTED:
            info.next_attempt = min(info.next_attempt, now)
        info.addrs = addrs

    def _admit(self, peer_id: str, now: float, *, strong: bool) -> PeerInfo | None:
        """Make room for a new peer. A `strong` newcomer (connected, or from the config) may
        replace any peer that is neither connected nor pinned; a merely relayed one only a
        failed or never-reached peer, so a flood of records cannot push out peers we reached."""
        if len(self._peers) >= self.max_peers:
            victims = [
                p
                for p in self._peers.values()
                if p.state is not PeerState.CONNECTED
                and not p.pinned
                and (strong or p.failures > 0 or p.last_seen is None)
            ]
            if not victims:
                self._counters["dropped_full"] += 1
                return None
            del self._peers[min(victims, key=_keep_score).peer_id]
            self._counters["replaced"] += 1
        info = PeerInfo(peer_id=peer_id, first_seen=now, next_attempt=now)
        self._peers[peer_id] = info
        return info
