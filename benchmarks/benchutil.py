"""Shared helpers of the benchmarks: /proc readings, swarms of real daemons, printing.

Nothing here imports torch: the membership benchmark stays light.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from peerfed.localswarm import LocalNode, LocalSwarm

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1 << 20
NEVER = 1e9  # seconds: an exchange.interval / eval_interval that never comes round in a run

# Settings that keep a training node quiet: no gossip of its own (exchange.interval counts
# from a random point within one interval, so 1000 s could still fire within a long run),
# no evaluation, no periodic checkpoint, no state sync at start.
QUIET_TRAINING: dict[str, Any] = {
    "exchange.interval": NEVER,
    "train.eval_interval": NEVER,
    "checkpoint.interval": NEVER,
    "checkpoint.keep": 1,
    "train.init": "local",
    "log_level": "warning",
}


# ------------------------------------------------------------------ machine and /proc


def machine_line() -> str:
    cpu = platform.processor() or "unknown cpu"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = proc_meminfo().get("MemTotal", 0) / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, no GPU used, Python {platform.python_version()}"


def load_avg() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def proc_meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes."""
    out: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


def proc_status(pid: int) -> dict[str, int]:
    """The Vm*/Rss* lines of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith(("Vm", "Rss")):
                out[key] = int(rest.split()[0]) * 1024
    return out


def proc_pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split between their users)."""
    with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0), so VmHWM is the peak from now on."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def cpu_seconds(pid: int) -> float:
    """utime + stime of all threads of a process."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as f:
                out += [int(c) for c in f.read().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants."""
    out = [pid]
    for child in child_pids(pid):
        out += process_tree(child)
    return out


def to_background(pid: int, cpus: set[int]) -> int:
    """Make a process and its descendants yield the machine to everything else: every thread
    pinned to ``cpus`` and at nice 19, and their scheduler autogroups at nice 19 (raising a
    nice value needs no privilege; threads and children started later inherit both).
    Returns how many threads were changed."""
    changed = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/autogroup", "w", encoding="ascii") as f:
            f.write("19")
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)
                    os.setpriority(os.PRIO_PROCESS, int(tid), 19)
                    changed += 1
    return changed


def autogroup(pid: int) -> str:
    """The scheduler autogroup a process is in ("/autogroup-N nice K"), or "-" without one."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/autogroup", encoding="ascii") as f:
        return f.read().strip()
    return "-"


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    return "?"


def trainer_pid(daemon_pid: int) -> int | None:
    """The trainer child of a daemon (the multiprocessing spawn child that is not the
    resource tracker)."""
    for pid in child_pids(daemon_pid):
        line = cmdline(pid)
        if "spawn_main" in line or "multiprocessing.spawn" in line:
            return pid
    return None


# ------------------------------------------------------------------ statistics and text


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def print_header(title: str, note: str = "") -> None:
    print(f"# {title}")
    print(f"# machine: {machine_line()}; {load_avg()} at start")
    if note:
        for line in note.strip().splitlines():
            print(f"# {line}")


# ------------------------------------------------------------------ swarms


def api_post(node: LocalNode, path: str, timeout: float = 600.0) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:{node.api_port}{path}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def exchange_now(node: LocalNode, peer_id: str | None = None, timeout: float = 600.0) -> tuple[dict[str, Any], float]:
    """POST /exchange on ``node``'s local API; returns its answer and the time seen from outside."""
    query = f"?peer={peer_id}" if peer_id else ""
    started = time.perf_counter()
    answer = api_post(node, f"/exchange{query}", timeout)
    return answer, time.perf_counter() - started


def wait_exchange_ready(node: LocalNode, peer_id: str, timeout: float = 120.0) -> None:
    """Until ``node`` lists ``peer_id`` as an exchange candidate (membership carries the model
    fingerprint and exchange URL); probes with /peers, never with an exchange."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            for row in node.get("/peers"):
                if row.get("peer_id") == peer_id and row.get("state") == "connected" and row.get("exchange_url"):
                    return
        time.sleep(0.3)
    raise TimeoutError(f"node {node.index} does not see {peer_id} as an exchange peer:\n{node.log_tail()}")


def task_env() -> dict[str, str]:
    """Daemons can import the benchmark tasks (``synthetic:...``)."""
    path = str(BENCH_DIR)
    old = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{path}{os.pathsep}{old}" if old else path}


def start_nodes(swarm: LocalSwarm, nodes: Sequence[LocalNode] | None = None, timeout: float = 300.0) -> None:
    nodes = list(nodes if nodes is not None else swarm.nodes)
    for node in nodes:
        node.start(env=task_env())
    for node in nodes:
        node.wait_up(timeout)


@contextlib.contextmanager
def local_swarm(prefix: str, network: str = "bench") -> Iterator[LocalSwarm]:
    """A swarm in a temporary folder: stopped (SIGTERM, so trainers release their shared
    memory), then killed if needed, then the folder is removed."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        swarm = LocalSwarm(Path(tmp), network=network)
        try:
            yield swarm
        finally:
            with contextlib.suppress(Exception):
                swarm.stop_all()
            swarm.kill_all()


def settings_for(base: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    out = dict(QUIET_TRAINING)
    out.update(base)
    out.update(extra)
    return out
