"""CPU priority: training is what a node is for, so moving weights yields to it.

The data plane (the exchange's event loop and its copy/hash workers, net/dataplane.py) runs
at nice +10: on a machine with no idle core an exchange then takes a little longer instead
of slowing the trainer down. The main event loop - control plane, local API, watchdog - keeps
the daemon's priority: a node must answer its peers promptly however busy its trainer is
(with the main loop at nice +10, a restarted node beside two flat-out trainers on 2 cores did
not rejoin within 60 s). Linux keeps a nice value per thread, a new thread starts with its
creator's, and raising one's own needs no privilege.
"""

from __future__ import annotations

import os
import threading

DATA_PLANE_NICE_STEP = 10  # the data-plane thread; the workers it starts inherit it


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
