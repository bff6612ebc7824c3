"""Start a swarm of real daemons on 127.0.0.1, each a separate OS process.

Used by ``peerfed demo``, the multi-node tests and the benchmarks. Every node gets its own
home (fresh key, config, state) and free ports; node 0 is everyone's bootstrap by default.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from peerfed.config_files import write_default_config
from peerfed.identity import create_identity, peer_id_of


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port from that range can be taken
    by any outgoing connection between now and the moment the daemon binds it."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        port = random.randint(max(1024, low // 2), low - 1)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found below the ephemeral range")


_handed_out: set[int] = set()


def set_config_values(path: Path, values: Mapping[str, Any]) -> None:
    """Set dotted keys (``"train.node_index"``) in a config file, keeping its comments."""
    doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    for dotted, value in values.items():
        *parents, leaf = dotted.split(".")
        table: Any = doc
        for name in parents:
            if name not in table:
                table[name] = tomlkit.table()
            table = table[name]
        table[leaf] = value
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")


@dataclass
class LocalNode:
    index: int
    home: Path
    peer_id: str
    p2p_port: int
    exchange_port: int
    api_port: int
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home / "daemon.log"
        self._term_sent = False

    @property
    def p2p_addr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.p2p_port}/p2p/{self.peer_id}"

    @property
    def config_path(self) -> Path:
        return self.home / "peerfed.toml"

    def start(self, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        self._term_sent = False
        log = open(self.log_path, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peerfed", "run", "--home", str(self.home), *extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True,
        )
        log.close()

    def get(self, path: str, timeout: float = 5.0) -> Any:
        url = f"http://127.0.0.1:{self.api_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())

    def is_up(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/healthz", timeout=2).close()
            return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_up(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node {self.index} exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.is_up():
                return
            time.sleep(0.2)
        raise TimeoutError(f"node {self.index} did not come up in {timeout} s:\n{self.log_tail()}")

    def connected_peers(self) -> set[str]:
        return {p["peer_id"] for p in self.get("/peers") if p["state"] == "connected"}

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self._term_sent = self._term_sent or sig in (signal.SIGTERM, signal.SIGINT)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not stop. Returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            if not self._term_sent:
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class LocalSwarm:
    def __init__(self, base_dir: Path, *, network: str = "peerfed-local") -> None:
        self.base_dir = Path(base_dir)
        self.network = network
        self.nodes: list[LocalNode] = []

    def add_node(
        self,
        *,
        bootstrap: Sequence[str] | None = None,
        settings: Mapping[str, Any] | None = None,
        network: str | None = None,
    ) -> LocalNode:
        """Make a home for one more node; bootstrap defaults to node 0 (if any)."""
        index = len(self.nodes)
        home = self.base_dir / f"node{index}"
        home.mkdir(parents=True, mode=0o700)
        key_pair = create_identity(home / "identity.key")
        node = LocalNode(index, home, peer_id_of(key_pair), free_port(), free_port(), free_port())
        if bootstrap is None:
            bootstrap = [self.nodes[0].p2p_addr] if self.nodes else []
        write_default_config(
            node.config_path,
            network=network or self.network,
            p2p_listen=[f"/ip4/127.0.0.1/tcp/{node.p2p_port}"],
            exchange_listen=f"127.0.0.1:{node.exchange_port}",
            api_listen=f"127.0.0.1:{node.api_port}",
            bootstrap=list(bootstrap),
        )
        # Nodes on 127.0.0.1 have no router to ask: no UPnP discovery or NAT-PMP out of the machine.
        set_config_values(node.config_path, {"p2p.port_mapping": False, **(settings or {})})
        self.nodes.append(node)
        return node

    def start_all(self, wait: bool = True, timeout: float = 90.0) -> None:
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                node.start()
        if wait:
            for node in self.nodes:
                node.wait_up(timeout)

    def wait_full_view(self, nodes: Sequence[LocalNode] | None = None, timeout: float = 30.0) -> float:
        """Wait until each node lists every other one as connected; return seconds taken."""
        nodes = list(nodes if nodes is not None else self.nodes)
        ids = {n.peer_id for n in nodes}
        started = time.monotonic()
        while True:
            missing = {}
            for node in nodes:
                try:
                    seen = node.connected_peers()
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    seen = set()
                lack = ids - {node.peer_id} - seen
                if lack:
                    missing[node.index] = len(lack)
            if not missing:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"no full view after {timeout} s; missing peers per node: {missing}")
            time.sleep(0.3)

    def stop_all(self) -> list[int | None]:
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        return [node.stop() for node in self.nodes]

    def kill_all(self) -> None:
        """SIGTERM first (so trainers clean up their shared memory), SIGKILL what is left."""
        for node in self.nodes:
            node.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            node.kill()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill_all()
