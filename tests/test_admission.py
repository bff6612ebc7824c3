"""Admission, bans and TLS on a real daemon (issue 12, items 1 and 4).

The node runs with its defaults (TLS on, admission on) and a short ban. The test process
plays two peers: a stranger with a fresh key that knows the network name (everything an
attacker needed before), and an insider, the key of a real relay daemon connected to the
node over libp2p (swarmtools.add_insider), which the node admits like any peer.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from swarmtools import NO_GOSSIP, add_insider, wait_until
from test_swarm_exchange import UNPINNED, EvilPeer, api_post, b64, digits_init

from peerfed.core.peerid import Signer
from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.net.transfer import MANIFEST_HEADER, REQUEST_HEADER

NETWORK = "exch-test"  # test_swarm_exchange's EvilPeer signs for it
BAN_S = 4.0
NODE = {"train.init": "local", "train.threads": 1, "exchange.interval": NO_GOSSIP,
        "train.eval_interval": 1.0, "admission.ban_duration": BAN_S}


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[LocalNode, EvilPeer]]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="peerfed-admission-") as tmp, \
            LocalSwarm(Path(tmp), network=NETWORK) as swarm:
        node = swarm.add_node(settings=NODE)
        node.start()
        node.wait_up(timeout=120)
        insider = EvilPeer(add_insider(swarm, node))
        yield node, insider
        assert node.process is not None and node.process.poll() is None, node.log_tail()


def metric(node: LocalNode, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + wanted + '}') if wanted else ''} (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def https_post(node: LocalNode, header: str, body: bytes) -> tuple[int, bytes]:
    """POST /v1/exchange over TLS (no 100-continue: the whole body goes at once)."""
    conn = http.client.HTTPSConnection("127.0.0.1", node.exchange_port, context=UNPINNED, timeout=30)
    try:
        conn.request("POST", "/v1/exchange", body=body, headers={MANIFEST_HEADER: header})
        response = conn.getresponse()
        try:
            return response.status, response.read()
        except (http.client.IncompleteRead, ConnectionError) as exc:
            return response.status, getattr(exc, "partial", b"")
    finally:
        conn.close()


def https_get_model(node: LocalNode, peer: EvilPeer) -> tuple[int, bytes]:
    request = urllib.request.Request(f"https://127.0.0.1:{node.exchange_port}/v1/model",
                                     headers={REQUEST_HEADER: b64(peer.model_request(node))})
    try:
        with urllib.request.urlopen(request, timeout=30, context=UNPINNED) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_an_unknown_keys_push_and_model_request_are_refused_as_not_a_peer(
        guarded: tuple[LocalNode, EvilPeer]) -> None:
    node, insider = guarded
    stranger = EvilPeer(Signer.generate())
    before = metric(node, "peerfed_rejected_messages_total", reason="not_a_peer")
    body = digits_init(3).tobytes()
    pushed = stranger.push_manifest(node, body, sample_weight=1.0)  # validly signed, right model
    status, answer = https_post(node, b64(pushed), stranger.wire(node, pushed, body))
    assert status == 401 and b"not a connected peer" in answer, (status, answer)
    status, answer = https_get_model(node, stranger)
    assert status == 401 and b"not a connected peer" in answer, (status, answer)
    assert metric(node, "peerfed_rejected_messages_total", reason="not_a_peer") == before + 2
    # the control: the same request signed by a connected peer gets the weights
    status, weights = https_get_model(node, insider)
    assert status == 200 and len(weights) > body.__len__()
    assert node.get("/status")["admission"]["admitted"] >= 1


def test_a_plaintext_client_cannot_read_weights(guarded: tuple[LocalNode, EvilPeer]) -> None:
    node, insider = guarded
    header = b64(insider.model_request(node))  # admitted key, valid request: only the transport is wrong
    with socket.create_connection(("127.0.0.1", node.exchange_port), timeout=10) as sock:
        sock.sendall(f"GET /v1/model HTTP/1.1\r\nHost: x\r\n{REQUEST_HEADER}: {header}\r\n\r\n".encode())
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionError, TimeoutError):
            pass
    assert b"HTTP/1.1" not in received and len(received) < 1024, received[:200]
    # TLS 1.2 is refused too; 1.3 works, and its certificate is the one our record announces
    old = ssl._create_unverified_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)), \
            socket.create_connection(("127.0.0.1", node.exchange_port), timeout=10) as sock:
        old.wrap_socket(sock).close()
    with socket.create_connection(("127.0.0.1", node.exchange_port), timeout=10) as sock, \
            UNPINNED.wrap_socket(sock) as tls:
        assert tls.version() == "TLSv1.3"
        cert = tls.getpeercert(binary_form=True)
    assert cert is not None
    status = node.get("/status")
    assert status["exchange_url"].startswith("https://")
    assert status["admission"]["tls_fingerprint"] == hashlib.sha256(cert).hexdigest()


def test_a_bad_digest_bans_the_peer_everywhere_visibly_until_the_ban_expires(
        guarded: tuple[LocalNode, EvilPeer]) -> None:
    node, insider = guarded
    body = digits_init(4).tobytes()
    pushed = insider.push_manifest(node, body, sample_weight=1.0)
    forged = body + insider.trailer(node, pushed, body, digest=bytes(32))
    https_post(node, b64(pushed), forged)  # refused once all of it is in; the ban starts then
    banned_at = time.monotonic()

    status, answer = https_get_model(node, insider)
    assert status == 403 and b"banned for digest_mismatch" in answer, (status, answer)
    bans = node.get("/status")["admission"]["bans"]
    assert [(b["peer_id"], b["reason"]) for b in bans] == [(insider.peer_id, "digest_mismatch")]
    [row] = [p for p in node.get("/peers") if p["peer_id"] == insider.peer_id]
    assert row["ban"]["reason"] == "digest_mismatch"
    wait_until(lambda: metric(node, "peerfed_peers_banned") == 1.0, 3, "the banned gauge")
    assert metric(node, "peerfed_peer_bans_total", reason="digest_mismatch") == 1.0
    cli = subprocess.run([sys.executable, "-m", "peerfed", "peers", "--home", str(node.home)],
                         capture_output=True, text=True, timeout=30, check=True)
    [line] = [line for line in cli.stdout.splitlines() if line.startswith(insider.peer_id)]
    assert "banned" in line and "digest_mismatch" in line, cli.stdout

    time.sleep(max(0.0, BAN_S + 0.5 - (time.monotonic() - banned_at)))
    status, weights = https_get_model(node, insider)
    assert status == 200, (status, weights[:200])
    assert np.isfinite(np.frombuffer(weights[:len(body)], dtype=np.float32)).all()
    assert node.get("/status")["admission"]["bans"] == []
    wait_until(lambda: metric(node, "peerfed_peers_banned") == 0.0, 3, "the banned gauge back to 0")


def test_garbage_on_the_tls_port_costs_no_traceback(guarded: tuple[LocalNode, EvilPeer]) -> None:
    node, _ = guarded
    rng = np.random.default_rng(7)
    for i in range(50):
        data = rng.integers(0, 256, int(rng.integers(1, 600)), dtype=np.uint8).tobytes()
        if i % 2:  # a TLS record header first, so the handshake parser gets further
            data = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + data
        with socket.create_connection(("127.0.0.1", node.exchange_port), timeout=5) as sock:
            try:
                sock.sendall(data)
                sock.settimeout(0.25)  # an answer or a close, if any, comes at once
                sock.recv(1024)
            except (ConnectionError, TimeoutError):
                pass
    time.sleep(0.5)
    assert node.is_up()
    log = node.log_path.read_text(errors="replace")
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.mark.slow
def test_two_daemons_exchange_over_tls_and_never_in_the_clear(tmp_path: Path) -> None:
    """Two TLS nodes exchange; a node on exchange.tls = false gets no weights pushed to it in the
    clear (it may still push to the TLS nodes: over TLS, pinned, like anyone)."""
    common = {"train.init": "local", "train.threads": 1, "exchange.interval": NO_GOSSIP, "train.eval_interval": 1.0}
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        a, b = swarm.add_node(settings=common), swarm.add_node(settings=common)
        lan = swarm.add_node(settings={**common, "exchange.tls": False})
        swarm.start_all(timeout=120)
        swarm.wait_full_view(timeout=60)
        wait_until(lambda: a.get("/status")["admission"]["admitted"] == 2
                   and b.get("/status")["admission"]["admitted"] == 2, 10, "both to admit their peers")
        answer = api_post(a, f"/exchange?peer={b.peer_id}")
        assert answer["outcome"] == "ok", (answer, a.log_tail())
        wait_until(lambda: b.get("/status")["exchanges"]["ok"] >= 1, 10, "the responder to merge")
        assert api_post(a, f"/exchange?peer={lan.peer_id}")["outcome"] == "no_such_peer"
        assert "serves its exchange without TLS" in a.log_path.read_text()
        assert lan.get("/status")["exchange_url"].startswith("http://")
        answer = api_post(lan, f"/exchange?peer={a.peer_id}")
        assert answer["outcome"] == "ok", (answer, lan.log_tail())
        assert "exchange.tls = false" in lan.log_path.read_text()  # the warning at start
