"""Can this node be dialed from the internet, and at which of its addresses? (no I/O)

The node collects candidate addresses (its listen addresses, the IP that peers observe it at
through identify with its listen port, a port mapped on its router) and asks connected peers
to dial some back on a fresh connection (AutoNAT). ``AddressBook`` keeps the verdicts and
decides:

- reachability: "public" when more recent verdicts from outside our LAN say a fresh dial
  reached us than say it failed, "private" when more say it failed, "unknown" otherwise.
  A peer that saw us from a LAN address (same home) proves nothing about the internet.
- the record's address order: addresses a peer dialed back first, then public listen
  addresses not yet disproved, then LAN addresses (marked: the record counts them, they come
  last). A guessed address (observed, mapped) enters only once a peer dialed it; one that
  failed ``GIVE_UP_AFTER`` checks in a row is no longer passed on nor checked.

Also the pairing rule (`worth_initiating`): whom to open an exchange to.
Time is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from peerfed.core.envelope import decode
from peerfed.core.errors import Rejected
from peerfed.core.peerinfo import PeerInfo
from peerfed.core.peers import PeerTable
from peerfed.core.records import PeerRecord

GIVE_UP_AFTER = 3           # failed dial-backs, never a success: stop passing it on
VERDICT_TTL = 1800.0        # a verdict counts this long
MAX_VERDICTS = 16           # newest per server kept, oldest forgotten

# Addresses a home network uses behind its router: RFC 1918, carrier-grade NAT (RFC 6598),
# link-local, loopback, IPv6 ULA and link-local. 198.18.0.0/15 (benchmarking) is *not* here:
# the namespace tests use it as their internet.
_LAN_NETS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16",
    "127.0.0.0/8", "fc00::/7", "fe80::/10", "::1/128"))


class Reachability(str, enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"


def is_lan_ip(ip: str) -> bool:
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(parsed in net for net in _LAN_NETS if net.version == parsed.version)


def addr_ip(addr: str) -> str:
    """The IP of ``/ip4/<ip>/...`` or ``/ip6/<ip>/...``; "" for any other multiaddr."""
    parts = addr.split("/")
    return parts[2] if len(parts) > 2 and parts[1] in ("ip4", "ip6") else ""


def addr_port(addr: str) -> int | None:
    parts = addr.split("/")
    return int(parts[4]) if len(parts) > 4 and parts[3] == "tcp" and parts[4].isdigit() else None


def is_lan_addr(addr: str) -> bool:
    ip = addr_ip(addr)
    return bool(ip) and is_lan_ip(ip)


def thin(addr: str) -> str:
    """``/ip4/1.2.3.4/tcp/7401`` of any address (``/p2p/...`` and the rest dropped)."""
    return "/".join(addr.split("/")[:5])


@dataclass
class _Candidate:
    source: str              # "listen", "observed", "mapped"
    confirmed_at: float | None = None
    failures: int = 0        # dial-backs that failed since the last success


@dataclass(frozen=True)
class Verdict:
    server: str              # PeerID of the peer that dialed
    ok: bool
    at: float


@dataclass(frozen=True)
class RecordAddrs:
    """What our signed record says about our addresses."""

    addrs: tuple[str, ...]   # thin addresses, dialable first, LAN ones last
    private_addrs: int       # how many of the last ``addrs`` are LAN-only
    reachability: Reachability


@dataclass
class AddressBook:
    candidates: dict[str, _Candidate] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    observed: dict[str, float] = field(default_factory=dict)  # thin observed addr -> last seen

    # -- what we learn --------------------------------------------------------------------

    def set_listen(self, addrs: Iterable[str]) -> None:
        keep = {thin(a) for a in addrs}
        for a in list(self.candidates):
            if self.candidates[a].source == "listen" and a not in keep:
                del self.candidates[a]
        for a in keep:
            self.candidates.setdefault(a, _Candidate("listen"))

    def add_candidate(self, addr: str, source: str) -> None:
        """An address we may be reachable at (observed IP + listen port, a mapped port)."""
        self.candidates.setdefault(thin(addr), _Candidate(source))

    def drop_source(self, source: str) -> None:
        """Forget every candidate of one kind (a port mapping was removed)."""
        for a in [a for a, c in self.candidates.items() if c.source == source]:
            del self.candidates[a]

    def observe(self, addr: str, now: float) -> None:
        """A peer told us (identify) the address it sees our connection come from."""
        if addr_ip(addr):
            self.observed[thin(addr)] = now

    def dial_back(self, server: str, *, server_saw_lan: bool, ok: bool, addr: str | None,
                  asked: Sequence[str], now: float) -> None:
        """A peer's AutoNAT verdict on ``asked``; ``addr``: the one it reached (if ok)."""
        if ok and addr:
            c = self.candidates.get(thin(addr))
            if c is not None:
                c.confirmed_at, c.failures = now, 0
        elif not ok:
            for a in asked:
                c = self.candidates.get(thin(a))
                if c is not None and not is_lan_addr(a):
                    c.failures += 1
        if server_saw_lan:
            return  # a neighbour on our LAN reached us: says nothing about the internet
        self.verdicts = [v for v in self.verdicts if v.server != server][-(MAX_VERDICTS - 1):]
        self.verdicts.append(Verdict(server, ok, now))

    # -- what we decide -------------------------------------------------------------------

    def reachability(self, now: float) -> Reachability:
        recent = [v for v in self.verdicts if now - v.at <= VERDICT_TTL]
        ok = sum(v.ok for v in recent)
        failed = len(recent) - ok
        if ok > failed:
            return Reachability.PUBLIC
        if failed > ok:
            return Reachability.PRIVATE
        if not recent and not self.to_check() and any(not is_lan_addr(a) for a in self.observed):
            return Reachability.PRIVATE  # seen from outside at an address that never worked
        return Reachability.UNKNOWN

    def to_check(self) -> list[str]:
        """Candidates worth asking a peer to dial back: not LAN-only, not given up on."""
        return [a for a, c in self.candidates.items() if not is_lan_addr(a) and c.failures < GIVE_UP_AFTER]

    def confirmed(self) -> list[str]:
        return [a for a, c in self.candidates.items() if c.confirmed_at is not None]

    def record(self, now: float) -> RecordAddrs:
        def order(a: str) -> tuple[float, int]:
            c = self.candidates[a]
            return (-(c.confirmed_at or 0.0), ["mapped", "observed", "listen"].index(c.source))

        # A guessed address (observed IP + our port, a mapped port) enters the record once a
        # peer has dialed it; a public listen address is in it until disproved.
        dialable = sorted((a for a in self.to_check()
                           if self.candidates[a].confirmed_at is not None or self.candidates[a].source == "listen"),
                          key=order)
        lan = sorted(a for a in self.candidates if is_lan_addr(a))
        # LAN addresses stay (a neighbour on the same LAN dials them), loopback does not.
        lan = [a for a in lan if not ipaddress.ip_address(addr_ip(a)).is_loopback] or lan
        return RecordAddrs(tuple(dialable + lan), len(lan), self.reachability(now))

    def observed_addrs(self, now: float, max_age: float = VERDICT_TTL) -> list[str]:
        return sorted(a for a, at in self.observed.items() if now - at <= max_age)


def worth_initiating(peer_reachability: str, peer_addrs: Sequence[str], peer_private_addrs: int,
                     *, our_lan_ips: Sequence[str]) -> bool:
    """Pairing: open an exchange to this peer? Yes unless it says it is behind a NAT and has
    no address we could reach: then it initiates to us (if we are public), and our attempts
    would only time out. A peer on our own LAN (its LAN address in one of our /24s, or /64s)
    is reachable whatever the internet thinks of it."""
    if peer_reachability != Reachability.PRIVATE.value:
        return True
    ours = {_lan_prefix(ip) for ip in our_lan_ips if is_lan_ip(ip)}
    lan = peer_addrs[len(peer_addrs) - peer_private_addrs:] if peer_private_addrs else ()
    return any(_lan_prefix(addr_ip(a)) in ours for a in lan if addr_ip(a))


def _lan_prefix(ip: str) -> str:
    parsed = ipaddress.ip_address(ip)
    return str(ipaddress.ip_network(f"{ip}/{24 if parsed.version == 4 else 64}", strict=False))


def stored_record(envelope: bytes) -> PeerRecord | None:
    """The body of a peer record the peer table stored (it was verified then), or None."""
    if not envelope:
        return None
    try:
        body = decode(envelope, max_size=len(envelope)).body
    except Rejected:
        return None
    return body if isinstance(body, PeerRecord) else None


def relay_candidates(table: PeerTable, connected: Sequence[str]) -> list[tuple[str, str]]:
    """Connected peers that say they are public, with the address to reach them at (the
    first of their record that is not LAN-only): where to ask for a relay slot."""
    out = []
    for peer_id in connected:
        info = table.get(peer_id)
        rec = stored_record(info.record.envelope) if info is not None else None
        if rec is not None and rec.reachability == Reachability.PUBLIC.value:
            addr = next((a for a in rec.addrs if not is_lan_addr(a) and "/p2p-circuit" not in a), "")
            if addr:
                out.append((peer_id, addr))
    return out


def worth_initiating_to(info: PeerInfo | None, our_lan_ips: Sequence[str]) -> bool:
    """worth_initiating() for a peer as the table holds it (its stored signed record)."""
    rec = stored_record(info.record.envelope) if info is not None else None
    return rec is None or worth_initiating(rec.reachability, rec.addrs, rec.private_addrs, our_lan_ips=our_lan_ips)


def dial_order(info: PeerInfo, our_lan_ips: Sequence[str]) -> list[str]:
    """The peer's addresses in its record's order, less the LAN ones of a peer that says it is
    behind a NAT and is not on our LAN: dialing those only times out."""
    if worth_initiating_to(info, our_lan_ips):
        return list(info.addrs)
    return [a for a in info.addrs if not is_lan_addr(a)]
