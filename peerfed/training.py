"""The training side of a node: trainer process, data plane (the exchange), gossip, state sync.

Owner: the daemon's main loop. ``Training`` is built by the daemon when train.enabled is
true (training_side.py has what the daemon asks of it, and the relay node's stand-in).
Importing this module imports torch: only nodes that train pay for it. Startup is split so that a taken port is reported at once: ``bind`` takes the
exchange port before anything slow, ``start`` spawns the trainer and serves the exchange once
the model is known, ``run`` does the state sync and then trains and gossips.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import asdict, dataclass

import torch

from peerfed.admission import GuardSetup, RosterPublisher, open_guard, why_not_exchange
from peerfed.config import Config
from peerfed.core.admission import GateStats, Roster
from peerfed.core.envelope import Verifier
from peerfed.core.exchange_rules import Outcome, upload_per_exchange
from peerfed.core.peerid import Signer
from peerfed.core.rates import parse_rate, stretched_interval
from peerfed.core.schedule import ExchangeScheduler
from peerfed.errors import ConfigError
from peerfed.net.addrs import advertised_host
from peerfed.net.dataplane import DataPlane
from peerfed.net.exchange import Exchange
from peerfed.net.exchange_state import ExchangeStats
from peerfed.net.gossip import GossipLoop
from peerfed.net.membership import Membership
from peerfed.net.pacing import LinkStats, Pacing
from peerfed.net.quiet import QuietLog
from peerfed.ops.metrics import Metrics
from peerfed.serving import ConnectionLimits, bind_listener
from peerfed.state_sync import plan_state_sync, run_state_sync
from peerfed.train.merging import MergeRule
from peerfed.train.supervisor import TrainerError, TrainerSupervisor
from peerfed.train.tasks import TrainSettings
from peerfed.training_side import TrainingSide

log = logging.getLogger("peerfed.training")
quiet = QuietLog(log)  # lines about a peer we skip: once a minute per peer

POLL_INTERVAL = 0.5  # seconds between two looks at the trainer (restarts, metrics)
MANIFEST_MAX_BYTES = 4096
TRAINER_START_TIMEOUT = 300.0


@dataclass(frozen=True)
class Exchanging:
    """The exchange's parts, built once the model (and so the size of its buffers) is known."""

    data_plane: DataPlane
    gossip: GossipLoop
    pacing: Pacing  # the rate caps and meters of every transfer (read by status(), any thread)
    guard: GuardSetup  # admission, limits, bans and TLS (peerfed/admission.py)
    roster: RosterPublisher  # tells the data plane whom it admits


class Training(TrainingSide):
    def __init__(self, config: Config, *, signer: Signer, peer_id: str, membership: Membership,
                 metrics: Metrics) -> None:
        torch.set_num_threads(1)  # the daemon only copies and merges; the cores are the trainer's
        self._config = config
        self._signer, self._peer_id = signer, peer_id
        self._membership = membership
        self._metrics = metrics
        m = config.merge
        self._trainer = TrainerSupervisor(TrainSettings.from_config(config), merge_rule=MergeRule(
            outer=m.outer, outer_lr=m.outer_lr, outer_momentum=m.outer_momentum, clip=m.clip))
        # The exchange port is taken now, before anything slow: a taken port is reported at once.
        self._listener = bind_listener(config.exchange.listen_host, config.exchange.listen_port,
                                       setting="exchange.listen")
        self._plane: Exchanging | None = None  # once start() knows the model
        self.exchange_url = ""
        self.fingerprint = ""
        self.state_sync = "none"

    async def start(self) -> None:
        """Spawn the trainer, wait until its model is built, serve the exchange."""
        self._trainer.start()
        try:
            info = await asyncio.to_thread(self._trainer.wait_ready, TRAINER_START_TIMEOUT)
        except TrainerError as exc:
            raise ConfigError(f"train: the trainer could not start: {exc}") from exc
        log.info("model ready on %s: %d parameters (%.1f MiB), fingerprint %s…, resumed from step %d",
                 info.device, info.numel, info.nbytes / 2**20, info.fingerprint[:12], info.resumed_step)
        self.fingerprint = info.fingerprint
        self._plane = plane = self._open_exchange()
        cfg = self._config
        port = await plane.data_plane.start_server(cfg.exchange.listen_host, cfg.exchange.listen_port,
                                                   self._listener)
        self.exchange_url = cfg.exchange.advertise_url or (f"{plane.guard.scheme}://"
            f"{advertised_host(cfg.exchange.listen_host, (*cfg.p2p.announce, *cfg.p2p.listen))}:{port}")
        self._membership.set_own_fields(tls_fingerprint=plane.guard.tls_fingerprint)  # clients pin it

    def _open_exchange(self) -> Exchanging:
        cfg, metrics = self._config, self._metrics
        verifier = Verifier(network=cfg.network, own_peer_id=self._peer_id, clock=time.time,
                            allowlist=_allowlist(cfg), max_size=MANIFEST_MAX_BYTES)
        setup = open_guard(cfg, peer_id=self._peer_id, verifier=verifier, on_ban=metrics.peer_banned)
        pacing = Pacing(max_upload_rate=parse_rate(cfg.exchange.max_upload_rate),
                        max_download_rate=parse_rate(cfg.exchange.max_download_rate),
                        max_upload_share=cfg.exchange.max_upload_share,
                        transfer_timeout=cfg.exchange.transfer_timeout,
                        connections=ConnectionLimits(max_per_address=cfg.admission.max_connections_per_address,
                                                     header_timeout=cfg.admission.header_timeout))
        exchange = Exchange(
            signer=self._signer, network=cfg.network, weights=self._trainer.weights, verifier=verifier,
            guard=setup.guard,
            max_incoming=cfg.exchange.max_incoming, connect_timeout=cfg.exchange.connect_timeout,
            transfer_timeout=cfg.exchange.transfer_timeout, on_rejected=metrics.rejected, encoding=cfg.exchange.encoding,
            on_finished=lambda role, outcome, duration, sent, got: metrics.exchange_finished(
                outcome, duration, sent, got),
            pacing=pacing,
        )
        data_plane = DataPlane(exchange)
        gossip = GossipLoop(
            scheduler=ExchangeScheduler(interval=self._interval(cfg), rng=random.Random(), now=time.monotonic()),
            # Only our own exchange in flight holds ours back: it has a slot of its own (issue 12);
            # and the upload budget: our push waits until the last minute leaves room for it.
            candidates=lambda: {} if data_plane.statistics().outgoing_now or not pacing.upload_budget_allows(
                self._push_bytes()) else self.candidates(),
            run_exchange=data_plane.exchange_with,
        )
        return Exchanging(data_plane, gossip, pacing, setup, RosterPublisher(data_plane.set_roster))

    def _interval(self, config: Config) -> float:
        """exchange.interval, stretched so that our average upload (our pushes, and about as
        many replies to others' pushes) stays below max_upload_share x max_upload_rate. Sized
        in the encoding we offer first ("auto": int8), not float32: a quarter of the bytes."""
        per_exchange = upload_per_exchange(config.exchange.encoding, self._trainer.weights.nbytes // 4)
        return stretched_interval(config.exchange.interval, per_exchange, parse_rate(config.exchange.max_upload_rate),
                                  config.exchange.max_upload_share)

    def _push_bytes(self) -> int:
        return upload_per_exchange(self._config.exchange.encoding, self._trainer.weights.nbytes // 4) // 2

    async def run(self) -> None:
        """State sync (a newcomer starts from a peer's model), then training, gossip and polls."""
        assert self._plane is not None, "start() comes first"
        plane = self._plane
        poll = asyncio.create_task(self._poll_trainer(), name="poll_trainer")
        try:
            cfg = self._config
            resumed = self._trainer.weights.ready_info.resumed_step > 0
            peers_known = bool(cfg.p2p.bootstrap) or len(self._membership.table) > 0
            plan = plan_state_sync(cfg.train.init, resumed=resumed, peers_known=peers_known)
            self.state_sync = plan.status
            if plan.sync:
                # A fresh random init is not ours to share until the sync replaces it;
                # resumed, trained weights are (the exchange starts with weights not ready).
                plane.data_plane.set_weights_ready(resumed)
                self.state_sync = await run_state_sync(self._trainer.weights, plane.data_plane.fetch_model,
                                                       self.candidates, plan.wait)
            plane.data_plane.set_weights_ready(True)
            await asyncio.to_thread(self._trainer.begin_training)
            await plane.gossip.run()
        finally:
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)

    async def stop(self) -> None:
        """Refuse new exchanges, cut one in flight (nothing of it is merged), and stop the
        trainer, which writes its final checkpoint."""
        closing = [asyncio.to_thread(self._trainer.stop, 8.0)]
        if self._plane is not None:
            self._plane.data_plane.stop_accepting()
            closing.append(self._plane.data_plane.close())
        await asyncio.gather(*closing)
        self._listener.close()

    def reload(self, config: Config) -> None:
        self._config = config
        if self._plane is not None:
            self._plane.data_plane.set_allowlist(_allowlist(config))
            self._plane.gossip.set_interval(self._interval(config))

    def candidates(self) -> dict[str, str]:
        """peer_id -> exchange URL of connected peers that train our model, not banned, and
        reachable the way our exchange requires (TLS with a pinned certificate, by default)."""
        roster = self._publish_roster()
        table = self._membership.table
        gate, found, now = self._gate(), {}, time.time()
        for peer_id in table.exchange_candidates(self.fingerprint):
            info = table.get(peer_id)
            if peer_id not in roster or info is None or not info.exchange_url:
                continue
            why = why_not_exchange(peer_id, info.exchange_url, pin=roster.pins[peer_id], gate=gate,
                                   require_tls=self._config.exchange.tls, now=now)
            if why:
                quiet.log(logging.INFO, f"peer {peer_id}", "not exchanging with %s: %s", peer_id, why)
                continue
            # Pairing: its URL, a tunnel over libp2p (a peer behind a NAT), or none for now.
            if url := self._membership.exchange_route(peer_id, info.exchange_url):
                found[peer_id] = url
        return found

    def _publish_roster(self, force: bool = False) -> Roster:
        """Tell the data plane which peers it admits now (connected ones), and return them."""
        return self._plane.roster.update(self._membership, force=force) if self._plane is not None else Roster()

    async def exchange_now(self, peer_id: str | None) -> dict[str, object]:
        """One exchange now, with ``peer_id`` or a random candidate (local API: tests, benchmarks)."""
        if self._plane is None:
            return {"outcome": "starting"}
        candidates = self.candidates()
        if peer_id is None and candidates:
            peer_id = random.choice(sorted(candidates))
        if peer_id is None or peer_id not in candidates:
            return {"outcome": "no_such_peer"}
        started = time.monotonic()
        outcome: Outcome = await self._plane.data_plane.exchange_with(peer_id, candidates[peer_id])
        return {"outcome": outcome.value, "peer_id": peer_id, "duration_s": time.monotonic() - started}

    def progress(self) -> int | None:
        """The trainer's heartbeat once it trains (the watchdog wants it to move); None before."""
        return self._trainer.progress_counter() if self._trainer.statistics().process.training else None

    def status(self) -> dict[str, object]:
        """The training part of /status (keys as they always were)."""
        stats = self._trainer.statistics()
        ex = self._plane.data_plane.statistics() if self._plane is not None else ExchangeStats()
        last = ex.last
        return {
            "step": stats.progress.step, "samples": stats.progress.samples,
            "metrics": dict(stats.evaluation.metrics), "loss": stats.progress.loss,
            "trainer": stats.as_status(), "state_sync": self.state_sync,
            "exchanges": {"ok": ex.ok, "refused": ex.refused, "failed": ex.failed, "busy": ex.busy},
            "bytes_sent": ex.bytes_sent, "bytes_received": ex.bytes_received,
            "last_exchange": None if last is None else {
                "peer_id": last.peer_id, "role": last.role, "outcome": last.outcome.value,
                "duration_s": round(last.duration_s, 4), "at": last.at},
            "exchange_rejected": dict(ex.rejected),
            "merges": {**asdict(self._trainer.weights.merge_statistics()),
                       "outer": self._config.merge.outer, "clip": self._config.merge.clip},
            "link": _link_status(self._plane.pacing.statistics() if self._plane is not None else LinkStats(),
                                 self._plane.gossip.statistics().interval if self._plane is not None else None),
            "admission": self._admission_status(),
        }

    def _admission_status(self) -> dict[str, object]:
        """/status "admission": peers admitted now, bans in force, bans and faults by reason."""
        gate = self._gate()
        return {"admitted": gate.admitted, "tls": self._config.exchange.tls,
                "tls_fingerprint": self._plane.guard.tls_fingerprint if self._plane is not None else "",
                "bans": list(self.banned().values()), "bans_total": dict(gate.bans_total),
                "offences": dict(gate.offences)}

    def banned(self) -> dict[str, dict[str, object]]:
        """peer_id -> its ban in force (for /status and `peerfed peers`)."""
        now = time.time()
        return {b.peer_id: b.as_json() for b in self._gate().bans if b.until > now}

    def _gate(self) -> GateStats:
        return self._plane.data_plane.gate_statistics() if self._plane is not None else GateStats()

    async def _poll_trainer(self) -> None:
        """Restart a dead trainer (the supervisor decides when) and feed /metrics."""
        restarts = 0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            self._trainer.poll()
            stats = self._trainer.statistics()
            progress, process = stats.progress, stats.process
            self._metrics.update_training(progress.step, progress.samples, progress.loss,
                                          stats.evaluation.metrics.get("accuracy"))
            for _ in range(process.restarts - restarts):
                self._metrics.trainer_restarted()
            restarts = process.restarts
            if process.last_checkpoint is not None:
                self._metrics.checkpoint_saved(process.last_checkpoint.time)
            self._metrics.set_peers_connected(len(self._membership.connected_peers()))
            merges = self._trainer.weights.merge_statistics()
            self._metrics.update_merges(merges.merges, merges.clipped)
            self._publish_roster(force=True)  # admission follows the peer table within POLL_INTERVAL
            self._metrics.set_peers_banned(len(self.banned()))
            if self._plane is not None:
                link = self._plane.pacing.statistics()
                self._metrics.update_link(link.upload_now, link.upload_avg, link.download_now, link.download_avg)


def _link_status(link: LinkStats, interval: float | None) -> dict[str, object]:
    """/status "link": payload bytes per second over the last 10 s and since start, the caps
    (null: unlimited), the exchange interval after stretching, transfers cut for slowness, and
    the share of the upload budget (max_upload_share x max_upload_rate) the last minute used."""
    budget = None if link.upload_budget_used is None else round(link.upload_budget_used, 3)
    return {"upload_rate_now": round(link.upload_now), "upload_rate_avg": round(link.upload_avg),
            "download_rate_now": round(link.download_now), "download_rate_avg": round(link.download_avg),
            "max_upload_rate": link.max_upload_rate, "max_download_rate": link.max_download_rate,
            "exchange_interval_s": interval, "transfers_cut_slow": link.slow_cuts, "upload_budget_used": budget}


def _allowlist(config: Config) -> frozenset[str] | None:
    return frozenset(config.p2p.allowlist) or None

