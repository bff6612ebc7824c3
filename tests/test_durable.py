"""Durable under faults: a full disk never makes stop fail, the peer table's save loop outlives
its errors, and the semaphores a SIGKILLed daemon leaves in /dev/shm are swept.

The full-disk test needs root (it mounts a 64 KiB tmpfs as the node's state folder); the
others run in this process or with a short-lived child process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from swarmtools import NO_GOSSIP, wait_until

from peerfed.core.peerid import Signer
from peerfed.core.peers import PeerTable
from peerfed.localswarm import LocalSwarm
from peerfed.net import membership as membership_module
from peerfed.net import peer_file
from peerfed.net.membership import Membership
from peerfed.net.p2p import DialError, HostStats
from peerfed.net.peer_file import PeerTableFile
from peerfed.train import shm

OTHER = Signer.generate().peer_id


def table_with_a_peer(own: str) -> PeerTable:
    table = PeerTable(own)
    table.add_address(OTHER, ["/ip4/127.0.0.1/tcp/1/p2p/" + OTHER], time.time())
    return table


# ---------------------------------------------------------------- the peer table's file

def test_a_failed_save_names_the_path_leaves_no_temp_file_and_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "peers.json"
    saved = PeerTableFile(path)
    assert saved.save(table_with_a_peer("me"))
    before = path.read_text()

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(peer_file.os, "fsync", disk_full)
    with caplog.at_level(logging.DEBUG, logger="peerfed.membership"):
        assert not saved.save(PeerTable("me"))
        assert not saved.save(PeerTable("me"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json"]  # no peers.json.tmp
    assert path.read_text() == before and saved.dirty  # the old table stays; tried again later
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"cannot save the peer table to {path}: No space left on device (keeping the one there, if any)"]
    assert not any(r.exc_info for r in caplog.records)

    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="peerfed.membership"):
        assert saved.save(PeerTable("me")) and not saved.dirty
    assert [r.getMessage() for r in caplog.records] == [f"saved the peer table to {path} again"]


class StubHost:
    """Just enough of P2PHost for Membership's loops: nobody answers."""

    async def dial(self, addr: str) -> str:
        raise DialError(f"could not connect to {addr}")

    async def request(self, peer_id: str, payload: bytes) -> bytes:
        raise ConnectionError("no such peer")

    async def ping(self, peer_id: str) -> float:
        raise ConnectionError("no such peer")

    async def disconnect(self, peer_id: str) -> None:
        pass

    def addrs(self) -> list[str]:
        return []

    def statistics(self) -> HostStats:
        return HostStats()


def test_the_save_loop_survives_its_errors_and_stop_survives_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(membership_module, "SAVE_INTERVAL", 0.05)
    path = tmp_path / "peers.json"
    failures: list[BaseException] = [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("a bug"),
                                     OSError(errno.EIO, "Input/output error")]
    real_write = peer_file.write_atomically

    def flaky_write(target: Path, text: str) -> None:
        if failures:
            raise failures.pop(0)
        real_write(target, text)

    monkeypatch.setattr(peer_file, "write_atomically", flaky_write)

    async def main() -> None:
        signer = Signer.generate()
        membership = Membership(host=StubHost(), signer=signer, network="durable", table=table_with_a_peer(signer.peer_id),  # type: ignore[arg-type]
                                bootstrap=[], allowlist=None, state_file=path)
        await membership.start()
        membership.on_connection_change(OTHER, True)
        membership.on_connection_change(OTHER, False)  # the table changed: the loop saves it
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert path.exists() and not failures, "the save loop stopped at its first error"
        assert OTHER in path.read_text()
        loops = [t for t in asyncio.all_tasks() if t.get_name() == "_save_loop"]
        assert len(loops) == 1 and not loops[0].done()

        failures.append(OSError(errno.ENOSPC, "No space left on device"))
        await membership.stop()  # does not raise

    with caplog.at_level(logging.INFO, logger="peerfed.membership"):
        asyncio.run(main())
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"cannot save the peer table to {path}: No space left on device" in text
    assert f"saving the peer table to {path} failed" in text  # the unexpected error, with its traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peers.json"]


# ---------------------------------------------------------------- semaphores in /dev/shm

MAKE_SEMAPHORES = """
import multiprocessing, sys, time
import joblib  # its loky names semaphores its own way: ours must not depend on who imported what
from peerfed.train.shm import semaphores_named_by_pid
ctx = multiprocessing.get_context("spawn")
with semaphores_named_by_pid():
    queue, lock = ctx.Queue(), ctx.Lock()
print("ready", flush=True)
time.sleep(60)
"""


def our_semaphores() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(shm.SEMAPHORE_FILE_PREFIX + "*")}


@pytest.mark.skipif(not shm.SHM_DIR.is_dir(), reason="no /dev/shm on this system")
def test_semaphores_of_a_killed_process_group_are_swept_and_no_live_ones(tmp_path: Path) -> None:
    before = our_semaphores()
    child = subprocess.Popen([sys.executable, "-c", MAKE_SEMAPHORES], stdout=subprocess.PIPE,
                             start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        theirs = {name for name in our_semaphores() - before if name.startswith(f"sem.peerfed_{child.pid}-")}
        assert len(theirs) == 4, our_semaphores()  # the queue's two locks and counter, and the lock
        assert not theirs & set(shm.remove_stale_segments())  # the child is alive: its names stay
        assert theirs <= our_semaphores()
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the child and its resource tracker, like systemd's last word
        child.wait(10)
    assert theirs <= our_semaphores(), "the resource tracker died with the group: the names stay behind"

    # A live process's semaphore named our way (this test process's), and one named the usual way.
    with shm.semaphores_named_by_pid():
        live = multiprocessing.get_context("spawn").Lock()
    usual = multiprocessing.get_context("spawn").Lock()
    mine = {n for n in our_semaphores() if n.startswith(f"sem.peerfed_{os.getpid()}-")}
    assert len(mine) == 1 and not usual._semlock.name.startswith("/peerfed_")  # type: ignore[attr-defined]
    removed = shm.remove_stale_segments()
    assert theirs <= set(removed) and not theirs & our_semaphores()
    assert mine <= our_semaphores(), "a live process's semaphore was removed"
    del live, usual


# ---------------------------------------------------------------- a full disk under a real daemon

def mount_tiny_tmpfs(folder: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tiny tmpfs as the node's state folder")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def fill(folder: Path) -> None:
    """Write until the filesystem holding ``folder`` is full."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    print("state folder when full:", {p.name: p.stat().st_size for p in folder.rglob("*")})


def test_sigterm_on_a_full_disk_exits_0_and_names_what_it_could_not_write(tmp_path: Path) -> None:
    home_state = tmp_path / "node0" / "state"
    with LocalSwarm(tmp_path, network="durable") as swarm:
        node = swarm.add_node(settings={"train.init": "local", "train.threads": 1, "train.task": "digits-lr",
                                        "exchange.interval": NO_GOSSIP, "checkpoint.interval": 3600.0})
        mount_tiny_tmpfs(home_state)
        try:
            swarm.start_all()
            wait_until(lambda: node.get("/status").get("step", 0) > 50, 60, "training")
            fill(home_state)
            assert node.stop(30) == 0, node.log_tail(40)
            log = node.log_path.read_text(errors="replace")
            left = sorted(p.name for p in home_state.rglob("*"))
        finally:
            subprocess.run(["umount", "-l", str(home_state)], check=False)
    assert f"cannot save the peer table to {home_state / 'peers.json'}: No space left on device" in log, log
    checkpoints = home_state / "checkpoints"
    assert f"No space left on device: '{checkpoints}/ckpt-" in log, log  # the final checkpoint, with its path
    assert "Traceback" not in log, log
    assert not [name for name in left if name.endswith(".tmp")], left
    assert "stopped" in log.splitlines()[-1], log
