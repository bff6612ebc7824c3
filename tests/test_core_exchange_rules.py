"""The exchange's rules without sockets: seal a header with a Signer, verify it, ask the rule.

Every refusal reason of a push, a reply, a model request and a model, the accept cases, the
order the checks run in, and the one outcome type.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest

from peerfed.core.envelope import (
    Envelope,
    Manifest,
    ModelRequest,
    PeerList,
    Verifier,
    seal,
)
from peerfed.core.exchange_rules import (
    BUSY,
    EXCHANGE_OUTCOMES,
    NOT_READY,
    ModelShape,
    Outcome,
    Refusal,
    Room,
    can_start_push,
    check_model_open,
    check_model_reply,
    check_model_request,
    check_push,
    check_push_open,
    check_reply,
    open_header,
    wire_length,
)
from peerfed.core.manifest import TRAILER_SIZE
from peerfed.core.peerid import Signer
from peerfed.core.schedule import ExchangeScheduler

NOW = 1_700_000_000.0
NET = "peerfed-test"
ALICE = Signer(bytes(range(32)))   # the initiator / newcomer
BOB = Signer(bytes(range(1, 33)))  # the responder / donor
CAROL = Signer(bytes(range(2, 34)))
OURS = ModelShape(fingerprint="ab" * 32, nbytes=4096)
FREE = Room(accepting=True, weights_ready=True, incoming=0, max_incoming=1, outgoing=False, free_slots=2)
NONCE = b"\x05" * 16


def flip_last_byte(data: bytes) -> bytes:
    """A signature byte changed for sure (appending a fixed byte left it as it was 1 time in 256)."""
    return data[:-1] + bytes([data[-1] ^ 0x01])


def verifier_of(signer: Signer, **kw: Any) -> Verifier:
    return Verifier(network=NET, own_peer_id=signer.peer_id, clock=lambda: NOW, **kw)


def sealed(body: Any, *, sender: Signer = ALICE, to: Signer = BOB, nonce: bytes | None = None) -> bytes:
    return seal(sender, network=NET, recipient=to.peer_id, body=body, now=NOW, nonce=nonce)


def opened(body: Any, *, sender: Signer = ALICE, to: Signer = BOB, nonce: bytes | None = None) -> Envelope:
    env = open_header(verifier_of(to), sealed(body, sender=sender, to=to, nonce=nonce), type(body))
    assert isinstance(env, Envelope)
    return env


def manifest(purpose: str, **over: Any) -> Manifest:
    fields: dict[str, Any] = {"fingerprint": OURS.fingerprint, "length": OURS.nbytes, "sample_weight": 10.0,
                              "purpose": purpose}
    return Manifest(**(fields | over))


def push(purpose: str = "push", **over: Any) -> Envelope:
    return opened(manifest(purpose, **over))


def room(**over: Any) -> Room:
    return dataclasses.replace(FREE, **over)


def assert_refused(refusal: Refusal | None, status: int, reason: str, counted: bool = True) -> None:
    assert refusal is not None, f"expected a {status} {reason} refusal"
    assert (refusal.status, refusal.reason, refusal.counted) == (status, reason, counted)
    assert refusal.detail


# ---------------------------------------------------------------- headers

def test_open_header_returns_the_verified_envelope() -> None:
    env = open_header(verifier_of(BOB), sealed(manifest("push")), Manifest)
    assert isinstance(env, Envelope) and env.sender == ALICE.peer_id and env.body == manifest("push")


def test_open_header_refuses_a_missing_header_as_malformed() -> None:
    refusal = open_header(verifier_of(BOB), None, Manifest)
    assert isinstance(refusal, Refusal)
    assert_refused(refusal, 401, "malformed")
    assert refusal.detail == "missing or unreadable signed manifest header"


@pytest.mark.parametrize(("data", "verifier", "status", "reason"), [
    (b"\x00not an envelope", verifier_of(BOB), 400, "malformed"),
    (sealed(manifest("push"), to=CAROL), verifier_of(BOB), 401, "not_for_me"),
    (flip_last_byte(sealed(manifest("push"))), verifier_of(BOB), 401, "bad_signature"),
    (sealed(PeerList(records=())), verifier_of(BOB), 400, "malformed"),  # another kind
    (sealed(manifest("push")), verifier_of(BOB, allowlist=frozenset({CAROL.peer_id})), 401, "not_allowed"),
    (seal(ALICE, network="other", recipient=BOB.peer_id, body=manifest("push"), now=NOW), verifier_of(BOB),
     401, "wrong_network"),
    (sealed(manifest("push")), Verifier(network=NET, own_peer_id=BOB.peer_id, clock=lambda: NOW + 3600), 401,
     "too_old"),
    (sealed(manifest("push")), verifier_of(BOB, max_size=64), 401, "oversized"),
])
def test_open_header_refusals_carry_the_verifiers_reason(data: bytes, verifier: Verifier, status: int,
                                                         reason: str) -> None:
    refusal = open_header(verifier, data, Manifest)
    assert isinstance(refusal, Refusal)
    assert_refused(refusal, status, reason)
    assert refusal.detail.startswith(f"{reason}: ")


def test_open_header_refuses_a_replayed_header() -> None:
    verifier, data = verifier_of(BOB), sealed(manifest("push"))
    assert isinstance(open_header(verifier, data, Manifest), Envelope)
    assert_refused(open_header(verifier, data, Manifest), 401, "replay")  # type: ignore[arg-type]


# ---------------------------------------------------------------- push (responder)

def test_a_push_for_our_model_with_the_right_length_is_accepted() -> None:
    assert check_push(push(), ours=OURS, content_length=wire_length(OURS.nbytes), room=FREE) is None
    assert wire_length(OURS.nbytes) == OURS.nbytes + TRAILER_SIZE


@pytest.mark.parametrize(("state", "reason", "detail"), [
    (room(accepting=False), "shutting_down", "shutting down"),
    (room(weights_ready=False), "not_ready", NOT_READY),
    (room(accepting=False, weights_ready=False), "shutting_down", "shutting down"),
])
def test_a_push_is_refused_before_its_header_while_we_cannot_take_it(state: Room, reason: str, detail: str) -> None:
    for refusal in (check_push_open(state),
                    check_push(push(), ours=OURS, content_length=wire_length(OURS.nbytes), room=state)):
        assert_refused(refusal, 429, reason, counted=False)
        assert refusal is not None and refusal.detail == detail
    assert check_push_open(FREE) is None


@pytest.mark.parametrize("state", [room(outgoing=True), room(incoming=1), room(free_slots=0),
                                   room(incoming=2, max_incoming=2)])
def test_a_push_is_busy_while_we_exchange_or_have_no_buffers(state: Room) -> None:
    refusal = check_push(push(), ours=OURS, content_length=wire_length(OURS.nbytes), room=state)
    assert refusal == BUSY
    assert_refused(refusal, 429, "busy", counted=False)
    # max_incoming above 1 lets a second incoming exchange in while one runs
    assert check_push(push(), ours=OURS, content_length=wire_length(OURS.nbytes),
                      room=room(incoming=1, max_incoming=2)) is None


@pytest.mark.parametrize(("env", "content_length", "status", "reason"), [
    (push(purpose="reply"), wire_length(OURS.nbytes), 400, "malformed"),
    (push(purpose="model"), wire_length(OURS.nbytes), 400, "malformed"),
    (push(fingerprint="cd" * 32), wire_length(OURS.nbytes), 409, "fingerprint_mismatch"),
    (push(length=OURS.nbytes - 4), wire_length(OURS.nbytes - 4), 413, "length_mismatch"),
    (push(), OURS.nbytes, 413, "length_mismatch"),          # the body would lack its trailer
    (push(), wire_length(OURS.nbytes) + 1, 413, "length_mismatch"),
    (push(), None, 413, "length_mismatch"),                 # no Content-Length at all
])
def test_a_push_that_does_not_fit_our_model_is_refused(env: Envelope, content_length: int | None, status: int,
                                                        reason: str) -> None:
    assert_refused(check_push(env, ours=OURS, content_length=content_length, room=FREE), status, reason)


def test_a_wrong_push_is_refused_for_what_it_is_even_while_we_are_busy() -> None:
    # the message's fault is counted (and told) before our own state
    refusal = check_push(push(fingerprint="cd" * 32), ours=OURS, content_length=wire_length(OURS.nbytes),
                         room=room(outgoing=True))
    assert_refused(refusal, 409, "fingerprint_mismatch")


# ---------------------------------------------------------------- reply (initiator)

def reply(*, sender: Signer = BOB, nonce: bytes = NONCE, **over: Any) -> Envelope:
    return opened(manifest("reply", in_reply_to=nonce, **over), sender=sender, to=ALICE)


def test_a_reply_that_answers_our_push_for_our_model_is_accepted() -> None:
    assert check_reply(reply(), peer_id=BOB.peer_id, push_nonce=NONCE, ours=OURS) is None


@pytest.mark.parametrize(("env", "status", "reason"), [
    (reply(sender=CAROL), 401, "not_an_answer"),                 # not the peer we asked
    (reply(nonce=b"\x06" * 16), 401, "not_an_answer"),           # answers another push
    (reply(nonce=b""), 401, "not_an_answer"),
    (opened(manifest("push", in_reply_to=NONCE), sender=BOB, to=ALICE), 401, "not_an_answer"),
    (opened(manifest("model", in_reply_to=NONCE), sender=BOB, to=ALICE), 401, "not_an_answer"),
    (reply(fingerprint="cd" * 32), 409, "fingerprint_mismatch"),
    (reply(length=OURS.nbytes * 2), 413, "length_mismatch"),
])
def test_a_reply_that_is_not_our_answer_is_refused(env: Envelope, status: int, reason: str) -> None:
    assert_refused(check_reply(env, peer_id=BOB.peer_id, push_nonce=NONCE, ours=OURS), status, reason)


@pytest.mark.parametrize(("state", "may"), [
    (FREE, True), (room(weights_ready=False), True),  # a syncing node's own pushes are not asked for
    (room(accepting=False), False), (room(outgoing=True), False),
    # our own exchange has its own slot: an exchange we answer (even one held by a slow peer) never delays it
    (room(incoming=1, max_incoming=2), True), (room(incoming=1, free_slots=0), True),
])
def test_we_start_a_push_unless_ours_runs_or_we_stop(state: Room, may: bool) -> None:
    assert can_start_push(state) is may


# ---------------------------------------------------------------- state sync, both sides

def model_request(**over: Any) -> Envelope:
    return opened(ModelRequest(**({"fingerprint": OURS.fingerprint} | over)))


def test_a_model_request_for_our_model_is_served() -> None:
    assert check_model_open(FREE) is None
    assert check_model_request(model_request(), ours=OURS, room=FREE) is None
    # an exchange running elsewhere does not stop a model download while buffers are free
    assert check_model_request(model_request(), ours=OURS, room=room(outgoing=True, incoming=1)) is None


def test_a_model_request_is_refused_while_we_have_no_model_or_no_buffers() -> None:
    for state, reason in ((room(weights_ready=False), "not_ready"), (room(free_slots=0), "busy")):
        assert_refused(check_model_open(state), 429, reason, counted=False)
        assert_refused(check_model_request(model_request(), ours=OURS, room=state), 429, reason, counted=False)


def test_a_model_request_for_another_model_is_refused() -> None:
    refusal = check_model_request(model_request(fingerprint="cd" * 32), ours=OURS, room=FREE)
    assert_refused(refusal, 409, "fingerprint_mismatch")


def model(*, sender: Signer = BOB, nonce: bytes = NONCE, **over: Any) -> Envelope:
    body = manifest("model", in_reply_to=nonce, schedule_step=7, seconds_trained=1.5, **over)
    return opened(body, sender=sender, to=ALICE)


def test_a_model_that_answers_our_request_is_accepted() -> None:
    env = model()
    assert check_model_reply(env, peer_id=BOB.peer_id, request_nonce=NONCE, ours=OURS) is None
    assert (env.body.schedule_step, env.body.seconds_trained) == (7, 1.5)


@pytest.mark.parametrize(("env", "status", "reason"), [
    (model(sender=CAROL), 401, "not_an_answer"),
    (model(nonce=b"\x06" * 16), 401, "not_an_answer"),
    (opened(manifest("reply", in_reply_to=NONCE), sender=BOB, to=ALICE), 401, "not_an_answer"),
    (model(fingerprint="cd" * 32), 409, "fingerprint_mismatch"),
    (model(length=OURS.nbytes + 4), 413, "length_mismatch"),
])
def test_a_model_that_is_not_our_answer_is_refused(env: Envelope, status: int, reason: str) -> None:
    assert_refused(check_model_reply(env, peer_id=BOB.peer_id, request_nonce=NONCE, ours=OURS), status, reason)


# ---------------------------------------------------------------- the outcome type

def test_one_outcome_type_reads_and_writes_as_its_string() -> None:
    assert [o.value for o in Outcome] == ["ok", "busy", "refused", "failed", "cancelled"]
    assert EXCHANGE_OUTCOMES == (Outcome.OK, Outcome.BUSY, Outcome.REFUSED, Outcome.FAILED)
    assert Outcome.OK == "ok" and {"ok": 1}[Outcome.OK] == 1 and f"{Outcome.BUSY}" == "busy"
    assert json.dumps({"outcome": Outcome.REFUSED}) == '{"outcome": "refused"}'


def test_the_scheduler_counts_the_same_outcomes() -> None:
    s = ExchangeScheduler(interval=1.0, rng=random.Random(0), now=0.0)
    for outcome in Outcome:
        s.begin("p", 10.0)
        s.on_result("p", outcome, 10.0)
    stats = s.statistics()
    assert all(stats[o] == 1 for o in Outcome) and all(stats[o.value] == 1 for o in Outcome)
    s.begin("p", 20.0)
    with pytest.raises(ValueError, match="unknown outcome"):
        s.on_result("p", "lost", 20.0)
