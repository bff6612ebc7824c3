"""Wire encodings: round trips and their error bounds, streaming decode, refusals, negotiation."""

from __future__ import annotations

import itertools
import math
import random
import warnings
from itertools import pairwise

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerfed import codecs
from peerfed.averaging import ValueCheck
from peerfed.codecs import (
    ENCODINGS,
    INT8_BLOCK,
    INT8_RECORD,
    NotEncodable,
    WireDecoder,
    WireLengthError,
    choose_encoding,
    decodable,
    decode_into,
    encode_into,
    spans,
    wire_length,
    wire_offset,
)

F16_MAX = 65504.0
SUBNORMAL_F32 = 2.0**-149


def encode(encoding: str, values: torch.Tensor) -> bytearray:
    wire = bytearray(wire_length(encoding, values.numel()))
    encode_into(encoding, values, wire)
    return wire


def decode(encoding: str, wire: bytes | bytearray, numel: int) -> torch.Tensor:
    out = torch.empty(numel)
    decode_into(encoding, bytes(wire), out)
    return out


def error_bound(encoding: str, x: torch.Tensor) -> torch.Tensor:
    """The largest |decoded - x| each element may have (round to nearest in each format)."""
    ax = x.abs()
    if encoding == "float32":
        return torch.zeros_like(x)
    if encoding == "float16":  # 11 significant bits; subnormals step by 2^-24
        return torch.maximum(ax * 2.0**-11, torch.full_like(x, 2.0**-25))
    if encoding == "bfloat16":  # 8 significant bits, float32's exponent range
        return torch.maximum(ax * 2.0**-8, torch.full_like(x, 2.0**-134))
    # int8: half a step of the block's scale (absmax / 127), float rounding, and for blocks
    # whose scale is subnormal (or 0) the coarseness of that scale.
    bound = torch.empty_like(x)
    for start in range(0, x.numel(), INT8_BLOCK):
        block_max = float(ax[start:start + INT8_BLOCK].max())
        bound[start:start + INT8_BLOCK] = block_max / 254 * (1 + 1e-5) + 128 * SUBNORMAL_F32
    return bound


@st.composite
def weight_vectors(draw: st.DrawFn, max_len: int = 3 * INT8_BLOCK + 100) -> torch.Tensor:
    """Weights of random length (often not a multiple of the block): normal values at a random
    scale, with zeros, subnormals, large magnitudes and hypothesis' own floats spliced in."""
    n = draw(st.integers(0, max_len))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(n, generator=gen) * 10.0 ** draw(st.integers(-6, 4))
    if n:
        specials = draw(st.lists(st.one_of(
            st.just(0.0), st.just(-0.0), st.just(SUBNORMAL_F32), st.just(-3.0e-42),
            st.just(1.0e30), st.just(-2.5e4),
            st.floats(width=32, allow_nan=False, allow_infinity=False),
        ), max_size=40))
        rng = random.Random(draw(st.integers(0, 2**31)))
        for value in specials:
            x[rng.randrange(n)] = value
        if draw(st.booleans()):  # a run of zeros: all-zero blocks have scale 0
            a = rng.randrange(n)
            x[a:a + INT8_BLOCK] = 0.0
    return x


@settings(max_examples=60, deadline=None)
@given(encoding=st.sampled_from(ENCODINGS), x=weight_vectors())
def test_round_trip_within_the_encodings_error_bound(encoding: str, x: torch.Tensor) -> None:
    if encoding in ("float16", "bfloat16"):  # beyond the largest finite value both refuse (a test below)
        limit = torch.finfo(torch.float16 if encoding == "float16" else torch.bfloat16).max
        x = x.clamp(-limit, limit)
    wire = encode(encoding, x)
    assert len(wire) == wire_length(encoding, x.numel())
    y = decode(encoding, wire, x.numel())
    assert bool(torch.isfinite(y).all())
    err = (y.double() - x.double()).abs()
    bound = error_bound(encoding, x).double()
    worst = int(torch.argmax(err - bound)) if x.numel() else 0
    assert bool((err <= bound).all()), f"{encoding}: x={float(x[worst])!r} decoded {float(y[worst])!r}"
    assert bool((y[x == 0] == 0).all())  # zeros stay zeros


@settings(max_examples=60, deadline=None)
@given(encoding=st.sampled_from(ENCODINGS), x=weight_vectors(), data=st.data())
def test_decoding_in_random_pieces_equals_decoding_whole(encoding: str, x: torch.Tensor, data: st.DataObject) -> None:
    x = x.clamp(-F16_MAX, F16_MAX)
    wire = bytes(encode(encoding, x))
    whole = decode(encoding, wire, x.numel())
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    # Stages that end mid-unit (3, 5, 4096, 2 * 2052 + 1), below one unit (1), and the default.
    stage = data.draw(st.sampled_from([1, 3, 5, 4096, 2 * INT8_RECORD + 1, codecs.STAGE_BYTES]))
    # Pieces at least this long are decoded where they lie (1: all of them; the default: none here).
    direct = data.draw(st.sampled_from([1, 7, 3000, codecs.DIRECT_BYTES]))
    dest = torch.full((x.numel(),), math.nan)
    decoder = WireDecoder(encoding, dest, stage_bytes=stage, direct_bytes=direct)
    for a, b in pairwise([0, *cuts, len(wire)]):
        done = decoder.feed(wire[a:b])
        assert done <= decodable(encoding, b, x.numel())  # never ahead of the bytes
        assert torch.equal(dest[:done], whole[:done])  # final values, front to back
        assert bool(dest[done:].isnan().all())  # nothing written past them
    decoder.finish()
    assert decoder.complete and torch.equal(dest, whole)


@pytest.mark.parametrize(("encoding", "stage"), [("int8", 4096), ("float16", 5), ("bfloat16", 3)])
@pytest.mark.parametrize("pieces", [[999], [70_000, 1, 65_536, 3], [100_003]])
def test_stages_that_end_mid_unit_carry_the_rest_over(encoding: str, stage: int, pieces: list[int]) -> None:
    """Small pieces go through the stage, pieces of 64 KiB and more are decoded where they lie."""
    x = torch.randn(40 * INT8_BLOCK + 5)
    wire = bytes(encode(encoding, x))
    dest = torch.empty(x.numel())
    decoder = WireDecoder(encoding, dest, stage_bytes=stage)
    start, sizes = 0, itertools.cycle(pieces)
    while start < len(wire):
        size = next(sizes)
        decoder.feed(wire[start:start + size])
        start += size
    decoder.finish()
    assert torch.equal(dest, decode(encoding, wire, x.numel()))


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_values_are_refused_with_their_index(encoding: str, bad: float) -> None:
    x = torch.randn(5000)
    x[4321] = bad
    with pytest.raises(NotEncodable, match="index 4321 is not finite"):
        encode(encoding, x)
    with pytest.raises(NotEncodable, match="index 4331"):  # first_index shifts the message
        encode_into(encoding, x, bytearray(wire_length(encoding, 5000)), first_index=10)


def test_float16_refuses_what_would_arrive_as_infinity_and_bfloat16_takes_it() -> None:
    x = torch.zeros(10)
    x[7] = 70000.0
    with pytest.raises(NotEncodable, match=r"index 7 is outside float16's range"):
        encode("float16", x)
    x[7] = F16_MAX  # the largest float16 passes
    assert float(decode("float16", encode("float16", x), 10)[7]) == F16_MAX
    x[7] = 3.0e38
    assert math.isclose(float(decode("bfloat16", encode("bfloat16", x), 10)[7]), 3.0e38, rel_tol=2**-8)


def test_decoded_peer_infinities_reach_the_value_check() -> None:
    """Decoding never refuses: a hostile inf (or an inf scale times 0 = nan) lands and
    ValueCheck, fed as elements become final, rejects it."""
    x = torch.randn(3000)
    wire = encode("int8", x)
    wire[INT8_RECORD:INT8_RECORD + 4] = torch.tensor([math.inf]).numpy().tobytes()
    dest = torch.empty(3000)
    check = ValueCheck(dest)
    check.advance(WireDecoder("int8", dest).feed(bytes(wire)))
    assert check.problem() is not None and "non-finite" in check.problem()
    half = bytearray(encode("float16", x))
    half[10:12] = torch.tensor([math.inf], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    assert "non-finite value at index 5" in (ValueCheck(decode("float16", half, 3000)).problem() or "")


def test_a_tampered_int8_scale_changes_that_blocks_values_only() -> None:
    """So a digest over the wire bytes catches it: the scales are part of what is hashed, and
    a changed scale is a changed model."""
    x = torch.randn(3 * INT8_BLOCK + 7)
    wire = encode("int8", x)
    honest = decode("int8", wire, x.numel())
    tampered = bytearray(wire)
    tampered[INT8_RECORD + 2] ^= 0x01  # a bit of block 1's scale
    changed = decode("int8", tampered, x.numel())
    differs = changed != honest
    assert bool(differs[INT8_BLOCK:2 * INT8_BLOCK].any())
    assert not bool(differs[:INT8_BLOCK].any()) and not bool(differs[2 * INT8_BLOCK:].any())


def test_int8_cuts_the_wire_to_under_a_third_of_float32() -> None:
    digits_mlp = 64 * 32 + 32 + 32 * 10 + 10
    for numel in (digits_mlp, 100 * 2**20 // 4):
        assert wire_length("int8", numel) <= 0.3 * wire_length("float32", numel)
    assert wire_length("int8", digits_mlp) == INT8_RECORD + 4 + (digits_mlp - INT8_BLOCK)
    assert codecs.block_count("int8", digits_mlp) == 2 and codecs.block_count("float16", digits_mlp) == 0


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("numel", [0, 1, INT8_BLOCK, 5 * INT8_BLOCK + 3])
def test_spans_tile_the_buffer_and_encode_to_the_same_bytes_as_whole(encoding: str, numel: int) -> None:
    x = torch.randn(numel)
    cut = spans(encoding, numel, 3000)
    assert [s.start for s in cut] == [0, *[s.stop for s in cut[:-1]]][:len(cut)]
    longest = INT8_BLOCK if encoding == "int8" else 3000  # int8: whole blocks
    assert all(0 < s.stop - s.start <= longest for s in cut)
    assert sum(s.wire_stop - s.wire_start for s in cut) == wire_length(encoding, numel)
    assert cut[-1].stop == numel if numel else cut == []
    wire = bytearray(wire_length(encoding, numel))
    view = memoryview(wire)
    for s in cut:
        assert s.wire_start == wire_offset(encoding, s.start, numel)
        encode_into(encoding, x[s.start:s.stop], view[s.wire_start:s.wire_stop])
    assert wire == encode(encoding, x)


def test_int8_offsets_must_start_a_block() -> None:
    with pytest.raises(ValueError, match="block boundary"):
        wire_offset("int8", 100, 5000)
    assert wire_offset("int8", 5000, 5000) == wire_length("int8", 5000)


def test_length_mismatches_are_refused() -> None:
    x = torch.randn(100)
    with pytest.raises(WireLengthError):
        encode_into("float16", x, bytearray(199))
    with pytest.raises(WireLengthError):
        decode_into("float16", bytes(201), torch.empty(100))
    decoder = WireDecoder("float16", torch.empty(100))
    decoder.feed(bytes(150))
    with pytest.raises(WireLengthError, match="150 of 200"):
        decoder.finish()
    with pytest.raises(WireLengthError, match="more than the 200 bytes"):
        decoder.feed(bytes(51))


def test_read_only_input_decodes_without_warnings() -> None:
    wire = bytes(encode("bfloat16", torch.ones(10)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(decode("bfloat16", wire, 10), torch.ones(10))
        WireDecoder("bfloat16", torch.empty(10)).feed(wire)


def test_misaligned_pieces_decode_the_same() -> None:
    x = torch.randn(1000)
    wire = bytes(encode("float16", x))
    shifted = memoryview(b"\x00" + wire)[1:]  # the values start at an odd address
    out = torch.empty(1000)
    decode_into("float16", shifted, out)
    assert torch.equal(out, decode("float16", wire, 1000))


def test_choose_encoding_takes_our_first_preference_they_accept() -> None:
    everything = set(ENCODINGS)
    assert choose_encoding(["auto"], everything) == "int8"
    assert choose_encoding(["auto"], {"float32", "bfloat16", "float16"}) == "float16"
    assert choose_encoding(["auto"], {"float32"}) == "float32"
    assert choose_encoding(["bfloat16", "float32"], everything) == "bfloat16"
    assert choose_encoding(["float16"], {"float32", "zstd-fp4"}) is None  # unknown names of theirs ignored
    assert choose_encoding(["float32", "auto"], everything) == "float32"
    with pytest.raises(ValueError, match="allowed: float32, float16, bfloat16, int8"):
        choose_encoding(["fp8"], everything)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encode_rounded_leaves_what_the_peer_decodes(encoding: str) -> None:
    x = torch.randn(5000)
    wire = bytearray(wire_length(encoding, 5000))
    rounded = x.clone()
    codecs.encode_rounded_(encoding, rounded, wire)
    assert wire == encode(encoding, x)  # the same bytes as encode_into
    assert torch.equal(rounded, decode(encoding, wire, 5000))
    again = bytearray(len(wire))
    codecs.encode_rounded_(encoding, rounded.clone(), again)
    assert again == wire  # rounding is idempotent: a pair that agrees sends the same bytes
