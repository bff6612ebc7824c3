"""Hostile inputs for a daemon's two open ports, drawn from a seeded ``random.Random``.

Exchange port (TLS 1.3 by default): HTTP garbage sent inside a TLS session (malformed
requests, bad headers, mutated signed requests from a stranger's key, random bytes), and
garbage at the TLS layer itself (mutated and truncated ClientHellos, random bytes, plaintext
HTTP, garbage records after a completed handshake). libp2p port: random bytes and mutated
multistream/Noise openings before authentication; garbage frames on our protocol, TLS and HTTP
garbage through the exchange tunnel (net/tunnel.py) and garbage yamux frames from a
Noise-authenticated peer (test_hostile_input.py sends those).

Every generator is a pure function of the ``rng`` (and of values fixed before the run: the
stranger's key, the node's PeerID, one ClientHello, whose own random fields OpenSSL picks), so
a failing input is reproduced by the seed.
"""

from __future__ import annotations

import base64
import random
import ssl
import struct
import time
from collections.abc import Callable

import msgpack

from peerfed.core.envelope import ModelRequest, seal
from peerfed.core.framing import encode_frame
from peerfed.core.manifest import Manifest
from peerfed.core.peerid import Signer
from peerfed.net.transfer import MANIFEST_HEADER, REQUEST_HEADER

MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /v1/exchange HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nX-Peerfed-Manifest: !!!!\r\nContent-Length: 10\r\n\r\n0123456789",
    b"POST /v1/exchange HTTP/1.1\r\nX-Peerfed-Manifest: AAAA\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
    b"POST /v1/exchange HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n",
    b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Peerfed-Request: AAAA\r\n\r\n",
    b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Peerfed-Request: " + b"QUFB" * 3000 + b"\r\n\r\n",
    b"GET /%%%% HTTP/1.1\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\n\x00\x01: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n folded: continuation\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
    b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n",
    b"DELETE /v1/model HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
]
HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"Upgrade",
                MANIFEST_HEADER.encode(), REQUEST_HEADER.encode(), b"Content-Type", b"X-\x7f", b"", b" ", b"\xff\xfe"]
PAYLOAD = 64  # bytes of a stranger's push (the node refuses it by its signer, or by its length)


def signed_http(rng: random.Random, stranger: Signer, network: str, node_peer_id: str) -> bytes:
    """A well-formed, validly signed push or model request from a key the node has never met."""
    if rng.random() < 0.5:
        sealed = seal(stranger, network=network, recipient=node_peer_id, body=ModelRequest(fingerprint="0" * 16),
                      now=time.time())
        return (b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + REQUEST_HEADER.encode() + b": "
                + base64.b64encode(sealed) + b"\r\n\r\n")
    payload = rng.randbytes(PAYLOAD)
    manifest = Manifest(fingerprint="0" * 16, length=PAYLOAD, sample_weight=1e9, purpose="push")
    sealed = seal(stranger, network=network, recipient=node_peer_id, body=manifest, now=time.time())
    expect = b"Expect: 100-continue\r\n" if rng.random() < 0.5 else b""
    return (b"POST /v1/exchange HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + expect
            + MANIFEST_HEADER.encode() + b": " + base64.b64encode(sealed)
            + b"\r\nContent-Length: %d\r\n\r\n" % (PAYLOAD + 128) + payload + rng.randbytes(128))


def mutate(rng: random.Random, data: bytes, max_flips: int = 6) -> bytes:
    """``data`` with a few bytes changed (never to themselves), cut short, or with bytes inserted."""
    out = bytearray(data)
    choice = rng.random()
    if choice < 0.6:
        for _ in range(rng.randint(1, max_flips)):
            out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    elif choice < 0.8:
        del out[rng.randrange(1, len(out)):]
    else:
        at = rng.randrange(len(out))
        out[at:at] = rng.randbytes(rng.randint(1, 40))
    return bytes(out)


def bad_headers(rng: random.Random) -> bytes:
    """A plausible request line with headers broken in random ways."""
    lines = [rng.choice([b"POST /v1/exchange HTTP/1.1", b"GET /v1/model HTTP/1.1", b"GET / HTTP/1.0"])]
    for _ in range(rng.randint(1, 8)):
        name = rng.choice(HEADER_NAMES)
        value = rng.choice([rng.randbytes(rng.randint(0, 60)), b"%d" % rng.randint(-10, 1 << 40),
                            b"chunked, gzip", b"100-continue", base64.b64encode(rng.randbytes(rng.randint(0, 300)))])
        lines.append(name + rng.choice([b": ", b":", b" : ", b"\x00"]) + value.replace(b"\r\n", b""))
    return b"\r\n".join(lines) + b"\r\n\r\n" + rng.randbytes(rng.randint(0, 50))


def exchange_http_input(rng: random.Random, stranger: Signer, network: str, node_peer_id: str) -> bytes:
    """One input for the HTTP layer (sent inside TLS)."""
    roll = rng.random()
    if roll < 0.25:
        return mutate(rng, rng.choice(MALFORMED_HTTP)) if rng.random() < 0.5 else rng.choice(MALFORMED_HTTP)
    if roll < 0.45:
        return bad_headers(rng)
    if roll < 0.80:
        return mutate(rng, signed_http(rng, stranger, network, node_peer_id))
    return rng.randbytes(rng.randint(1, 400)) + b"\r\n\r\n"


def client_hello() -> bytes:
    """The first flight of a real TLS 1.3 client (one TLS record holding the ClientHello)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="peer")
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def tls_garbage_input(rng: random.Random, hello: bytes) -> bytes | None:
    """One input for the TLS layer; None: garbage records after a real handshake (the sender
    does that one itself)."""
    roll = rng.random()
    if roll < 0.35:
        return mutate(rng, hello, max_flips=8)
    if roll < 0.45:  # lengths that lie: the record's, the handshake message's
        out = bytearray(hello)
        at = rng.choice([3, 6, 7, 8])
        out[at] = rng.getrandbits(8)
        return bytes(out)
    if roll < 0.55:
        return hello + rng.randbytes(rng.randint(1, 500))
    if roll < 0.65:  # another content type or protocol version on the record
        return bytes([rng.choice([20, 21, 23, 24, 0x80, 0xFF]), 3, rng.randrange(5)]) + hello[3:]
    if roll < 0.75:
        return rng.choice([b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x80\x2e\x01\x00\x02" + rng.randbytes(45)])
    if roll < 0.90:
        return rng.randbytes(rng.randint(1, 600))
    return None


def p2p_raw_input(rng: random.Random) -> bytes:
    """Bytes for the libp2p port from someone who never authenticates."""
    roll = rng.random()
    opening = b"\x13/multistream/1.0.0\n\x07/noise\n"
    if roll < 0.4:
        return rng.randbytes(rng.randint(1, 400))
    if roll < 0.6:
        return mutate(rng, opening + b"\x00\x20" + rng.randbytes(32))
    if roll < 0.75:  # a Noise handshake message of random bytes, or one announcing more than it holds
        size = rng.randint(0, 65535)
        return opening + struct.pack(">H", size) + rng.randbytes(min(size, rng.randint(0, 200)))
    if roll < 0.9:
        name = b"/" + rng.randbytes(rng.randint(0, 80)) + b"\n"
        return b"\x13/multistream/1.0.0\n" + bytes([len(name) & 0x7F]) + name
    return b"\xff\xff\xff\xff\x0f" + rng.randbytes(20)  # a varint length of 4 GiB


def frame_input(rng: random.Random) -> tuple[bytes, bool]:
    """Bytes for one stream on our protocol, and whether to close our side after them."""
    roll = rng.random()
    if roll < 0.25:
        return rng.randbytes(rng.randint(1, 400)), rng.random() < 0.5
    if roll < 0.5:
        return encode_frame(rng.randbytes(rng.randint(0, 400))), True
    if roll < 0.75:  # well-formed msgpack of the wrong shape
        return encode_frame(msgpack.packb(random_value(rng, 3), use_bin_type=True)), True
    if roll < 0.9:  # a header announcing a huge frame, then a little of it
        return struct.pack(">I", rng.randint(1 << 20, (1 << 32) - 1)) + rng.randbytes(rng.randint(0, 100)), True
    return b"".join(encode_frame(rng.randbytes(rng.randint(0, 30))) for _ in range(rng.randint(2, 20))), True


def random_value(rng: random.Random, depth: int) -> object:
    makers: list[Callable[[], object]] = [
        lambda: rng.randint(-(1 << 63), (1 << 64) - 1), lambda: rng.random() * 1e300, lambda: None,
        lambda: rng.randbytes(rng.randint(0, 40)), lambda: "x" * rng.randint(0, 40), lambda: rng.random() < 0.5]
    if depth > 0:
        makers += [lambda: [random_value(rng, depth - 1) for _ in range(rng.randint(0, 5))],
                   lambda: {f"k{i}": random_value(rng, depth - 1) for i in range(rng.randint(0, 5))}]
    return rng.choice(makers)()


YAMUX_HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length
YAMUX_DATA, YAMUX_GO_AWAY = 0, 3


def yamux_frame(rng: random.Random) -> bytes:
    """One yamux frame with random fields; its length is honest for DATA frames (a lie is
    ``yamux_truncated``), so the connection stays in sync for the next frame."""
    typ = rng.choice([0, 0, 0, 1, 1, 2, rng.randrange(4, 256)])
    version = 0 if rng.random() < 0.9 else rng.randrange(1, 256)
    flags = rng.getrandbits(4) if rng.random() < 0.9 else rng.getrandbits(16)
    stream_id = rng.choice([rng.randrange(1, 200), rng.getrandbits(32)])
    if typ == YAMUX_DATA:
        payload = rng.randbytes(rng.randint(0, 300))
        return YAMUX_HEADER.pack(version, typ, flags, stream_id, len(payload)) + payload
    return YAMUX_HEADER.pack(version, typ, flags, stream_id, rng.getrandbits(32))


def yamux_last_frame(rng: random.Random) -> bytes:
    """A frame that ends a connection: GO_AWAY, a DATA frame longer than what follows, or
    one announcing more than any window."""
    roll = rng.random()
    if roll < 0.34:
        return YAMUX_HEADER.pack(0, YAMUX_GO_AWAY, 0, 0, rng.choice([0, 1, 2, rng.getrandbits(32)]))
    if roll < 0.67:
        return YAMUX_HEADER.pack(0, YAMUX_DATA, rng.getrandbits(4), rng.randrange(1, 200), 1000) + rng.randbytes(10)
    return YAMUX_HEADER.pack(0, YAMUX_DATA, 0, rng.randrange(1, 200), rng.getrandbits(32) | (1 << 31))
