"""Acceptance: peerfed as a long-lived service. Real daemons on 127.0.0.1 that really train
(digits-mlp, one thread): sd_notify and the watchdog, crash safety under SIGKILL, stopping in
the middle of an exchange, SIGHUP reload, /metrics, and the stop signals.

The notify socket is a datagram socket of the test's own (what systemd would listen on). A
trainer is "stalled" with SIGSTOP; a daemon "crashes" with SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from peerfed.localswarm import LocalNode, LocalSwarm, set_config_values
from peerfed.train.checkpoint import list_checkpoints, load_checkpoint, load_newest_valid
from peerfed.train.tasks import NodeContext, TrainSettings, digits_mlp

from swarmtools import (
    NO_GOSSIP,
    NotifyListener,
    exchange_until_ok,
    post_exchange,
    process_alive,
    trainer_pid,
    wait_process_group_gone,
    wait_until,
)

TESTS_DIR = Path(__file__).resolve().parent
# init = local: a lone node trains at once instead of looking for a donor for 10 s.
TRAIN = {"train.threads": 1, "train.init": "local", "exchange.interval": NO_GOSSIP}
WATCHDOG_USEC = 2_000_000  # WatchdogSec=2 -> a ping every second
PING_INTERVAL = WATCHDOG_USEC / 2e6
STATUS_RE = re.compile(r"^STATUS=peers (\d+), step (\d+)", re.MULTILINE)
RESUMED_RE = re.compile(r"model ready on \S+: .* resumed from step (\d+)")


@contextlib.contextmanager
def local_swarm(base_dir: Path) -> Iterator[LocalSwarm]:
    """A LocalSwarm whose daemons get SIGTERM at the end (SIGKILL only if that fails): killing
    a whole process group leaks its shared memory in /dev/shm, see
    test_sigkill_of_the_whole_process_group_leaks_no_shared_memory."""
    with LocalSwarm(base_dir) as swarm:
        try:
            yield swarm
        finally:
            swarm.stop_all()


def log_since(node: LocalNode, offset: int) -> str:
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


def log_size(node: LocalNode) -> int:
    return node.log_path.stat().st_size if node.log_path.exists() else 0


def checkpoints_dir(node: LocalNode) -> Path:
    return node.home / "state" / "checkpoints"


def wait_exit(node: LocalNode, timeout: float) -> tuple[int, float]:
    """Wait for the daemon process to exit; (exit code, seconds waited)."""
    assert node.process is not None
    started = time.monotonic()
    try:
        code = node.process.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"node {node.index} still running {timeout} s after the signal:\n"
                             f"{node.log_tail()}") from None
    return code, time.monotonic() - started


def wait_training(node: LocalNode, min_step: int = 1, timeout: float = 30.0) -> dict[str, Any]:
    status: dict[str, Any] = {}

    def stepped() -> bool:
        status.update(node.get("/status"))
        return status.get("step", 0) >= min_step

    wait_until(stepped, timeout, f"node {node.index} to reach step {min_step}")
    return status


# ---------------------------------------------------------------- sd_notify and the watchdog


def probe_api_at_first_ready(listener: NotifyListener, node: LocalNode) -> dict[str, str]:
    """Freeze the daemon (SIGSTOP) the moment its first READY=1 arrives and look whether its
    API listens: the kernel completes a TCP handshake for a listening socket even while the
    process is stopped, so "ok" means the API was up before READY=1 was sent."""
    seen: dict[str, str] = {}

    def on_message(text: str) -> None:
        if "READY=1" not in text.split("\n") or seen or node.process is None:
            return
        os.kill(node.process.pid, signal.SIGSTOP)
        try:
            with socket.create_connection(("127.0.0.1", node.api_port), timeout=2.0):
                seen["connect"] = "ok"
        except OSError as exc:
            seen["connect"] = repr(exc)
        finally:
            seen["log"] = node.log_path.read_text(errors="replace")
            os.kill(node.process.pid, signal.SIGCONT)

    listener.on_message(on_message)
    return seen


def test_notify_ready_after_api_then_watchdog_status_and_stopping(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    with local_swarm(tmp_path / "swarm") as swarm:
        node = swarm.add_node(settings=TRAIN)
        api_at_ready = probe_api_at_first_ready(listener, node)
        try:
            node.start(env={**listener.env, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
            ready_at, ready = listener.wait_for("READY=1", timeout=90)
            assert api_at_ready["connect"] == "ok", f"READY=1 came before the API listened: {api_at_ready}"
            assert f"api http://127.0.0.1:{node.api_port}" in api_at_ready["log"]
            assert node.get("/status")["peer_id"] == node.peer_id
            assert STATUS_RE.search(ready), ready

            # WATCHDOG=1 at the expected pace, STATUS= with peers and a growing step.
            time.sleep(7.0)
            window = (ready_at + 1.0, ready_at + 7.0)
            pings = [t for t, _ in listener.with_field("WATCHDOG=1", since=ready_at)]
            in_window = [t for t in pings if window[0] <= t < window[1]]
            expected = (window[1] - window[0]) / PING_INTERVAL
            assert expected - 2 <= len(in_window) <= expected + 1, f"{len(in_window)} pings in 6 s: {pings}"
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert min(gaps) >= 0.5 * PING_INTERVAL, f"pings too close: {gaps}"
            steps = [int(m.group(2)) for _, text in listener.with_field("STATUS=") for m in [STATUS_RE.search(text)] if m]
            assert len(steps) >= 2 and steps[-1] > steps[0] >= 0, steps

            stop_sent = time.monotonic()
            node.signal(signal.SIGTERM)
            code, took = wait_exit(node, 15)
            assert code == 0, node.log_tail()
            stopping_at, _ = listener.wait_for("STOPPING=1", timeout=1, since=stop_sent)
            late = listener.with_field("WATCHDOG=1", since=stopping_at + 0.1)
            assert not late, f"WATCHDOG=1 after STOPPING=1: {late}"
            print(f"READY->exit: {len(pings)} pings, STATUS steps {steps}, stopped in {took:.1f} s")
        finally:
            listener.close()


@pytest.mark.slow
def test_watchdog_pings_stop_while_the_trainer_is_stalled_and_resume_after(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    with local_swarm(tmp_path / "swarm") as swarm:
        node = swarm.add_node(settings=TRAIN)
        node.start(env={**listener.env, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        trainer = None
        try:
            listener.wait_for("READY=1", timeout=90)
            wait_training(node)
            listener.wait_for("WATCHDOG=1", timeout=5, since=time.monotonic())
            assert node.process is not None
            trainer = trainer_pid(node.process.pid)

            os.kill(trainer, signal.SIGSTOP)
            stalled_at = time.monotonic()
            step_stalled = node.get("/status")["step"]
            # One ping may still be owed for progress made before the stop; then silence.
            quiet_from = stalled_at + PING_INTERVAL + 0.5
            time.sleep(quiet_from - time.monotonic() + 3 * PING_INTERVAL)
            during = listener.with_field("WATCHDOG=1", since=quiet_from)
            assert not during, f"WATCHDOG=1 while the trainer was stopped: {during}"
            assert node.is_up(), "the API must keep answering while the trainer is stalled"
            assert node.get("/status")["step"] == step_stalled

            os.kill(trainer, signal.SIGCONT)
            resumed_at = time.monotonic()
            pinged_at, _ = listener.wait_for("WATCHDOG=1", timeout=4 * PING_INTERVAL, since=resumed_at)
            wait_until(lambda: node.get("/status")["step"] > step_stalled, 10, "training to go on")
            print(f"stall: silent {resumed_at - quiet_from:.1f} s, ping {pinged_at - resumed_at:.2f} s after SIGCONT")
            node.signal(signal.SIGTERM)
            code, _ = wait_exit(node, 15)
            assert code == 0, node.log_tail()
        finally:
            if trainer is not None and process_alive(trainer):
                os.kill(trainer, signal.SIGCONT)
            listener.close()


def shm_mappings(pid: int) -> set[str]:
    """/dev/shm files a process has mapped: shared memory segments and named semaphores."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
            found.add(parts[5].removesuffix(" (deleted)"))
    return found


# ---------------------------------------------------------------- crash safety

# Kills per kind (see crash_schedule), ~10 s a cycle: the slow suite's longest test, sized for CI's 25 min.
STARTUP_KILLS, RUNNING_KILLS, WRITE_KILLS = 2, 5, 6
CRASH_CYCLES = STARTUP_KILLS + RUNNING_KILLS + WRITE_KILLS
CRASH_CHECKPOINT_INTERVAL = 0.5
CRASH_KEEP = 3


def check_checkpoints_on_disk(directory: Path) -> int:
    """Every checkpoint file loads (torch.load weights_only=True), none was set aside as
    corrupt; returns the newest step (0 if none)."""
    files = list_checkpoints(directory)
    for path in files:
        torch.load(path, map_location="cpu", weights_only=True)
        load_checkpoint(path)
    corrupt = list(directory.glob("*.corrupt"))
    assert not corrupt, f"checkpoints set aside as corrupt: {corrupt}"
    return load_checkpoint(files[-1])["step"] if files else 0


def wait_checkpoint_write(directory: Path, timeout: float = 5.0) -> bool:
    """Spin until a checkpoint is being written (its temp file exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if any(name.endswith(".tmp") for name in os.listdir(directory)):
                return True
        except FileNotFoundError:
            pass
        time.sleep(0.0003)
    return False


def crash_schedule(rng: random.Random) -> list[str]:
    """When and what to kill in each cycle: "startup" (daemon only, before it is up),
    "running" (daemon only, like a crash: its orphaned trainer checkpoints and exits), "write"
    (the whole process group the moment a checkpoint is being written, like the OOM killer or
    systemd's final SIGKILL)."""
    plan = ["startup"] * STARTUP_KILLS + ["running"] * RUNNING_KILLS + ["write"] * WRITE_KILLS
    rng.shuffle(plan)
    plan[-1] = "running"  # the last restart is checked below: make it a normal one
    return plan


class CrashCycles:
    """One node started and SIGKILLed again and again; checks what each kill left on disk."""

    def __init__(self, node: LocalNode, rng: random.Random) -> None:
        self.node, self.rng = node, rng
        self.directory = checkpoints_dir(node)
        self.on_disk = 0      # newest valid checkpoint step: where the next start must resume
        self.max_rate = 0.0   # steps/s seen, to turn the checkpoint interval into steps
        self.resumes: list[int] = []
        self.mid_write_kills = 0
        self.group_killed: set[str] = set()  # /dev/shm files a group kill leaked

    def run(self, cycle: int, what: str) -> None:
        node = self.node
        offset = log_size(node)
        node.start()
        assert node.process is not None
        pid = node.process.pid
        before = self._kill(pid, what)
        node.process.wait(10)
        orphans_s = wait_process_group_gone(pid, 30)
        resumed = [int(n) for n in RESUMED_RE.findall(log_since(node, offset))]
        if resumed:  # this start got as far as loading its checkpoint
            assert resumed == [self.on_disk], f"cycle {cycle}: resumed from {resumed}, newest valid is {self.on_disk}"
            self.resumes.append(resumed[0])
        else:
            assert what == "startup", f"cycle {cycle}: up but no resume line:\n{node.log_tail()}"
        newest = check_checkpoints_on_disk(self.directory)
        assert newest >= self.on_disk, f"cycle {cycle}: newest checkpoint went back from {self.on_disk} to {newest}"
        if before is not None:
            self._check_loss(cycle, what, before, newest)
        print(f"cycle {cycle:2d} {what:7s} resumed {resumed} newest {newest} "
              f"step before {before['step'] if before else '-'} orphans gone in {orphans_s:.1f} s")
        self.on_disk = newest

    def _kill(self, pid: int, what: str) -> dict[str, Any] | None:
        """Kill at a random moment; the /status seen last (None if killed during startup)."""
        if what == "startup":  # while the trainer loads the task and the checkpoint
            trainer_pid(pid, timeout=60)
            time.sleep(self.rng.uniform(0.0, 2.5))
            os.kill(pid, signal.SIGKILL)
            return None
        self.node.wait_up(90)
        up_at = time.time()
        first, measured_from = self.node.get("/status"), time.monotonic()
        time.sleep(self.rng.uniform(0.3, 1.5))
        before = self.node.get("/status")
        self.max_rate = max(self.max_rate, (before["step"] - first["step"]) / (time.monotonic() - measured_from))
        if what == "write":
            self.group_killed |= shm_mappings(pid)
            writing = wait_checkpoint_write(self.directory)
            os.killpg(pid, signal.SIGKILL)
            self.mid_write_kills += writing and any(p.suffix == ".tmp" for p in self.directory.iterdir())
        else:
            os.kill(pid, signal.SIGKILL)
        return {**before, "up_at": up_at, "killed_at": time.time()}

    def _check_loss(self, cycle: int, what: str, before: dict[str, Any], newest: int) -> None:
        last = before["trainer"]["last_checkpoint"]
        if last is not None:
            assert newest >= last["step"], f"cycle {cycle}: checkpoint {last} is gone (newest {newest})"
        # Work lost: what was trained since the newest checkpoint (or since this start), in
        # seconds and in steps; at most one interval (plus the time to write one).
        newest_time = load_checkpoint(list_checkpoints(self.directory)[-1])["time"] if newest else 0.0
        lost_s = before["killed_at"] - max(newest_time, before["up_at"])
        assert lost_s <= CRASH_CHECKPOINT_INTERVAL + 1.0, f"cycle {cycle} ({what}): {lost_s:.2f} s of work lost"
        lost = before["step"] - newest
        allowed = self.max_rate * (CRASH_CHECKPOINT_INTERVAL + 1.0) + 50
        assert lost <= allowed, f"cycle {cycle} ({what}): {lost} steps lost, allowed {allowed:.0f}"
        if what == "running":  # the orphaned trainer saw its daemon die and checkpointed
            assert newest >= before["step"], f"cycle {cycle}: no last checkpoint from the orphan"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_at_random_moments_always_resumes_from_a_valid_checkpoint(tmp_path: Path) -> None:
    seed = int(os.environ.get("PEERFED_CRASH_SEED", random.randrange(1 << 30)))
    print(f"crash seed {seed} (PEERFED_CRASH_SEED to repeat)")
    rng = random.Random(seed)
    settings = {**TRAIN, "checkpoint.interval": CRASH_CHECKPOINT_INTERVAL, "checkpoint.keep": CRASH_KEEP}
    began = time.monotonic()
    with local_swarm(tmp_path) as swarm:
        node = swarm.add_node(settings=settings)
        crashes = CrashCycles(node, rng)
        try:
            for cycle, what in enumerate(crash_schedule(rng)):
                crashes.run(cycle, what)
            # A last normal start resumes from the newest checkpoint, trains, stops cleanly.
            offset = log_size(node)
            node.start()
            node.wait_up(90)
            assert [int(n) for n in RESUMED_RE.findall(log_since(node, offset))] == [crashes.on_disk]
            wait_training(node, crashes.on_disk + 1)
            assert node.stop() == 0, node.log_tail()
        finally:
            for path in crashes.group_killed:  # test_sigkill_of_the_whole_process_group_leaks_...
                Path(path).unlink(missing_ok=True)
        directory = crashes.directory
        assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")], "stale temp files left"
        assert len(list_checkpoints(directory)) <= CRASH_KEEP
        found = load_newest_valid(directory, quarantine=False)
        assert found is not None and found[1]["step"] > crashes.on_disk
    print(f"{CRASH_CYCLES} kill cycles in {time.monotonic() - began:.0f} s; {crashes.mid_write_kills} kills "
          f"left a half-written checkpoint; resumed steps {crashes.resumes}")
    assert len(crashes.resumes) >= CRASH_CYCLES - STARTUP_KILLS and crashes.resumes[-1] > 0
    assert crashes.mid_write_kills >= 1, "no kill landed during a checkpoint write"


@pytest.mark.slow
def test_sigkill_of_the_whole_process_group_leaks_no_shared_memory(tmp_path: Path) -> None:
    """systemd's final SIGKILL (or an OOM kill of the cgroup) takes the daemon, the trainer and
    multiprocessing's resource tracker at once; the model-sized segments in /dev/shm (RAM) and
    the trainer's 4 named semaphores must not outlive the next start."""
    with local_swarm(tmp_path) as swarm:
        node = swarm.add_node(settings=TRAIN)
        node.start()
        node.wait_up(90)
        wait_training(node)
        assert node.process is not None
        pid = node.process.pid
        mapped = shm_mappings(pid) | shm_mappings(trainer_pid(pid))
        segments = {p for p in mapped if Path(p).name.startswith("peerfed_")}
        assert segments, f"expected the shared weights in /dev/shm, found {mapped}"
        assert len([p for p in mapped if Path(p).name.startswith("sem.peerfed_")]) >= 4, mapped
        os.killpg(pid, signal.SIGKILL)
        node.process.wait(10)
        wait_process_group_gone(pid, 30)
        node.start()
        node.wait_up(90)
        wait_training(node)
        assert node.stop() == 0, node.log_tail()
        semaphores = sorted(p for p in mapped - segments if Path(p).exists())
        leaked = sorted(p for p in segments if Path(p).exists())
        print(f"left in /dev/shm: segments {leaked}, semaphores {semaphores}")
        for path in [*leaked, *semaphores]:  # don't leave RAM behind even when failing
            Path(path).unlink(missing_ok=True)
        assert not leaked, f"shared memory of the killed node still in /dev/shm: {leaked}"
        assert not semaphores, f"semaphores of the killed node still in /dev/shm: {semaphores}"


# ---------------------------------------------------------------- SIGTERM during an exchange

BIG = {**TRAIN, "train.task": "big_task:factory", "train.options.dim": 5120}  # 100 MiB of weights


def established_to(port: int) -> set[tuple[str, str]]:
    """Client ends of ESTABLISHED TCP connections to 127.0.0.1:`port` (from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                found.add((local, remote))
    return found


class BackgroundExchange(threading.Thread):
    """POST /exchange on `node` until an exchange gets under way; keeps the last result. Until
    `started` is set, an early answer (no peer yet, or the peer not yet admitting us: 401
    until its roster has our connection) is retried."""

    def __init__(self, node: LocalNode) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.result: dict[str, Any] | str | None = None
        self.started = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.result = post_exchange(self.node, timeout=60)
            except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                self.result = f"no answer: {exc!r}"  # the node stopped while we waited
                return
            if self.result.get("outcome") == "ok" or self.started.is_set():
                return
            time.sleep(0.2)


def sigterm_mid_exchange(initiator: LocalNode, responder: LocalNode, victim: LocalNode) -> dict[str, Any]:
    """Start an exchange, SIGTERM `victim` once the transfer is under way; check it exits 0
    within 10 s with a loadable checkpoint and that the SIGTERM fell inside the exchange."""
    survivor = responder if victim is initiator else initiator
    for node in (initiator, responder):  # each admits the other (401 until its roster has it)
        wait_until(lambda node=node: node.get("/status")["admission"]["admitted"] >= 1, 30, "admission")
    known = established_to(responder.exchange_port)
    exchange = BackgroundExchange(initiator)
    exchange.start()
    wait_until(lambda: bool(established_to(responder.exchange_port) - known), 60, "the exchange connection")
    exchange.started.set()
    time.sleep(0.15)
    sent_at = time.time()
    victim.signal(signal.SIGTERM)
    code, took = wait_exit(victim, 10)
    assert code == 0, victim.log_tail()
    exchange.join(60)
    assert not exchange.is_alive(), "POST /exchange hangs"
    found = load_newest_valid(checkpoints_dir(victim), quarantine=False)
    assert found is not None, f"no valid checkpoint after the stop: {list(checkpoints_dir(victim).iterdir())}"
    assert found[1]["model"]["weight"].shape == (5120, 5120)
    # The survivor saw the exchange: it ran from at - duration to at, and the SIGTERM fell inside.
    last = survivor.get("/status")["last_exchange"]
    assert last is not None and last["peer_id"] == victim.peer_id, last
    assert last["at"] - last["duration_s"] - 0.05 <= sent_at <= last["at"], (last, sent_at)
    assert survivor.is_up()
    print(f"SIGTERM to the {'initiator' if victim is initiator else 'responder'} "
          f"{sent_at - (last['at'] - last['duration_s']):.2f} s into a {last['duration_s']:.2f} s exchange: "
          f"exit 0 in {took:.1f} s; survivor says {last['outcome']}; POST said {exchange.result}")
    return found[1]


@pytest.mark.slow
def test_sigterm_in_the_middle_of_an_exchange_exits_0_with_a_loadable_checkpoint(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(TESTS_DIR)}
    with local_swarm(tmp_path) as swarm:
        a = swarm.add_node(settings=BIG)
        b = swarm.add_node(settings=BIG)
        for node in (a, b):
            node.start(env=env)
        for node in (a, b):
            node.wait_up(120)
        swarm.wait_full_view(timeout=30)

        # The responder is stopped while it receives A's weights.
        saved = sigterm_mid_exchange(a, b, victim=b)

        # B comes back from that checkpoint; then the initiator (B) is stopped mid-exchange.
        offset = log_size(b)
        b.start(env=env)
        b.wait_up(120)
        assert [int(n) for n in RESUMED_RE.findall(log_since(b, offset))] == [saved["step"]]
        sigterm_mid_exchange(b, a, victim=b)
        assert a.stop() == 0, a.log_tail()


# ---------------------------------------------------------------- SIGHUP reload


@pytest.mark.slow
def test_sighup_applies_a_new_bootstrap_and_keeps_running_on_an_invalid_config(tmp_path: Path) -> None:
    listener = NotifyListener(tmp_path / "notify.sock")
    with local_swarm(tmp_path / "swarm") as swarm:
        a = swarm.add_node(bootstrap=[], settings=TRAIN)
        b = swarm.add_node(bootstrap=[], settings=TRAIN)
        try:
            a.start(env=listener.env)
            b.start()
            a.wait_up(90)
            b.wait_up(90)
            assert a.process is not None
            pid = a.process.pid
            time.sleep(2)
            assert b.peer_id not in {p["peer_id"] for p in a.get("/peers")}
            original = a.config_path.read_text()

            # Invalid: B's address plus an unknown key. Nothing of it may apply.
            set_config_values(a.config_path, {"p2p.bootstrap": [b.p2p_addr], "no_such_setting": 1})
            offset = log_size(a)
            hup_at = time.monotonic()
            a.signal(signal.SIGHUP)
            wait_until(lambda: "SIGHUP" in log_since(a, offset), 10, "the SIGHUP log line")
            said = log_since(a, offset)  # the reason may span lines (one per problem)
            assert "SIGHUP: keeping the running config" in said and "no_such_setting" in said, said
            reloading_at, text = listener.wait_for("RELOADING=1", timeout=5, since=hup_at)
            assert "MONOTONIC_USEC=" in text
            listener.wait_for("READY=1", timeout=5, since=reloading_at)
            time.sleep(3)
            assert a.process.poll() is None and a.is_up()
            assert b.peer_id not in {p["peer_id"] for p in a.get("/peers")}, "half of an invalid config applied"
            uptime = a.get("/status")["uptime_s"]

            # Valid again, with B as a bootstrap peer: A connects to B without a restart.
            a.config_path.write_text(original)
            set_config_values(a.config_path, {"p2p.bootstrap": [b.p2p_addr]})
            offset = log_size(a)
            hup_at = time.monotonic()
            a.signal(signal.SIGHUP)
            wait_until(lambda: b.peer_id in a.connected_peers(), 30, "A to connect to its new bootstrap peer B")
            wait_until(lambda: a.peer_id in b.connected_peers(), 30, "B to list A")
            assert "SIGHUP: reloaded" in log_since(a, offset)
            listener.wait_for("READY=1", timeout=5, since=listener.wait_for("RELOADING=1", 5, since=hup_at)[0])
            assert a.process.pid == pid and a.process.poll() is None
            assert a.get("/status")["uptime_s"] > uptime
            assert [a.stop(), b.stop()] == [0, 0]
        finally:
            listener.close()


def test_sighup_during_startup_does_not_send_ready_before_the_api_is_up(tmp_path: Path) -> None:
    """A reload request while the daemon starts (its trainer is loading) must not tell systemd
    it is ready: READY=1 starts the watchdog clock and lets dependent units go."""
    listener = NotifyListener(tmp_path / "notify.sock")
    with local_swarm(tmp_path / "swarm") as swarm:
        node = swarm.add_node(settings=TRAIN)
        api_at_ready = probe_api_at_first_ready(listener, node)
        try:
            node.start(env=listener.env)
            assert node.process is not None
            trainer_pid(node.process.pid, timeout=60)  # the daemon waits for its trainer in start()
            node.signal(signal.SIGHUP)
            listener.wait_for("READY=1", timeout=90)
            node.wait_up(90)
            assert api_at_ready["connect"] == "ok", (
                f"READY=1 came before the API listened: {api_at_ready['connect']}; "
                f"notify messages {[m for _, m in listener.messages]}")
            assert node.stop() == 0, node.log_tail()
        finally:
            listener.close()


def test_sighup_to_the_whole_process_group_reloads_without_killing_the_trainer(tmp_path: Path) -> None:
    """`systemctl kill -s HUP` (every process of the unit) or a closed terminal sends SIGHUP to
    the trainer too: it must not die of it (a restart loses up to a checkpoint interval)."""
    with local_swarm(tmp_path) as swarm:
        node = swarm.add_node(settings=TRAIN)
        node.start()
        node.wait_up(90)
        wait_training(node)
        assert node.process is not None
        pid = node.process.pid
        trainer = trainer_pid(pid)
        offset = log_size(node)
        os.killpg(pid, signal.SIGHUP)
        wait_until(lambda: "SIGHUP: reloaded" in log_since(node, offset), 10, "the reload")
        time.sleep(1.5)  # the daemon polls its trainer every 0.5 s
        status = node.get("/status")
        assert process_alive(trainer) and status["trainer"]["restarts"] == 0, (
            f"the trainer died of SIGHUP: {status['trainer']}\n{log_since(node, offset)}")
        assert node.stop() == 0, node.log_tail()


# ---------------------------------------------------------------- /metrics


def scrape(node: LocalNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode("utf-8")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def digits_mlp_nbytes() -> int:
    model = digits_mlp(TrainSettings(), NodeContext(0, 1, 0)).model
    return sum(p.numel() for p in model.parameters()) * 4


@pytest.mark.slow
def test_metrics_parse_and_exchange_counters_grow(tmp_path: Path) -> None:
    nbytes = digits_mlp_nbytes()
    ok = ("peerfed_exchanges_total", (("outcome", "ok"),))
    sent = ("peerfed_exchange_bytes_total", (("direction", "sent"),))
    received = ("peerfed_exchange_bytes_total", (("direction", "received"),))
    durations = ("peerfed_exchange_duration_seconds_count", (("outcome", "ok"),))
    with local_swarm(tmp_path) as swarm:
        float32 = {**TRAIN, "exchange.encoding": "float32"}  # wire bytes = model bytes
        a = swarm.add_node(settings=float32)
        b = swarm.add_node(settings=float32)
        swarm.start_all()
        swarm.wait_full_view(timeout=30)
        wait_training(a)
        before = {n.index: scrape(n) for n in (a, b)}
        for n in (a, b):
            assert before[n.index][ok] == 0 and before[n.index][sent] == 0, "no exchange ran yet"
            assert ("peerfed_peers_connected", ()) in before[n.index]
        rounds = [exchange_until_ok(a), exchange_until_ok(a), exchange_until_ok(b)]
        assert all(r["outcome"] == "ok" for r in rounds)
        time.sleep(1.0)  # the training counters follow the trainer every 0.5 s
        for n in (a, b):
            now, then = scrape(n), before[n.index]
            assert now[ok] - then[ok] == 3, (n.index, now[ok], then[ok])
            assert now[durations] - then[durations] == 3
            assert now[sent] - then[sent] == 3 * nbytes
            assert now[received] - then[received] == 3 * nbytes
            assert now[("peerfed_train_steps_total", ())] > then[("peerfed_train_steps_total", ())]
            assert now[("peerfed_peers_connected", ())] == 1
            status = n.get("/status")
            assert status["exchanges"]["ok"] == now[ok]
            assert status["bytes_sent"] == now[sent] and status["bytes_received"] == now[received]
        assert [a.stop(), b.stop()] == [0, 0]


# ---------------------------------------------------------------- stop signals


@pytest.mark.slow
def test_sigint_exits_0_and_a_second_sigterm_ends_a_slow_stop_at_once(tmp_path: Path) -> None:
    with local_swarm(tmp_path) as swarm:
        node = swarm.add_node(settings=TRAIN)
        node.start()
        node.wait_up(90)
        wait_training(node)
        node.signal(signal.SIGINT)
        code, took = wait_exit(node, 15)
        assert code == 0, node.log_tail()
        assert load_newest_valid(checkpoints_dir(node), quarantine=False) is not None

        # A stalled trainer makes the stop slow (the daemon waits for its last checkpoint).
        node.start()
        node.wait_up(90)
        wait_training(node)
        assert node.process is not None
        pid = node.process.pid
        trainer = trainer_pid(pid)
        os.kill(trainer, signal.SIGSTOP)
        try:
            offset = log_size(node)
            node.signal(signal.SIGTERM)
            wait_until(lambda: "stopping" in log_since(node, offset), 5, "the stop to begin")
            time.sleep(1.0)
            assert node.process.poll() is None, "the stop was not slow: the test proves nothing"
            os.kill(pid, signal.SIGTERM)
            code, second = wait_exit(node, 3)
            assert code != 0
            assert "second SIGTERM" in log_since(node, offset)
        finally:
            os.kill(trainer, signal.SIGCONT)  # the orphan notices its daemon is gone and exits
        wait_process_group_gone(pid, 30)
        print(f"SIGINT stop {took:.1f} s; second SIGTERM ended the stop in {second:.2f} s (exit {code})")
