"""Slots cannot be held (issue 12) and slow peers never slow fast ones (issue 10), with real
daemons on 127.0.0.1.

- The slow-push attack: a signed push manifest, 100 Continue, then one byte every 4.5 s. The
  node cuts it within seconds (the transfer floor, net/pacing.py), merges nothing, logs why,
  refuses the same peer's retries for a while, and keeps exchanging with its honest peers at
  >= 80% of the rate it had without the attack.
- Half-sent requests: 500 connections that never finish their headers are closed within the
  header timeout, while the local API's /healthz answers within 1 s throughout.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest
from swarmtools import wait_until

from peerfed.averaging import fingerprint
from peerfed.core.envelope import seal
from peerfed.core.exchange_rules import wire_length
from peerfed.core.manifest import Manifest
from peerfed.core.peerid import Signer
from peerfed.core.rates import FLOOR_WINDOW
from peerfed.identity import load_identity, signer_of
from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.net.transfer import MANIFEST_HEADER
from peerfed.serving import ConnectionLimits
from peerfed.train.tasks import NodeContext, TrainSettings, digits_lr

NETWORK = "slow-test"
INTERVAL = 1.0
NODE = {"train.init": "local", "train.threads": 1, "train.task": "digits-lr", "train.eval_interval": 5.0,
        "exchange.interval": INTERVAL}
TRICKLE_EVERY = 4.5
TLS_CLIENT = ssl.create_default_context()
TLS_CLIENT.check_hostname, TLS_CLIENT.verify_mode = False, ssl.CERT_NONE  # an attacker pins nothing
PHASE_S = 40.0


def _digits_lr_shape() -> tuple[str, int]:
    model = digits_lr(TrainSettings(), NodeContext(0, 1, 0)).model
    return fingerprint(model), sum(p.numel() * 4 for p in model.state_dict().values() if p.is_floating_point())


FP, NBYTES = _digits_lr_shape()


def exchanges_ok(node: LocalNode) -> int:
    return int(node.get("/status")["exchanges"]["ok"])


class SlowPusher:
    """The attack of issue 12, repeated: one key, a signed push, 100 Continue, one byte every
    4.5 s; as soon as the node hangs up (or refuses), again. The key is a real peer's (a
    daemon of the swarm that never gossips itself): a connected peer that proved its PeerID
    over libp2p, so admitting only such peers does not hide the attack."""

    def __init__(self, node: LocalNode, signer: Signer) -> None:
        self.node = node
        self.signer = signer
        self.held: list[float] = []  # seconds from 100 Continue to the node hanging up
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(TRICKLE_EVERY + 10)

    def _head(self) -> bytes:
        sealed = seal(self.signer, network=NETWORK, recipient=self.node.peer_id, now=time.time(),
                      body=Manifest(fingerprint=FP, length=NBYTES, sample_weight=1000.0, purpose="push"))
        lines = ["POST /v1/exchange HTTP/1.1", f"Host: 127.0.0.1:{self.node.exchange_port}",
                 f"Content-Length: {wire_length(NBYTES)}", "Expect: 100-continue",
                 f"{MANIFEST_HEADER}: {base64.b64encode(sealed).decode()}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except OSError:
                pass
            self._stop.wait(0.2)

    def _once(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.node.exchange_port), timeout=5)
        with TLS_CLIENT.wrap_socket(raw) as sock:  # exchange.tls is on by default: speak it
            sock.sendall(self._head())
            first = sock.recv(4096)
            status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/1.1 ") else 0
            self.statuses.append(status)
            if status != 100:
                return
            continued = time.monotonic()
            sock.settimeout(0.2)
            while not self._stop.is_set():
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    self.held.append(time.monotonic() - continued)
                    return
                if self._closed_within(sock, TRICKLE_EVERY):
                    self.held.append(time.monotonic() - continued)
                    return

    def _closed_within(self, sock: socket.socket, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                if sock.recv(65536) == b"":
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False


@pytest.fixture
def trio_swarm(tmp_path: Path) -> Iterator[list[LocalNode]]:
    """The victim, two honest peers, and the attacker's daemon (it never starts an exchange)."""
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        nodes = [swarm.add_node(settings={**NODE, "train.seed": i}) for i in range(3)]
        nodes.append(swarm.add_node(settings={**NODE, "train.seed": 3, "exchange.interval": 1e9}))
        swarm.start_all(timeout=180)
        swarm.wait_full_view(timeout=60)
        yield nodes


@pytest.mark.slow
def test_a_slow_push_is_cut_within_seconds_and_the_victim_keeps_exchanging(trio_swarm: list[LocalNode]) -> None:
    victim, attacker_node = trio_swarm[0], trio_swarm[3]
    attacker_key = signer_of(load_identity(attacker_node.home / "identity.key"))
    wait_until(lambda: exchanges_ok(victim) >= 3, 60, "the victim's first exchanges")

    before = exchanges_ok(victim)
    time.sleep(PHASE_S)
    calm_rate = (exchanges_ok(victim) - before) / PHASE_S

    before = exchanges_ok(victim)
    with SlowPusher(victim, attacker_key) as attacker:
        time.sleep(PHASE_S)
    attacked_rate = (exchanges_ok(victim) - before) / PHASE_S

    log = victim.log_path.read_text(errors="replace")
    print(f"victim exchanges/s: {calm_rate:.3f} without the attack, {attacked_rate:.3f} under it "
          f"({attacked_rate / calm_rate:.2f}x); slot held {attacker.held} s; answers {attacker.statuses}")
    assert attacker.held, f"the attack never got a slot: {attacker.statuses}"
    # cut after FLOOR_WINDOW s below the floor, the unread body drained for 2 s more: seconds, not 120 s
    assert max(attacker.held) <= FLOOR_WINDOW + ConnectionLimits(1, 1.0).lingering_time + 1.5, attacker.held
    assert 429 in attacker.statuses  # the immediate retry was refused (slow_peer)
    assert "below the minimum rate" in log and "nothing merged" in log
    assert "failed: ;" not in log
    status = victim.get("/status")
    assert status["link"]["transfers_cut_slow"] >= 1
    assert status["exchange_rejected"].get("slow_peer", 0) >= 1
    assert attacked_rate >= 0.8 * calm_rate, (calm_rate, attacked_rate)


# ------------------------------------------------------------------------- half-sent requests

HEADER_TIMEOUT = 3.0


@pytest.mark.slow
def test_half_sent_requests_are_closed_in_time_and_the_api_answers_throughout(tmp_path: Path) -> None:
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        node = swarm.add_node(settings={**NODE, "exchange.interval": 1e9, "admission.header_timeout": HEADER_TIMEOUT})
        node.start()
        node.wait_up(timeout=120)
        api_times: list[float] = []
        done = threading.Event()

        def poll_healthz() -> None:
            while not done.is_set():
                started = time.monotonic()
                with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/healthz", timeout=5) as r:
                    assert r.status == 200
                api_times.append(time.monotonic() - started)
                time.sleep(0.1)

        poller = threading.Thread(target=poll_healthz, daemon=True)
        poller.start()
        socks: list[socket.socket] = []
        opened = time.monotonic()
        try:
            for _ in range(500):
                sock = socket.create_connection(("127.0.0.1", node.exchange_port), timeout=5)
                sock.sendall(b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Le")  # and nothing more
                socks.append(sock)
            sent_all = time.monotonic() - opened
            closed_at: list[float] = []
            open_late: list[int] = []
            for i, sock in enumerate(socks):
                sock.settimeout(max(0.1, opened + sent_all + HEADER_TIMEOUT + 2.0 - time.monotonic()))
                try:
                    while sock.recv(4096):
                        pass
                except TimeoutError:
                    open_late.append(i)  # still open: counted below
                    continue
                except OSError:
                    pass
                closed_at.append(time.monotonic() - opened)
        finally:
            done.set()
            for sock in socks:
                sock.close()
            poller.join(10)
        print(f"500 half-sent requests opened in {sent_all:.2f} s; {len(closed_at)} closed, the last "
              f"{max(closed_at):.2f} s after the first was opened; /healthz: {len(api_times)} answers, "
              f"slowest {max(api_times):.3f} s")
        assert not open_late, f"half-sent requests still open: {open_late}"
        assert max(closed_at) <= sent_all + HEADER_TIMEOUT + 2.0
        assert api_times and max(api_times) < 1.0
        assert node.process is not None and node.process.poll() is None
