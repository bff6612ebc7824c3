"""The libp2p host: identity, secure connections, and our small request/response streams.

Owner: the trio thread (net/bridge.py) owns the libp2p host and the counters. Public methods
are asyncio coroutines that cross the bridge; the ``_trio_*`` methods run in trio, which
publishes a new frozen ``HostStats`` after each change for ``statistics()`` to return.
Decisions (whom to dial, what to answer) are not made here: inbound requests are handed to
an asyncio callback, outbound ones are asked for by the membership service.

py-libp2p 0.8.1 workarounds (design.md section 5):
- Noise is the only security transport and yamux the only muxer: a default host would also
  accept plaintext and secio peers.
- ``max_connections`` is huge because each inbound connection's limiter slot is never
  released; ``max_connections_per_peer=1`` also avoids a fixed 250 ms dial delay.
  Our own limit on connected peers is applied in ``_on_connected``.
- A stream whose reader pauses over 5 s is reset, so inbound requests are read at once.
- Its negative dial cache would override our own backoff: cleared before a dial; its
  auto-connector is stopped; its peerstore addresses too (connect() would dial them all).
- identify announces ``peerfed/<version>``; a peer that refuses our protocol raises ForeignPeer.
- What a remote sends can make py-libp2p log (bad handshakes, bad yamux frames): one line
  each, at WARNING at most, once a minute per place (net/libp2p_logs.py, net/quiet.py).
NAT traversal (AutoNAT, relay, hole punching, exchange tunnels) is net/relay.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INotifee
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.identity.identify import identify as libp2p_identify
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from peerfed import __version__
from peerfed.core.framing import FrameDecoder, encode_frame
from peerfed.errors import AddressInUseError
from peerfed.net.addrs import check_listen_addrs, expand_unspecified
from peerfed.net.autonat import ask_dial_back, observations

# re-exported: daemon.py imports it from here
from peerfed.net.bridge import Bridge
from peerfed.net.libp2p_logs import adopt_libp2p_logger, error_chain
from peerfed.net.quiet import QuietLog, describe
from peerfed.net.relay import NatTraversal, RelayService

log = logging.getLogger("peerfed.p2p")
quiet = QuietLog(log)  # lines about what a peer sent: once a minute per peer


adopt_libp2p_logger()
# Peers see this program in identify, not the library that carries it.
libp2p_identify.AGENT_VERSION = f"peerfed/{__version__}"

# Called from trio for an inbound request: (remote PeerID, request bytes) -> reply bytes;
# raises PermissionError for a request it refused and has logged itself.
RequestHandler = Callable[[str, bytes], Awaitable[bytes]]

REQUEST_TIMEOUT = 10.0
ADDRS_TTL = 10.0  # seconds our address list is reused (P2PHost.addrs)
MAX_REQUEST_BYTES = 1 << 20


@dataclass
class _OwnAddrs:
    """Where we listen, what we announce instead, and the last list of our full addresses."""

    listen: list[multiaddr.Multiaddr]
    announce: list[multiaddr.Multiaddr]
    cached: tuple[float, list[str]] | None = None  # (monotonic time, addrs())
    relay: RelayService = field(default_factory=RelayService)  # and the host's NAT traversal settings
    network: str = ""


class DialError(Exception):
    """A dial failed; the message says why in one line."""


class ForeignPeer(Exception):
    """The peer refused our protocol: a node of another network, or another libp2p program."""


def peers_protocol(network: str) -> str:
    return f"/peerfed/{network}/peers/1.0.0"


class _Notifee(INotifee):
    def __init__(self, owner: P2PHost) -> None:
        self._owner = owner

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: INetConn) -> None:
        await self._owner._on_connected(conn)

    async def disconnected(self, network: Any, conn: INetConn) -> None:
        self._owner._on_disconnected(conn)

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


@dataclass(frozen=True, slots=True)
class HostStats:
    dials_ok: int = 0
    dials_failed: int = 0
    requests_in: int = 0
    requests_out: int = 0
    inbound_refused_full: int = 0
    inbound_errors: int = 0
    libp2p_connected: int = 0  # open libp2p connections, ours or not yet verified


class P2PHost:
    def __init__(
        self,
        key_pair: KeyPair,
        *,
        network: str,
        listen: Sequence[str],
        announce: Sequence[str] = (),
        bridge: Bridge,
        on_request: RequestHandler,
        on_connection_change: Callable[[str, bool], None],
        max_connected: int = 64,
        relay: RelayService | None = None,
    ) -> None:
        self.peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
        self._key_pair = key_pair
        self._protocol = peers_protocol(network)
        self._addrs = _OwnAddrs([multiaddr.Multiaddr(a) for a in listen], [multiaddr.Multiaddr(a) for a in announce],
                                relay=relay or RelayService(), network=network)
        self._bridge = bridge
        self._on_request = on_request
        self._on_connection_change = on_connection_change
        self._max_connected = max_connected
        self._host: Any = None
        self._nat: NatTraversal | None = None  # AutoNAT, relay, hole punching, exchange tunnels
        self._stop: trio.Event | None = None
        self._stats = HostStats()  # published by the trio side: replaced, never changed

    # -- asyncio side ---------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Listen and return our full addresses (each ending in /p2p/<PeerID>)."""
        check_listen_addrs([str(a) for a in self._addrs.listen])
        return await self._bridge.run_trio(self._trio_start)

    async def stop(self) -> None:
        if self._stop is not None and self._bridge.running:
            await self._bridge.run_trio(self._trio_stop)

    async def dial(self, addr: str) -> str:
        """Connect to ``addr`` (ending in /p2p/<PeerID>); return the verified PeerID."""
        return await self._bridge.run_trio(self._trio_dial, addr)

    async def request(self, peer_id: str, payload: bytes) -> bytes:
        """Send one framed request on our protocol and return the framed reply."""
        return await self._bridge.run_trio(self._trio_request, peer_id, payload)

    async def ping(self, peer_id: str) -> float:
        """Round-trip time in milliseconds (raises on failure)."""
        return await self._bridge.run_trio(self._trio_ping, peer_id)

    async def disconnect(self, peer_id: str) -> None:
        await self._bridge.run_trio(self._trio_disconnect, peer_id)

    async def dial_back(self, server: str, addrs: Sequence[str]) -> tuple[str, str | None]:
        """AutoNAT: ask the connected peer ``server`` to dial us at ``addrs`` on a fresh
        connection: ("ok" | "failed" | "refused", the address it reached)."""
        assert self._nat is not None
        return await self._bridge.run_trio(ask_dial_back, self._nat.autonat, server, list(addrs))

    async def reserve_relay(self, relay: str) -> bool:
        """Ask the connected peer ``relay`` for a circuit relay slot (False: none given)."""
        assert self._nat is not None
        return await self._bridge.run_trio(self._nat.reserve, relay)

    async def exchange_tunnel(self, peer_id: str, open_it: bool = True) -> tuple[str, str]:
        """(local URL of an exchange tunnel to ``peer_id``, "direct" | "relayed"): net/tunnel.py."""
        assert self._nat is not None
        return await self._bridge.run_trio(self._nat.tunnel_url, peer_id, open_it)

    async def set_tunnel_target(self, port: int | None) -> None:
        await self._bridge.run_trio(self._nat.set_tunnel_target, port)  # type: ignore[union-attr]

    async def observations(self) -> tuple[list[str], dict[str, str]]:
        """(addresses peers saw our connections come from, PeerID -> IP we see each peer at)."""
        return await self._bridge.run_trio(observations, self._host)

    def transport_addrs(self, announced: bool = False) -> list[str]:
        """Our listen addresses without /p2p/ (0.0.0.0 expanded); with ``announced``, the
        announce addresses instead when the config has some."""
        if announced and self._addrs.announce:
            return [str(a) for a in self._addrs.announce]
        return expand_unspecified([str(a) for a in self._host.get_transport_addrs()]) if self._host else []

    def addrs(self) -> list[str]:
        """Our dialable addresses (announce ones if configured), each ending in /p2p/<PeerID>.

        Reused for ADDRS_TTL seconds: building them parses multiaddrs and lists interfaces, and
        the status views ask every few seconds (a sixth of an idle relay's CPU when uncached)."""
        if self._host is None:
            return []
        now = time.monotonic()
        if self._addrs.cached is None or now - self._addrs.cached[0] > ADDRS_TTL:
            self._addrs.cached = (now, expand_unspecified([str(a) for a in self._host.get_addrs()]))
        return list(self._addrs.cached[1])

    def statistics(self) -> HostStats:
        return self._stats

    def _count(self, counter: str) -> None:  # in trio
        self._stats = replace(self._stats, **{counter: getattr(self._stats, counter) + 1})

    def _count_connections(self) -> None:  # in trio
        connected = len(self._host.get_connected_peers()) if self._host is not None else 0
        self._stats = replace(self._stats, libp2p_connected=connected)

    # -- trio side ------------------------------------------------------------------------

    def _new_host(self) -> Any:
        noise = NoiseTransport(self._key_pair, noise_privkey=new_x25519_key_pair().private_key)
        return new_host(
            key_pair=self._key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            connection_config=ConnectionConfig(max_connections=1_000_000, max_connections_per_peer=1),
            listen_addrs=self._addrs.listen,
            announce_addrs=self._addrs.announce or None,
        )

    async def _trio_start(self) -> list[str]:
        nursery = self._bridge.nursery
        return await nursery.start(self._trio_serve)

    async def _trio_serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._host = self._new_host()
        self._host.set_stream_handler(self._protocol, self._trio_handle_stream)
        self._nat = NatTraversal(self._host, network=self._addrs.network, relay=self._addrs.relay)
        self._host.get_network().register_notifee(_Notifee(self))
        self._stop = trio.Event()
        async with self._host.run(listen_addrs=self._addrs.listen):
            # Its auto-connector redials anything in the peerstore (strangers we closed
            # included) towards 150 connections; whom we dial is membership's decision.
            await self._host.get_network().auto_connector.stop()
            if not self._host.get_transport_addrs():
                raise AddressInUseError("p2p.listen: could not listen on " + ", ".join(map(str, self._addrs.listen)))
            async with self._nat.services():
                task_status.started(self.addrs())
                await self._stop.wait()

    async def _trio_stop(self) -> None:
        assert self._stop is not None
        with trio.move_on_after(3):
            for peer in list(self._host.get_connected_peers()):
                await self._host.disconnect(peer)
        self._stop.set()

    async def _trio_dial(self, addr: str) -> str:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:  # noqa: BLE001
            raise DialError(f"bad address {addr}: {exc}") from exc
        self._host.get_network().unblock_peer(info.peer_id)
        if "/p2p-circuit/" in addr:  # through a relay (net/relay.py), which DCUtR then upgrades
            return await self._trio_dial_circuit(addr, info.peer_id.to_base58())
        # connect() dials every address the peerstore holds for the peer, in its order (a
        # dead LAN address first can eat the whole timeout): ours is the one to try now.
        self._host.get_peerstore().clear_addrs(info.peer_id)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await self._host.connect(info)
        except Exception as exc:  # noqa: BLE001 - libp2p raises many types; all mean "failed"
            self._count("dials_failed")
            # A Noise handshake that fails on a reachable port usually means another PeerID
            # answered there than the one the address names: Noise refuses it.
            raise DialError(f"could not connect to {addr}: {error_chain(exc)}") from exc
        self._count("dials_ok")
        return info.peer_id.to_base58()

    async def _trio_dial_circuit(self, addr: str, peer_id: str) -> str:
        assert self._nat is not None
        try:
            await self._nat.dial_circuit(addr)
        except Exception as exc:  # noqa: BLE001 - relay refused, no reservation, timed out
            self._count("dials_failed")
            raise DialError(f"could not connect to {addr}: {error_chain(exc)}") from exc
        self._count("dials_ok")
        return peer_id

    async def _trio_request(self, peer_id: str, payload: bytes) -> bytes:
        self._count("requests_out")
        with trio.fail_after(REQUEST_TIMEOUT):
            try:
                stream = await self._host.new_stream(ID.from_base58(peer_id), [self._protocol])
            except StreamFailure as exc:
                if "not supported" in str(exc.__cause__ or ""):
                    raise ForeignPeer(f"peer {peer_id} does not speak {self._protocol}: a node of another "
                                      f"network, or not a peerfed node") from exc
                raise
            try:
                await stream.write(encode_frame(payload))
                return await _read_frame(stream, MAX_REQUEST_BYTES)
            finally:
                with trio.move_on_after(1):
                    await stream.close()

    async def _trio_handle_stream(self, stream: Any) -> None:
        remote = stream.muxed_conn.peer_id.to_base58()
        self._count("requests_in")
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await _read_frame(stream, MAX_REQUEST_BYTES)
                reply = await self._bridge.run_asyncio(self._on_request, remote, request)
                await stream.write(encode_frame(reply))
        except Exception as exc:  # noqa: BLE001 - a bad peer must not take the host down
            self._count("inbound_errors")
            if isinstance(exc, PermissionError):  # refused by on_request, which said why
                log.debug("request from %s refused: %s", remote, exc)
            else:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else describe(exc)
                quiet.warning(f"peer {remote}", "request from %s failed: %s", remote, reason)
            with trio.move_on_after(1):
                await stream.reset()
            return
        with trio.move_on_after(1):
            await stream.close()

    async def _trio_ping(self, peer_id: str) -> float:
        started = time.monotonic()
        with trio.fail_after(REQUEST_TIMEOUT):
            stream = await self._host.new_stream(ID.from_base58(peer_id), [PING_PROTOCOL])
            try:
                await perform_ping_roundtrip(stream)
            finally:
                with trio.move_on_after(1):
                    await stream.close()
        return (time.monotonic() - started) * 1000.0

    async def _trio_disconnect(self, peer_id: str) -> None:
        with trio.move_on_after(3):
            await self._host.disconnect(ID.from_base58(peer_id))

    async def _on_connected(self, conn: INetConn) -> None:
        peer_id = conn.muxed_conn.peer_id
        self._count_connections()
        if len(self._host.get_connected_peers()) > self._max_connected + 8:
            # Slack above max_connections lets newcomers introduce themselves before pruning.
            self._count("inbound_refused_full")
            log.info("too many connections (%d); closing the one from %s",
                     len(self._host.get_connected_peers()), peer_id)
            with trio.move_on_after(2):
                await conn.close()
            return
        self._bridge.call_asyncio_soon(self._on_connection_change, peer_id.to_base58(), True)

    def _on_disconnected(self, conn: INetConn) -> None:
        self._count_connections()
        self._bridge.nursery.start_soon(self._trio_tell_if_gone, conn.muxed_conn.peer_id)

    async def _trio_tell_if_gone(self, peer_id: ID) -> None:
        # A relayed connection closes while DCUtR's direct one takes over: look a moment later.
        await trio.sleep(1.0)
        if self._host is not None and self._host.get_network().get_connections(peer_id):
            return  # another connection to the same peer is still open
        self._bridge.call_asyncio_soon(self._on_connection_change, peer_id.to_base58(), False)


async def _read_frame(stream: Any, max_frame: int) -> bytes:
    decoder = FrameDecoder(max_frame)
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            raise EOFError("stream closed before a whole frame arrived")
        frames = decoder.feed(chunk)
        if frames:
            return frames[0]
