"""Typed errors of the protocol core.

Every way an incoming message can be refused has its own class with a stable
``reason`` string, so drivers can log it and count it without parsing text.
``str(error)`` is a human-readable detail (never secret, safe to log).
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolError(Exception):
    """Base of every error raised by peerfed.core."""

    reason: ClassVar[str] = "protocol_error"


class Rejected(ProtocolError):
    """An incoming message (or payload) was refused; ``reason`` says why."""

    reason: ClassVar[str] = "rejected"


class BadSignature(Rejected):
    reason: ClassVar[str] = "bad_signature"


class WrongNetwork(Rejected):
    reason: ClassVar[str] = "wrong_network"


class NotForMe(Rejected):
    reason: ClassVar[str] = "not_for_me"


class TooOld(Rejected):
    reason: ClassVar[str] = "too_old"


class InFuture(Rejected):
    reason: ClassVar[str] = "in_future"


class Replay(Rejected):
    reason: ClassVar[str] = "replay"


class Oversized(Rejected):
    reason: ClassVar[str] = "oversized"


class Malformed(Rejected):
    reason: ClassVar[str] = "malformed"


class NotAllowed(Rejected):
    reason: ClassVar[str] = "not_allowed"


class Expired(Rejected):
    reason: ClassVar[str] = "expired"


class DigestMismatch(Rejected):
    reason: ClassVar[str] = "digest_mismatch"


class LengthMismatch(Rejected):
    reason: ClassVar[str] = "length_mismatch"


# The reasons a Verifier counts, in a stable order (for statistics()).
VERIFIER_REASONS: tuple[str, ...] = (
    Oversized.reason,
    Malformed.reason,
    WrongNetwork.reason,
    NotForMe.reason,
    NotAllowed.reason,
    TooOld.reason,
    InFuture.reason,
    BadSignature.reason,
    Replay.reason,
)

__all__ = [
    "ProtocolError",
    "Rejected",
    "BadSignature",
    "WrongNetwork",
    "NotForMe",
    "TooOld",
    "InFuture",
    "Replay",
    "Oversized",
    "Malformed",
    "NotAllowed",
    "Expired",
    "DigestMismatch",
    "LengthMismatch",
    "VERIFIER_REASONS",
]
