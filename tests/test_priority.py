"""The daemon's own work yields to the trainer: per-thread nice values (ops/priority.py).

A real daemon: its event loop runs DAEMON_NICE_STEP nicer than it started, its trainer keeps
the starting priority, also after a crash and restart, and the workers that copy and hash
weights in transit run BULK_NICE_STEP nicer than the thread that made them.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest
from swarmtools import trainer_pid, wait_until

from peerfed.localswarm import LocalSwarm
from peerfed.net import transfer
from peerfed.ops.priority import BULK_NICE_STEP, DAEMON_NICE_STEP, lower_thread_priority

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")


def nice_of(pid: int, tid: int | None = None) -> int:
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    text = Path(path).read_text()
    return int(text[text.rindex(")") + 2:].split()[16])  # field 19 of proc(5)


def test_lower_thread_priority_changes_only_the_calling_thread() -> None:
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(lower_thread_priority(3)))
    thread.start()
    thread.join()
    assert seen == [min(19, before + 3)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this thread kept its own


def test_bulk_workers_run_nicer_than_their_creator() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, 0)

    def own_nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    for pool in (transfer._send_pool, transfer._recv_pool):
        assert pool.submit(own_nice).result() == min(19, mine + BULK_NICE_STEP)


def test_daemon_yields_to_its_trainer_also_after_a_restart(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)  # the daemon inherits ours
    with LocalSwarm(tmp_path, network="prio") as swarm:
        node = swarm.add_node(settings={"train.init": "local", "train.threads": 1})
        node.start()
        node.wait_up(timeout=120)
        daemon = node.process.pid  # type: ignore[union-attr]
        first = trainer_pid(daemon)
        assert nice_of(daemon, daemon) == min(19, base + DAEMON_NICE_STEP)  # the event loop
        assert nice_of(first) == base

        os.kill(first, signal.SIGKILL)
        found: list[int] = []

        def restarted() -> bool:
            try:
                pid = trainer_pid(daemon, timeout=1.0)
            except AssertionError:  # no trainer at this moment: still restarting
                return False
            found.append(pid)
            return pid != first

        wait_until(restarted, 60, "the trainer to be restarted")
        assert nice_of(found[-1]) == base
