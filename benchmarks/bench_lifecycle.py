"""How fast a node starts and stops, as an operator sees it (issue 14).

For each run: a fresh node (digits-mlp, no peers), `peerfed run` as a separate process;
we time the moment its local API answers `/healthz`, then send SIGTERM and time the exit
(and its code). Then, for each kind of listen port (p2p, exchange, local API), the port is
taken by a plain socket before `peerfed run`, and we time the exit (which must be code 5,
"address in use"). Targets (median of --runs on an idle machine): /healthz <= 5 s, taken
port -> exit 5 <= 3 s, SIGTERM -> exit 0 <= 3 s.

    python benchmarks/bench_lifecycle.py [--runs 10] [--task digits-mlp]
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import time
from collections.abc import Callable

from benchutil import load_avg, local_swarm, median, print_header

from peerfed.localswarm import LocalNode, LocalSwarm

SETTINGS = {"train.init": "local", "log_level": "info", "checkpoint.interval": 1e9, "train.eval_interval": 5.0}
PORTS: dict[str, Callable[[LocalNode], int]] = {
    "p2p": lambda n: n.p2p_port,
    "exchange": lambda n: n.exchange_port,
    "api": lambda n: n.api_port,
}


def wait_for(predicate: Callable[[], bool], node: LocalNode, timeout: float) -> float:
    """Seconds until ``predicate`` holds (polling every 20 ms); raises if the node exits first."""
    started = time.perf_counter()
    while not predicate():
        assert node.process is not None
        if node.process.poll() is not None:
            raise RuntimeError(f"node exited with {node.process.returncode}:\n{node.log_tail()}")
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"not within {timeout} s:\n{node.log_tail()}")
        time.sleep(0.02)
    return time.perf_counter() - started


def one_start_stop(swarm: LocalSwarm, task: str) -> tuple[float, float, int]:
    node = swarm.add_node(bootstrap=[], settings={**SETTINGS, "train.task": task})
    started = time.perf_counter()
    node.start()
    wait_for(node.is_up, node, 120.0)
    healthz = time.perf_counter() - started
    time.sleep(2.0)  # let it settle into training
    assert node.process is not None
    term = time.perf_counter()
    node.process.send_signal(signal.SIGTERM)
    try:
        code = node.process.wait(60)
    except subprocess.TimeoutExpired:
        node.kill()
        code = -9
    return healthz, time.perf_counter() - term, code


def one_taken_port(swarm: LocalSwarm, task: str, kind: str) -> tuple[float, int]:
    node = swarm.add_node(bootstrap=[], settings={**SETTINGS, "train.task": task})
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        blocker.bind(("127.0.0.1", PORTS[kind](node)))
        blocker.listen()
        started = time.perf_counter()
        node.start()
        assert node.process is not None
        try:
            code = node.process.wait(120)
        except subprocess.TimeoutExpired:
            node.kill()
            code = -9
        return time.perf_counter() - started, code
    finally:
        blocker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--task", default="digits-mlp")
    args = parser.parse_args()
    print_header("bench_lifecycle: start to /healthz, SIGTERM to exit, taken port to exit 5",
                 f"task {args.task}; {args.runs} runs each; a fresh node with no peers per run")
    ups, stops, codes = [], [], []
    taken: dict[str, list[tuple[float, int]]] = {kind: [] for kind in PORTS}
    with local_swarm("bench-lifecycle-") as swarm:
        for _ in range(args.runs):
            up, stop, code = one_start_stop(swarm, args.task)
            ups.append(up)
            stops.append(stop)
            codes.append(code)
            for kind in PORTS:
                taken[kind].append(one_taken_port(swarm, args.task, kind))
    print(f"start -> /healthz: median {median(ups):.2f} s (runs {', '.join(f'{v:.2f}' for v in ups)})  target <= 5 s")
    print(f"SIGTERM -> exit:   median {median(stops):.2f} s (runs {', '.join(f'{v:.2f}' for v in stops)}); "
          f"exit codes {sorted(set(codes))}  target <= 3 s, exit 0")
    for kind, rows in taken.items():
        times = [t for t, _ in rows]
        print(f"{kind + ' port taken':18} median {median(times):.2f} s to exit (runs "
              f"{', '.join(f'{t:.2f}' for t in times)}); exit codes {sorted({c for _, c in rows})}  target <= 3 s, exit 5")
    print(f"# {load_avg()} at end")


if __name__ == "__main__":
    main()
