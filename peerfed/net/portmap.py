"""Port mapping on the home router (UPnP IGD, else NAT-PMP), so that peers on the internet can dial us.

Libraries: miniupnpc for UPnP IGD (the client of the MiniUPnP project, whose miniupnpd runs on
many home routers; a small C extension with no dependencies, maintained, on PyPI) and py-natpmp
for NAT-PMP (RFC 6886; pure Python, no dependencies, BSD). Compared: async-upnp-client is
asyncio-native but large (aiohttp, voluptuous, defusedxml, ...) and built for Home Assistant's
device control, and speaks no NAT-PMP. PCP (RFC 6887) is not spoken: no maintained Python
client exists, and a PCP router answers NAT-PMP requests too (miniupnpd, Apple's, ...). Both
libraries block (SSDP discovery waits ``DISCOVER_MS``; NAT-PMP retries after 0.25, 0.5 and 1 s),
so they run in a worker thread.

UPnP IGD is tried first (most routers); a router that has it off but speaks NAT-PMP gets asked
there, at the default route's gateway when that is a private address (a home router; never a
host on the internet). For each local port (p2p, exchange) we ask for the same external port,
then for any port, with a lease of ``LEASE`` seconds, renewed at half of what the router
granted; stop() removes what we mapped. No router, or one that refuses: logged once at INFO,
retried every ``RETRY`` seconds; the node works as before.

Owner: the daemon's main loop; the worker thread only runs one blocking call at a time and
hands back plain values.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

log = logging.getLogger("peerfed.portmap")

LEASE = 3600          # seconds; renewed at half
RETRY = 300.0         # seconds between attempts when no router answered
DISCOVER_MS = 2000
NATPMP_TRIES = 3      # 1.75 s in all (RFC 6886 allows 9: 64 s)


@dataclass(frozen=True, slots=True)
class Mapped:
    internal_port: int
    external_ip: str
    external_port: int


@dataclass(frozen=True, slots=True)
class PortMapStats:
    enabled: bool
    gateway: str = ""                       # the router's address, "" if none found
    protocol: str = ""                      # "UPnP IGD" | "NAT-PMP": how it was asked
    mapped: tuple[Mapped, ...] = ()
    renewals: int = 0
    failures: int = 0
    last_error: str = ""


class Router(Protocol):
    """A session with the home router; every call blocks (worker thread)."""

    protocol: str
    gateway: str

    def external_ip(self) -> str: ...

    def add(self, port: int, wanted: int, lease: int) -> tuple[int, int]:
        """Map external ``wanted`` (else any port) to our ``port``: (external port, lease granted)."""

    def remove(self, mapped: Mapped) -> None: ...


class UpnpIgd:
    protocol = "UPnP IGD"

    def __init__(self, upnp: Any = None, description: str = "peerfed") -> None:
        if upnp is None:
            import miniupnpc  # imported here: only nodes that map ports load it

            upnp = miniupnpc.UPnP()
        upnp.discoverdelay = DISCOVER_MS
        if upnp.discover() == 0:
            raise OSError("UPnP IGD: no device answered on the LAN")
        try:
            control_url = str(upnp.selectigd())
        except Exception as exc:  # its message is often just "Success"
            raise OSError("UPnP IGD: no internet gateway among the devices on the LAN") from exc
        self._upnp = upnp
        self._description = description
        self.gateway = urllib.parse.urlsplit(control_url).hostname or ""

    def external_ip(self) -> str:
        return str(self._upnp.externalipaddress())

    def add(self, port: int, wanted: int, lease: int) -> tuple[int, int]:
        upnp = self._upnp
        try:
            upnp.addportmapping(wanted, "TCP", upnp.lanaddr, port, self._description, "", lease)
            return wanted, lease
        except Exception:  # noqa: BLE001 - taken by another host (ConflictInMappingEntry) or refused
            got = upnp.addanyportmapping(wanted, "TCP", upnp.lanaddr, port, self._description, "", lease)
            return int(got), lease

    def remove(self, mapped: Mapped) -> None:
        self._upnp.deleteportmapping(mapped.external_port, "TCP")


class NatPmp:
    protocol = "NAT-PMP"

    def __init__(self, gateway: str | None = None, client: Any = None) -> None:
        if client is None:
            import natpmp.NATPMP as client  # imported here: only nodes that map ports load it
        self._client = client
        try:
            self.gateway = gateway or private_default_gateway()
            self.external_ip()
        except Exception as exc:  # noqa: BLE001 - py-natpmp's errors carry (code, message)
            raise OSError(f"NAT-PMP: {exc.args[-1] if exc.args else exc}") from exc

    def external_ip(self) -> str:
        return str(self._client.get_public_address(self.gateway, retry=NATPMP_TRIES))

    def add(self, port: int, wanted: int, lease: int) -> tuple[int, int]:
        # The router picks another external port itself when ``wanted`` is taken.
        reply = self._client.map_tcp_port(wanted, port, lease, gateway_ip=self.gateway, retry=NATPMP_TRIES)
        return int(reply.public_port), int(reply.lifetime)

    def remove(self, mapped: Mapped) -> None:
        # RFC 6886 3.4: lifetime 0 and external port 0 delete the mapping of our port.
        self._client.map_tcp_port(0, mapped.internal_port, 0, gateway_ip=self.gateway, retry=NATPMP_TRIES)


def private_default_gateway(route_table: str = "/proc/net/route") -> str:
    """The IPv4 default route's gateway, if it is a private address (a home router)."""
    with open(route_table) as f:
        for line in f.readlines()[1:]:
            iface, dest, gateway, flags = line.split()[:4]
            if dest == "00000000" and int(flags, 16) & 0x2:  # RTF_GATEWAY
                ip = socket.inet_ntoa(struct.pack("<I", int(gateway, 16)))
                if not ipaddress.ip_address(ip).is_private:
                    raise OSError(f"the default gateway {ip} (via {iface}) is no home router")
                return ip
    raise OSError("no IPv4 default gateway")


class PortMapper:
    def __init__(self, *, enabled: bool = True, lease: int = LEASE,
                 routers: Sequence[Callable[[], Router]] = (UpnpIgd, NatPmp)) -> None:
        self._ports: list[int] = []
        self._lease = lease
        self._routers = routers  # tried in order; tests pass fake routers
        self._router: Router | None = None  # used by one worker call at a time
        self._granted = lease
        self._stats = PortMapStats(enabled=enabled)
        self._task: asyncio.Task[None] | None = None

    def statistics(self) -> PortMapStats:
        return self._stats

    def external(self, internal_port: int) -> Mapped | None:
        return next((m for m in self._stats.mapped if m.internal_port == internal_port), None)

    async def start(self, ports: Sequence[int]) -> None:
        """Map ``ports`` (TCP, same number outside if free) until stop()."""
        self._ports = [p for p in dict.fromkeys(ports) if p]
        if self._stats.enabled and self._ports:
            self._task = asyncio.create_task(self._keep_mapped(), name="portmap")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        mapped, self._stats = self._stats.mapped, replace(self._stats, mapped=())
        if mapped and self._router is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self._unmap_all, mapped), 3 + 2 * len(mapped))
                log.info("removed port mappings %s", ", ".join(str(m.external_port) for m in mapped))
            except Exception as exc:  # noqa: BLE001 - we are stopping; the lease ends them anyway
                log.info("could not remove port mappings (their lease ends them): %s", exc)

    async def _keep_mapped(self) -> None:
        quiet_after_first = False
        while True:
            try:
                router, mapped = await asyncio.to_thread(self._map_all)
            except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception
                self._stats = replace(self._stats, failures=self._stats.failures + 1, last_error=str(exc),
                                      mapped=())
                self._router = None
                log.log(logging.DEBUG if quiet_after_first else logging.INFO,
                        "no port mapping (%s); retrying in %.0f s", exc, RETRY)
                quiet_after_first = True
                await asyncio.sleep(RETRY)
                continue
            renewed = bool(self._stats.mapped)
            if not renewed or mapped != self._stats.mapped:
                log.info("port mapping on %s (%s): %s", router.gateway, router.protocol,
                         ", ".join(f"{m.external_ip}:{m.external_port} -> {m.internal_port}" for m in mapped))
            self._stats = replace(self._stats, gateway=router.gateway, protocol=router.protocol, mapped=mapped,
                                  renewals=self._stats.renewals + renewed)
            await asyncio.sleep(max(self._granted, 1) / 2)  # a router granting 0 s: not a busy loop

    # -- in the worker thread -------------------------------------------------------------

    def _connect(self) -> Router:
        errors = []
        for make in self._routers:
            try:
                return make()
            except Exception as exc:  # noqa: BLE001 - each library raises its own (or bare Exception)
                errors.append(str(exc) or type(exc).__name__)
        raise OSError("; ".join(errors))

    def _map_all(self) -> tuple[Router, tuple[Mapped, ...]]:
        if self._router is None:
            self._router = self._connect()
        router = self._router
        external_ip = router.external_ip()
        previous = {m.internal_port: m.external_port for m in self._stats.mapped}
        out, granted = [], self._lease
        for port in self._ports:
            external_port, lease = router.add(port, previous.get(port, port), self._lease)
            out.append(Mapped(port, external_ip, external_port))
            granted = min(granted, lease)
        self._granted = granted
        return router, tuple(out)

    def _unmap_all(self, mapped: Sequence[Mapped]) -> None:
        assert self._router is not None
        for m in mapped:
            try:
                self._router.remove(m)
            except Exception as exc:  # noqa: BLE001
                log.debug("deleting mapping %s failed: %s", m.external_port, exc)
