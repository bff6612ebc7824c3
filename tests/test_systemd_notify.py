"""sd_notify over real AF_UNIX datagram sockets, watchdog settings, and the ping gate."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerfed.ops.systemd import Notifier, WatchdogGate, watchdog_interval, watchdog_timeout


def _receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    yield str(path), sock
    sock.close()


@pytest.fixture
def abstract_socket() -> Iterator[tuple[str, socket.socket]]:
    name = f"peerfed-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    yield "@" + name, sock
    sock.close()


def test_messages_arrive_on_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready()
    assert _receive(sock) == "READY=1"
    assert notifier.ready(status="listening on 7401")
    assert _receive(sock) == "READY=1\nSTATUS=listening on 7401"
    assert notifier.status("3 peers\nstep 120")
    assert _receive(sock) == "STATUS=3 peers step 120"  # a newline would start a bogus field
    assert notifier.watchdog()
    assert _receive(sock) == "WATCHDOG=1"
    assert notifier.stopping()
    assert _receive(sock) == "STOPPING=1"
    assert notifier.extend_timeout(2.5)
    assert _receive(sock) == "EXTEND_TIMEOUT_USEC=2500000"
    notifier.close()


def test_reloading_carries_current_monotonic_time(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _receive(sock).split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket(abstract_socket: tuple[str, socket.socket]) -> None:
    address, sock = abstract_socket
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    assert notifier.ready(status="up")
    assert _receive(sock) == "READY=1\nSTATUS=up"


def test_from_env_reads_os_environ(
    path_socket: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = path_socket
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier.from_env().watchdog()
    assert _receive(sock) == "WATCHDOG=1"


def test_noop_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.stopping() is False
    assert notifier.reloading() is False


def test_unsupported_address_is_a_noop() -> None:
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_send_errors_are_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="peerfed.ops.systemd"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    failures = [r for r in caplog.records if "sd_notify" in r.getMessage()]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


def test_watchdog_settings() -> None:
    assert watchdog_timeout({}) is None
    assert watchdog_interval({}) is None
    env = {"WATCHDOG_USEC": "60000000"}
    assert watchdog_timeout(env) == 60.0
    assert watchdog_interval(env) == 30.0
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 30.0
    # Set for another process (our parent): not ours to honour.
    assert watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_gate_pings_only_when_both_sides_progress() -> None:
    gate = WatchdogGate(30.0)
    assert gate.should_ping(0.0, loop_progress=1, trainer_progress=1)
    # Too soon, even with progress.
    assert not gate.should_ping(10.0, loop_progress=2, trainer_progress=2)
    # Trainer stuck.
    assert not gate.should_ping(31.0, loop_progress=3, trainer_progress=1)
    # Loop stuck.
    assert not gate.should_ping(32.0, loop_progress=1, trainer_progress=5)
    assert gate.should_ping(33.0, loop_progress=4, trainer_progress=5)
    # No progress since that ping.
    assert not gate.should_ping(70.0, loop_progress=4, trainer_progress=5)
    assert gate.statistics() == {"pings": 2, "withheld": 3}


def test_gate_counts_progress_from_the_initial_values() -> None:
    gate = WatchdogGate(10.0, loop_progress=5, trainer_progress=7)
    assert not gate.should_ping(0.0, loop_progress=5, trainer_progress=7)
    assert gate.should_ping(0.5, loop_progress=6, trainer_progress=8)


def test_gate_treats_a_restarted_trainer_counter_as_progress() -> None:
    gate = WatchdogGate(1.0)
    assert gate.should_ping(0.0, 10, 500)
    assert gate.should_ping(1.0, 11, 3)  # trainer restarted, counts from 0 again


def test_gate_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        WatchdogGate(0.0)
