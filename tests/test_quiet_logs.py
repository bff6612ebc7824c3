"""net/quiet.py: what a remote sends wrong is counted and logged once a minute per sender, in
one line, with bounded memory; aiohttp's and py-libp2p's records go through the same limits."""

from __future__ import annotations

import logging

import pytest
from aiohttp import ClientConnectionResetError
from aiohttp.http_exceptions import BadStatusLine, LineTooLong

from peerfed.net.quiet import (
    BAD_HTTP,
    HttpServerLog,
    LogLimiter,
    OneLineRelay,
    QuietLog,
    describe,
    one_line,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_period_and_the_next_says_how_many_were_left_out() -> None:
    clock = Clock()
    limiter = LogLimiter(period=60.0, clock=clock)
    assert limiter.allow("a") == 0
    assert [limiter.allow("a") for _ in range(5)] == [None] * 5
    assert limiter.allow("b") == 0  # another sender has its own line
    clock.now += 59.0
    assert limiter.allow("a") is None
    clock.now += 1.0
    assert limiter.allow("a") == 6


def test_the_limiter_tracks_a_bounded_number_of_keys_and_lines() -> None:
    clock = Clock()
    limiter = LogLimiter(period=60.0, max_keys=100, max_lines=30, clock=clock)
    allowed = [limiter.allow(f"10.0.{i // 256}.{i % 256}") for i in range(10_000)]
    assert sum(a is not None for a in allowed) == 30  # lines in one period, however many senders
    assert limiter.tracked() <= 100
    clock.now += 60.0
    allowed = [limiter.allow(f"10.1.{i // 256}.{i % 256}") for i in range(10_000)]
    assert sum(a is not None for a in allowed) == 30 and limiter.tracked() == 60
    roomy = LogLimiter(period=60.0, max_keys=100, max_lines=100_000, clock=clock)
    assert all(roomy.allow(f"key {i}") == 0 for i in range(10_000))
    assert roomy.tracked() == 100  # the least recently logged keys are forgotten


def test_remote_text_stays_on_one_short_line() -> None:
    forged = "bad\r\n2026-01-01 ERROR peerfed.daemon: forged line\x1b[31m" + "x" * 500
    text = one_line(forged)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert len(text) <= 200 and text.startswith("bad 2026-01-01 ERROR")
    assert describe(TimeoutError()) == "timed out" and describe(KeyError()) == "KeyError"
    assert describe(OSError("disk full")) == "disk full"


def test_quiet_log_writes_one_warning_per_sender_and_the_rest_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    quiet = QuietLog(logging.getLogger("peerfed.test.quiet"), LogLimiter(clock=clock))
    with caplog.at_level(logging.DEBUG, logger="peerfed.test.quiet"):
        for _ in range(50):
            quiet.warning("peer X", "peer list from %s rejected: %s", "X", "malformed")
        clock.now += 61.0
        quiet.warning("peer X", "peer list from %s rejected: %s", "X", "malformed")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["peer list from X rejected: malformed",
                        "peer list from X rejected: malformed (49 more like it from there since)"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 49


def test_aiohttp_bad_requests_are_counted_and_one_warning_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    rejected: list[str] = []
    server_log = HttpServerLog(QuietLog(logging.getLogger("peerfed.test.http"), LogLimiter()), rejected.append)
    with caplog.at_level(logging.DEBUG, logger="peerfed.test.http"):
        for i in range(100):  # what aiohttp's RequestHandler.handle_error calls
            exc = BadStatusLine("GARBAGE\n\n   ^") if i % 2 else LineTooLong("header", "8190", "20000")
            server_log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
        server_log.debug("Error handling request from %s", "127.0.0.2", exc_info=BadStatusLine("\x16\x03"))
    assert rejected == [BAD_HTTP] * 101
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]  # one per address
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in warnings)
    assert "127.0.0.1" in warnings[0].getMessage() and "127.0.0.2" in warnings[1].getMessage()


def test_a_bug_in_our_handler_keeps_its_traceback_once_a_period(caplog: pytest.LogCaptureFixture) -> None:
    rejected: list[str] = []
    server_log = HttpServerLog(QuietLog(logging.getLogger("peerfed.test.http2"), LogLimiter()), rejected.append)
    with caplog.at_level(logging.DEBUG, logger="peerfed.test.http2"):
        for _ in range(10):
            try:
                {}["missing"]  # noqa: B018 - a bug in a handler
            except KeyError as exc:
                server_log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None and not rejected


def test_a_library_traceback_becomes_one_line_limited_per_place(caplog: pytest.LogCaptureFixture) -> None:
    library = logging.getLogger("fakelib")
    library.propagate = False
    relay = OneLineRelay()
    library.addHandler(relay)
    try:
        with caplog.at_level(logging.WARNING):
            for i in range(20):
                try:
                    raise ValueError(f"bad frame\nfrom peer {i}")
                except ValueError:
                    library.exception("yamux: failed to read from %s", f"peer{i}")
    finally:
        library.removeHandler(relay)
    lines = [r for r in caplog.records if r.name == "fakelib"]
    assert len(lines) == 1
    assert lines[0].exc_info is None and lines[0].levelno == logging.ERROR
    assert lines[0].getMessage() == "yamux: failed to read from peer0 (ValueError: bad frame from peer 0)"


def test_a_clients_undecodable_header_or_hang_up_is_not_logged_as_our_bug(caplog: pytest.LogCaptureFixture) -> None:
    """Found by test_hostile_input.py: ``Expect: <not UTF-8>`` made aiohttp's default expect
    handler raise UnicodeEncodeError, and a client that hung up before its 100 Continue made
    it raise ClientConnectionResetError; both were ERROR tracebacks."""
    rejected: list[str] = []
    server_log = HttpServerLog(QuietLog(logging.getLogger("peerfed.test.http3"), LogLimiter()), rejected.append)
    with caplog.at_level(logging.DEBUG, logger="peerfed.test.http3"):
        for _ in range(10):
            try:
                "Unknown Expect: \udc9c".encode()
            except UnicodeEncodeError as exc:
                server_log.exception("Error handling request from %s", "127.0.0.1", exc_info=exc)
            gone = ClientConnectionResetError("Cannot write to closing transport")
            server_log.exception("Error handling request from %s", "127.0.0.1", exc_info=gone)
    assert rejected == [BAD_HTTP] * 10  # the undecodable header counts as a malformed request
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelno for r in loud] == [logging.WARNING] and loud[0].exc_info is None, loud
