"""The data plane: push-pull weight exchange and state sync over aiohttp (docs/architecture.md).

Owner: the data-plane loop (net/dataplane.py): others go through DataPlane and read the
ExchangeStats it publishes. The rules are core/exchange_rules.py's; this driver translates
them. Nothing unverified is merged; a remote's bad input is logged once a minute (net/quiet.py).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import torch
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from peerfed.averaging import ValueCheck, bounded_mixing_weight
from peerfed.core import exchange_rules as rules
from peerfed.core.envelope import Body, Envelope, ModelRequest, Verifier, seal
from peerfed.core.errors import ProtocolError, Rejected
from peerfed.core.exchange_rules import ModelShape, Outcome, Refusal, wire_length
from peerfed.core.manifest import Manifest
from peerfed.core.peerid import Signer
from peerfed.errors import TrainerUnavailable
from peerfed.net.exchange_state import ExchangeStats, LastExchange, Occupancy, Role
from peerfed.net.guard import ExchangeGuard
from peerfed.net.pacing import CLIENT_IDLE_S, Pacing, TransferGuard
from peerfed.net.quiet import BAD_HTTP, HttpServerLog, QuietLog, describe
from peerfed.net.transfer import (
    MANIFEST_HEADER,
    REQUEST_HEADER,
    SealDigest,
    Slot,
    StreamPayload,
    Weights,
    decode_header,
    digest_sealer,
    encode_header,
    in_receive_worker,
    nonce_of,
    refusal_response,
)
from peerfed.net.wire import Wire
from peerfed.serving import serve

log = logging.getLogger("peerfed.exchange")
quiet = QuietLog(log)  # lines about what a peer or a remote address sent: once a minute per sender
ADMITTED_PUSH = web.RequestKey("peerfed.push", Envelope)  # its manifest, verified in the 100-continue step


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
        on_rejected: Callable[[str], None] | None = None,  # reason
        on_finished: Callable[[Role, Outcome, float, int, int], None] | None = None,  # seconds, sent, received
        encoding: str = "float32",  # exchange.encoding (the daemon passes it; its default is "auto")
        pacing: Pacing | None = None,  # rate caps and the floor of every transfer (net/pacing.py)
        guard: ExchangeGuard | None = None,  # holding ``verifier`` (None: anyone who signs, plaintext)
    ) -> None:
        self._signer, self._network, self._weights = signer, network, weights
        self.guard = guard or ExchangeGuard.open(verifier)  # who may talk to us (DataPlane forwards to it)
        self._occupancy = Occupancy.for_model(weights.nbytes, max_incoming)
        self._stats = ExchangeStats()  # published: replaced, never changed, after each change
        # The client's timeouts; their total is also the responder's deadline for one exchange.
        self._timeout = aiohttp.ClientTimeout(total=transfer_timeout, sock_connect=connect_timeout)
        self._on_rejected, self._on_finished = on_rejected, on_finished
        # encodings and the transfer workers, which carry the pacing
        self._wire = Wire(encoding, self.guard.verifier, pacing or Pacing(transfer_timeout=transfer_timeout))
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle and state (from the owning loop) ---------------------------------------

    async def start_server(self, host: str, port: int, sock: socket.socket | None = None) -> int:
        """Serve /v1/exchange and /v1/model on ``sock``, else on host:port; returns the port. Reserves the buffers
        of one exchange first (2x the model, zeroed): memory does not grow when the first exchange comes."""
        await asyncio.to_thread(self._occupancy.free_slots[-1].buffers)
        app = web.Application()
        app.router.add_post("/v1/exchange", self._serve_exchange, expect_handler=self._expect)
        app.router.add_get("/v1/model", self._serve_model)
        self._runner, bound = await serve(app, host, port, setting="exchange.listen", shutdown_timeout=2.0, sock=sock,
                                          logger=HttpServerLog(quiet, self._count_rejected),
                                          limits=self._pacing.connections, ssl_context=self.guard.server_ssl)
        return bound

    async def close(self) -> None:
        """Refuse new exchanges, give running ones a moment, close everything."""
        self.stop_accepting()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
        self._wire.workers.shutdown()

    def stop_accepting(self) -> None:  # refuse new exchanges from now on (shutting down)
        self._occupancy.accepting = False

    def set_weights_ready(self, ready: bool) -> None:  # False while a state sync replaces a random init
        self._occupancy.weights_ready = ready

    def statistics(self) -> ExchangeStats:  # the latest published snapshot (any thread may call this)
        return self._stats

    # -- responder ------------------------------------------------------------------------

    def _admit_push(self, request: web.Request) -> Envelope | Refusal:
        """The push's verified manifest, or why we refuse it from the headers alone."""
        if (refusal := rules.check_push_open(self._occupancy.room())) is not None:
            return refusal  # before spending a signature check on it
        env = self._open_header(request.headers.get(MANIFEST_HEADER), Manifest)
        if isinstance(env, Refusal):
            return env
        refusal = self._pacing.refusal(env.sender, reply_bytes=env.body.length) or self.guard.admit(
            env.sender, cost=2 * self._weights.nbytes, unless=rules.check_push(
                env, ours=self._model(), content_length=request.content_length, room=self._occupancy.room(),
                accepts=self._wire.choice.accepts))
        return env if refusal is None else self._counted(refusal)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        admitted = self._admit_push(request)
        if isinstance(admitted, Refusal):
            return refusal_response(admitted)
        request[ADMITTED_PUSH] = admitted
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def _serve_exchange(self, request: web.Request) -> web.StreamResponse:
        env: Envelope | Refusal | None = request.get(ADMITTED_PUSH)
        if env is None:  # the client did not send Expect: 100-continue
            env = self._admit_push(request)
        if isinstance(env, Refusal):
            return refusal_response(env)
        slot = self._occupancy.take(incoming=True)
        self._publish()
        started = time.monotonic()
        outcome, sent, got = Outcome.FAILED, 0, 0
        response = web.StreamResponse()
        guard = self._pacing.guard(env.sender, env.body.length, refuse_after_cut=True)
        try:
            send, recv = slot.buffers()
            values, receive = self._wire.receive_checked(guard.reader(request.content), recv, env)
            receiving = asyncio.create_task(receive)
            try:
                async with asyncio.timeout(self._timeout.total):  # a peer below its floor is cut sooner (net/pacing.py)
                    got, sent = await self._reply(request, response, env, receiving, slot, guard)
            finally:
                receiving.cancel()
            outcome = await self._merge(recv, send, env.body, env.sender, values)
            await response.write_eof()
        except (ProtocolError, HttpProcessingError) as exc:  # bad bytes, or a body that broke HTTP's framing
            outcome = Outcome.REFUSED
            reason = exc.reason if isinstance(exc, ProtocolError) else BAD_HTTP
            self._count_rejected(reason, env.sender)
            quiet.warning(f"peer {env.sender}", "exchange from %s refused: %s (%s); nothing merged",
                          env.sender, reason, describe(exc))
            response.force_close()
        except (ConnectionError, asyncio.TimeoutError, OSError, TrainerUnavailable) as exc:
            quiet.log(logging.INFO, f"peer {env.sender}", "exchange from %s failed: %s; nothing merged",
                      env.sender, describe(exc))
            self.guard.transfer_failed(env.sender, exc)
            response.force_close()
        finally:
            self._occupancy.give_back(slot, incoming=True)
            self._finished("responder", env.sender, outcome, started, sent, got)
        if not response.prepared:
            return web.json_response({"error": f"exchange {outcome}"}, status=400)
        return response

    async def _reply(self, request: web.Request, response: web.StreamResponse, env: Envelope,
                     receiving: asyncio.Task[int], slot: Slot, guard: TransferGuard) -> tuple[int, int]:
        """Stream our snapshot back while theirs arrives; returns (wire bytes received, sent)."""
        encoding = self._wire.reply_encoding(env.sender, env.body)
        ours = self._wire.manifest(self._weights, encoding, "reply", in_reply_to=env.nonce)
        sealed = seal(self._signer, network=self._network, recipient=env.sender, body=ours, now=time.time())
        response.headers[MANIFEST_HEADER] = encode_header(sealed)
        response.content_length = wire_length(ours.length)
        await response.prepare(request)
        # Hold back our last byte until all of theirs is here: aiohttp's client cancels its
        # upload the moment our response is complete, so finishing first would cut off the
        # initiator's snapshot (it would merge ours, we would merge nothing).
        sent = await self._wire.send(guard.writer(response), self._weights, slot, encoding,
                                     self._digest_sealer(env.sender, nonce_of(sealed)), before_last_byte=receiving)
        return receiving.result(), sent

    async def _serve_model(self, request: web.Request) -> web.StreamResponse:
        """State sync: our current weights for a node of our network that asked, signed."""
        if (refusal := rules.check_model_open(self._occupancy.room())) is not None:
            return refusal_response(refusal)
        env = self._open_header(request.headers.get(REQUEST_HEADER), ModelRequest)
        if isinstance(env, Refusal):
            return refusal_response(env)
        if (refusal := self.guard.admit(env.sender, cost=self._weights.nbytes, unless=rules.check_model_request(env, ours=self._model(), room=self._occupancy.room()))) is not None:
            return refusal_response(self._counted(refusal))
        slot = self._occupancy.take()
        response = web.StreamResponse()
        try:
            schedule_step, seconds_trained = self._weights.lr_clock()
            # State sync stays float32: a newcomer starts from exactly the donor's weights, once.
            manifest = self._wire.manifest(self._weights, "float32", "model", in_reply_to=env.nonce,
                                           schedule_step=schedule_step, seconds_trained=seconds_trained)
            sealed = seal(self._signer, network=self._network, recipient=env.sender, body=manifest, now=time.time())
            response.headers[MANIFEST_HEADER] = encode_header(sealed)
            response.content_length = wire_length(manifest.length)
            await response.prepare(request)
            sealer = self._digest_sealer(env.sender, nonce_of(sealed))
            paced = self._pacing.guard(env.sender, manifest.length).writer(response)
            await asyncio.wait_for(self._wire.send(paced, self._weights, slot, "float32", sealer), self._timeout.total)
            await response.write_eof()
            self._stats = self._stats.moved(sent=manifest.length)
            return response
        except (ConnectionError, asyncio.TimeoutError, OSError, TrainerUnavailable) as exc:
            # The downloader hung up or stalled, or our trainer is restarting: not a bug of ours.
            quiet.log(logging.INFO, f"peer {env.sender}", "sending our model to %s failed: %s", env.sender, describe(exc))
            response.force_close()
            if response.prepared:
                return response
            return web.json_response({"error": "our model is not available now"}, status=503)
        finally:
            self._occupancy.give_back(slot)

    # -- initiator ------------------------------------------------------------------------

    async def exchange_with(self, peer_id: str, url: str) -> Outcome:
        """One push-pull with ``peer_id``; returns its outcome: ok, busy, refused or failed.
        A peer that does not take our encoding answers 415: we ask once more in one both take."""
        outcome = await self._push(peer_id, url, self._wire.choice.offer(peer_id), may_retry=True)
        if not isinstance(outcome, Outcome):
            outcome = await self._push(peer_id, url, outcome, may_retry=False)
        return outcome if isinstance(outcome, Outcome) else Outcome.REFUSED

    async def _push(self, peer_id: str, url: str, encoding: str, may_retry: bool) -> Outcome | str:
        """exchange_with in ``encoding``; or, refused for it (415), the encoding to retry in."""
        if not rules.can_start_push(self._occupancy.room()):
            return Outcome.BUSY
        slot = self._occupancy.take(outgoing=True)
        self._publish()
        started, sent, got = time.monotonic(), 0, 0
        outcome: Outcome | str = Outcome.FAILED
        filled = False  # every chunk of `send` holds what we sent (the digest is sealed)
        try:
            send, recv = slot.buffers()
            ours = self._wire.manifest(self._weights, encoding, "push")
            guard = self._pacing.guard(peer_id, ours.length)
            sealed = seal(self._signer, network=self._network, recipient=peer_id, body=ours, now=time.time())
            push_nonce = nonce_of(sealed)
            seal_push_digest = self._digest_sealer(peer_id, push_nonce)

            def seal_digest(length: int, digest: bytes) -> bytes:
                nonlocal filled
                filled = True
                return seal_push_digest(length, digest)

            async def produce(writer: Any) -> None:  # runs once the peer said 100 Continue
                await self._wire.send(guard.writer(writer), self._weights, slot, encoding, seal_digest)

            size = wire_length(ours.length)
            async with self._http().post(
                url.rstrip("/") + "/v1/exchange", data=StreamPayload(size, produce), expect100=True,
                headers={MANIFEST_HEADER: encode_header(sealed), "Content-Length": str(size)},
                timeout=self._timeout, ssl=self.guard.client_ssl(peer_id, url),
            ) as response:
                if response.status != 200:
                    answer = await response.text()
                    response.close()  # never reuse: the body we announced was not sent
                    outcome = Outcome.BUSY if response.status == 429 else Outcome.REFUSED
                    log.info("exchange with %s: %s %s", peer_id, response.status, answer[:200].strip())
                    if response.status == 415 and may_retry:
                        outcome = self._wire.retry_after_415(peer_id, encoding, answer) or outcome
                    return outcome
                env = self._open_header(response.headers.get(MANIFEST_HEADER), Manifest)
                # (a reply that is no answer to us is logged, not counted: only the verifier's refusals are)
                refusal = env if isinstance(env, Refusal) else rules.check_reply(
                    env, peer_id=peer_id, push_nonce=push_nonce, ours=self._model(), accepts=self._wire.choice.accepts)
                if refusal is not None:
                    log.info("exchange with %s: refused its reply: %s", peer_id, refusal.detail)
                    return (outcome := Outcome.REFUSED)
                values, receive = self._wire.receive_checked(guard.reader(response.content), recv, env)
                got = await receive
            if not filled:  # an honest peer ends its reply only after all of our push
                log.info("exchange with %s: its reply ended before our push was sent; nothing merged", peer_id)
                return Outcome.FAILED
            sent, outcome = ours.length, await self._merge(recv, send, env.body, peer_id, values)
            return outcome
        except Rejected as exc:
            self._count_rejected(exc.reason, peer_id)
            log.warning("exchange with %s: its reply was refused: %s (%s); nothing merged", peer_id, exc.reason, exc)
            return (outcome := Outcome.REFUSED)
        except (ProtocolError, ConnectionError, asyncio.TimeoutError, aiohttp.ClientError, OSError,
                TrainerUnavailable) as exc:
            log.info("exchange with %s failed: %s", peer_id, describe(exc))
            return Outcome.FAILED
        finally:
            self._occupancy.give_back(slot, outgoing=True)
            if isinstance(outcome, Outcome):  # else it goes on in another encoding
                self._finished("initiator", peer_id, outcome, started, sent, got)

    async def fetch_model(self, peer_id: str, url: str, dst: torch.Tensor) -> Manifest | None:
        """State sync: download ``peer_id``'s weights into ``dst`` and verify them; their
        manifest (with the donor's lr clock), or None."""
        sealed = seal(self._signer, network=self._network, recipient=peer_id,
                      body=ModelRequest(fingerprint=self._weights.fingerprint), now=time.time())
        ours = ModelShape(self._weights.fingerprint, dst.numel() * dst.element_size())
        try:
            async with self._http().get(
                url.rstrip("/") + "/v1/model", headers={REQUEST_HEADER: encode_header(sealed)}, timeout=self._timeout, ssl=self.guard.client_ssl(peer_id, url),
            ) as response:
                if response.status != 200:  # 429: busy, or syncing itself (the caller asks again)
                    log.log(logging.DEBUG if response.status == 429 else logging.INFO, "state sync from %s: %s %s",
                            peer_id, response.status, (await response.text())[:200])
                    return None
                env = self._open_header(response.headers.get(MANIFEST_HEADER), Manifest)
                refusal = env if isinstance(env, Refusal) else rules.check_model_reply(
                    env, peer_id=peer_id, request_nonce=nonce_of(sealed), ours=ours, accepts=self._wire.choice.accepts)
                if refusal is not None:
                    log.info("state sync from %s failed: %s", peer_id, refusal.detail)
                    return None
                guard = self._pacing.guard(peer_id, env.body.length)
                values, receive = self._wire.receive_checked(guard.reader(response.content), dst, env)
                await receive
                self._stats = self._stats.moved(received=env.body.length)
        except (ProtocolError, ConnectionError, asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.info("state sync from %s failed: %s", peer_id, describe(exc))
            return None
        problem = await in_receive_worker(self._wire.workers, values.problem)  # checked as it arrived: little left
        if problem:
            log.warning("state sync from %s: refusing its weights: %s", peer_id, problem)
            return None
        return env.body

    # -- shared ---------------------------------------------------------------------------

    @property
    def _pacing(self) -> Pacing:  # rate caps, transfer floors, slow-peer cooldowns (net/pacing.py)
        return self._wire.workers.pacing

    def _model(self) -> ModelShape:
        return ModelShape(self._weights.fingerprint, self._weights.nbytes)

    def _digest_sealer(self, recipient: str, manifest_nonce: bytes) -> SealDigest:
        return digest_sealer(self._signer, self._network, recipient, manifest_nonce)

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=CLIENT_IDLE_S))
        return self._session

    def _open_header(self, value: str | None, kind: type[Body]) -> Envelope | Refusal:
        """The verified envelope in a signed header, or the refusal (counted)."""
        opened = rules.open_header(self.guard.verifier, decode_header(value), kind)
        return self._counted(opened) if isinstance(opened, Refusal) else opened

    async def _merge(self, received: torch.Tensor, sent: torch.Tensor, theirs: Manifest, peer_id: str,
                     values: ValueCheck) -> Outcome:
        problem = await in_receive_worker(self._wire.workers, values.problem)  # checked as it arrived: little left
        if problem:
            self._count_rejected("bad_values", peer_id)
            quiet.warning(f"peer {peer_id}", "not merging weights from %s: %s", peer_id, problem)
            return Outcome.REFUSED
        alpha = bounded_mixing_weight(self._weights.num_samples, theirs.sample_weight)
        await in_receive_worker(self._wire.workers, self._weights.merge, received, sent, alpha)
        return Outcome.OK

    def _counted(self, refusal: Refusal) -> Refusal:
        if refusal.counted:
            self._count_rejected(refusal.reason)
        return refusal

    def _count_rejected(self, reason: str, peer_id: str = "") -> None:
        self._stats = self._stats.with_rejection(reason)
        self.guard.ban_reason(peer_id, reason)  # "": not a fault of a peer's own
        if self._on_rejected is not None:
            self._on_rejected(reason)

    def _publish(self) -> None:
        self._stats = self._stats.occupied(self._occupancy)

    def _finished(self, role: Role, peer_id: str, outcome: Outcome, started: float, sent: int, got: int) -> None:
        duration = time.monotonic() - started
        last = LastExchange(peer_id=peer_id, role=role, outcome=outcome, duration_s=round(duration, 4), at=time.time())
        self._stats = self._stats.finished(last, sent, got).occupied(self._occupancy)
        if self._on_finished is not None:
            self._on_finished(role, outcome, duration, sent, got)

