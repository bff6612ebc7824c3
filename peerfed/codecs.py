"""Wire encodings of a flat float32 weight buffer: float32, float16, bfloat16 and int8.

Torch only, no I/O (the same layer as averaging.py); the names and the choice of an encoding
are core/encodings.py's (re-exported here). The exchange sends a model as one flat
float32 buffer (averaging.FlatLayout); an encoding turns it into fewer bytes on the wire and
back. Everything works slice by slice, so neither side needs a model-sized extra copy:

- the sender cuts the buffer into `spans` and calls `encode_rounded_(encoding, send[start:stop],
  out)` for each, `out` being any writable buffer of exactly `wire_stop - wire_start` bytes (a
  small rotating send buffer, or the matching slice of a preallocated wire buffer); it hashes
  those bytes as they are, so the digest covers exactly the bytes on the wire. `send` (its
  snapshot) then holds what the peer will decode, the base to merge against;
- the receiver feeds whatever bytes have landed, in pieces of any size, to a `WireDecoder`,
  which writes float32 values into the destination tensor once a unit is complete (an
  element; for int8 a whole block, scale and values), at the latest every STAGE_BYTES (1 MiB)
  of wire, and says how many elements are final, so `averaging.ValueCheck.advance` can check
  them as they come.

Wire layout, little-endian like the rest of the exchange:

- float32, float16, bfloat16: the values in order, 4/2/2 bytes each.
- int8: one record per block of INT8_BLOCK elements (the last block may be shorter): the
  block's scale as a float32, then one signed byte per element; value = byte * scale.
  The encoder picks scale = max|x| / 127 over the block (symmetric, rounded to nearest), so the
  error per element is at most about max|x| / 254 of its block.
  Scales sit at the head of their block, not all at the front: the sender can encode and send
  block by block as it snapshots, and the receiver can decode each block as it lands.

Why INT8_BLOCK = 2048: a scale costs 4 bytes, 0.2% of a 2048-element block (int8 wire =
0.2505x float32), while blocks stay small enough that one large weight does not crush the
resolution of many small ones: the flat buffer mixes tensors, and a block that straddles a
bias and a weight matrix shares one scale. 2048 is also the block size of block-wise 8-bit
optimizer states (Dettmers et al., arXiv 2110.02861, "8-bit Optimizers via Block-wise
Quantization"), chosen there for the same trade. The records (2052 bytes) keep every scale
4-byte aligned in the wire.

Encoding refuses what it cannot represent (NotEncodable, a ValueError): non-finite values, and
for float16/bfloat16 values beyond the format's largest finite number (they would arrive as
infinities). Decoding never refuses values: a peer's inf/nan (or a nan from a zero times an
infinite scale) lands in the destination, where ValueCheck rejects it.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from itertools import pairwise

import torch

from peerfed.core.encodings import (
    AUTO,
    AUTO_ORDER,
    ENCODINGS,
    INT8_BLOCK,
    INT8_RECORD,
    ITEMSIZE,
    SCALE_BYTES,
    block_count,
    check_encoding,
    choose_encoding,
    expand_preferences,
    wire_length,
)

__all__ = [
    "AUTO", "AUTO_ORDER", "DIRECT_BYTES", "ENCODINGS", "INT8_BLOCK", "INT8_RECORD", "SCALE_BYTES", "SLICE_ELEMENTS",
    "STAGE_BYTES", "NotEncodable", "OutOfRange", "Span", "WireDecoder", "WireLengthError", "block_count", "check_encoding",
    "choose_encoding", "decodable", "decode_into", "encode_into", "encode_rounded_", "expand_preferences", "spans",
    "wire_length", "wire_offset",
]
_ITEMSIZE = ITEMSIZE
_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Work in slices of this many elements (512 KiB of float32, a multiple of INT8_BLOCK): the
# temporaries stay in cache and small.
SLICE_ELEMENTS = 64 * INT8_BLOCK
_TINY = torch.finfo(torch.float32).tiny
# A WireDecoder decodes pieces of at least DIRECT_BYTES where they lie and collects smaller
# ones in a stage of STAGE_BYTES.
STAGE_BYTES = 1 << 20
DIRECT_BYTES = 64 * 1024


class NotEncodable(ValueError):
    """The values cannot be sent in this encoding (non-finite, or out of its range)."""


class OutOfRange(NotEncodable):
    """Finite values beyond the encoding's largest number (float16's +-65504): another
    encoding can carry them."""


class WireLengthError(ValueError):
    """More wire bytes than the encoding of the destination takes, or fewer at the end."""


def wire_offset(encoding: str, element: int, numel: int) -> int:
    """Byte offset in the wire where element `element` starts (`numel`: the end).

    int8 starts blocks, not elements: `element` must be a multiple of INT8_BLOCK or numel.
    """
    if not 0 <= element <= numel:
        raise ValueError(f"element {element} outside [0, {numel}]")
    if element == numel:
        return wire_length(encoding, numel)
    if check_encoding(encoding) != "int8":
        return element * _ITEMSIZE[encoding]
    if element % INT8_BLOCK:
        raise ValueError(f"int8 spans start at a block boundary (multiple of {INT8_BLOCK}), not {element}")
    return element // INT8_BLOCK * INT8_RECORD


def decodable(encoding: str, nbytes: int, numel: int) -> int:
    """How many leading elements are complete once the first `nbytes` wire bytes have landed."""
    nbytes = max(0, min(nbytes, wire_length(encoding, numel)))
    if encoding != "int8":
        return nbytes // _ITEMSIZE[encoding]
    if nbytes == wire_length(encoding, numel):
        return numel
    return min(numel, nbytes // INT8_RECORD * INT8_BLOCK)


@dataclass(frozen=True)
class Span:
    """Elements [start, stop) of the flat buffer travel as wire bytes [wire_start, wire_stop)."""

    start: int
    stop: int
    wire_start: int
    wire_stop: int


def spans(encoding: str, numel: int, max_elements: int) -> list[Span]:
    """The buffer cut into spans of at most `max_elements` (int8: whole blocks), in order."""
    step = max_elements
    if check_encoding(encoding) == "int8":
        step = max(INT8_BLOCK, max_elements // INT8_BLOCK * INT8_BLOCK)
    if step < 1:
        raise ValueError("max_elements must be >= 1")
    edges = [*range(0, numel, step), numel]
    return [Span(a, b, wire_offset(encoding, a, numel), wire_offset(encoding, b, numel))
            for a, b in pairwise(edges)]


def _byte_tensor(buf: object) -> torch.Tensor:
    """A uint8 tensor over `buf` (bytes-like or a tensor) without copying it."""
    if isinstance(buf, torch.Tensor):
        if buf.dim() != 1 or not buf.is_contiguous():
            raise ValueError("byte buffers must be contiguous 1-D tensors")
        return buf.view(torch.uint8)
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only input (bytes): we only read it
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=torch.uint8)


def _check_values(values: torch.Tensor) -> None:
    if values.dtype != torch.float32 or values.dim() != 1 or not values.is_contiguous():
        raise ValueError(f"values must be a contiguous 1-D float32 tensor, got {values.dtype} {tuple(values.shape)}")
    if sys.byteorder != "little":
        raise NotImplementedError("the wire is little-endian; big-endian hosts are not supported")


def _refuse(encoding: str, part: torch.Tensor, bad: torch.Tensor, first: int) -> NotEncodable:
    """The error for the first element of `part` flagged in `bad`."""
    index = int(torch.nonzero(bad)[0, 0])
    value = float(part[index])
    if math.isfinite(value):
        limit = torch.finfo(_DTYPE[encoding]).max
        why = f"is outside {encoding}'s range (+-{limit:.6g}); use bfloat16 or float32"
        return OutOfRange(f"cannot encode as {encoding}: value {value} at index {first + index} {why}")
    return NotEncodable(f"cannot encode as {encoding}: value {value} at index {first + index} is not finite")


def encode_into(encoding: str, values: torch.Tensor, out: object, *, first_index: int = 0) -> None:
    """Encode float32 `values` into `out` (exactly wire_length(encoding, len(values)) bytes).

    For int8, values[0] must sit at a block boundary of the flat buffer (take slices from
    `spans`); only the last slice may end in a short block. `first_index` (where `values`
    starts in the flat buffer) only shows in error messages. Raises NotEncodable.
    """
    _check_values(values)
    wire = _byte_tensor(out)
    n = values.numel()
    if wire.numel() != wire_length(encoding, n):
        raise WireLengthError(f"{encoding} of {n} values takes {wire_length(encoding, n)} bytes, got {wire.numel()}")
    if encoding == "int8":
        _encode_int8(values, wire, first_index)
        return
    target = wire.view(_DTYPE[encoding])
    # |x| <= sqrt(sum of squares): a sum of squares within limit^2 clears a slice at the cost of
    # one fused pass (it overflows for anything non-finite). Else look at the encoded values.
    limit_sq = min(torch.finfo(_DTYPE[encoding]).max ** 2, torch.finfo(torch.float32).max)
    with torch.no_grad():
        for start in range(0, n, SLICE_ELEMENTS):
            part = values[start:start + SLICE_ELEMENTS]
            squares = float(torch.dot(part, part))
            encoded = target[start:start + part.numel()]
            encoded.copy_(part)  # beyond the format's range rounds to inf
            if not squares <= limit_sq:
                bad = ~torch.isfinite(encoded)
                if bool(bad.any()):
                    raise _refuse(encoding, part, bad, first_index + start)


def encode_rounded_(encoding: str, values: torch.Tensor, out: object, *, first_index: int = 0) -> None:
    """encode_into, then round `values` in place to what the receiver will decode from `out`.

    For the sender's own copy of what it sent: merging x <- x + a (received - rounded) instead
    of (received - exact) leaves a pair that agrees where it is (both round alike) and keeps
    the pair's sum, so the rounding does not add noise at every exchange (bench_convergence
    --merge-base). Costs one decode of the span, no memory.
    """
    encode_into(encoding, values, out, first_index=first_index)
    if encoding != "float32":
        decode_into(encoding, out, values)


def _encode_int8(values: torch.Tensor, wire: torch.Tensor, first_index: int) -> None:
    n = values.numel()
    scratch = torch.empty(min(n, SLICE_ELEMENTS), dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, n, SLICE_ELEMENTS):
            stop = min(n, start + SLICE_ELEMENTS)
            full = (stop - start) // INT8_BLOCK * INT8_BLOCK
            w0 = start // INT8_BLOCK * INT8_RECORD
            if full:
                blocks = values[start:start + full].view(-1, INT8_BLOCK)
                records = wire[w0:w0 + full // INT8_BLOCK * INT8_RECORD].view(-1, INT8_RECORD)
                _encode_blocks(blocks, records, scratch[:full].view(-1, INT8_BLOCK), first_index + start)
            if stop - start > full:  # the short last block
                tail = values[start + full:stop].view(1, -1)
                w1 = w0 + full // INT8_BLOCK * INT8_RECORD
                records = wire[w1:].view(1, -1)
                _encode_blocks(tail, records, scratch[:tail.numel()].view(1, -1), first_index + start + full)


def _encode_blocks(blocks: torch.Tensor, records: torch.Tensor, scratch: torch.Tensor, first: int) -> None:
    """One row per block: records[:, :4] = scale, records[:, 4:] = round(x / scale)."""
    high = torch.amax(blocks, dim=1)  # amax + amin: 4x faster than aminmax(dim=1) here
    absmax = torch.maximum(high, torch.amin(blocks, dim=1).neg_())  # nan propagates
    smallest, largest = (float(v) for v in torch.aminmax(absmax))
    if not math.isfinite(largest):
        raise _refuse("int8", blocks.reshape(-1), ~torch.isfinite(blocks.reshape(-1)), first)
    scale = absmax.div_(127.0)
    if smallest >= 127.0 * _TINY:  # the usual case: every scale a normal float
        torch.div(blocks, scale.unsqueeze(1), out=scratch)
        scratch.round_()
    else:  # all-zero blocks get scale 0 (x / inf = 0); subnormal scales are coarse, so clamp
        divisor = torch.where(scale > 0, scale, torch.full_like(scale, math.inf))
        torch.div(blocks, divisor.unsqueeze(1), out=scratch)
        scratch.round_().clamp_(-127.0, 127.0)
    records[:, SCALE_BYTES:].view(torch.int8).copy_(scratch)
    records[:, :SCALE_BYTES].copy_(scale.view(torch.uint8).view(-1, SCALE_BYTES))


def decode_into(encoding: str, wire: object, out: torch.Tensor) -> None:
    """Decode wire bytes of whole units (int8: starting at a block boundary) into float32 `out`."""
    _check_values(out)
    data = _byte_tensor(wire)
    n = out.numel()
    if data.numel() != wire_length(encoding, n):
        raise WireLengthError(f"{n} values in {encoding} take {wire_length(encoding, n)} bytes, got {data.numel()}")
    with torch.no_grad():
        if encoding == "int8":
            _decode_int8(data, out)
            return
        itemsize = _ITEMSIZE[encoding]
        dtype = _DTYPE[encoding]
        for start in range(0, n, SLICE_ELEMENTS):
            stop = min(n, start + SLICE_ELEMENTS)
            raw = data[start * itemsize:stop * itemsize]
            if raw.data_ptr() % itemsize:  # a misaligned piece of a network chunk: align it
                raw = raw.clone()
            out[start:stop].copy_(raw.view(dtype))


def _decode_int8(data: torch.Tensor, out: torch.Tensor) -> None:
    n = out.numel()
    for start in range(0, n, SLICE_ELEMENTS):
        stop = min(n, start + SLICE_ELEMENTS)
        full = (stop - start) // INT8_BLOCK * INT8_BLOCK
        w0 = start // INT8_BLOCK * INT8_RECORD
        pieces = []
        if full:
            pieces.append((out[start:start + full].view(-1, INT8_BLOCK),
                           data[w0:w0 + full // INT8_BLOCK * INT8_RECORD].view(-1, INT8_RECORD)))
        if stop - start > full:
            pieces.append((out[start + full:stop].view(1, -1),
                           data[w0 + full // INT8_BLOCK * INT8_RECORD:].view(1, -1)))
        for target, records in pieces:
            scale = torch.empty((records.shape[0], SCALE_BYTES), dtype=torch.uint8)  # aligned
            scale = scale.copy_(records[:, :SCALE_BYTES]).view(torch.float32)  # (blocks, 1)
            target.copy_(records[:, SCALE_BYTES:].view(torch.int8))
            target.mul_(scale)


class WireDecoder:
    """Decodes an encoded buffer into `dest` (float32) from wire bytes fed in pieces of any size.

    A piece of at least `direct_bytes` is decoded where it lies, unit by whole unit (an element;
    for int8 a whole block record). Smaller pieces, and the incomplete unit at the end of a
    piece, are copied into a staging buffer of `stage_bytes`, decoded once it is full, once a
    large piece completes its last unit, or once the last byte has come: a decode call per
    small network chunk would cost more than the decoding. `feed` returns how many leading
    elements of `dest` hold their final values. Memory: the stage, nothing model-sized.
    """

    def __init__(self, encoding: str, dest: torch.Tensor, *, stage_bytes: int = STAGE_BYTES,
                 direct_bytes: int = DIRECT_BYTES) -> None:
        _check_values(dest)
        self.encoding = check_encoding(encoding)
        self._dest = dest
        self._numel = dest.numel()
        self.length = wire_length(encoding, self._numel)
        self.received = 0  # wire bytes fed so far
        self.decoded = 0  # elements [0, decoded) of dest are final
        # At least one whole unit fits, or a full stage could never be flushed.
        unit = INT8_RECORD if encoding == "int8" else _ITEMSIZE[encoding]
        self._stage = bytearray(min(max(stage_bytes, unit), self.length))
        self._staged = 0  # bytes in the stage, from wire_offset(decoded) on
        self._direct_bytes = max(1, direct_bytes)

    @property
    def complete(self) -> bool:
        return self.decoded == self._numel and self.received == self.length

    def feed(self, data: object) -> int:
        piece = memoryview(data).cast("B")  # type: ignore[arg-type]
        if self.received + piece.nbytes > self.length:
            raise WireLengthError(f"more than the {self.length} bytes of {self._numel} values in {self.encoding}")
        self.received += piece.nbytes
        stage = memoryview(self._stage)
        while piece.nbytes:
            if piece.nbytes >= self._direct_bytes:
                if self._staged:  # complete the stage's last unit, decode the stage
                    piece = self._stage_from(piece, self._to_unit_end())
                    self._flush(stage)
                piece = self._decode_from(piece)
            piece = self._stage_from(piece, len(stage) - self._staged)
            if self._staged == len(stage):
                self._flush(stage)
        if self.received == self.length and self._staged:
            self._flush(stage)
        return self.decoded

    def finish(self) -> None:
        """Raise WireLengthError unless every byte has landed."""
        if not self.complete:
            raise WireLengthError(f"got {self.received} of {self.length} bytes ({self.encoding})")

    def _to_unit_end(self) -> int:
        """Bytes the stage lacks to end on a unit boundary."""
        end = wire_offset(self.encoding, self.decoded, self._numel) + self._staged
        done = decodable(self.encoding, end, self._numel)
        boundary = wire_offset(self.encoding, done, self._numel)
        if boundary == end:
            return 0
        unit = INT8_RECORD - INT8_BLOCK + min(INT8_BLOCK, self._numel - done) if self.encoding == "int8" \
            else _ITEMSIZE[self.encoding]
        return boundary + unit - end

    def _stage_from(self, piece: memoryview, most: int) -> memoryview:
        take = min(piece.nbytes, most)
        self._stage[self._staged:self._staged + take] = piece[:take]
        self._staged += take
        return piece[take:]

    def _decode_from(self, wire: memoryview) -> memoryview:
        """Decode the whole units at the front of `wire` (the stage empty); return the rest."""
        start = wire_offset(self.encoding, self.decoded, self._numel)
        upto = decodable(self.encoding, start + wire.nbytes, self._numel)
        whole = wire_offset(self.encoding, upto, self._numel) - start
        if whole:
            decode_into(self.encoding, wire[:whole], self._dest[self.decoded:upto])
            self.decoded = upto
        return wire[whole:]

    def _flush(self, stage: memoryview) -> None:
        rest = self._decode_from(stage[:self._staged]).nbytes  # less than one unit
        if rest != self._staged:
            stage[:rest] = bytes(stage[self._staged - rest:self._staged])
            self._staged = rest
