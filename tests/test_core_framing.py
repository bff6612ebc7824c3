"""Length-prefixed framing: any split of the stream gives the frames back; size limit is early."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peerfed.core.errors import Malformed, Oversized
from peerfed.core.framing import FrameDecoder, encode_frame


def test_encode_frame() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(memoryview(b"xy")) == b"\x00\x00\x00\x02xy"


@settings(deadline=None, max_examples=300)
@given(frames=st.lists(st.binary(max_size=300), max_size=10),
       cuts=st.lists(st.integers(0, 4000), max_size=20))
def test_random_splits_give_back_the_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(f) for f in frames)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    decoder = FrameDecoder(max_frame=300)
    out: list[bytes] = []
    for start, end in zip(bounds, bounds[1:]):
        out += decoder.feed(memoryview(stream)[start:end])
    assert out == frames
    assert decoder.buffered == 0
    decoder.check_complete()
    assert decoder.statistics()["frames"] == len(frames)


def test_oversized_header_raises_before_the_body_arrives() -> None:
    decoder = FrameDecoder(max_frame=1000)
    assert decoder.feed(encode_frame(b"ok")) == [b"ok"]
    assert decoder.feed(b"\x00\x00") == []  # half a header: nothing to judge yet
    with pytest.raises(Oversized) as info:
        decoder.feed(b"\x03\xe9")  # 1001: refused with no body byte sent
    assert "1001" in str(info.value)
    with pytest.raises(Oversized):  # the stream is out of sync for good
        decoder.feed(b"x" * 10)
    assert decoder.buffered == 0


def test_oversized_header_with_partial_body_is_not_kept() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(Oversized):
        decoder.feed(b"\xff\xff\xff\xff" + b"x" * 100)
    assert decoder.buffered == 0


def test_limit_is_inclusive_and_empty_frames_work() -> None:
    decoder = FrameDecoder(max_frame=4)
    assert decoder.feed(encode_frame(b"1234") + encode_frame(b"") + b"\x00") == [b"1234", b""]
    with pytest.raises(Malformed):
        decoder.check_complete()  # stream ended inside a header
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=-1)
