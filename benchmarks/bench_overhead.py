"""Trainer speed with an exchange every 2 s vs without, in paired windows of the same run.

Run: python benchmarks/bench_overhead.py [--cases cheap,heavy,digits] [--window 10] [--pairs 3]
                                         [--partner background|anywhere]

Two real daemons (separate processes on 127.0.0.1). Node A is measured: its trainer runs
flat out (1 torch thread, the default on 2 cores). Node B is only the exchange partner: same
model, but its trainer sleeps 50 ms per step so it takes little CPU. B stands in for a peer
on another machine, so by default (--partner background) its whole process tree is moved out
of A's way: pinned to the last CPU, every thread at nice 19 and its scheduler autogroup at
nice 19. A (daemon and trainer) is left as a user would run it. Why this matters on Linux:
every daemon starts a session of its own, and with the scheduler's autogroups
(kernel.sched_autogroup_enabled = 1, the usual default) each session is a scheduling group of
equal weight, so the nice +10 of a data plane counts only inside its own node. B's half of an
exchange then competes with A's trainer as an equal, and A's own niced exchange work, outweighed
by B's group on the other core, runs beside its trainer instead. On a real network B's half
runs on B's machine. --partner anywhere measures the same-machine case. Gossip is off
(exchange.interval = 1e9 s); in "on" windows the benchmark asks A for one exchange with B
every --period seconds (POST /exchange, start to start), in "off" windows for none. Windows
alternate off/on, on/off, ... (so a drift in machine load cancels), with a short gap between
two windows that is not counted, and the steps A took in a window come from the step counter
in its /status. The figure is steps/s(on) / steps/s(off) per pair (target >= 0.97). To tell
where a loss comes from, each window also records the CPU time of A's trainer and of both
daemons (/proc/<pid>/stat) and the machine's runnable tasks (/proc/stat procs_running): a
lower trainer CPU share means lock waits or a core taken by others; more CPU per step means
memory bandwidth or cache contention.

Cases (what is measured, exactly):
- cheap:  synthetic:sized, a 100 MiB model (embedding table, sparse gradients) whose step is
          cheap (batch 32, well under 1 ms): the exchange moves 100 MiB each way.
- heavy:  synthetic:sized, a 100 MiB model whose steps are compute-heavy (a Linear tower of
          6 x 1024 on a batch of 64, tens of ms): the exchange moves 100 MiB each way.
- digits: the built-in digits-mlp (a 10 KiB model): its own tiny exchange every 2 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any, Self

from benchutil import (
    QUIET_TRAINING,
    autogroup,
    cpu_seconds,
    exchange_now,
    load_avg,
    local_swarm,
    median,
    print_header,
    settings_for,
    start_nodes,
    to_background,
    trainer_pid,
    wait_exchange_ready,
)

TARGET = 0.97
PEER_SLEEP = 0.05  # seconds B's trainer sleeps per step

CASES: dict[str, dict[str, Any]] = {
    "cheap": {"task": "synthetic:sized", "options": {"mib": 100}, "batch_size": 32,
              "peer_task": "synthetic:sized"},
    "heavy": {"task": "synthetic:sized", "options": {"mib": 100, "tower": 6, "width": 1024}, "batch_size": 64,
              "peer_task": "synthetic:sized"},
    "digits": {"task": "digits-mlp", "options": {}, "batch_size": 32,
               "peer_task": "synthetic:digits"},  # same model as digits-mlp, throttled
}


class Exchanger:
    """Asks node A for one exchange with B every ``period`` seconds until stopped."""

    def __init__(self, a: Any, b_id: str, period: float) -> None:
        self.a, self.b_id, self.period = a, b_id, period
        self.results: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()  # an exchange in flight finishes inside this window

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            answer, outside = exchange_now(self.a, self.b_id)
            self.results.append((str(answer.get("outcome")), outside))
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def steps_now(node: Any) -> tuple[int, float]:
    status = node.get("/status")
    return int(status["step"]), time.monotonic()


def procs_running() -> int:
    """Runnable tasks on the machine right now (/proc/stat), ours and everybody else's."""
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            if line.startswith("procs_running"):
                return int(line.split()[1])
    return 0


def measure_window(a: Any, b_id: str, on: bool, pids: dict[str, int], args: argparse.Namespace) -> dict[str, Any]:
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
    step0, t0 = steps_now(a)
    results: list[tuple[str, float]] = []
    runnable: list[int] = []

    def wait_window() -> None:
        while time.monotonic() - t0 < args.window:
            runnable.append(procs_running())
            time.sleep(min(0.5, max(0.0, args.window - (time.monotonic() - t0))))

    if on:
        with Exchanger(a, b_id, args.period) as ex:
            wait_window()
        results = ex.results
    else:
        wait_window()
    step1, t1 = steps_now(a)
    cpu = {k: cpu_seconds(p) - cpu0[k] for k, p in pids.items()}
    return {"on": on, "rate": (step1 - step0) / (t1 - t0), "steps": step1 - step0, "seconds": t1 - t0,
            "exchanges": results, "cpu": cpu, "runnable": statistics.mean(runnable) if runnable else 0.0}


def run_case(name: str, args: argparse.Namespace) -> dict[str, Any]:
    case = CASES[name]
    common = {"train.node_count": 2, "train.batch_size": case["batch_size"], "train.threads": 1,
              "exchange.transfer_timeout": 600.0}
    with local_swarm(f"bench-overhead-{name}-") as swarm:
        a = swarm.add_node(settings=settings_for(common, **{
            "train.task": case["task"], "train.options": dict(case["options"]), "train.node_index": 0}))
        b = swarm.add_node(settings=settings_for(common, **{
            "train.task": case["peer_task"], "train.node_index": 1,
            "train.options": {**case["options"], "step_sleep": PEER_SLEEP}}))
        start_nodes(swarm)
        wait_exchange_ready(a, b.peer_id)
        warm, _ = exchange_now(a, b.peer_id)  # allocates the exchange buffers before measuring
        pids = {"trainer": trainer_pid(a.process.pid) or a.process.pid,  # type: ignore[union-attr]
                "daemon A": a.process.pid, "daemon B": b.process.pid}  # type: ignore[union-attr]
        placement = {k: autogroup(p) for k, p in pids.items()}
        if args.partner == "background" and (os.cpu_count() or 1) > 1:
            last = (os.cpu_count() or 1) - 1
            threads = to_background(pids["daemon B"], {last})
            placement["B in background"] = f"{threads} threads on CPU {last} at nice 19, autogroup {autogroup(pids['daemon B'])}"
        time.sleep(args.gap)
        windows = []
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for on in order:
                windows.append(measure_window(a, b.peer_id, on, pids, args))
                time.sleep(args.gap)
        return {"name": name, "windows": windows, "warmup": warm.get("outcome"), "load": load_avg(),
                "placement": placement}


def report(r: dict[str, Any]) -> float:
    windows = r["windows"]
    pairs = [(windows[i], windows[i + 1]) for i in range(0, len(windows), 2)]
    ratios = []
    for x, y in pairs:
        on, off = (x, y) if x["on"] else (y, x)
        ratios.append(on["rate"] / off["rate"])
    off_rates = [w["rate"] for w in windows if not w["on"]]
    on_rates = [w["rate"] for w in windows if w["on"]]
    exchanges = [e for w in windows if w["on"] for e in w["exchanges"]]
    ok = [t for outcome, t in exchanges if outcome == "ok"]
    print(f"\n## {r['name']}: {len(pairs)} pairs of windows, {r['load']} at end (warm-up exchange: {r['warmup']})")
    print(f"   placement: {'; '.join(f'{k}: {v}' for k, v in r['placement'].items())}")
    print(f"   steps/s off: median {median(off_rates):.1f} (windows {', '.join(f'{x:.1f}' for x in off_rates)})")
    print(f"   steps/s on:  median {median(on_rates):.1f} (windows {', '.join(f'{x:.1f}' for x in on_rates)})")
    print(f"   exchanges in on windows: {len(ok)} ok of {len(exchanges)}, median {median(ok) * 1e3:.0f} ms each"
          if ok else f"   exchanges in on windows: none ok ({exchanges[:3]})")
    print(f"   ratio on/off per pair: {', '.join(f'{x:.3f}' for x in ratios)}; median {median(ratios):.3f}, "
          f"worst {min(ratios):.3f}  (target >= {TARGET})")
    # Where a loss comes from: the trainer got less CPU (lock waits, or other runnable tasks
    # took the core), or each step cost more CPU (memory bandwidth, caches).
    for label, group in (("off", [w for w in windows if not w["on"]]), ("on", [w for w in windows if w["on"]])):
        share = median([w["cpu"]["trainer"] / w["seconds"] for w in group])
        per_cpu = median([w["steps"] / max(1e-9, w["cpu"]["trainer"]) for w in group])
        daemons = median([(w["cpu"]["daemon A"] + w["cpu"]["daemon B"]) / w["seconds"] for w in group])
        print(f"   {label:>3}: trainer CPU share {share:.2f} core, {per_cpu:.0f} steps per trainer CPU-second, "
              f"daemons A+B {daemons:.2f} core, runnable tasks on the machine {median([w['runnable'] for w in group]):.1f}")
    return median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="cheap,heavy,digits", help=f"comma-separated of {', '.join(CASES)}")
    parser.add_argument("--window", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--pairs", type=int, default=3, help="on/off window pairs per case")
    parser.add_argument("--period", type=float, default=2.0, help="seconds between two exchange starts")
    parser.add_argument("--gap", type=float, default=1.0, help="uncounted seconds between windows")
    parser.add_argument("--partner", choices=("background", "anywhere"), default="background",
                        help="move partner B (it stands in for another machine) out of A's way, or not")
    args = parser.parse_args()
    print_header(
        "bench_overhead: trainer steps/s with an exchange every "
        f"{args.period:g} s vs none (paired windows of {args.window:g} s)",
        f"node A trains flat out (1 thread); node B is its partner, trainer throttled to {PEER_SLEEP} s/step, "
        f"{'in the background (last CPU, nice 19)' if args.partner == 'background' else 'anywhere'}; "
        f"settings {QUIET_TRAINING}",
    )
    verdicts = []
    for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
        verdicts.append((name, report(run_case(name, args))))
    print("\n## verdicts")
    for name, ratio in verdicts:
        print(f"   {name}: steps/s ratio on/off {ratio:.3f} (target >= {TARGET}: {'MET' if ratio >= TARGET else 'MISSED'})")


if __name__ == "__main__":
    main()
