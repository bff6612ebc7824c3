"""Moving big flat buffers over aiohttp without copying them (design.md section 4).

- Sending: ``ViewPayload`` writes a small first piece, then the rest as one memoryview, with
  an explicit Content-Length. Never ``bytes()`` the buffer (a 100 MiB copy under the GIL
  stops the trainer) and never chunked encoding (it copies every chunk).
- Receiving: ``receive_into`` reads chunks straight into a preallocated buffer and hashes
  what has landed in a worker thread (hashlib drops the GIL), so the event loop never
  stalls on a 100 MiB sha256.
"""

from __future__ import annotations

import asyncio
import base64
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from aiohttp import StreamReader
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

from peerfed.core.errors import LengthMismatch
from peerfed.core.manifest import Manifest, StreamDigest, digest_buffer

MANIFEST_HEADER = "X-Peerfed-Manifest"
REQUEST_HEADER = "X-Peerfed-Request"
FIRST_PIECE = 64 * 1024
HASH_BATCH = 4 << 20  # hash in 4 MiB steps: few thread hops, small lag behind the socket

# One thread for all hashing keeps updates of one digest in order and off the loop.
_hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="peerfed-hash")


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


class ViewPayload(Payload):
    """A request body that streams a memoryview as-is."""

    def __init__(self, view: memoryview, **kwargs: Any) -> None:
        super().__init__(view, content_type="application/octet-stream", **kwargs)
        self._view = view
        self._size = view.nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("binary payload")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await write_view(writer, self._view)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        await write_view(writer, self._view)


async def write_view(writer: Any, view: memoryview) -> None:
    """Write ``view`` to an aiohttp writer or StreamResponse: a small piece, then the rest."""
    await writer.write(view[:FIRST_PIECE])
    if view.nbytes > FIRST_PIECE:
        await writer.write(view[FIRST_PIECE:])


async def receive_into(content: StreamReader, view: memoryview, manifest: Manifest) -> int:
    """Read exactly ``manifest.length`` bytes into ``view`` and check their digest.

    Raises LengthMismatch / DigestMismatch (core errors) or a connection error. On any
    error the caller must treat the whole buffer as garbage.
    """
    if manifest.length != view.nbytes:
        raise LengthMismatch(f"manifest announces {manifest.length} bytes, expected {view.nbytes}")
    loop = asyncio.get_running_loop()
    digest = StreamDigest(expected_length=manifest.length)
    pending: list[asyncio.Future[None]] = []
    received = hashed = 0
    while received < manifest.length:
        chunk, _ = await content.readchunk()
        if not chunk:
            raise ConnectionError(f"stream ended after {received} of {manifest.length} bytes")
        end = received + len(chunk)
        if end > manifest.length:
            raise LengthMismatch(f"received more than the announced {manifest.length} bytes")
        view[received:end] = chunk
        received = end
        if received - hashed >= HASH_BATCH or received == manifest.length:
            pending.append(loop.run_in_executor(_hash_pool, digest.update, view[hashed:received]))
            hashed = received
    extra, _ = await content.readchunk()
    if extra:
        raise LengthMismatch(f"received more than the announced {manifest.length} bytes")
    await asyncio.gather(*pending)
    digest.check(manifest)
    return received


async def digest_of(view: memoryview) -> bytes:
    """sha256 of a whole buffer in a worker thread (not the stream-hash thread: a responder
    hashes its own snapshot while the push it receives is being hashed)."""
    return await asyncio.to_thread(digest_buffer, view)
