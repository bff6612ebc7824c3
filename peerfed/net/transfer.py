"""Moving big flat buffers over aiohttp without copying them (design.md section 4).

- Sending (``send_weights``; ``send_snapshot`` feeds it the trainer's weights): the payload
  goes out in 4 MiB chunks. A worker thread fills each chunk from the live weights (taking
  the weights lock per 1 MiB slice) and hashes it while the previous chunk is on the wire,
  so the first byte leaves at once and the digest is known when the last one has; a signed
  trailer then carries it (core/manifest.py). Never ``bytes()`` the buffer (a 100 MiB copy
  under the GIL stops the trainer) and never chunked encoding (it copies every chunk):
  chunks are memoryviews of one buffer, with an explicit Content-Length.
- Receiving (``receive_into``; ``receive_checked`` adds the value check): chunks are copied
  straight into a preallocated buffer; a worker thread hashes each 4 MiB batch (BLAKE3 drops
  the GIL) and checks its values while it is still in cache, so the event loop never stalls
  on a 100 MiB hash.
- The two workers (``TransferWorkers``, one thread per direction) belong to the Exchange
  that creates them and shuts them down in its close(); their threads start on the first
  job, from the data-plane thread, and so share its lower CPU priority (net/dataplane.py).
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from aiohttp import StreamReader, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from peerfed.averaging import ValueCheck
from peerfed.core.envelope import Envelope, Verifier, decode, seal
from peerfed.core.errors import DigestMismatch, LengthMismatch
from peerfed.core.exchange_rules import Refusal
from peerfed.core.manifest import (
    TRAILER_SIZE,
    PayloadDigest,
    StreamDigest,
    pack_trailer,
    unpack_trailer,
)
from peerfed.core.peerid import Signer
from peerfed.net.pacing import Pacing

MANIFEST_HEADER = "X-Peerfed-Manifest"
REQUEST_HEADER = "X-Peerfed-Request"
# aiohttp joins the HTTP head and the first write into one new bytes object: keep that
# first write small, so it does not copy a whole chunk.
FIRST_PIECE = 64 * 1024
CHUNK = 4 << 20  # send and hash in 4 MiB steps: few thread hops, little lag behind the socket

T = TypeVar("T")
# Copy the weights' bytes [start, stop) into the send buffer; or return a buffer of its own
# holding the bytes to send for that range (net/wire.py's encodings).
Fill = Callable[[int, int], Any]
SealDigest = Callable[[int, bytes], bytes]  # (length, digest) -> sealed PayloadDigest
OpenDigest = Callable[[bytes], PayloadDigest]  # sealed trailer -> verified PayloadDigest


class Weights(Protocol):
    """What the exchange needs from the trainer (TrainerHandle implements it): the size, the
    lr schedule's clock (for state sync), and chunked reads and a merge of its weights."""

    fingerprint: str
    nbytes: int
    num_samples: int

    def lr_clock(self) -> tuple[int, float]: ...
    def begin_snapshot(self) -> None: ...
    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None: ...
    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None: ...


@dataclass
class Slot:
    """Send and receive buffers for one exchange at a time, allocated on first use."""

    numel: int
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.send is None or self.recv is None:
            self.send = torch.zeros(self.numel, dtype=torch.float32)
            self.recv = torch.zeros(self.numel, dtype=torch.float32)
        return self.send, self.recv


class TransferWorkers:
    """The send and receive worker threads of one Exchange (which creates and closes them).

    A node runs one exchange at a time; one worker thread per direction keeps each digest's
    updates in order and off the loop, and lets sending and receiving hash at once.
    """

    def __init__(self, pacing: Pacing | None = None) -> None:
        self.send: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerfed-send")
        self.receive: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerfed-recv")
        self.pacing = pacing or Pacing()  # the sockets' side: rate caps and transfer floors (net/pacing.py)

    def shutdown(self) -> None:
        """No new jobs; the running ones finish with their buffers (nothing waits for them)."""
        self.send.shutdown(wait=False)
        self.receive.shutdown(wait=False)


def run_in(pool: Executor, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in ``pool``; a pool already shut down means the exchange is closing."""
    try:
        return asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
        raise ConnectionAbortedError("the exchange is closing") from exc


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable byte memoryview over a contiguous CPU tensor (no copy)."""
    array: np.ndarray[Any, Any] = tensor.detach().numpy()
    return memoryview(array).cast("B")


def encode_header(sealed: bytes) -> str:
    return base64.b64encode(sealed).decode("ascii")


def decode_header(value: str | None, max_size: int = 4096) -> bytes | None:
    if value is None or len(value) > max_size * 2:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        return None


def nonce_of(sealed: bytes) -> bytes:
    """The nonce of an envelope we sealed (a reply or trailer names it)."""
    return decode(sealed, max_size=len(sealed)).nonce


def refusal_response(refusal: Refusal) -> web.Response:
    """The HTTP answer to a refused request: its status, and its detail as the error."""
    answer = {"error": refusal.detail} | ({"accepts": list(refusal.accepts)} if refusal.accepts else {})
    response = web.json_response(answer, status=refusal.status)
    # The client may still owe us the body it announced (we refused it before
    # 100-continue): close the connection so those bytes never pose as a next request.
    response.force_close()
    return response


class StreamPayload(Payload):
    """A request body of ``size`` bytes that ``produce`` writes when aiohttp asks for it
    (after the server's 100 Continue, so nothing is read or hashed for a refused push)."""

    def __init__(self, size: int, produce: Callable[[AbstractStreamWriter], Awaitable[None]],
                 **kwargs: Any) -> None:
        super().__init__(b"", content_type="application/octet-stream", **kwargs)
        self._size = size
        self._produce = produce

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("binary payload")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self._produce(writer)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await self._produce(writer)


def digest_sealer(signer: Signer, network: str, recipient: str, manifest_nonce: bytes) -> SealDigest:
    """Seals the trailer of a payload announced by the manifest with ``manifest_nonce``."""
    def seal_digest(length: int, digest: bytes) -> bytes:
        body = PayloadDigest(manifest_nonce=manifest_nonce, length=length, digest=digest)
        return seal(signer, network=network, recipient=recipient, body=body, now=time.time())
    return seal_digest


def digest_opener(verifier: Verifier, manifest: Envelope) -> OpenDigest:
    """Verifies a trailer: signed by the manifest's sender, for that very manifest."""
    def open_digest(trailer: bytes) -> PayloadDigest:
        env = verifier.verify(unpack_trailer(trailer), expected_kind=PayloadDigest)
        if env.sender != manifest.sender or env.body.manifest_nonce != manifest.nonce:
            raise DigestMismatch("the trailer's digest belongs to another manifest")
        return env.body
    return open_digest


def _bounds(size: int) -> list[tuple[int, int]]:
    edges = [0, *range(min(FIRST_PIECE, size), size, CHUNK), size]
    return [(a, b) for a, b in pairwise(edges) if b > a]


async def send_weights(writer: Any, view: memoryview, fill: Fill, seal_digest: SealDigest, pool: Executor,
                       before_last_byte: Awaitable[Any] | None = None,
                       bounds: list[tuple[int, int]] | None = None) -> None:
    """Fill, hash and write ``view`` chunk by chunk, then the signed trailer.

    ``writer`` is an aiohttp writer or StreamResponse. Chunk i+1 is filled and hashed in
    ``pool`` (the send worker) while chunk i is written. ``before_last_byte``, if given, is awaited
    before the trailer's last byte goes out (see the responder in exchange.py). ``bounds``: the
    byte ranges to fill and send in turn, if not ``view``'s chunks; where ``fill`` returns a
    buffer, that buffer is hashed and sent for its range (net/wire.py's encodings).
    """
    digest = StreamDigest()

    def prepare(start: int, stop: int) -> Any:
        piece = fill(start, stop)
        piece = view[start:stop] if piece is None else piece
        digest.update(piece)
        return piece

    bounds = _bounds(view.nbytes) if bounds is None else bounds
    ready = run_in(pool, prepare, *bounds[0]) if bounds else None
    try:
        for i in range(len(bounds)):
            assert ready is not None
            piece = await ready
            ready = run_in(pool, prepare, *bounds[i + 1]) if i + 1 < len(bounds) else None
            await writer.write(piece)
    finally:
        if ready is not None:  # cancelled mid-stream: let the thread finish with the buffer
            await asyncio.shield(ready)
    trailer = pack_trailer(seal_digest(bounds[-1][1] if bounds else 0, digest.digest()))
    await writer.write(trailer[:-1])
    if before_last_byte is not None:
        await before_last_byte
    await writer.write(trailer[-1:])


async def receive_into(content: StreamReader, view: memoryview, open_digest: OpenDigest, pool: Executor,
                       landed: Callable[[int], None] | None = None) -> int:
    """Read a payload of ``view.nbytes`` bytes into ``view`` and its trailer; check both.

    Chunks are copied into ``view`` as they come; ``pool`` (the receive worker) hashes each 4 MiB batch
    while it is still in cache, then calls ``landed(bytes so far)`` (e.g. to check values).
    ``open_digest`` verifies the sealed trailer (signature, sender, manifest nonce). Raises a
    core Rejected (LengthMismatch, DigestMismatch, ...) or a connection error. On any error
    the caller must treat the whole buffer as garbage.
    """
    length = view.nbytes
    digest = StreamDigest(expected_length=length)

    def land(start: int, stop: int) -> None:  # in the receive worker
        digest.update(view[start:stop])
        if landed is not None:
            landed(stop)

    pending: list[asyncio.Future[None]] = []
    trailer = bytearray()
    received = hashed = 0
    try:
        while received < length or len(trailer) < TRAILER_SIZE:
            data, _ = await content.readchunk()
            if not data:
                raise ConnectionError(f"stream ended after {received} of {length} bytes")
            chunk = memoryview(data)
            take = min(chunk.nbytes, length - received)
            if take:
                view[received:received + take] = chunk[:take]
                received += take
                if received - hashed >= CHUNK or received == length:
                    pending.append(run_in(pool, land, hashed, received))
                    hashed = received
            trailer += chunk[take:]
            if len(trailer) > TRAILER_SIZE:
                raise LengthMismatch(f"received more than the announced {length} bytes and trailer")
        extra, _ = await content.readchunk()
        if extra:
            raise LengthMismatch(f"received more than the announced {length} bytes and trailer")
    finally:
        await asyncio.gather(*pending)  # the buffer must not change under a running worker
    digest.check(open_digest(bytes(trailer)))
    return received


async def send_snapshot(writer: Any, weights: Weights, send: torch.Tensor, seal_digest: SealDigest,
                        workers: TransferWorkers, before_last_byte: Awaitable[Any] | None = None) -> None:
    """send_weights of a snapshot of ``weights``, taken into ``send`` chunk by chunk as it goes out."""
    def fill(start: int, stop: int) -> None:  # byte offsets, multiples of 4
        weights.snapshot_range(send, start // 4, stop // 4)

    await asyncio.to_thread(weights.begin_snapshot)
    await send_weights(writer, byte_view(send), fill, seal_digest, workers.send, before_last_byte)


def receive_checked(content: StreamReader, buf: torch.Tensor, open_digest: OpenDigest,
                    workers: TransferWorkers) -> tuple[ValueCheck, Coroutine[Any, Any, int]]:
    """receive_into ``buf`` (a coroutine to await), and the check of its values, fed batch by
    batch in the receive worker as the bytes land (ask ``problem()`` once it is all here)."""
    values = ValueCheck(buf)
    receive = receive_into(content, byte_view(buf), open_digest, workers.receive,
                           landed=lambda nbytes: values.advance(nbytes // 4))
    return values, receive


async def in_receive_worker(workers: TransferWorkers, fn: Callable[..., T], *args: Any) -> T:
    """Run bulk work on received data (value checks, merging) in the receive worker."""
    return await run_in(workers.receive, fn, *args)
