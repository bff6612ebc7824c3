"""Peers that are not ours: identify tells them we are peerfed, a libp2p program that does not
speak our protocol costs one log line (not py-libp2p's 7-line ERROR block), and a bootstrap peer
on another network is not redialed every few seconds."""

from __future__ import annotations

import time
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.identity.identify.identify import ID as IDENTIFY_ID
from libp2p.identity.identify.identify import parse_identify_response
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr

from peerfed import __version__
from peerfed.localswarm import LocalSwarm

from swarmtools import NO_TRAINING, make_swarm, make_test_peer

REFUSAL = "does not speak /peerfed/"


def identify_and_linger(addr: str, linger: float) -> str:
    """Connect as a plain libp2p host (no peerfed protocol), read the daemon's identify, stay
    connected for `linger` seconds; return the agent version it announced."""
    found: dict[str, str] = {}

    async def main() -> None:
        _, host = make_test_peer()
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            with trio.fail_after(10):
                stream = await host.new_stream(info.peer_id, [IDENTIFY_ID])
                data = b""
                try:
                    while chunk := await stream.read(65536):
                        data += chunk
                except StreamEOF:  # py-libp2p ends a read at the peer's close with this
                    pass
            found["agent"] = parse_identify_response(data).agent_version
            await trio.sleep(linger)

    trio.run(main)
    return found["agent"]


def test_identify_says_peerfed_and_a_foreign_libp2p_peer_costs_one_line(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 1) as swarm:
        swarm.start_all()
        node = swarm.nodes[0]
        assert identify_and_linger(node.p2p_addr, linger=2.0) == f"peerfed/{__version__}"
        time.sleep(0.5)
        log = node.log_path.read_text()
        refusals = [line for line in log.splitlines() if REFUSAL in line]
        assert len(refusals) == 1, log
        assert "ERROR" not in log and "Failed to open stream" not in log, log
        assert node.is_up()


@pytest.mark.slow
def test_a_bootstrap_peer_on_another_network_is_one_warning_then_backed_off(tmp_path: Path) -> None:
    swarm = LocalSwarm(tmp_path)
    with swarm:
        ours = swarm.add_node(settings=NO_TRAINING)
        theirs = swarm.add_node(settings=NO_TRAINING, network="elsewhere")  # bootstraps to `ours`
        swarm.start_all()
        time.sleep(30)  # before: a 7-line ERROR block every ~12 s on both sides
        log = theirs.log_path.read_text()
        refusals = [line for line in log.splitlines() if REFUSAL in line]
        warnings = [line for line in refusals if " WARNING " in line]
        assert len(warnings) == 1 and ours.peer_id in warnings[0], log
        assert 1 <= len(refusals) <= 2, log  # the first retry comes after 8-16 s, the next minutes later
        for node in (ours, theirs):
            text = node.log_path.read_text()
            assert "ERROR" not in text and "Failed to open stream" not in text, text
        assert ours.peer_id not in {p["peer_id"] for p in theirs.get("/peers") if p["state"] == "connected"}
