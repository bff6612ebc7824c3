"""Weights on the wire in every encoding, through the exchange's real send and receive path
(net/wire.py over transfer.py): what is sent, what the digest covers, what the receiver decodes,
and what it refuses. In memory: the sender writes into a list of chunks, the receiver reads them
from an aiohttp StreamReader cut at arbitrary places; manifests and trailers are really signed.
"""

from __future__ import annotations

import asyncio
import json
import time
from itertools import pairwise
from typing import Any
from unittest import mock

import pytest
import torch
from aiohttp import StreamReader
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerfed import codecs
from peerfed.core.encodings import EncodingChoice
from peerfed.core.envelope import Envelope, Verifier, seal
from peerfed.core.errors import DigestMismatch
from peerfed.core.exchange_rules import (
    ModelShape,
    Room,
    check_push,
    check_reply,
    wire_length,
)
from peerfed.core.manifest import Manifest
from peerfed.core.peerid import Signer
from peerfed.net.transfer import Slot, digest_sealer, nonce_of
from peerfed.net.wire import CannotEncode, Wire

NETWORK = "wire-test"
SENDER, RECEIVER = Signer.generate(), Signer.generate()
ROOM = Room(accepting=True, weights_ready=True, incoming=0, max_incoming=1, outgoing=False, free_slots=2)


class MemoryWeights:
    """The Weights a Wire reads: a flat tensor in memory."""

    fingerprint = "f" * 64
    num_samples = 100

    def __init__(self, values: torch.Tensor) -> None:
        self.w = values.clone()
        self.nbytes = self.w.numel() * 4

    def lr_clock(self) -> tuple[int, float]:
        return 0, 0.0

    def begin_snapshot(self) -> None:
        pass

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None:
        dst[start:stop].copy_(self.w[start:stop])

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None:
        raise AssertionError("not used here")


class Collect:
    """An aiohttp writer that keeps a copy of every chunk written."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    async def write(self, chunk: Any) -> None:
        self.chunks.append(bytes(chunk))

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def verifier_of(signer: Signer) -> Verifier:
    return Verifier(network=NETWORK, own_peer_id=signer.peer_id, clock=time.time, max_size=4096)


def reader_of(data: bytes, cuts: list[int]) -> StreamReader:
    """A StreamReader holding ``data``, its chunks cut at ``cuts`` (sorted offsets)."""
    reader = StreamReader(mock.Mock(_reading_paused=False), 2**30, loop=asyncio.get_running_loop())
    edges = [0, *sorted(c for c in cuts if 0 < c < len(data)), len(data)]
    for a, b in pairwise(edges):
        if b > a:
            reader.feed_data(data[a:b])
    reader.feed_eof()
    return reader


async def send(values: torch.Tensor, encoding: str) -> tuple[Envelope, bytes, Slot]:
    """Our manifest (as the receiver verified it), the bytes we sent, and the slot we sent from."""
    wire, weights = Wire(encoding, verifier_of(SENDER)), MemoryWeights(values)
    slot = Slot(values.numel())
    manifest = wire.manifest(weights, encoding, "push")
    sealed = seal(SENDER, network=NETWORK, recipient=RECEIVER.peer_id, body=manifest, now=time.time())
    writer = Collect()
    sent = await wire.send(writer, weights, slot, encoding, digest_sealer(SENDER, NETWORK, RECEIVER.peer_id,
                                                                          nonce_of(sealed)))
    assert sent == manifest.length == codecs.wire_length(encoding, values.numel())
    assert len(writer.data) == wire_length(manifest.length)  # the payload and the trailer
    return verifier_of(RECEIVER).verify(sealed, expected_kind=Manifest), writer.data, slot


async def receive(env: Envelope, data: bytes, cuts: list[int]) -> tuple[torch.Tensor, str | None, int]:
    """What the receiver decodes, the value check's verdict, and the wire bytes it counted."""
    recv = torch.full((_numel(env.body),), 7.0)
    values, receiving = Wire("auto", verifier_of(RECEIVER)).receive_checked(reader_of(data, cuts), recv, env)
    got = await receiving
    return recv, values.problem(), got


def _numel(m: Manifest) -> int:
    if m.encoding != "int8":
        return m.length // {"float32": 4, "float16": 2, "bfloat16": 2}[m.encoding]
    return m.length - m.blocks * codecs.SCALE_BYTES


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@st.composite
def weights_and_cuts(draw: st.DrawFn) -> tuple[torch.Tensor, list[int]]:
    n = draw(st.sampled_from([1, 5, 2047, 2048, 2049, 3 * 2048 + 17, 70_000]))
    scale = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    seed = draw(st.integers(0, 2**31))
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale
    if draw(st.booleans()):
        values[draw(st.integers(0, n - 1))] = 0.0
    cuts = draw(st.lists(st.integers(1, 400_000), max_size=12))
    return values, cuts


@given(encoding=st.sampled_from(codecs.ENCODINGS), case=weights_and_cuts())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_encoding_round_trips_through_send_and_receive(encoding: str, case: Any) -> None:
    values, cuts = case

    async def main() -> None:
        env, data, slot = await send(values, encoding)
        assert env.body.encoding == encoding and env.body.blocks == codecs.block_count(encoding, values.numel())
        recv, problem, got = await receive(env, data, cuts)
        assert problem is None and got == env.body.length
        # The sender's buffer holds exactly what the peer decoded: the base of its merge.
        assert torch.equal(recv, slot.send), encoding
        expected = torch.empty_like(values)
        codecs.decode_into(encoding, data[:env.body.length], expected)
        assert torch.equal(recv, expected)
        if encoding == "float32":
            assert torch.equal(recv, values)
        else:
            tolerance = {"float16": 1e-3, "bfloat16": 8e-3, "int8": 4.1e-3}[encoding]
            assert float((recv - values).abs().max()) <= tolerance * float(values.abs().max()) + 1e-7

    run(main())


@pytest.mark.parametrize("encoding", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_weights_cannot_be_sent_encoded(encoding: str, bad: float) -> None:
    values = torch.randn(5000)
    values[4321] = bad
    with pytest.raises(CannotEncode, match="4321") as info:
        run(send(values, encoding))
    assert not info.value.out_of_range


def test_float16_out_of_range_is_refused_and_no_longer_offered() -> None:
    wire = Wire("float16", verifier_of(SENDER))
    values = torch.randn(3000)
    values[10] = 1e6
    slot, weights = Slot(3000), MemoryWeights(values)
    with pytest.raises(CannotEncode, match="range"):
        run(wire.send(Collect(), weights, slot, "float16", digest_sealer(SENDER, NETWORK, RECEIVER.peer_id,
                                                                          b"\0" * 16)))
    assert wire.choice.offer("peer") == "float32" and "float16" in wire.choice.accepts
    # Non-finite weights are no reason to give up an encoding.
    int8 = Wire("int8", verifier_of(SENDER))
    values[10] = float("nan")
    with pytest.raises(CannotEncode, match="not finite"):
        run(int8.send(Collect(), MemoryWeights(values), Slot(3000), "int8",
                      digest_sealer(SENDER, NETWORK, RECEIVER.peer_id, b"\0" * 16)))
    assert int8.choice.offer("peer") == "int8"


@pytest.mark.parametrize("encoding", codecs.ENCODINGS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_values_on_the_wire_are_refused_by_the_value_check(encoding: str, bad: float) -> None:
    """A hostile sender puts inf/nan into an honestly signed payload: decoded, then refused."""
    problem = run(_hostile_payload(torch.randn(5000), encoding, bad))
    assert problem is not None and "non-finite" in problem


async def _hostile_payload(values: torch.Tensor, encoding: str, bad: float) -> str | None:
    env, data, _ = await send(values, encoding)
    payload = bytearray(data[:env.body.length])
    if encoding == "int8":  # a scale of inf (or nan) in the second block
        payload[codecs.INT8_RECORD:codecs.INT8_RECORD + 4] = torch.tensor([bad]).numpy().tobytes()
    else:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[encoding]
        size = codecs.wire_length(encoding, 1)
        payload[3000 * size:3001 * size] = torch.tensor([bad], dtype=dtype).view(torch.uint8).numpy().tobytes()
    _, problem, _ = await receive(env, resealed(env, bytes(payload)), [1000, 5000])
    return problem


def resealed(env: Envelope, payload: bytes) -> bytes:
    """``payload`` with a trailer the sender signs for it (a hostile but key-holding sender)."""
    from peerfed.core.manifest import PayloadDigest, digest_buffer, pack_trailer

    body = PayloadDigest(manifest_nonce=env.nonce, length=len(payload), digest=digest_buffer(payload))
    return payload + pack_trailer(seal(SENDER, network=NETWORK, recipient=RECEIVER.peer_id, body=body,
                                       now=time.time()))


def test_tampered_int8_scale_is_caught_by_the_digest() -> None:
    values = torch.randn(3 * 2048 + 5)

    async def main() -> None:
        env, data, _ = await send(values, "int8")
        tampered = bytearray(data)
        tampered[codecs.INT8_RECORD + 1] ^= 0x01  # the second block's scale, a few ulps off
        with pytest.raises(DigestMismatch):
            await receive(env, bytes(tampered), [100, 4000])

    run(main())


# -- manifests that lie: the rules refuse them before a byte ---------------------------------------

def _push(manifest: Manifest) -> Envelope:
    sealed = seal(SENDER, network=NETWORK, recipient=RECEIVER.peer_id, body=manifest, now=time.time())
    return verifier_of(RECEIVER).verify(sealed, expected_kind=Manifest)


@pytest.mark.parametrize(("encoding", "length", "blocks", "status"), [
    ("int8", codecs.wire_length("int8", 10_000), codecs.block_count("int8", 10_000), None),
    ("int8", codecs.wire_length("float16", 10_000), codecs.block_count("int8", 10_000), 413),  # length of another
    ("int8", codecs.wire_length("int8", 10_000), codecs.block_count("int8", 10_000) + 1, 413),  # one block more
    ("int8", codecs.wire_length("int8", 10_000), 0, 413),  # blocks left out
    ("float16", codecs.wire_length("float16", 10_000), 5, 413),  # scales where there are none
    ("float16", codecs.wire_length("int8", 10_000), 0, 413),  # says float16, has int8's length
    ("float32", 40_000, 0, None),
    ("int4", 5_000, 0, 415),
])
def test_a_manifest_lying_about_its_encoding_or_block_count_is_refused(
        encoding: str, length: int, blocks: int, status: int | None) -> None:
    ours = ModelShape("f" * 64, 40_000)
    env = _push(Manifest(fingerprint="f" * 64, length=length, sample_weight=1.0, purpose="push",
                         encoding=encoding, blocks=blocks))
    refusal = check_push(env, ours=ours, content_length=wire_length(length), room=ROOM,
                         accepts=("int8", "float16", "float32"))
    assert (refusal.status if refusal else None) == status, refusal
    if status == 415:
        assert refusal is not None and refusal.accepts == ("int8", "float16", "float32")
        assert "int4" in refusal.detail


def test_an_encoding_we_do_not_accept_is_answered_415_with_what_we_accept() -> None:
    ours = ModelShape("f" * 64, 40_000)
    env = _push(Manifest(fingerprint="f" * 64, length=codecs.wire_length("int8", 10_000), sample_weight=1.0,
                         purpose="push", encoding="int8", blocks=codecs.block_count("int8", 10_000)))
    refusal = check_push(env, ours=ours, content_length=wire_length(env.body.length), room=ROOM)
    assert refusal is not None and (refusal.status, refusal.reason) == (415, "unsupported_encoding")
    assert refusal.accepts == ("float32",)
    # The initiator reads the answer and asks again in one both accept.
    wire = Wire("int8", verifier_of(SENDER))
    answer = json.dumps({"error": refusal.detail, "accepts": list(refusal.accepts)})
    assert wire.retry_after_415("peer", "int8", answer) == "float32"
    assert wire.choice.offer("peer") == "float32"  # and remembers it
    assert wire.retry_after_415("other", "int8", '{"accepts": ["int8"]}') is None  # nothing else in common
    assert wire.retry_after_415("old", "int8", "not json") == "float32"


def test_a_reply_in_an_encoding_we_did_not_offer_is_refused() -> None:
    ours = ModelShape("f" * 64, 40_000)
    push = b"\1" * 16
    reply = Manifest(fingerprint="f" * 64, length=20_000, sample_weight=1.0, purpose="reply", in_reply_to=push,
                     encoding="float16")
    sealed = seal(SENDER, network=NETWORK, recipient=RECEIVER.peer_id, body=reply, now=time.time())
    env = verifier_of(RECEIVER).verify(sealed, expected_kind=Manifest)
    refusal = check_reply(env, peer_id=SENDER.peer_id, push_nonce=push, ours=ours, accepts=("int8", "float32"))
    assert refusal is not None and refusal.status == 415
    assert check_reply(env, peer_id=SENDER.peer_id, push_nonce=push, ours=ours, accepts=("float16",)) is None


def test_encoding_choice() -> None:
    auto = EncodingChoice("auto")
    assert auto.accepts == ("int8", "float16", "bfloat16", "float32") and auto.offer("x") == "int8"
    assert EncodingChoice("float32").accepts == ("float32",)
    assert EncodingChoice("bfloat16").accepts == ("bfloat16", "float32")
    auto.learn("x", ["float16", "float32"])
    assert auto.offer("x") == "float16"
    assert auto.reply_encoding([]) == "float32"  # a peer from before encodings
    assert auto.reply_encoding(["bfloat16", "int8"]) == "int8"
    few = EncodingChoice("auto", max_peers=2)
    for peer in ("a", "b", "c"):
        few.learn(peer, ["float32"])
    assert few.offer("a") == "int8" and few.offer("c") == "float32"  # "a" was forgotten


def test_manifest_wire_form_keeps_old_peers_signatures() -> None:
    plain = Manifest(fingerprint="f", length=4, sample_weight=1.0, purpose="push")
    assert "encoding" not in plain.to_wire() and "accepts" not in plain.to_wire()
    full = Manifest(fingerprint="f", length=2052, sample_weight=1.0, purpose="push", encoding="int8", blocks=1,
                    accepts=("int8", "float32"))
    assert Manifest.from_wire(full.to_wire()) == full
    assert Manifest.from_wire(plain.to_wire()) == plain


# -- two Exchanges in this process, over HTTP on 127.0.0.1 ----------------------------------------

class MergingWeights(MemoryWeights):
    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None:
        self.w.add_(alpha * (received - sent))


async def _pair(enc_a: str, enc_b: str, numel: int = 50_000) -> dict[str, Any]:
    from peerfed.net.exchange import Exchange

    a_values, b_values = torch.randn(numel), torch.randn(numel) + 1.0
    weights = {"A": MergingWeights(a_values), "B": MergingWeights(b_values)}
    signers = {"A": SENDER, "B": RECEIVER}
    exchanges = {name: Exchange(signer=signers[name], network=NETWORK, weights=weights[name],
                                verifier=verifier_of(signers[name]), max_incoming=1, connect_timeout=5.0,
                                transfer_timeout=30.0, encoding=enc)
                 for name, enc in (("A", enc_a), ("B", enc_b))}
    try:
        port = await exchanges["B"].start_server("127.0.0.1", 0)
        for exchange in exchanges.values():
            exchange.set_weights_ready(True)
        outcome = await exchanges["A"].exchange_with(RECEIVER.peer_id, f"http://127.0.0.1:{port}")
        for _ in range(100):
            if exchanges["B"].statistics().last is not None:
                break
            await asyncio.sleep(0.05)
        return {"outcome": outcome, "a": exchanges["A"].statistics(), "b": exchanges["B"].statistics(),
                "wa": weights["A"].w, "wb": weights["B"].w, "a0": a_values, "b0": b_values}
    finally:
        for exchange in exchanges.values():
            await exchange.close()


@pytest.mark.parametrize("encoding", ["int8", "float16", "bfloat16"])
def test_an_encoded_exchange_merges_what_was_sent_and_counts_wire_bytes(encoding: str) -> None:
    r = run(_pair(encoding, "auto"))
    assert r["outcome"] == "ok" and r["b"].ok == 1, r
    wire = codecs.wire_length(encoding, 50_000)
    # B replies in the first of its preferences that A accepts: A's own encoding (and float32).
    assert (r["a"].bytes_sent, r["a"].bytes_received) == (wire, wire)
    assert (r["b"].bytes_sent, r["b"].bytes_received) == (wire, wire)
    # Each side merged against the rounded values it sent: the pair keeps its sum exactly...
    assert torch.allclose(r["wa"] + r["wb"], r["a0"] + r["b0"], atol=1e-5)
    # ...and both moved halfway, up to the encoding's rounding.
    average = (r["a0"] + r["b0"]) / 2
    assert float((r["wa"] - average).abs().max()) < 0.05 and float((r["wb"] - average).abs().max()) < 0.05


def test_a_peer_that_does_not_take_our_encoding_answers_415_and_we_retry_in_float32() -> None:
    r = run(_pair("int8", "float32"))
    assert r["outcome"] == "ok", r
    # One exchange, in float32, counted once on each side; B counted the 415 as a rejection.
    assert (r["a"].ok, r["a"].refused, r["a"].failed) == (1, 0, 0)
    assert (r["b"].ok, dict(r["b"].rejected)) == (1, {"unsupported_encoding": 1})
    assert r["a"].bytes_sent == r["b"].bytes_sent == 50_000 * 4
    average = (r["a0"] + r["b0"]) / 2
    assert torch.allclose(r["wa"], average, atol=1e-6) and torch.allclose(r["wb"], average, atol=1e-6)
