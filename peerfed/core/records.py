"""The bodies of the small signed messages: peer records, peer lists, model requests.

Each kind turns into a msgpack-ready dict (``to_wire``) and back (``from_wire``, which raises
Malformed on anything it would not have written). Signing and checking them is envelope.py's
job; the manifests of bulk payloads live in manifest.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from peerfed.core.errors import Malformed
from peerfed.core.manifest import read_field, read_text

MAX_ADDRS = 64
MAX_ADDR_CHARS = 1024
MAX_URL_CHARS = 2048
MAX_RECORDS = 1024
REACHABILITY = frozenset({"", "public", "private"})


@dataclass(frozen=True)
class PeerRecord:
    """A node's own description of itself, signed by it and relayed by others."""

    KIND: ClassVar[str] = "peer_record"

    addrs: tuple[str, ...]  # libp2p multiaddrs, each ending /p2p/<sender>
    exchange_url: str = ""
    fingerprint: str = ""
    version: str = ""
    # Reachability (core/reachability.py): dialable addresses come first in ``addrs``; the
    # last ``private_addrs`` of them are LAN-only. Written only when set, so a record without
    # them reads (and signs) as before.
    reachability: str = ""   # "public" | "private" | "" (unknown)
    private_addrs: int = 0
    # hex SHA-256 of its exchange's TLS certificate, pinned by clients (net/tls.py); "" from
    # a node without TLS or older than it (the field is then left out of the wire form).
    tls_fingerprint: str = ""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"addrs": list(self.addrs), "exchange_url": self.exchange_url,
                                "fingerprint": self.fingerprint, "version": self.version}
        if self.reachability:
            wire["reachability"] = self.reachability
        if self.private_addrs:
            wire["private_addrs"] = self.private_addrs
        if self.tls_fingerprint:
            wire["tls_fingerprint"] = self.tls_fingerprint
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PeerRecord:
        addrs = read_field(wire, "addrs", list)
        if len(addrs) > MAX_ADDRS:
            raise Malformed(f"peer record has more than {MAX_ADDRS} addresses")
        for addr in addrs:
            if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > MAX_ADDR_CHARS:
                raise Malformed("peer record address must be a multiaddr string")
        reachability = read_text(wire, "reachability", "")
        if reachability not in REACHABILITY:
            raise Malformed(f"peer record reachability must be one of {sorted(REACHABILITY)}")
        private_addrs = read_field(wire, "private_addrs", int, 0)
        if not 0 <= private_addrs <= len(addrs):
            raise Malformed("peer record private_addrs must count some of its addresses")
        return cls(addrs=tuple(addrs),
                   exchange_url=read_text(wire, "exchange_url", "", MAX_URL_CHARS),
                   fingerprint=read_text(wire, "fingerprint", ""),
                   version=read_text(wire, "version", ""),
                   reachability=reachability, private_addrs=private_addrs,
                   tls_fingerprint=read_text(wire, "tls_fingerprint", "", 64))


@dataclass(frozen=True)
class PeerList:
    """Peer exchange: signed peer_record envelopes, each to be checked on its own."""

    KIND: ClassVar[str] = "peer_list"

    records: tuple[bytes, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"records": [bytes(r) for r in self.records]}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> PeerList:
        records = read_field(wire, "records", list)
        if len(records) > MAX_RECORDS:
            raise Malformed(f"peer list has more than {MAX_RECORDS} records")
        if not all(isinstance(r, bytes) for r in records):
            raise Malformed("peer list records must be bytes")
        return cls(records=tuple(records))


@dataclass(frozen=True)
class ModelRequest:
    """State sync: a newcomer asks a peer for its current weights of this model."""

    KIND: ClassVar[str] = "model_request"

    fingerprint: str

    def to_wire(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> ModelRequest:
        return cls(fingerprint=read_text(wire, "fingerprint"))
