"""Soak: a few real daemons gossiping fast for a while; does anything grow that should not?

A node is meant to run for months. This runs ``--nodes`` daemons (built-in digits-mlp, one
exchange every ``--interval`` seconds each, checkpoints and evaluations far more often than
the defaults) for ``--minutes``, and samples every daemon and its trainer: resident memory,
open file descriptors, threads, log bytes, files in the state folder and in /dev/shm.

After a warm-up (``--warmup`` minutes: by default 6, so the replay cache, which remembers
every signed message for 5 minutes, is full), it prints how much each figure moved per 1000
exchanges. A leak shows as a growth that keeps going; a bounded cache shows as a step in the
warm-up and then flat. Figures are growth against the first sample after the warm-up,
taken in the same run.

    python benchmarks/soak.py --nodes 3 --minutes 14
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import (  # noqa: E402
    load_avg,
    local_swarm,
    mib,
    print_header,
    proc_status,
    start_nodes,
    trainer_pid,
)

from peerfed.localswarm import LocalNode  # noqa: E402


@dataclass
class Sample:
    at: float
    exchanges: int  # this node's finished exchanges, both roles, any outcome
    rss: dict[str, int]  # "daemon" / "trainer" -> VmRSS bytes
    fds: dict[str, int]
    threads: dict[str, int]
    log_bytes: int
    state_files: int
    restarts: int


@dataclass
class Track:
    node: LocalNode
    samples: list[Sample] = field(default_factory=list)


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def count_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def shm_entries() -> int:
    return sum(1 for name in os.listdir("/dev/shm") if not name.startswith("sem.mp-"))


def sample(node: LocalNode) -> Sample:
    assert node.process is not None
    status = node.get("/status")
    exchanges = status["exchanges"]
    finished = sum(exchanges.get(k, 0) for k in ("ok", "busy", "refused", "failed"))
    pids = {"daemon": node.process.pid}
    trainer = trainer_pid(node.process.pid)
    if trainer is not None:
        pids["trainer"] = trainer
    state_files = sum(len(files) for _, _, files in os.walk(node.home))
    return Sample(
        at=time.monotonic(),
        exchanges=finished,
        rss={k: proc_status(p)["VmRSS"] for k, p in pids.items()},
        fds={k: count_fds(p) for k, p in pids.items()},
        threads={k: count_threads(p) for k, p in pids.items()},
        log_bytes=node.log_path.stat().st_size,
        state_files=state_files,
        restarts=int(status.get("trainer", {}).get("restarts", 0)),
    )


def report(track: Track, warm_index: int) -> list[str]:
    first, last = track.samples[warm_index], track.samples[-1]
    done = max(1, last.exchanges - first.exchanges)
    per_k = 1000.0 / done
    lines = [f"node {track.node.index}: {last.exchanges} exchanges in all, {done} after warm-up, "
             f"trainer restarts {last.restarts}"]
    for role in ("daemon", "trainer"):
        if role not in first.rss or role not in last.rss:
            lines.append(f"  {role}: not sampled")
            continue
        rss = [s.rss[role] for s in track.samples[warm_index:] if role in s.rss]
        lines.append(
            f"  {role:7s} RSS {mib(first.rss[role])} -> {mib(last.rss[role])} "
            f"({(last.rss[role] - first.rss[role]) / 1024 * per_k:+.0f} KiB per 1000 exchanges; "
            f"max {mib(max(rss))}), fds {first.fds[role]} -> {last.fds[role]}, "
            f"threads {first.threads[role]} -> {last.threads[role]}")
    minutes = (last.at - first.at) / 60
    lines.append(f"  log {(last.log_bytes - first.log_bytes) / max(minutes, 1e-9) / 1024:.1f} KiB/min "
                 f"({(last.log_bytes - first.log_bytes) / done:.0f} B per exchange), "
                 f"files in its home {first.state_files} -> {last.state_files}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=14.0, help="the whole run, warm-up included")
    parser.add_argument("--warmup", type=float, default=6.0, help="minutes not counted in the growth figures")
    parser.add_argument("--interval", type=float, default=0.5, help="exchange.interval of every node (s)")
    parser.add_argument("--every", type=float, default=15.0, help="seconds between samples")
    args = parser.parse_args()

    print_header("soak", f"{args.nodes} daemons, digits-mlp, exchange every {args.interval} s, "
                         f"{args.minutes} min, the first {args.warmup} not counted")
    settings = {
        "train.task": "digits-mlp",
        "train.threads": 1,
        "train.node_count": args.nodes,
        "exchange.interval": args.interval,
        "train.eval_interval": 2.0,
        "checkpoint.interval": 5.0,
        "checkpoint.keep": 3,
        "log_level": "info",
    }
    with local_swarm("peerfed-soak-") as swarm:
        for i in range(args.nodes):
            swarm.add_node(settings={**settings, "train.node_index": i})
        shm_before = shm_entries()
        start_nodes(swarm)
        swarm.wait_full_view(timeout=60)
        tracks = [Track(node) for node in swarm.nodes]
        began = time.monotonic()
        end = began + args.minutes * 60
        while True:
            for track in tracks:
                track.samples.append(sample(track.node))
            shm_now = shm_entries()
            print(f"{time.monotonic() - began:6.0f} s  exchanges "
                  f"{[t.samples[-1].exchanges for t in tracks]}  daemon RSS "
                  f"{[mib(t.samples[-1].rss['daemon']) for t in tracks]}  /dev/shm entries {shm_now}  "
                  f"{load_avg()}", flush=True)
            if time.monotonic() >= end:
                break
            time.sleep(min(args.every, max(0.0, end - time.monotonic())))
        warm_index = next((i for i, s in enumerate(tracks[0].samples) if s.at - began >= args.warmup * 60),
                          len(tracks[0].samples) - 1)
        print(f"\nafter the warm-up ({tracks[0].samples[warm_index].at - began:.0f} s) to the end "
              f"({tracks[0].samples[-1].at - began:.0f} s):")
        for track in tracks:
            print("\n".join(report(track, warm_index)))
        codes = swarm.stop_all()
    print(f"\nexit codes {codes}; /dev/shm entries (not counting semaphores) before {shm_before}, "
          f"after the stop {shm_entries()}")


if __name__ == "__main__":
    main()
