"""Wire encodings between real daemons (separate processes, 127.0.0.1, digits-mlp training):
a 415 and the retry in an encoding both accept, and what int8 saves on one exchange.

Three nodes, none gossiping on its own (each exchange is one we ask for on the local API):
F has exchange.encoding = "float32", I has "int8", X has "auto" (takes every encoding).
The wire bytes are the daemons' own counters (/status bytes_sent and bytes_received, and
peerfed_exchange_bytes_total in /metrics): payload bytes as encoded, without the fixed
2048-byte signed trailer and the HTTP heads; the test prints both.
"""

from __future__ import annotations

import base64
import re
import ssl
import time
import urllib.request
from collections.abc import Iterator

import pytest
from swarmtools import NO_GOSSIP, add_insider, post_exchange, wait_until

from peerfed import codecs
from peerfed.averaging import fingerprint
from peerfed.core.envelope import ModelRequest, Verifier, seal
from peerfed.core.manifest import TRAILER_SIZE, Manifest
from peerfed.core.peerid import Signer
from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.net.transfer import MANIFEST_HEADER, REQUEST_HEADER
from peerfed.train.tasks import NodeContext, TrainSettings, digits_mlp

pytestmark = pytest.mark.slow
NETWORK = "encodings-test"
INSIDER: list[Signer] = []  # the key of a relay daemon connected to all three (the fixture's)
COMMON = {"train.init": "local", "train.threads": 1, "exchange.interval": NO_GOSSIP, "train.eval_interval": 2.0}
DIGITS_NUMEL = sum(p.numel() for p in digits_mlp(TrainSettings(), NodeContext(0, 1, 0)).model.parameters())


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalNode]]:
    with LocalSwarm(tmp_path_factory.mktemp("encodings"), network=NETWORK) as swarm:
        named = {name: swarm.add_node(settings={**COMMON, "exchange.encoding": encoding, "train.seed": seed})
                 for seed, (name, encoding) in enumerate((("F", "float32"), ("I", "int8"), ("X", "auto")))}
        swarm.start_all(timeout=120)
        swarm.wait_full_view(timeout=60)
        for node in named.values():  # every node knows every other's exchange URL
            wait_until(lambda node=node: sum(bool(p["exchange_url"]) for p in node.get("/peers")) >= 2, 60,
                       f"node {node.index} to know its peers' exchange URLs")
        INSIDER.append(add_insider(swarm, *named.values()))  # a connected peer's key: admitted
        yield named
        for node in named.values():
            assert node.process is not None and node.process.poll() is None, node.log_tail()


def wire_bytes(node: LocalNode) -> tuple[int, int]:
    status = node.get("/status")
    return int(status["bytes_sent"]), int(status["bytes_received"])


def metric_bytes(node: LocalNode) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^peerfed_exchange_bytes_total\{direction="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


def rejected(node: LocalNode, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf'^peerfed_rejected_messages_total\{{reason="{reason}"\}} (\S+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0


def one_exchange(initiator: LocalNode, responder: LocalNode) -> tuple[int, int]:
    """One exchange initiator -> responder, ok; the wire bytes it moved (sent, received) as
    the initiator counted them (checked against the responder's count and /metrics)."""
    before, before_r, before_m = wire_bytes(initiator), wire_bytes(responder), metric_bytes(initiator)
    result = post_exchange(initiator, responder.peer_id)
    assert result["outcome"] == "ok", result
    sent, received = (now - then for now, then in zip(wire_bytes(initiator), before, strict=True))
    wait_until(lambda: wire_bytes(responder) != before_r, 10, "the responder to count its side")
    assert tuple(now - then for now, then in zip(wire_bytes(responder), before_r, strict=True)) == (received, sent)
    after_m = metric_bytes(initiator)
    assert (after_m["sent"] - before_m.get("sent", 0), after_m["received"] - before_m.get("received", 0)) == (
        sent, received)
    return sent, received


def test_a_node_answers_an_encoding_it_does_not_take_with_415_and_the_initiator_retries(
        nodes: dict[str, LocalNode]) -> None:
    f, i = nodes["F"], nodes["I"]
    refused_before = rejected(f, "unsupported_encoding")
    before = f.get("/status")["exchanges"], i.get("/status")["exchanges"]
    sent, received = one_exchange(i, f)  # I offers int8; F takes float32 only
    assert (sent, received) == (4 * DIGITS_NUMEL, 4 * DIGITS_NUMEL)  # the retry went in float32, both ways
    assert rejected(f, "unsupported_encoding") == refused_before + 1
    after = f.get("/status")["exchanges"], i.get("/status")["exchanges"]
    # One exchange on each side, not a refused one and then an ok one.
    for was, now in zip(before, after, strict=True):
        assert {k: now[k] - was[k] for k in now} == {"ok": 1, "busy": 0, "refused": 0, "failed": 0}
    # I learnt what F takes: its next push goes in float32 at once, no second 415.
    one_exchange(i, f)
    assert rejected(f, "unsupported_encoding") == refused_before + 1


def test_int8_cuts_the_wire_bytes_of_one_digits_exchange_below_0_3x_float32(nodes: dict[str, LocalNode]) -> None:
    float32 = one_exchange(nodes["F"], nodes["X"])  # F accepts float32 only: X answers in float32
    int8 = one_exchange(nodes["I"], nodes["X"])  # X takes int8 and I does: int8 both ways
    assert float32 == (4 * DIGITS_NUMEL,) * 2
    assert int8 == (codecs.wire_length("int8", DIGITS_NUMEL),) * 2
    ratio = sum(int8) / sum(float32)
    with_trailers = (sum(int8) + 2 * TRAILER_SIZE) / (sum(float32) + 2 * TRAILER_SIZE)
    print(f"digits-mlp ({DIGITS_NUMEL} weights), one exchange both ways: float32 {sum(float32)} B, int8 {sum(int8)} B "
          f"of payload = {ratio:.4f}x; with the 2048 B signed trailers {with_trailers:.4f}x")
    assert ratio <= 0.3
    # Both still train well after merging int8-rounded weights.
    for name in ("I", "X"):
        wait_until(lambda name=name: (nodes[name].get("/status")["metrics"].get("accuracy") or 0) > 0.8, 60,
                   f"node {name} to stay above 0.8 accuracy")


def test_state_sync_stays_float32(nodes: dict[str, LocalNode]) -> None:
    """GET /v1/model answers in float32 whatever exchange.encoding says (exact weights, once)."""
    signer, node = INSIDER[0], nodes["I"]
    model = digits_mlp(TrainSettings(), NodeContext(0, 1, 0)).model
    sealed = seal(signer, network=NETWORK, recipient=node.peer_id, body=ModelRequest(fingerprint=fingerprint(model)),
                  now=time.time())
    request = urllib.request.Request(f"https://127.0.0.1:{node.exchange_port}/v1/model",
                                     headers={REQUEST_HEADER: base64.b64encode(sealed).decode()})
    with urllib.request.urlopen(request, timeout=30, context=ssl._create_unverified_context()) as response:
        data, header = response.read(), response.headers[MANIFEST_HEADER]
    verifier = Verifier(network=NETWORK, own_peer_id=signer.peer_id, clock=time.time, max_size=4096)
    manifest = verifier.verify(base64.b64decode(header), expected_kind=Manifest).body
    assert (manifest.encoding, manifest.blocks, manifest.length) == ("float32", 0, 4 * DIGITS_NUMEL)
    assert len(data) == 4 * DIGITS_NUMEL + TRAILER_SIZE
