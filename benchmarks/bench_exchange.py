"""Push-pull exchange time vs raw loopback TCP both ways, and the daemon's memory during it.

Run: python benchmarks/bench_exchange.py [--sizes 1,16,100] [--reps 5] [--train-sleep 0.05]
     python benchmarks/bench_exchange.py --sizes 1,16,100,400      # 400 MiB too (~4 GiB RAM)
     python benchmarks/bench_exchange.py --sizes 16 --encodings float32,float16,bfloat16,int8

For each model size, two real daemons (separate processes, 127.0.0.1) train the benchmark
task ``synthetic:sized`` (an embedding table of that flat size; cheap steps throttled by
``--train-sleep`` so the trainers leave the CPU to the exchange). Gossip, evaluation and
periodic checkpoints are off; the only exchanges are ours: POST /exchange on node A's local
API (A pushes to B, B answers with its weights, both merge).

In the same run, interleaved with the exchanges, the benchmark moves the same bytes both ways
at once over raw loopback TCP (two connections, one per direction, a sender and a receiver
thread each, preallocated buffers): the physical limit of the machine. Printed per size:
medians of the exchange (the daemon's duration_s and the time seen from outside) and of raw
TCP, their ratio (target at 100 MiB: <= 1.5x), the CPU seconds each daemon spent per
exchange, and the serial CPU work an exchange implies (snapshot copy, BLAKE3 of both
directions, value check, merge) measured here on a buffer of that size.
--encodings runs each size once per wire encoding (exchange.encoding of both daemons; default
float32, what this benchmark measured before encodings) and prints the wire bytes of one
exchange each way (the daemons' own counters: payload as encoded, without the 2 KiB trailer).
Raw TCP always moves the float32 size.

--timeline MIB prints instead when each step of one exchange starts and ends on both sides
(two Exchange objects in two processes, in-memory weights): where the time goes.

Memory (daemon process only; the trainer is a separate child, shown apart): VmRSS when idle
before any exchange ("cold"; the daemon reserves one exchange's buffers, 2x the model, at
start), VmRSS idle after the first exchange ("warm"), and the peak (VmHWM, reset through
/proc/<pid>/clear_refs right before each exchange). VmRSS also counts the trainer's shared
weights once the daemon has read them (RssShmem, 1x the model, the same pages as the
trainer's): "private" figures leave them out (VmHWM - RssShmem; exact once RssShmem stopped
growing, i.e. after the first exchange). Target: peak <= idle + 1x model size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import threading
import time
from typing import Any

import torch
from benchutil import (
    MIB,
    QUIET_TRAINING,
    cpu_seconds,
    exchange_now,
    load_avg,
    local_swarm,
    median,
    print_header,
    proc_meminfo,
    proc_status,
    reset_peak_rss,
    settings_for,
    start_nodes,
    trainer_pid,
    wait_exchange_ready,
)
from synthetic import flat_bytes

from peerfed.averaging import check_values, merge_
from peerfed.core.manifest import digest_buffer

TARGET_RATIO = 1.5


# ------------------------------------------------------------------ raw TCP, both ways at once


class RawTCP:
    """Two loopback connections (one per direction) with preallocated buffers."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        # Touch every page now, so the timed part moves bytes and does not fault memory in.
        self.send = [bytearray(b"\x01") * nbytes for _ in range(2)]
        self.recv = [bytearray(nbytes) for _ in range(2)]

    def run_once(self) -> float:
        pairs = [_socket_pair() for _ in range(2)]
        barrier = threading.Barrier(5)
        errors: list[BaseException] = []

        def sender(sock: socket.socket, buf: bytearray) -> None:
            try:
                barrier.wait()
                sock.sendall(memoryview(buf))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def receiver(sock: socket.socket, buf: bytearray) -> None:
            try:
                view = memoryview(buf)
                barrier.wait()
                got = 0
                while got < len(view):
                    n = sock.recv_into(view[got:])
                    if n == 0:
                        raise ConnectionError("raw TCP peer closed early")
                    got += n
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [
            threading.Thread(target=sender, args=(pairs[0][0], self.send[0])),
            threading.Thread(target=receiver, args=(pairs[0][1], self.recv[0])),
            threading.Thread(target=sender, args=(pairs[1][1], self.send[1])),
            threading.Thread(target=receiver, args=(pairs[1][0], self.recv[1])),
        ]
        for t in threads:
            t.start()
        barrier.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        for a, b in pairs:
            a.close()
            b.close()
        if errors:
            raise errors[0]
        return elapsed


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return client, accepted


# ------------------------------------------------------------------ the CPU work an exchange implies


def serial_work(nbytes: int) -> dict[str, float]:
    """Seconds of each piece of per-side CPU work on a buffer of this size, measured here."""
    numel = nbytes // 4
    a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
    view = memoryview(a.numpy()).cast("B")
    out: dict[str, float] = {}
    for name, fn in (
        ("copy", lambda: c.copy_(a)),
        ("blake3", lambda: digest_buffer(view)),
        ("check_values", lambda: check_values(b)),
        ("merge", lambda: merge_(c, a, b, 0.5)),
    ):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    return out


# ------------------------------------------------------------------ one size


def measure_size(size_mib: float, args: argparse.Namespace, tls: bool, encoding: str = "float32") -> dict[str, Any]:
    nbytes = flat_bytes(size_mib)
    options = {"mib": size_mib, "step_sleep": args.train_sleep}
    settings = settings_for({}, **{"train.task": "synthetic:sized", "train.options": options,
                                   "train.node_count": 2, "exchange.transfer_timeout": 600.0,
                                   "train.device": args.device, "exchange.tls": tls, "exchange.encoding": encoding})
    raw = RawTCP(nbytes)
    result: dict[str, Any] = {"mib": size_mib, "nbytes": nbytes, "tls": tls, "encoding": encoding}
    with local_swarm(f"bench-exchange-{size_mib:g}-") as swarm:
        a = swarm.add_node(settings={**settings, "train.node_index": 0})
        b = swarm.add_node(settings={**settings, "train.node_index": 1})
        start_nodes(swarm)
        wait_exchange_ready(a, b.peer_id)
        pa, pb = a.process.pid, b.process.pid  # type: ignore[union-attr]
        time.sleep(1.0)  # let start-up allocations settle
        cold = {n: proc_status(p)["VmRSS"] for n, p in (("A", pa), ("B", pb))}
        cold_private = {n: proc_status(p)["VmRSS"] - proc_status(p)["RssShmem"] for n, p in (("A", pa), ("B", pb))}
        trainer = trainer_pid(pa)
        result["trainer_rss"] = proc_status(trainer)["VmRSS"] if trainer else None

        first_peaks = _exchange_with_peaks(a, b, pa, pb, result.setdefault("warmup", {}))
        time.sleep(1.0)
        warm = {n: proc_status(p)["VmRSS"] for n, p in (("A", pa), ("B", pb))}
        result.update(cold=cold, warm=warm, first_peaks=first_peaks, cold_private=cold_private)

        exchange_in, exchange_out, raw_times, ratios, peaks, private_peaks = [], [], [], [], [], []
        raw_cpu = []
        cpu_a, cpu_b = [], []
        for _ in range(args.reps):
            cpu_before = time.process_time()  # raw TCP's threads live in this process
            raw_t = raw.run_once()
            raw_cpu.append(time.process_time() - cpu_before)
            time.sleep(args.pause)
            info: dict[str, Any] = {}
            before = cpu_seconds(pa), cpu_seconds(pb)
            peaks.append(_exchange_with_peaks(a, b, pa, pb, info))
            private_peaks.append({n: peaks[-1][n] - proc_status(p)["RssShmem"] for n, p in (("A", pa), ("B", pb))})
            cpu_a.append(cpu_seconds(pa) - before[0])
            cpu_b.append(cpu_seconds(pb) - before[1])
            if info["outcome"] != "ok":
                result.setdefault("not_ok", []).append(info["outcome"])
                continue
            result["wire"] = info["wire"]
            exchange_in.append(info["duration_s"])
            exchange_out.append(info["outside_s"])
            raw_times.append(raw_t)
            ratios.append(info["outside_s"] / raw_t)
            time.sleep(args.pause)
        result.update(
            exchange_in=exchange_in, exchange_out=exchange_out, raw=raw_times, ratios=ratios,
            peaks=peaks, private_peaks=private_peaks, cpu_a=cpu_a, cpu_b=cpu_b, raw_cpu=raw_cpu, load=load_avg(),
        )
    del raw
    result["work"] = serial_work(nbytes)
    return result


def _exchange_with_peaks(a: Any, b: Any, pa: int, pb: int, info: dict[str, Any]) -> dict[str, int]:
    reset_peak_rss(pa)
    reset_peak_rss(pb)
    before = a.get("/status")
    answer, outside = exchange_now(a, b.peer_id)
    after = a.get("/status")
    info.update(outcome=answer.get("outcome"), duration_s=answer.get("duration_s"), outside_s=outside,
                wire=(after["bytes_sent"] - before["bytes_sent"], after["bytes_received"] - before["bytes_received"]))
    time.sleep(0.3)  # the responder may still be merging when A's answer arrives
    return {"A": proc_status(pa)["VmHWM"], "B": proc_status(pb)["VmHWM"]}


# ------------------------------------------------------------------ --timeline: where the time goes
# Two peerfed.net.exchange.Exchange objects in two spawned processes (uvloop), with in-memory
# weights instead of a trainer, and the exchange's steps wrapped with timestamps. A profiling
# aid: it patches names inside peerfed.net.transfer and .exchange, so it follows their structure.

# (module, function): the receive and send loops; the value check's tail and the merge run
# through in_receive_worker.
TIMELINE_STEPS = (("transfer", "receive_into"), ("transfer", "send_weights"), ("exchange", "in_receive_worker"))


class _MemoryWeights:
    fingerprint = "b" * 64
    num_samples = 100

    def __init__(self, numel: int, log: list[tuple[float, str]]) -> None:
        self.w, self.nbytes, self._log = torch.randn(numel), numel * 4, log

    def lr_clock(self) -> tuple[int, float]:
        return 0, 0.0

    def begin_snapshot(self) -> None:
        pass

    def snapshot_range(self, dst: torch.Tensor, start: int, stop: int) -> None:
        if start == 0:
            self._log.append((time.monotonic(), "snapshot start"))
        dst[start:stop].copy_(self.w[start:stop])
        if stop == self.w.numel():
            self._log.append((time.monotonic(), "snapshot end"))

    def merge(self, received: torch.Tensor, sent: torch.Tensor, alpha: float) -> None:
        self._log.append((time.monotonic(), "merge start"))
        merge_(self.w, sent, received, alpha)
        self._log.append((time.monotonic(), "merge end"))


def _instrument(log: list[tuple[float, str]]) -> None:
    import functools

    import peerfed.net.exchange
    import peerfed.net.transfer

    modules = {"transfer": peerfed.net.transfer, "exchange": peerfed.net.exchange}
    for module_name, name in TIMELINE_STEPS:
        module = modules[module_name]
        original = getattr(module, name)

        def wrapped(*a: Any, _f: Any = original, _n: str = name, **k: Any) -> Any:
            log.append((time.monotonic(), f"{_n} start"))
            if asyncio.iscoroutinefunction(_f):
                async def run() -> Any:
                    try:
                        return await _f(*a, **k)
                    finally:
                        log.append((time.monotonic(), f"{_n} end"))
                return run()
            try:
                return _f(*a, **k)
            finally:
                log.append((time.monotonic(), f"{_n} end"))

        setattr(module, name, functools.wraps(original)(wrapped))


def _timeline_node(role: str, numel: int, ports: Any, go: Any, out: Any, exchanges: int) -> None:
    import uvloop

    from peerfed.core.envelope import Verifier
    from peerfed.core.peerid import Signer
    from peerfed.net.exchange import Exchange

    torch.set_num_threads(1)
    log: list[tuple[float, str]] = []
    _instrument(log)
    signer = Signer.generate()

    async def main() -> None:
        verifier = Verifier(network="bench", own_peer_id=signer.peer_id, clock=time.time, max_size=4096)
        exchange = Exchange(signer=signer, network="bench", weights=_MemoryWeights(numel, log), verifier=verifier,
                            max_incoming=1, connect_timeout=5.0, transfer_timeout=600.0)
        exchange.set_weights_ready(True)  # no state sync here
        ports.put((role, signer.peer_id, await exchange.start_server("127.0.0.1", 0)))
        if role == "A":
            peer_id, url = go.get()
            for i in range(exchanges):
                log.clear()
                log.append((time.monotonic(), "exchange start"))
                outcome = await exchange.exchange_with(peer_id, url)
                log.append((time.monotonic(), f"exchange end: {outcome}"))
                await asyncio.sleep(1.0)  # B reports meanwhile
                out.put(("A", i, list(log)))
            await exchange.close()
            out.put(("A", "done", []))
        else:
            seen = 0
            while True:
                await asyncio.sleep(0.05)
                stats = exchange.statistics()
                if stats.ok + stats.failed > seen:
                    seen = stats.ok + stats.failed
                    await asyncio.sleep(0.3)
                    out.put(("B", seen - 1, list(log)))
                    log.clear()

    uvloop.run(main())


def timeline(size_mib: float, exchanges: int = 3) -> None:
    """Print when each step of an exchange starts and ends on both sides (ms from A's start)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ports, go, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    numel = int(size_mib * MIB) // 4
    procs = [ctx.Process(target=_timeline_node, args=(r, numel, ports, go, out, exchanges), daemon=True)
             for r in ("A", "B")]
    for p in procs:
        p.start()
    info = {role: (peer, port) for role, peer, port in (ports.get(), ports.get())}
    go.put((info["B"][0], f"http://127.0.0.1:{info['B'][1]}"))
    logs: dict[tuple[str, int], list[tuple[float, str]]] = {}
    while True:
        role, index, log = out.get(timeout=600)
        if index == "done":
            break
        logs[(role, index)] = log
    time.sleep(0.5)
    for p in procs:
        p.terminate()
    print(f"\n## timeline of a {size_mib:g} MiB exchange (two Exchange objects, in-memory weights; "
          f"ms since A started; the last of {exchanges}, the first one allocates buffers)")
    last = exchanges - 1
    events = [(t, "A", what) for t, what in logs.get(("A", last), [])]
    events += [(t, "B", what) for t, what in logs.get(("B", last), [])]
    if not events:
        print("   no timeline recorded")
        return
    origin = min(t for t, side, _ in events if side == "A")
    for t, side, what in sorted(events):
        print(f"   {(t - origin) * 1e3:8.1f}  {side}  {what}")


# ------------------------------------------------------------------ report


def report(r: dict[str, Any]) -> None:
    size = r["nbytes"]
    print(f"\n## {r['mib']:g} MiB model ({size} bytes) in {r['encoding']}, exchange "
          f"{'over TLS 1.3' if r['tls'] else 'in plaintext'}, {len(r['ratios'])} exchanges ok, {r['load']} at end")
    if r.get("not_ok"):
        print(f"   NOT ok: {r['not_ok']}")
    if not r["ratios"]:
        return
    sent, got = r["wire"]
    print(f"   wire bytes of one exchange (A's counters): sent {sent}, received {got} "
          f"= {sent / size:.4f}x / {got / size:.4f}x the float32 model")
    ex_in, ex_out, raw = median(r["exchange_in"]), median(r["exchange_out"]), median(r["raw"])
    rate = 2 * size / MIB
    print(f"   raw TCP both ways      median {raw * 1e3:8.1f} ms   ({rate / raw:7.0f} MiB/s both directions together)")
    print(f"   exchange (duration_s)  median {ex_in * 1e3:8.1f} ms   = {ex_in / raw:5.2f}x raw TCP")
    print(f"   exchange (outside)     median {ex_out * 1e3:8.1f} ms   = {ex_out / raw:5.2f}x raw TCP "
          f"(per-pair ratios: median {median(r['ratios']):.2f}, best {min(r['ratios']):.2f}, worst {max(r['ratios']):.2f})")
    print(f"   first exchange (cold buffers): {r['warmup'].get('outside_s', float('nan')) * 1e3:.1f} ms, "
          f"outcome {r['warmup'].get('outcome')}")
    print(f"   daemon CPU per exchange: A (initiator) {median(r['cpu_a']) * 1e3:.0f} ms, "
          f"B (responder) {median(r['cpu_b']) * 1e3:.0f} ms")
    w = r["work"]
    per_side = w["copy"] + 2 * w["blake3"] + w["check_values"] + w["merge"]
    print(f"   CPU work per side measured here: snapshot copy {w['copy'] * 1e3:.0f} ms, blake3 {w['blake3'] * 1e3:.0f} ms "
          f"(x2: sent and received), check_values {w['check_values'] * 1e3:.0f} ms, merge {w['merge'] * 1e3:.0f} ms "
          f"-> {per_side * 1e3:.0f} ms ({per_side / raw:.2f}x raw TCP)")
    cores = os.cpu_count() or 1
    raw_cpu = median(r["raw_cpu"])
    floor = max(raw, (raw_cpu + 2 * per_side) / cores)
    print(f"   CPU floor on {cores} cores: raw TCP used {raw_cpu * 1e3:.0f} ms of CPU; with both sides' work "
          f"({raw_cpu * 1e3:.0f} + 2 x {per_side * 1e3:.0f} ms) spread perfectly over {cores} cores an exchange "
          f"needs >= {floor * 1e3:.0f} ms = {floor / raw:.2f}x raw TCP")
    for node in ("A", "B"):
        cold, warm = r["cold"][node], r["warm"][node]
        peak = max(p[node] for p in r["peaks"])
        first = r["first_peaks"][node]
        print(f"   daemon {node} RSS: idle cold {cold / MIB:.0f} MiB, idle warm {warm / MIB:.0f} MiB; "
              f"peak during first exchange {first / MIB:.0f} MiB (cold + {(first - cold) / size:.2f}x model); "
              f"peak during later exchanges {peak / MIB:.0f} MiB (warm + {(peak - warm) / size:.2f}x model, "
              f"cold + {(peak - cold) / size:.2f}x model)")
        cold_p = r["cold_private"][node]
        peak_p = max(p[node] for p in r["private_peaks"])
        print(f"   daemon {node} private (without the trainer's shared weights): idle {cold_p / MIB:.0f} MiB "
              f"(exchange buffers reserved at start included), peak during later exchanges {peak_p / MIB:.0f} MiB "
              f"(idle + {(peak_p - cold_p) / size:.2f}x model)")
    if r.get("trainer_rss"):
        print(f"   trainer child of A: VmRSS {r['trainer_rss'] / MIB:.0f} MiB (includes the shared weights)")


def verdicts(results: list[dict[str, Any]]) -> None:
    print("\n## verdicts")
    for r in results:
        if not r["ratios"]:
            print(f"   {r['mib']:g} MiB {r['encoding']}: no successful exchange")
            continue
        ratio = median(r["exchange_out"]) / median(r["raw"])
        size = r["nbytes"]
        peak_a = max(p["A"] for p in r["peaks"])
        peak_b = max(p["B"] for p in r["peaks"])
        warm_ok = all(max(p[n] for p in r["peaks"]) <= r["warm"][n] + size for n in ("A", "B"))
        cold_ok = all(max(p[n] for p in r["peaks"] + [r["first_peaks"]]) <= r["cold"][n] + size for n in ("A", "B"))
        private_ok = all(max(p[n] for p in r["private_peaks"]) <= r["cold_private"][n] + size for n in ("A", "B"))
        speed = "" if r["mib"] != 100 else f" (target <= {TARGET_RATIO}x: {'MET' if ratio <= TARGET_RATIO else 'MISSED'})"
        print(f"   {r['mib']:g} MiB {r['encoding']} {'TLS' if r['tls'] else 'plain'}: exchange {ratio:.2f}x raw TCP{speed}; peak RSS A/B "
              f"{peak_a / MIB:.0f}/{peak_b / MIB:.0f} MiB: <= warm idle + 1x model: {'MET' if warm_ok else 'MISSED'}, "
              f"<= cold idle + 1x model: {'MET' if cold_ok else 'MISSED'}; private peak <= private idle + 1x model: "
              f"{'MET' if private_ok else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,16,100", help="model flat sizes in MiB, comma-separated")
    parser.add_argument("--reps", type=int, default=5, help="exchanges (and raw TCP runs) per size")
    parser.add_argument("--train-sleep", type=float, default=0.05, help="seconds each trainer sleeps per step")
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between two timed transfers")
    parser.add_argument("--encodings", default="float32", help="exchange.encoding values to run, comma-separated")
    parser.add_argument("--device", default="cpu", help="the trainers' train.device (cuda: mirror mode on a GPU)")
    parser.add_argument("--tls", choices=("both", "on", "off"), default="both",
                        help="exchange over TLS, in plaintext, or both (then TLS is compared with plaintext)")
    parser.add_argument("--timeline", type=float, default=0.0, metavar="MIB",
                        help="only print the step-by-step timeline of an exchange of this size (profiling aid)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # like the daemon; the work figures are single-threaded costs
    if args.timeline:
        timeline(args.timeline)
        return
    sizes = [float(s) for s in args.sizes.split(",") if s.strip()]
    print_header(
        "bench_exchange: push-pull exchange between two daemons vs raw TCP both ways",
        f"task synthetic:sized on {args.device}, trainers sleep {args.train_sleep} s per step; "
        f"{args.reps} exchanges per size; "
        f"settings {QUIET_TRAINING}",
    )
    results = []
    for size in sizes:
        need = 12 * flat_bytes(size)
        available = proc_meminfo().get("MemAvailable", 0)
        if available < need:
            print(f"\n## {size:g} MiB: skipped, needs ~{need / 2**30:.1f} GiB free, {available / 2**30:.1f} GiB available")
            continue
        modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.tls]
        for tls in modes:
            for encoding in [e.strip() for e in args.encodings.split(",") if e.strip()]:
                r = measure_size(size, args, tls, encoding)
                report(r)
                results.append(r)
    verdicts(results)
    compare_tls(results)


def compare_tls(results: list[dict[str, Any]]) -> None:
    """TLS against plaintext, size by size, where both ran in this run."""
    by_size: dict[float, dict[bool, dict[str, Any]]] = {}
    for r in results:
        if r["ratios"]:
            by_size.setdefault(r["mib"], {})[r["tls"]] = r
    pairs = {mib: p for mib, p in by_size.items() if len(p) == 2}
    if not pairs:
        return
    print("\n## TLS 1.3 vs plaintext (same run)")
    for mib, p in pairs.items():
        plain, tls = p[False], p[True]
        t_plain, t_tls = median(plain["exchange_out"]), median(tls["exchange_out"])
        cpu = {n: (median(tls[f"cpu_{n}"]), median(plain[f"cpu_{n}"])) for n in ("a", "b")}
        print(f"   {mib:g} MiB: exchange {t_tls * 1e3:.1f} ms vs {t_plain * 1e3:.1f} ms = {t_tls / t_plain:.2f}x "
              f"plaintext ({median(tls['exchange_out']) / median(tls['raw']):.2f}x vs "
              f"{median(plain['exchange_out']) / median(plain['raw']):.2f}x raw TCP); daemon CPU per exchange "
              f"A {cpu['a'][0] * 1e3:.0f} vs {cpu['a'][1] * 1e3:.0f} ms (+{(cpu['a'][0] - cpu['a'][1]) * 1e3:.0f}), "
              f"B {cpu['b'][0] * 1e3:.0f} vs {cpu['b'][1] * 1e3:.0f} ms (+{(cpu['b'][0] - cpu['b'][1]) * 1e3:.0f})")


if __name__ == "__main__":
    main()
