"""Port mapping on the home router (UPnP IGD), so that peers on the internet can dial us.

Library: miniupnpc (the client of the MiniUPnP project, whose miniupnpd runs on many home
routers; a small C extension with no dependencies, maintained, on PyPI). Compared:
async-upnp-client is asyncio-native but large (aiohttp, voluptuous, defusedxml, ...) and built
for Home Assistant's device control; py-natpmp speaks only NAT-PMP and its last release is
from 2023. miniupnpc's calls block (SSDP discovery waits ``DISCOVER_MS``), so they run in a
worker thread. NAT-PMP/PCP are not spoken here: routers that offer them (miniupnpd included)
almost always offer UPnP IGD too.

For each local port (p2p, exchange) we ask for the same external port, then for any port
(AddAnyPortMapping), with a lease of ``LEASE`` seconds, renewed at half of it; stop() removes
what we mapped. No router, or one that refuses: logged once at INFO, retried every
``RETRY`` seconds; the node works as before.

Owner: the daemon's main loop; the worker thread only runs one blocking miniupnpc call at a
time and hands back plain values.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("peerfed.portmap")

LEASE = 3600          # seconds; renewed at half
RETRY = 300.0         # seconds between attempts when no router answered
DISCOVER_MS = 2000


@dataclass(frozen=True, slots=True)
class Mapped:
    internal_port: int
    external_ip: str
    external_port: int


@dataclass(frozen=True, slots=True)
class PortMapStats:
    enabled: bool
    gateway: str = ""                       # the IGD's control URL host, "" if none found
    mapped: tuple[Mapped, ...] = ()
    renewals: int = 0
    failures: int = 0
    last_error: str = ""


class PortMapper:
    def __init__(self, *, enabled: bool = True, description: str = "peerfed", lease: int = LEASE,
                 client: Callable[[], Any] | None = None) -> None:
        self._ports: list[int] = []
        self._description = description
        self._lease = lease
        self._client = client  # makes a miniupnpc.UPnP-like object; tests pass a fake router
        self._upnp: Any = None  # the miniupnpc client, used by one worker call at a time
        self._control_url = ""
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
        if mapped and self._upnp is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self._unmap_all, mapped), 3)
                log.info("removed port mappings %s", ", ".join(str(m.external_port) for m in mapped))
            except Exception as exc:  # noqa: BLE001 - we are stopping; the lease ends them anyway
                log.info("could not remove port mappings (their lease ends them): %s", exc)

    async def _keep_mapped(self) -> None:
        quiet_after_first = False
        while True:
            try:
                gateway, mapped = await asyncio.to_thread(self._map_all)
            except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception
                self._stats = replace(self._stats, failures=self._stats.failures + 1, last_error=str(exc),
                                      mapped=())
                self._upnp = None
                log.log(logging.DEBUG if quiet_after_first else logging.INFO,
                        "no port mapping (UPnP IGD: %s); retrying in %.0f s", exc, RETRY)
                quiet_after_first = True
                await asyncio.sleep(RETRY)
                continue
            renewed = bool(self._stats.mapped)
            if not renewed or mapped != self._stats.mapped:
                log.info("port mapping on %s: %s", gateway,
                         ", ".join(f"{m.external_ip}:{m.external_port} -> {m.internal_port}" for m in mapped))
            self._stats = replace(self._stats, gateway=gateway, mapped=mapped,
                                  renewals=self._stats.renewals + renewed)
            await asyncio.sleep(self._lease / 2)

    # -- in the worker thread -------------------------------------------------------------

    def _map_all(self) -> tuple[str, tuple[Mapped, ...]]:
        if self._upnp is None:
            if self._client is None:
                import miniupnpc  # imported here: only nodes that map ports load it

                self._client = miniupnpc.UPnP
            upnp = self._client()
            upnp.discoverdelay = DISCOVER_MS
            if upnp.discover() == 0:
                raise OSError("no UPnP device answered on the LAN")
            try:
                self._control_url = str(upnp.selectigd())
            except Exception as exc:  # its message is often just "Success"
                raise OSError("no internet gateway among the UPnP devices on the LAN") from exc
            self._upnp = upnp
        upnp = self._upnp
        external_ip = str(upnp.externalipaddress())
        previous = {m.internal_port: m.external_port for m in self._stats.mapped}
        out = []
        for port in self._ports:
            out.append(Mapped(port, external_ip, self._map_one(upnp, port, previous.get(port, port))))
        return urllib.parse.urlsplit(self._control_url).hostname or "", tuple(out)

    def _map_one(self, upnp: Any, port: int, wanted: int) -> int:
        try:
            upnp.addportmapping(wanted, "TCP", upnp.lanaddr, port, self._description, "", self._lease)
            return wanted
        except Exception:  # noqa: BLE001 - taken by another host (ConflictInMappingEntry) or refused
            got = upnp.addanyportmapping(wanted, "TCP", upnp.lanaddr, port, self._description, "", self._lease)
            return int(got)

    def _unmap_all(self, mapped: Sequence[Mapped]) -> None:
        for m in mapped:
            try:
                self._upnp.deleteportmapping(m.external_port, "TCP")
            except Exception as exc:  # noqa: BLE001
                log.debug("deleting mapping %s failed: %s", m.external_port, exc)
