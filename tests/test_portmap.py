"""net/portmap.py against a fake UPnP router: map, renew before the lease ends, unmap on stop."""

from __future__ import annotations

import asyncio
from typing import Any

from peerfed.net.portmap import PortMapper


class FakeRouter:
    """Stands for miniupnpc.UPnP; one instance per router, shared by the mappers on its LAN."""

    def __init__(self, *, taken: frozenset[int] = frozenset(), devices: int = 1) -> None:
        self.mappings: dict[int, tuple[str, int, int]] = {}   # external port -> (host, port, lease)
        self.adds = 0
        self.taken = taken
        self.devices = devices
        self.lanaddr = "192.168.1.10"
        self.discoverdelay = 0

    def __call__(self) -> FakeRouter:
        return self

    def discover(self) -> int:
        return self.devices

    def selectigd(self) -> str:
        return "http://192.168.1.1:5000/ctl/IPConn"

    def externalipaddress(self) -> str:
        return "11.18.0.1"

    def addportmapping(self, eport: int, proto: str, host: str, iport: int, desc: str, remote: str,
                       lease: int) -> bool:
        if eport in self.taken:
            raise Exception("ConflictInMappingEntry")  # noqa: TRY002 - what miniupnpc raises
        self.adds += 1
        self.mappings[eport] = (host, iport, lease)
        return True

    def addanyportmapping(self, eport: int, proto: str, host: str, iport: int, desc: str, remote: str,
                          lease: int) -> int:
        free = max([*self.mappings, *self.taken, eport]) + 1
        self.adds += 1
        self.mappings[free] = (host, iport, lease)
        return free

    def deleteportmapping(self, eport: int, proto: str) -> bool:
        del self.mappings[eport]
        return True


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_maps_both_ports_renews_at_half_the_lease_and_unmaps_on_stop() -> None:
    router = FakeRouter(taken=frozenset({7402}))

    async def scenario() -> tuple[Any, int, dict[int, tuple[str, int, int]]]:
        mapper = PortMapper(lease=1, client=router)
        await mapper.start([7401, 7402])
        await asyncio.sleep(0.2)
        first = mapper.statistics()
        await asyncio.sleep(1.1)  # two more rounds at lease/2 = 0.5 s
        renewals = mapper.statistics().renewals
        mapped_before_stop = dict(router.mappings)
        await mapper.stop()
        return first, renewals, mapped_before_stop

    first, renewals, mapped = run(scenario())
    assert [(m.internal_port, m.external_ip, m.external_port) for m in first.mapped] == [
        (7401, "11.18.0.1", 7401), (7402, "11.18.0.1", 7403)]  # 7402 was taken: any port
    assert first.gateway == "192.168.1.1"
    assert renewals >= 2 and mapped == {7401: ("192.168.1.10", 7401, 1), 7403: ("192.168.1.10", 7402, 1)}
    assert router.mappings == {}  # removed on stop


def test_no_router_leaves_the_node_as_it_was() -> None:
    async def scenario() -> Any:
        mapper = PortMapper(client=FakeRouter(devices=0))
        await mapper.start([7401])
        await asyncio.sleep(0.2)
        stats = mapper.statistics()
        await mapper.stop()
        return stats

    stats = run(scenario())
    assert stats.mapped == () and stats.failures == 1 and "no UPnP device" in stats.last_error


def test_disabled_mapper_does_nothing() -> None:
    router = FakeRouter()

    async def scenario() -> None:
        mapper = PortMapper(enabled=False, client=router)
        await mapper.start([7401])
        await asyncio.sleep(0.1)
        await mapper.stop()

    run(scenario())
    assert router.adds == 0
