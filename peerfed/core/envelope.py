"""Signed envelopes: every message between peers, as bytes in and typed values out.

Wire format (msgpack): an array of 9 items

    [version, network, sender, recipient, kind, nonce, timestamp, body, signature]

The signature is Ed25519 by ``sender`` over DOMAIN + the msgpack encoding of the
first 8 items as an array of 8 (``seal`` writes it canonically: maps with sorted
keys, floats as float64, smallest int/str/bin headers). A receiver checks the
signature over those exact bytes, sliced from the wire (the 8 items sit between a
one-byte array header and the 66-byte signature), so fields a newer peer adds to a
body stay covered by the signature even where this version ignores them.

No I/O here: ``decode`` parses, ``Verifier.verify`` decides, the caller acts.
"""

from __future__ import annotations

import heapq
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import msgpack

from peerfed.core.errors import (
    VERIFIER_REASONS,
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
from peerfed.core.manifest import Manifest, PayloadDigest
from peerfed.core.peerid import (
    SIGNATURE_SIZE,
    Signer,
    public_key_from_peer_id,
    verify_signature,
)
from peerfed.core.records import ModelRequest, PeerList, PeerRecord

PROTOCOL_VERSION = 1
DOMAIN = b"peerfed/envelope/v1\0"
NONCE_SIZE = 16
MAX_NETWORK_CHARS = 256
# Wire framing of the array: fixarray(9) header; signature as bin8 of 64 bytes at the end.
_WIRE_HEADER = 0x99
_SIGNED_HEADER = b"\x98"
_SIG_HEADER = b"\xc4\x40"
_SIG_TAIL = len(_SIG_HEADER) + SIGNATURE_SIZE


Body: TypeAlias = PeerRecord | PeerList | Manifest | PayloadDigest | ModelRequest
KINDS: dict[str, type[Body]] = {k.KIND: k for k in (PeerRecord, PeerList, Manifest, PayloadDigest, ModelRequest)}
# Kinds that may go to everyone (recipient ""); all others name their recipient.
BROADCAST_KINDS: frozenset[str] = frozenset({PeerRecord.KIND})


@dataclass(frozen=True)
class Envelope:
    version: int
    network: str
    sender: str
    recipient: str
    kind: str
    nonce: bytes
    timestamp: float
    body: Body
    signature: bytes
    # The exact bytes the signature covers (without DOMAIN), as received; b"" means
    # "re-encode the fields canonically" (an Envelope built by hand).
    signed_bytes: bytes = field(default=b"", repr=False, compare=False)


def _signed_fields(version: int, network: str, sender: str, recipient: str, kind: str,
                   nonce: bytes, timestamp: float, body: Body) -> bytes:
    body_wire = dict(sorted(body.to_wire().items()))
    return msgpack.packb([version, network, sender, recipient, kind, bytes(nonce),
                          float(timestamp), body_wire], use_bin_type=True)


def signed_bytes_of(env: Envelope) -> bytes:
    """The bytes ``env.signature`` must cover (DOMAIN not included)."""
    if env.signed_bytes:
        return env.signed_bytes
    return _signed_fields(env.version, env.network, env.sender, env.recipient, env.kind,
                          env.nonce, env.timestamp, env.body)


def _check_body_for_sender(body: Body, sender: str) -> None:
    # A record speaks only for its signer: addresses must point at the sender itself.
    if isinstance(body, PeerRecord):
        suffix = "/p2p/" + sender
        for addr in body.addrs:
            if not addr.endswith(suffix):
                raise Malformed(f"peer record address {addr[:80]!r} does not end with {suffix}")


def seal(signer: Signer, *, network: str, body: Body, recipient: str = "",
         now: float, nonce: bytes | None = None) -> bytes:
    """Encode and sign an envelope from ``signer``; ValueError for a body we would refuse."""
    kind = getattr(type(body), "KIND", None)
    if KINDS.get(kind) is not type(body):  # type: ignore[arg-type]
        raise ValueError(f"{type(body).__name__} is not a registered body kind")
    nonce = secrets.token_bytes(NONCE_SIZE) if nonce is None else bytes(nonce)
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes")
    if not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError("now must be a finite unix time")
    if not isinstance(network, str) or not 0 < len(network) <= MAX_NETWORK_CHARS:
        raise ValueError(f"network must be 1..{MAX_NETWORK_CHARS} characters")
    if recipient == "" and kind not in BROADCAST_KINDS:
        raise ValueError(f"a {kind} envelope needs a recipient")
    try:
        if recipient:
            public_key_from_peer_id(recipient)
        # Round-trip the body so a sender finds out now, not from a peer's rejection.
        type(body).from_wire(body.to_wire())
        _check_body_for_sender(body, signer.peer_id)
    except Malformed as exc:
        raise ValueError(f"cannot seal: {exc}") from None
    signed = _signed_fields(PROTOCOL_VERSION, network, signer.peer_id, recipient, kind,
                            nonce, now, body)
    signature = signer.sign(DOMAIN + signed)
    return bytes([_WIRE_HEADER]) + signed[1:] + _SIG_HEADER + signature


def _refuse_ext(code: int, data: bytes) -> Any:
    raise Malformed("msgpack ext types are not allowed")


def _unpack(data: bytes, max_size: int) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=True, ext_hook=_refuse_ext,
            max_bin_len=max_size, max_str_len=max_size, max_array_len=max_size,
            max_map_len=max_size // 2, max_ext_len=0)
    except Exception as exc:  # msgpack raises many types (ValueError, TypeError, StackError...)
        raise Malformed(f"not a msgpack value ({type(exc).__name__})") from None


def _text(value: Any, name: str, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise Malformed(f"envelope {name} must be a string of at most {max_chars} characters")
    return value


def decode(data: bytes, *, max_size: int) -> Envelope:
    """Parse an envelope's structure (signature not checked). Raises only core.errors types:
    Oversized before anything is decoded, Malformed for anything that is not an envelope."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Malformed(f"envelope must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    if len(raw) > max_size:
        raise Oversized(f"envelope of {len(raw)} bytes exceeds the limit of {max_size}")
    items = _unpack(raw, max_size)
    if not isinstance(items, list) or len(items) != 9:
        raise Malformed("envelope must be an array of 9 items")
    version, network, sender, recipient, kind, nonce, timestamp, body_wire, signature = items
    if raw[0] != _WIRE_HEADER or raw[-_SIG_TAIL:-SIGNATURE_SIZE] != _SIG_HEADER:
        raise Malformed("envelope array is not in canonical form")
    if type(version) is not int:
        raise Malformed("envelope version must be an integer")
    if version != PROTOCOL_VERSION:
        raise Malformed(f"unsupported envelope version {version}")
    network = _text(network, "network", MAX_NETWORK_CHARS)
    sender = _text(sender, "sender", 64)
    public_key_from_peer_id(sender)  # Malformed unless an Ed25519 PeerID
    recipient = _text(recipient, "recipient", 64)
    if recipient:
        public_key_from_peer_id(recipient)
    kind = _text(kind, "kind", 64)
    body_type = KINDS.get(kind)
    if body_type is None:
        raise Malformed(f"unknown envelope kind {kind[:64]!r}")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise Malformed(f"envelope nonce must be {NONCE_SIZE} bytes")
    if type(timestamp) not in (int, float) or not math.isfinite(timestamp):
        raise Malformed("envelope timestamp must be a finite number")
    if not isinstance(body_wire, dict):
        raise Malformed("envelope body must be a map")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise Malformed(f"envelope signature must be {SIGNATURE_SIZE} bytes")
    try:
        body = body_type.from_wire(body_wire)
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: from_wire must only raise Malformed
        raise Malformed(f"bad {kind} body ({type(exc).__name__})") from None
    _check_body_for_sender(body, sender)
    return Envelope(version=version, network=network, sender=sender, recipient=recipient,
                    kind=kind, nonce=nonce, timestamp=float(timestamp), body=body,
                    signature=signature,
                    signed_bytes=_SIGNED_HEADER + raw[1:-_SIG_TAIL])


def check_signature(env: Envelope) -> None:
    """BadSignature unless ``env.sender`` signed ``env`` (the PeerID carries the key)."""
    if not verify_signature(env.sender, DOMAIN + signed_bytes_of(env), env.signature):
        raise BadSignature(f"signature does not match sender {env.sender}")


class ReplayCache:
    """The (sender, nonce) pairs seen inside the time window, with a floor below which
    anything is too old.

    At most ``capacity`` pairs. Entries older than the window are dropped (they would fail
    as too old anyway). When the cache is full of entries still inside the window, the
    oldest is evicted and the floor is raised to its timestamp: anything at or below the
    floor is rejected as too old, so an evicted envelope can never be replayed. The floor
    also guards against the clock stepping back after old entries were dropped.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("replay_capacity must be at least 1")
        self.capacity = capacity
        self.floor = -math.inf
        self.evictions = 0
        self._seen: dict[bytes, float] = {}
        self._by_time: list[tuple[float, bytes]] = []  # min-heap over _seen

    def __contains__(self, key: bytes) -> bool:
        return key in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, key: bytes, timestamp: float, horizon: float) -> None:
        """Add ``key``; drop entries older than ``horizon`` (now - window), then evict down
        to capacity."""
        heap = self._by_time
        while heap and heap[0][0] < horizon:  # out of the window: the time check covers them
            self._drop_oldest()
        self._seen[key] = timestamp
        heapq.heappush(heap, (timestamp, key))
        while len(heap) > self.capacity:  # full of live entries: evict, raise the floor
            self._drop_oldest()
            self.evictions += 1

    def _drop_oldest(self) -> None:
        ts, old = heapq.heappop(self._by_time)
        del self._seen[old]
        self.floor = max(self.floor, ts)


class Verifier:
    """Decides whether an incoming envelope is accepted; counts every decision.

    Checks run cheapest first (size, structure, kind, network, recipient, allowlist,
    time window), then the signature, then replay; a nonce is remembered (ReplayCache) only
    after its signature checked out, so forged traffic cannot fill the replay cache.
    """

    def __init__(self, *, network: str, own_peer_id: str, clock: Callable[[], float],
                 max_past: float = 300.0, max_future: float = 5.0,
                 replay_capacity: int = 100_000, max_size: int = 1 << 20,
                 allowlist: frozenset[str] | None = None) -> None:
        self._replay = ReplayCache(replay_capacity)
        self.network = network
        self.own_peer_id = own_peer_id
        self.max_past = max_past
        self.max_future = max_future
        self.max_size = max_size
        # None or empty: anyone on the network (the config's "empty = anyone").
        self.allowlist = frozenset(allowlist) if allowlist else None
        self._clock = clock
        self._counts: dict[str, int] = {"accepted": 0, **{r: 0 for r in VERIFIER_REASONS}}

    @property
    def replay_floor(self) -> float:
        return self._replay.floor

    def verify(self, data: bytes, *, expected_kind: type[Body] | None = None) -> Envelope:
        """The accepted Envelope, or a Rejected subclass saying why not."""
        try:
            env = self._check(data, expected_kind)
        except Rejected as exc:
            self._counts[exc.reason] = self._counts.get(exc.reason, 0) + 1
            raise
        self._counts["accepted"] += 1
        return env

    def _check(self, data: bytes, expected_kind: type[Body] | None) -> Envelope:
        env = decode(data, max_size=self.max_size)
        if expected_kind is not None and env.kind != expected_kind.KIND:
            raise Malformed(f"expected a {expected_kind.KIND} envelope, got {env.kind}")
        if env.network != self.network:
            raise WrongNetwork(f"envelope is for network {env.network[:64]!r}")
        if env.recipient != self.own_peer_id and not (
                env.recipient == "" and env.kind in BROADCAST_KINDS):
            raise NotForMe(f"envelope is addressed to {env.recipient or 'everyone'!r}")
        if self.allowlist is not None and env.sender not in self.allowlist:
            raise NotAllowed(f"sender {env.sender} is not in the allowlist")
        now = self._clock()
        if env.timestamp < now - self.max_past:
            raise TooOld(f"envelope is {now - env.timestamp:.1f} s old (limit {self.max_past} s)")
        if env.timestamp <= self._replay.floor:
            raise TooOld("envelope is at or below the replay cache's floor")
        if env.timestamp > now + self.max_future:
            raise InFuture(f"envelope is {env.timestamp - now:.1f} s in the future")
        check_signature(env)
        key = env.nonce + env.sender.encode()
        if key in self._replay:
            raise Replay(f"nonce {env.nonce.hex()} from {env.sender} was seen before")
        self._replay.remember(key, env.timestamp, horizon=now - self.max_past)
        return env

    def set_allowlist(self, allowlist: frozenset[str] | None) -> None:
        """Config reload: a new allowlist, same replay cache (a reload must not reopen replays)."""
        self.allowlist = frozenset(allowlist) if allowlist else None

    def statistics(self) -> dict[str, int]:
        return {**self._counts, "replay_cache_size": len(self._replay),
                "replay_evictions": self._replay.evictions}


def verify_peer_record(data: bytes, *, network: str, now: float, max_age: float = 3600.0,
                       allowlist: frozenset[str] | None = None, max_size: int = 16384,
                       max_future: float = 5.0) -> Envelope:
    """Check a relayed peer_record envelope (no recipient or replay check: records are
    passed on by others and seen many times). Older than ``max_age`` -> Expired."""
    env = decode(data, max_size=max_size)
    if env.kind != PeerRecord.KIND:
        raise Malformed(f"expected a {PeerRecord.KIND} envelope, got {env.kind}")
    if env.network != network:
        raise WrongNetwork(f"record is for network {env.network[:64]!r}")
    if allowlist and env.sender not in allowlist:
        raise NotAllowed(f"sender {env.sender} is not in the allowlist")
    if env.timestamp > now + max_future:
        raise InFuture(f"record is {env.timestamp - now:.1f} s in the future")
    if now - env.timestamp > max_age:
        raise Expired(f"record is {now - env.timestamp:.0f} s old (limit {max_age:.0f} s)")
    check_signature(env)
    return env


__all__ = [
    "PROTOCOL_VERSION",
    "DOMAIN",
    "NONCE_SIZE",
    "PeerRecord",
    "PeerList",
    "ModelRequest",
    "Manifest",
    "PayloadDigest",
    "Body",
    "KINDS",
    "BROADCAST_KINDS",
    "Envelope",
    "seal",
    "decode",
    "check_signature",
    "signed_bytes_of",
    "ReplayCache",
    "Verifier",
    "verify_peer_record",
]
