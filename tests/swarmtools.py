"""Helpers for tests that start real daemons and talk to them as a libp2p peer."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiaddr
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from peerfed.localswarm import LocalNode, LocalSwarm

NO_TRAINING = {"train.enabled": False}


def make_swarm(tmp_path: Path, n: int, **kwargs: Any) -> LocalSwarm:
    swarm = LocalSwarm(tmp_path)
    for _ in range(n):
        swarm.add_node(settings=kwargs.get("settings", NO_TRAINING))
    return swarm


def make_test_peer(*, plaintext: bool = False) -> tuple[Any, Any]:
    """A py-libp2p host for the test to act as a peer (Noise, or plaintext only)."""
    key_pair = create_new_key_pair()
    if plaintext:
        sec = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    else:
        sec = {NOISE_ID: Noise(key_pair, noise_privkey=new_x25519_key_pair().private_key)}
    host = new_host(key_pair=key_pair, sec_opt=sec, muxer_opt={YAMUX_ID: Yamux},
                    connection_config=ConnectionConfig(max_connections=1_000_000, max_connections_per_peer=1),
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    return key_pair, host


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def listed(node: LocalNode) -> set[str]:
    """Every PeerID a node lists in /peers, in any state."""
    return {p["peer_id"] for p in node.get("/peers")}
