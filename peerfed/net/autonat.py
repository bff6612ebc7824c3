"""AutoNAT v1 (``/libp2p/autonat/1.0.0``) with a dial-back that proves something.

py-libp2p 0.8.1's AutoNATService answers a dial request with ``host.connect``, which returns
at once when a connection to the requester already exists, and the request itself arrives on
one: every requester would be told "reachable". Here the server dials each address on a fresh
TCP connection of its own, runs the Noise handshake on it (which proves the requester's
PeerID answers there) and closes it without adding it to the swarm. The wire protocol, the
observed-IP gate (only addresses at the IP the request came from are dialed: no amplification)
and the refusal over relayed connections are py-libp2p's.

Owner: the trio thread (the host's); everything here runs there.
"""

from __future__ import annotations

import logging
from typing import Any

import multiaddr
import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID

log = logging.getLogger("peerfed.autonat")

DIAL_BACK_TIMEOUT = 5.0
QUERY_TIMEOUT = 15.0


class FreshDialAutoNAT(AutoNATService):
    """AutoNAT whose server half dials back on a new connection (see the module docstring)."""

    def __init__(self, host: Any) -> None:
        super().__init__(host, serve=True, confirmations=1)
        self.dial_backs = 0
        self.dial_backs_ok = 0

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs[:4]:  # a requester may list many; a few are enough
            self.dial_backs += 1
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT):
                    await self._handshake(peer_id, multiaddr.Multiaddr(raw))
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable there"
                log.debug("dial-back to %s at %s failed: %s", peer_id, multiaddr.Multiaddr(raw), exc)
                continue
            self.dial_backs_ok += 1
            return bytes(raw)
        return None

    async def _handshake(self, peer_id: ID, addr: multiaddr.Multiaddr) -> None:
        swarm = self.host.get_network()
        transport = swarm.transport_manager.transport_for_dialing(addr)
        if transport is None:
            raise OSError(f"no transport for {addr}")
        raw_conn = await transport.dial(addr)
        try:
            secured = await swarm.upgrader.upgrade_security(raw_conn, True, peer_id)
            await secured.close()
        finally:
            with trio.move_on_after(1):
                await raw_conn.close()


async def ask_dial_back(service: FreshDialAutoNAT, server: str, addrs: list[str]) -> tuple[str, str | None]:
    """Ask ``server`` to dial us at ``addrs``: ("ok", the address it reached), ("failed",
    None) when it dialed and could not reach us, ("refused", None) when it did not dial
    (none of ``addrs`` is at the IP it sees us at, a relayed connection, its own error)."""
    status, addr = await service.query_server(
        ID.from_base58(server), [multiaddr.Multiaddr(a).to_bytes() for a in addrs], timeout=QUERY_TIMEOUT)
    if status == int(Message.OK):
        return "ok", str(multiaddr.Multiaddr(addr)) if addr else None
    if status == int(Message.E_DIAL_ERROR):
        return "failed", None
    return "refused", None


async def observations(host: Any) -> tuple[list[str], dict[str, str]]:
    """What identify told ``host`` about our addresses (each observation counts, not only
    those four peers agree on), and the IPv4 each connected peer is at as we see it."""
    manager = getattr(host, "_observed_addr_manager", None)  # py-libp2p 0.8.1
    observed = [str(a) for a in manager.addrs(min_observers=1)] if manager is not None else []
    seen_at: dict[str, str] = {}
    for peer, conns in host.get_network().get_connections_map().items():
        for conn in conns:
            for addr in conn.get_transport_addresses():
                if "/ip4/" in str(addr):
                    seen_at[peer.to_base58()] = addr.value_for_protocol("ip4")
    return observed, seen_at
