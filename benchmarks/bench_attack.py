"""Poisoned peers against the robust merge (issue 12): 8 honest + 2 attacking nodes, digits-mlp.

Run: python benchmarks/bench_attack.py [--seeds 0,1] [--clip 0,2] [--outer none]
         [--attacks ascent,scale50,noise,replay,claims,fast] [--epochs 120] [--interval 16]

THIS IS A SIMULATION (bench_convergence.py's machinery: the real tasks, Dirichlet shards, model,
optimizer, ExchangeScheduler and the daemon's own merge, peerfed.train.merging.Merger with
merge.clip and merge.outer, and the exchange's bounded_mixing_weight), not real daemons:
ten digits daemons flat out for the demo's duration do not fit a 2-core machine shared by
others. One tick = one local step of every node; an honest node opens an exchange every
--interval steps (the demo's exchange.interval, 0.5 s, spans ~300 of its steps; we use fewer,
which only makes each exchange weigh more). An exchange is a push-pull: each side merges the
other's snapshot x <- x + a' (peer - sent) (a' = the clipped mixing weight). Attackers are
daemons with a hostile task (as benchmarks/hostile.py for --real): they merge what they receive
with the plain merge and their own (claimed) sample weight, then attack their weights every
step (--attackers-never-merge: they keep their own model only). What they do each step:

  ascent   gradient ascent on their shard, the weights rescaled after every step to the mean
           norm of the honest models (so no norm check can tell them apart)
  scale50  weights x50 every step, capped at RMS 1e4 (under the value check's 1e6)
  noise    Gaussian noise with the mean honest norm, fresh every step
  replay   the initial weights, over and over (old weights)
  claims   ascent + a sample claim of 1e9 (the mixing weight goes to its cap, 10/11)
  fast     ascent + the 1e9 claim + an exchange interval of --fast-ratio x the honest one
           (default 0.5: the demo's 0.5 s against 0.25 s)

Baseline in the same run: the 8 honest nodes alone ("attack-free"), same seeds, shards and
merge. Printed per merge setting and attack: honest mean and worst accuracy over the seeds, the
gaps to attack-free, merges clipped. Targets: mean >= attack-free - 2.0, worst >= attack-free - 4.0.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convergence import (
    TRAIN_SIZE,
    SimConfig,
    SimNode,
    _merge,
    _set_lr,
    make_node,
)

from peerfed.averaging import bounded_mixing_weight, merge_
from peerfed.core.schedule import ExchangeScheduler
from peerfed.demo_report import DEFAULT_DURATION, DemoSettings

ATTACKS = ("ascent", "scale50", "noise", "replay", "claims", "fast")
HONEST = 8
ATTACKERS = 2
INFLATED_CLAIM = 1e9
MAX_RMS = 1e4
REAL_ATTACK = {"claims": "ascent", "fast": "ascent"}  # hostile.py's attack under each name
FAST_REAL_RATIO = 0.5  # the fast attacker's exchange.interval / the demo's (0.25 s / 0.5 s)


@dataclass
class Attacker:
    node: SimNode
    kind: str
    init: torch.Tensor  # what "replay" sends
    claim: float
    gen: torch.Generator
    merges: bool  # like a real daemon with a hostile task (benchmarks/hostile.py), else never


def honest_norm(nodes: list[SimNode]) -> float:
    return statistics.mean(float(torch.linalg.vector_norm(n.flat)) for n in nodes)


def attacker_step(a: Attacker, honest: list[SimNode]) -> None:
    node, flat = a.node, a.node.flat
    with torch.no_grad():
        if a.kind in ("ascent", "claims", "fast"):
            with torch.enable_grad():
                x, y = next(node.task.train_batches)
                loss = -node.task.loss_fn(node.task.model(x), y)  # ascent
                node.optimizer.zero_grad(set_to_none=True)
                loss.backward()
            node.optimizer.step()
            norm = float(torch.linalg.vector_norm(flat))
            if norm > 0:
                flat.mul_(honest_norm(honest) / norm)
        elif a.kind == "scale50":
            flat.mul_(50.0)
            rms = float(torch.linalg.vector_norm(flat)) / math.sqrt(flat.numel())
            if rms > MAX_RMS:
                flat.mul_(MAX_RMS / rms)
        elif a.kind == "noise":
            flat.copy_(torch.randn(flat.numel(), generator=a.gen))
            flat.mul_(honest_norm(honest) / float(torch.linalg.vector_norm(flat)))
        elif a.kind == "replay":
            flat.copy_(a.init)


def run(cfg: SimConfig, attack: str | None, fast_ratio: float, attackers_merge: bool
        ) -> tuple[list[float], int, int]:
    """Honest accuracies at the end, merges and clipped merges of the honest nodes."""
    honest = [make_node(cfg, i) for i in range(HONEST)]
    attackers: list[Attacker] = []
    if attack is not None:
        for j in range(ATTACKERS):
            interval = cfg.interval * (fast_ratio if attack == "fast" else 1.0)
            node = make_node(cfg, j)  # shard j: the attackers' data matter only to the ascent
            node.index = HONEST + j
            node.scheduler = ExchangeScheduler(interval=interval, rng=random.Random(cfg.seed * 7919 + HONEST + j),
                                               now=0.0)
            attackers.append(Attacker(node, attack, node.flat.clone(),
                                      INFLATED_CLAIM if attack in ("claims", "fast") else node.task.num_samples,
                                      torch.Generator().manual_seed(cfg.seed * 31 + j), attackers_merge))
    everyone = honest + [a.node for a in attackers]
    hostile = {a.node.index: a for a in attackers}
    rng = random.Random(cfg.seed)
    target, total, tick = cfg.epochs * TRAIN_SIZE, 0, 0  # the honest nodes' samples, as without attackers
    while total < target:
        tick += 1
        _set_lr([n.optimizer for n in everyone], cfg.lr_at(total / target))
        for node in honest:
            total += node.step()
        for a in attackers:
            attacker_step(a, honest)
        for sub in range(cfg.subticks):
            now = tick + sub / cfg.subticks
            busy: set[int] = set()
            for node in rng.sample(everyone, len(everyone)):
                if node.index in busy:
                    continue
                others = [str(n.index) for n in everyone if n is not node and n.index not in busy]
                choice = node.scheduler.choose_peer(others, now)
                if choice is None:
                    continue
                node.scheduler.begin(choice, now)
                peer = next(n for n in everyone if n.index == int(choice))
                busy |= {node.index, peer.index}
                exchange(node, peer, hostile, cfg)
                node.scheduler.on_result(choice, "ok", now)
    merges = sum(n.merger.statistics().merges for n in honest if n.merger is not None)
    clipped = sum(n.merger.statistics().clipped for n in honest if n.merger is not None)
    return [n.task.evaluate(n.task.model)["accuracy"] for n in honest], merges, clipped


def exchange(a: SimNode, b: SimNode, hostile: dict[int, Attacker], cfg: SimConfig) -> None:
    """One push-pull landing at once: each honest side merges the other's snapshot."""
    sent_a, sent_b = a.flat.clone(), b.flat.clone()
    for me, sent, theirs, other in ((a, sent_a, sent_b, b), (b, sent_b, sent_a, a)):
        if me.index in hostile:
            if hostile[me.index].merges:  # a hostile daemon merges as any daemon does
                own = hostile[me.index].claim
                with torch.no_grad():
                    merge_(me.flat, sent, theirs, bounded_mixing_weight(own, other.task.num_samples))
            continue
        claim = hostile[other.index].claim if other.index in hostile else other.task.num_samples
        with torch.no_grad():
            _merge(me, sent, theirs, bounded_mixing_weight(me.task.num_samples, claim), cfg)
        me.exchanges += 1


def real_settings(demo: DemoSettings, index: int, attack: str | None, clip: float, outer: str) -> dict[str, Any]:
    """A node's config: the demo's, with merge.clip/outer; an attacker's task is hostile.py's."""
    settings: dict[str, Any] = {**demo.node_config(index % demo.nodes), "log_level": "warning",
                                "merge.clip": clip, "merge.outer": outer}
    if attack is not None:
        options = {**demo.task_options(), "base": demo.task, "attack": REAL_ATTACK.get(attack, attack)}
        if attack in ("claims", "fast"):
            options["claim"] = INFLATED_CLAIM
        settings.update({"train.task": "hostile:digits", "train.options": options})
        if attack == "fast":
            settings["exchange.interval"] = demo.exchange_interval * FAST_REAL_RATIO
    return settings


def run_real_one(demo: DemoSettings, attackers: int, attack: str | None, clip: float, outer: str
                 ) -> tuple[list[float], int, int, float]:
    """run_real_once, tried again once if a daemon could not start (a port taken meanwhile by
    another process on this shared machine: free_port() is only a guess)."""
    try:
        return run_real_once(demo, attackers, attack, clip, outer)
    except RuntimeError as exc:
        print(f"   (a daemon did not start: {str(exc).splitlines()[-1]}; trying once more)", flush=True)
        return run_real_once(demo, attackers, attack, clip, outer)


def run_real_once(demo: DemoSettings, attackers: int, attack: str | None, clip: float, outer: str
                  ) -> tuple[list[float], int, int, float]:
    """Honest accuracies (each node's own last evaluation), merges and clipped merges of the
    honest nodes, and the seconds the swarm took to come up."""
    from benchutil import local_swarm, start_nodes

    with local_swarm("bench-attack-", network="bench-attack") as swarm:
        honest = [swarm.add_node(settings=real_settings(demo, i, None, clip, outer)) for i in range(demo.nodes)]
        for j in range(attackers if attack is not None else 0):
            swarm.add_node(settings=real_settings(demo, j, attack, clip, outer))
        started = time.monotonic()
        start_nodes(swarm)
        swarm.wait_full_view(timeout=120)
        up = time.monotonic() - started
        time.sleep(demo.duration)
        time.sleep(2 * demo.training.eval_interval)  # one more evaluation of the final weights
        statuses = [node.get("/status") for node in honest]
    accs = [float(s["metrics"].get("accuracy", 0.0)) for s in statuses]
    merges = sum(int(s.get("merges", {}).get("merges", 0)) for s in statuses)
    clipped = sum(int(s.get("merges", {}).get("clipped", 0)) for s in statuses)
    return accs, merges, clipped, up


def run_real(args: argparse.Namespace, attacks: list[str]) -> None:
    demo = DemoSettings(nodes=args.real_honest, alpha=float(args.alpha), duration=args.real_duration)
    print(f"\n## --real: {args.real_honest} honest + {args.real_attackers} attacking real daemons (reduced scale), "
          f"{demo.task}, alpha {demo.alpha}, {demo.duration:g} s each, the demo's other settings (exchange.interval "
          f"{demo.exchange_interval} s, lr {demo.training.lr} {demo.training.lr_schedule}); the fast attacker every "
          f"{demo.exchange_interval * FAST_REAL_RATIO:g} s; attackers run benchmarks/hostile.py")
    print(f"{'outer':>8} {'clip':>4} {'attack':>8} | {'honest mean':>11} {'worst':>6} | {'gap mean':>8} {'gap worst':>9} "
          f"{'verdict':>7} | {'clipped/merges':>15} {'up s':>5} {'load':>10}")
    from benchutil import load_avg

    for clip in [float(v) for v in args.clip.split(",")]:
        free: float | None = None
        for attack in [None, *attacks]:
            accs, merges, clipped, up = run_real_one(demo, args.real_attackers, attack, clip, args.outer)
            mean, worst = 100 * statistics.mean(accs), 100 * min(accs)
            if free is None:
                free, verdict, gaps = mean, "(base)", f"{'-':>8} {'-':>9}"
            else:
                verdict = "MET" if mean >= free - 2.0 and worst >= free - 4.0 else "MISSED"
                gaps = f"{mean - free:8.1f} {worst - free:9.1f}"
            print(f"{args.outer:>8} {clip:>4g} {attack or 'none':>8} | {mean:11.1f} {worst:6.1f} | {gaps} {verdict:>7} | "
                  f"{f'{clipped}/{merges}':>15} {up:5.1f} {load_avg():>10}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--alpha", default="0.1")
    parser.add_argument("--epochs", type=float, default=120.0, help="epochs of the honest nodes' samples")
    parser.add_argument("--interval", type=float, default=16.0, help="honest exchange interval, in local steps")
    parser.add_argument("--fast-ratio", type=float, default=0.5, help="the fast attacker's interval / honest")
    parser.add_argument("--lr", type=float, default=0.4)
    parser.add_argument("--lr-decay", choices=("none", "cosine"), default="cosine")
    parser.add_argument("--outer", default="none", help="merge.outer of the honest nodes: none or nesterov")
    parser.add_argument("--clip", default="0,2", help="merge.clip factor(s), comma list; 0 = off (today)")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--attackers-never-merge", action="store_true",
                        help="attackers keep their own model only (default: they merge like a daemon, as hostile.py)")
    parser.add_argument("--real", action="store_true", help="also run real daemons (reduced scale)")
    parser.add_argument("--real-only", action="store_true", help="only the real daemons")
    parser.add_argument("--real-honest", type=int, default=4)
    parser.add_argument("--real-attackers", type=int, default=1)
    parser.add_argument("--real-duration", type=float, default=DEFAULT_DURATION, help="seconds of training")
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    for name in attacks:
        if name not in ATTACKS:
            parser.error(f"--attacks {name!r}: allowed {', '.join(ATTACKS)}")
    torch.set_num_threads(1)
    from benchutil import print_header

    if args.real_only:
        print_header("bench_attack --real-only: real daemons (no simulation in this run)", "")
        run_real(args, attacks)
        return
    print_header(
        "bench_attack: SIMULATION of 8 honest + 2 attacking nodes (bench_convergence's machinery), not real daemons",
        f"digits-mlp, alpha {args.alpha}, {args.epochs:g} epochs of honest samples, honest exchange every "
        f"{args.interval:g} local steps, fast attacker every {args.interval * args.fast_ratio:g}, lr {args.lr} "
        f"{args.lr_decay}, outer {args.outer}, seeds {args.seeds}",
    )
    print(f"{'outer':>8} {'clip':>4} {'attack':>8} | {'honest mean':>11} {'worst':>6} | {'gap mean':>8} {'gap worst':>9} "
          f"{'verdict':>7} | {'clipped/merges':>15} {'s':>5}")
    for clip in [float(v) for v in args.clip.split(",")]:
        free: float | None = None  # the attack-free honest mean
        for attack in [None, *attacks]:
            started = time.perf_counter()
            accs: list[float] = []
            merges = clipped = 0
            for seed in [int(s) for s in args.seeds.split(",")]:
                cfg = SimConfig(model="digits-mlp", split=args.alpha, seed=seed, nodes=HONEST, epochs=args.epochs,
                                interval=args.interval, lr=args.lr, lr_decay=args.lr_decay, outer=args.outer,
                                clip=clip)
                got, m, c = run(cfg, attack, args.fast_ratio, not args.attackers_never_merge)
                accs += got
                merges, clipped = merges + m, clipped + c
            mean, worst = 100 * statistics.mean(accs), 100 * min(accs)
            if free is None:
                free, verdict, line_gaps = mean, "(base)", f"{'-':>8} {'-':>9}"
            else:
                verdict = "MET" if mean >= free - 2.0 and worst >= free - 4.0 else "MISSED"
                line_gaps = f"{mean - free:8.1f} {worst - free:9.1f}"
            print(f"{args.outer:>8} {clip:>4g} {attack or 'none':>8} | {mean:11.1f} {worst:6.1f} | {line_gaps} "
                  f"{verdict:>7} | {f'{clipped}/{merges}':>15} {time.perf_counter() - started:5.0f}", flush=True)
    print("(accuracies in %, over all honest nodes of all seeds; gap = minus the attack-free honest mean of the same clip (worst too); "
          "targets: mean gap >= -2.0, worst gap >= -4.0; clipped/merges: the honest nodes' merges)")
    if args.real:
        run_real(args, attacks)


if __name__ == "__main__":
    main()
