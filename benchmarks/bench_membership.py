"""Control plane: seconds until every node holds its view, idle CPU, an idle daemon's memory.

Run: python benchmarks/bench_membership.py [--sizes 4,8,16] [--reps 1] [--timeout 120]
         [--max-connections 16] [--idle-window 30]
     python benchmarks/bench_membership.py --sizes 64,128 --timeout 300   # issue 16's swarms

For each N, N real daemons (separate processes on 127.0.0.1) with training disabled (relay
nodes: train.enabled = false), all bootstrapping from node 0, are started at once. Printed:
seconds until all of them answer /healthz (from the first process start), and seconds until
each lists its target view as connected in /peers: min(N-1, p2p.max_connections) peers (the
full view while N-1 <= max_connections), measured both from the moment all answer /healthz and
from the first process start; whether the overlay (who is connected to whom, as the nodes
report it) is connected; and each daemon's CPU over --idle-window seconds once the views are
held (median and worst, in % of one core). Targets: N = 16 reaches full view within 15 s;
at every N the views are held within 60 s (N = 64) / 120 s (N = 128) of all being up, the
overlay is connected, and the median idle CPU per daemon is <= 1% of a core.

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
    cpu_seconds,
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


def views(nodes: list[LocalNode]) -> dict[str, set[str]]:
    """Whom each node lists as connected (an empty set for a node that does not answer)."""
    ids = {n.peer_id for n in nodes}
    seen: dict[str, set[str]] = {}
    for node in nodes:
        try:
            seen[node.peer_id] = node.connected_peers() & ids
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            seen[node.peer_id] = set()
    return seen


def view_missing(nodes: list[LocalNode], target: int) -> int:
    """How many connections the nodes still lack to hold ``target`` peers each."""
    return sum(max(0, target - len(peers)) for peers in views(nodes).values())


def overlay_connected(seen: dict[str, set[str]]) -> bool:
    """Whether every node can reach every other through the links the nodes report."""
    links: dict[str, set[str]] = {p: set() for p in seen}
    for a, peers in seen.items():
        for b in peers:
            links[a].add(b)
            links.setdefault(b, set()).add(a)
    start = next(iter(links))
    reached, todo = {start}, [start]
    while todo:
        for b in links[todo.pop()] - reached:
            reached.add(b)
            todo.append(b)
    return reached == set(links)


def idle_cpu(nodes: list[LocalNode], window: float) -> list[float]:
    """Each daemon's CPU over ``window`` seconds, in % of one core."""
    pids = [node.process.pid for node in nodes]  # type: ignore[union-attr]
    before = [cpu_seconds(p) for p in pids]
    time.sleep(window)
    return [100.0 * (cpu_seconds(p) - b) / window for p, b in zip(pids, before, strict=True)]


def measure_swarm(n: int, timeout: float, max_connections: int = 24, idle_window: float = 0.0) -> dict[str, Any]:
    target = min(n - 1, max_connections)
    with local_swarm(f"bench-membership-{n}-") as swarm:
        nodes = [swarm.add_node(settings={**RELAY, "p2p.max_connections": max_connections}) for _ in range(n)]
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
        missing_at_up = view_missing(nodes, target)
        while (missing := view_missing(nodes, target)) > 0:
            if time.monotonic() - t0 > timeout:
                return {"n": n, "target": target, "up_s": t_up - t0, "view_s": None, "missing": missing,
                        "load": load_avg()}
            time.sleep(0.2 if n <= 32 else 1.0)
        t_view = time.monotonic()
        rss = [proc_status(node.process.pid)["VmRSS"] for node in nodes]  # type: ignore[union-attr]
        pss = [proc_pss(node.process.pid) for node in nodes]  # type: ignore[union-attr]
        cpu = idle_cpu(nodes, idle_window) if idle_window > 0 else []
        seen = views(nodes)  # after the idle window: the overlay as it stays, not only as it formed
        return {"n": n, "target": target, "up_s": t_up - t0, "view_s": t_view - t_up,
                "view_from_start_s": t_view - t0, "missing_at_up": missing_at_up, "rss": rss, "pss": pss,
                "cpu": cpu, "connected": overlay_connected(seen), "held": sum(len(v) >= target for v in seen.values()),
                "load": load_avg()}


def measure_swarm_retrying(n: int, timeout: float, tries: int = 3, **kwargs: Any) -> dict[str, Any]:
    """LocalSwarm picks free ports before the daemons bind them; on a busy machine another
    process can take one in between. Such a start is not a membership result: start over."""
    for attempt in range(tries):
        try:
            return measure_swarm(n, timeout, **kwargs)
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
    parser.add_argument("--max-connections", type=int, default=16, help="p2p.max_connections of every daemon")
    parser.add_argument("--idle-window", type=float, default=30.0, help="seconds of idle CPU measured once views are held")
    parser.add_argument("--no-training-daemon", action="store_true", help="skip the training daemon's memory")
    args = parser.parse_args()
    print_header("bench_membership: full view of N relay daemons, idle daemon memory",
                 "relay nodes (train.enabled = false), node 0 is everyone's bootstrap; all started at once")
    results: dict[int, list[dict[str, Any]]] = {}
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        for rep in range(args.reps):
            r = measure_swarm_retrying(n, args.timeout, max_connections=args.max_connections,
                                       idle_window=args.idle_window)
            results.setdefault(n, []).append(r)
            if r["view_s"] is None:
                print(f"N={n:3d} rep {rep}: all up after {r['up_s']:.1f} s; views of {r['target']} NOT held within "
                      f"{args.timeout:g} s ({r['missing']} connections missing); {r['load']}")
                continue
            cpu = (f"idle CPU per daemon median {median(r['cpu']):.2f}%, worst {max(r['cpu']):.2f}% of a core; "
                   if r["cpu"] else "")
            print(f"N={n:3d} rep {rep}: all answer /healthz {r['up_s']:5.1f} s after the first start; views of "
                  f"{r['target']} held {r['view_s']:5.1f} s after that ({r['view_from_start_s']:5.1f} s from start; "
                  f"{r['missing_at_up']} connections missing when all were up); overlay "
                  f"{'connected' if r['connected'] else 'NOT CONNECTED'}, {r['held']}/{n} hold their view after the "
                  f"idle window; {cpu}relay daemon RSS median {median(r['rss']) / MIB:.0f} MiB, PSS "
                  f"{median(r['pss']) / MIB:.0f} MiB; {r['load']}")
    if not args.no_training_daemon:
        print_training_daemon(args.settle)
    print_verdicts(results)


def print_training_daemon(settle: float) -> None:
    mem = training_daemon_memory(settle)
    print(f"\ntraining daemon (digits-mlp, alone, {settle:g} s after start; {mem['load']}):")
    total_rss = total_pss = 0
    for name, pid, rss, pss in mem["rows"]:
        total_rss += rss
        total_pss += pss
        print(f"   {name:<32s} pid {pid:>7d}: RSS {rss / MIB:6.0f} MiB, PSS {pss / MIB:6.0f} MiB")
    print(f"   total: RSS {total_rss / MIB:.0f} MiB (shared pages counted twice), PSS {total_pss / MIB:.0f} MiB")


def print_verdicts(results: dict[int, list[dict[str, Any]]]) -> None:
    print("\n## verdicts")
    for n, runs in sorted(results.items()):
        if n < 64:
            continue
        limit = 60.0 if n <= 64 else 120.0
        times = [r["view_s"] for r in runs]
        held = all(t is not None and t <= limit for t in times)
        measured = [r for r in runs if r["view_s"] is not None]  # idle CPU is read once views are held

        def verdict(ok: bool) -> str:
            return ("MET" if ok else "MISSED") if measured else "not measured (views never held)"
        cpu_ok = all(r.get("cpu") and median(r["cpu"]) <= 1.0 for r in measured)
        connected = all(r.get("connected") for r in measured)
        print(f"   N={n}: views held within {limit:g} s of all up: {'MET' if held else 'MISSED'}; overlay connected: "
              f"{verdict(connected)}; median idle CPU <= 1% of a core: {verdict(cpu_ok)}")
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
