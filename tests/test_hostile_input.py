"""A real daemon fed garbage on both of its open ports stays up and keeps its log short.

Hundreds of malformed HTTP requests, bad headers and random bytes go to the exchange port;
random bytes, garbage frames on our protocol (from a Noise-authenticated libp2p peer) and
garbage yamux frames go to the libp2p port. Each bad input is counted by reason in /metrics;
the log holds no traceback and at most a few WARNING lines per source and minute.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from swarmtools import NO_GOSSIP, make_test_peer

from peerfed.core.framing import encode_frame
from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.net.p2p import peers_protocol

NETWORK = "hostile-test"
# exchange.tls = false: the garbage must reach the HTTP layer (with TLS it stops at the handshake,
# test_admission.py)
NODE = {"train.init": "local", "train.threads": 1, "train.task": "digits-lr", "exchange.interval": NO_GOSSIP,
        "exchange.tls": False}


def http_garbage(rng: random.Random) -> Iterator[bytes]:
    """Requests aiohttp cannot parse, requests our handlers refuse, and random bytes."""
    fixed = [
        b"GARBAGE\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100),  # a TLS hello
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"POST /v1/exchange HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nX-Peerfed-Manifest: !!!!\r\nContent-Length: 10\r\n\r\n0123456789",
        b"POST /v1/exchange HTTP/1.1\r\nX-Peerfed-Manifest: AAAA\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
        b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Peerfed-Request: AAAA\r\n\r\n",
        b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Peerfed-Request: " + b"QUFB" * 3000 + b"\r\n\r\n",
        b"GET /%%%% HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\n\x00\x01: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ]
    yield from fixed * 8
    base = b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123456789"
    for _ in range(100):
        mutated = bytearray(base)
        for _ in range(rng.randint(1, 5)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        yield bytes(mutated)
    for _ in range(100):
        yield rng.randbytes(rng.randint(1, 300)) + b"\r\n\r\n"


def send_raw(port: int, data: bytes, wait: float = 1.0) -> None:
    """Send ``data``, say we are done, read until the server closes (or ``wait`` passes)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(wait)
            while sock.recv(65536):
                pass
    except OSError:
        pass  # reset or timed out: the server may hang up on garbage at once


def libp2p_garbage(addr: str, rng: random.Random) -> None:
    """As a Noise-authenticated peer: garbage frames on our protocol, then garbage yamux frames."""

    async def ignore(stream: object) -> None:  # answer the daemon's own peer exchange: no ForeignPeer
        await stream.reset()  # type: ignore[attr-defined]

    async def main() -> None:
        _, host = make_test_peer()
        host.set_stream_handler(peers_protocol(NETWORK), ignore)
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
            with trio.move_on_after(30):
                await host.connect(info)
                for i in range(40):
                    payload = rng.randbytes(rng.randint(1, 400))
                    try:
                        stream = await host.new_stream(info.peer_id, [peers_protocol(NETWORK)])
                        await stream.write(encode_frame(payload) if i % 2 else payload)
                        if i % 2 == 0:
                            await stream.close()  # half a frame, then EOF
                        with trio.move_on_after(2):
                            await stream.read(100)
                    except Exception:  # noqa: BLE001 - the daemon resets streams it refuses
                        pass
                conn = host.get_network().get_connections(info.peer_id)[0]
                await conn.muxed_conn.secured_conn.write(rng.randbytes(300))  # not yamux at all
                await trio.sleep(1)

    trio.run(main)


def metric(node: LocalNode, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", text, re.M) if labels else \
        re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_garbage_on_both_ports_is_counted_and_logged_in_a_few_lines(tmp_path: Path) -> None:
    rng = random.Random(12)
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        node = swarm.add_node(settings=NODE)
        swarm.start_all()
        started = time.monotonic()
        sent = 0
        for data in http_garbage(rng):
            send_raw(node.exchange_port, data)
            sent += 1
        for _ in range(100):
            send_raw(node.p2p_port, os.urandom(rng.randint(1, 300)), wait=0.3)
        send_raw(node.p2p_port, b"\x13/multistream/1.0.0\n\x07/noise\n" + os.urandom(300))
        libp2p_garbage(node.p2p_addr, rng)
        minutes = (time.monotonic() - started) / 60.0
        time.sleep(1.0)

        assert node.is_up(), node.log_tail()
        bad_http = metric(node, "peerfed_rejected_messages_total", reason="bad_http")
        malformed = metric(node, "peerfed_rejected_messages_total", reason="malformed")
        status = node.get("/status")
        assert node.stop() == 0, node.log_tail()
        log = node.log_path.read_text(errors="replace")

    print(f"{sent} HTTP inputs in {minutes:.1f} min: bad_http {bad_http:.0f}, malformed peer lists {malformed:.0f}, "
          f"inbound p2p errors {status['membership']['host']['inbound_errors']}; log {len(log)} bytes")
    assert "Traceback" not in log and " ERROR " not in log, log
    assert bad_http >= 150, f"only {bad_http} malformed HTTP requests counted of {sent}"
    assert malformed >= 5 and status["membership"]["host"]["inbound_errors"] >= 10, status
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    # one line per source (the HTTP client's address; the libp2p peer) and kind of complaint a minute
    assert len(warnings) <= 4 * (1 + int(minutes)), "\n".join(warnings)
    assert len(log.splitlines()) < 40, log
