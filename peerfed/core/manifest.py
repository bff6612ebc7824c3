"""Manifests for bulk payloads, their signed digests, and hashing payloads as they stream.

Weights are not signed byte by byte. A body of weights travels as:

- a signed Manifest, before the body (an HTTP header): model fingerprint, length, sample
  weight, purpose (for a state sync's model, also the sender's lr schedule clock), the
  payload's wire encoding (core/encodings.py; length and int8 block count are the encoded
  ones) and the encodings the sender accepts in an answer.
  Everything a receiver may refuse on comes before a single bulk byte.
- the payload: ``length`` bytes, which the sender hashes (BLAKE3) as it sends them, so it
  need not read its whole buffer before the first byte leaves;
- a trailer of exactly TRAILER_SIZE bytes after the payload: a signed PayloadDigest naming
  the manifest's nonce, the length and the BLAKE3 digest.

The receiver hashes the bytes while they arrive (StreamDigest) and merges nothing unless
``check()`` against a verified PayloadDigest passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import blake3

from peerfed.core.errors import DigestMismatch, LengthMismatch, Malformed
from peerfed.core.framing import HEADER, HEADER_SIZE

DIGEST_SIZE = 32
NONCE_SIZE = 16
PURPOSES: tuple[str, ...] = ("push", "reply", "model")
MAX_LENGTH = (1 << 63) - 1  # msgpack's int64 range; real payloads are far smaller
MAX_TEXT = 256  # fingerprints and similar short strings
MAX_ENCODING_NAME = 32
MAX_ACCEPTS = 16  # encodings a manifest may list as accepted (names we do not know are ignored)
_MISSING: Any = object()


def read_field(wire: dict[str, Any], name: str, kinds: type | tuple[type, ...],
               default: Any = _MISSING) -> Any:
    """``wire[name]`` checked to be one of ``kinds``; Malformed if missing or mistyped.

    Shared by the body kinds here and in records.py. ``bool`` never passes for ``int``/``float``
    (it is an int subclass in Python, but a different msgpack type).
    """
    if not isinstance(wire, dict):
        raise Malformed(f"body must be a map, not {type(wire).__name__}")
    if name not in wire:
        if default is _MISSING:
            raise Malformed(f"missing field {name!r}")
        return default
    value = wire[name]
    kinds_t = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds_t) or (isinstance(value, bool) and bool not in kinds_t):
        names = "/".join(k.__name__ for k in kinds_t)
        raise Malformed(f"field {name!r} must be {names}, not {type(value).__name__}")
    return value


def read_text(wire: dict[str, Any], name: str, default: Any = _MISSING,
              max_chars: int = MAX_TEXT) -> str:
    value = read_field(wire, name, str, default)
    if len(value) > max_chars:
        raise Malformed(f"field {name!r} is longer than {max_chars} characters")
    return value


@dataclass(frozen=True)
class Manifest:
    """Announces a bulk payload: its model fingerprint, length and sample weight.

    Its digest follows the payload in a PayloadDigest that names this manifest's nonce.
    """

    KIND: ClassVar[str] = "manifest"

    fingerprint: str
    length: int
    sample_weight: float
    purpose: str  # "push" | "reply" | "model"
    in_reply_to: bytes = b""  # nonce of the push this reply answers
    # Purpose "model" only: the sender's lr-schedule clock, so that a newcomer starting from
    # these weights goes on from there instead of warming up again (train/child.py).
    schedule_step: int = 0
    seconds_trained: float = 0.0
    # The payload's encoding; `length` is its wire length and `blocks` its int8 scale count
    # (0 otherwise). Any name is carried: the rules answer one they do not accept with 415.
    encoding: str = "float32"
    blocks: int = 0
    accepts: tuple[str, ...] = ()  # encodings the sender takes in an answer (): float32 only

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "in_reply_to": bytes(self.in_reply_to),
            "length": int(self.length),
            "purpose": self.purpose,
            "sample_weight": float(self.sample_weight),
        }
        if self.purpose == "model":
            wire.update(schedule_step=int(self.schedule_step), seconds_trained=float(self.seconds_trained))
        if self.encoding != "float32" or self.blocks:  # absent: what a peer from before encodings signs
            wire.update(encoding=self.encoding, blocks=int(self.blocks))
        if self.accepts:
            wire["accepts"] = list(self.accepts)
        return dict(sorted(wire.items()))  # the signed encoding must not depend on dict order

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Manifest:
        fingerprint = read_text(wire, "fingerprint")
        length = read_field(wire, "length", int)
        if not 0 <= length <= MAX_LENGTH:
            raise Malformed(f"manifest length {length} out of range")
        weight = read_field(wire, "sample_weight", (float, int))
        if not math.isfinite(weight) or weight < 0:
            raise Malformed(f"manifest sample_weight {weight!r} must be finite and >= 0")
        purpose = read_text(wire, "purpose")
        if purpose not in PURPOSES:
            raise Malformed(f"manifest purpose {purpose!r} is not one of {', '.join(PURPOSES)}")
        in_reply_to = read_field(wire, "in_reply_to", bytes, b"")
        if len(in_reply_to) not in (0, NONCE_SIZE):
            raise Malformed(f"manifest in_reply_to must be empty or {NONCE_SIZE} bytes")
        schedule_step = read_field(wire, "schedule_step", int, 0)
        if not 0 <= schedule_step <= MAX_LENGTH:
            raise Malformed(f"manifest schedule_step {schedule_step} out of range")
        seconds = read_field(wire, "seconds_trained", (float, int), 0.0)
        if not math.isfinite(seconds) or seconds < 0:
            raise Malformed(f"manifest seconds_trained {seconds!r} must be finite and >= 0")
        encoding = read_text(wire, "encoding", "float32", max_chars=MAX_ENCODING_NAME)
        blocks = read_field(wire, "blocks", int, 0)
        if not 0 <= blocks <= MAX_LENGTH:
            raise Malformed(f"manifest blocks {blocks} out of range")
        accepts = read_field(wire, "accepts", list, [])
        if len(accepts) > MAX_ACCEPTS or not all(isinstance(a, str) and len(a) <= MAX_ENCODING_NAME for a in accepts):
            raise Malformed(f"manifest accepts must list at most {MAX_ACCEPTS} encoding names")
        return cls(fingerprint=fingerprint, length=length, sample_weight=float(weight),
                   purpose=purpose, in_reply_to=in_reply_to, schedule_step=schedule_step,
                   seconds_trained=float(seconds), encoding=encoding, blocks=blocks, accepts=tuple(accepts))


@dataclass(frozen=True)
class PayloadDigest:
    """Sent after a payload: its length and BLAKE3 digest, bound to the manifest's nonce."""

    KIND: ClassVar[str] = "payload_digest"

    manifest_nonce: bytes  # nonce of the signed Manifest that announced the payload
    length: int
    digest: bytes  # BLAKE3-256 of the payload

    def to_wire(self) -> dict[str, Any]:
        return {"digest": bytes(self.digest), "length": int(self.length),
                "manifest_nonce": bytes(self.manifest_nonce)}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PayloadDigest:
        nonce = read_field(wire, "manifest_nonce", bytes)
        if len(nonce) != NONCE_SIZE:
            raise Malformed(f"payload digest manifest_nonce must be {NONCE_SIZE} bytes")
        length = read_field(wire, "length", int)
        if not 0 <= length <= MAX_LENGTH:
            raise Malformed(f"payload digest length {length} out of range")
        digest = read_field(wire, "digest", bytes)
        if len(digest) != DIGEST_SIZE:
            raise Malformed(f"payload digest must be {DIGEST_SIZE} bytes, not {len(digest)}")
        return cls(manifest_nonce=nonce, length=length, digest=digest)


# The trailer: a 4-byte length, that many bytes of a sealed PayloadDigest, zero padding.
# A fixed size lets the sender state Content-Length before it knows the digest.
TRAILER_SIZE = 2048  # the longest sealed PayloadDigest (256 four-byte network chars) is 1336


def pack_trailer(sealed: bytes) -> bytes:
    if len(sealed) > TRAILER_SIZE - HEADER_SIZE:
        raise ValueError(f"sealed digest of {len(sealed)} bytes does not fit the trailer")
    return (HEADER.pack(len(sealed)) + sealed).ljust(TRAILER_SIZE, b"\0")


def unpack_trailer(trailer: bytes | bytearray | memoryview) -> bytes:
    """The sealed PayloadDigest inside a trailer; Malformed if the trailer is not one."""
    raw = bytes(trailer)
    if len(raw) != TRAILER_SIZE:
        raise Malformed(f"trailer must be {TRAILER_SIZE} bytes, not {len(raw)}")
    (size,) = HEADER.unpack_from(raw)
    if size > TRAILER_SIZE - HEADER_SIZE:
        raise Malformed(f"trailer announces {size} bytes, more than it holds")
    if any(raw[HEADER_SIZE + size:]):
        raise Malformed("trailer padding is not zero")
    return raw[HEADER_SIZE:HEADER_SIZE + size]


def _byte_view(chunk: bytes | bytearray | memoryview) -> memoryview:
    # A flat unsigned-byte view of any C-contiguous buffer, without copying it.
    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
    if not view.c_contiguous:
        raise ValueError("StreamDigest needs C-contiguous buffers")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class StreamDigest:
    """Length and BLAKE3 of the bytes seen so far; chunks are hashed in place, not copied.

    With ``expected_length`` set, ``update`` raises LengthMismatch as soon as more
    bytes arrive than announced, so a receiver can stop reading at once.
    """

    def __init__(self, expected_length: int | None = None) -> None:
        self._hash = blake3.blake3()
        self._length = 0
        self.expected_length = expected_length

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        view = _byte_view(chunk)
        size = view.nbytes
        if self.expected_length is not None and self._length + size > self.expected_length:
            raise LengthMismatch(
                f"received more than the announced {self.expected_length} bytes")
        self._hash.update(view)  # blake3 reads the buffer directly (and drops the GIL)
        self._length += size

    @property
    def length(self) -> int:
        return self._length

    def digest(self) -> bytes:
        return self._hash.digest()

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def check(self, expected: PayloadDigest) -> None:
        """Raise LengthMismatch or DigestMismatch unless the bytes seen match ``expected``."""
        if self._length != expected.length:
            raise LengthMismatch(
                f"received {self._length} bytes, the sender's digest covers {expected.length}")
        if self._hash.digest() != expected.digest:
            raise DigestMismatch("BLAKE3 of the received bytes does not match the sender's digest")


def digest_buffer(buf: bytes | bytearray | memoryview, chunk: int = 1 << 20) -> bytes:
    """BLAKE3 of ``buf``, fed in ``chunk``-byte slices of one memoryview (no copies)."""
    if chunk <= 0:
        raise ValueError("chunk must be positive")
    view = _byte_view(buf)
    h = blake3.blake3()
    for start in range(0, view.nbytes, chunk):
        h.update(view[start:start + chunk])
    return h.digest()


__all__ = [
    "DIGEST_SIZE",
    "PURPOSES",
    "TRAILER_SIZE",
    "Manifest",
    "PayloadDigest",
    "StreamDigest",
    "digest_buffer",
    "pack_trailer",
    "read_field",
    "read_text",
    "unpack_trailer",
]
