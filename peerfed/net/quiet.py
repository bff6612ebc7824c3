"""Quiet, bounded logging of what remote clients get wrong.

Anyone who can reach a port can send it garbage, so a log line per bad input would let them
fill the journal. Instead each bad input is counted by reason (the callers' ``on_rejected``
callbacks feed /metrics) and *logged* through a ``LogLimiter``: at most one line per key (a
peer, a remote address) per period, at WARNING, in one line without a traceback; the next
line for that key says how many were left out. The limiter's memory is bounded: it tracks at
most ``max_keys`` keys (the least recently logged are forgotten first) and writes at most
``max_lines`` lines per period in all, however many addresses the garbage comes from.

``HttpServerLog`` stands in for aiohttp's server logger on a server open to the network:
aiohttp logs every malformed request (bad request line, bad header, oversized line) as an
ERROR with a 10-line traceback; here that becomes a counted ``bad_http`` rejection and a
rate-limited WARNING. Anything else aiohttp reports (an exception in our own handler: a bug)
keeps its traceback, at most once per period per exception type. ``OneLineRelay`` passes a
library's records (py-libp2p's, which a remote's garbage can trigger) to our handlers one line
each, at most once per period per line of the library's code.

Owner: none; a limiter is safe from any thread (one lock around a small dict).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import ClientConnectionResetError
from aiohttp.http_exceptions import HttpProcessingError

PERIOD_S = 60.0
MAX_KEYS = 1024
MAX_LINES = 120  # per period, all keys together
LINE_LIMIT = 200  # characters of a remote's text (an exception message) kept in a line
BAD_HTTP = "bad_http"  # the rejection reason of a malformed HTTP request


def one_line(text: object, limit: int = LINE_LIMIT) -> str:
    """``text`` on one line (a remote's bytes can hold newlines: no forged log lines), cut to
    ``limit`` characters, non-printable characters escaped."""
    flat = " ".join(str(text).split())
    flat = flat.encode("unicode_escape").decode("ascii")  # control and non-ASCII characters as \\x.. escapes
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """An exception in a few words: its message, or (when it has none) "timed out" or its type."""
    return one_line(exc) or ("timed out" if isinstance(exc, TimeoutError) else type(exc).__name__)


class LogLimiter:
    """Decides which lines may be written: one per key per ``period``, ``max_lines`` in all."""

    def __init__(self, *, period: float = PERIOD_S, max_keys: int = MAX_KEYS, max_lines: int = MAX_LINES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._period, self._max_keys, self._max_lines = period, max_keys, max_lines
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [when its last line was written, lines left out since]; oldest line first
        self._keys: OrderedDict[str, list[float]] = OrderedDict()
        self._window = (-float("inf"), 0)  # (start of the current period, lines written in it)

    def allow(self, key: str) -> int | None:
        """None: stay quiet (counted); else the number of lines left out for ``key`` before this one."""
        now = self._clock()
        with self._lock:
            seen = self._keys.get(key)
            if seen is not None and now - seen[0] < self._period:
                seen[1] += 1
                return None
            start, written = self._window
            if now - start >= self._period:
                start, written = now, 0
            if written >= self._max_lines:
                if seen is not None:
                    seen[1] += 1
                return None
            self._window = (start, written + 1)
            left_out = int(seen[1]) if seen is not None else 0
            self._keys[key] = [now, 0]
            self._keys.move_to_end(key)
            while len(self._keys) > self._max_keys:
                self._keys.popitem(last=False)
            return left_out

    def tracked(self) -> int:
        """How many keys are remembered now (at most max_keys)."""
        with self._lock:
            return len(self._keys)


class QuietLog:
    """A logger whose lines about remote input go through a LogLimiter (keyed by the remote)."""

    def __init__(self, logger: logging.Logger, limiter: LogLimiter | None = None) -> None:
        self.logger = logger
        self.limiter = limiter or LogLimiter()

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        """``msg % args`` at ``level`` unless ``key`` had its line this period (then at DEBUG)."""
        if not self.logger.isEnabledFor(level):
            return
        left_out = self.limiter.allow(key)
        if left_out is None:
            self.logger.debug(msg, *args)
            return
        if left_out:
            msg, args = msg + " (%d more like it from there since)", (*args, left_out)
        self.logger.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)


class HttpServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server logger (``web.AppRunner(logger=...)``) for a port open to the network.

    aiohttp calls ``exception(...)`` for a request it could not parse (``exc_info`` an
    HttpProcessingError: the client's fault) and for an exception a handler let through (our
    fault); everything else it logs is ``debug``, including a first request whose method is
    not HTTP at all (TLS or random bytes), which is counted and limited like any bad request.
    """

    def __init__(self, quiet: QuietLog, on_rejected: Callable[[str], None] | None = None) -> None:
        super().__init__(quiet.logger, {})
        self._quiet = quiet
        self._on_rejected = on_rejected

    def debug(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._bad_request(args, exc_info)
        else:
            self.logger.debug(msg, *args, exc_info=exc_info, **kwargs)

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(exc, HttpProcessingError) or _undecodable_header(exc):
            self._bad_request(args, exc)
            return
        if isinstance(exc, ClientConnectionResetError):  # the client hung up before our answer (a 100 Continue)
            self.logger.debug(f"{msg}: the client is gone", *args)
            return
        kind = type(exc).__name__ if exc is not None else "error"
        left_out = self._quiet.limiter.allow(f"bug {kind}")
        if left_out is None:
            self.logger.debug("%s (%s again)", msg, kind)
            return
        suffix = f" ({left_out} more like it since)" if left_out else ""
        self.logger.error(f"{msg}{suffix}", *args, exc_info=exc if exc is not None else exc_info, **kwargs)

    def _bad_request(self, args: tuple[object, ...], exc: BaseException) -> None:
        remote = str(args[0]) if args else "?"  # aiohttp passes request.remote
        if self._on_rejected is not None:
            self._on_rejected(BAD_HTTP)
        self._quiet.warning(f"http {remote}", "malformed HTTP request from %s: %s: %s", remote,
                            type(exc).__name__, one_line(getattr(exc, "message", None) or exc))


def _undecodable_header(exc: BaseException | None) -> bool:
    """aiohttp keeps a header's non-UTF-8 bytes as surrogates, and its own handlers choke on
    them (an unknown ``Expect`` is echoed in a 417): the client's bytes, not our bug."""
    return isinstance(exc, UnicodeEncodeError) and "surrogates not allowed" in exc.reason


class OneLineRelay(logging.Handler):
    """Hands a library's records to the root logger's handlers, as propagation would, but on
    one line (a traceback becomes its exception's type and message), at ``max_level`` at
    most, and at most once per period per line of the library's code. Put it on the
    library's top logger, with ``propagate = False``."""

    def __init__(self, limiter: LogLimiter | None = None, max_level: int = logging.CRITICAL) -> None:
        super().__init__()
        self._limiter = limiter or LogLimiter()
        self._max_level = max_level

    def emit(self, record: logging.LogRecord) -> None:
        left_out = self._limiter.allow(f"{record.pathname}:{record.lineno}")
        if left_out is None:
            return
        try:
            text = one_line(record.getMessage(), limit=300)
        except Exception:  # noqa: BLE001 - a record whose arguments do not fit its format
            text = one_line(record.msg, limit=300)
        if record.exc_info and record.exc_info[1] is not None:
            text += f" ({type(record.exc_info[1]).__name__}: {describe(record.exc_info[1])})"
        if left_out:
            text += f" ({left_out} more like it since)"
        record.msg, record.args = text, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > self._max_level:
            record.levelno, record.levelname = self._max_level, logging.getLevelName(self._max_level)
        logging.getLogger().handle(record)
