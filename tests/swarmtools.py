"""Helpers for tests that start real daemons and talk to them as a libp2p peer."""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import multiaddr
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
from libp2p.security.noise.transport import Transport as Noise
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from peerfed.core.peerid import Signer
from peerfed.identity import load_identity, signer_of
from peerfed.localswarm import LocalNode, LocalSwarm

NO_TRAINING = {"train.enabled": False}
# exchange.interval for nodes that must not gossip on their own: the first round opens at a
# random point within one interval, so even 1000 s fires within a 60 s test one time in 17.
NO_GOSSIP = 1e9


def make_swarm(tmp_path: Path, n: int, **kwargs: Any) -> LocalSwarm:
    swarm = LocalSwarm(tmp_path)
    for _ in range(n):
        swarm.add_node(settings=kwargs.get("settings", NO_TRAINING))
    return swarm


def make_test_peer(*, plaintext: bool = False) -> tuple[Any, Any]:
    """A py-libp2p host for the test to act as a peer (Noise, or plaintext only)."""
    key_pair = create_new_key_pair()
    if plaintext:
        sec = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    else:
        sec = {NOISE_ID: Noise(key_pair, noise_privkey=new_x25519_key_pair().private_key)}
    host = new_host(key_pair=key_pair, sec_opt=sec, muxer_opt={YAMUX_ID: Yamux},
                    connection_config=ConnectionConfig(max_connections=1_000_000, max_connections_per_peer=1),
                    listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    return key_pair, host


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def listed(node: LocalNode) -> set[str]:
    """Every PeerID a node lists in /peers, in any state."""
    return {p["peer_id"] for p in node.get("/peers")}


# ---------------------------------------------------------------- service tests (processes,
# sd_notify, local API calls); used by tests/test_service.py.


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process from /proc/<pid>/stat, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return fields[0], int(fields[1]), int(fields[2])


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`: a LocalNode daemon leads its own
    session, so this is the daemon and every process it started (trainer, resource tracker),
    also after they were orphaned."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return sorted(found)


def wait_process_group_gone(pgid: int, timeout: float) -> float:
    """Wait until no live process is left in group `pgid`; return the seconds it took."""
    started = time.monotonic()
    wait_until(lambda: not process_group_members(pgid), timeout, f"process group {pgid} to be gone")
    return time.monotonic() - started


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(children))


def trainer_pid(daemon_pid: int, timeout: float = 30.0) -> int:
    """The trainer child of a daemon: the multiprocessing spawn child that is not the
    resource tracker."""
    found: list[int] = []

    def look() -> bool:
        for child in child_pids(daemon_pid):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
                found.append(child)
                return True
        return False

    wait_until(look, timeout, f"the trainer child of pid {daemon_pid}")
    return found[0]


def post_exchange(node: LocalNode, peer: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """POST /exchange on a node's local API: one exchange now (with `peer` or any candidate)."""
    query = f"?peer={peer}" if peer else ""
    request = urllib.request.Request(f"http://127.0.0.1:{node.api_port}/exchange{query}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def exchange_until_ok(node: LocalNode, timeout: float = 60.0) -> dict[str, Any]:
    """POST /exchange until one succeeds (the peer's record with its exchange URL may still be
    on its way)."""
    deadline = time.monotonic() + timeout
    while True:
        result = post_exchange(node)
        if result["outcome"] == "ok" or time.monotonic() > deadline:
            assert result["outcome"] == "ok", f"no exchange succeeded within {timeout} s: {result}"
            return result
        time.sleep(0.5)


class NotifyListener:
    """A stand-in for systemd's notify socket: an AF_UNIX datagram socket whose messages a
    thread records with the monotonic time they arrived."""

    def __init__(self, path: Path) -> None:
        if len(str(path)) > 100:  # sun_path holds 108 bytes
            path = Path(tempfile.mkdtemp(prefix="pf-notify-")) / "notify.sock"
        self.path = path
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._closed = False
        self._on_message: list[Callable[[str], None]] = []
        self._thread = threading.Thread(target=self._receive, name="notify-listener", daemon=True)
        self._thread.start()

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def on_message(self, callback: Callable[[str], None]) -> None:
        """Run `callback(text)` in the receiving thread, before the message is recorded."""
        self._on_message.append(callback)

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            arrived = time.monotonic()
            text = data.decode("utf-8", errors="replace")
            for callback in self._on_message:
                callback(text)
            with self._cond:
                self.messages.append((arrived, text))
                self._cond.notify_all()

    def with_field(self, field: str, since: float = 0.0) -> list[tuple[float, str]]:
        """Messages since `since` (monotonic) holding a field: "WATCHDOG=1", or "STATUS=" for
        any STATUS."""
        with self._cond:
            return [(t, m) for t, m in self.messages if t >= since and any(
                line == field or (field.endswith("=") and line.startswith(field)) for line in m.split("\n"))]

    def wait_for(self, field: str, timeout: float, since: float = 0.0) -> tuple[float, str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.with_field(field, since)
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {field} within {timeout} s; got {[m for _, m in self.messages]}")
                self._cond.wait(left)

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self._thread.join(2.0)


def add_insider(swarm: LocalSwarm, *nodes: LocalNode, timeout: float = 60.0) -> Signer:
    """The key of a new relay node (a real daemon, no training) connected to ``nodes``: they
    admit pushes and model requests signed with it (core/admission.py), as from any peer."""
    relay = swarm.add_node(bootstrap=[nodes[0].p2p_addr], settings=NO_TRAINING)
    relay.start()
    relay.wait_up(timeout)
    wait_until(lambda: all(relay.peer_id in n.connected_peers() for n in nodes), timeout,
               "the insider to be connected")
    time.sleep(1.0)  # the data plane's roster follows the peer table within 0.5 s
    return signer_of(load_identity(relay.home / "identity.key"))

