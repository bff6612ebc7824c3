"""Logging for a daemon that usually runs under systemd.

When stderr is the journal (JOURNAL_STREAM matches it), each line is `<N>name: message` with a
syslog priority prefix and no timestamp: journald adds the time and turns <N> into the
entry's priority, so `journalctl -p warning -u peerfed` works. Otherwise lines are readable
with a timestamp. Our loggers live under "peerfed."; third-party libraries (libp2p, aiohttp)
are shown from WARNING up, or from the chosen level if it is higher.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

__all__ = ["setup_logging", "set_level", "parse_level", "JournalFormatter", "LEVELS"]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

READABLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_HANDLER_MARK = "_peerfed_handler"


def parse_level(level: str) -> int:
    try:
        return LEVELS[level.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r} (use one of {', '.join(LEVELS)})") from None


def _syslog_priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalFormatter(logging.Formatter):
    """`<N>name: message`; every line of a multi-line record (tracebacks) gets the prefix,
    because journald makes one entry per line and would log the rest at the default level."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stream_is_journal(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """True when systemd connected `stream` to the journal. JOURNAL_STREAM is "<dev>:<inode>"
    of that connection; comparing it with the stream's fd catches children whose stderr was
    redirected elsewhere but who inherited the variable. A stream without an fd (tests,
    wrappers) trusts the variable."""
    env = os.environ if environ is None else environ
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return True
    try:
        st = os.fstat(fd)
        dev, ino = value.split(":", 1)
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(level: str, *, stream: TextIO | None = None) -> logging.Handler:
    """Installs one handler on the root logger (replacing the one a previous call installed)
    and sets levels. Returns the handler."""
    out = sys.stderr if stream is None else stream
    levelno = parse_level(level)
    handler = logging.StreamHandler(out)
    if stream_is_journal(out):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(READABLE_FORMAT))
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    _apply_level(levelno)
    logging.captureWarnings(True)  # warnings.warn (torch deprecations) go to the same place
    return handler


def set_level(level: str) -> None:
    """Changes the level at runtime (config reload on SIGHUP)."""
    _apply_level(parse_level(level))


def _apply_level(levelno: int) -> None:
    logging.getLogger("peerfed").setLevel(levelno)
    # Records from "peerfed.*" reach the root handler whatever the root level is; the root
    # level only filters other libraries, whose debug output would drown ours.
    logging.getLogger().setLevel(max(levelno, logging.WARNING))
