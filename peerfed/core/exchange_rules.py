"""The exchange's rules: what a node accepts in a push, a reply, a model request and a model.

Bytes in, decisions out (like core/schedule.py): each check is fed the verified Envelope of
a signed header and plain values the driver read from its own state (net/exchange.py), and
returns None (go on) or a Refusal: the HTTP status the driver answers with, a stable reason
it counts, and a detail for the peer and the log. ``open_header`` turns the header's bytes
into that Envelope or a Refusal. No I/O, no clock; each rule is written once.

Also here: ``Outcome``, the one vocabulary for how an exchange ended, shared by the driver,
the gossip scheduler (core/schedule.py) and the metrics.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum

from peerfed.core import encodings
from peerfed.core.envelope import Body, Envelope, Verifier
from peerfed.core.errors import Rejected
from peerfed.core.manifest import TRAILER_SIZE, Manifest
from peerfed.core.records import ModelRequest


class Outcome(StrEnum):
    """How one exchange ended (a str: "ok" == Outcome.OK, and JSON writes "ok")."""

    OK = "ok"              # both sides' weights arrived, checked, merged
    BUSY = "busy"          # the peer (or we) had no room for it: try another peer
    REFUSED = "refused"    # a rule said no (bad manifest, other model, bad values)
    FAILED = "failed"      # the connection or the trainer failed on the way
    CANCELLED = "cancelled"  # we aborted it (shutdown): the scheduler's only, never counted


# How an exchange can end, as the exchange and its metrics count it.
EXCHANGE_OUTCOMES: tuple[Outcome, ...] = (Outcome.OK, Outcome.BUSY, Outcome.REFUSED, Outcome.FAILED)

NOT_READY = "not ready: our first weights are still coming (state sync)"
# Refusals that say something about us, not about the message: answered, never counted.
OUR_STATE = frozenset({"shutting_down", "not_ready", "busy", "upload_budget"})


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int   # the HTTP status the driver answers with
    reason: str   # stable: counted by reason (like core.errors reasons)
    detail: str   # for the peer (the response body) and the log
    accepts: tuple[str, ...] = ()  # a 415's answer: the encodings we do accept

    @property
    def counted(self) -> bool:
        """A rejection of the message, counted by reason (not busy, not ready, shutting down, out of upload budget)."""
        return self.reason not in OUR_STATE


SHUTTING_DOWN = Refusal(429, "shutting_down", "shutting down")
WEIGHTS_NOT_READY = Refusal(429, "not_ready", NOT_READY)
BUSY = Refusal(429, "busy", "busy")
MISSING_HEADER = Refusal(401, "malformed", "missing or unreadable signed manifest header")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What a manifest must match: our model's fingerprint and its size in bytes."""

    fingerprint: str
    nbytes: int  # as float32

    @property
    def numel(self) -> int:
        return self.nbytes // 4


@dataclass(frozen=True, slots=True)
class Room:
    """What this node can take on now, as the driver reads it from its own state."""

    accepting: bool       # False once it is shutting down
    weights_ready: bool   # False until state sync is done or skipped (our weights are a random init)
    incoming: int         # exchanges we are answering now
    max_incoming: int
    outgoing: bool        # an exchange we started is running
    free_slots: int       # sets of buffers others' exchanges and downloads may take (one is kept for ours)


def wire_length(payload_length: int) -> int:
    """Bytes on the wire for a payload: the payload and its trailer."""
    return payload_length + TRAILER_SIZE


def upload_per_exchange(encoding_setting: str, numel: int) -> int:
    """What a node uploads per exchange interval: its push and about one reply to a peer's
    push, both in the encoding it offers first (exchange.encoding; "auto": int8)."""
    first = encodings.expand_preferences([encoding_setting])[0]
    return 2 * wire_length(encodings.wire_length(first, numel))


FLOAT32_ONLY: tuple[str, ...] = (encodings.LOSSLESS,)


def check_payload(m: Manifest, *, ours: ModelShape, accepts: Collection[str]) -> Refusal | None:
    """Is the announced payload our model in an encoding we accept, its length and int8 block
    count exactly that encoding's? (A manifest that lies is refused before any byte.)"""
    if m.encoding not in accepts or m.encoding not in encodings.ENCODINGS:
        return Refusal(415, "unsupported_encoding", f"encoding {m.encoding!r} is not accepted here; "
                       f"accepted: {', '.join(accepts)}", accepts=tuple(accepts))
    length, blocks = (f(m.encoding, ours.numel) for f in (encodings.wire_length, encodings.block_count))
    if m.length != length or m.blocks != blocks:
        return Refusal(413, "length_mismatch", f"{m.encoding} of our model is {length} bytes in {blocks} blocks, "
                       f"not {m.length} bytes in {m.blocks}")
    return None


def open_header(verifier: Verifier, raw: bytes | None, kind: type[Body]) -> Envelope | Refusal:
    """The verified envelope of a signed header (None: missing or not base64), or a Refusal."""
    if raw is None:
        return MISSING_HEADER
    try:
        return verifier.verify(raw, expected_kind=kind)
    except Rejected as exc:
        return Refusal(400 if exc.reason == "malformed" else 401, exc.reason, f"{exc.reason}: {exc}")


# -- responder: a push (POST /v1/exchange) ---------------------------------------------------

def check_push_open(room: Room) -> Refusal | None:
    """What refuses any push before its header is read (no signature check spent on it)."""
    if not room.accepting:
        return SHUTTING_DOWN
    if not room.weights_ready:
        return WEIGHTS_NOT_READY
    return None


def check_push(env: Envelope, *, ours: ModelShape, content_length: int | None, room: Room,
               accepts: Collection[str] = FLOAT32_ONLY) -> Refusal | None:
    """May this verified push manifest start an exchange? ``content_length``: the request's;
    ``accepts``: the encodings we take."""
    if (refusal := check_push_open(room)) is not None:
        return refusal
    m: Manifest = env.body
    if m.purpose != "push":
        return Refusal(400, "malformed", f"manifest purpose {m.purpose!r} is not 'push'")
    if m.fingerprint != ours.fingerprint:
        return Refusal(409, "fingerprint_mismatch", "model fingerprint differs from ours")
    if (refusal := check_payload(m, ours=ours, accepts=accepts)) is not None:
        return refusal
    if content_length != wire_length(m.length):
        return Refusal(413, "length_mismatch", f"Content-Length must be {wire_length(m.length)} (payload and trailer)")
    # Two merges at once would count our own weights twice: one exchange at a time, unless
    # max_incoming allows more incoming ones.
    if room.outgoing or room.incoming >= room.max_incoming or room.free_slots == 0:
        return BUSY
    return None


# -- initiator: our push and its reply -------------------------------------------------------

def can_start_push(room: Room) -> bool:
    """May we start an exchange now? (Otherwise its outcome is busy, without asking anyone.)
    A slot is always kept for our own exchange (``free_slots`` counts only what others may
    take): what others ask of us never delays it, so a peer that holds our incoming slot
    cannot stop this node's own exchanges (issue 12)."""
    return room.accepting and not room.outgoing


def check_reply(env: Envelope, *, peer_id: str, push_nonce: bytes, ours: ModelShape,
                accepts: Collection[str] = FLOAT32_ONLY) -> Refusal | None:
    """Does this verified reply manifest answer our push to ``peer_id``, for our model, in an
    encoding we accept?"""
    m: Manifest = env.body
    if env.sender != peer_id or m.purpose != "reply" or m.in_reply_to != push_nonce:
        return Refusal(401, "not_an_answer", "reply manifest does not answer our push")
    if m.fingerprint != ours.fingerprint:
        return Refusal(409, "fingerprint_mismatch", "reply is for another model")
    return check_payload(m, ours=ours, accepts=accepts)


# -- state sync: GET /v1/model, both sides ---------------------------------------------------

def check_model_open(room: Room) -> Refusal | None:
    """What refuses any model request before its header is read."""
    if not room.weights_ready:
        return WEIGHTS_NOT_READY  # a newcomer must not start from our random init
    if room.free_slots == 0:
        return BUSY
    return None


def check_model_request(env: Envelope, *, ours: ModelShape, room: Room) -> Refusal | None:
    """May we send our weights to the sender of this verified model request?"""
    if (refusal := check_model_open(room)) is not None:
        return refusal
    request: ModelRequest = env.body
    if request.fingerprint != ours.fingerprint:
        return Refusal(409, "fingerprint_mismatch", "model fingerprint differs from ours")
    return None


def check_model_reply(env: Envelope, *, peer_id: str, request_nonce: bytes, ours: ModelShape,
                      accepts: Collection[str] = FLOAT32_ONLY) -> Refusal | None:
    """Does this verified model manifest answer our request to ``peer_id``, for our model?"""
    m: Manifest = env.body
    if env.sender != peer_id or m.purpose != "model" or m.in_reply_to != request_nonce:
        return Refusal(401, "not_an_answer", "model manifest does not answer our request")
    if m.fingerprint != ours.fingerprint:
        return Refusal(409, "fingerprint_mismatch", "the model sent is another model than ours")
    return check_payload(m, ours=ours, accepts=accepts)
