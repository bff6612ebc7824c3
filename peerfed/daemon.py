"""The composition root: build a node from its config, run it, stop it cleanly.

Owner: the main thread's event loop (uvloop) owns the Daemon and every part it builds; the
parts that run threads of their own (the libp2p host's trio thread, the data plane's loop,
the trainer process) say so in their modules and are reached only through their methods.

``Daemon.__init__`` builds the parts (nothing listens yet). ``start`` reads top to bottom:
take every port first (the exchange's, the local API's, then the libp2p host's), so a taken
port is reported within a second; then the trainer (model on its device), the exchange
server, membership, and in the background state sync, training and gossip. ``/healthz``
answers 503 "starting" until all of that is up. Anything that fails before the node is up
raises a PeerfedError with one clear line, which the CLI maps to an exit code.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from dataclasses import dataclass, field

from peerfed import __version__
from peerfed.config import Config, load_config
from peerfed.core.peerid import Signer
from peerfed.errors import PeerfedError
from peerfed.identity import load_identity, peer_id_of, signer_of
from peerfed.net.bridge import Bridge
from peerfed.net.membership import Membership, load_peer_table
from peerfed.net.p2p import P2PHost
from peerfed.net.reachability import ReachabilityService
from peerfed.net.relay import RelayService
from peerfed.ops.api import LocalAPI
from peerfed.ops.logs import set_level
from peerfed.ops.metrics import CONTENT_TYPE, Metrics
from peerfed.ops.systemd import Notifier, keep_service_manager_informed
from peerfed.training_side import NoTraining, TrainingSide
from peerfed.views import node_status, peer_rows, status_line

log = logging.getLogger("peerfed.daemon")

STOP_TIMEOUT = 10.0


@dataclass
class Lifecycle:
    """Where the daemon is between start and stop (touched on the main loop only)."""

    started_at: float = field(default_factory=time.time)
    up: bool = False  # READY=1 sent; a SIGHUP before that waits for it
    reload_pending: bool = False
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    def __init__(self, config: Config, *, log_level_override: str | None = None) -> None:
        self.config = config
        self.log_level_override = log_level_override
        key_pair = load_identity(config.identity)
        self.peer_id = peer_id_of(key_pair)
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self.bridge = Bridge()
        self.host = P2PHost(
            key_pair, network=config.network, listen=config.p2p.listen, announce=config.p2p.announce,
            bridge=self.bridge, on_request=self._on_p2p_request,
            on_connection_change=self._on_connection_change, max_connected=config.p2p.max_connections,
            relay=RelayService(config.p2p.relay_service, config.p2p.relay_max_bytes, config.p2p.relay_max_seconds),
        )
        # Membership exists before the host listens, so early peers get answers; its loops
        # (dialing, gossip, pings) start once we are fully up.
        peers_file = config.state_dir / "peers.json"
        self.membership = Membership(
            host=self.host, signer=signer_of(key_pair), network=config.network,
            table=load_peer_table(peers_file, self.peer_id, max_peers=config.p2p.max_peers),
            bootstrap=config.p2p.bootstrap, allowlist=frozenset(config.p2p.allowlist) or None,
            state_file=peers_file, on_rejected=self.metrics.rejected, max_connections=config.p2p.max_connections,
            reachability=ReachabilityService(self.host, port_mapping=config.p2p.port_mapping),
        )
        self.training = self._training_side(signer_of(key_pair))
        self.api = LocalAPI(host=config.api.host, port=config.api.port, status=self.status, peers=self.peers,
                            metrics=lambda: (self.metrics.render(), CONTENT_TYPE),
                            exchange_now=self.training.exchange_now, ready=lambda: self._life.up)
        self._tasks: list[asyncio.Task[None]] = []
        self._life = Lifecycle()

    def _training_side(self, signer: Signer) -> TrainingSide:
        if not self.config.train.enabled:
            return NoTraining()
        # Imported here: it imports torch, and only nodes that train pay for that.
        from peerfed.training import Training

        return Training(self.config, signer=signer, peer_id=self.peer_id, membership=self.membership,
                        metrics=self.metrics)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Every port first (the exchange's was taken when Training was built), so that a taken
        # one is reported within a second, not after the trainer's slow start.
        await self.api.start()        # /healthz says "starting" until we are up
        await self.bridge.start()
        addrs = await self.host.start()
        await self.training.start()   # the trainer builds its model; the exchange serves it
        self.membership.set_own_fields(exchange_url=self.training.exchange_url,
                                       fingerprint=self.training.fingerprint)
        await self.membership.start()
        self._tasks.append(asyncio.create_task(self.training.run(), name="training"))
        log.info("peerfed %s up as %s on network %r; p2p %s; exchange %s; api http://%s:%s",
                 __version__, self.peer_id, cfg.network, ", ".join(addrs), self.training.exchange_url or "off",
                 cfg.api.host, self.api.bound_port)

    async def stop(self) -> None:
        log.info("stopping")
        self.notifier.stopping()
        self._life.stop_requested.set()
        for task in self._tasks:
            task.cancel()             # aborts an outgoing exchange in flight
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.membership.stop()
        await self.training.stop()    # the final checkpoint need not wait for a cut-off exchange
        await self.api.stop()
        try:
            await asyncio.wait_for(self.host.stop(), 3)
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
        # Key loaded, listeners bound, model on its device (start waited for the trainer).
        self._life.up = True
        self.notifier.ready(self._status_line())
        if self._life.reload_pending:
            self._on_reload_signal()
        self._tasks.append(asyncio.create_task(
            keep_service_manager_informed(self.notifier, self._status_line, self.training.progress), name="notify"))
        await self._life.stop_requested.wait()
        await asyncio.wait_for(self.stop(), STOP_TIMEOUT + 5)

    def _on_stop_signal(self, sig: int) -> None:
        if self._life.stop_requested.is_set():
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received", signal.Signals(sig).name)
        self._life.stop_requested.set()

    def _on_reload_signal(self) -> None:
        if not self._life.up:
            log.info("SIGHUP during startup: reloading once the node is up")
            self._life.reload_pending = True
            return
        self._life.reload_pending = False
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except PeerfedError as exc:
            log.error("SIGHUP: keeping the running config; the new one is invalid: %s", exc)
            self.notifier.ready(self._status_line())
            return
        self.config = new
        self.membership.reload(bootstrap=new.p2p.bootstrap, allowlist=frozenset(new.p2p.allowlist) or None)
        self.training.reload(new)
        if self.log_level_override is None:
            set_level(new.log_level)
        log.info("SIGHUP: reloaded bootstrap list, allowlist, exchange interval and log level from %s", new.path)
        self.notifier.ready(self._status_line())

    # -- callbacks from the drivers and views for the local API ----------------------------

    async def _on_p2p_request(self, remote: str, data: bytes) -> bytes:
        return await self.membership.handle_request(remote, data)

    def _on_connection_change(self, peer_id: str, up: bool) -> None:
        self.membership.on_connection_change(peer_id, up)

    def status(self) -> dict[str, object]:
        return node_status(peer_id=self.peer_id, network=self.config.network, started_at=self._life.started_at,
                           host=self.host, membership=self.membership, training=self.training)

    def peers(self) -> list[dict[str, object]]:
        return peer_rows(self.membership, self.training.banned())

    def _status_line(self) -> str:
        return status_line(self.status())


def run_daemon(config: Config, *, log_level_override: str | None = None) -> None:
    """Run a node on uvloop until SIGTERM/SIGINT; PeerfedError for clean startup failures."""
    import uvloop

    async def main() -> None:
        await Daemon(config, log_level_override=log_level_override).run_until_stopped()

    uvloop.run(main())
