"""Signed envelopes: round trips, every rejection reason, tampering, fuzzing, libp2p agreement."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from peerfed.core.envelope import (
    DOMAIN,
    KINDS,
    MAX_NETWORK_CHARS,
    PROTOCOL_VERSION,
    Envelope,
    Manifest,
    ModelRequest,
    PayloadDigest,
    PeerList,
    PeerRecord,
    Verifier,
    check_signature,
    decode,
    seal,
    verify_peer_record,
)
from peerfed.core.errors import (
    BadSignature,
    Expired,
    InFuture,
    Malformed,
    NotAllowed,
    NotForMe,
    Oversized,
    ProtocolError,
    Rejected,
    Replay,
    TooOld,
    WrongNetwork,
)
from peerfed.core.manifest import TRAILER_SIZE, pack_trailer, unpack_trailer
from peerfed.core.peerid import (
    Signer,
    is_valid_peer_id,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)

NOW = 1_700_000_000.0
NET = "peerfed-test"
ALICE = Signer(bytes(range(32)))
BOB = Signer(bytes(range(1, 33)))
CAROL = Signer(bytes(range(2, 34)))
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def record_for(signer: Signer, n: int = 1) -> PeerRecord:
    addrs = tuple(f"/ip4/10.0.0.{i}/tcp/7401/p2p/{signer.peer_id}" for i in range(n))
    return PeerRecord(addrs=addrs, exchange_url="http://10.0.0.1:7402", fingerprint="ab" * 32,
                      version="0.1.0")


MANIFEST = Manifest(fingerprint="cd" * 32, length=1 << 20, sample_weight=12.5,
                    purpose="reply", in_reply_to=b"\x07" * 16)
PAYLOAD_DIGEST = PayloadDigest(manifest_nonce=b"\x13" * 16, length=1 << 20,
                               digest=bytes(range(32)))


def bob_verifier(**kw: Any) -> Verifier:
    kw.setdefault("clock", lambda: NOW)
    return Verifier(network=NET, own_peer_id=BOB.peer_id, **kw)


def forge(fields: list[Any], signer: Signer = ALICE, domain: bytes = DOMAIN) -> bytes:
    """Wire bytes for arbitrary (8) signed fields, validly signed by ``signer``."""
    signed = msgpack.packb(fields, use_bin_type=True)
    assert signed[0] == 0x98
    return b"\x99" + signed[1:] + b"\xc4\x40" + signer.sign(domain + signed)


def good_fields(**over: Any) -> list[Any]:
    f = {"version": PROTOCOL_VERSION, "network": NET, "sender": ALICE.peer_id,
         "recipient": BOB.peer_id, "kind": "manifest", "nonce": b"\x01" * 16,
         "timestamp": NOW, "body": MANIFEST.to_wire()}
    f.update(over)
    return list(f.values())


# ---------------------------------------------------------------- round trips

texts = st.text(max_size=40)
peer_records = st.builds(
    lambda ips, url, fp, ver: PeerRecord(
        addrs=tuple(f"/ip4/{ip}/tcp/7401/p2p/{ALICE.peer_id}" for ip in ips),
        exchange_url=url, fingerprint=fp, version=ver),
    st.lists(st.ip_addresses(v=4).map(str), max_size=4), texts, texts, texts)
peer_lists = st.builds(lambda rs: PeerList(records=tuple(rs)),
                       st.lists(st.binary(max_size=300), max_size=5))
manifests = st.builds(
    Manifest, fingerprint=texts, length=st.integers(0, (1 << 63) - 1),
    sample_weight=st.floats(0, 1e15, allow_nan=False, allow_infinity=False),
    purpose=st.sampled_from(["push", "reply", "model"]),
    in_reply_to=st.one_of(st.just(b""), st.binary(min_size=16, max_size=16)))
payload_digests = st.builds(
    PayloadDigest, manifest_nonce=st.binary(min_size=16, max_size=16),
    length=st.integers(0, (1 << 63) - 1), digest=st.binary(min_size=32, max_size=32))
model_requests = st.builds(ModelRequest, fingerprint=texts)
bodies = st.one_of(peer_records, peer_lists, manifests, payload_digests, model_requests)


@FAST
@given(body=bodies, now=st.floats(1e9, 4e9), nonce=st.binary(min_size=16, max_size=16),
       to_bob=st.booleans())
def test_every_kind_round_trips(body: Any, now: float, nonce: bytes, to_bob: bool) -> None:
    recipient = BOB.peer_id if (to_bob or not isinstance(body, PeerRecord)) else ""
    data = seal(ALICE, network=NET, body=body, recipient=recipient, now=now, nonce=nonce)
    env = bob_verifier(clock=lambda: now).verify(data, expected_kind=type(body))
    assert env == Envelope(version=PROTOCOL_VERSION, network=NET, sender=ALICE.peer_id,
                           recipient=recipient, kind=body.KIND, nonce=nonce, timestamp=now,
                           body=body, signature=env.signature)
    assert type(env.body) is type(body)
    check_signature(env)
    # An Envelope without the received bytes re-encodes canonically to the same signed bytes.
    rebuilt = Envelope(**{k: getattr(env, k) for k in (
        "version", "network", "sender", "recipient", "kind", "nonce", "timestamp", "body",
        "signature")})
    check_signature(rebuilt)


def test_seal_refuses_what_peers_would_refuse() -> None:
    with pytest.raises(ValueError, match="recipient"):
        seal(ALICE, network=NET, body=MANIFEST, now=NOW)  # manifest is not broadcast
    with pytest.raises(ValueError, match="nonce"):
        seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW, nonce=b"x")
    with pytest.raises(ValueError, match="p2p"):  # a record must speak for its signer only
        seal(ALICE, network=NET, body=record_for(BOB), now=NOW)
    with pytest.raises(ValueError):
        seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=math.nan)
    bad = Manifest(fingerprint="", length=-1, sample_weight=1.0, purpose="push")
    with pytest.raises(ValueError):
        seal(ALICE, network=NET, body=bad, recipient=BOB.peer_id, now=NOW)
    with pytest.raises(ValueError, match="recipient"):  # a payload digest is not broadcast
        seal(ALICE, network=NET, body=PAYLOAD_DIGEST, now=NOW)
    for bad_digest in (PayloadDigest(manifest_nonce=b"x", length=1, digest=bytes(32)),
                       PayloadDigest(manifest_nonce=bytes(16), length=-1, digest=bytes(32)),
                       PayloadDigest(manifest_nonce=bytes(16), length=1, digest=bytes(31))):
        with pytest.raises(ValueError):
            seal(ALICE, network=NET, body=bad_digest, recipient=BOB.peer_id, now=NOW)


def test_unknown_body_fields_are_ignored_but_signed() -> None:
    body = {**MANIFEST.to_wire(), "zz_new_field": [1, "two", {"x": 3.5}]}
    del body["in_reply_to"]  # an optional field an older sender would not send
    env = bob_verifier().verify(forge(good_fields(body=body)))
    assert env.body == Manifest(fingerprint=MANIFEST.fingerprint, length=MANIFEST.length,
                                sample_weight=12.5, purpose="reply")
    # The extra field is covered by the signature: changing it breaks it.
    data = forge(good_fields(body=body, nonce=b"\x02" * 16))
    tampered = data.replace(b"two", b"TWO")
    with pytest.raises(BadSignature):
        bob_verifier().verify(tampered)


# ---------------------------------------------------------------- rejections

def test_each_rejection_reason_is_distinct_and_counted() -> None:
    v = bob_verifier(allowlist=frozenset({ALICE.peer_id, CAROL.peer_id}))

    def sealed(signer: Signer = ALICE, **kw: Any) -> bytes:
        kw.setdefault("network", NET)
        kw.setdefault("recipient", BOB.peer_id)
        kw.setdefault("now", NOW)
        return seal(signer, body=kw.pop("body", MANIFEST), **kw)

    ok = sealed()
    assert v.verify(ok).sender == ALICE.peer_id
    cases: list[tuple[bytes, type[Rejected]]] = [
        (ok, Replay),
        (sealed(network="other-net"), WrongNetwork),
        (sealed(recipient=CAROL.peer_id), NotForMe),
        (sealed(BOB), NotAllowed),
        (sealed(now=NOW - 300.001), TooOld),
        (sealed(now=NOW + 5.001), InFuture),
        (forge(good_fields(sender=CAROL.peer_id)), BadSignature),  # signed by Alice
        (forge(good_fields(nonce=b"\x09" * 16), domain=b"other/domain\0"), BadSignature),
        (b"\x01" * ((1 << 20) + 1), Oversized),
        (b"\xc1", Malformed),
    ]
    for data, error in cases:
        with pytest.raises(error) as info:
            v.verify(data)
        assert type(info.value) is error, (error, info.value)
        assert info.value.reason == error.reason and str(info.value)
    # Window edges are inclusive.
    assert v.verify(sealed(now=NOW - 300.0)) and v.verify(sealed(now=NOW + 5.0))
    stats = v.statistics()
    assert stats["accepted"] == 3
    for reason in ("replay", "wrong_network", "not_for_me", "not_allowed", "too_old",
                   "in_future", "oversized", "malformed"):
        assert stats[reason] == 1, reason
    assert stats["bad_signature"] == 2
    assert stats["replay_cache_size"] == 3


def test_broadcast_recipient_only_for_broadcast_kinds() -> None:
    v = bob_verifier()
    rec = seal(ALICE, network=NET, body=record_for(ALICE), now=NOW)
    assert v.verify(rec, expected_kind=PeerRecord).recipient == ""
    with pytest.raises(NotForMe):  # a manifest to nobody in particular
        v.verify(forge(good_fields(recipient="")))
    with pytest.raises(Malformed, match="expected"):
        v.verify(seal(ALICE, network=NET, body=record_for(ALICE), now=NOW),
                 expected_kind=Manifest)


def test_allowlist_excludes_others() -> None:
    v = bob_verifier(allowlist=frozenset({CAROL.peer_id}))
    with pytest.raises(NotAllowed):
        v.verify(seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW))
    assert v.verify(seal(CAROL, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW))
    assert v.statistics()["not_allowed"] == 1


def test_nonce_recorded_only_after_good_signature() -> None:
    v = bob_verifier()
    good = seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW,
                nonce=b"\x05" * 16)
    forged = bytearray(good)
    forged[-1] ^= 1  # same sender and nonce, broken signature
    with pytest.raises(BadSignature):
        v.verify(bytes(forged))
    assert v.verify(good).nonce == b"\x05" * 16  # the forgery did not burn the nonce


def test_replay_floor_with_tiny_cache() -> None:
    clock = [NOW]
    v = bob_verifier(replay_capacity=2, clock=lambda: clock[0])
    msgs = [seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW - 10 + i)
            for i in range(4)]
    for data in msgs[1:]:  # t-9, t-8, t-7: the third evicts t-9
        v.verify(data)
    assert v.replay_floor == NOW - 9
    with pytest.raises(TooOld, match="floor"):
        v.verify(msgs[1])  # evicted, but still inside the window: the floor catches it
    for data in msgs[2:]:
        with pytest.raises(Replay):
            v.verify(data)
    # A new message older than everything cached is taken once, then evicted at once.
    with pytest.raises(TooOld):  # t-10 is below the floor: refused outright
        v.verify(msgs[0])
    newer = seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW - 8.5)
    v.verify(newer)  # t-8.5 < t-8 and t-7: it is the one evicted, the floor rises to it
    assert v.replay_floor == NOW - 8.5
    with pytest.raises(TooOld):
        v.verify(newer)
    assert v.statistics()["replay_evictions"] == 2
    # Expired entries are dropped and raise the floor too, so a clock stepping back
    # cannot bring them back.
    clock[0] = NOW + 400
    v.verify(seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW + 399))
    assert v.statistics()["replay_cache_size"] == 1
    clock[0] = NOW
    with pytest.raises(TooOld):
        v.verify(msgs[3])


@settings(FAST, max_examples=150)
@given(capacity=st.integers(1, 3),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 1000), st.integers(-310, 8),
                              st.integers(-20, 60)), max_size=25))
def test_replay_never_slips_through(capacity: int, ops: list[tuple[bool, int, int, int]]) -> None:
    clock = [NOW]
    v = bob_verifier(replay_capacity=capacity, clock=lambda: clock[0])
    accepted: list[bytes] = []
    for replay, pick, offset, step in ops:
        clock[0] += step
        if replay and accepted:
            with pytest.raises((Replay, TooOld, InFuture)):  # never accepted
                v.verify(accepted[pick % len(accepted)])
            continue
        data = seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id,
                    now=clock[0] + offset)
        try:
            v.verify(data)
        except (TooOld, InFuture):
            continue
        accepted.append(data)
    assert v.statistics()["replay_cache_size"] <= capacity


def test_verify_peer_record() -> None:
    rec = seal(ALICE, network=NET, body=record_for(ALICE, 3), now=NOW)
    env = verify_peer_record(rec, network=NET, now=NOW + 3600)
    assert env.body == record_for(ALICE, 3)
    assert verify_peer_record(rec, network=NET, now=NOW)  # relayed: seen again is fine
    with pytest.raises(Expired):
        verify_peer_record(rec, network=NET, now=NOW + 3600.5)
    with pytest.raises(InFuture):
        verify_peer_record(rec, network=NET, now=NOW - 5.5)
    with pytest.raises(WrongNetwork):
        verify_peer_record(rec, network="other", now=NOW)
    with pytest.raises(NotAllowed):
        verify_peer_record(rec, network=NET, now=NOW, allowlist=frozenset({BOB.peer_id}))
    with pytest.raises(Oversized):
        verify_peer_record(rec, network=NET, now=NOW, max_size=len(rec) - 1)
    with pytest.raises(Malformed):  # not a record
        verify_peer_record(forge(good_fields()), network=NET, now=NOW)
    # A relayer cannot rewrite someone's record: the address must end in the signer's id.
    lying = forge([1, NET, ALICE.peer_id, "", "peer_record", b"\x03" * 16, NOW,
                   record_for(BOB).to_wire()])
    with pytest.raises(Malformed, match="p2p"):
        verify_peer_record(lying, network=NET, now=NOW)
    with pytest.raises(BadSignature):
        verify_peer_record(rec.replace(b"10.0.0.1", b"10.0.0.9"), network=NET, now=NOW)


def test_oversized_is_refused_before_decoding() -> None:
    # Not msgpack at all, but too big: the size check comes first.
    with pytest.raises(Oversized):
        decode(b"\xc1" * 101, max_size=100)
    with pytest.raises(Oversized):
        bob_verifier(max_size=100).verify(b"\xc1" * 101)
    big = seal(ALICE, network=NET, body=PeerList(records=(b"x" * 5000,)),
               recipient=BOB.peer_id, now=NOW)
    with pytest.raises(Oversized):
        bob_verifier(max_size=len(big) - 1).verify(big)
    assert bob_verifier(max_size=len(big)).verify(big)


MALFORMED_CASES: dict[str, bytes] = {
    "empty": b"",
    "reserved byte": b"\xc1",
    "truncated": forge(good_fields())[:-1],
    "trailing": forge(good_fields()) + b"\x00",
    "deep nesting": b"\x91" * 100_000 + b"\xc0",
    "huge array header": b"\xdd\xff\xff\xff\xff",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "huge str header": b"\xdb\xff\xff\xff\xff",
    "ext type": msgpack.packb(msgpack.ExtType(5, b"abc")),
    "timestamp ext": msgpack.packb(msgpack.Timestamp(1, 2)),
    "int map key": msgpack.packb({1: 2}),
    "list map key": b"\x81\x91\x01\x02",
    "bad utf-8": b"\xa2\xff\xfe",
    "not an array": msgpack.packb({"version": 1}),
    "8 items": msgpack.packb(good_fields()),
    "10 items": msgpack.packb(good_fields() + [b"s" * 64, 0]),
    "array16 header": b"\xdc\x00\x09" + forge(good_fields())[1:],
    "bool version": forge(good_fields(version=True)),
    "version 2": forge(good_fields(version=2)),
    "huge version": forge(good_fields(version=2**64 - 1)),
    "bytes network": forge(good_fields(network=b"x")),
    "bad sender": forge(good_fields(sender="12D3KooWnot-a-peer-id")),
    "rsa-style sender": forge(good_fields(sender="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")),
    "long sender": forge(good_fields(sender="1" * 10_000)),
    "int recipient": forge(good_fields(recipient=5)),
    "unknown kind": forge(good_fields(kind="teleport")),
    "short nonce": forge(good_fields(nonce=b"\x01" * 15)),
    "str nonce": forge(good_fields(nonce="x" * 16)),
    "nan timestamp": forge(good_fields(timestamp=math.nan)),
    "inf timestamp": forge(good_fields(timestamp=math.inf)),
    "str timestamp": forge(good_fields(timestamp="now")),
    "list body": forge(good_fields(body=[1, 2])),
    "missing field": forge(good_fields(body={"length": 1})),
    "bool length": forge(good_fields(body={**MANIFEST.to_wire(), "length": True})),
    "negative length": forge(good_fields(body={**MANIFEST.to_wire(), "length": -1})),
    "short digest": forge(good_fields(kind="payload_digest",
                                      body={**PAYLOAD_DIGEST.to_wire(), "digest": b"x"})),
    "short manifest_nonce": forge(good_fields(
        kind="payload_digest", body={**PAYLOAD_DIGEST.to_wire(), "manifest_nonce": b"x"})),
    "negative digest length": forge(good_fields(
        kind="payload_digest", body={**PAYLOAD_DIGEST.to_wire(), "length": -1})),
    "manifest as payload_digest": forge(good_fields(kind="payload_digest")),
    "payload_digest as manifest": forge(good_fields(body=PAYLOAD_DIGEST.to_wire())),
    "nan weight": forge(good_fields(body={**MANIFEST.to_wire(), "sample_weight": math.nan})),
    "bad purpose": forge(good_fields(body={**MANIFEST.to_wire(), "purpose": "steal"})),
    "addrs not list": forge(good_fields(kind="peer_list", body={"records": "x"})),
    "record not bytes": forge(good_fields(kind="peer_list", body={"records": ["x"]})),
    "short signature": forge(good_fields())[:-66] + b"\xc4\x3f" + b"s" * 63,
}


@pytest.mark.parametrize("name", sorted(MALFORMED_CASES))
def test_malformed_inputs(name: str) -> None:
    data = MALFORMED_CASES[name]
    with pytest.raises(Malformed):
        decode(data, max_size=1 << 20)
    v = bob_verifier()
    with pytest.raises(Malformed):
        v.verify(data)
    assert v.statistics()["malformed"] == 1
    with pytest.raises(Malformed):
        verify_peer_record(data, network=NET, now=NOW, max_size=1 << 20)


# ---------------------------------------------------------------- tampering

SIGNED = {
    "peer_record": seal(ALICE, network=NET, body=record_for(ALICE, 2), now=NOW,
                        nonce=b"\x11" * 16),
    "peer_list": seal(ALICE, network=NET, body=PeerList(records=(b"r1", b"r2" * 50)),
                      recipient=BOB.peer_id, now=NOW, nonce=b"\x12" * 16),
    "manifest": seal(ALICE, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW,
                     nonce=b"\x13" * 16),
    "payload_digest": seal(ALICE, network=NET, body=PAYLOAD_DIGEST, recipient=BOB.peer_id,
                           now=NOW, nonce=b"\x14" * 16),
    "model_request": seal(ALICE, network=NET, body=ModelRequest(fingerprint="ef" * 32),
                          recipient=BOB.peer_id, now=NOW, nonce=b"\x15" * 16),
}


def test_untampered_envelopes_verify() -> None:
    assert set(SIGNED) == set(KINDS)  # every body kind is tampered with below
    for kind, data in SIGNED.items():
        env = bob_verifier().verify(data, expected_kind=KINDS[kind])
        assert env.sender == ALICE.peer_id and env.kind == kind


@settings(FAST, max_examples=1500)
@given(kind=st.sampled_from(sorted(SIGNED)), where=st.integers(0, 10_000),
       value=st.integers(0, 255))
def test_any_single_byte_change_is_rejected(kind: str, where: int, value: int) -> None:
    data = bytearray(SIGNED[kind])
    pos = where % len(data)
    assume(data[pos] != value)
    data[pos] = value
    with pytest.raises(Rejected):
        bob_verifier().verify(bytes(data))
    if kind == "peer_record":
        with pytest.raises(Rejected):
            verify_peer_record(bytes(data), network=NET, now=NOW)


# ---------------------------------------------------------------- payload digest trailers

def test_sealed_payload_digest_travels_in_a_trailer() -> None:
    data = SIGNED["payload_digest"]
    trailer = pack_trailer(data)
    assert len(trailer) == TRAILER_SIZE
    assert unpack_trailer(trailer) == data
    env = bob_verifier().verify(unpack_trailer(trailer), expected_kind=PayloadDigest)
    assert env.body == PAYLOAD_DIGEST and env.kind == "payload_digest"
    with pytest.raises(Malformed, match="expected"):  # a manifest is not a payload digest
        bob_verifier().verify(SIGNED["manifest"], expected_kind=PayloadDigest)


@pytest.mark.parametrize("network", [
    "x" * MAX_NETWORK_CHARS,  # the longest network name an envelope accepts (ASCII)
    "\u00e9" * MAX_NETWORK_CHARS,  # two UTF-8 bytes each
    "n" * 64,  # the longest the config allows
])
def test_largest_payload_digest_fits_a_trailer(network: str) -> None:
    """Worst case: longest network, real PeerIDs, widest length, timestamp and nonce."""
    for _ in range(5):
        sender, recipient = Signer.generate(), Signer.generate()
        body = PayloadDigest(manifest_nonce=b"\xff" * 16, length=(1 << 63) - 1,
                             digest=b"\xff" * 32)
        data = seal(sender, network=network, body=body, recipient=recipient.peer_id,
                    now=4e9, nonce=b"\xff" * 16)
        trailer = pack_trailer(data)  # does not raise
        assert len(trailer) == TRAILER_SIZE and unpack_trailer(trailer) == data
        v = Verifier(network=network, own_peer_id=recipient.peer_id, clock=lambda: 4e9)
        assert v.verify(unpack_trailer(trailer), expected_kind=PayloadDigest).body == body


# MAX_NETWORK_CHARS counts characters, not bytes: the trailer must hold 256 four-byte ones.
@pytest.mark.parametrize("char", ["\u4e2d", "\U0001f600"])
def test_longest_multibyte_network_fits_a_trailer(char: str) -> None:
    body = PayloadDigest(manifest_nonce=b"\xff" * 16, length=(1 << 63) - 1, digest=b"\xff" * 32)
    data = seal(ALICE, network=char * MAX_NETWORK_CHARS, body=body, recipient=BOB.peer_id,
                now=4e9)
    pack_trailer(data)


# ---------------------------------------------------------------- fuzzing: only core errors

def assert_only_core_errors(data: bytes) -> None:
    """Every entry point refuses garbage with a core error (an accepted one would be a forgery)."""
    for call in (lambda: decode(data, max_size=1 << 16),
                 lambda: bob_verifier().verify(data),
                 lambda: verify_peer_record(data, network=NET, now=NOW)):
        try:
            call()
        except ProtocolError:
            continue
        pytest.fail(f"accepted garbage {data[:40]!r}")


@settings(FAST, max_examples=6000)
@given(data=st.binary(max_size=400))
def test_random_bytes_raise_only_core_errors(data: bytes) -> None:
    assert_only_core_errors(data)


leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
          | st.text(max_size=20) | st.binary(max_size=40)
          | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))
          | st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 999_999_999)))
map_keys = st.text(max_size=12) | st.integers(-5, 5) | st.binary(max_size=4) | st.none()
msgpack_values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(map_keys, inner, max_size=4), max_leaves=10)
# Cheaper to draw, for values put into otherwise valid envelopes.
field_values = leaves | st.lists(leaves, max_size=3) | st.dictionaries(map_keys, leaves, max_size=2)


@settings(FAST, max_examples=2500)
@given(value=msgpack_values)
def test_random_msgpack_structures_raise_only_core_errors(value: Any) -> None:
    assert_only_core_errors(msgpack.packb(value, use_bin_type=True))


FIELD_NAMES = ("version", "network", "sender", "recipient", "kind", "nonce", "timestamp", "body")
BODY_FIELDS = ["addrs", "records", "fingerprint", "length", "digest", "manifest_nonce",
               "sample_weight", "purpose", "in_reply_to", "exchange_url", "version", "other"]
VALID_BODIES = {"peer_record": record_for(ALICE, 2).to_wire(), "manifest": MANIFEST.to_wire(),
                "peer_list": PeerList(records=(b"r",)).to_wire(),
                "payload_digest": PAYLOAD_DIGEST.to_wire(),
                "model_request": ModelRequest(fingerprint="ef" * 32).to_wire(), "x": {}}


def test_field_lists_cover_every_body_kind() -> None:
    assert set(KINDS) < set(VALID_BODIES)  # plus "x", an unknown kind
    for kind, body_type in KINDS.items():
        assert set(body_type.from_wire(VALID_BODIES[kind]).to_wire()) <= set(BODY_FIELDS), kind


@settings(FAST, max_examples=2500)
@given(kind=st.sampled_from(sorted(VALID_BODIES)),
       replace=st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=2),
       body_changes=st.dictionaries(st.sampled_from(BODY_FIELDS), field_values, max_size=2),
       body_drops=st.sets(st.sampled_from(BODY_FIELDS), max_size=2),
       recipient=st.sampled_from([BOB.peer_id, ""]), signed=st.booleans())
def test_envelope_shaped_values_raise_only_core_errors(
        kind: str, replace: dict[str, Any], body_changes: dict[str, Any], body_drops: set[str],
        recipient: str, signed: bool) -> None:
    """Mostly valid envelopes with a few fields (or body fields) swapped for any value."""
    body = {k: v for k, v in {**VALID_BODIES[kind], **body_changes}.items()
            if k not in body_drops}
    fields = dict(zip(FIELD_NAMES, good_fields(kind=kind, body=body, recipient=recipient)))
    fields.update(replace)
    values = list(fields.values())
    if signed:
        data = forge(values)
    else:
        data = msgpack.packb(values + [b"s" * 64], use_bin_type=True)
    try:
        bob_verifier().verify(data)
    except ProtocolError as exc:
        event(f"rejected: {exc.reason}")  # see --hypothesis-show-statistics: how deep it gets
    else:  # only a validly signed envelope may pass
        event("accepted")
        assert signed
    for call in (lambda: decode(data, max_size=1 << 16),
                 lambda: verify_peer_record(data, network=NET, now=NOW)):
        try:
            call()
        except ProtocolError:
            pass


# ---------------------------------------------------------------- PeerIDs and libp2p

def test_peer_ids_agree_with_libp2p() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    for _ in range(5):
        kp = create_new_key_pair()
        pub = kp.public_key.to_bytes()
        expected = ID.from_pubkey(kp.public_key).to_base58()
        assert peer_id_from_public_key(pub) == expected
        assert public_key_from_peer_id(expected) == pub
        assert is_valid_peer_id(expected)
        assert ID.from_base58(expected).extract_public_key().to_bytes() == pub

        secret = kp.private_key.to_bytes()  # 32-byte seed in libp2p 0.8.1
        assert len(secret) in (32, 64)
        signer = Signer(secret)
        assert signer.peer_id == expected and signer.public_key == pub
        assert Signer(secret[:32] + pub).peer_id == expected  # seed + public key form
        message = b"peerfed cross-check"
        sig = signer.sign(message)
        assert kp.public_key.verify(message, sig)  # libp2p accepts our signature
        assert verify_signature(expected, message, kp.private_key.sign(message))  # and we its
        assert not verify_signature(expected, message + b"!", sig)

        env = bob_verifier().verify(
            seal(signer, network=NET, body=MANIFEST, recipient=BOB.peer_id, now=NOW))
        assert env.sender == expected


def test_peer_id_validation() -> None:
    assert ALICE.peer_id.startswith("12D3KooW") and len(ALICE.peer_id) == 52
    for bad in ("", "12D3KooW", "0OIl" * 13, ALICE.peer_id[:-1], ALICE.peer_id + "1",
                "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "1" * 100_000, 5, None):
        assert not is_valid_peer_id(bad)  # type: ignore[arg-type]
        with pytest.raises(Malformed):
            public_key_from_peer_id(bad)  # type: ignore[arg-type]
    assert not verify_signature("nonsense", b"x", b"s" * 64)
    assert not verify_signature(ALICE.peer_id, b"x", b"short")
    with pytest.raises(ValueError):
        Signer(b"short")
    with pytest.raises(ValueError):
        Signer(bytes(32) + BOB.public_key)  # public half does not belong to the seed
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"x" * 31)
    assert "seed" not in repr(ALICE) and ALICE.peer_id in repr(ALICE)
