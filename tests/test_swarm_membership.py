"""Control plane acceptance: real daemons as separate processes on 127.0.0.1.

The daemons here run with training disabled (relay nodes): these tests are about finding
the swarm, keeping strangers out and surviving churn, and 8-16 trainers would only make
them slower on 2 cores. Training and exchange have their own multi-node tests.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from peerfed.core.envelope import PeerList, PeerRecord, seal
from peerfed.core.peerid import Signer
from peerfed.localswarm import set_config_values
from peerfed.net.p2p import peers_protocol
from peerfed.core.framing import FrameDecoder, encode_frame

from swarmtools import NO_TRAINING, listed, make_swarm, make_test_peer


@pytest.mark.slow
def test_eight_nodes_find_each_other_survive_node0_death_and_a_newcomer_learns_all(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 8) as swarm:
        swarm.start_all()
        took = swarm.wait_full_view(timeout=30)
        print(f"8 nodes full view in {took:.1f} s")

        swarm.nodes[0].kill()
        survivors = swarm.nodes[1:]
        # They must keep each other (no split when the bootstrap dies) ...
        time.sleep(3)
        swarm.wait_full_view(survivors, timeout=5)

        # ... and a newcomer bootstrapped to node 3 learns every live node.
        newcomer = swarm.add_node(bootstrap=[swarm.nodes[3].p2p_addr], settings=NO_TRAINING)
        newcomer.start()
        newcomer.wait_up()
        swarm.wait_full_view([*survivors, newcomer], timeout=30)
        assert swarm.nodes[0].peer_id not in newcomer.connected_peers()


@pytest.mark.slow
def test_restarted_node_rejoins_from_its_saved_peer_table(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 3) as swarm:
        swarm.start_all()
        swarm.wait_full_view(timeout=30)
        node = swarm.nodes[2]
        assert node.stop() == 0, node.log_tail()
        assert (node.home / "state" / "peers.json").exists()
        set_config_values(node.config_path, {"p2p.bootstrap": []})
        node.start()
        node.wait_up()
        swarm.wait_full_view(timeout=30)


@pytest.mark.slow
def test_other_network_and_non_allowlisted_nodes_never_appear(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 2) as swarm:
        a, b = swarm.nodes
        # Node 2 is on another network; node 3 is on ours but not on the allowlist of a and b.
        stranger = swarm.add_node(network="elsewhere", settings=NO_TRAINING)
        outsider = swarm.add_node(settings=NO_TRAINING)
        allow = [a.peer_id, b.peer_id]
        for node in (a, b):
            set_config_values(node.config_path, {"p2p.allowlist": allow})
        swarm.start_all()
        swarm.wait_full_view([a, b], timeout=30)
        time.sleep(8)  # give the strangers time to try
        for node in (a, b):
            seen = listed(node)
            assert stranger.peer_id not in seen
            assert outsider.peer_id not in seen
        rejected = a.get("/status")["membership"]["rejected"]
        assert sum(rejected.values()) > 0, rejected  # the outsider's lists were refused and counted


def _exchange_peer_list(addr: str, network: str, payload_for: callable) -> bytes:
    """Connect to a daemon as a test peer and send one peer_list; return the raw reply."""
    result: dict[str, bytes] = {}

    async def main() -> None:
        _, host = make_test_peer()

        async def speaks_our_protocol(stream) -> None:  # type: ignore[no-untyped-def]
            await stream.close()  # a peer that refused it would be dropped as a foreign peer

        host.set_stream_handler(peers_protocol(network), speaks_our_protocol)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [peers_protocol(network)])
            await stream.write(encode_frame(payload_for(host, info.peer_id.to_base58())))
            decoder = FrameDecoder(1 << 20)
            frames: list[bytes] = []
            with trio.fail_after(10):
                while not frames:
                    chunk = await stream.read(65536)
                    if not chunk:
                        break
                    frames = decoder.feed(chunk)
            result["reply"] = frames[0] if frames else b""

    trio.run(main)
    return result["reply"]


def _signer_of(host) -> Signer:  # type: ignore[no-untyped-def]
    return Signer(host.get_private_key().to_bytes())


@pytest.mark.slow
def test_forged_peer_record_is_rejected_and_counted(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 1) as swarm:
        swarm.start_all()
        node = swarm.nodes[0]
        victim = Signer.generate()   # the record claims to be from this peer ...
        forger = Signer.generate()   # ... but is signed by another key

        def forged_list(host, daemon_id: str) -> bytes:  # type: ignore[no-untyped-def]
            me = _signer_of(host)
            honest = seal(me, network=swarm.network, now=time.time(),
                          body=PeerRecord(addrs=(f"/ip4/127.0.0.1/tcp/9/p2p/{me.peer_id}",)))
            record = (seal(forger, network=swarm.network, now=time.time(),
                                    body=PeerRecord(addrs=(f"/ip4/127.0.0.1/tcp/9/p2p/{forger.peer_id}",))))
            # Put the victim's PeerID in place of the forger's (sender and address): same
            # length, well formed, but the signature is no longer the victim's.
            forged = bytes(record).replace(forger.peer_id.encode(), victim.peer_id.encode())
            return seal(me, network=swarm.network, recipient=daemon_id, now=time.time(),
                        body=PeerList(records=(honest, forged)))

        reply = _exchange_peer_list(node.p2p_addr, swarm.network, forged_list)
        assert reply, "an honest peer list with one forged record still gets an answer"
        rejected = node.get("/status")["membership"]["rejected"]
        assert rejected.get("record_bad_signature", 0) >= 1, rejected
        assert victim.peer_id not in listed(node)


def test_plaintext_only_peer_cannot_connect(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 1) as swarm:
        swarm.start_all()
        node = swarm.nodes[0]
        outcome: dict[str, object] = {}

        async def main() -> None:
            _, host = make_test_peer(plaintext=True)
            async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    with trio.fail_after(10):
                        await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.p2p_addr)))
                    outcome["connected"] = bool(host.get_connected_peers())
                except Exception as exc:  # noqa: BLE001 - any failure to connect is the point
                    outcome["error"] = exc

        trio.run(main)
        assert "error" in outcome or outcome.get("connected") is False, outcome
        assert node.is_up()


@pytest.mark.slow
def test_daemon_still_accepts_connections_after_300_connect_disconnect_cycles(tmp_path: Path) -> None:
    """py-libp2p 0.8.1 never frees an inbound connection's limiter slot and refuses all after 250
    (design.md section 5): 300 cycles go past that, and a fresh peer still connects."""
    with make_swarm(tmp_path, 1) as swarm:
        swarm.start_all()
        node = swarm.nodes[0]
        info = info_from_p2p_addr(multiaddr.Multiaddr(node.p2p_addr))
        done = {"cycles": 0, "final": False}

        async def main() -> None:
            _, host = make_test_peer()
            async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                for _ in range(300):
                    with trio.fail_after(10):
                        await host.connect(info)
                        await host.disconnect(info.peer_id)
                    done["cycles"] += 1
            _, fresh = make_test_peer()
            async with fresh.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with trio.fail_after(10):
                    await fresh.connect(info)
                done["final"] = info.peer_id in fresh.get_connected_peers()

        trio.run(main)
        assert done == {"cycles": 300, "final": True}
        assert node.is_up()


def test_clean_stop_on_sigterm_and_sigint(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 2) as swarm:
        swarm.start_all()
        swarm.wait_full_view(timeout=30)
        for node, sig in zip(swarm.nodes, (signal.SIGTERM, signal.SIGINT)):
            started = time.monotonic()
            node.signal(sig)
            assert node.process is not None
            assert node.process.wait(10) == 0, node.log_tail()
            assert time.monotonic() - started < 10
            assert (node.home / "state" / "peers.json").exists()
