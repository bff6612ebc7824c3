"""Envelope seal/verify rates with a ~1 KiB body, and StreamDigest vs raw BLAKE3.

Run: python benchmarks/bench_signing.py [--reps 5] [--count 2000] [--mib 100]

Each figure is measured ``--reps`` times, interleaved with the others, and the
median and best are printed. The digest comparison hashes the same 100 MiB buffer
fed in 1 MiB memoryview slices (StreamDigest, BLAKE3) and whole (blake3.blake3(buffer));
hashlib.sha256 of the same buffer is printed for reference (what digests cost before).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable

import blake3
import msgpack
import nacl

from peerfed.core.envelope import PeerList, Verifier, decode, seal
from peerfed.core.manifest import StreamDigest
from peerfed.core.peerid import Signer

NETWORK = "bench"
NOW = 1_700_000_000.0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="envelopes per repetition")
    parser.add_argument("--mib", type=int, default=100, help="digest buffer size in MiB")
    args = parser.parse_args()

    sender, receiver = Signer.generate(), Signer.generate()
    body = PeerList(records=(os.urandom(1024),))  # one ~1 KiB record
    sample = seal(sender, network=NETWORK, body=body, recipient=receiver.peer_id, now=NOW)
    print(f"python {platform.python_version()}, msgpack {msgpack.version}, "
          f"PyNaCl {nacl.__version__}, {os.cpu_count()} CPUs: {cpu_model()}")
    if hasattr(os, "getloadavg"):
        print("load average before the run: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"envelope: peer_list with one 1024-byte record, {len(sample)} bytes on the wire")

    def seal_all() -> list[bytes]:
        return [seal(sender, network=NETWORK, body=body, recipient=receiver.peer_id, now=NOW)
                for _ in range(args.count)]

    buf = bytearray(os.urandom(args.mib << 20))
    view = memoryview(buf)
    chunk = 1 << 20

    def stream_digest() -> bytes:
        digest = StreamDigest()
        for start in range(0, len(view), chunk):
            digest.update(view[start:start + chunk])
        return digest.digest()

    def raw_digest() -> bytes:
        return blake3.blake3(buf).digest()

    def sha256_digest() -> bytes:
        return hashlib.sha256(buf).digest()

    assert stream_digest() == raw_digest()
    seal_rates, verify_rates, decode_rates, stream_rates, raw_rates, sha_rates = [], [], [], [], [], []
    for _ in range(args.reps):
        envelopes: list[bytes] = []
        seal_rates.append(args.count / timed(lambda out=envelopes: out.extend(seal_all())))
        verifier = Verifier(network=NETWORK, own_peer_id=receiver.peer_id, clock=lambda: NOW)
        verify_rates.append(args.count / timed(lambda v=verifier, es=envelopes: [v.verify(e) for e in es]))
        assert verifier.statistics()["accepted"] == args.count
        decode_rates.append(args.count / timed(
            lambda es=envelopes: [decode(e, max_size=1 << 20) for e in es]))
        stream_rates.append(len(buf) / timed(stream_digest) / 1e6)
        raw_rates.append(len(buf) / timed(raw_digest) / 1e6)
        sha_rates.append(len(buf) / timed(sha256_digest) / 1e6)

    print(f"repetitions: {args.reps} (interleaved), {args.count} envelopes each; median / best")
    for name, rates, unit in (("seal", seal_rates, "envelopes/s"),
                              ("verify (Verifier.verify)", verify_rates, "envelopes/s"),
                              ("decode only (no signature)", decode_rates, "envelopes/s"),
                              (f"StreamDigest, {args.mib} MiB in 1 MiB memoryview slices",
                               stream_rates, "MB/s"),
                              (f"blake3.blake3(buffer), same {args.mib} MiB", raw_rates, "MB/s"),
                              (f"hashlib.sha256(buffer), same {args.mib} MiB (reference)", sha_rates, "MB/s")):
        med, best = summary(rates)
        print(f"  {name}: {med:,.0f} / {best:,.0f} {unit}")
    ratio_med = statistics.median(stream_rates) / statistics.median(raw_rates)
    ratio_best = max(stream_rates) / max(raw_rates)
    # Each StreamDigest run is followed at once by a raw one: their ratio is the least
    # sensitive to other load on a shared machine.
    paired = statistics.median(s / r for s, r in zip(stream_rates, raw_rates))
    print(f"StreamDigest / raw BLAKE3 ratio: of medians {ratio_med:.3f}, of bests "
          f"{ratio_best:.3f}, median of paired runs {paired:.3f} "
          f"(target >= 0.9: {'met' if ratio_best >= 0.9 else 'NOT met'} on bests)")


if __name__ == "__main__":
    main()
