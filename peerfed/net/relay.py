"""NAT traversal on the libp2p host: AutoNAT, circuit relay v2 and DCUtR hole punching.

- AutoNAT: net/autonat.py (a dial-back on a fresh connection).
- Circuit relay v2 (py-libp2p 0.8.1, ``libp2p.relay.circuit_v2``): a node with
  ``p2p.relay_service`` relays for others, each circuit capped at ``max_bytes`` (both
  directions together) and ``max_seconds``; every node answers relayed connections (STOP)
  and can reserve a slot on a relay, which makes it reachable at
  ``<relay address>/p2p-circuit/p2p/<us>``, and dial such addresses.
- DCUtR: on every relayed connection py-libp2p's DCUtR tries, within seconds, to replace it
  by a direct one (TCP simultaneous open from both listen ports at the addresses each side was
  observed at); the relayed connection stays as the fallback. Only one end leads
  (``OneEndDCUtR``).
- Exchange tunnels (net/tunnel.py): the HTTP exchange over a libp2p stream, for peers whose
  exchange URL cannot be reached.

Owner: the trio thread (the host's); ``services()`` runs them for the host's lifetime.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from peerfed.net.autonat import FreshDialAutoNAT
from peerfed.net.tunnel import Tunnels

log = logging.getLogger("peerfed.relay")

RESERVE_TIMEOUT = 10.0
CIRCUIT_DIAL_TIMEOUT = 15.0
# Longer than one DCUtR attempt of py-libp2p 0.8.1 (a 10 s direct dial, then 3 rounds of
# 5 s + 2 s), so the follower starts only once the leader has had a whole one.
FOLLOWER_DELAY = 45.0


class OneEndDCUtR(DCUtRProtocol):
    """DCUtR led by the end with the lower peer ID.

    py-libp2p drives a hole punch from both ends of a relayed connection every 2 s. When both
    start at once, two sessions run crossed (each end the initiator of one): their simultaneous
    dials meet with both ends in the same security role and both fail (CI, stop 23). The higher
    ID waits: it starts only if the connection is still relayed FOLLOWER_DELAY after it saw it,
    which covers a peer that never leads (another implementation)."""

    def __init__(self, host: Any) -> None:
        super().__init__(host)
        self._relayed_since: dict[ID, float] = {}

    async def initiate_hole_punch(self, peer_id: ID) -> bool:
        if self.host.get_id().to_bytes() > peer_id.to_bytes():
            since = self._relayed_since.setdefault(peer_id, trio.current_time())
            if trio.current_time() - since < FOLLOWER_DELAY:
                return False
        return await super().initiate_hole_punch(peer_id)

    def on_peer_disconnected(self, peer_id: ID) -> None:
        super().on_peer_disconnected(peer_id)
        self._relayed_since.pop(peer_id, None)


@dataclass(frozen=True, slots=True)
class RelayService:
    """``p2p.relay_service`` and its caps per circuit."""

    enabled: bool = False
    max_bytes: int = 64 << 20
    max_seconds: int = 300
    max_circuits: int = 16


class NatTraversal:
    def __init__(self, host: Any, *, network: str, relay: RelayService) -> None:
        self.autonat = FreshDialAutoNAT(host)
        limits = RelayLimits(duration=relay.max_seconds, data=relay.max_bytes,
                             max_circuit_conns=relay.max_circuits, max_reservations=relay.max_circuits)
        self._host = host
        self._protocol = CircuitV2Protocol(host, limits=limits, allow_hop=relay.enabled)
        roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if relay.enabled else RelayRole(0))
        self._transport = CircuitV2Transport(host, self._protocol, RelayConfig(roles=roles, limits=limits))
        self._dcutr = OneEndDCUtR(host)
        self.tunnels = Tunnels(host, network)
        self.reserved: set[str] = set()   # relays that hold a slot for us
        self._nursery: trio.Nursery | None = None

    @asynccontextmanager
    async def services(self) -> AsyncIterator[None]:
        async with background_trio_service(self._protocol), background_trio_service(self._dcutr), \
                trio.open_nursery() as nursery:
            self._nursery = nursery
            self.tunnels.serve(nursery)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()

    async def reserve(self, relay: str) -> bool:
        """Ask ``relay`` (connected) for a slot; False if it is no relay or refuses."""
        assert self._nursery is not None
        relay_id = ID.from_base58(relay)
        with trio.fail_after(RESERVE_TIMEOUT):
            stream = await self._host.new_stream(relay_id, [HOP_PROTOCOL_ID])
            ok = bool(await self._transport.reserve(stream, relay_id, self._nursery))
        if ok:
            self.reserved.add(relay)
        return ok

    async def dial_circuit(self, addr: str) -> None:
        """Connect through a relay: ``<relay addr>/p2p/<relay>/p2p-circuit/p2p/<peer>``."""
        with trio.fail_after(CIRCUIT_DIAL_TIMEOUT):
            await self._transport.dial(multiaddr.Multiaddr(addr))

    def direct(self, peer_id: str) -> bool:
        """Whether a connection to the peer goes straight to it (not through a relay)."""
        conns = self._host.get_network().get_connections(ID.from_base58(peer_id))
        return any(not any("/p2p-circuit" in str(a) for a in c.get_transport_addresses()) for c in conns)

    async def tunnel_url(self, peer_id: str, open_it: bool) -> tuple[str, str]:
        """(local URL, "direct" | "relayed": the connection it rides on now), or ("", "")."""
        if not open_it:
            self.tunnels.close(peer_id)
            return "", ""
        port = await self.tunnels.open(peer_id)
        return f"http://127.0.0.1:{port}", "direct" if self.direct(peer_id) else "relayed"

    async def set_tunnel_target(self, port: int | None) -> None:
        self.tunnels.target_port = port
