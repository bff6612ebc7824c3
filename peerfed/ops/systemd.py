"""sd_notify in pure Python, plus the watchdog decision the daemon makes before pinging.

Protocol (sd_notify(3)): newline-separated KEY=VALUE fields in one datagram sent to the
AF_UNIX socket named by $NOTIFY_SOCKET; a leading "@" names an abstract socket. Nothing here
raises on a failed send: a service manager that went away must not take the daemon with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("peerfed.ops.systemd")

__all__ = ["Notifier", "WatchdogGate", "keep_service_manager_informed", "watchdog_timeout", "watchdog_interval"]


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # vsock ("vsock:...") and relative paths are not supported


class Notifier:
    """Sends state changes to the service manager; every method is a no-op when not under
    systemd (no NOTIFY_SOCKET). Returns True when a datagram was sent."""

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self._error_logged = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        address = _socket_address(value) if value else None
        if value and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @abstract name; not notifying", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"]
        if status is not None:
            fields.append(_status_field(status))
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        return self.notify(_status_field(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        # Type=notify-reload (systemd >= 253) needs MONOTONIC_USEC to match the reload to
        # the later READY=1; plain Type=notify ignores the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (slow torch/CUDA initialisation)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def notify(self, *fields: str) -> bool:
        if self._address is None:
            return False
        data = "\n".join(fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self._address)
        except OSError as exc:
            # Logged once: a missing manager would otherwise flood the log every ping.
            level = logging.DEBUG if self._error_logged else logging.WARNING
            log.log(level, "sd_notify to %r failed: %s", self._address, exc)
            self._error_logged = True
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_field(text: str) -> str:
    # A newline would end the field and start a bogus one.
    return "STATUS=" + " ".join(text.splitlines())


def watchdog_timeout(environ: Mapping[str, str] | None = None) -> float | None:
    """WatchdogSec= in seconds, or None when the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    try:
        usec = int(usec_text)
        if pid_text and int(pid_text) != os.getpid():
            return None  # a child that inherited the parent's environment
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec_text, pid_text)
        return None
    return usec / 1_000_000 if usec > 0 else None


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """How often to send WATCHDOG=1: half of WatchdogSec=, as sd_watchdog_enabled(3) advises."""
    timeout = watchdog_timeout(environ)
    return None if timeout is None else timeout / 2


class WatchdogGate:
    """Decides when a WATCHDOG=1 is deserved: at most once per `interval` and only if both the
    event loop and the trainer made progress since the last ping. A hung trainer or a stuck
    loop then stops the pings, and systemd restarts the service. Time is passed in.

    Progress means the counter changed: a trainer restarted from a checkpoint reports a lower
    step count and is still alive. Feed a counter that also moves while the trainer starts up
    (a heartbeat), or a slow CUDA start will look like a hang."""

    def __init__(self, interval: float, *, loop_progress: int = 0, trainer_progress: int = 0) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.interval = interval
        self._last_ping = -math.inf
        self._loop = loop_progress
        self._trainer = trainer_progress
        self._pings = 0
        self._withheld = 0

    def should_ping(self, now: float, loop_progress: int, trainer_progress: int) -> bool:
        if now - self._last_ping < self.interval:
            return False
        if loop_progress == self._loop or trainer_progress == self._trainer:
            self._withheld += 1
            return False
        self._last_ping = now
        self._loop = loop_progress
        self._trainer = trainer_progress
        self._pings += 1
        return True

    def statistics(self) -> dict[str, int]:
        return {"pings": self._pings, "withheld": self._withheld}


async def keep_service_manager_informed(notifier: Notifier, status_line: Callable[[], str],
                                        trainer_progress: Callable[[], int | None]) -> None:
    """STATUS= every few seconds; WATCHDOG=1 only while the event loop and the trainer progress.

    ``trainer_progress`` is the trainer's heartbeat, or None while there is none to ask for
    (a relay node, or a trainer waiting for its state sync): then the loop's alone counts."""
    interval = watchdog_interval()
    gate = WatchdogGate(interval) if interval else None
    last_status = 0.0
    loop_ticks = 0
    while True:
        await asyncio.sleep(min(interval or 5.0, 1.0))
        loop_ticks += 1  # this line running at all is the event loop's progress
        now = time.monotonic()
        if gate is not None:
            progress = trainer_progress()
            if gate.should_ping(now, loop_ticks, loop_ticks if progress is None else progress):
                notifier.watchdog()
        if now - last_status >= 5.0:
            notifier.status(status_line())
            last_status = now
