"""Bulk work in transit yields to the trainer: per-thread nice values (ops/priority.py).

The workers that copy and hash weights run BULK_NICE_STEP nicer than the thread that made
them; lowering one thread's priority leaves the others (event loop, trainer) as they were.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest

from peerfed.net import transfer
from peerfed.ops.priority import BULK_NICE_STEP, lower_thread_priority

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux")


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
