"""The composition root: build a node from its config, run it, stop it cleanly.

Startup reads top to bottom in ``Daemon.start``: identity, libp2p host (binds the swarm
port), trainer (model on its device), exchange server, local API, membership, then - in the
background - state sync and the gossip loop. Anything that fails before the node is up
raises a PeerfedError with one clear line, which the CLI maps to an exit code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from peerfed import __version__
from peerfed.config import Config, load_config
from peerfed.core.envelope import Verifier
from peerfed.errors import ConfigError, PeerfedError, TrainerUnavailable
from peerfed.identity import load_identity, peer_id_of, signer_of
from peerfed.net.bridge import Bridge
from peerfed.net.membership import Membership, load_peer_table
from peerfed.net.p2p import P2PHost, local_ipv4_addresses
from peerfed.ops.api import LocalAPI
from peerfed.ops.logs import set_level
from peerfed.ops.metrics import CONTENT_TYPE, Metrics
from peerfed.ops.systemd import Notifier, WatchdogGate, watchdog_interval

log = logging.getLogger("peerfed.daemon")

STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.5
SYNC_WAIT_AUTO = 10.0   # train.init = auto: how long to look for a donor before starting alone
MANIFEST_MAX_BYTES = 4096


class Daemon:
    def __init__(self, config: Config, *, log_level_override: str | None = None) -> None:
        self.config = config
        self.log_level_override = log_level_override
        self.key_pair = load_identity(config.identity)
        self.peer_id = peer_id_of(self.key_pair)
        self.signer = signer_of(self.key_pair)
        self.started_at = time.time()
        self.metrics = Metrics()
        self.notifier = Notifier.from_env()
        self._loop_ticks = 0
        self.bridge = Bridge()
        self.host: P2PHost | None = None
        self.membership: Membership | None = None
        self.api: LocalAPI | None = None
        self.trainer: Any = None      # TrainerSupervisor when training is enabled
        self.data_plane: Any = None   # DataPlane: the thread and loop the exchange runs on
        self.gossip: Any = None       # GossipLoop when training is enabled
        self.exchange_url = ""
        self.state_sync: str = "none"
        self._tasks: list[asyncio.Task[None]] = []
        self._stop_requested = asyncio.Event()
        self._up = False              # READY=1 sent; a SIGHUP before that waits for it
        self._reload_pending = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.bridge.start()
        self.host = P2PHost(
            self.key_pair, network=cfg.network, listen=cfg.p2p.listen, announce=cfg.p2p.announce,
            bridge=self.bridge, on_request=self._on_p2p_request,
            on_connection_change=self._on_connection_change, max_connected=cfg.p2p.max_peers,
        )
        # Membership exists before the host listens, so early peers get answers; its loops
        # (dialing, gossip, pings) start once we are fully up.
        self.membership = Membership(
            host=self.host, signer=self.signer, network=cfg.network,
            table=load_peer_table(self._peers_file, self.peer_id, max_peers=cfg.p2p.max_peers),
            bootstrap=cfg.p2p.bootstrap, allowlist=self._allowlist(), state_file=self._peers_file,
            on_rejected=self.metrics.rejected,
        )
        addrs = await self.host.start()
        if cfg.train.enabled:
            await self._start_training()
        self.api = LocalAPI(host=cfg.api.host, port=cfg.api.port, status=self.status, peers=self.peers,
                            metrics=self._render_metrics, exchange_now=self.exchange_now)
        await self.api.start()
        if self.trainer is not None:
            self.membership.set_own_fields(exchange_url=self.exchange_url, fingerprint=self.trainer.weights.fingerprint)
        await self.membership.start()
        if self.trainer is not None:
            self._tasks.append(asyncio.create_task(self._sync_then_train(), name="sync_then_train"))
            self._tasks.append(asyncio.create_task(self._poll_trainer(), name="poll_trainer"))
        log.info("peerfed %s up as %s on network %r; p2p %s; exchange %s; api http://%s:%s",
                 __version__, self.peer_id, cfg.network, ", ".join(addrs), self.exchange_url or "off",
                 cfg.api.host, self.api.bound_port)

    async def _start_training(self) -> None:
        import torch  # only nodes that train pay for importing torch

        from peerfed.core.schedule import ExchangeScheduler
        from peerfed.net.dataplane import DataPlane
        from peerfed.net.exchange import Exchange
        from peerfed.net.gossip import GossipLoop
        from peerfed.train.supervisor import TrainerError, TrainerSupervisor
        from peerfed.train.tasks import TrainSettings

        torch.set_num_threads(1)  # the daemon only copies and merges; cores are the trainer's
        cfg = self.config
        self.trainer = TrainerSupervisor(TrainSettings.from_config(cfg))
        self.trainer.start()
        try:
            info = await asyncio.to_thread(self.trainer.wait_ready, 300.0)
        except TrainerError as exc:
            raise ConfigError(f"train: the trainer could not start: {exc}") from exc
        log.info("model ready on %s: %d parameters (%.1f MiB), fingerprint %s…, resumed from step %d",
                 info.device, info.numel, info.nbytes / 2**20, info.fingerprint[:12], info.resumed_step)
        # The exchange runs on the data-plane thread (its own loop, lower CPU priority); its
        # callbacks only touch thread-safe prometheus metrics.
        exchange = Exchange(
            signer=self.signer, network=cfg.network, weights=self.trainer.weights, verifier=self._new_verifier(),
            max_incoming=cfg.exchange.max_incoming, connect_timeout=cfg.exchange.connect_timeout,
            transfer_timeout=cfg.exchange.transfer_timeout, on_rejected=self.metrics.rejected,
            on_finished=lambda role, outcome, duration, sent, got: self.metrics.exchange_finished(
                outcome, duration, sent, got),
        )
        self.data_plane = DataPlane(exchange)
        port = await self.data_plane.start_server(cfg.exchange.listen_host, cfg.exchange.listen_port)
        self.exchange_url = cfg.exchange.advertise_url or f"http://{self._advertised_host()}:{port}"
        self.gossip = GossipLoop(
            scheduler=ExchangeScheduler(interval=cfg.exchange.interval, rng=random.Random(), now=time.monotonic()),
            candidates=lambda: {} if self.data_plane.statistics().busy_now else self._exchange_candidates(),
            run_exchange=self.data_plane.exchange_with,
        )

    async def _sync_then_train(self) -> None:
        """State sync (a newcomer starts from a peer's model), then training and gossip."""
        init = self.config.train.init
        resumed = self.trainer.weights.ready_info.resumed_step > 0
        peers_known = bool(self.config.p2p.bootstrap) or len(self.membership.table) > 0
        if init == "peer" or (init == "auto" and not resumed and peers_known):
            # A fresh random init is not ours to share until the sync replaces it (Exchange
            # starts with weights_ready False); resumed, trained weights are.
            self.data_plane.set_weights_ready(resumed)
            self.state_sync = "waiting for a peer's model"
            self.state_sync = await self._state_sync(wait=None if init == "peer" else SYNC_WAIT_AUTO)
        elif resumed:
            self.state_sync = "skipped (resumed from checkpoint)"
        else:
            self.state_sync = "skipped (train.init = local)" if init == "local" else "skipped (no peers known)"
        self.data_plane.set_weights_ready(True)
        await asyncio.to_thread(self.trainer.begin_training)
        self._tasks.append(asyncio.create_task(self.gossip.run(), name="gossip"))

    async def _state_sync(self, wait: float | None) -> str:
        import torch


        deadline = None if wait is None else time.monotonic() + wait
        buffer = torch.empty(self.trainer.weights.numel, dtype=torch.float32)
        say_waiting_at = time.monotonic() + 60.0
        while deadline is None or time.monotonic() < deadline:
            candidates = self._exchange_candidates()
            if time.monotonic() >= say_waiting_at:  # train.init = peer waits as long as it takes
                say_waiting_at += 600.0
                log.warning("state sync: still waiting for a peer's model; %d peers with this model known, "
                            "none gave one (a peer that is itself waiting for one answers 'not ready')",
                            len(candidates))
            for peer_id, url in candidates.items():
                manifest = await self.data_plane.fetch_model(peer_id, url, buffer)
                if manifest is None:
                    continue
                clock = (manifest.schedule_step, manifest.seconds_trained)
                try:
                    await asyncio.to_thread(self.trainer.weights.load_weights, buffer, clock)
                except TrainerUnavailable as exc:  # it restarted meanwhile: fetch again once it is back
                    log.warning("state sync: trainer unavailable (%s); trying again", exc)
                    break
                log.info("state sync: starting from %s's model (its lr clock: step %d, %.0f s trained)",
                         peer_id, manifest.schedule_step, manifest.seconds_trained)
                return f"from {peer_id}"
            await asyncio.sleep(1.0)
        log.info("state sync: no peer with this model answered within %.0f s; starting from local init", wait)
        return "none (no donor)"

    async def _poll_trainer(self) -> None:
        restarts = 0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self.trainer.poll()
            stats = self.trainer.statistics()
            self.metrics.update_training(stats.step, stats.samples, stats.loss, stats.metrics.get("accuracy"))
            for _ in range(stats.restarts - restarts):
                self.metrics.trainer_restarted()
            restarts = stats.restarts
            if stats.last_checkpoint is not None:
                self.metrics.checkpoint_saved(stats.last_checkpoint.time)
            if self.membership is not None:
                self.metrics.set_peers_connected(len(self.membership.connected_peers()))

    async def stop(self) -> None:
        log.info("stopping")
        self.notifier.stopping()
        self._stop_requested.set()
        if self.data_plane is not None:
            self.data_plane.stop_accepting()  # refuse new exchanges at once
        for task in self._tasks:
            task.cancel()                     # aborts an outgoing exchange in flight
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.membership is not None:
            await self.membership.stop()
        # The final checkpoint need not wait for a cut-off exchange (nothing of it is merged).
        closing = [self.data_plane.close()] if self.data_plane is not None else []
        if self.trainer is not None:
            closing.append(asyncio.to_thread(self.trainer.stop, 8.0))   # writes the final checkpoint
        await asyncio.gather(*closing)
        if self.api is not None:
            await self.api.stop()
        if self.host is not None:
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
        self._up = True
        self.notifier.ready(self._status_line())
        if self._reload_pending:
            self._on_reload_signal()
        self._tasks.append(asyncio.create_task(self._notify_loop(), name="notify"))
        await self._stop_requested.wait()
        await asyncio.wait_for(self.stop(), STOP_TIMEOUT + 5)

    def _on_stop_signal(self, sig: int) -> None:
        if self._stop_requested.is_set():
            log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(1)
        log.info("%s received", signal.Signals(sig).name)
        self._stop_requested.set()

    def _on_reload_signal(self) -> None:
        if not self._up:
            log.info("SIGHUP during startup: reloading once the node is up")
            self._reload_pending = True
            return
        self._reload_pending = False
        self.notifier.reloading()
        try:
            new = load_config(self.config.path)
        except PeerfedError as exc:
            log.error("SIGHUP: keeping the running config; the new one is invalid: %s", exc)
            self.notifier.ready(self._status_line())
            return
        self.config = new
        if self.membership is not None:
            self.membership.reload(bootstrap=new.p2p.bootstrap, allowlist=self._allowlist())
        if self.data_plane is not None and self.gossip is not None:
            self.data_plane.set_allowlist(self._allowlist())
            self.gossip.set_interval(new.exchange.interval)
        if self.log_level_override is None:
            set_level(new.log_level)
        log.info("SIGHUP: reloaded bootstrap list, allowlist, exchange interval and log level from %s", new.path)
        self.notifier.ready(self._status_line())

    async def _notify_loop(self) -> None:
        """STATUS= every few seconds; WATCHDOG=1 only while the loop and the trainer progress."""
        interval = watchdog_interval()
        gate = WatchdogGate(interval) if interval else None
        last_status = 0.0
        while True:
            await asyncio.sleep(min(interval or 5.0, 1.0))
            self._loop_ticks += 1   # this line running at all is the event loop's progress
            now = time.monotonic()
            if gate is not None:
                training = self.trainer is not None and self.trainer.statistics().training
                # Before training begins (state sync) there is no trainer heartbeat to ask for.
                trainer_progress = self.trainer.progress_counter() if training else self._loop_ticks
                if gate.should_ping(now, self._loop_ticks, trainer_progress):
                    self.notifier.watchdog()
            if now - last_status >= 5.0:
                self.notifier.status(self._status_line())
                last_status = now

    def _status_line(self) -> str:
        peers = len(self.membership.connected_peers()) if self.membership else 0
        parts = [f"peers {peers}"]
        if self.trainer is not None:
            stats = self.trainer.statistics()
            parts.append(f"step {stats.step}")
            if stats.metrics.get("accuracy") is not None:
                parts.append(f"accuracy {stats.metrics['accuracy']:.3f}")
        last = self.data_plane.statistics().last if self.data_plane is not None else None
        if last:
            parts.append(f"last exchange {last.outcome} {time.time() - last.at:.0f} s ago")
        return ", ".join(parts)

    # -- callbacks from the drivers --------------------------------------------------------

    async def _on_p2p_request(self, remote: str, data: bytes) -> bytes:
        if self.membership is None:
            raise ConnectionRefusedError("starting up")
        return await self.membership.handle_request(remote, data)

    def _on_connection_change(self, peer_id: str, up: bool) -> None:
        if self.membership is not None:
            self.membership.on_connection_change(peer_id, up)

    async def exchange_now(self, peer_id: str | None) -> dict[str, Any]:
        """Local API: one exchange now, with ``peer_id`` or a random candidate (tests, benchmarks)."""
        if self.data_plane is None:
            return {"outcome": "disabled"}
        candidates = self._exchange_candidates()
        if peer_id is None and candidates:
            peer_id = random.choice(sorted(candidates))
        if peer_id not in candidates:
            return {"outcome": "no_such_peer"}
        started = time.monotonic()
        outcome = await self.data_plane.exchange_with(peer_id, candidates[peer_id])
        return {"outcome": outcome, "peer_id": peer_id, "duration_s": time.monotonic() - started}

    # -- helpers --------------------------------------------------------------------------

    @property
    def _peers_file(self) -> Path:
        return self.config.state_dir / "peers.json"

    def _allowlist(self) -> frozenset[str] | None:
        return frozenset(self.config.p2p.allowlist) or None

    def _new_verifier(self) -> Verifier:
        return Verifier(network=self.config.network, own_peer_id=self.peer_id, clock=time.time,
                        allowlist=self._allowlist(), max_size=MANIFEST_MAX_BYTES)

    def _advertised_host(self) -> str:
        """Where peers reach our exchange port when exchange.advertise_url is not set."""
        host = self.config.exchange.listen_host
        if host not in ("0.0.0.0", "::", ""):
            return f"[{host}]" if ":" in host else host
        for addr in (*self.config.p2p.announce, *self.config.p2p.listen):
            parts = addr.split("/")
            if len(parts) > 2 and parts[1] == "ip4" and parts[2] != "0.0.0.0":
                return parts[2]
        return local_ipv4_addresses()[0] if local_ipv4_addresses() else "127.0.0.1"

    def _exchange_candidates(self) -> dict[str, str]:
        if self.membership is None or self.trainer is None:
            return {}
        live = set(self.membership.connected_peers())
        table = self.membership.table
        out = {}
        for peer_id in table.exchange_candidates(self.trainer.weights.fingerprint):
            info = table.get(peer_id)
            if peer_id in live and info is not None and info.exchange_url:
                out[peer_id] = info.exchange_url
        return out

    def _render_metrics(self) -> tuple[bytes, str]:
        return self.metrics.render(), CONTENT_TYPE

    # -- views for the local API ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        connected = self.membership.connected_peers() if self.membership else []
        status: dict[str, Any] = {
            "peer_id": self.peer_id,
            "network": self.config.network,
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 3),
            "peers_connected": len(connected),
            "addrs": self.host.addrs() if self.host else [],
            "exchange_url": self.exchange_url,
        }
        if self.trainer is not None:
            stats = self.trainer.statistics()
            status.update(step=stats.step, samples=stats.samples, metrics=dict(stats.metrics),
                          loss=stats.loss, trainer=dataclasses.asdict(stats), state_sync=self.state_sync)
        if self.data_plane is not None:
            ex = self.data_plane.statistics()
            status["exchanges"] = {k: getattr(ex, k) for k in ("ok", "refused", "failed", "busy")}
            status["bytes_sent"], status["bytes_received"] = ex.bytes_sent, ex.bytes_received
            status["last_exchange"] = dataclasses.asdict(ex.last) if ex.last is not None else None
            status["exchange_rejected"] = dict(ex.rejected)
        status["membership"] = dataclasses.asdict(self.membership.statistics()) if self.membership else {}
        return status

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
        await Daemon(config, log_level_override=log_level_override).run_until_stopped()

    uvloop.run(main())
