"""net/portmap.py against fake routers (UPnP IGD, NAT-PMP): map, renew before the lease ends,
unmap on stop, fall back from UPnP to NAT-PMP. tests/test_nat.py and the slow test at the end
map through a real miniupnpd in network namespaces."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from netlab import NetLab, missing_requirements

from peerfed.net.portmap import NatPmp, PortMapper, UpnpIgd, private_default_gateway


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


class FakeNatPmpRouter:
    """Stands for py-natpmp's module (natpmp.NATPMP) talking to one router at 192.168.1.1."""

    def __init__(self, *, answers: bool = True, lifetime: int | None = None) -> None:
        self.answers = answers
        self.lifetime = lifetime     # granted instead of what was asked, if set
        self.mappings: dict[int, int] = {}   # external port -> our port
        self.calls: list[tuple[int, int, int]] = []

    def get_public_address(self, gateway_ip: str, retry: int) -> str:
        assert gateway_ip == "192.168.1.1"
        if not self.answers:
            raise OSError(3, "The gateway does not support NAT-PMP.")
        return "11.18.0.2"

    def map_tcp_port(self, public_port: int, private_port: int, lifetime: int, gateway_ip: str,
                     retry: int) -> SimpleNamespace:
        self.calls.append((public_port, private_port, lifetime))
        if lifetime == 0:
            self.mappings = {e: p for e, p in self.mappings.items() if p != private_port}
            return SimpleNamespace(public_port=0, lifetime=0)
        external = next((e for e, p in self.mappings.items() if p == private_port), public_port + 1000)
        self.mappings[external] = private_port
        return SimpleNamespace(public_port=external, lifetime=self.lifetime or lifetime)


def no_upnp() -> UpnpIgd:
    return UpnpIgd(FakeRouter(devices=0))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_maps_both_ports_renews_at_half_the_lease_and_unmaps_on_stop() -> None:
    router = FakeRouter(taken=frozenset({7402}))

    async def scenario() -> tuple[Any, int, dict[int, tuple[str, int, int]]]:
        mapper = PortMapper(lease=1, routers=[lambda: UpnpIgd(router)])
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
        mapper = PortMapper(routers=[no_upnp, lambda: NatPmp("192.168.1.1", FakeNatPmpRouter(answers=False))])
        await mapper.start([7401])
        await asyncio.sleep(0.2)
        stats = mapper.statistics()
        await mapper.stop()
        return stats

    stats = run(scenario())
    assert stats.mapped == () and stats.failures == 1
    assert stats.last_error == ("UPnP IGD: no device answered on the LAN; "
                                "NAT-PMP: The gateway does not support NAT-PMP.")


def test_disabled_mapper_does_nothing() -> None:
    router = FakeRouter()

    async def scenario() -> None:
        mapper = PortMapper(enabled=False, routers=[lambda: UpnpIgd(router)])
        await mapper.start([7401])
        await asyncio.sleep(0.1)
        await mapper.stop()

    run(scenario())
    assert router.adds == 0


def test_a_router_without_upnp_maps_through_nat_pmp_renewing_at_half_the_granted_lease() -> None:
    router = FakeNatPmpRouter(lifetime=1)  # asked for an hour, granted a second

    async def scenario() -> tuple[Any, int, dict[int, int]]:
        mapper = PortMapper(routers=[no_upnp, lambda: NatPmp("192.168.1.1", router)])
        await mapper.start([7401, 7402])
        await asyncio.sleep(0.2)
        first = mapper.statistics()
        await asyncio.sleep(1.1)  # renewed at 0.5 s and 1.0 s
        renewals = mapper.statistics().renewals
        before_stop = dict(router.mappings)
        await mapper.stop()
        return first, renewals, before_stop

    first, renewals, before_stop = run(scenario())
    assert (first.protocol, first.gateway) == ("NAT-PMP", "192.168.1.1")
    assert [(m.internal_port, m.external_ip, m.external_port) for m in first.mapped] == [
        (7401, "11.18.0.2", 8401), (7402, "11.18.0.2", 8402)]  # the router chose the ports
    assert renewals >= 2 and before_stop == {8401: 7401, 8402: 7402}
    assert router.calls[:2] == [(7401, 7401, 3600), (7402, 7402, 3600)]
    assert router.calls[2:4] == [(8401, 7401, 3600), (8402, 7402, 3600)]  # a renewal asks for what it got
    assert router.mappings == {} and router.calls[-2:] == [(0, 7401, 0), (0, 7402, 0)]  # deleted on stop


def test_nat_pmp_asks_only_a_private_default_gateway(tmp_path: Path) -> None:
    header = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n"
    table = tmp_path / "route"
    table.write_text(header + "eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                     "eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\n")
    assert private_default_gateway(str(table)) == "192.168.1.1"
    table.write_text(header + "eth0\t00000000\t04030201\t0003\t0\t0\t0\t00000000\n")
    with pytest.raises(OSError, match="1.2.3.4 .* is no home router"):
        private_default_gateway(str(table))
    table.write_text(header)
    with pytest.raises(OSError, match="no IPv4 default gateway"):
        private_default_gateway(str(table))


MAP_IN_NAMESPACE = textwrap.dedent("""
    import asyncio, json, socket, sys
    from peerfed.net.portmap import NatPmp, PortMapper, UpnpIgd

    async def main():
        listener = socket.create_server(("0.0.0.0", 9000))
        routers = [UpnpIgd, NatPmp] if sys.argv[1] == "both" else [NatPmp]
        mapper = PortMapper(routers=routers)
        await mapper.start([9000])
        for _ in range(100):
            if mapper.statistics().mapped or mapper.statistics().failures:
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"protocol": mapper.statistics().protocol, "gateway": mapper.statistics().gateway,
                          "mapped": [list(m) for m in (
                              (x.internal_port, x.external_ip, x.external_port) for x in mapper.statistics().mapped)],
                          "error": mapper.statistics().last_error}), flush=True)
        sys.stdin.readline()  # the test dials the mapping, then says stop
        await mapper.stop()
        print("stopped", flush=True)

    asyncio.run(main())
""")


@pytest.mark.slow
@pytest.mark.skipif(missing_requirements(upnp=True) is not None, reason=missing_requirements(upnp=True) or "")
def test_a_real_router_with_upnp_off_maps_our_port_over_nat_pmp() -> None:
    """miniupnpd with only NAT-PMP/PCP on: PortMapper falls back from UPnP IGD (no answer to
    SSDP) to NAT-PMP at the default gateway; the internet reaches the rig through the mapping,
    and not after stop()."""
    import json

    with NetLab() as lab:
        t = lab.home_topology({"a": 1, "b": 1}, natpmp=["a"])
        rig, router_a = t.rig("a1"), t.routers["a"].machine
        proc = subprocess.Popen(["ip", "netns", "exec", rig.ns, sys.executable, "-c", MAP_IN_NAMESPACE, "both"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            got = json.loads(proc.stdout.readline())
            assert (got["protocol"], got["gateway"]) == ("NAT-PMP", "192.168.1.1"), got
            [(internal, external_ip, external_port)] = got["mapped"]
            assert (internal, external_ip) == (9000, router_a.ip)
            assert lab.can_connect(t.public.ns, router_a.ip, external_port)   # through the mapping
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "stopped"
            assert proc.wait(10) == 0
            assert not lab.can_connect(t.public.ns, router_a.ip, external_port, timeout=1)  # removed
        finally:
            proc.kill()
