"""The data plane: push-pull weight exchange and state sync over aiohttp.

``POST /v1/exchange`` carries the initiator's signed manifest in a header and its snapshot
in the body; the response carries the responder's manifest and snapshot, and streams while
the request is still uploading, so both directions move at once. Each body ends with a
signed trailer holding the BLAKE3 digest of its payload (core/manifest.py): a sender
snapshots, hashes and sends chunk by chunk, and never reads its whole buffer before the
first byte leaves. The initiator sends
``Expect: 100-continue``: every refusal (401 bad signature or not allowed, 409 other model,
413 wrong length, 429 busy, 400 malformed) is answered before a single bulk byte crosses.
``GET /v1/model`` serves the current weights to a newcomer (state sync).

Each side merges what it received only once all of it is here and its digest matches its
signed manifest: ``x <- x + a * (received - sent)``, which keeps the local steps taken while
bytes were in flight. Nothing half-received or unverified is ever merged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import torch
from aiohttp import web

from peerfed.averaging import ValueCheck, bounded_mixing_weight
from peerfed.core.envelope import Envelope, ModelRequest, Verifier, decode, seal
from peerfed.core.errors import ProtocolError, Rejected
from peerfed.core.manifest import Manifest
from peerfed.core.peerid import Signer
from peerfed.errors import TrainerUnavailable
from peerfed.net.transfer import (
    MANIFEST_HEADER,
    REQUEST_HEADER,
    SealDigest,
    Slot,
    StreamPayload,
    Weights,
    byte_view,
    decode_header,
    digest_opener,
    digest_sealer,
    encode_header,
    in_receive_worker,
    receive_checked,
    send_snapshot,
    wire_length,
)
from peerfed.serving import serve

log = logging.getLogger("peerfed.exchange")


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


OUTCOMES = ("ok", "busy", "refused", "failed")
NOT_READY = "not ready: our first weights are still coming (state sync)"


class Exchange:
    """Both roles of the exchange for one node, sharing buffers, limits and counters."""

    def __init__(
        self,
        *,
        signer: Signer,
        network: str,
        weights: Weights,
        verifier: Verifier,
        max_incoming: int,
        connect_timeout: float,
        transfer_timeout: float,
        on_rejected: Callable[[str], None] | None = None,
        on_finished: Callable[[str, str, float, int, int], None] | None = None,
    ) -> None:
        self._signer, self._network, self._weights = signer, network, weights
        self._verifier = verifier
        numel = weights.nbytes // 4
        self._free_slots = [Slot(numel) for _ in range(max_incoming + 1)]
        self._outgoing_busy = False
        self._incoming = 0
        self._max_incoming = max_incoming
        self._connect_timeout, self._transfer_timeout = connect_timeout, transfer_timeout
        self._on_rejected, self._on_finished = on_rejected, on_finished
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.accepting = True
        # Until state sync is done (or skipped) our weights are a random init: averaging them
        # into a trained peer, or handing them to a newcomer, would set the swarm back.
        self.weights_ready = False
        self.counts: dict[str, int] = {o: 0 for o in OUTCOMES}
        self.rejected: dict[str, int] = {}
        self.bytes_sent = self.bytes_received = 0
        self.last_exchange: dict[str, Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start_server(self, host: str, port: int) -> int:
        """Serve /v1/exchange and /v1/model on host:port; returns the bound port.

        Reserves the buffers of one exchange first (2x the model, zeroed so the pages are
        really there): a daemon's memory does not grow when its first exchange comes.
        """
        await asyncio.to_thread(self._free_slots[-1].buffers)
        app = web.Application()
        app.router.add_post("/v1/exchange", self._serve_exchange, expect_handler=self._expect)
        app.router.add_get("/v1/model", self._serve_model)
        self._runner, bound = await serve(app, host, port, setting="exchange.listen", shutdown_timeout=2.0)
        return bound

    async def close(self) -> None:
        """Refuse new exchanges, give running ones a moment, close everything."""
        self.accepting = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()

    def set_allowlist(self, allowlist: frozenset[str] | None) -> None:
        self._verifier.set_allowlist(allowlist)

    def statistics(self) -> dict[str, Any]:
        return {**self.counts, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "rejected": dict(self.rejected),
                "incoming_now": self._incoming, "outgoing_now": int(self._outgoing_busy),
                "last": self.last_exchange}

    @property
    def busy(self) -> bool:
        return self._outgoing_busy or self._incoming > 0

    # -- responder ------------------------------------------------------------------------

    def _check_push(self, request: web.Request) -> Envelope:
        """Everything we can refuse on from the headers alone; raises Refused."""
        if not self.accepting:
            raise Refused(429, "shutting down")
        if not self.weights_ready:
            raise Refused(429, NOT_READY)
        env = self._verify_header(request.headers.get(MANIFEST_HEADER), Manifest)
        m: Manifest = env.body
        if m.purpose != "push":
            raise self._refuse(400, "malformed", f"manifest purpose {m.purpose!r} is not 'push'")
        if m.fingerprint != self._weights.fingerprint:
            raise self._refuse(409, "fingerprint_mismatch", "model fingerprint differs from ours")
        if m.length != self._weights.nbytes or request.content_length != wire_length(m.length):
            raise self._refuse(413, "length_mismatch", f"length must be {self._weights.nbytes} bytes (the model's)")
        # Two merges at once would count our own weights twice: one exchange at a time,
        # unless max_incoming allows more incoming ones.
        if self._outgoing_busy or self._incoming >= self._max_incoming or not self._free_slots:
            raise Refused(429, "busy")
        return env

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        try:
            request["peerfed.push"] = self._check_push(request)
        except Refused as exc:
            return self._refusal(exc)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def _serve_exchange(self, request: web.Request) -> web.StreamResponse:
        env = request.get("peerfed.push")
        if env is None:  # the client did not send Expect: 100-continue
            try:
                env = self._check_push(request)
            except Refused as exc:
                return self._refusal(exc)
        theirs: Manifest = env.body
        self._incoming += 1
        slot = self._free_slots.pop()
        started = time.monotonic()
        outcome, sent, got = "failed", 0, 0
        response = web.StreamResponse()
        try:
            send, recv = slot.buffers()
            send_view = byte_view(send)
            values, receive = self._receive_checked(request.content, recv, env)
            receiving = asyncio.create_task(receive)
            # One deadline for the whole exchange: a peer that neither reads nor sends holds
            # our incoming slot for transfer_timeout at most.
            try:
                async with asyncio.timeout(self._transfer_timeout):
                    got, sent = await self._reply(request, response, env, receiving, send, send_view)
            finally:
                receiving.cancel()
            outcome = await self._merge(recv, send, theirs, env.sender, values)
            await response.write_eof()
        except Rejected as exc:
            outcome = "refused"
            self._count_rejected(exc.reason)
            log.warning("exchange from %s refused: %s (%s); nothing merged", env.sender, exc.reason, exc)
            response.force_close()
        except (ConnectionError, asyncio.TimeoutError, OSError, TrainerUnavailable) as exc:
            log.info("exchange from %s failed: %s; nothing merged", env.sender, exc or type(exc).__name__,
                     exc_info=log.isEnabledFor(logging.DEBUG))
            response.force_close()
        finally:
            self._free_slots.append(slot)
            self._incoming -= 1
            self._finished("responder", env.sender, outcome, started, sent, got)
        if not response.prepared:
            return web.json_response({"error": f"exchange {outcome}"}, status=400)
        return response

    async def _reply(self, request: web.Request, response: web.StreamResponse, env: Envelope,
                     receiving: asyncio.Task[int], send: torch.Tensor, send_view: memoryview) -> tuple[int, int]:
        """Stream our snapshot back while theirs arrives; returns (bytes received, bytes sent)."""
        ours = Manifest(fingerprint=self._weights.fingerprint, length=send_view.nbytes,
                        sample_weight=self._weights.num_samples, purpose="reply", in_reply_to=env.nonce)
        sealed = seal(self._signer, network=self._network, recipient=env.sender, body=ours, now=time.time())
        response.headers[MANIFEST_HEADER] = encode_header(sealed)
        response.content_length = wire_length(send_view.nbytes)
        await response.prepare(request)
        # Hold back our last byte until all of theirs is here: aiohttp's client cancels its
        # upload the moment our response is complete, so finishing first would cut off the
        # initiator's snapshot (it would merge ours, we would merge nothing).
        await send_snapshot(response, self._weights, send, self._digest_sealer(env.sender, _nonce_of(sealed)),
                            before_last_byte=receiving)
        return receiving.result(), send_view.nbytes

    async def _serve_model(self, request: web.Request) -> web.StreamResponse:
        """State sync: our current weights for a node of our network that asked, signed."""
        try:
            if not self.weights_ready:
                raise Refused(429, NOT_READY)
            if not self._free_slots:
                raise Refused(429, "busy")
            env = self._verify_header(request.headers.get(REQUEST_HEADER), ModelRequest)
            if env.body.fingerprint != self._weights.fingerprint:
                raise self._refuse(409, "fingerprint_mismatch", "model fingerprint differs from ours")
        except Refused as exc:
            return self._refusal(exc)
        slot = self._free_slots.pop()
        try:
            send, _ = slot.buffers()
            view = byte_view(send)
            schedule_step, seconds_trained = self._weights.lr_clock()
            manifest = Manifest(fingerprint=self._weights.fingerprint, length=view.nbytes,
                                sample_weight=self._weights.num_samples, purpose="model",
                                in_reply_to=env.nonce, schedule_step=schedule_step,
                                seconds_trained=seconds_trained)
            sealed = seal(self._signer, network=self._network, recipient=env.sender, body=manifest, now=time.time())
            response = web.StreamResponse(headers={MANIFEST_HEADER: encode_header(sealed)})
            response.content_length = wire_length(view.nbytes)
            await response.prepare(request)
            sealer = self._digest_sealer(env.sender, _nonce_of(sealed))
            await asyncio.wait_for(send_snapshot(response, self._weights, send, sealer), self._transfer_timeout)
            await response.write_eof()
            self.bytes_sent += view.nbytes
            return response
        finally:
            self._free_slots.append(slot)

    # -- initiator ------------------------------------------------------------------------

    async def exchange_with(self, peer_id: str, url: str) -> str:
        """One push-pull with ``peer_id``; returns the outcome: ok, busy, refused or failed."""
        if self._outgoing_busy or self._incoming > 0 or not self._free_slots or not self.accepting:
            return "busy"
        self._outgoing_busy = True
        slot = self._free_slots.pop()
        started = time.monotonic()
        outcome, sent, got = "failed", 0, 0
        filled = False  # every chunk of `send` holds what we sent (the digest is sealed)
        try:
            send, recv = slot.buffers()
            send_view, recv_view = byte_view(send), byte_view(recv)
            ours = Manifest(fingerprint=self._weights.fingerprint, length=send_view.nbytes,
                            sample_weight=self._weights.num_samples, purpose="push")
            sealed = seal(self._signer, network=self._network, recipient=peer_id, body=ours, now=time.time())
            push_nonce = _nonce_of(sealed)

            seal_push_digest = self._digest_sealer(peer_id, push_nonce)

            def seal_digest(length: int, digest: bytes) -> bytes:
                nonlocal filled
                filled = True
                return seal_push_digest(length, digest)

            async def produce(writer: Any) -> None:  # runs once the peer said 100 Continue
                await send_snapshot(writer, self._weights, send, seal_digest)

            size = wire_length(send_view.nbytes)
            async with self._http().post(
                url.rstrip("/") + "/v1/exchange", data=StreamPayload(size, produce), expect100=True,
                headers={MANIFEST_HEADER: encode_header(sealed), "Content-Length": str(size)},
                timeout=aiohttp.ClientTimeout(total=self._transfer_timeout, sock_connect=self._connect_timeout),
            ) as response:
                if response.status != 200:
                    reason = (await response.text())[:200].strip()
                    response.close()  # never reuse: the body we announced was not sent
                    outcome = "busy" if response.status == 429 else "refused"
                    log.info("exchange with %s: %s %s", peer_id, response.status, reason)
                    return outcome
                env = self._verify_header(response.headers.get(MANIFEST_HEADER), Manifest)
                theirs: Manifest = env.body
                if env.sender != peer_id or theirs.purpose != "reply" or theirs.in_reply_to != push_nonce:
                    raise Refused(401, "reply manifest does not answer our push")
                if theirs.fingerprint != self._weights.fingerprint:
                    raise Refused(409, "reply is for another model")
                if theirs.length != recv_view.nbytes:
                    raise Refused(413, f"reply announces {theirs.length} bytes, our model has {recv_view.nbytes}")
                values, receive = self._receive_checked(response.content, recv, env)
                got = await receive
            if not filled:  # an honest peer ends its reply only after all of our push
                log.info("exchange with %s: its reply ended before our push was sent; nothing merged", peer_id)
                return "failed"
            sent = send_view.nbytes
            outcome = await self._merge(recv, send, theirs, peer_id, values)
            return outcome
        except Refused as exc:
            log.info("exchange with %s: refused its reply: %s", peer_id, exc.reason)
            outcome = "refused"
            return outcome
        except Rejected as exc:
            self._count_rejected(exc.reason)
            log.warning("exchange with %s: its reply was refused: %s (%s); nothing merged", peer_id, exc.reason, exc)
            outcome = "refused"
            return outcome
        except (ProtocolError, ConnectionError, asyncio.TimeoutError, aiohttp.ClientError, OSError,
                TrainerUnavailable) as exc:
            log.info("exchange with %s failed: %s", peer_id, exc or type(exc).__name__)
            return "failed"
        finally:
            self._free_slots.append(slot)
            self._outgoing_busy = False
            self._finished("initiator", peer_id, outcome, started, sent, got)

    async def fetch_model(self, peer_id: str, url: str, dst: torch.Tensor) -> Manifest | None:
        """State sync: download ``peer_id``'s weights into ``dst`` and verify them; their
        manifest (with the donor's lr clock), or None."""
        sealed = seal(self._signer, network=self._network, recipient=peer_id,
                      body=ModelRequest(fingerprint=self._weights.fingerprint), now=time.time())
        request_nonce = _nonce_of(sealed)
        try:
            async with self._http().get(
                url.rstrip("/") + "/v1/model", headers={REQUEST_HEADER: encode_header(sealed)},
                timeout=aiohttp.ClientTimeout(total=self._transfer_timeout, sock_connect=self._connect_timeout),
            ) as response:
                if response.status != 200:  # 429: busy, or syncing itself (the caller asks again)
                    log.log(logging.DEBUG if response.status == 429 else logging.INFO, "state sync from %s: %s %s",
                            peer_id, response.status, (await response.text())[:200])
                    return None
                env = self._verify_header(response.headers.get(MANIFEST_HEADER), Manifest)
                m: Manifest = env.body
                if env.sender != peer_id or m.purpose != "model" or m.in_reply_to != request_nonce:
                    raise Refused(401, "model manifest does not answer our request")
                if m.length != dst.numel() * dst.element_size():
                    raise Refused(413, f"model length {m.length} is not ours")
                values, receive = self._receive_checked(response.content, dst, env)
                await receive
                self.bytes_received += m.length
        except (Refused, ProtocolError, ConnectionError, asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("state sync from %s failed: %s", peer_id, exc or type(exc).__name__)
            return None
        problem = await in_receive_worker(values.problem)  # checked as it arrived: little left
        if problem:
            log.warning("state sync from %s: refusing its weights: %s", peer_id, problem)
            return None
        return m

    # -- shared ---------------------------------------------------------------------------

    def _receive_checked(self, content: aiohttp.StreamReader, buf: torch.Tensor,
                         manifest: Envelope) -> tuple[ValueCheck, Coroutine[Any, Any, int]]:
        return receive_checked(content, buf, digest_opener(self._verifier, manifest))

    def _digest_sealer(self, recipient: str, manifest_nonce: bytes) -> SealDigest:
        return digest_sealer(self._signer, self._network, recipient, manifest_nonce)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4))
        return self._session

    def _verify_header(self, value: str | None, kind: type[Any]) -> Envelope:
        raw = decode_header(value)
        if raw is None:
            self._count_rejected("malformed")
            raise Refused(401, "missing or unreadable signed manifest header")
        try:
            return self._verifier.verify(raw, expected_kind=kind)
        except Rejected as exc:
            self._count_rejected(exc.reason)
            status = 400 if exc.reason == "malformed" else 401
            raise Refused(status, f"{exc.reason}: {exc}") from None

    async def _merge(self, received: torch.Tensor, sent: torch.Tensor, theirs: Manifest, peer_id: str,
                     values: ValueCheck) -> str:
        problem = await in_receive_worker(values.problem)  # checked as it arrived: little left
        if problem:
            self._count_rejected("bad_values")
            log.warning("not merging weights from %s: %s", peer_id, problem)
            return "refused"
        alpha = bounded_mixing_weight(self._weights.num_samples, theirs.sample_weight)
        await in_receive_worker(self._weights.merge, received, sent, alpha)
        return "ok"

    def _refusal(self, exc: Refused) -> web.Response:
        response = web.json_response({"error": exc.reason}, status=exc.status)
        # The client may still owe us the body it announced (we refused it before
        # 100-continue): close the connection so those bytes never pose as a next request.
        response.force_close()
        return response

    def _refuse(self, status: int, reason: str, detail: str) -> Refused:
        self._count_rejected(reason)
        return Refused(status, detail)

    def _count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        if self._on_rejected is not None:
            self._on_rejected(reason)

    def _finished(self, role: str, peer_id: str, outcome: str, started: float, sent: int, got: int) -> None:
        duration = time.monotonic() - started
        self.counts[outcome] += 1
        self.bytes_sent += sent
        self.bytes_received += got
        self.last_exchange = {"peer_id": peer_id, "role": role, "outcome": outcome,
                              "duration_s": round(duration, 4), "at": time.time()}
        if self._on_finished is not None:
            self._on_finished(role, outcome, duration, sent, got)


def _nonce_of(sealed: bytes) -> bytes:
    return decode(sealed, max_size=len(sealed)).nonce
