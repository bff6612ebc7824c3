"""The composition root: build a node from its config, run it, stop it cleanly.

Startup order matters and reads top to bottom in ``Daemon.start``: identity, libp2p host
(binds the swarm port), local API, then the membership loops. Anything that fails before the
node is up raises a PeerfedError with one clear line and the CLI maps it to an exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

from peerfed import __version__
from peerfed.config import Config, load_config
from peerfed.errors import PeerfedError
from peerfed.identity import load_identity, peer_id_of, signer_of
from peerfed.net.bridge import Bridge
from peerfed.net.membership import Membership, load_peer_table
from peerfed.net.p2p import P2PHost
from peerfed.ops.api import LocalAPI
from peerfed.ops.logs import set_level

log = logging.getLogger("peerfed.daemon")

STOP_TIMEOUT = 10.0


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.key_pair = load_identity(config.identity)
        self.peer_id = peer_id_of(self.key_pair)
        self.signer = signer_of(self.key_pair)
        self.started_at = time.time()
        self.bridge = Bridge()
        self.host: P2PHost | None = None
        self.membership: Membership | None = None
        self.api: LocalAPI | None = None
        self._stop_requested = asyncio.Event()
        self.log_level_override: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.bridge.start()
        table = load_peer_table(self._peers_file, self.peer_id, max_peers=cfg.p2p.max_peers)
        allowlist = frozenset(cfg.p2p.allowlist) or None
        self.host = P2PHost(
            self.key_pair,
            network=cfg.network,
            listen=cfg.p2p.listen,
            announce=cfg.p2p.announce,
            bridge=self.bridge,
            on_request=self._on_p2p_request,
            on_connection_change=self._on_connection_change,
            max_connected=cfg.p2p.max_peers,
        )
        addrs = await self.host.start()
        self.api = LocalAPI(host=cfg.api.host, port=cfg.api.port, status=self.status, peers=self.peers)
        await self.api.start()
        self.membership = Membership(
            host=self.host,
            signer=self.signer,
            network=cfg.network,
            table=table,
            bootstrap=cfg.p2p.bootstrap,
            allowlist=allowlist,
            state_file=self._peers_file,
        )
        await self.membership.start()
        log.info("peerfed %s up as %s on network %r; p2p %s; api http://%s:%s",
                 __version__, self.peer_id, cfg.network, ", ".join(addrs), cfg.api.host, self.api.bound_port)

    async def stop(self) -> None:
        log.info("stopping")
        self._stop_requested.set()
        if self.membership is not None:
            await self.membership.stop()
        if self.api is not None:
            await self.api.stop()
        if self.host is not None:
            try:
                await asyncio.wait_for(self.host.stop(), 5)
            except Exception as exc:  # noqa: BLE001 - we are leaving anyway
                log.info("p2p host did not stop cleanly: %s", exc)
        await self.bridge.stop()
        log.info("stopped")

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        try:
            await self.start()
        except BaseException:
            await asyncio.wait_for(self.stop(), STOP_TIMEOUT)
            raise
        await self._stop_requested.wait()
        await asyncio.wait_for(self.stop(), STOP_TIMEOUT)

    def request_stop(self) -> None:
        self._stop_requested.set()

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop_requested.is_set():
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received", signal.Signals(sig).name)
        self._stop_requested.set()

    def _on_reload_signal(self) -> None:
        try:
            new = load_config(self.config.path)
        except PeerfedError as exc:
            log.error("SIGHUP: keeping the running config; the new one is invalid: %s", exc)
            return
        self.config = new
        if self.membership is not None:
            self.membership.reload(bootstrap=new.p2p.bootstrap, allowlist=frozenset(new.p2p.allowlist) or None)
        if self.log_level_override is None:
            set_level(new.log_level)
        log.info("SIGHUP: reloaded bootstrap list, allowlist and log level from %s", new.path)

    # -- callbacks from the drivers --------------------------------------------------------

    async def _on_p2p_request(self, remote: str, data: bytes) -> bytes:
        assert self.membership is not None
        return await self.membership.handle_request(remote, data)

    def _on_connection_change(self, peer_id: str, up: bool) -> None:
        if self.membership is not None:
            self.membership.on_connection_change(peer_id, up)

    # -- views for the local API ----------------------------------------------------------

    @property
    def _peers_file(self) -> Path:
        return self.config.state_dir / "peers.json"

    def status(self) -> dict[str, Any]:
        connected = self.membership.connected_peers() if self.membership else []
        return {
            "peer_id": self.peer_id,
            "network": self.config.network,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers_connected": len(connected),
            "addrs": self.host.addrs() if self.host else [],
            "membership": self.membership.statistics() if self.membership else {},
        }

    def peers(self) -> list[dict[str, Any]]:
        if self.membership is None:
            return []
        live = set(self.membership.connected_peers())
        rows = self.membership.peers_snapshot()
        for row in rows:
            if row["state"] == "connected" and row["peer_id"] not in live:
                row["state"] = "known"
        return rows


def run_daemon(config: Config, *, log_level_override: str | None = None) -> None:
    """Run a node on uvloop until SIGTERM/SIGINT; PeerfedError for clean startup failures."""
    import uvloop

    async def main() -> None:
        daemon = Daemon(config)
        daemon.log_level_override = log_level_override
        await daemon.run_until_stopped()

    uvloop.run(main())
