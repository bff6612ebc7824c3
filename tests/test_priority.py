"""Moving weights yields to the trainer: per-thread nice values (net/priority.py).

The data plane (exchange loop, and the copy/hash workers it starts) runs DATA_PLANE_NICE_STEP
nicer than the daemon; the main loop (control plane, API, watchdog) and the trainer keep the
daemon's priority.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from swarmtools import trainer_pid

from peerfed.localswarm import LocalSwarm
from peerfed.net.dataplane import DataPlane
from peerfed.net.priority import DATA_PLANE_NICE_STEP, lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def nice_of(pid: int, tid: int) -> int:
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[16])  # field 19 of proc(5)


def test_lower_thread_priority_changes_only_the_calling_thread() -> None:
    before = own_nice()
    seen: list[int | None] = []
    thread = threading.Thread(target=lambda: seen.append(lower_thread_priority(3)))
    thread.start()
    thread.join()
    assert seen == [min(19, before + 3)]
    assert own_nice() == before  # this thread kept its own


def test_data_plane_loop_and_the_workers_it_starts_run_nicer() -> None:
    mine = own_nice()

    async def on_the_plane() -> tuple[int, int, int]:
        with ThreadPoolExecutor(max_workers=1) as pool:  # like transfer.py's workers
            worker = pool.submit(own_nice).result()
        return own_nice(), worker, await asyncio.to_thread(own_nice)

    async def main() -> tuple[int, int, int]:
        plane = DataPlane(exchange=None)  # type: ignore[arg-type]  # only its thread is used
        try:
            return await plane._on_plane(on_the_plane())
        finally:
            plane._loop.call_soon_threadsafe(plane._loop.stop)
            plane._thread.join(5)

    expected = min(19, mine + DATA_PLANE_NICE_STEP)
    assert asyncio.run(main()) == (expected, expected, expected)
    assert own_nice() == mine


def test_a_daemon_keeps_its_main_loop_and_trainer_at_its_own_priority(tmp_path: Path) -> None:
    base = own_nice()  # the daemon inherits ours
    with LocalSwarm(tmp_path, network="prio") as swarm:
        node = swarm.add_node(settings={"train.init": "local", "train.threads": 1})
        node.start()
        node.wait_up(timeout=120)
        daemon = node.process.pid  # type: ignore[union-attr]
        nices = {int(tid): nice_of(daemon, int(tid)) for tid in os.listdir(f"/proc/{daemon}/task")}
        assert nices[daemon] == base  # the main thread runs the main event loop
        assert min(19, base + DATA_PLANE_NICE_STEP) in nices.values()  # the data-plane thread
        trainer = trainer_pid(daemon)
        assert nice_of(trainer, trainer) == base
