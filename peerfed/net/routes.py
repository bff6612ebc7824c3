"""Which URL an exchange with a peer uses: its own, or a tunnel over libp2p (net/tunnel.py).

A peer whose exchange URL we can open (it is public, on our LAN, or says nothing) is
exchanged with at that URL. A peer behind a NAT with no path to it, but with a live libp2p
connection to us (hole-punched, or relayed), gets a tunnel: a local URL whose requests go
over a libp2p stream to its exchange server. Tunnels open and close as connections come and
go (``refresh`` every ``REFRESH`` seconds).

Owner: the daemon's main loop (membership's); the tunnels themselves live in the trio thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("peerfed.routes")

REFRESH = 1.0


class ExchangeRoutes:
    def __init__(self, host: Any) -> None:
        self._host = host                          # P2PHost: exchange_tunnel()
        self._tunnels: dict[str, str] = {}         # PeerID -> local tunnel URL
        self._kinds: dict[str, str] = {}           # PeerID -> "direct" | "relayed" (last seen)
        self._task: asyncio.Task[None] | None = None

    def route(self, peer_id: str, url: str, reachable: bool) -> str:
        """The URL to exchange with ``peer_id`` at ("" = none for now)."""
        if reachable:
            return url
        tunnel = self._tunnels.get(peer_id, "")
        # The tunnel carries bytes to the peer's exchange port as they are: TLS there, TLS here.
        return "https://" + tunnel.removeprefix("http://") if tunnel and url.startswith("https://") else tunnel

    def tunnels(self) -> dict[str, dict[str, str]]:
        """PeerID -> {"url": local URL, "connection": "direct" (hole-punched) | "relayed"}."""
        return {p: {"url": url, "connection": self._kinds.get(p, "")} for p, url in self._tunnels.items()}

    def start(self, needs_tunnel: Callable[[], set[str]]) -> None:
        """``needs_tunnel()``: connected peers that train our model but cannot be reached."""
        self._task = asyncio.create_task(self._keep(needs_tunnel), name="exchange_routes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _keep(self, needs_tunnel: Callable[[], set[str]]) -> None:
        while True:
            wanted = needs_tunnel()
            for peer_id in wanted:  # open, or (idempotent) see which connection it rides on now
                try:
                    self._tunnels[peer_id], kind = await self._host.exchange_tunnel(peer_id)
                except Exception as exc:  # noqa: BLE001 - the host is stopping
                    log.debug("no tunnel to %s: %s", peer_id, exc)
                    continue
                if self._kinds.get(peer_id) != kind:
                    log.info("exchanges with %s go over libp2p, %s connection (%s)", peer_id, kind,
                             self._tunnels[peer_id])
                    self._kinds[peer_id] = kind
            for peer_id in set(self._tunnels) - wanted:
                del self._tunnels[peer_id]
                self._kinds.pop(peer_id, None)
                try:
                    await self._host.exchange_tunnel(peer_id, open_it=False)
                except Exception as exc:  # noqa: BLE001
                    log.debug("closing the tunnel to %s: %s", peer_id, exc)
            await asyncio.sleep(REFRESH)
