"""TLS 1.3 on the exchange port, with a self-signed certificate bound to the node's PeerID.

How the binding works: the certificate is self-signed (no CA), and the node puts its SHA-256
fingerprint into its signed peer record (core/records.py, ``tls_fingerprint``). Only the holder
of the PeerID's key can sign that record, so a client that pins the fingerprint from the
record (aiohttp's ``Fingerprint``) knows it talks to that PeerID's exchange and to no one in
between; nothing else about the certificate is trusted. The certificate names the PeerID
(CN) for operators, and is kept in the state folder so the fingerprint stays the same across
restarts (it is made again if missing, unreadable or for another PeerID).

Why TLS on the HTTP port and not the exchange over the Noise-secured libp2p connection: see
docs/architecture.md (measured: py-libp2p's yamux streams moved ~190 MB/s here, TLS over
uvloop several times that; bench_exchange --tls both prints the cost on this machine).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_FILE = "exchange-tls.crt"
KEY_FILE = "exchange-tls.key"
VALID_DAYS = 3650  # nobody checks it (the pin does), but a TLS stack may refuse an expired one


@dataclass(frozen=True)
class ServerTLS:
    """The exchange server's TLS context and the fingerprint its peer record announces."""

    context: ssl.SSLContext
    fingerprint: str  # hex SHA-256 of the certificate (DER)


def fingerprint_of(cert_der: bytes) -> str:
    return hashlib.sha256(cert_der).hexdigest()


def load_or_make_server_tls(folder: Path, peer_id: str) -> ServerTLS:
    """The server context for ``peer_id``'s exchange, from ``folder`` (made there if needed)."""
    cert_path, key_path = folder / CERT_FILE, folder / KEY_FILE
    der = _existing_cert(cert_path, key_path, peer_id)
    if der is None:
        der = _make_cert(cert_path, key_path, peer_id)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = 0  # clients do not resume sessions (aiohttp cannot): no tickets to send
    context.load_cert_chain(cert_path, key_path)
    return ServerTLS(context, fingerprint_of(der))


def _existing_cert(cert_path: Path, key_path: Path, peer_id: str) -> bytes | None:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != peer_id:
        return None  # a new identity key: a new certificate
    return cert.public_bytes(serialization.Encoding.DER)


def _make_cert(cert_path: Path, key_path: Path, peer_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, peer_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    tmp = key_path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.replace(tmp, key_path)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.public_bytes(serialization.Encoding.DER)
