"""PeerIDs and Ed25519 signatures, compatible with libp2p.

A libp2p PeerID for an Ed25519 key is the base58btc text of an *identity*
multihash of the protobuf-encoded public key, so the key can be read back out
of the PeerID: checking a signature needs nothing but the sender's PeerID.

    0x00 0x24            identity multihash, 36 bytes follow
    0x08 0x01            protobuf field 1 (KeyType) = 1 (Ed25519)
    0x12 0x20 <32 bytes> protobuf field 2 (Data), the raw public key
"""

from __future__ import annotations

import functools

import base58
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from peerfed.core.errors import Malformed

PUBLIC_KEY_SIZE = 32
SEED_SIZE = 32
SIGNATURE_SIZE = 64
_PREFIX = b"\x00\x24\x08\x01\x12\x20"
_RAW_SIZE = len(_PREFIX) + PUBLIC_KEY_SIZE  # 38 bytes -> 52 base58 characters
# base58 decoding is quadratic in the input length: refuse long text before decoding it.
MAX_PEER_ID_CHARS = 64
_ALPHABET = frozenset("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


def peer_id_from_public_key(public_key: bytes) -> str:
    """PeerID text ("12D3KooW...") of a raw 32-byte Ed25519 public key."""
    if not isinstance(public_key, (bytes, bytearray, memoryview)) or len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return base58.b58encode(_PREFIX + bytes(public_key)).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _public_key_cached(peer_id: str) -> bytes:
    # Cached because every envelope check needs it and peers are few; errors are not cached.
    if len(peer_id) > MAX_PEER_ID_CHARS or not peer_id:
        raise Malformed(f"peer id has {len(peer_id)} characters")
    if not _ALPHABET.issuperset(peer_id):
        raise Malformed("peer id is not base58")
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:  # defensive: alphabet already checked
        raise Malformed(f"peer id is not base58: {exc}") from None
    if len(raw) != _RAW_SIZE or not raw.startswith(_PREFIX):
        raise Malformed("peer id is not an Ed25519 identity multihash")
    return raw[len(_PREFIX):]


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Raw 32-byte Ed25519 public key embedded in a PeerID; Malformed if there is none."""
    if not isinstance(peer_id, str):
        raise Malformed(f"peer id must be a string, not {type(peer_id).__name__}")
    return _public_key_cached(peer_id)


def is_valid_peer_id(peer_id: str) -> bool:
    """True for a well-formed Ed25519 PeerID (the only kind peerfed accepts)."""
    try:
        public_key_from_peer_id(peer_id)
    except Malformed:
        return False
    return True


class Signer:
    """Holds an Ed25519 signing key and signs bytes with it."""

    def __init__(self, seed: bytes) -> None:
        """``seed``: the 32-byte seed (what libp2p's ``Ed25519PrivateKey.to_bytes()``
        returns), or 64 bytes of seed + public key (libsodium's secret key layout)."""
        seed = bytes(seed)
        if len(seed) == SEED_SIZE + PUBLIC_KEY_SIZE:
            seed, expected_public = seed[:SEED_SIZE], seed[SEED_SIZE:]
        elif len(seed) == SEED_SIZE:
            expected_public = None
        else:
            raise ValueError(f"an Ed25519 private key is 32 (or 64) bytes, not {len(seed)}")
        self._key = SigningKey(seed)
        self.public_key: bytes = bytes(self._key.verify_key)
        if expected_public is not None and expected_public != self.public_key:
            raise ValueError("the 64-byte private key's public half does not match its seed")
        self.peer_id: str = peer_id_from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Signer:
        """A Signer with a fresh random key (tests, benchmarks)."""
        return cls(bytes(SigningKey.generate()))

    def sign(self, data: bytes) -> bytes:
        """64-byte Ed25519 signature of ``data``."""
        return self._key.sign(bytes(data)).signature

    def __repr__(self) -> str:  # never print key material
        return f"Signer(peer_id={self.peer_id!r})"


@functools.lru_cache(maxsize=4096)
def _verify_key(peer_id: str) -> VerifyKey:
    return VerifyKey(public_key_from_peer_id(peer_id))


def verify_signature(peer_id: str, data: bytes, signature: bytes) -> bool:
    """True if ``signature`` is ``peer_id``'s Ed25519 signature of ``data``.

    False (never an exception) for a bad signature or a malformed PeerID.
    """
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        key = _verify_key(peer_id)
        key.verify(bytes(data), bytes(signature))
    except (Malformed, CryptoError, ValueError, TypeError):
        return False
    return True


__all__ = [
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "MAX_PEER_ID_CHARS",
    "peer_id_from_public_key",
    "public_key_from_peer_id",
    "is_valid_peer_id",
    "Signer",
    "verify_signature",
]
