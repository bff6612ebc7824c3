"""Learn whether we can be dialed, and keep our signed record's addresses honest.

Every ``CHECK_INTERVAL`` (``FIRST_CHECKS`` at first, until we know) this service:
1. collects candidate addresses into the AddressBook (core/reachability.py): our listen
   addresses, each IP a peer observed us at (identify) with our listen port, and the
   external address of a port our router mapped for us (net/portmap.py);
2. asks up to ``SERVERS_PER_CHECK`` connected peers to dial the non-LAN candidates back on a
   fresh connection (AutoNAT, net/autonat.py);
3. gives membership our record's addresses (dialable first, LAN ones counted last) and
   reachability, and, once a peer has dialed our mapped p2p port, the exchange URL at the
   mapped exchange port.

Owner: the daemon's main loop; the AddressBook is touched only from it. ``statistics()``
returns a frozen snapshot for ``peerfed status``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from peerfed.core.peers import PeerTable
from peerfed.core.reachability import (
    AddressBook,
    Reachability,
    addr_ip,
    addr_port,
    is_lan_ip,
    relay_candidates,
    thin,
    worth_initiating_to,
)
from peerfed.net.addrs import local_ipv4_addresses
from peerfed.net.p2p import P2PHost
from peerfed.net.portmap import PortMapper, PortMapStats
from peerfed.net.routes import ExchangeRoutes

log = logging.getLogger("peerfed.reachability")

FIRST_CHECKS = 5.0       # seconds between checks while reachability is unknown
CHECK_INTERVAL = 60.0
SERVERS_PER_CHECK = 3


class MembershipView(Protocol):
    """What this service needs of membership (net/membership.py): its peer table, who is
    connected, and a way to change (re-sign and push) our record."""

    table: PeerTable

    def connected_peers(self) -> list[str]: ...
    def set_own_fields(self, **fields: Any) -> None: ...


class _Alone:
    table = PeerTable("", max_peers=1)

    def connected_peers(self) -> list[str]:
        return []

    def set_own_fields(self, **fields: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)
class ReachabilityStats:
    reachability: str = Reachability.UNKNOWN.value
    observed_addrs: tuple[str, ...] = ()   # how peers see us (identify), thin multiaddrs
    confirmed_addrs: tuple[str, ...] = ()  # where a peer dialed us back on a fresh connection
    record_addrs: tuple[str, ...] = ()     # what our signed record lists, in order
    private_addrs: int = 0
    checks: int = 0
    exchange_url: str = ""                 # the URL our record advertises ("" = the local one)
    relay: str = ""                        # our address through a relay ("" = none)


class ReachabilityService:
    def __init__(self, host: P2PHost, *, port_mapping: bool, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self._host = host
        self.routes = ExchangeRoutes(host)   # our own URL or a tunnel, per peer
        self._clock = clock
        self._rng = rng or random.Random()
        self._book = AddressBook()
        self._published: dict[str, Any] = {}
        self._stats = ReachabilityStats()
        self._task: asyncio.Task[None] | None = None
        # set by start(): who we can ask and where our record goes, the router's port mapper
        self._membership: MembershipView = _Alone()
        self._mapper = PortMapper(enabled=port_mapping)
        self._relay = ""  # our address through the relay that holds a slot for us, or ""
        self._exchange_port: int | None = None

    def statistics(self) -> ReachabilityStats:
        return self._stats

    def port_mapping(self) -> PortMapStats:
        return self._mapper.statistics()

    async def start(self, membership: MembershipView, *, exchange_url: str) -> None:
        """Begin checking; ``exchange_url`` is the local one, whose port we map and to which
        exchange tunnels from peers lead."""
        self._membership = membership
        self._exchange_port = urllib.parse.urlsplit(exchange_url).port if exchange_url else None
        await self._host.set_tunnel_target(self._exchange_port)
        ports = [p for p in map(addr_port, self._host.transport_addrs()) if p is not None]
        await self._mapper.start([*ports, *([self._exchange_port] if self._exchange_port else [])])
        self.routes.start(self.needs_tunnel)
        self._task = asyncio.create_task(self._loop(), name="reachability")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.routes.stop()
        await self._mapper.stop()

    # -- pairing: whom we open exchanges to, and how ---------------------------------------

    def worth_initiating(self, peer_id: str) -> bool:
        """False for a peer behind a NAT with no path to it (core/reachability.py)."""
        return worth_initiating_to(self._membership.table.get(peer_id), local_ipv4_addresses())

    def needs_tunnel(self) -> set[str]:
        """Connected peers with an exchange URL we cannot open (net/routes.py); none if we do
        not train (no exchange port of our own)."""
        if self._exchange_port is None:
            return set()
        table = self._membership.table
        return {p for p in self._membership.connected_peers()
                if not self.worth_initiating(p) and (info := table.get(p)) is not None and info.exchange_url}

    def links_to_keep(self) -> set[str]:
        """Connections the partial view must not close: the relay holding our slot, and peers
        we can only exchange with over the connection itself (core/view.py)."""
        keep = self.needs_tunnel()
        if self._relay:
            keep.add(self._relay.split("/p2p/")[1].split("/")[0])
        return keep

    def exchange_route(self, peer_id: str, url: str) -> str:
        return self.routes.route(peer_id, url, self.worth_initiating(peer_id))

    async def _loop(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # a bug: keep the node running, say where
                log.exception("reachability check failed")
            known = self._stats.reachability != Reachability.UNKNOWN.value
            await asyncio.sleep(CHECK_INTERVAL if known else FIRST_CHECKS)

    async def check_once(self) -> None:
        book, now = self._book, self._clock()
        listen = self._host.transport_addrs()
        book.set_listen(self._host.transport_addrs(announced=True))
        ports = sorted({p for p in map(addr_port, listen) if p is not None})
        observed, seen_at = await self._host.observations()
        for addr in observed:
            book.observe(addr, now)
            ip = addr_ip(addr)
            if ip and not is_lan_ip(ip) and "/ip4/" in addr:
                for port in ports:  # our listen port at the IP they see: right if forwarded
                    book.add_candidate(f"/ip4/{ip}/tcp/{port}", "observed")
        mapped_p2p = self._mapped_p2p(ports)
        if mapped_p2p:
            book.add_candidate(mapped_p2p, "mapped")
        await self._ask_peers(seen_at, now)
        if self._relay and self._relay.split("/p2p/")[1] not in self._membership.connected_peers():
            self._relay = ""  # the relay went away, and our slot with it
        if book.reachability(now) is Reachability.PRIVATE and not self._relay:
            await self._reserve_relay()
        self._publish_record(now, mapped_p2p)

    async def _reserve_relay(self) -> None:
        """Behind a NAT with no mapping: get a slot on a public peer that relays, so that
        others can reach us through it (and DCUtR can punch a direct path)."""
        for relay, addr in relay_candidates(self._membership.table, self._membership.connected_peers()):
            try:
                if await self._host.reserve_relay(relay):
                    self._relay = f"{addr}/p2p-circuit"
                    log.info("reachable through relay %s", relay)
                    return
            except Exception as exc:  # noqa: BLE001 - not a relay, or gone
                log.debug("no relay slot on %s: %s", relay, exc)

    def _mapped_p2p(self, ports: list[int]) -> str:
        for port in ports:
            m = self._mapper.external(port)
            if m is not None:
                return f"/ip4/{m.external_ip}/tcp/{m.external_port}"
        return ""

    async def _ask_peers(self, seen_at: dict[str, str], now: float) -> None:
        peers = self._membership.connected_peers()
        for server in self._rng.sample(peers, min(SERVERS_PER_CHECK, len(peers))):
            asked = self._book.to_check()
            if not asked:
                break  # nothing left worth a dial-back (LAN only, or every guess disproved)
            try:
                verdict, reached = await self._host.dial_back(server, asked)
            except Exception as exc:  # noqa: BLE001 - an old peer without AutoNAT, a lost connection
                log.debug("could not ask %s to dial us back: %s", server, exc)
                continue
            if verdict == "refused":
                continue
            server_ip = seen_at.get(server, "")
            self._book.dial_back(server, server_saw_lan=bool(server_ip) and is_lan_ip(server_ip),
                                 ok=verdict == "ok", addr=reached, asked=asked, now=now)
            log.debug("dial-back by %s: %s %s", server, verdict, reached or "")
        self._stats = replace(self._stats, checks=self._stats.checks + 1)

    def _publish_record(self, now: float, mapped_p2p: str) -> None:
        book = self._book
        rec = book.record(now)
        suffix = "/p2p/" + self._host.peer_id
        relayed = (self._relay + suffix,) if self._relay else ()  # after dialable, before LAN
        dialable = rec.addrs[:len(rec.addrs) - rec.private_addrs]
        fields: dict[str, Any] = {
            "addrs": tuple(a + suffix for a in dialable) + relayed
            + tuple(a + suffix for a in rec.addrs[len(dialable):]) or tuple(self._host.addrs()),
            "reachability": "" if rec.reachability is Reachability.UNKNOWN else rec.reachability.value,
            "private_addrs": rec.private_addrs if rec.addrs else 0,
        }
        exchange_url = self._mapped_exchange_url(mapped_p2p)
        if exchange_url:
            fields["exchange_url"] = exchange_url
        if fields != self._published:
            if fields.get("reachability") != self._published.get("reachability"):
                log.info("reachability: %s; record addresses: %s", rec.reachability.value,
                         ", ".join(rec.addrs) or "none")
            self._published = fields
            self._membership.set_own_fields(**fields)
        self._stats = ReachabilityStats(
            reachability=rec.reachability.value, observed_addrs=tuple(book.observed_addrs(now)),
            confirmed_addrs=tuple(book.confirmed()), record_addrs=rec.addrs, private_addrs=rec.private_addrs,
            checks=self._stats.checks, exchange_url=exchange_url, relay=self._relay)

    def _mapped_exchange_url(self, mapped_p2p: str) -> str:
        """The exchange port's mapping, once a peer has dialed our mapped p2p port: same
        router, same kind of mapping, so it is open too."""
        if self._exchange_port is None or not mapped_p2p:
            return ""
        if thin(mapped_p2p) not in self._book.confirmed():
            return ""
        m = self._mapper.external(self._exchange_port)
        return f"http://{m.external_ip}:{m.external_port}" if m is not None else ""
