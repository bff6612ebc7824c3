"""Weights on the wire in the exchange's encodings (exchange.encoding; codecs.py does the math).

Owner: the Exchange that builds a Wire (on the data-plane loop); its workers are the
Exchange's TransferWorkers.

- Choosing: what we accept and what we offer each peer is core/encodings.py's EncodingChoice;
  ``manifest`` announces a payload in an encoding (its wire length, int8 block count, and the
  encodings we accept for an answer). A responder answers a push in an encoding it does not
  accept with 415 and the list it does accept; the initiator asks once more in one both accept
  (``retry_after_415``).
- Sending (``send``): float32 is transfer.py's zero-copy path (the snapshot buffer is the wire).
  Any other encoding snapshots chunk by chunk into ``send`` as before and encodes each chunk
  with ``codecs.encode_rounded_`` into a buffer of its own: ``send`` then holds exactly what
  the peer decodes (the base of our merge), and the digest covers exactly the wire bytes. Each
  chunk's buffer (1-2 MiB) is freed once the transport has sent it: a reused ring could be
  overwritten while the event loop's transport still holds a view of bytes not yet on the
  socket, and one wire buffer for the whole payload would cost 0.25-0.5x the model.
- Receiving (``receive_checked``): float32 is transfer.receive_checked. Others hand the chunks
  as they land, in batches, to the receive worker, which hashes them and feeds a
  codecs.WireDecoder that writes float32 values straight into the receive buffer (no
  model-sized copy; at most MAX_PENDING 1 MiB batches in flight), then runs the value check on the
  elements it finished decoding.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Coroutine
from itertools import pairwise
from typing import Any

import torch
from aiohttp import StreamReader

from peerfed import codecs
from peerfed.averaging import ValueCheck
from peerfed.core.encodings import LOSSLESS, EncodingChoice
from peerfed.core.envelope import Envelope, Verifier
from peerfed.core.errors import LengthMismatch
from peerfed.core.manifest import TRAILER_SIZE, Manifest, StreamDigest
from peerfed.net.pacing import Pacing
from peerfed.net.transfer import (
    CHUNK,
    FIRST_PIECE,
    OpenDigest,
    SealDigest,
    Slot,
    TransferWorkers,
    Weights,
    byte_view,
    digest_opener,
    run_in,
    send_snapshot,
    send_weights,
)
from peerfed.net.transfer import (
    receive_checked as receive_checked_float32,
)

# A receiver hands the chunks that landed to its worker in batches of RECEIVE_BATCH wire bytes,
# at most MAX_PENDING at a time (then it waits for the oldest): the received bytes it holds
# stay below 3 MiB, where 4 MiB batches held up to 0.75x of a 16 MiB model (bench_exchange).
RECEIVE_BATCH = 1 << 20
MAX_PENDING = 2


class CannotEncode(ConnectionAbortedError):
    """Our weights cannot travel in this encoding (out of its range, or not finite): the
    transfer is abandoned (nothing merged); out of range, we stop sending in it."""

    def __init__(self, message: str, *, out_of_range: bool) -> None:
        super().__init__(message)
        self.out_of_range = out_of_range


class Wire:
    """The encodings one Exchange sends and takes, and its transfer workers."""

    def __init__(self, setting: str, verifier: Verifier, pacing: Pacing | None = None) -> None:
        self.choice = EncodingChoice(setting)
        self.workers = TransferWorkers(pacing)
        self._verifier = verifier  # the Exchange's: checks each payload's signed trailer

    def manifest(self, weights: Weights, encoding: str, purpose: str, **fields: Any) -> Manifest:
        """A manifest for our weights in ``encoding`` (purpose "push", "reply" or "model")."""
        numel = weights.nbytes // 4
        return Manifest(fingerprint=weights.fingerprint, sample_weight=weights.num_samples, purpose=purpose,
                        encoding=encoding, length=codecs.wire_length(encoding, numel),
                        blocks=codecs.block_count(encoding, numel), accepts=self.choice.accepts, **fields)

    def reply_encoding(self, peer_id: str, push: Manifest) -> str:
        """The encoding of our reply to ``push`` (float32 when the peer accepts nothing we know)."""
        self.choice.learn(peer_id, push.accepts)
        return self.choice.reply_encoding(push.accepts) or LOSSLESS

    def retry_after_415(self, peer_id: str, refused: str, answer: str) -> str | None:
        """The peer answered our push in ``refused`` with 415 and ``answer`` (its JSON body):
        the encoding to ask once more in, or None."""
        try:
            theirs = json.loads(answer).get("accepts") or [LOSSLESS]
        except (ValueError, AttributeError):
            theirs = [LOSSLESS]
        return self.choice.retry_after_refusal(peer_id, refused, [str(name) for name in theirs][:16])

    async def send(self, writer: Any, weights: Weights, slot: Slot, encoding: str, seal_digest: SealDigest,
                   before_last_byte: asyncio.Future[Any] | None = None) -> int:
        """Snapshot ``weights`` into the slot's send buffer, encode and send it; returns the
        payload's wire bytes. Raises CannotEncode (out of range: and stops sending in ``encoding``)."""
        send, _ = slot.buffers()
        if encoding == LOSSLESS:
            await send_snapshot(writer, weights, send, seal_digest, self.workers, before_last_byte)
            return send.numel() * 4
        bounds, fill = encoded_fill(weights, send, encoding)
        await asyncio.to_thread(weights.begin_snapshot)
        try:
            await send_weights(writer, memoryview(b""), fill, seal_digest, self.workers.send, before_last_byte,
                               bounds=bounds)
        except CannotEncode as exc:
            if exc.out_of_range:  # non-finite weights are the trainer's trouble, not the encoding's
                self.choice.cannot_send(encoding)
            raise
        return bounds[-1][1] if bounds else 0

    def receive_checked(self, content: StreamReader, buf: torch.Tensor,
                        manifest: Envelope) -> tuple[ValueCheck, Coroutine[Any, Any, int]]:
        """Receive the payload ``manifest`` (verified) announced into ``buf`` (a coroutine returning
        its wire bytes), and the check of its decoded values, fed as they are decoded."""
        encoding, open_digest = manifest.body.encoding, digest_opener(self._verifier, manifest)
        if encoding == LOSSLESS:
            return receive_checked_float32(content, buf, open_digest, self.workers)
        values = ValueCheck(buf)
        return values, receive_decoded(content, buf, encoding, open_digest, self.workers, landed=values.advance)


def encoded_fill(weights: Weights, send: torch.Tensor, encoding: str) -> tuple[list[tuple[int, int]], Any]:
    """The wire byte ranges send_weights goes through (whole int8 blocks; a small first piece,
    then CHUNK of float32 at a time), and the fill that snapshots one of them into ``send`` and
    returns its encoded bytes."""
    numel = send.numel()
    step = max(codecs.INT8_BLOCK, CHUNK // 4 // codecs.INT8_BLOCK * codecs.INT8_BLOCK)
    first = min(numel, FIRST_PIECE // 4)
    edges = [0, *range(first, numel, step), numel]
    spans = {codecs.wire_offset(encoding, a, numel): (a, b) for a, b in pairwise(edges) if b > a}
    bounds = [(start, codecs.wire_offset(encoding, b, numel)) for start, (_, b) in spans.items()]

    def fill(wire_start: int, wire_stop: int) -> memoryview:  # in the send worker
        a, b = spans[wire_start]
        weights.snapshot_range(send, a, b)
        wire = torch.empty(wire_stop - wire_start, dtype=torch.uint8)
        try:
            codecs.encode_rounded_(encoding, send[a:b], wire, first_index=a)
        except codecs.NotEncodable as exc:
            raise CannotEncode(str(exc), out_of_range=isinstance(exc, codecs.OutOfRange)) from exc
        return byte_view(wire)  # keeps `wire` alive as long as the transport holds it

    return bounds, fill


async def receive_decoded(content: StreamReader, dest: torch.Tensor, encoding: str, open_digest: OpenDigest,
                          workers: TransferWorkers, landed: Any = None) -> int:
    """transfer.receive_into for an encoded payload: hash and decode into ``dest`` (float32) as
    the bytes land, then check the trailer; ``landed(elements decoded)`` after each batch.
    Returns the payload's wire bytes. On any error ``dest`` is garbage."""
    decoder = codecs.WireDecoder(encoding, dest)
    length = decoder.length
    digest = StreamDigest(expected_length=length)

    def land(pieces: list[memoryview]) -> None:  # in the receive worker, in order
        for piece in pieces:
            digest.update(piece)
            decoder.feed(piece)
        if landed is not None:
            landed(decoder.decoded)

    pending: deque[asyncio.Future[None]] = deque()
    batch: list[memoryview] = []
    trailer = bytearray()
    received = batched = 0
    try:
        while received < length or len(trailer) < TRAILER_SIZE:
            data, _ = await content.readchunk()
            if not data:
                raise ConnectionError(f"stream ended after {received} of {length} bytes")
            chunk = memoryview(data)
            take = min(chunk.nbytes, length - received)
            if take:
                batch.append(chunk[:take])
                received += take
                batched += take
                if batched >= RECEIVE_BATCH or received == length:
                    pending.append(run_in(workers.receive, land, batch))
                    batch, batched = [], 0
                    while len(pending) > MAX_PENDING:  # the worker is behind: stop reading a while
                        await pending.popleft()
            trailer += chunk[take:]
            if len(trailer) > TRAILER_SIZE:
                raise LengthMismatch(f"received more than the announced {length} bytes and trailer")
        extra, _ = await content.readchunk()
        if extra:
            raise LengthMismatch(f"received more than the announced {length} bytes and trailer")
    finally:
        await asyncio.gather(*pending)  # the buffer must not change under a running worker
    digest.check(open_digest(bytes(trailer)))
    decoder.finish()
    return received
