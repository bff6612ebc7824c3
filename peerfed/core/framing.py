"""Length-prefixed frames: a 4-byte big-endian length, then that many bytes.

FrameDecoder turns a byte stream cut anywhere into whole frames, and refuses a
frame whose header announces more than ``max_frame`` as soon as the header is
seen, so a peer cannot make us buffer a body we would reject anyway.
"""

from __future__ import annotations

import struct

from peerfed.core.errors import Malformed, Oversized

HEADER = struct.Struct(">I")
HEADER_SIZE = HEADER.size
MAX_FRAME_LIMIT = (1 << 32) - 1  # what 4 length bytes can say


def encode_frame(payload: bytes | bytearray | memoryview) -> bytes:
    """4-byte big-endian length + payload."""
    size = memoryview(payload).nbytes
    if size > MAX_FRAME_LIMIT:
        raise ValueError(f"a frame holds at most {MAX_FRAME_LIMIT} bytes")
    return HEADER.pack(size) + bytes(payload)


class FrameDecoder:
    """Feed bytes as they arrive, get complete frames back.

    After Oversized the stream is out of sync and the decoder refuses everything
    (close the connection); frames completed earlier in that same ``feed`` are dropped.
    """

    def __init__(self, max_frame: int) -> None:
        if not 0 <= max_frame <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame must be in 0..{MAX_FRAME_LIMIT}")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._failed: str | None = None
        self._frames = 0

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._failed is not None:
            raise Oversized(self._failed)
        self._buf += data
        frames: list[bytes] = []
        pos = 0
        with memoryview(self._buf) as view:
            end = len(view)
            while end - pos >= HEADER_SIZE:
                (size,) = HEADER.unpack_from(view, pos)
                if size > self.max_frame:
                    self._failed = f"frame of {size} bytes exceeds the limit of {self.max_frame}"
                    break
                if end - pos - HEADER_SIZE < size:
                    break
                start = pos + HEADER_SIZE
                frames.append(bytes(view[start:start + size]))
                pos = start + size
        if self._failed is not None:
            self._buf = bytearray()  # drop whatever part of the body came with the header
            raise Oversized(self._failed)
        del self._buf[:pos]
        self._frames += len(frames)
        return frames

    def check_complete(self) -> None:
        """At end of stream: Malformed if it stopped inside a frame."""
        if self._buf:
            raise Malformed(f"stream ended inside a frame ({len(self._buf)} bytes left over)")

    def statistics(self) -> dict[str, int]:
        return {"frames": self._frames, "buffered": len(self._buf)}


__all__ = ["HEADER_SIZE", "MAX_FRAME_LIMIT", "encode_frame", "FrameDecoder"]
