"""The HTTP exchange over a libp2p stream, for peers whose exchange URL we cannot reach.

A rig behind a NAT advertises an exchange URL at its LAN address; a peer elsewhere cannot
open it, but may hold a libp2p connection to the rig (hole-punched, or relayed within the
relay's caps). For such a peer we listen on ``127.0.0.1:<port>`` and carry every TCP
connection made there over a new stream ``/peerfed/<network>/exchange-tunnel/1.0.0`` to the
rig, whose handler connects it to its own exchange server on 127.0.0.1. The exchange itself
(manifests, digests, value checks, refusals, both directions at once) is the unchanged HTTP
one: it runs against ``http://127.0.0.1:<port>`` and counts as a normal exchange.

Bytes are pumped as they come (py-libp2p resets a stream whose reader pauses over 5 s).

Owner: the trio thread (the host's).
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

log = logging.getLogger("peerfed.tunnel")

CHUNK = 1 << 16


def tunnel_protocol(network: str) -> str:
    return f"/peerfed/{network}/exchange-tunnel/1.0.0"


class Tunnels:
    def __init__(self, host: Any, network: str) -> None:
        self._host = host
        self._protocol = tunnel_protocol(network)
        self.target_port: int | None = None          # our exchange server, for inbound tunnels
        self._open: dict[str, tuple[int, trio.CancelScope]] = {}   # peer -> (local port, its listener)
        self._nursery: trio.Nursery | None = None
        self.carried = 0                               # connections carried, both ways

    def serve(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._host.set_stream_handler(self._protocol, self._inbound)

    def ports(self) -> dict[str, int]:
        return {peer: port for peer, (port, _) in self._open.items()}

    async def open(self, peer_id: str) -> int:
        """A local port whose connections reach ``peer_id``'s exchange server."""
        if peer_id in self._open:
            return self._open[peer_id][0]
        assert self._nursery is not None
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        scope = trio.CancelScope()
        self._open[peer_id] = (port, scope)
        self._nursery.start_soon(self._accept, peer_id, listeners, scope)
        return port

    def close(self, peer_id: str) -> None:
        entry = self._open.pop(peer_id, None)
        if entry is not None:
            entry[1].cancel()

    async def _accept(self, peer_id: str, listeners: list[trio.SocketListener], scope: trio.CancelScope) -> None:
        async def outbound(tcp: trio.SocketStream) -> None:
            try:
                stream = await self._host.new_stream(ID.from_base58(peer_id), [self._protocol])
            except Exception as exc:  # noqa: BLE001 - the peer went away: the exchange sees a reset
                log.debug("tunnel to %s: no stream: %s", peer_id, exc)
                await tcp.aclose()
                return
            await self._pump(stream, tcp)

        with scope:
            try:
                await trio.serve_listeners(outbound, listeners)
            finally:
                for listener in listeners:
                    await listener.aclose()

    async def _inbound(self, stream: Any) -> None:
        if self.target_port is None:
            await stream.reset()
            return
        try:
            tcp = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await stream.reset()
            return
        await self._pump(stream, tcp)

    async def _pump(self, stream: Any, tcp: trio.SocketStream) -> None:
        self.carried += 1

        async def to_tcp() -> None:
            try:
                while data := await stream.read(CHUNK):
                    await tcp.send_all(data)
            except StreamEOF:
                pass  # the peer closed its half
            await tcp.send_eof()

        async def to_stream() -> None:
            while data := await tcp.receive_some(CHUNK):
                await stream.write(data)
            await stream.close()  # our half: the peer still sends its answer

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(to_tcp)
                nursery.start_soon(to_stream)
        except Exception as exc:  # noqa: BLE001 - a reset or a closed socket ends the tunnel
            log.debug("tunnel ended: %s", exc)
            with trio.move_on_after(1):
                await stream.reset()
        finally:
            await tcp.aclose()
