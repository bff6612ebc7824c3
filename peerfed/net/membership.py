"""Membership: bootstrap, peer exchange, liveness and the saved peer table.

Every node keeps a signed record of itself (addresses, exchange URL, model fingerprint) and
swaps the records it knows with its peers over ``/peerfed/<network>/peers/1.0.0``: the caller
sends a ``peer_list`` envelope addressed to the remote, the remote answers with its own.
Any one contact is enough to learn the swarm, and a record can only be made by its subject,
so a relaying node cannot forge one. A peer counts as connected once we hold a live libp2p
connection to it *and* a verified record of it; anyone else is disconnected after a grace
period, which keeps other networks and strangers out of the peer table.

Owner: the daemon's main loop; Membership and its peer table are touched only from it (the
libp2p host's callbacks reach it through the bridge, on that loop).

A peer list that fails verification is counted by reason and logged at most once a minute per
sender (net/quiet.py). Saving the table never raises (net/peer_file.py): the save loop goes on
after a failed write, and stop() finishes on a full disk.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerfed.core.envelope import (
    PeerList,
    PeerRecord,
    Verifier,
    verify_peer_record,
)
from peerfed.core.errors import Rejected
from peerfed.core.gossip_pace import GossipPace, PaceStats
from peerfed.core.peerid import Signer
from peerfed.core.peers import PeerState, PeerTable
from peerfed.core.reachability import dial_order
from peerfed.core.record_cache import VerifiedRecords
from peerfed.core.view import PartialView
from peerfed.net.addrs import local_ipv4_addresses
from peerfed.net.membership_parts import Links as _Links
from peerfed.net.membership_parts import Rejections as _Rejections
from peerfed.net.membership_parts import Us as _Us
from peerfed.net.p2p import DialError, ForeignPeer, HostStats, P2PHost
from peerfed.net.peer_file import PeerTableFile, load_peer_table
from peerfed.net.quiet import QuietLog, describe
from peerfed.net.reachability import ReachabilityService

__all__ = ["Membership", "MembershipStats", "load_peer_table"]

log = logging.getLogger("peerfed.membership")
quiet = QuietLog(log)  # lines about what a peer sent: once a minute per peer

DIAL_TICK = 1.0
GOSSIP_INTERVAL = 5.0       # between peer-list swaps while they bring news; up to GOSSIP_CEILING once quiet
GOSSIP_CEILING = 60.0
PING_INTERVAL = 30.0       # liveness of live links; a closed socket is noticed at once anyway (10 s cost 0.4% of a core at 8 links)
SAVE_INTERVAL = 30.0
RECORD_REFRESH = 600.0       # re-sign our record well before others consider it expired
RECORD_MAX_AGE = 3600.0
UNVERIFIED_GRACE = 10.0      # a connection without a verified record is closed after this
MAX_PARALLEL_DIALS = 8
REPLACE_PER_LIST = 2         # new peers a peer list may put in place of stale ones in a full table
FOREIGN_PEER_FAILURES = 5      # a peer refusing our protocol counts as this many failed dials


@dataclass(frozen=True, slots=True)
class MembershipStats:
    """Counts by name; each mapping is a copy made for this snapshot (dataclasses.asdict
    gives the JSON the local API serves)."""

    peers_connected: int
    known: int
    rejected: Mapping[str, int]   # by reason: peer lists and records we refused
    verifier: Mapping[str, int]   # the envelope verifier's decisions
    table: Mapping[str, int]      # peers by state, and the table's own counters
    host: HostStats
    view: Mapping[str, int]       # the partial view's target and what it did (core/view.py)
    gossip: PaceStats             # the peer-list swap interval now, lists with and without news


class Membership:
    def __init__(
        self,
        *,
        host: P2PHost,
        signer: Signer,
        network: str,
        table: PeerTable,
        bootstrap: Sequence[str],
        allowlist: frozenset[str] | None,
        state_file: Path,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_rejected: Callable[[str], None] | None = None,
        max_connections: int = 16,
        reachability: ReachabilityService | None = None,
    ) -> None:
        self._host = host
        self._us = _Us(signer, network, reachability=reachability)
        self.table = table
        self._bootstrap = list(bootstrap)
        self._file = PeerTableFile(state_file)
        self._clock = clock
        self._rng = rng or random.Random()
        # The allowlist lives here (verify_peer_record asks it too; reload changes it).
        self._verifier = Verifier(network=network, own_peer_id=signer.peer_id, clock=clock, allowlist=allowlist)
        self._rejections = _Rejections(on_rejected)
        self._links = _Links(view=PartialView(target=max_connections, rng=self._rng),
                             pace=GossipPace(GOSSIP_INTERVAL, GOSSIP_CEILING, self._rng, clock()))
        self._records = VerifiedRecords(max_age=RECORD_MAX_AGE, limit=4 * table.max_peers)
        self._tasks: set[asyncio.Task[Any]] = set()  # our loops and short side tasks; stop() ends them

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for addr in self._bootstrap:
            self._add_bootstrap(addr)
        for loop in (self._dial_loop, self._gossip_loop, self._ping_loop, self._save_loop):
            self._spawn(loop(), name=loop.__name__)
        if self._us.reachability is not None:
            await self._us.reachability.start(self, exchange_url=self._us.fields["exchange_url"])

    async def stop(self) -> None:
        if self._us.reachability is not None:
            await self._us.reachability.stop()  # removes our port mappings
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.save()  # never raises: a full disk is logged, and stopping goes on

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> None:
        """A task of ours (a loop, or a short dial, exchange or disconnect) that stop() cancels."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reload(self, *, bootstrap: Sequence[str], allowlist: frozenset[str] | None) -> None:
        """Apply a new bootstrap list and allowlist without a restart (SIGHUP)."""
        self._bootstrap = list(bootstrap)
        self._verifier.set_allowlist(allowlist)
        self._records.clear()
        for addr in self._bootstrap:
            self._add_bootstrap(addr)
        if allowlist:
            for peer_id in list(self._links.live):
                if peer_id not in allowlist:
                    self._spawn(self._host.disconnect(peer_id))

    def set_own_fields(self, **fields: Any) -> None:
        """Change what our record says (exchange URL, fingerprint): re-sign it and tell our
        peers now rather than at the next gossip round."""
        self._us.fields.update(fields)
        self._us.record = b""
        for peer_id in self._links.live:
            self._spawn(self._exchange_with(peer_id))

    # -- what others ask for --------------------------------------------------------------

    async def handle_request(self, remote: str, data: bytes) -> bytes:
        """An inbound peer_list from ``remote``: absorb it, answer with ours."""
        env = self._verify(data, remote)
        if env is None or env.sender != remote:
            if env is not None:
                self._rejections.count("sender_mismatch")
                quiet.warning(f"peer {remote}", "rejected a peer list from %s: it is signed by %s",
                              remote, env.sender)
            raise PermissionError("peer list rejected")  # p2p.py: refused and logged here already
        self._links.pace.heard(self._absorb(env.body.records, direct_from=remote), self._clock())
        return self._sealed_peer_list(remote)

    def on_connection_change(self, peer_id: str, up: bool) -> None:
        now = self._clock()
        if up:
            self._links.live.add(peer_id)
            self._links.since.setdefault(peer_id, now)
            self._links.unverified_since[peer_id] = now
            self._spawn(self._exchange_with(peer_id))
        else:
            self._links.live.discard(peer_id)
            self._links.since.pop(peer_id, None)
            self._links.unverified_since.pop(peer_id, None)
            if self.table.get(peer_id) is not None:
                self.table.mark_disconnected(peer_id, now)
                self._file.dirty = True

    # -- views ----------------------------------------------------------------------------

    @property
    def reachability(self) -> ReachabilityService | None:
        return self._us.reachability

    def exchange_route(self, peer_id: str, url: str) -> str:
        """The URL to exchange with ``peer_id`` at: its own, a tunnel over libp2p, or ""."""
        return self._us.reachability.exchange_route(peer_id, url) if self._us.reachability else url

    def connected_peers(self) -> list[str]:
        return [p for p in self.table.connected() if p in self._links.live]

    def peers_snapshot(self) -> list[dict[str, Any]]:
        return self.table.snapshot()

    def statistics(self) -> MembershipStats:
        return MembershipStats(peers_connected=len(self.connected_peers()), known=len(self.table),
                               rejected=dict(self._rejections.by_reason), verifier=self._verifier.statistics(),
                               table=self.table.statistics(), host=self._host.statistics(),
                               view=self._links.view.statistics(), gossip=self._links.pace.statistics())

    def save(self) -> bool:
        """Write the peer table atomically so a restarted node rejoins without bootstrap;
        False if it could not be written (logged with the path and the OS error)."""
        return self._file.save(self.table)

    # -- internals ------------------------------------------------------------------------

    def _add_bootstrap(self, addr: str) -> None:
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        if peer_id != self._us.signer.peer_id:
            self.table.add_address(peer_id, (addr,), self._clock(), pinned=True)

    def _own_peer_record(self) -> bytes:
        now, us = self._clock(), self._us
        if not us.record or now - us.record_time > RECORD_REFRESH:
            # net/reachability.py sets "addrs" (dialable first) once it knows; until then, ours
            fields = {"addrs": tuple(self._host.addrs()), **us.fields}
            us.record = us.seal(PeerRecord(version=_version(), **fields), now)
            us.record_time = now
        return us.record

    def _sealed_peer_list(self, recipient: str) -> bytes:
        records = [self._own_peer_record(), *self.table.records_for_exchange()]
        return self._us.seal(PeerList(records=tuple(records)), self._clock(), recipient)

    def _verify(self, data: bytes, sender: str) -> Any:
        """The verified peer list that ``sender`` (a connected PeerID) sent us, or None."""
        try:
            return self._verifier.verify(data, expected_kind=PeerList)
        except Rejected as exc:
            self._rejections.count(exc.reason)
            quiet.warning(f"peer {sender}", "rejected a peer list from %s: %s (%s)", sender, exc.reason,
                          describe(exc))
            return None

    def _absorb(self, records: Sequence[bytes], *, direct_from: str) -> bool:
        """Take the records we did not have; whether any was news (core/gossip_pace.py)."""
        now, news = self._clock(), False
        room_to_replace = REPLACE_PER_LIST
        for raw in records:
            subject = self._records.subject(raw, now)
            if subject is not None and (held := self.table.get(subject)) is not None and held.record.envelope == raw:
                self._mark_if_direct(subject, direct_from, now)  # the very record we hold: no news
                continue
            try:
                env = verify_peer_record(raw, network=self._us.network, now=now, max_age=RECORD_MAX_AGE,
                                         allowlist=self._verifier.allowlist)
            except Rejected as exc:
                self._rejections.count("record_" + exc.reason)
                log.debug("dropped a peer record: %s (%s)", exc.reason, exc)
                continue
            if env.sender == self._us.signer.peer_id:
                continue
            self._records.add(raw, env.sender, env.timestamp)
            rec: PeerRecord = env.body
            held = self.table.get(env.sender)  # add_record updates it in place: what we knew, first
            known = None if held is None else (held.exchange_url, held.fingerprint, frozenset(held.addrs))
            full_and_new = len(self.table) >= self.table.max_peers and held is None
            if self.table.add_record(env.sender, addrs=rec.addrs, exchange_url=rec.exchange_url,
                                     fingerprint=rec.fingerprint, record=raw, record_time=env.timestamp,
                                     now=now, may_replace=room_to_replace > 0):
                self._file.dirty = True
                room_to_replace -= full_and_new
                news |= known is None or known[:2] != (rec.exchange_url, rec.fingerprint) or not known[2] >= set(rec.addrs)
            self._mark_if_direct(env.sender, direct_from, now)
        return news

    def _mark_if_direct(self, subject: str, direct_from: str, now: float) -> None:
        """The peer we are talking to sent its own record: it is connected and verified."""
        if subject == direct_from and direct_from in self._links.live:
            self.table.mark_connected(direct_from, now)

    async def _exchange_with(self, peer_id: str) -> None:
        try:
            reply = await self._host.request(peer_id, self._sealed_peer_list(peer_id))
        except ForeignPeer as exc:
            # One line; WARNING only the first time for a peer we dial ourselves (a bootstrap
            # entry on another network, most likely). That stays so until an operator acts:
            # back off as after several failures (~16 s, then the 300 s cap; unpinned: evicted).
            info = self.table.get(peer_id)
            log.log(logging.WARNING if info is not None and info.failures == 0 else logging.INFO,
                    "%s; closing the connection", exc)
            for _ in range(FOREIGN_PEER_FAILURES):
                self.table.record_failure(peer_id, self._clock())
            self._links.unverified_since.pop(peer_id, None)
            self._spawn(self._host.disconnect(peer_id))
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "no verified record yet"
            log.debug("peer exchange with %s failed: %s", peer_id, exc)
            return
        env = self._verify(reply, peer_id)
        if env is None or env.sender != peer_id:
            return
        self._links.pace.heard(self._absorb(env.body.records, direct_from=peer_id), self._clock())

    async def _dial(self, peer_id: str) -> None:
        info = self.table.get(peer_id)
        if info is None:
            return
        self._links.dialing.add(peer_id)
        try:
            for addr in dial_order(info, local_ipv4_addresses()):
                try:
                    got = await self._host.dial(addr)
                except DialError as exc:
                    log.info("%s", exc)
                    continue
                if got != peer_id:
                    log.warning("refusing %s: it answered as %s", addr, got)
                    continue
                return
            self.table.record_failure(peer_id, self._clock())
        finally:
            self._links.dialing.discard(peer_id)

    async def _dial_loop(self) -> None:
        while True:
            now = self._clock()
            links = self._links
            keep = self._us.reachability.links_to_keep() if self._us.reachability is not None else set()
            plan = links.view.plan(live={p: links.since.get(p, now) for p in links.live}, dialing=links.dialing,
                                   due=self.table.due_for_dial(now), now=now, max_parallel=MAX_PARALLEL_DIALS,
                                   keep=keep)
            for peer_id in plan.dial:
                self._spawn(self._dial(peer_id))
            for peer_id in plan.close:
                log.debug("closing connection to %s: %s", peer_id, plan.reason)
                self._spawn(self._host.disconnect(peer_id))
            for peer_id, since in list(links.unverified_since.items()):
                info = self.table.get(peer_id)
                verified = info is not None and info.state == PeerState.CONNECTED
                if not verified and now - since > UNVERIFIED_GRACE:
                    log.info("closing connection to %s: no valid peer record from it", peer_id)
                    self.table.record_failure(peer_id, now)  # back off: no redial in a loop
                    links.unverified_since.pop(peer_id, None)
                    self._spawn(self._host.disconnect(peer_id))
            for peer_id in self.table.evict_stale(now):
                log.info("forgot peer %s (unreachable for long)", peer_id)
                self._file.dirty = True
            await asyncio.sleep(DIAL_TICK)

    async def _gossip_loop(self) -> None:
        while True:
            await asyncio.sleep(DIAL_TICK)
            live = self.connected_peers()
            if live and self._links.pace.due(self._clock()):
                await self._exchange_with(self._rng.choice(live))

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(PING_INTERVAL)
            # a link that carried a peer list since the last round is live: no ping needed
            now = self._clock()
            quiet = [p for p in self.connected_peers()
                     if (info := self.table.get(p)) is None or info.last_seen is None
                     or now - info.last_seen >= PING_INTERVAL]
            await asyncio.gather(*(self._ping(p) for p in quiet))

    async def _ping(self, peer_id: str) -> None:
        try:
            rtt = await self._host.ping(peer_id)
        except Exception as exc:  # noqa: BLE001
            log.info("ping to %s failed: %s", peer_id, describe(exc))
            self.table.record_failure(peer_id, self._clock())
            return
        self.table.record_ping(peer_id, rtt, self._clock())

    async def _save_loop(self) -> None:
        while True:
            await asyncio.sleep(SAVE_INTERVAL)
            if not self._file.dirty:
                continue
            try:  # the table is this loop's: serialize it here, write it in a thread
                await asyncio.to_thread(self._file.write, self._file.serialize(self.table))
            except Exception:  # a bug, not a full disk (write() logs those): the loop goes on
                self._file.dirty = True
                log.exception("saving the peer table to %s failed", self._file.path)


def _version() -> str:
    from peerfed import __version__

    return __version__
