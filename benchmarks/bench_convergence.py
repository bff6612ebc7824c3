"""Convergence of gossip averaging on digits (design.md section 6) vs all-reduce and local-only.

Run: python benchmarks/bench_convergence.py [--nodes 16] [--epochs 60] [--seeds 0,1,2]
         [--models digits-lr,digits-mlp] [--splits iid,1.0,0.1] [--interval 1] [--lr 0.05]
         [--lr-decay none|cosine] [--encoding float32,int8] [--merge-base wire|exact]
         [--outer none,nesterov,noloco] [--outer-lr 0.7] [--outer-momentum 0.9] [--clip 0,2]
     python benchmarks/bench_convergence.py --lr 0.4 --lr-decay cosine   # meets the targets
     python benchmarks/bench_convergence.py --real        # + one configuration with real daemons

THIS IS A SIMULATION of the protocol's math and schedule, not real daemons: the nodes live in
one process and share a simulated clock in which every node takes one local step per tick
(the same rate for all); gossip rounds open at their own jittered times, resolved to 1/10 of
a tick (``--subticks``). It uses the real pieces: peerfed.train.tasks (the same Dirichlet
shards, models, batch streams, optimizer), peerfed.averaging (merge_ on the flat buffers
the trainer binds its model to) and peerfed.core.schedule.ExchangeScheduler
(when a round opens, whom to pick, busy peers). An exchange is a push-pull: both sides take a
snapshot, and ``--exchange-steps`` ticks later (local steps taken meanwhile) both merge
x <- x + a (peer - sent), with a from the samples of both sides by the rule of
peerfed.averaging.bounded_mixing_weight (printed in the header). A node in an
exchange answers "busy" and takes no other one, as with exchange.max_incoming = 1.

One epoch = samples processed by all nodes together / 1437. Baselines in the same run, with
the same lr, batch and total samples: all-reduce (one model; every tick each node's batch of
its own shard, gradients averaged: synchronous data-parallel SGD), central (one model on the
union, batch 32, as many sequential steps as it takes to see the same samples) and local-only
(no exchange). Printed per model and split: mean and worst node test accuracy (360 held-out
digits) over the seeds, and the payload bytes each node sent (wire bytes per exchange; HTTP
headers and the signed manifest, under 1 KiB per exchange, are not counted).
Targets: gossip mean within 0.5 points of all-reduce for iid and alpha 1.0, 1.0 for alpha 0.1.

--encoding float32,float16,bfloat16,int8 (comma list: rows per encoding): each snapshot a node
receives has gone through peerfed.codecs encode + decode (what a peer would merge), and the
bytes counted are the encoding's wire bytes. --merge-base says what a node subtracts in
x <- x + a (received - base): "wire" (default), the decoded bytes it sent itself
(codecs.encode_rounded_), so that a pair that agrees stays put and the pair's sum is kept;
"exact", its float32 snapshot. Target: within 0.3 points of float32 at equal exchange counts
(printed as "d f32").
--outer none,nesterov,noloco (comma list): the merge is peerfed.averaging.outer_step_ with
--outer-lr and --outer-momentum (nesterov: DiLoCo's Nesterov SGD on the pseudo-gradient;
noloco: its heavy-ball form, NoLoCo's step); every node keeps outer weights and a momentum
buffer from the start. "d none" = gossip mean minus that of the same row without outer step.

--clip 0,1,2,4 (comma list: rows per factor): merge.clip, the robust merge
(peerfed.train.merging.Merger, the daemon's own code): the peer's difference is clipped to
factor x the node's own movement since its last merge; 0 = off. With --outer nesterov the
Merger does the outer step too (noloco keeps outer_step_ directly, unclipped).

--real runs one configuration (default 8 nodes, alpha 0.1, digits-mlp) with real daemons
(LocalSwarm), whose trainers are throttled by --real-step-sleep so that exchange.interval
spans about --interval local steps, and the simulation of the same configuration, side by side.
"""

from __future__ import annotations

import argparse
import base64
import math
import random
import statistics
import time
import urllib.request
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from peerfed import codecs
from peerfed.averaging import (
    MAX_WEIGHT_RATIO,
    FlatLayout,
    bind_to_flat,
    bounded_mixing_weight,
    merge_,
    outer_step_,
    start_outer_,
    unflatten_from,
)
from peerfed.core.schedule import ExchangeScheduler
from peerfed.train.merging import Merger, MergeRule
from peerfed.train.tasks import BUILTIN_TASKS, NodeContext, Task, TrainSettings

TRAIN_SIZE = 1437
TARGET_POINTS = {"iid": 0.5, "1.0": 0.5, "0.1": 1.0}


@dataclass(frozen=True)
class SimConfig:
    model: str = "digits-mlp"
    split: str = "iid"  # "iid" or a Dirichlet alpha
    seed: int = 0
    nodes: int = 16
    epochs: float = 60.0
    interval: float = 1.0  # exchange.interval in local steps
    exchange_steps: int = 0  # local steps taken while an exchange is in flight
    subticks: int = 10  # time resolution of the exchange schedule, per local step
    lr: float = 0.05
    batch: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_decay: str = "none"  # "cosine": a what-if; the product's tasks have a constant lr
    encoding: str = "float32"  # what the snapshots go through on the wire (peerfed.codecs)
    outer: str = "none"  # "nesterov" | "noloco": averaging.outer_step_ at each exchange
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    merge_base: str = "wire"  # "exact": merge against the float32 snapshot, not what was sent
    clip: float = 0.0  # merge.clip: the robust merge's radius factor (0 = off)

    def lr_at(self, done: float) -> float:
        """The learning rate once a fraction ``done`` of the samples has been processed."""
        if self.lr_decay == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
        return self.lr

    def options(self) -> dict[str, Any]:
        # The split seed follows the run seed: the 3 seeds also mean 3 data partitions.
        return {"alpha": self.split, "split_seed": self.seed, "momentum": self.momentum,
                "weight_decay": self.weight_decay}

    def settings(self, index: int) -> TrainSettings:
        return TrainSettings(task=self.model, batch_size=self.batch, lr=self.lr, seed=self.seed,
                             node_index=index, node_count=self.nodes, options=self.options())


@dataclass
class SimNode:
    index: int
    task: Task
    flat: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: ExchangeScheduler
    samples: int = 0
    bytes_sent: int = 0
    exchanges: int = 0
    busy_until: float = -1.0
    outer: torch.Tensor | None = None  # outer weights and momentum (--outer noloco)
    momentum: torch.Tensor | None = None
    merger: Merger | None = None  # the daemon's merge (--outer none|nesterov, --clip)

    def step(self) -> int:
        x, y = next(self.task.train_batches)
        loss = self.task.loss_fn(self.task.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.samples += len(y)
        return len(y)


@dataclass
class Flight:
    """One push-pull in flight: what each side sent, merged when it lands."""

    a: SimNode
    b: SimNode
    sent_a: torch.Tensor
    sent_b: torch.Tensor
    lands_at: float


@dataclass
class RunResult:
    accuracies: list[float]
    bytes_sent: list[int] = field(default_factory=list)
    exchanges: list[int] = field(default_factory=list)
    epochs: float = 0.0


def make_node(cfg: SimConfig, index: int) -> SimNode:
    task = BUILTIN_TASKS[cfg.model](cfg.settings(index), NodeContext(index, cfg.nodes, cfg.seed))
    layout = FlatLayout.from_model(task.model)
    flat = layout.new_buffer()
    bind_to_flat(task.model, flat)  # as the trainer does: the optimizer writes into flat
    scheduler = ExchangeScheduler(interval=cfg.interval, rng=random.Random(cfg.seed * 7919 + index), now=0.0)
    node = SimNode(index, task, flat, task.make_optimizer(task.model.parameters()), scheduler)
    if cfg.outer == "noloco":
        node.outer, node.momentum = torch.empty_like(flat), torch.empty_like(flat)
        start_outer_(node.outer, node.momentum, flat)
    else:
        node.merger = Merger(MergeRule(outer=cfg.outer, outer_lr=cfg.outer_lr, outer_momentum=cfg.outer_momentum,
                                       clip=cfg.clip), flat.numel())
        node.merger.restart(flat)
    return node


class Views(Protocol):
    """Who may exchange with whom (bench_partial_view.py): a partial view per node."""

    def tick(self, now: float) -> None: ...
    def of(self, index: int) -> list[str]: ...


def run_gossip(cfg: SimConfig, exchange: bool = True, views: Views | None = None) -> RunResult:
    nodes = [make_node(cfg, i) for i in range(cfg.nodes)]
    rng = random.Random(cfg.seed)
    target = cfg.epochs * TRAIN_SIZE
    flights: list[Flight] = []
    total, tick = 0, 0
    while total < target:
        tick += 1
        _set_lr([n.optimizer for n in nodes], cfg.lr_at(total / target))
        for node in nodes:
            total += node.step()
        if not exchange:
            continue
        # Exchanges take milliseconds, steps may be faster or slower: rounds open at their
        # own (jittered) times within the tick, at a resolution of 1/subticks of a step.
        for sub in range(cfg.subticks):
            now = tick + sub / cfg.subticks
            for flight in [f for f in flights if f.lands_at <= now]:
                flights.remove(flight)
                _land(flight, cfg)
            if views is not None:
                views.tick(now)
            for node in rng.sample(nodes, len(nodes)):
                _gossip_round(node, nodes, flights, now, cfg, views)
    for flight in flights:  # let the last ones land: their bytes were counted
        _land(flight, cfg)
    return RunResult(
        accuracies=[n.task.evaluate(n.task.model)["accuracy"] for n in nodes],
        bytes_sent=[n.bytes_sent for n in nodes], exchanges=[n.exchanges for n in nodes],
        epochs=total / TRAIN_SIZE,
    )


def _set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def _gossip_round(node: SimNode, nodes: list[SimNode], flights: list[Flight], now: float, cfg: SimConfig,
                  views: Views | None = None) -> None:
    """What GossipLoop does for ``node`` at ``now``: ask the scheduler, try peers until one
    is not busy. An exchange occupies both sides until it lands (with 0 steps in flight: for
    the rest of this sub-tick, so a node takes part in one exchange at a time)."""
    if node.busy_until >= now:
        return  # the real daemon offers no candidates while it is in an exchange
    others = [str(n.index) for n in nodes if n is not node] if views is None else views.of(node.index)
    while (choice := node.scheduler.choose_peer(others, now)) is not None:
        peer = nodes[int(choice)]
        node.scheduler.begin(choice, now)
        if peer.busy_until >= now:
            node.scheduler.on_result(choice, "busy", now)
            continue
        flight = Flight(node, peer, node.flat.clone(), peer.flat.clone(), now + cfg.exchange_steps)
        node.busy_until = peer.busy_until = flight.lands_at
        if cfg.exchange_steps == 0:
            _land(flight, cfg)
        else:
            flights.append(flight)
        node.scheduler.on_result(choice, "ok", now)
        return


def alpha_of(own_samples: int, peer_samples: int) -> float:
    """The share of the peer's model in our merge, with the rule the exchange uses."""
    return float(bounded_mixing_weight(own_samples, peer_samples))


def alpha_rule() -> str:
    return f"peerfed.averaging.bounded_mixing_weight (peer's claim clamped to {MAX_WEIGHT_RATIO}x ours)"


def _send(f: Flight, cfg: SimConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides' snapshots as the peers decode them; with merge_base "wire" each side's own
    snapshot is replaced by that too (codecs.encode_rounded_, as a sender would do it)."""
    if cfg.encoding == "float32":
        return f.sent_a, f.sent_b
    wires = []
    for sent in (f.sent_a, f.sent_b):
        wire = bytearray(codecs.wire_length(cfg.encoding, sent.numel()))
        if cfg.merge_base == "wire":
            codecs.encode_rounded_(cfg.encoding, sent, wire)
        else:
            codecs.encode_into(cfg.encoding, sent, wire)
        wires.append(wire)
    received = [torch.empty_like(f.sent_a), torch.empty_like(f.sent_b)]
    for wire, out in zip(wires, received, strict=True):
        codecs.WireDecoder(cfg.encoding, out).feed(wire)
    return received[0], received[1]


def _merge(node: SimNode, sent: torch.Tensor, received: torch.Tensor, weight: float, cfg: SimConfig) -> None:
    if node.merger is not None:
        node.merger.apply_(node.flat, sent, received, node.merger.weight(sent, received, weight))
    elif node.outer is None or node.momentum is None:
        merge_(node.flat, sent, received, weight)
    else:
        outer_step_(node.flat, sent, received, weight, node.outer, node.momentum, lr=cfg.outer_lr,
                    beta=cfg.outer_momentum, nesterov=cfg.outer == "nesterov")


def _land(f: Flight, cfg: SimConfig) -> None:
    a_weight = alpha_of(f.a.task.num_samples, f.b.task.num_samples)
    b_weight = alpha_of(f.b.task.num_samples, f.a.task.num_samples)
    with torch.no_grad():
        from_a, from_b = _send(f, cfg)  # what b receives from a, what a receives from b
        _merge(f.a, f.sent_a, from_b, a_weight, cfg)
        _merge(f.b, f.sent_b, from_a, b_weight, cfg)
    for node in (f.a, f.b):
        node.bytes_sent += codecs.wire_length(cfg.encoding, node.flat.numel())
        node.exchanges += 1


def run_allreduce(cfg: SimConfig) -> RunResult:
    """Synchronous data-parallel SGD: one model, each tick the union of the nodes' batches."""
    tasks = [BUILTIN_TASKS[cfg.model](cfg.settings(i), NodeContext(i, cfg.nodes, cfg.seed)) for i in range(cfg.nodes)]
    model, loss_fn = tasks[0].model, tasks[0].loss_fn  # every node starts from this init
    optimizer = tasks[0].make_optimizer(model.parameters())
    target, total = cfg.epochs * TRAIN_SIZE, 0
    while total < target:
        _set_lr([optimizer], cfg.lr_at(total / target))
        batches = [next(t.train_batches) for t in tasks]
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        loss = loss_fn(model(x), y)  # mean over the union = the averaged gradients
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += len(y)
    return RunResult([tasks[0].evaluate(model)["accuracy"]], epochs=total / TRAIN_SIZE)


def run_central(cfg: SimConfig) -> RunResult:
    """One model on the union of all shards, batch ``cfg.batch``, the same total samples."""
    task = BUILTIN_TASKS[cfg.model](replace(cfg, nodes=1).settings(0), NodeContext(0, 1, cfg.seed))
    batches = task.train_batches  # one node: its shard is the whole train set
    optimizer = task.make_optimizer(task.model.parameters())
    target, total = cfg.epochs * TRAIN_SIZE, 0
    while total < target:
        _set_lr([optimizer], cfg.lr_at(total / target))
        x, y = next(batches)
        loss = task.loss_fn(task.model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += len(y)
    return RunResult([task.evaluate(task.model)["accuracy"]], epochs=total / TRAIN_SIZE)


# ------------------------------------------------------------------ the grid and its report


def pct(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):5.1f}"


def run_grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    baselines: dict[tuple[Any, ...], tuple[float, float, float, float]] = {}
    for model in args.models.split(","):
        for split in args.splits.split(","):
            for interval in [float(v) for v in args.interval.split(",")]:
                for lr in [float(v) for v in args.lr.split(",")]:
                    for outer in args.outer.split(","):
                        for encoding in args.encoding.split(","):
                            for clip in [float(v) for v in args.clip.split(",")]:
                                rows.append(run_row(model, split, interval, lr, encoding, outer, args, baselines,
                                                    clip=clip))
    return rows


def run_row(model: str, split: str, interval: float, lr: float, encoding: str, outer: str,
            args: argparse.Namespace, baselines: dict[tuple[Any, ...], tuple[float, float, float, float]],
            clip: float = 0.0) -> dict[str, Any]:
    started = time.perf_counter()
    out: dict[str, Any] = {"model": model, "split": split, "interval": interval, "lr": lr,
                           "encoding": encoding, "outer": outer, "clip": clip,
                           "gossip": [], "gossip_worst": [], "local": [], "local_worst": [], "allreduce": [],
                           "central": [], "bytes": [], "exchanges": [], "epochs": []}
    for seed in [int(s) for s in args.seeds.split(",")]:
        cfg = SimConfig(model=model, split=split, seed=seed, nodes=args.nodes, epochs=args.epochs,
                        interval=interval, exchange_steps=args.exchange_steps, lr=lr, batch=args.batch,
                        momentum=args.momentum, lr_decay=args.lr_decay, subticks=args.subticks,
                        encoding=encoding, outer=outer, outer_lr=args.outer_lr,
                        outer_momentum=args.outer_momentum, merge_base=args.merge_base, clip=clip)
        g = run_gossip(cfg)
        out["gossip"].append(statistics.mean(g.accuracies))
        out["gossip_worst"].append(min(g.accuracies))
        out["bytes"].append(statistics.median(g.bytes_sent))
        out["exchanges"].append(statistics.mean(g.exchanges))
        out["epochs"].append(g.epochs)
        if not args.no_baselines:
            key = (model, split, interval, lr, seed)  # the baselines neither encode nor step outside
            if key not in baselines:
                local = run_gossip(cfg, exchange=False)
                baselines[key] = (statistics.mean(local.accuracies), min(local.accuracies),
                                  run_allreduce(cfg).accuracies[0], run_central(cfg).accuracies[0])
            for name, value in zip(("local", "local_worst", "allreduce", "central"), baselines[key], strict=True):
                out[name].append(value)
    out["seconds"] = time.perf_counter() - started
    return out


def _delta(rows: list[dict[str, Any]], r: dict[str, Any], **like: object) -> str:
    """Gossip mean of ``r`` minus that of the row that differs only in ``like``, in points."""
    same = ("model", "split", "interval", "lr", "encoding", "outer", "clip")
    match = [o for o in rows if all(o[k] == like.get(k, r[k]) for k in same)]
    if not match or match[0] is r:
        return "-"
    return f"{100 * (statistics.mean(r['gossip']) - statistics.mean(match[0]['gossip'])):+.2f}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\n{'model':<11} {'split':>5} {'intv':>4} {'lr':>5} {'enc':>8} {'outer':>8} {'clip':>4} | {'all-red':>7} {'central':>7} | "
          f"{'gossip mean':>11} {'worst':>5} | {'local mean':>10} {'worst':>5} | {'gap AR':>6} {'target':>6} "
          f"{'gap C':>5} | {'d f32':>6} {'d none':>6} {'d clip0':>7} | {'bytes/node':>10} {'exch/node':>9} {'epochs':>6}")
    for r in rows:
        gossip = 100 * statistics.mean(r["gossip"])
        line = f"{r['model']:<11} {r['split']:>5} {r['interval']:>4g} {r['lr']:>5g} {r['encoding']:>8} {r['outer']:>8} {r['clip']:>4g} | "
        if r["allreduce"]:
            allreduce = 100 * statistics.mean(r["allreduce"])
            central = 100 * statistics.mean(r["central"])
            gap = allreduce - gossip
            verdict = "MET" if gap <= TARGET_POINTS.get(r["split"], 1.0) else "MISSED"
            line += (f"{allreduce:7.1f} {central:7.1f} | {gossip:11.1f} {100 * min(r['gossip_worst']):5.1f} | "
                     f"{pct(r['local']):>10} {100 * min(r['local_worst']):5.1f} | {gap:6.2f} {verdict:>6} "
                     f"{central - gossip:5.1f} | ")
        else:
            line += (f"{'-':>7} {'-':>7} | {gossip:11.1f} {100 * min(r['gossip_worst']):5.1f} | {'-':>10} {'-':>5} | "
                     f"{'-':>6} {'-':>6} {'-':>5} | ")
        line += (f"{_delta(rows, r, encoding='float32'):>6} {_delta(rows, r, outer='none'):>6} "
                 f"{_delta(rows, r, clip=0.0):>7} | ")
        line += (f"{_bytes(statistics.mean(r['bytes'])):>10} {statistics.mean(r['exchanges']):9.0f} "
                 f"{statistics.mean(r['epochs']):6.1f}")
        print(line)
    print("(accuracies in %, mean over seeds; 'worst' = worst node over all seeds; gap AR = all-reduce minus gossip "
          "mean, gap C = central minus gossip mean, in points; target: gap AR <= 0.5 for iid and alpha 1.0, "
          "<= 1.0 for alpha 0.1; d f32 / d none: gossip mean minus that of the same row in float32 / without outer "
          "step; d clip0: minus the same row without clipping (encodings: target within 0.3); bytes/node: wire bytes sent; exch/node counts both roles)")


def _bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


# ------------------------------------------------------------------ --real: one configuration with daemons


def fetch_model(node: Any, network: str, fingerprint: str, as_peer: Any) -> torch.Tensor:
    """GET /v1/model (state sync endpoint) from a daemon, signed with the key of ``as_peer``, a
    daemon connected to it (a node admits model requests from its connected peers only)."""
    import ssl

    from peerfed.core.envelope import ModelRequest, seal
    from peerfed.identity import load_identity, signer_of
    from peerfed.net.transfer import REQUEST_HEADER

    signer = signer_of(load_identity(as_peer.home / "identity.key"))
    sealed = seal(signer, network=network, recipient=node.peer_id,
                  body=ModelRequest(fingerprint=fingerprint), now=time.time())
    scheme = node.get("/status")["exchange_url"].split("://")[0]
    request = urllib.request.Request(f"{scheme}://127.0.0.1:{node.exchange_port}/v1/model",
                                     headers={REQUEST_HEADER: base64.b64encode(sealed).decode()})
    unpinned = ssl._create_unverified_context()  # our own daemon on loopback
    with urllib.request.urlopen(request, timeout=30, context=unpinned) as response:
        data = response.read()
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


def run_real(args: argparse.Namespace) -> None:
    from benchutil import load_avg, local_swarm, start_nodes

    n, split, model = args.real_nodes, args.real_split, args.real_model
    interval_steps = float(args.interval.split(",")[0])
    probe = BUILTIN_TASKS[model](TrainSettings(), NodeContext(0, 1, 0)).model
    fingerprint = FlatLayout.from_model(probe).fingerprint()
    print(f"\n## --real: {n} real daemons, {model}, split {split}, {args.epochs:g} epochs, lr {args.lr.split(',')[0]}, "
          f"lr decay {args.lr_decay}")
    with local_swarm("bench-convergence-real-", network="bench-conv") as swarm:
        go_file = swarm.base_dir / "go"
        settings = {
            "train.task": "synthetic:digits", "train.node_count": n, "train.lr": float(args.lr.split(",")[0]),
            "train.batch_size": args.batch, "train.seed": 0, "train.threads": 1, "train.init": "local",
            "train.eval_interval": 1e9, "checkpoint.interval": 1e9, "log_level": "warning",
            "exchange.interval": 1.0,  # set below once the step rate is known
            "train.options": {"base": model, "alpha": split, "split_seed": 0,
                              "step_sleep": args.real_step_sleep, "go_file": str(go_file)},
        }
        if args.lr_decay == "cosine":  # the trainer's own schedule (task options), over the expected steps
            steps = math.ceil(args.epochs * TRAIN_SIZE / (n * args.batch))
            settings["train.options"].update(lr_schedule="cosine", lr_schedule_steps=steps)
        for i in range(n):
            swarm.add_node(settings={**settings, "train.node_index": i})
        # The exchange interval in seconds that spans interval_steps local steps at the throttled rate.
        step_s = args.real_step_sleep + 0.002  # the sleep plus a digits step on a busy core
        interval_s = max(0.05, interval_steps * step_s)
        from peerfed.localswarm import set_config_values
        for node in swarm.nodes:
            set_config_values(node.config_path, {"exchange.interval": interval_s})
        start_nodes(swarm)
        full_view = swarm.wait_full_view(timeout=120)
        before = [node.get("/status") for node in swarm.nodes]  # gossip ran before the go (same init)
        go_file.touch()
        started = time.monotonic()
        target = args.epochs * TRAIN_SIZE
        while True:
            statuses = [node.get("/status") for node in swarm.nodes]
            total = sum(s["samples"] for s in statuses)
            if total >= target:
                break
            time.sleep(0.2)
        weights = [fetch_model(node, swarm.network, fingerprint, swarm.nodes[(i + 1) % n])
                   for i, node in enumerate(swarm.nodes)]
        elapsed = time.monotonic() - started
        statuses = [node.get("/status") for node in swarm.nodes]
    total = sum(s["samples"] for s in statuses)
    steps = [s["step"] for s in statuses]
    evaluate = BUILTIN_TASKS[model](TrainSettings(), NodeContext(0, 1, 0))
    accuracies = []
    for flat in weights:
        unflatten_from(flat, evaluate.model)
        accuracies.append(evaluate.evaluate(evaluate.model)["accuracy"])
    ok = [s["exchanges"]["ok"] - b["exchanges"]["ok"] for s, b in zip(statuses, before)]
    sent = [s["bytes_sent"] - b["bytes_sent"] for s, b in zip(statuses, before)]
    print(f"   real: full view after {full_view:.1f} s; ran {elapsed:.1f} s, {total / TRAIN_SIZE:.1f} epochs, "
          f"steps/node {min(steps)}..{max(steps)} ({statistics.mean(steps) / elapsed:.1f} steps/s), "
          f"exchange.interval {interval_s:.3f} s (~{interval_steps:g} steps); {load_avg()}")
    print(f"   real: accuracy mean {100 * statistics.mean(accuracies):.1f}, worst {100 * min(accuracies):.1f}; "
          f"exchanges ok per node (both roles) {statistics.mean(ok):.0f}; bytes sent per node "
          f"{_bytes(statistics.mean(sent))} (both counted from the go); failed/busy/refused in the whole run "
          f"{sum(s['exchanges']['failed'] for s in statuses)}/{sum(s['exchanges']['busy'] for s in statuses)}/"
          f"{sum(s['exchanges']['refused'] for s in statuses)}")
    real_interval = statistics.mean(steps) / max(1, statistics.mean(ok) / 2)
    cfg = SimConfig(model=model, split=split, seed=0, nodes=n, epochs=total / TRAIN_SIZE,
                    interval=interval_steps, lr=float(args.lr.split(",")[0]), batch=args.batch,
                    lr_decay=args.lr_decay, subticks=args.subticks)
    sim = run_gossip(cfg)
    local = run_gossip(cfg, exchange=False)
    allreduce = run_allreduce(cfg)
    print(f"   simulation of the same (seed 0, split seed 0, interval {interval_steps:g} steps; the daemons "
          f"initiated one ok exchange per ~{real_interval:.1f} of their steps): gossip mean "
          f"{100 * statistics.mean(sim.accuracies):.1f}, worst {100 * min(sim.accuracies):.1f}; "
          f"exchanges per node {statistics.mean(sim.exchanges):.0f}; all-reduce {100 * allreduce.accuracies[0]:.1f}; "
          f"local-only mean {100 * statistics.mean(local.accuracies):.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--epochs", type=float, default=60.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--models", default="digits-lr,digits-mlp")
    parser.add_argument("--splits", default="iid,1.0,0.1", help="iid and/or Dirichlet alphas")
    parser.add_argument("--interval", default="1", help="exchange.interval in local steps (comma list: a sweep)")
    parser.add_argument("--lr", default="0.05", help="learning rate (comma list: a sweep)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--exchange-steps", type=int, default=0, help="local steps taken while an exchange is in flight")
    parser.add_argument("--subticks", type=int, default=10, help="time resolution of the schedule per local step")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (task option)")
    parser.add_argument("--lr-decay", choices=("none", "cosine"), default="none",
                        help="cosine: lr decays to 0 over the run (a what-if: the product has no lr schedule)")
    parser.add_argument("--encoding", default="float32",
                        help="wire encoding(s) of the exchanged snapshots, comma list of " + ",".join(codecs.ENCODINGS))
    parser.add_argument("--merge-base", choices=("wire", "exact"), default="wire",
                        help="what a node subtracts when it merges: the decoded bytes it sent, or its float32 snapshot")
    parser.add_argument("--outer", default="none", help="outer step(s), comma list of none,nesterov,noloco")
    parser.add_argument("--outer-lr", type=float, default=0.7, help="outer learning rate (--outer)")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="outer momentum (--outer)")
    parser.add_argument("--clip", default="0", help="merge.clip radius factor(s), comma list; 0 = off")
    parser.add_argument("--no-baselines", action="store_true", help="gossip only (sweeps)")
    parser.add_argument("--real", action="store_true", help="also run one configuration with real daemons")
    parser.add_argument("--real-nodes", type=int, default=8)
    parser.add_argument("--real-split", default="0.1")
    parser.add_argument("--real-model", default="digits-mlp")
    parser.add_argument("--real-step-sleep", type=float, default=0.2, help="seconds each real trainer sleeps per step")
    args = parser.parse_args()
    for name in args.encoding.split(","):
        if name not in codecs.ENCODINGS:
            parser.error(f"--encoding {name!r}: allowed {', '.join(codecs.ENCODINGS)}")
    for name in args.outer.split(","):
        if name not in ("none", "nesterov", "noloco"):
            parser.error(f"--outer {name!r}: allowed none, nesterov, noloco")
    torch.set_num_threads(1)
    from benchutil import print_header

    print_header(
        "bench_convergence: SIMULATION of the gossip protocol (math and schedule), not real daemons",
        f"{args.nodes} nodes in one process, simulated clock (one local step per node per tick, "
        f"schedule resolved to 1/{args.subticks} tick), "
        f"exchange.interval = {args.interval} local steps, {args.exchange_steps} steps in flight per exchange, "
        f"batch {args.batch}, lr {args.lr}, lr decay {args.lr_decay}, {args.epochs:g} epochs, "
        f"seeds {args.seeds} (split seed = seed)\nmixing weight: {alpha_rule()}\n"
        f"wire encoding(s): {args.encoding}, merged against the {args.merge_base} snapshot; "
        f"outer step(s): {args.outer} (lr {args.outer_lr}, momentum {args.outer_momentum}); clip {args.clip}",
    )
    rows = run_grid(args)
    report(rows, args)
    print(f"(simulation took {sum(r['seconds'] for r in rows):.0f} s)")
    if args.real:
        run_real(args)


if __name__ == "__main__":
    main()
