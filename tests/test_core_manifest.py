"""Manifests, payload digests and their trailer, streaming digests: hashing in place,
refusing wrong length or digest."""

from __future__ import annotations

import array
import hashlib
import math
import struct
import tracemalloc
from itertools import pairwise
from typing import Any

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerfed.core.errors import DigestMismatch, LengthMismatch, Malformed, Rejected
from peerfed.core.manifest import (
    DIGEST_SIZE,
    TRAILER_SIZE,
    Manifest,
    PayloadDigest,
    StreamDigest,
    digest_buffer,
    pack_trailer,
    unpack_trailer,
)

NONCE = b"\x05" * 16
MAX_LENGTH = (1 << 63) - 1


def b3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def digest_of(data: bytes, nonce: bytes = NONCE) -> PayloadDigest:
    return PayloadDigest(manifest_nonce=nonce, length=len(data), digest=b3(data))


def manifest_of(data: bytes, **kw: Any) -> Manifest:
    return Manifest(fingerprint="fp", length=len(data), sample_weight=1.0, purpose="push", **kw)


# ---------------------------------------------------------------- streaming digests

@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=12),
       kind=st.sampled_from(["bytes", "memoryview", "bytearray-view"]))
def test_stream_digest_over_random_splits(data: bytes, cuts: list[int], kind: str) -> None:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    source: Any = bytearray(data) if kind == "bytearray-view" else data
    view = memoryview(source)
    digest = StreamDigest()
    for start, end in pairwise(bounds):
        digest.update(bytes(data[start:end]) if kind == "bytes" else view[start:end])
    if not data:
        digest.update(b"")
    assert digest.length == len(data)
    assert digest.digest() == b3(data)
    assert digest.hexdigest() == blake3.blake3(data).hexdigest()
    assert len(digest.digest()) == DIGEST_SIZE
    digest.check(digest_of(data))


def test_check_rejects_wrong_digest_and_length() -> None:
    data = b"weights" * 1000
    digest = StreamDigest()
    digest.update(memoryview(data))
    good = digest_of(data)
    digest.check(good)
    with pytest.raises(DigestMismatch) as info:
        digest.check(digest_of(data[:-1] + b"X"))
    assert info.value.reason == "digest_mismatch" and isinstance(info.value, Rejected)
    with pytest.raises(LengthMismatch) as info2:
        digest.check(digest_of(data + b"!"))
    assert info2.value.reason == "length_mismatch" and isinstance(info2.value, Rejected)
    # Right digest, wrong length (and the other way round) are still refused.
    with pytest.raises(LengthMismatch):
        digest.check(PayloadDigest(manifest_nonce=NONCE, length=len(data) + 1,
                                   digest=good.digest))
    with pytest.raises(LengthMismatch):
        digest.check(PayloadDigest(manifest_nonce=NONCE, length=len(data) - 1,
                                   digest=good.digest))
    with pytest.raises(DigestMismatch):
        digest.check(PayloadDigest(manifest_nonce=NONCE, length=len(data),
                                   digest=bytes(DIGEST_SIZE)))
    # sha256 of the same bytes is not what the protocol hashes with.
    with pytest.raises(DigestMismatch):
        digest.check(PayloadDigest(manifest_nonce=NONCE, length=len(data),
                                   digest=hashlib.sha256(data).digest()))


def test_expected_length_stops_an_overlong_stream_early() -> None:
    digest = StreamDigest(expected_length=10)
    digest.update(b"12345")
    with pytest.raises(LengthMismatch):
        digest.update(b"678901")
    assert digest.length == 5  # the refused chunk was not counted
    digest.update(b"67890")
    digest.check(digest_of(b"1234567890"))
    with pytest.raises(LengthMismatch):
        digest.update(b"!")


def test_non_byte_formats_count_bytes_not_items() -> None:
    floats = array.array("f", [1.0, 2.0, 3.0])
    digest = StreamDigest()
    digest.update(memoryview(floats))
    assert digest.length == 12
    assert digest.digest() == b3(floats.tobytes())
    assert digest_buffer(memoryview(floats)) == b3(floats.tobytes())
    digest.check(digest_of(floats.tobytes()))
    with pytest.raises(ValueError):
        digest.update(memoryview(b"abcdef")[::2])  # not contiguous


def test_update_does_not_copy() -> None:
    buf = bytearray(32 << 20)
    view = memoryview(buf)
    digest = StreamDigest()
    tracemalloc.start()
    try:
        for start in range(0, len(buf), 1 << 20):
            digest.update(view[start:start + (1 << 20)])
        digest_buffer(view)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10, f"{peak} bytes allocated while hashing 32 MiB"
    assert digest.length == len(buf) and digest.digest() == b3(bytes(buf))


@settings(deadline=None, max_examples=50)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 4000))
def test_digest_buffer_equals_blake3(data: bytes, chunk: int) -> None:
    assert digest_buffer(data, chunk) == b3(data)
    assert digest_buffer(bytearray(data), chunk) == b3(data)
    assert digest_buffer(memoryview(data), chunk) == b3(data)


def test_digest_buffer_refuses_bad_chunk() -> None:
    for chunk in (0, -1):
        with pytest.raises(ValueError):
            digest_buffer(b"abc", chunk)


# ---------------------------------------------------------------- PayloadDigest on the wire

DIGEST_WIRE = PayloadDigest(manifest_nonce=NONCE, length=3, digest=b3(b"abc")).to_wire()


def test_payload_digest_wire_round_trip() -> None:
    assert list(DIGEST_WIRE) == sorted(DIGEST_WIRE)  # canonical: sorted keys
    assert set(DIGEST_WIRE) == {"manifest_nonce", "length", "digest"}
    assert PayloadDigest.from_wire(DIGEST_WIRE) == digest_of(b"abc")
    assert PayloadDigest.KIND == "payload_digest"
    for value in (digest_of(b""), digest_of(bytes(range(256)) * 40, b"\xff" * 16),
                  PayloadDigest(manifest_nonce=bytes(16), length=MAX_LENGTH,
                                digest=b"\x01" * 32)):
        assert PayloadDigest.from_wire(value.to_wire()) == value
    # A field from a newer peer is ignored.
    assert PayloadDigest.from_wire({**DIGEST_WIRE, "from_the_future": 1}) == digest_of(b"abc")


@pytest.mark.parametrize("change", [
    {"manifest_nonce": b""}, {"manifest_nonce": b"x" * 15}, {"manifest_nonce": b"x" * 17},
    {"manifest_nonce": "x" * 16}, {"manifest_nonce": None},
    {"digest": b""}, {"digest": b"x" * 31}, {"digest": b"x" * 33}, {"digest": "x" * 32},
    {"digest": None},
    {"length": -1}, {"length": True}, {"length": False}, {"length": 1.0}, {"length": 1.5},
    {"length": "3"}, {"length": None}, {"length": MAX_LENGTH + 1},
])
def test_payload_digest_from_wire_rejects_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        PayloadDigest.from_wire({**DIGEST_WIRE, **change})


@pytest.mark.parametrize("missing", ["manifest_nonce", "length", "digest"])
def test_payload_digest_from_wire_requires_fields(missing: str) -> None:
    with pytest.raises(Malformed, match=missing):
        PayloadDigest.from_wire({k: v for k, v in DIGEST_WIRE.items() if k != missing})
    with pytest.raises(Malformed):
        PayloadDigest.from_wire([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- the trailer

HOLDS = TRAILER_SIZE - 4  # after the 4-byte length


@pytest.mark.parametrize("size", [0, 1, 2, 100, 200, HOLDS - 1, HOLDS])
def test_trailer_round_trip(size: int) -> None:
    sealed = bytes((i * 7 + 1) % 256 or 1 for i in range(size))
    trailer = pack_trailer(sealed)
    assert len(trailer) == TRAILER_SIZE
    assert trailer[:4] == struct.pack(">I", size)
    assert trailer[4:4 + size] == sealed
    assert not any(trailer[4 + size:])  # zero padding
    assert unpack_trailer(trailer) == sealed
    assert unpack_trailer(bytearray(trailer)) == sealed
    assert unpack_trailer(memoryview(trailer)) == sealed


@settings(deadline=None, max_examples=200)
@given(sealed=st.binary(max_size=HOLDS))
def test_trailer_round_trip_any_bytes(sealed: bytes) -> None:
    trailer = pack_trailer(sealed)
    assert len(trailer) == TRAILER_SIZE
    assert unpack_trailer(trailer) == sealed


@pytest.mark.parametrize("size", [HOLDS + 1, TRAILER_SIZE, 3 * TRAILER_SIZE])
def test_pack_trailer_refuses_what_does_not_fit(size: int) -> None:
    with pytest.raises(ValueError):
        pack_trailer(b"x" * size)


@pytest.mark.parametrize("size", [0, 4, TRAILER_SIZE - 1, TRAILER_SIZE + 1, 2 * TRAILER_SIZE])
def test_unpack_trailer_refuses_wrong_size(size: int) -> None:
    with pytest.raises(Malformed):
        unpack_trailer(bytes(size))
    good = pack_trailer(b"abc")
    with pytest.raises(Malformed):
        unpack_trailer(good[:-1])
    with pytest.raises(Malformed):
        unpack_trailer(good + b"\0")


@pytest.mark.parametrize("announced", [HOLDS + 1, TRAILER_SIZE, (1 << 32) - 1])
def test_unpack_trailer_refuses_announced_length_too_big(announced: int) -> None:
    trailer = struct.pack(">I", announced) + bytes(HOLDS)
    assert len(trailer) == TRAILER_SIZE
    with pytest.raises(Malformed):
        unpack_trailer(trailer)
    # Just what it holds is fine.
    assert unpack_trailer(struct.pack(">I", HOLDS) + b"y" * HOLDS) == b"y" * HOLDS


@pytest.mark.parametrize("where", [0, 1, 500, HOLDS - 4])  # offsets into the padding
def test_unpack_trailer_refuses_nonzero_padding(where: int) -> None:
    trailer = bytearray(pack_trailer(b"abc"))
    trailer[4 + 3 + where] = 1
    with pytest.raises(Malformed, match="padding"):
        unpack_trailer(bytes(trailer))
    # A shorter announced length leaves the sealed bytes' tail in the padding: refused too.
    shorter = bytearray(pack_trailer(b"abc"))
    shorter[:4] = struct.pack(">I", 2)
    with pytest.raises(Malformed):
        unpack_trailer(bytes(shorter))


# ---------------------------------------------------------------- Manifest on the wire

WIRE = manifest_of(b"abc", in_reply_to=b"\x01" * 16).to_wire()


def test_wire_round_trip_and_defaults() -> None:
    assert list(WIRE) == sorted(WIRE)  # canonical: sorted keys
    assert "digest" not in WIRE  # the digest follows the payload, in a PayloadDigest
    assert Manifest.from_wire(WIRE) == manifest_of(b"abc", in_reply_to=b"\x01" * 16)
    old_peer = {k: v for k, v in WIRE.items() if k != "in_reply_to"}
    assert Manifest.from_wire({**old_peer, "from_the_future": 1}).in_reply_to == b""
    assert Manifest.from_wire({**WIRE, "sample_weight": 2}).sample_weight == 2.0
    assert Manifest.from_wire({**WIRE, "length": MAX_LENGTH}).length == MAX_LENGTH
    assert "schedule_step" not in WIRE and "seconds_trained" not in WIRE  # only a model's manifest


def test_a_models_manifest_carries_the_lr_schedule_clock() -> None:
    model = Manifest(fingerprint="fp", length=8, sample_weight=3.0, purpose="model",
                     in_reply_to=b"\x02" * 16, schedule_step=1234, seconds_trained=56.5)
    wire = model.to_wire()
    assert list(wire) == sorted(wire) and wire["schedule_step"] == 1234 and wire["seconds_trained"] == 56.5
    assert Manifest.from_wire(wire) == model
    older = {k: v for k, v in wire.items() if k not in ("schedule_step", "seconds_trained")}
    assert (Manifest.from_wire(older).schedule_step, Manifest.from_wire(older).seconds_trained) == (0, 0.0)
    assert Manifest.from_wire({**wire, "seconds_trained": 7}).seconds_trained == 7.0


@pytest.mark.parametrize("change", [
    {"length": True}, {"length": -1}, {"length": 1.5}, {"length": "3"},
    {"length": MAX_LENGTH + 1}, {"sample_weight": math.nan},
    {"sample_weight": math.inf}, {"sample_weight": -1.0}, {"sample_weight": False},
    {"purpose": "other"}, {"purpose": 1}, {"fingerprint": b"fp"}, {"fingerprint": "f" * 257},
    {"in_reply_to": b"x" * 5}, {"in_reply_to": None},
    {"schedule_step": -1}, {"schedule_step": 1.0}, {"schedule_step": True}, {"schedule_step": MAX_LENGTH + 1},
    {"seconds_trained": math.nan}, {"seconds_trained": math.inf}, {"seconds_trained": -0.5},
    {"seconds_trained": "1"},
])
def test_from_wire_rejects_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        Manifest.from_wire({**WIRE, **change})


@pytest.mark.parametrize("missing", ["fingerprint", "length", "sample_weight", "purpose"])
def test_from_wire_requires_fields(missing: str) -> None:
    with pytest.raises(Malformed, match=missing):
        Manifest.from_wire({k: v for k, v in WIRE.items() if k != missing})
    with pytest.raises(Malformed):
        Manifest.from_wire([1, 2])  # type: ignore[arg-type]
