"""Journal-friendly and readable log formats, levels, idempotent setup."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import libp2p  # noqa: F401  (importing it cuts its logger off; setup_logging must undo that)

from peerfed.ops.logs import set_level, setup_logging


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    peerfed = logging.getLogger("peerfed")
    saved = (list(root.handlers), root.level, peerfed.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    peerfed.setLevel(saved[2])
    logging.captureWarnings(False)


def test_journal_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    setup_logging("debug", stream=out)
    log = logging.getLogger("peerfed.x")
    log.info("hello")
    log.debug("details")
    log.warning("careful")
    log.error("broken")
    log.critical("dying")
    assert out.getvalue().splitlines() == [
        "<6>peerfed.x: hello",
        "<7>peerfed.x: details",
        "<4>peerfed.x: careful",
        "<3>peerfed.x: broken",
        "<2>peerfed.x: dying",
    ]


def test_journal_prefixes_every_line_of_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    setup_logging("info", stream=out)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("peerfed.x").exception("trainer died")
    lines = out.getvalue().splitlines()
    assert lines[0] == "<3>peerfed.x: trainer died"
    assert len(lines) > 2
    assert all(line.startswith("<3>") for line in lines)
    assert lines[-1] == "<3>RuntimeError: boom"


def test_journal_stream_must_match_the_real_fd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(tmp_path / "stderr.log", "w") as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup_logging("info", stream=f)
        logging.getLogger("peerfed.x").info("to the journal")
        # A child whose stderr was redirected keeps the variable but is not the journal.
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")
        setup_logging("info", stream=f)
        logging.getLogger("peerfed.x").info("to a file")
    first, second = (tmp_path / "stderr.log").read_text().splitlines()
    assert first == "<6>peerfed.x: to the journal"
    assert not second.startswith("<")
    assert second.endswith("INFO    peerfed.x: to a file")


def test_readable_format_without_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    out = io.StringIO()
    setup_logging("info", stream=out)
    logging.getLogger("peerfed.x").warning("hello")
    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING peerfed\.x: hello", line
    ), line


def test_setup_twice_keeps_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    first, second = io.StringIO(), io.StringIO()
    before = len(logging.getLogger().handlers)
    setup_logging("info", stream=first)
    setup_logging("info", stream=second)
    assert len(logging.getLogger().handlers) == before + 1
    logging.getLogger("peerfed.x").info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_set_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    setup_logging("warning", stream=out)
    log = logging.getLogger("peerfed.x")
    log.info("hidden")
    set_level("debug")
    log.debug("shown")
    set_level("ERROR")
    log.warning("hidden again")
    assert out.getvalue().splitlines() == ["<7>peerfed.x: shown"]
    with pytest.raises(ValueError):
        set_level("verbose")


def test_other_libraries_only_from_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    out = io.StringIO()
    setup_logging("debug", stream=out)
    logging.getLogger("libp2p.network").debug("chatter")
    logging.getLogger("aiohttp.access").info("GET /")
    logging.getLogger("libp2p.network").warning("dial failed")
    assert out.getvalue().splitlines() == ["<4>libp2p.network: dial failed"]
