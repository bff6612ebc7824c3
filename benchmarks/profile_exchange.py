"""Where the CPU of an exchange goes: `perf record` on two daemons during N 100 MiB exchanges.

Run (needs Linux perf and permission to profile): python benchmarks/profile_exchange.py
     [--mib 100] [--exchanges 6] [--out /tmp/perf_exchange.data]
then: perf report -i /tmp/perf_exchange.data --no-children --sort dso,sym

Two real daemons (synthetic:sized, trainers throttled as in bench_exchange.py) make two warm-up
exchanges; then perf samples both daemon processes (all their threads, kernel included) while
A makes --exchanges more with B. Prints the exchange times and each daemon's CPU per exchange.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import time

from benchutil import (
    cpu_seconds,
    exchange_now,
    local_swarm,
    settings_for,
    start_nodes,
    wait_exchange_ready,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=100.0)
    parser.add_argument("--exchanges", type=int, default=6)
    parser.add_argument("--out", default="/tmp/perf_exchange.data")
    args = parser.parse_args()
    settings = settings_for({}, **{"train.task": "synthetic:sized",
                                   "train.options": {"mib": args.mib, "step_sleep": 0.05},
                                   "train.node_count": 2, "exchange.transfer_timeout": 600.0})
    with local_swarm("profile-exchange-") as swarm:
        a = swarm.add_node(settings={**settings, "train.node_index": 0})
        b = swarm.add_node(settings={**settings, "train.node_index": 1})
        start_nodes(swarm)
        wait_exchange_ready(a, b.peer_id)
        for _ in range(2):
            exchange_now(a, b.peer_id)  # buffers and code paths warm
        pids = [a.process.pid, b.process.pid]  # type: ignore[union-attr]
        perf = subprocess.Popen(["perf", "record", "-F", "4000", "-g", "-p", ",".join(map(str, pids)),
                                 "-o", args.out])
        time.sleep(1.0)  # perf attached
        cpu0 = [cpu_seconds(p) for p in pids]
        times = [exchange_now(a, b.peer_id)[1] for _ in range(args.exchanges)]
        cpu1 = [cpu_seconds(p) for p in pids]
        perf.send_signal(signal.SIGINT)
        perf.wait()
    per = [(y - x) / args.exchanges * 1e3 for x, y in zip(cpu0, cpu1)]
    print(f"exchanges (ms): {', '.join(f'{t * 1e3:.0f}' for t in times)}")
    print(f"daemon CPU per exchange: A {per[0]:.0f} ms, B {per[1]:.0f} ms; profile in {args.out}")


if __name__ == "__main__":
    main()
