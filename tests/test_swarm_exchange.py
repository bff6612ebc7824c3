"""Acceptance of the weight exchange: real daemons on 127.0.0.1, real HTTP, real training.

The test process plays a peer - honest or not - with a fresh Ed25519 key, signing its own
manifests and speaking HTTP/1.1 on a raw socket to the daemon's exchange port, so it can send
exactly the bytes it wants (100-continue or not, half a body, a forged header).

How "not merged" is observed while the node keeps training (digits-mlp, lr 0.05):
- a garbage push asks for a near-total merge (sample_weight 1e9, so the mixing weight is
  ~1): had the node merged it, its weights (fetched with a signed GET /v1/model) would sit
  near the garbage (all 1e3, all 1e7 or NaN), while honest digits-mlp weights stay far
  below 100 and its accuracy, which we evaluate here on the fetched weights, above 0.8;
- the control test shows that a genuine push *is* merged and visible: it writes 42.0 into
  the first-layer weights of the three always-zero pixels of the digits images, which
  training never touches (their gradient is exactly 0), so the mark stays for good;
- the multi-node tests run with lr 1e-12, so weights stay put to ~1e-9 and can be
  compared exactly (state sync equality; no merge after a killed transfer).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3
import msgpack
import numpy as np
import pytest
import torch
from swarmtools import NO_GOSSIP, add_insider, wait_until

from peerfed.averaging import (
    FlatLayout,
    bounded_mixing_weight,
    fingerprint,
    flatten_into,
    unflatten_from,
)
from peerfed.core.envelope import ModelRequest, Verifier, decode, seal
from peerfed.core.manifest import (
    TRAILER_SIZE,
    Manifest,
    PayloadDigest,
    pack_trailer,
    unpack_trailer,
)
from peerfed.core.peerid import Signer
from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.net.transfer import MANIFEST_HEADER, REQUEST_HEADER
from peerfed.train.tasks import (
    NodeContext,
    TrainSettings,
    digits_mlp,
    load_digits_split,
)

NETWORK = "exch-test"
TESTS_DIR = Path(__file__).resolve().parent
# A node we attack: trains at once (no state-sync wait), never starts an exchange itself.
VICTIM_TRANSFER_TIMEOUT = 5.0
# Its attackers are insiders (connected peers: only they are admitted), on a trusted LAN (plain
# HTTP, so the raw-socket client here can send exactly the bytes it wants), never banned for
# long (each garbage push would ban its sender) and not rate-limited.
VICTIM = {"train.init": "local", "train.threads": 1, "exchange.interval": NO_GOSSIP,
          "train.eval_interval": 1.0, "exchange.transfer_timeout": VICTIM_TRANSFER_TIMEOUT,
          "merge.clip": 0.0,  # the control test checks the exact merge; clipping: test_merging.py
          "exchange.tls": False, "admission.ban_duration": 0.001, "admission.peer_exchanges_per_minute": 1_000_000}
INSIDERS: list[Signer] = []  # keys of peers connected to the victim (its fixture adds them)
BIG_SAMPLE_WEIGHT = 1e9  # asks for a mixing weight ~1 (clamped to 10/11)
HONEST_MAX_ABS = 100.0   # digits-mlp weights stay far below this; all garbage here is above
MARK = 42.0


# -- the digits-mlp model, as the daemons build it --------------------------------------------

def _digits_model(seed: int = 0) -> torch.nn.Module:
    return digits_mlp(TrainSettings(), NodeContext(0, 1, seed)).model


DIGITS_FP = fingerprint(_digits_model())
DIGITS_LAYOUT = FlatLayout.from_model(_digits_model())
DIGITS_NUMEL = DIGITS_LAYOUT.numel


def digits_init(seed: int) -> np.ndarray:
    model = _digits_model(seed)
    flat = DIGITS_LAYOUT.new_buffer()
    flatten_into(model, flat)
    return flat.numpy().copy()


def digits_accuracy(flat: np.ndarray) -> float:
    task = digits_mlp(TrainSettings(), NodeContext(0, 1, 0))
    unflatten_from(torch.from_numpy(np.ascontiguousarray(flat, dtype=np.float32)), task.model)
    return task.evaluate(task.model)["accuracy"]


def dead_pixel_indices() -> np.ndarray:
    """Flat indices of first-layer weights fed by pixels that are 0 in every image."""
    data = load_digits_split()
    dead = np.flatnonzero((data.x_train.max(0) == 0) & (data.x_test.max(0) == 0))
    first = DIGITS_LAYOUT.slots[0]
    assert first.name == "0.weight" and first.shape == (32, 64), DIGITS_LAYOUT.names
    rows = np.arange(first.shape[0])[:, None]
    return (first.offset + rows * first.shape[1] + dead[None, :]).ravel()


DEAD = dead_pixel_indices()


# -- HTTP on a raw socket ------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""
    complete: bool = False    # as many body bytes as Content-Length announced
    continued: bool = False   # the server sent 100 Continue (it wanted our body)
    elapsed: float = 0.0


def _read_head(reader: Any) -> tuple[int, dict[str, str]]:
    line = reader.readline(65536)
    if not line:
        raise ConnectionError("connection closed before a status line")
    status = int(line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while True:
        raw = reader.readline(65536)
        if raw in (b"\r\n", b"\n", b""):
            return status, headers
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


def _read_body(reader: Any, headers: dict[str, str]) -> tuple[bytes, bool]:
    length = int(headers.get("content-length", "-1"))
    chunks: list[bytes] = []
    got = 0
    try:
        while length < 0 or got < length:
            chunk = reader.read1(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
    except (ConnectionError, TimeoutError, OSError):
        pass
    return b"".join(chunks), length >= 0 and got == length


def _request_head(port: int, header: str | None, content_length: int, expect: bool) -> bytes:
    lines = ["POST /v1/exchange HTTP/1.1", f"Host: 127.0.0.1:{port}",
             "Content-Type: application/octet-stream", f"Content-Length: {content_length}"]
    if header is not None:
        lines.append(f"{MANIFEST_HEADER}: {header}")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def post_exchange(node: LocalNode, header: str | None, body: bytes, *, expect: bool = True,
                  content_length: int | None = None, timeout: float = 30.0) -> Reply:
    """One POST /v1/exchange; with ``expect`` the body goes only after 100 Continue."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.exchange_port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        length = len(body) if content_length is None else content_length
        sock.sendall(_request_head(node.exchange_port, header, length, expect))
        continued = False
        if expect:
            status, headers = _read_head(reader)
            if status != 100:
                data, complete = _read_body(reader, headers)
                return Reply(status, headers, data, complete, False, time.monotonic() - started)
            continued = True
        try:
            sock.sendall(body)
        except OSError:
            pass  # a server that refused may have closed already; its answer is still readable
        status, headers = _read_head(reader)
        data, complete = _read_body(reader, headers)
        return Reply(status, headers, data, complete, continued, time.monotonic() - started)


# -- the test's own peer ---------------------------------------------------------------------------

def _next_insider() -> Signer:
    """One of the victim's insiders in turn (two EvilPeer() in a row are two peers), else a fresh key."""
    if not INSIDERS:
        return Signer.generate()
    INSIDERS.append(INSIDERS.pop(0))
    return INSIDERS[-1]


def exchange_base(node: LocalNode) -> str:
    """The node's exchange URL on 127.0.0.1 (https unless it runs with exchange.tls = false)."""
    return node.get("/status")["exchange_url"].split("://")[0] + f"://127.0.0.1:{node.exchange_port}"


UNPINNED = ssl._create_unverified_context()  # the test trusts the node it started


@dataclass
class EvilPeer:
    signer: Signer = field(default_factory=_next_insider)

    @property
    def peer_id(self) -> str:
        return self.signer.peer_id

    def push_manifest(self, node: LocalNode, payload: bytes, *, fingerprint: str = DIGITS_FP,
                      length: int | None = None, sample_weight: float = BIG_SAMPLE_WEIGHT,
                      purpose: str = "push", network: str = NETWORK, recipient: str | None = None,
                      now: float | None = None) -> bytes:
        manifest = Manifest(fingerprint=fingerprint, length=len(payload) if length is None else length,
                            sample_weight=sample_weight, purpose=purpose)
        return seal(self.signer, network=network, body=manifest,
                    recipient=node.peer_id if recipient is None else recipient,
                    now=time.time() if now is None else now)

    def trailer(self, node: LocalNode, sealed_manifest: bytes, payload: bytes, *,
                digest: bytes | None = None, manifest_nonce: bytes | None = None) -> bytes:
        """The signed trailer after ``payload``: its BLAKE3, bound to the manifest's nonce."""
        body = PayloadDigest(manifest_nonce=nonce_of(sealed_manifest) if manifest_nonce is None else manifest_nonce,
                             length=len(payload),
                             digest=blake3.blake3(payload).digest() if digest is None else digest)
        return pack_trailer(seal(self.signer, network=NETWORK, recipient=node.peer_id, body=body,
                                 now=time.time()))

    def wire(self, node: LocalNode, sealed_manifest: bytes, payload: bytes) -> bytes:
        """An honest body: the payload, then its trailer."""
        return payload + self.trailer(node, sealed_manifest, payload)

    def verify_from(self, node: LocalNode, header: str, purpose: str, in_reply_to: bytes,
                    data: bytes) -> bytes:
        """Check a body the node sent us: manifest and trailer signed by it, for us, and
        describing the payload; returns the payload."""
        verifier = Verifier(network=NETWORK, own_peer_id=self.peer_id, clock=time.time, max_size=4096)
        env = verifier.verify(base64.b64decode(header), expected_kind=Manifest)
        m: Manifest = env.body
        assert env.sender == node.peer_id
        assert (m.purpose, m.in_reply_to) == (purpose, in_reply_to)
        assert len(data) == m.length + TRAILER_SIZE
        payload = data[:m.length]
        sealed_digest = unpack_trailer(data[m.length:])
        digest_env = verifier.verify(sealed_digest, expected_kind=PayloadDigest)
        assert digest_env.sender == node.peer_id and digest_env.body.manifest_nonce == env.nonce
        assert digest_env.body.length == m.length
        assert digest_env.body.digest == blake3.blake3(payload).digest()
        return payload

    def model_request(self, node: LocalNode, fp: str = DIGITS_FP) -> bytes:
        return seal(self.signer, network=NETWORK, recipient=node.peer_id,
                    body=ModelRequest(fingerprint=fp), now=time.time())

    def fetch_model(self, node: LocalNode, fp: str = DIGITS_FP, timeout: float = 60.0) -> np.ndarray:
        """The node's current weights through a signed GET /v1/model (state sync's path)."""
        sealed = self.model_request(node, fp)
        request = urllib.request.Request(f"{exchange_base(node)}/v1/model", headers={REQUEST_HEADER: b64(sealed)})
        with urllib.request.urlopen(request, timeout=timeout, context=UNPINNED) as response:
            data = response.read()
            header = response.headers[MANIFEST_HEADER]
        payload = self.verify_from(node, header, "model", nonce_of(sealed), data)
        return np.frombuffer(payload, dtype=np.float32).copy()


def b64(sealed: bytes) -> str:
    return base64.b64encode(sealed).decode("ascii")


def nonce_of(sealed: bytes) -> bytes:
    return decode(sealed, max_size=len(sealed)).nonce


def resigned_as(sealed: bytes, index: int, value: Any) -> bytes:
    """``sealed`` with one envelope field (or body field, for a (key,) tuple) replaced and the
    original signature kept: canonical msgpack, so only the signature can tell."""
    items = msgpack.unpackb(sealed, raw=False)
    if isinstance(index, tuple):
        items[7][index[0]] = value
    else:
        items[index] = value
    return msgpack.packb(items, use_bin_type=True)


# -- observing a node ------------------------------------------------------------------------------

def rejected(node: LocalNode) -> dict[str, float]:
    """peerfed_rejected_messages_total by reason, from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^peerfed_rejected_messages_total\{reason="([^"]+)"\} (\S+)$', text, re.MULTILINE)}


@dataclass
class Counters:
    exchanges: dict[str, int]
    rejected: dict[str, float]
    step: int

    @classmethod
    def of(cls, node: LocalNode) -> Counters:
        status = node.get("/status")
        return cls(dict(status["exchanges"]), rejected(node), int(status["step"]))

    def grew(self, later: Counters) -> dict[str, float]:
        """Exchange outcomes and rejection reasons that went up since ``self``."""
        out: dict[str, float] = {}
        for key, value in later.exchanges.items():
            if value != self.exchanges.get(key, 0):
                out[key] = value - self.exchanges.get(key, 0)
        for key, value in later.rejected.items():
            if value != self.rejected.get(key, 0):
                out["rejected:" + key] = value - self.rejected.get(key, 0)
        return out


def assert_healthy_and_unmerged(node: LocalNode, peer: EvilPeer) -> np.ndarray:
    weights = peer.fetch_model(node)
    assert np.isfinite(weights).all(), "non-finite weights: garbage was merged"
    assert np.abs(weights).max() < HONEST_MAX_ABS, f"max |w| = {np.abs(weights).max():.3g}: garbage was merged"
    accuracy = digits_accuracy(weights)
    assert accuracy > 0.8, f"accuracy {accuracy:.3f} after the attack"
    return weights


def api_post(node: LocalNode, path: str, timeout: float = 120.0) -> Any:
    import json

    request = urllib.request.Request(f"http://127.0.0.1:{node.api_port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


# -- the node under attack (one for the whole module: starting a trainer takes a while) -------------

@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    with LocalSwarm(tmp_path_factory.mktemp("victim"), network=NETWORK) as swarm:
        node = swarm.add_node(settings=VICTIM)
        node.start()
        node.wait_up(timeout=120)
        INSIDERS[:] = [add_insider(swarm, node), add_insider(swarm, node)]
        wait_until(lambda: (node.get("/status")["metrics"].get("accuracy") or 0) > 0.85, 90,
                   "the victim to train to accuracy > 0.85")
        yield node
        INSIDERS.clear()
        assert node.process is not None and node.process.poll() is None, node.log_tail()


# ---------------------------------------------------------------------------------------------
# control: an honest push is answered and merged (so the attacks below could be seen if merged)


def test_genuine_push_is_answered_with_a_signed_reply_and_merged(victim: LocalNode) -> None:
    peer = EvilPeer()
    before = Counters.of(victim)
    current = peer.fetch_model(victim)
    assert np.abs(current[DEAD] - MARK).max() > 1.0, "the mark is there before we pushed it"
    body = current.copy()
    body[DEAD] = MARK
    sealed = peer.push_manifest(victim, body.tobytes())

    reply = post_exchange(victim, b64(sealed), peer.wire(victim, sealed, body.tobytes()))

    assert reply.continued and reply.status == 200 and reply.complete, reply
    theirs = peer.verify_from(victim, reply.headers[MANIFEST_HEADER.lower()], "reply", nonce_of(sealed), reply.body)
    assert np.abs(np.frombuffer(theirs, np.float32)).max() < HONEST_MAX_ABS
    wait_until(lambda: Counters.of(victim).exchanges["ok"] == before.exchanges["ok"] + 1, 5, "ok counted")
    merged = assert_healthy_and_unmerged(victim, peer)  # an honest merge keeps it healthy
    # The push claims a huge sample weight, but its claim is clamped to 10x ours: no single
    # exchange may replace our model.
    alpha = bounded_mixing_weight(victim.get("/status")["trainer"]["num_samples"], BIG_SAMPLE_WEIGHT)
    assert abs(alpha - 10 / 11) < 1e-9
    expected = current[DEAD] + alpha * (MARK - current[DEAD])
    assert np.abs(merged[DEAD] - expected).max() < 1e-3, "the pushed weights were not merged (capped)"
    grew = before.grew(Counters.of(victim))
    assert grew == {"ok": 1}, grew
    last = victim.get("/status")["last_exchange"]
    assert (last["peer_id"], last["role"], last["outcome"]) == (peer.peer_id, "responder", "ok")


def test_model_request_must_be_signed_for_this_node_and_model(victim: LocalNode) -> None:
    peer, url = EvilPeer(), f"http://127.0.0.1:{victim.exchange_port}/v1/model"

    def status_of(header: str | None) -> int:
        headers = {} if header is None else {REQUEST_HEADER: header}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    sealed = peer.model_request(victim)
    assert status_of(None) == 401
    assert status_of(b64(peer.model_request(victim, "0" * 64))) == 409
    assert status_of(b64(resigned_as(sealed, 2, EvilPeer().peer_id))) == 401  # claims another sender
    assert status_of(b64(sealed)) == 200
    assert status_of(b64(sealed)) == 401  # the same request again is a replay


# ---------------------------------------------------------------------------------------------
# refusals before a single body byte: one table, each case a fresh key


def _cases() -> list[tuple[str, int, str | None]]:
    # (case, expected status, rejection reason that must be counted, "*" = any, None = not required)
    return [
        ("fingerprint_mismatch", 409, "*"),
        ("flipped_signature_byte", 401, "bad_signature"),
        ("signed_by_a_claims_b", 401, "bad_signature"),
        ("weight_changed_after_signing", 401, "bad_signature"),
        ("length_changed_after_signing", 401, "bad_signature"),
        ("other_network", 401, "wrong_network"),
        ("addressed_to_another_peer", 401, "not_for_me"),
        ("too_old", 401, "too_old"),
        ("in_future", 401, "in_future"),
        ("purpose_reply", 400, None),
        ("model_request_kind", 400, "malformed"),
        ("manifest_length_not_model_size", 413, None),
        ("content_length_not_manifest_length", 413, None),
        ("missing_header", 401, "malformed"),
        ("header_not_base64", 401, "malformed"),
        ("header_random_bytes", 400, "malformed"),
        ("header_over_4096_bytes", 401, "oversized"),
    ]


@pytest.mark.parametrize(("case", "status", "reason"), _cases(), ids=[c[0] for c in _cases()])
def test_bad_push_header_is_refused_before_the_body_and_counted(
        victim: LocalNode, case: str, status: int, reason: str | None) -> None:
    peer, other = EvilPeer(), EvilPeer()
    payload = np.full(DIGITS_NUMEL, 1e3, dtype=np.float32).tobytes()
    good = peer.push_manifest(victim, payload)
    body = peer.wire(victim, good, payload)
    content_length = None
    header: str | None
    if case == "fingerprint_mismatch":
        header = b64(peer.push_manifest(victim, payload, fingerprint="f" * 64))
    elif case == "flipped_signature_byte":
        header = b64(good[:-1] + bytes([good[-1] ^ 1]))
    elif case == "signed_by_a_claims_b":
        header = b64(resigned_as(good, 2, other.peer_id))
    elif case == "weight_changed_after_signing":
        header = b64(resigned_as(good, ("sample_weight",), 7.0))
    elif case == "length_changed_after_signing":
        header = b64(resigned_as(good, ("length",), len(payload) - 4))
    elif case == "other_network":
        header = b64(peer.push_manifest(victim, payload, network="elsewhere"))
    elif case == "addressed_to_another_peer":
        header = b64(peer.push_manifest(victim, payload, recipient=other.peer_id))
    elif case == "too_old":
        header = b64(peer.push_manifest(victim, payload, now=time.time() - 1000))
    elif case == "in_future":
        header = b64(peer.push_manifest(victim, payload, now=time.time() + 600))
    elif case == "purpose_reply":
        header = b64(peer.push_manifest(victim, payload, purpose="reply"))
    elif case == "model_request_kind":
        header = b64(peer.model_request(victim))
    elif case == "manifest_length_not_model_size":
        sealed = peer.push_manifest(victim, payload[:-4])
        header, body = b64(sealed), peer.wire(victim, sealed, payload[:-4])
    elif case == "content_length_not_manifest_length":
        header, content_length = b64(good), len(body) + 4
    elif case == "missing_header":
        header = None
    elif case == "header_not_base64":
        header = "not base64 at all!"
    elif case == "header_random_bytes":
        header = b64(os.urandom(300))
    elif case == "header_over_4096_bytes":
        header = b64(os.urandom(5000))
    else:
        raise AssertionError(case)
    before = Counters.of(victim)

    reply = post_exchange(victim, header, body, content_length=content_length, timeout=10)

    assert not reply.continued, f"{case}: the node asked for the body of a push it must refuse"
    assert reply.status == status, (case, reply)
    assert reply.elapsed < 2.0, f"{case}: refusal took {reply.elapsed:.2f} s"
    grew = before.grew(Counters.of(victim))
    assert "ok" not in grew, grew
    if reason == "*":
        assert grew, f"{case}: refused with {reply.status} but nothing was counted (/status, /metrics)"
    elif reason is not None:
        assert grew.get("rejected:" + reason) == 1, f"{case}: expected rejected:{reason} +1, got {grew}"


def test_huge_header_is_refused_and_the_node_keeps_serving(victim: LocalNode) -> None:
    peer = EvilPeer()
    body = np.full(DIGITS_NUMEL, 1e3, dtype=np.float32).tobytes()
    reply = post_exchange(victim, "A" * 100_000, body, timeout=10)
    assert not reply.continued and 400 <= reply.status < 500, reply
    assert victim.is_up()
    assert_healthy_and_unmerged(victim, peer)


# ---------------------------------------------------------------------------------------------
# a push whose body is bad: read in full, refused, counted, never merged


BAD_BODIES = {  # kind: the rejection reason the node must count
    "wrong_digest": "digest_mismatch",
    "one_payload_byte_changed": "digest_mismatch",
    "trailer_signed_by_another_key": "digest_mismatch",
    "trailer_for_another_manifest": "digest_mismatch",
    "trailer_tampered": "bad_signature",
    "trailer_random_bytes": "malformed",
    "trailer_replayed": "replay",
    "nan_with_right_digest": "bad_values",
    "huge_norm_with_right_digest": "bad_values",
}


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bad_body_is_refused_counted_and_not_merged(victim: LocalNode, kind: str) -> None:
    peer = EvilPeer()
    garbage = np.full(DIGITS_NUMEL, 1e7 if kind.startswith("huge") else 1e3, dtype=np.float32)
    if kind.startswith("nan"):
        garbage[7] = np.nan
    payload = garbage.tobytes()
    sealed = peer.push_manifest(victim, payload)
    trailer = peer.trailer(victim, sealed, payload)
    if kind == "wrong_digest":
        trailer = peer.trailer(victim, sealed, payload, digest=blake3.blake3(b"not these bytes").digest())
    elif kind == "one_payload_byte_changed":
        payload = payload[:100] + bytes([payload[100] ^ 1]) + payload[101:]
    elif kind == "trailer_signed_by_another_key":
        trailer = EvilPeer().trailer(victim, sealed, payload)
    elif kind == "trailer_for_another_manifest":
        trailer = peer.trailer(victim, sealed, payload, manifest_nonce=os.urandom(16))
    elif kind == "trailer_tampered":
        sealed_digest = bytearray(unpack_trailer(trailer))
        sealed_digest[-1] ^= 1  # a signature byte
        trailer = pack_trailer(bytes(sealed_digest))
    elif kind == "trailer_random_bytes":
        trailer = os.urandom(TRAILER_SIZE)
    elif kind == "trailer_replayed":  # the genuine trailer of an earlier, honest push
        honest = peer.fetch_model(victim).tobytes()  # its own weights: merging them is harmless
        first = peer.push_manifest(victim, honest, sample_weight=0.0)
        trailer = peer.trailer(victim, first, honest)
        ok_before = Counters.of(victim).exchanges["ok"]
        replied = post_exchange(victim, b64(first), honest + trailer)
        assert replied.status == 200 and replied.complete, replied
        wait_until(lambda: Counters.of(victim).exchanges["ok"] > ok_before, 5, "the first push to count ok")
    reason = BAD_BODIES[kind]
    before = Counters.of(victim)

    reply = post_exchange(victim, b64(sealed), payload + trailer)

    assert reply.continued, reply  # the header was fine: the node wanted the body
    wait_until(lambda: sum(before.grew(Counters.of(victim)).values()) >= 2, 5, "the refusal to be counted")
    grew = before.grew(Counters.of(victim))
    assert grew == {"refused": 1, "rejected:" + reason: 1}, grew
    if reason != "bad_values":  # an unverified push does not even get a whole reply
        assert not (reply.status == 200 and reply.complete), reply
    assert_healthy_and_unmerged(victim, peer)
    assert Counters.of(victim).step > before.step  # still training


# ---------------------------------------------------------------------------------------------
# replay


def test_replayed_push_is_refused_401(victim: LocalNode) -> None:
    peer = EvilPeer()
    weights = peer.fetch_model(victim)
    body = weights.tobytes()
    sealed = peer.push_manifest(victim, body, sample_weight=0.0)  # its own weights: harmless
    before = Counters.of(victim)

    first = post_exchange(victim, b64(sealed), peer.wire(victim, sealed, body))
    second = post_exchange(victim, b64(sealed), peer.wire(victim, sealed, body))

    assert first.status == 200 and first.complete, first
    assert second.status == 401 and not second.continued, second
    assert b"replay" in second.body, second.body
    # The reply's last byte goes out before the node merges and counts: wait for the count.
    wait_until(lambda: before.grew(Counters.of(victim)).get("ok") == 1, 5, "the first push to count ok")
    grew = before.grew(Counters.of(victim))
    assert grew == {"ok": 1, "rejected:replay": 1}, grew


def test_replay_is_still_refused_after_a_config_reload(victim: LocalNode) -> None:
    # SIGHUP re-reads the config (allowlist, interval...): it must not forget the nonces it saw.
    peer = EvilPeer()
    body = peer.fetch_model(victim).tobytes()
    sealed = peer.push_manifest(victim, body, sample_weight=0.0)
    counted = Counters.of(victim)
    first = post_exchange(victim, b64(sealed), peer.wire(victim, sealed, body))
    assert first.status == 200 and first.complete, first
    wait_until(lambda: counted.grew(Counters.of(victim)).get("ok") == 1, 5, "the first push to count ok")
    log_size = victim.log_path.stat().st_size
    victim.signal(signal.SIGHUP)
    wait_until(lambda: b"SIGHUP: reloaded" in victim.log_path.read_bytes()[log_size:], 15, "the reload")
    before = Counters.of(victim)

    again = post_exchange(victim, b64(sealed), peer.wire(victim, sealed, body))

    assert again.status == 401 and not again.continued, f"replay after SIGHUP accepted: {again.status}"
    assert before.grew(Counters.of(victim)) == {"rejected:replay": 1}


# ---------------------------------------------------------------------------------------------
# busy, and a peer that hangs up


class SlowPush:
    """A push whose body goes up in two halves, the second only when the test says so."""

    def __init__(self, node: LocalNode, peer: EvilPeer, body: bytes, sample_weight: float) -> None:
        self.sealed = peer.push_manifest(node, body, sample_weight=sample_weight)
        self.body = peer.wire(node, self.sealed, body)
        self.sock = socket.create_connection(("127.0.0.1", node.exchange_port), timeout=30)
        self.reader = self.sock.makefile("rb")
        self.sock.sendall(_request_head(node.exchange_port, b64(self.sealed), len(self.body), expect=False))
        self.sock.sendall(self.body[: len(self.body) // 2])
        # The reply's head comes once the node serves us: from then on it is in this exchange.
        self.status, self.headers = _read_head(self.reader)

    def finish(self) -> tuple[bytes, bool]:
        self.sock.sendall(self.body[len(self.body) // 2:])
        return _read_body(self.reader, self.headers)

    def hang_up(self, how: str = "reset") -> None:
        """"fin": stop sending (the node reads an early end of stream); "reset": close with the
        node's reply unread, so the kernel answers with a TCP reset."""
        if how == "fin":
            self.sock.shutdown(socket.SHUT_WR)
            _read_body(self.reader, self.headers)  # until the node closes
        self.reader.close()
        self.sock.close()


def test_busy_node_answers_429_at_once_and_finishes_the_exchange_it_is_in(victim: LocalNode) -> None:
    slow_peer, other = EvilPeer(), EvilPeer()
    body = slow_peer.fetch_model(victim).tobytes()
    before = Counters.of(victim)
    slow = SlowPush(victim, slow_peer, body, sample_weight=0.0)  # merges nothing
    try:
        assert slow.status == 200, slow.status
        pushed = other.push_manifest(victim, body, sample_weight=0.0)
        reply = post_exchange(victim, b64(pushed), other.wire(victim, pushed, body), timeout=5)
        assert reply.status == 429 and not reply.continued, reply
        assert reply.elapsed < 1.0, f"busy answer took {reply.elapsed:.2f} s"
        data, complete = slow.finish()
    finally:
        slow.hang_up()
    assert complete and len(data) == len(body) + TRAILER_SIZE
    slow_peer.verify_from(victim, slow.headers[MANIFEST_HEADER.lower()], "reply", nonce_of(slow.sealed), data)
    wait_until(lambda: before.grew(Counters.of(victim)).get("ok") == 1, 5, "the slow exchange to count ok")
    assert "refused" not in before.grew(Counters.of(victim))


@pytest.mark.parametrize("how", ["fin", "reset", "stall"])
def test_peer_hanging_up_mid_upload_counts_failed_merges_nothing_and_frees_the_node(
        victim: LocalNode, how: str) -> None:
    quitter, next_peer = EvilPeer(), EvilPeer()
    garbage = np.full(DIGITS_NUMEL, 1e3, dtype=np.float32).tobytes()  # half of it arrives
    before = Counters.of(victim)
    slow = SlowPush(victim, quitter, garbage, sample_weight=BIG_SAMPLE_WEIGHT)
    assert slow.status == 200
    if how == "stall":  # the upload just stops: the node gives up after exchange.transfer_timeout
        stalled = time.monotonic()
        wait_until(lambda: before.grew(Counters.of(victim)).get("failed") == 1,
                   VICTIM_TRANSFER_TIMEOUT + 10, "the stalled exchange to time out")
        assert time.monotonic() - stalled > VICTIM_TRANSFER_TIMEOUT - 1
        slow.hang_up("reset")
    else:
        slow.hang_up(how)
        wait_until(lambda: before.grew(Counters.of(victim)).get("failed") == 1, 10, "failed to be counted")

    body = next_peer.fetch_model(victim).tobytes()
    pushed = next_peer.push_manifest(victim, body, sample_weight=0.0)
    reply = post_exchange(victim, b64(pushed), next_peer.wire(victim, pushed, body))
    assert reply.continued and reply.status == 200 and reply.complete, reply
    wait_until(lambda: before.grew(Counters.of(victim)).get("ok") == 1, 5, "the next exchange to count ok")
    assert before.grew(Counters.of(victim)) == {"failed": 1, "ok": 1}
    assert_healthy_and_unmerged(victim, next_peer)


# ---------------------------------------------------------------------------------------------
# multi-node: state sync, and a responder killed mid-transfer


@pytest.mark.slow
def test_newcomer_state_sync_yields_the_donors_weights(tmp_path: Path) -> None:
    # lr 1e-12: both keep stepping, but their weights stay put (to ~1e-9), so equality is exact.
    # The donor gossips every 0.5 s: pushes that reach the newcomer before its sync must be
    # refused (its random init would pull the donor away from donor_init), later ones merge
    # equal weights.
    common = {"train.threads": 1, "train.lr": 1e-12, "exchange.interval": NO_GOSSIP}
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        donor = swarm.add_node(settings={**common, "train.init": "local", "train.seed": 1,
                                         "exchange.interval": 0.5})
        newcomer = swarm.add_node(settings={**common, "train.init": "peer", "train.seed": 2})
        donor.start()
        donor.wait_up(120)
        wait_until(lambda: donor.get("/status")["step"] > 100, 60, "the donor to train")  # its lr clock runs
        newcomer.start()
        newcomer.wait_up(120)
        wait_until(lambda: newcomer.get("/status")["state_sync"].startswith("from "), 60, "state sync to finish")
        assert newcomer.get("/status")["state_sync"] == f"from {donor.peer_id}"
        wait_until(lambda: donor.get("/status")["exchanges"]["ok"] >= 2, 30, "the donor to exchange")
        peer = EvilPeer(add_insider(swarm, donor, newcomer))
        donor_w, newcomer_w = peer.fetch_model(donor), peer.fetch_model(newcomer)
        own_init, donor_init = digits_init(2), digits_init(1)

        assert np.abs(own_init - donor_init).max() > 0.05  # the sync is visible
        assert np.abs(donor_w - donor_init).max() < 1e-6   # lr 1e-12 keeps weights put
        assert np.abs(newcomer_w - donor_w).max() < 1e-6, "newcomer's weights differ from the donor's"
        assert np.abs(newcomer_w - own_init).max() > 0.05
        step = newcomer.get("/status")["step"]
        wait_until(lambda: newcomer.get("/status")["step"] > step, 20, "the newcomer to train")
        # it took over the donor's lr clock (signed in the model's manifest), not step 0; the
        # trainer's stats reach /status within a couple of seconds
        def clock_offset() -> int:
            clock = newcomer.get("/status")["trainer"]
            return int(clock["schedule_step"] - clock["step"])
        wait_until(lambda: clock_offset() != 0, 10, "the newcomer's stats to show its lr clock")
        assert 100 < clock_offset() <= donor.get("/status")["trainer"]["schedule_step"]
        assert newcomer.get("/status")["trainer"]["seconds_trained"] > 0


def test_a_node_waiting_for_its_first_weights_shares_none(tmp_path: Path) -> None:
    # train.init = peer and no peer yet: it holds a random init, which must neither be averaged
    # into a trained peer nor handed to a newcomer. Both are "not ready" (429: ask again later).
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        node = swarm.add_node(settings={"train.init": "peer", "train.threads": 1, "exchange.tls": False})  # raw HTTP
        node.start()
        node.wait_up(120)
        wait_until(lambda: node.get("/status")["state_sync"].startswith("waiting"), 30, "the node to wait")
        peer = EvilPeer()
        body = digits_init(5).tobytes()
        pushed = peer.push_manifest(node, body, sample_weight=1.0)
        reply = post_exchange(node, b64(pushed), peer.wire(node, pushed, body))
        assert reply.status == 429 and not reply.continued and b"not ready" in reply.body, reply
        with pytest.raises(urllib.error.HTTPError) as refused:
            peer.fetch_model(node)
        assert refused.value.code == 429 and b"not ready" in refused.value.read()
        status = node.get("/status")
        assert status["step"] == 0 and status["trainer"]["alive"]  # waits before its first step
        assert status["exchange_rejected"] == {} and sum(status["exchanges"].values()) == 0


def socket_io(pid: int) -> tuple[int, int]:
    """(rchar, wchar) of a process: bytes through its read/write syscalls, sockets included."""
    with open(f"/proc/{pid}/io") as f:
        fields = dict(line.split(":") for line in f)
    return int(fields["rchar"]), int(fields["wchar"])


BIG_DIM = 4096  # 64 MiB of weights each way
BIG_NBYTES = 4 * BIG_DIM * BIG_DIM


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/<pid>/io")
@pytest.mark.parametrize("moment", ["push_arriving", "reply_flowing"])
def test_killing_the_responder_mid_transfer_merges_nothing_on_the_initiator(tmp_path: Path, moment: str) -> None:
    """The responder is frozen (SIGSTOP) once 4 MiB of the push reached it, or once 4 MiB
    of its reply left it; frozen, it cannot finish the exchange, so we can check the exchange
    is still under way before we SIGKILL it (and its trainer)."""
    big_fp = fingerprint(torch.nn.Linear(BIG_DIM, BIG_DIM, bias=False, device="meta"))  # layout only
    common = {"train.threads": 1, "train.lr": 1e-12, "train.task": "big_task:factory",
              "train.options": {"dim": BIG_DIM}, "train.eval_interval": 30.0, "train.init": "local",
              "exchange.interval": NO_GOSSIP, "exchange.transfer_timeout": 60.0}
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)}
    with LocalSwarm(tmp_path, network=NETWORK) as swarm:
        initiator = swarm.add_node(settings={**common, "train.seed": 1})
        responder = swarm.add_node(settings={**common, "train.seed": 2})
        for node in (initiator, responder):
            node.start(env=env)
        for node in (initiator, responder):
            node.wait_up(timeout=180)
        wait_until(lambda: any(p["peer_id"] == responder.peer_id and p["state"] == "connected"
                               and p["exchange_url"] for p in initiator.get("/peers")), 60,
                   "the initiator to know the responder's exchange URL")
        peer = EvilPeer(add_insider(swarm, initiator, responder))
        before_w = peer.fetch_model(initiator, big_fp)
        responder_w = peer.fetch_model(responder, big_fp)
        assert np.abs(before_w - responder_w).max() > 1e-3  # a merge (alpha 0.5) would show
        before = Counters.of(initiator)
        assert responder.process is not None
        pid = responder.process.pid

        result: dict[str, Any] = {}
        read0, written0 = socket_io(pid)
        call = threading.Thread(target=lambda: result.update(
            api_post(initiator, f"/exchange?peer={responder.peer_id}")), daemon=True)
        call.start()
        deadline = time.monotonic() + 60
        while True:
            read, written = socket_io(pid)
            if (read - read0 if moment == "push_arriving" else written - written0) >= 4 << 20:
                break
            assert call.is_alive(), f"the exchange ended before we could freeze it: {result}"
            assert time.monotonic() < deadline, f"no transfer after 60 s ({moment})"
            time.sleep(0.001)
        responder.signal(signal.SIGSTOP)
        read, written = socket_io(pid)
        time.sleep(0.5)
        assert call.is_alive(), f"the exchange finished before the kill: {result}"
        print(f"responder frozen ({moment}) having read {(read - read0) / 2**20:.1f} MiB and written "
              f"{(written - written0) / 2**20:.1f} MiB; each side's weights are {BIG_NBYTES / 2**20:.0f} MiB")
        responder.kill()
        call.join(60)
        assert not call.is_alive(), "POST /exchange did not return after the responder died"

        assert result["outcome"] == "failed", result
        after = Counters.of(initiator)
        assert before.grew(after) == {"failed": 1}, before.grew(after)
        assert initiator.get("/status")["last_exchange"]["outcome"] == "failed"
        wait_until(lambda: Counters.of(initiator).step > after.step + 2, 30, "the initiator to keep training")
        after_w = peer.fetch_model(initiator, big_fp)
        assert np.isfinite(after_w).all()
        assert np.abs(after_w - before_w).max() < 1e-5, "the initiator's weights moved: something was merged"
        assert initiator.process is not None and initiator.process.poll() is None


# -- the data plane in this process: two Exchanges, each on its own DataPlane -----------------

class _FlatWeights:
    """In-memory weights with the Weights protocol of net/transfer.py (no trainer)."""

    fingerprint = "f" * 64
    num_samples = 100

    def __init__(self, values: torch.Tensor) -> None:
        self.w, self.nbytes = values.clone(), values.numel() * 4

    def lr_clock(self) -> tuple[int, float]:
        return 3, 1.5

    def begin_snapshot(self) -> None:
        pass

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None:
        dst[start:stop].copy_(self.w[start:stop])

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None:
        self.w.add_(alpha * (received - sent))


def test_the_data_plane_owns_its_exchange_and_publishes_frozen_stats() -> None:
    """Work reaches each Exchange through its DataPlane only; statistics() are immutable
    snapshots; state changes are applied on the plane in call order; each Exchange's
    transfer workers end with it."""
    import asyncio
    import dataclasses

    from peerfed.net.dataplane import DataPlane
    from peerfed.net.exchange import Exchange

    numel = 300_000  # 1.2 MB: a few 4 MiB-step batches would be too slow for no gain
    a_values, b_values = torch.randn(numel), torch.randn(numel) + 1.0
    weights = {"A": _FlatWeights(a_values), "B": _FlatWeights(b_values)}
    signers = {name: Signer.generate() for name in weights}

    def plane(name: str) -> DataPlane:
        verifier = Verifier(network=NETWORK, own_peer_id=signers[name].peer_id, clock=time.time, max_size=4096)
        return DataPlane(Exchange(signer=signers[name], network=NETWORK, weights=weights[name], verifier=verifier,
                                  max_incoming=1, connect_timeout=5.0, transfer_timeout=30.0))

    async def main() -> None:
        a, b = plane("A"), plane("B")
        try:
            url_b = f"http://127.0.0.1:{await b.start_server('127.0.0.1', 0)}"
            await a.start_server("127.0.0.1", 0)
            a.set_weights_ready(True)
            before = b.statistics()
            # B waits for its first weights: a push and a model request get 429, not counted.
            assert await a.exchange_with(signers["B"].peer_id, url_b) == "busy"
            assert await a.fetch_model(signers["B"].peer_id, url_b, torch.empty(numel)) is None
            b.set_weights_ready(True)  # queued on B's loop before the next request reaches it
            assert await a.exchange_with(signers["B"].peer_id, url_b) == "ok"
            wait_until(lambda: b.statistics().ok == 1, 10, "B to finish its side")
            # Both merged each other's snapshot with alpha 0.5: both now hold the average.
            average = (a_values + b_values) / 2
            for side in weights.values():
                assert torch.allclose(side.w, average, atol=1e-6)
            dst = torch.empty(numel)
            manifest = await a.fetch_model(signers["B"].peer_id, url_b, dst)
            assert manifest is not None and (manifest.schedule_step, manifest.seconds_trained) == (3, 1.5)
            assert torch.equal(dst, weights["B"].w)

            sa, sb = a.statistics(), b.statistics()
            assert (sa.ok, sa.busy, sa.refused, sa.failed) == (1, 1, 0, 0)
            assert (sb.ok, sb.busy, sb.refused, sb.failed, dict(sb.rejected)) == (1, 0, 0, 0, {})
            assert (sa.bytes_sent, sa.bytes_received) == (1_200_000, 2 * 1_200_000)  # its push; the reply, the model
            assert sb.bytes_sent == 2 * 1_200_000  # its reply and the model it served
            assert sa.last is not None and (sa.last.role, sa.last.outcome, sa.last.peer_id) == (
                "initiator", "ok", signers["B"].peer_id)
            assert sb.last is not None and sb.last.role == "responder"
            assert not sa.busy_now and (sa.incoming_now, sa.outgoing_now) == (0, 0)
            assert before.ok == 0 and before.last is None  # a snapshot never changes
            with pytest.raises(dataclasses.FrozenInstanceError):
                sa.ok = 5  # type: ignore[misc]
            a.stop_accepting()  # then our own pushes are busy at once, asking no one, counting nothing
            assert await a.exchange_with(signers["B"].peer_id, url_b) == "busy"
            assert a.statistics() is sa and b.statistics() is sb
        finally:
            await a.close()
            await b.close()

    workers_before = {t for t in threading.enumerate() if t.name.startswith(("peerfed-send", "peerfed-recv"))}
    asyncio.run(main())
    wait_until(lambda: not {t for t in threading.enumerate() if t.name.startswith(("peerfed-send", "peerfed-recv"))
                            } - workers_before, 10, "the closed Exchanges' transfer workers to end")


def test_the_gossip_loop_tries_another_peer_when_one_is_busy_and_reports_frozen_stats() -> None:
    import asyncio
    import dataclasses
    import random

    from peerfed.core.exchange_rules import Outcome
    from peerfed.core.schedule import ExchangeScheduler
    from peerfed.net.gossip import GossipLoop

    asked: list[str] = []

    async def run_exchange(peer_id: str, url: str) -> Outcome:
        asked.append(peer_id)
        return Outcome.BUSY if len(asked) == 1 else Outcome.OK

    async def main() -> GossipLoop:
        gossip = GossipLoop(scheduler=ExchangeScheduler(interval=1.0, rng=random.Random(1), now=0.0),
                            candidates=lambda: {"p1": "http://p1", "p2": "http://p2"},
                            run_exchange=run_exchange, clock=lambda: 5.0)  # one round due, then none
        task = asyncio.create_task(gossip.run())
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return gossip

    gossip = asyncio.run(main())
    assert sorted(asked) == ["p1", "p2"]  # the busy one, then the other one in the same round
    stats = gossip.statistics()
    assert (stats.rounds, stats.busy, stats.ok, stats.failed, stats.in_flight, stats.interval) == (1, 1, 1, 0, 0, 1.0)
    gossip.set_interval(2.0)
    assert stats.interval == 1.0 and gossip.statistics().interval == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.ok = 0  # type: ignore[misc]
