"""net/reachability.py with a stand-in host: what it asks peers, what it publishes."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from peerfed.core.peers import PeerTable
from peerfed.net.reachability import ReachabilityService

PEER = "12D3KooWTestPeer"


class FakeHost:
    """Answers like P2PHost: a rig at 192.168.1.10:7401 whose router is 198.18.1.1."""

    peer_id = PEER

    def __init__(self, reachable: set[str]) -> None:
        self.reachable = reachable           # addresses a dial-back gets through to
        self.asked: list[tuple[str, list[str]]] = []

    def transport_addrs(self, announced: bool = False) -> list[str]:
        return ["/ip4/192.168.1.10/tcp/7401", "/ip4/127.0.0.1/tcp/7401"]

    def addrs(self) -> list[str]:
        return [a + "/p2p/" + PEER for a in self.transport_addrs()]

    async def observations(self) -> tuple[list[str], dict[str, str]]:
        return ["/ip4/198.18.1.1/tcp/40123"], {"server1": "198.18.0.10", "server2": "198.18.0.11",
                                               "neighbour": "192.168.1.11"}

    async def dial_back(self, server: str, addrs: list[str]) -> tuple[str, str | None]:
        self.asked.append((server, list(addrs)))
        hit = next((a for a in addrs if a in self.reachable), None)
        return ("ok", hit) if hit else ("failed", None)


class FakeMembership:
    def __init__(self, peers: list[str], published: list[dict[str, Any]]) -> None:
        self.peers, self.published = peers, published
        self.table = PeerTable("me")

    def connected_peers(self) -> list[str]:
        return self.peers

    def set_own_fields(self, **fields: Any) -> None:
        self.published.append(fields)


def run_checks(host: FakeHost, peers: list[str], rounds: int) -> tuple[ReachabilityService, list[dict[str, Any]]]:
    published: list[dict[str, Any]] = []

    async def scenario() -> ReachabilityService:
        service = ReachabilityService(host, port_mapping=False, clock=lambda: 1000.0,  # type: ignore[arg-type]
                                      rng=random.Random(1))
        service._membership = FakeMembership(peers, published)
        for _ in range(rounds):
            await service.check_once()
        return service

    return asyncio.run(scenario()), published


def test_forwarded_port_found_through_observation_is_confirmed_and_published_first() -> None:
    host = FakeHost(reachable={"/ip4/198.18.1.1/tcp/7401"})
    service, published = run_checks(host, ["server1"], 1)
    # it asked for our listen port at the IP the peer sees us at, not the LAN address
    assert host.asked == [("server1", ["/ip4/198.18.1.1/tcp/7401"])]
    stats = service.statistics()
    assert stats.reachability == "public" and stats.observed_addrs == ("/ip4/198.18.1.1/tcp/40123",)
    assert published[-1]["addrs"] == ("/ip4/198.18.1.1/tcp/7401/p2p/" + PEER,
                                      "/ip4/192.168.1.10/tcp/7401/p2p/" + PEER)
    assert published[-1]["private_addrs"] == 1 and published[-1]["reachability"] == "public"


def test_an_address_that_never_worked_stops_being_asked_about_and_we_are_private() -> None:
    host = FakeHost(reachable=set())
    service, published = run_checks(host, ["server1", "server2"], 4)
    asked_for = [addrs for _, addrs in host.asked]
    assert asked_for and all(a == ["/ip4/198.18.1.1/tcp/7401"] for a in asked_for)
    assert len(host.asked) == 3  # given up after GIVE_UP_AFTER failed dial-backs; the 4th round asks nothing
    assert service.statistics().reachability == "private"
    assert published[-1]["addrs"] == ("/ip4/192.168.1.10/tcp/7401/p2p/" + PEER,)
    assert published[-1]["reachability"] == "private"


def test_a_neighbour_on_our_lan_does_not_make_us_public() -> None:
    host = FakeHost(reachable={"/ip4/198.18.1.1/tcp/7401"})
    service, _ = run_checks(host, ["neighbour"], 1)
    assert host.asked and service.statistics().reachability == "unknown"
