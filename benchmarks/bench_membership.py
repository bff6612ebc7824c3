"""Control plane: seconds until every node sees every other one, and an idle daemon's memory.

Run: python benchmarks/bench_membership.py [--sizes 4,8,16] [--reps 1] [--timeout 120]

For each N, N real daemons (separate processes on 127.0.0.1) with training disabled (relay
nodes: train.enabled = false), all bootstrapping from node 0, are started at once. Printed:
seconds until all of them answer /healthz (from the first process start), and seconds until
each lists all N-1 others as connected in /peers, measured both from the moment all answer
/healthz and from the first process start. Target: N = 16 reaches full view within 15 s.

Memory of an idle daemon: VmRSS and PSS of the relay daemons of the largest swarm once it has
its full view, and of one training daemon (digits-mlp, alone) with its trainer child and any
other children (multiprocessing's resource tracker), 10 s after it came up.
"""

from __future__ import annotations

import argparse
import time
import urllib.error
from typing import Any

from benchutil import (
    MIB,
    child_pids,
    cmdline,
    load_avg,
    local_swarm,
    median,
    print_header,
    proc_pss,
    proc_status,
    start_nodes,
)

from peerfed.localswarm import LocalNode

TARGET_N, TARGET_S = 16, 15.0
RELAY = {"train.enabled": False, "log_level": "warning"}


def all_up(nodes: list[LocalNode]) -> bool:
    return all(node.is_up() for node in nodes)


def full_view_missing(nodes: list[LocalNode]) -> int:
    """How many (node, peer) pairs are not connected yet."""
    ids = {n.peer_id for n in nodes}
    missing = 0
    for node in nodes:
        try:
            seen = node.connected_peers()
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            seen = set()
        missing += len(ids - {node.peer_id} - seen)
    return missing


def measure_swarm(n: int, timeout: float) -> dict[str, Any]:
    with local_swarm(f"bench-membership-{n}-") as swarm:
        nodes = [swarm.add_node(settings=RELAY) for _ in range(n)]
        t0 = time.monotonic()
        for node in nodes:  # all at once; node 0 is everyone's bootstrap
            node.start()
        while not all_up(nodes):
            for node in nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"node {node.index} exited:\n{node.log_tail()}")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{n} nodes not all up in {timeout} s")
            time.sleep(0.1)
        t_up = time.monotonic()
        missing_at_up = full_view_missing(nodes)
        while (missing := full_view_missing(nodes)) > 0:
            if time.monotonic() - t0 > timeout:
                return {"n": n, "up_s": t_up - t0, "view_s": None, "missing": missing, "load": load_avg()}
            time.sleep(0.2)
        t_view = time.monotonic()
        rss = [proc_status(node.process.pid)["VmRSS"] for node in nodes]  # type: ignore[union-attr]
        pss = [proc_pss(node.process.pid) for node in nodes]  # type: ignore[union-attr]
        return {"n": n, "up_s": t_up - t0, "view_s": t_view - t_up, "view_from_start_s": t_view - t0,
                "missing_at_up": missing_at_up, "rss": rss, "pss": pss, "load": load_avg()}


def measure_swarm_retrying(n: int, timeout: float, tries: int = 3) -> dict[str, Any]:
    """LocalSwarm picks free ports before the daemons bind them; on a busy machine another
    process can take one in between. Such a start is not a membership result: start over."""
    for attempt in range(tries):
        try:
            return measure_swarm(n, timeout)
        except RuntimeError as exc:
            if "already in use" not in str(exc) or attempt == tries - 1:
                raise
            print(f"N={n:3d}: a port was taken before a daemon bound it; starting this swarm again")
    raise AssertionError("unreachable")


def training_daemon_memory(settle: float) -> dict[str, Any]:
    with local_swarm("bench-membership-train-") as swarm:
        node = swarm.add_node(settings={"train.task": "digits-mlp", "train.init": "local", "log_level": "warning",
                                        "train.threads": 1})
        start_nodes(swarm)
        time.sleep(settle)
        pid = node.process.pid  # type: ignore[union-attr]
        rows = [("daemon", pid)] + [(_child_name(cmdline(c)), c) for c in child_pids(pid)]
        return {"rows": [(name, p, proc_status(p)["VmRSS"], proc_pss(p)) for name, p in rows], "load": load_avg()}


def _child_name(line: str) -> str:
    if "resource_tracker" in line:
        return "multiprocessing resource tracker"
    if "spawn_main" in line:
        return "trainer (spawn child)"
    return line[:40]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,16", help="swarm sizes, comma-separated")
    parser.add_argument("--reps", type=int, default=1, help="swarms started per size")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on a swarm after this long")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds the training daemon runs before reading RSS")
    args = parser.parse_args()
    print_header("bench_membership: full view of N relay daemons, idle daemon memory",
                 "relay nodes (train.enabled = false), node 0 is everyone's bootstrap; all started at once")
    results: dict[int, list[dict[str, Any]]] = {}
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        for rep in range(args.reps):
            r = measure_swarm_retrying(n, args.timeout)
            results.setdefault(n, []).append(r)
            if r["view_s"] is None:
                print(f"N={n:3d} rep {rep}: all up after {r['up_s']:.1f} s; NO full view within {args.timeout:g} s "
                      f"({r['missing']} node-peer pairs missing); {r['load']}")
            else:
                print(f"N={n:3d} rep {rep}: all answer /healthz {r['up_s']:5.1f} s after the first start; full view "
                      f"{r['view_s']:5.1f} s after that ({r['view_from_start_s']:5.1f} s from start; "
                      f"{r['missing_at_up']} of {n * (n - 1)} pairs missing when all were up); "
                      f"relay daemon RSS median {median(r['rss']) / MIB:.0f} MiB, PSS {median(r['pss']) / MIB:.0f} MiB; "
                      f"{r['load']}")
    mem = training_daemon_memory(args.settle)
    print(f"\ntraining daemon (digits-mlp, alone, {args.settle:g} s after start; {mem['load']}):")
    total_rss = total_pss = 0
    for name, pid, rss, pss in mem["rows"]:
        total_rss += rss
        total_pss += pss
        print(f"   {name:<32s} pid {pid:>7d}: RSS {rss / MIB:6.0f} MiB, PSS {pss / MIB:6.0f} MiB")
    print(f"   total: RSS {total_rss / MIB:.0f} MiB (shared pages counted twice), PSS {total_pss / MIB:.0f} MiB")
    print("\n## verdicts")
    if TARGET_N not in results:
        print(f"   N={TARGET_N} not measured (--sizes): no verdict")
    else:
        times = [r["view_s"] for r in results[TARGET_N]]
        worst = None if any(t is None for t in times) else max(times)
        verdict = "MET" if worst is not None and worst <= TARGET_S else "MISSED"
        shown = "none" if worst is None else f"{worst:.1f} s after all up"
        starts = [r.get("view_from_start_s") for r in results[TARGET_N] if r.get("view_from_start_s")]
        print(f"   N={TARGET_N} full view: worst {shown}"
              + (f" ({max(starts):.1f} s from first start)" if starts else "")
              + f" (target <= {TARGET_S:g} s: {verdict})")


if __name__ == "__main__":
    main()
