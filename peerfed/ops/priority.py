"""CPU priority: training is what a node is for, so the daemon's own work yields to it.

On a machine with no idle core, an exchange then takes a little longer instead of slowing the
trainer down (Syncthing lowers its own priority the same way). Linux keeps a nice value per
thread, a new thread starts with its creator's, and raising one's own needs no privilege.
"""

from __future__ import annotations

import os
import threading

DAEMON_NICE_STEP = 10  # the daemon's threads: event loop, control plane, merges
BULK_NICE_STEP = 5  # on top of that: the workers that copy and hash weights in transit


def lower_thread_priority(step: int) -> int | None:
    """Add ``step`` to the calling thread's nice value (at most 19); the new value, or None
    where the platform has no per-thread priority."""
    try:
        tid = threading.get_native_id()
        nice = min(19, os.getpriority(os.PRIO_PROCESS, tid) + step)
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return nice
    except (OSError, AttributeError):
        return None
