"""Manifests and streaming digests: hashing in place, refusing wrong length or digest."""

from __future__ import annotations

import array
import hashlib
import math
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerfed.core.errors import DigestMismatch, LengthMismatch, Malformed, Rejected
from peerfed.core.manifest import Manifest, StreamDigest, digest_buffer


def manifest_of(data: bytes, **kw: Any) -> Manifest:
    return Manifest(fingerprint="fp", length=len(data), digest=hashlib.sha256(data).digest(),
                    sample_weight=1.0, purpose="push", **kw)


@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=12),
       kind=st.sampled_from(["bytes", "memoryview", "bytearray-view"]))
def test_stream_digest_over_random_splits(data: bytes, cuts: list[int], kind: str) -> None:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    source: Any = bytearray(data) if kind == "bytearray-view" else data
    view = memoryview(source)
    digest = StreamDigest()
    for start, end in zip(bounds, bounds[1:]):
        digest.update(bytes(data[start:end]) if kind == "bytes" else view[start:end])
    if not data:
        digest.update(b"")
    assert digest.length == len(data)
    assert digest.digest() == hashlib.sha256(data).digest()
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    digest.check(manifest_of(data))


def test_check_rejects_wrong_digest_and_length() -> None:
    data = b"weights" * 1000
    digest = StreamDigest()
    digest.update(memoryview(data))
    good = manifest_of(data)
    digest.check(good)
    with pytest.raises(DigestMismatch) as info:
        digest.check(manifest_of(data[:-1] + b"X"))
    assert info.value.reason == "digest_mismatch" and isinstance(info.value, Rejected)
    with pytest.raises(LengthMismatch) as info2:
        digest.check(manifest_of(data + b"!"))
    assert info2.value.reason == "length_mismatch"
    # Right digest, wrong length (and the other way round) are still refused.
    with pytest.raises(LengthMismatch):
        digest.check(Manifest(fingerprint="fp", length=len(data) + 1, digest=good.digest,
                              sample_weight=1.0, purpose="push"))


def test_expected_length_stops_an_overlong_stream_early() -> None:
    digest = StreamDigest(expected_length=10)
    digest.update(b"12345")
    with pytest.raises(LengthMismatch):
        digest.update(b"678901")
    assert digest.length == 5  # the refused chunk was not counted
    digest.update(b"67890")
    digest.check(manifest_of(b"1234567890"))


def test_non_byte_formats_count_bytes_not_items() -> None:
    floats = array.array("f", [1.0, 2.0, 3.0])
    digest = StreamDigest()
    digest.update(memoryview(floats))
    assert digest.length == 12
    assert digest.digest() == hashlib.sha256(floats.tobytes()).digest()
    assert digest_buffer(memoryview(floats)) == hashlib.sha256(floats.tobytes()).digest()
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


@settings(deadline=None, max_examples=50)
@given(data=st.binary(max_size=3000), chunk=st.integers(1, 4000))
def test_digest_buffer_equals_hashlib(data: bytes, chunk: int) -> None:
    assert digest_buffer(data, chunk) == hashlib.sha256(data).digest()
    assert digest_buffer(bytearray(data), chunk) == hashlib.sha256(data).digest()


def test_for_buffer() -> None:
    data = bytes(range(256)) * 40
    m = Manifest.for_buffer(memoryview(data), fingerprint="f", sample_weight=3.0,
                            purpose="model")
    assert m == Manifest(fingerprint="f", length=len(data), digest=hashlib.sha256(data).digest(),
                         sample_weight=3.0, purpose="model")
    with pytest.raises(ValueError):
        digest_buffer(data, 0)


WIRE = manifest_of(b"abc", in_reply_to=b"\x01" * 16).to_wire()


def test_wire_round_trip_and_defaults() -> None:
    assert list(WIRE) == sorted(WIRE)  # canonical: sorted keys
    assert Manifest.from_wire(WIRE) == manifest_of(b"abc", in_reply_to=b"\x01" * 16)
    old_peer = {k: v for k, v in WIRE.items() if k != "in_reply_to"}
    assert Manifest.from_wire({**old_peer, "from_the_future": 1}).in_reply_to == b""
    assert Manifest.from_wire({**WIRE, "sample_weight": 2}).sample_weight == 2.0


@pytest.mark.parametrize("change", [
    {"length": True}, {"length": -1}, {"length": 1.5}, {"length": "3"},
    {"digest": b"x" * 31}, {"digest": "x" * 32}, {"sample_weight": math.nan},
    {"sample_weight": math.inf}, {"sample_weight": -1.0}, {"sample_weight": False},
    {"purpose": "other"}, {"purpose": 1}, {"fingerprint": b"fp"}, {"fingerprint": "f" * 257},
    {"in_reply_to": b"x" * 5}, {"in_reply_to": None},
])
def test_from_wire_rejects_bad_fields(change: dict[str, Any]) -> None:
    with pytest.raises(Malformed):
        Manifest.from_wire({**WIRE, **change})


@pytest.mark.parametrize("missing", ["fingerprint", "length", "digest", "sample_weight",
                                     "purpose"])
def test_from_wire_requires_fields(missing: str) -> None:
    with pytest.raises(Malformed, match=missing):
        Manifest.from_wire({k: v for k, v in WIRE.items() if k != missing})
    with pytest.raises(Malformed):
        Manifest.from_wire([1, 2])  # type: ignore[arg-type]
