"""Encode + decode speed and error of the wire encodings (peerfed.codecs) on one core.

Run: python benchmarks/bench_codecs.py [--mib 100] [--reps 5] [--piece-kib 256]

The source is a flat float32 buffer of --mib MiB (normal values, std 0.05, like weights).
Per encoding, the way the exchange would use it: encode span by span (codecs.spans, 4 MiB of
float32 each) into one preallocated wire buffer, then decode with a WireDecoder fed in pieces
of --piece-kib KiB (as network chunks land) into a preallocated float32 destination. GB/s is
model bytes (the float32 size) / (encode + decode seconds), best of --reps; the ratio is
against a plain float32 copy_ of the same bytes measured in the same run (best of --reps).
The measurements take turns (copy, each encoding's encode and decode, then again) so that a
load that comes and goes on a shared machine falls on all of them alike.
torch.set_num_threads(1): one core. Targets (issue 10): float16/bfloat16 >= 2 GB/s, int8 >=
1 GB/s; int8 wire <= 0.3x float32 for the digits-mlp size (2410 values) and for --mib.
Errors: max |decoded - x|, relative L2 error ||decoded - x|| / ||x||, and the worst error
relative to |x| (floats, over values in the format's normal range) or to the block's max |x|
(int8).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from peerfed import codecs

DIGITS_MLP_NUMEL = 64 * 32 + 32 + 32 * 10 + 10  # 2410
SPAN_ELEMENTS = 1 << 20  # 4 MiB of float32 per span


def best_of(reps: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def encode_all(encoding: str, src: torch.Tensor, wire: torch.Tensor) -> None:
    for s in codecs.spans(encoding, src.numel(), SPAN_ELEMENTS):
        codecs.encode_into(encoding, src[s.start:s.stop], wire[s.wire_start:s.wire_stop], first_index=s.start)


def decode_all(encoding: str, wire: torch.Tensor, dest: torch.Tensor, piece: int) -> None:
    decoder = codecs.WireDecoder(encoding, dest)
    view = memoryview(wire.numpy())
    for start in range(0, view.nbytes, piece):
        decoder.feed(view[start:start + piece])
    decoder.finish()


def worst_relative(encoding: str, src: torch.Tensor, err: torch.Tensor) -> float:
    if encoding != "int8":  # over values in the format's normal range (below it: absolute steps)
        normal = src.abs() >= torch.finfo(getattr(torch, encoding)).tiny
        return float((err[normal] / src[normal].abs()).max())
    full = src.numel() // codecs.INT8_BLOCK * codecs.INT8_BLOCK
    block_max = src[:full].view(-1, codecs.INT8_BLOCK).abs().amax(dim=1, keepdim=True)
    return float((err[:full].view(-1, codecs.INT8_BLOCK) / block_max).max())


def print_header(title: str, note: str) -> None:
    try:  # benchutil needs the daemon's dependencies; this benchmark needs torch alone
        from benchutil import print_header as header
    except ImportError:
        one, five, _ = os.getloadavg()
        print(f"# {title}\n# machine: {os.cpu_count()} cores ({platform.processor()}), Python "
              f"{platform.python_version()}; load {one:.1f}/{five:.1f} at start\n# {note}")
        return
    header(title, note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--piece-kib", type=int, default=256, help="size of the pieces fed to the decoder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    numel = args.mib * 2**20 // 4
    print_header("bench_codecs: wire encodings, encode (spans) + decode (WireDecoder), one core",
                 f"{args.mib} MiB float32 ({numel} values, normal std 0.05), best of {args.reps}, "
                 f"decoder fed {args.piece_kib} KiB pieces, torch {torch.__version__}")
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(numel, generator=gen) * 0.05
    dest = torch.empty_like(src)
    wires = {e: torch.zeros(codecs.wire_length(e, numel), dtype=torch.uint8) for e in codecs.ENCODINGS}
    piece = args.piece_kib * 1024
    # Round-robin (copy, then each encoding's encode and decode) so that all see the same load.
    jobs: dict[str, Callable[[], object]] = {"copy": lambda: dest.copy_(src)}
    for e, w in wires.items():
        jobs[f"{e} enc"] = lambda e=e, w=w: encode_all(e, src, w)
        jobs[f"{e} dec"] = lambda e=e, w=w: decode_all(e, w, dest, piece)
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(args.reps):
        for name, job in jobs.items():
            best[name] = min(best[name], best_of(1, job))
    copy_s = best["copy"]
    model_gb = numel * 4 / 1e9
    print(f"\nplain float32 copy_ of the same bytes: {copy_s * 1e3:.1f} ms = {model_gb / copy_s:.2f} GB/s\n")
    print(f"{'encoding':<9} | {'wire/f32':>8} {'digits':>7} | {'enc ms':>7} {'dec ms':>7} {'GB/s':>6} "
          f"{'target':>6} {'vs copy':>7} | {'max abs err':>11} {'rel L2':>9} {'worst rel':>9}")
    for encoding, wire in wires.items():
        enc_s, dec_s = best[f"{encoding} enc"], best[f"{encoding} dec"]
        decode_all(encoding, wire, dest, piece)
        rate = model_gb / (enc_s + dec_s)
        target = {"float16": 2.0, "bfloat16": 2.0, "int8": 1.0}.get(encoding)
        verdict = "-" if target is None else ("MET" if rate >= target else "MISSED")
        err = (dest - src).abs()
        rel_l2 = float(torch.linalg.vector_norm(dest - src) / torch.linalg.vector_norm(src))
        ratio = wire.numel() / (numel * 4)
        digits = codecs.wire_length(encoding, DIGITS_MLP_NUMEL) / (DIGITS_MLP_NUMEL * 4)
        print(f"{encoding:<9} | {ratio:8.4f} {digits:7.4f} | {enc_s * 1e3:7.1f} {dec_s * 1e3:7.1f} {rate:6.2f} "
              f"{verdict:>6} {copy_s / (enc_s + dec_s):7.2f} | {float(err.max()):11.3g} {rel_l2:9.2e} "
              f"{worst_relative(encoding, src, err):9.2e}")
    print("(GB/s = float32 model bytes / (encode + decode); 'vs copy' = copy time / (encode + decode time), "
          "1.0 = as fast as one float32 copy; wire/f32 and digits = wire bytes / float32 bytes at this size and "
          f"at the digits-mlp size, {DIGITS_MLP_NUMEL} values; worst rel: vs |x| (floats), vs block max |x| (int8))")


if __name__ == "__main__":
    main()
