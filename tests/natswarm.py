"""Real peerfed daemons on the machines of a NetLab topology (tests/netlab.py).

Each node gets a LocalSwarm home (fresh key, config, free ports), listens on all of its
namespace's addresses and bootstraps from the public node; the test reads a node's local API
from inside its namespace.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netlab import Machine, NetLab

from peerfed.localswarm import LocalNode, LocalSwarm, set_config_values


@dataclass
class NsNode:
    node: LocalNode
    machine: Machine
    lab: NetLab

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    @property
    def p2p_addr(self) -> str:
        return f"/ip4/{self.machine.ip}/tcp/{self.node.p2p_port}/p2p/{self.node.peer_id}"

    def get(self, path: str, timeout: float = 5.0) -> Any:
        return self.lab.get_json(self.machine.ns, f"http://127.0.0.1:{self.node.api_port}{path}", timeout=timeout)

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.get("/status", timeout)  # type: ignore[no-any-return]

    def connected(self) -> set[str]:
        return {p["peer_id"] for p in self.get("/peers") if p["state"] == "connected"}

    def log_tail(self, lines: int = 40) -> str:
        return f"--- {self.machine.name} ({self.peer_id}) ---\n{self.node.log_tail(lines)}"


class NsSwarm:
    def __init__(self, lab: NetLab, base: Path) -> None:
        self.lab = lab
        self.homes = LocalSwarm(base)
        self.nodes: list[NsNode] = []

    def add(self, machine: Machine, *, bootstrap: NsNode | None = None,
            settings: Mapping[str, Any] | None = None) -> NsNode:
        node = self.homes.add_node(bootstrap=[], settings=settings)
        set_config_values(node.config_path, {
            "p2p.listen": [f"/ip4/0.0.0.0/tcp/{node.p2p_port}"],
            "exchange.listen": f"0.0.0.0:{node.exchange_port}",
            "p2p.bootstrap": [bootstrap.p2p_addr] if bootstrap is not None else [],
            **(settings or {}),
        })
        ns_node = NsNode(node, machine, self.lab)
        self.nodes.append(ns_node)
        return ns_node

    def start(self, ns_node: NsNode) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        with open(ns_node.node.log_path, "ab") as log:
            ns_node.node.process = self.lab.spawn(
                ns_node.machine.ns, [sys.executable, "-m", "peerfed", "run", "--home", str(ns_node.node.home)],
                stdout=log, env=env)

    def start_all(self, timeout: float = 90.0) -> None:
        for n in self.nodes:
            self.start(n)
        self.wait_up(timeout)

    def wait_up(self, timeout: float = 90.0) -> None:
        for n in self.nodes:
            self.wait(lambda n=n: _up(n), timeout, f"{n.machine.name} up")

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        """Seconds it took; AssertionError with every node's log tail after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if predicate():
                    return time.monotonic() - started
            except OSError:
                pass
            for n in self.nodes:
                if n.node.process is not None and n.node.process.poll() is not None:
                    raise AssertionError(f"{n.machine.name} exited:\n{n.log_tail()}")
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for: {what}\n"
                             + "\n".join(n.log_tail() for n in self.nodes))


def _up(n: NsNode) -> bool:
    def probe() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{n.node.api_port}/healthz", timeout=2).close()
            return True
        except OSError:  # not listening yet; 503 while starting
            return False

    return n.lab.inside(n.machine.ns, probe)
