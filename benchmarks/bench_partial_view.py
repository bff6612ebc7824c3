"""Partial views (issue 16): convergence against full-view gossip, and a model up to 10,000 nodes.

Run: python benchmarks/bench_partial_view.py [--sizes 16,64,256] [--view 8] [--seeds 0,1]
         [--steps 160] [--split 0.1] [--model digits-mlp] [--scale 100,1000]

THIS IS A SIMULATION (bench_convergence.py's: one process, simulated clock, the real tasks,
merge and ExchangeScheduler). Part 1: for each N, gossip where every node may only exchange
with its active view, kept by the real policy (peerfed.core.view.PartialView: fill at random,
prune above slack, rotate one link per period) over a passive view of at most 64 records,
against the same swarm with a full view (anyone with anyone). One exchange interval stands
for 10 s of the daemon's clock, so the view rotates about once per two intervals, as a
daemon with exchange.interval = 10 does. Each node takes --steps local steps whatever N (so the
epochs grow with N). Printed: mean and worst accuracy of both, the difference (target:
partial within 0.5 points of full), and how uniform the partners were: distinct partners per
node, and how often the most and least chosen node was chosen against the mean.

Part 2, a model of the control plane's cost at scale (no daemons): connections per node,
messages per node per minute (from the daemon's constants), and, in a coarser simulation of
links, rotation and record swaps every 5 s (newcomer_times), the seconds until a newcomer that
only knows one bootstrap node holds its view, and until as many nodes hold its record as hold
an old node's on average (median over runs), at N = --scale.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter

import torch
from peerfed.core.view import PartialView
from peerfed.net.membership import GOSSIP_INTERVAL, PING_INTERVAL

from bench_convergence import SimConfig, run_gossip

PASSIVE = 64  # p2p.max_peers
SECONDS_PER_INTERVAL = 10.0  # exchange.interval's default: the view's clock per simulated interval


class ViewSim:
    """N nodes' active views under PartialView; every node knows (up to) PASSIVE others."""

    def __init__(self, n: int, target: int, seed: int, *, interval: float = 1.0) -> None:
        self.rng = random.Random(seed)
        self.target, self.interval = target, interval
        self.views = [PartialView(target=target, rng=random.Random(self.rng.random())) for _ in range(n)]
        self.known = [set(self.rng.sample([p for p in range(n) if p != i], min(PASSIVE, n - 1))) for i in range(n)]
        self.links: list[dict[int, float]] = [{} for _ in range(n)]
        self.partners: list[Counter[int]] = [Counter() for _ in range(n)]
        self._last = -1.0

    def tick(self, now: float) -> None:
        clock = now / self.interval * SECONDS_PER_INTERVAL
        if clock - self._last < 1.0:  # the daemon's dial loop runs once a second
            return
        self._last = clock
        for i in self.rng.sample(range(len(self.views)), len(self.views)):
            self.step_node(i, clock)

    def step_node(self, i: int, clock: float) -> None:
        links = self.links[i]
        due = [str(p) for p in self.known[i] if p not in links]
        plan = self.views[i].plan(live={str(p): t for p, t in links.items()}, dialing=(), due=due, now=clock,
                                  max_parallel=8)
        for p in map(int, plan.close):
            links.pop(p, None)
            self.links[p].pop(i, None)
        for p in map(int, plan.dial):
            if len(self.links[p]) < self.target + 8:  # the host's hard cap (net/p2p.py)
                links[p] = self.links[p][i] = clock
                self.known[p].add(i)

    def of(self, index: int) -> list[str]:
        return [str(p) for p in self.links[index]]


def partner_spread(views: ViewSim) -> tuple[float, float]:
    """(median distinct partners per node, most-chosen / least-chosen node), from one peer
    drawn at random from each node's active view at each interval."""
    seen = [len(c) for c in views.partners]
    chosen = Counter(p for c in views.partners for p, k in c.items() for _ in range(k))
    return statistics.median(seen), max(chosen.values()) / max(1, min(chosen.values()))


class PartnerViews(ViewSim):
    """Records, at each interval, which peers each node could pick (its active view)."""

    def tick(self, now: float) -> None:
        super().tick(now)
        if abs(now - round(now)) < 1e-9:
            for i, links in enumerate(self.links):
                if links:
                    self.partners[i][self.rng.choice(sorted(links))] += 1


def convergence(args: argparse.Namespace) -> None:
    print(f"{'N':>4} {'view':>4} | {'full mean':>9} {'worst':>5} | {'partial mean':>12} {'worst':>5} | "
          f"{'diff':>6} {'target':>6} | {'distinct':>8} {'max/min':>7} | {'s':>5}")
    for n in [int(s) for s in args.sizes.split(",")]:
        started = time.perf_counter()
        full, part, spreads = [], [], []
        for seed in [int(s) for s in args.seeds.split(",")]:
            epochs = args.steps * n * 32 / 1437  # every node takes --steps steps, whatever N
            cfg = SimConfig(model=args.model, split=args.split, seed=seed, nodes=n, epochs=epochs, lr=args.lr)
            full.append(run_gossip(cfg).accuracies)
            views = PartnerViews(n, args.view, seed)
            part.append(run_gossip(cfg, views=views).accuracies)
            spreads.append(partner_spread(views))
        f_mean = 100 * statistics.mean(a for run in full for a in run)
        p_mean = 100 * statistics.mean(a for run in part for a in run)
        f_worst = 100 * min(a for run in full for a in run)
        p_worst = 100 * min(a for run in part for a in run)
        diff = p_mean - f_mean
        verdict = "MET" if diff >= -0.5 else "MISSED"
        distinct = statistics.mean(s[0] for s in spreads)
        ratio = max(s[1] for s in spreads)
        print(f"{n:>4} {min(args.view, n - 1):>4} | {f_mean:9.1f} {f_worst:5.1f} | {p_mean:12.1f} {p_worst:5.1f} | "
              f"{diff:+6.2f} {verdict:>6} | {distinct:8.0f} {ratio:7.2f} | {time.perf_counter() - started:5.0f}")


def newcomer_times(n: int, k: int, seed: int, horizon: float) -> tuple[float, float]:
    """A coarser model than ViewSim, cheap enough for 10,000 nodes: each node holds k links
    (one replaced by a random known peer with probability 1/10 per second: the rotation) and
    up to PASSIVE records; every GOSSIP_INTERVAL it swaps with one link: it sends its own record
    and those of peers it linked to itself (records_for_exchange), and takes at most
    REPLACE_PER_LIST new ones. A newcomer knows only node 0. Returns the seconds until the
    newcomer holds k links, and until its record is held by PASSIVE nodes: as many as an old
    node's on average (n nodes x PASSIVE records / n), i.e. it is as findable as anyone."""
    rng = random.Random(seed)
    total = n + 1
    known = [set(rng.sample(range(n), min(PASSIVE + 1, n)) ) - {i} for i in range(n)] + [{0}]
    links = [set(rng.sample(sorted(known[i]), min(k, len(known[i])))) for i in range(n)] + [set()]
    reached = [set(x) for x in links]
    new = n
    full_at = found_at = float("inf")
    for clock in range(int(horizon)):
        for i in range(total):
            if len(links[i]) < k or rng.random() < 0.1:
                if len(links[i]) >= k:
                    links[i].discard(rng.choice(sorted(links[i])))
                pool = sorted(known[i] - links[i])
                for p in rng.sample(pool, min(k - len(links[i]), len(pool))):
                    links[i].add(p)
                    reached[i].add(p)
                    if i not in known[p]:  # an inbound link: admitted, as the table does for connections
                        _admit(known[p], links[p], i, rng)
                    reached[p].add(i)
        if clock % int(GOSSIP_INTERVAL) == 0:
            for i in rng.sample(range(total), total):
                if links[i]:
                    p = rng.choice(sorted(links[i]))
                    for a, b in ((i, p), (p, i)):
                        offer = ((reached[b] & known[b]) | {b}) - {a} - known[a]
                        for q in rng.sample(sorted(offer), min(2, len(offer))):  # REPLACE_PER_LIST
                            _admit(known[a], links[a], q, rng)
        if len(links[new]) >= k and full_at == float("inf"):
            full_at = float(clock)
        if sum(new in known[i] for i in range(n)) >= PASSIVE:
            found_at = float(clock)
            break
    return full_at, found_at


def _admit(known: set[int], links: set[int], peer: int, rng: random.Random) -> None:
    if len(known) >= PASSIVE:
        spare = sorted(known - links)
        if not spare:
            return
        known.discard(rng.choice(spare))
    known.add(peer)


def scale_model(args: argparse.Namespace) -> None:
    k = args.view
    slack = max(2, k // 4)
    pings = 2 * k * 60 / PING_INTERVAL  # we ping each link, each link pings us
    swaps = 2 * 60 / GOSSIP_INTERVAL  # one peer list sent, about one received
    rotations = 2 * 60 / PartialView.rotate_every  # one link closed and one dialed per period, as many by others
    print(f"\nper node, any N: connections {k}..{k + slack} (hard cap {k + 8}); per minute: {pings:.0f} pings, "
          f"{swaps:.0f} peer-list swaps (<= {PASSIVE + 1} records each), ~{rotations:.0f} handshakes from rotation")
    print(f"{'N':>6} | {'newcomer holds its view (s)':>27} | {'as findable as an old node (s)':>30} | {'s':>4}")
    for n in [int(s) for s in args.scale.split(",")]:
        started = time.perf_counter()
        runs = [newcomer_times(n, k, seed, horizon=args.horizon) for seed in range(args.scale_runs)]
        full = statistics.median(r[0] for r in runs)
        found = statistics.median(r[1] for r in runs)
        print(f"{n:>6} | {full:27.0f} | {found:30.0f} | {time.perf_counter() - started:4.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256")
    parser.add_argument("--view", type=int, default=8, help="p2p.max_connections in the simulation")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=160, help="local steps per node")
    parser.add_argument("--split", default="0.1")
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--scale", default="100,1000", help="swarm sizes of the control-plane model")
    parser.add_argument("--scale-runs", type=int, default=3)
    parser.add_argument("--horizon", type=float, default=1800.0, help="seconds simulated per newcomer")
    parser.add_argument("--skip-convergence", action="store_true")
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only add contention
    print("# bench_partial_view: gossip over partial views vs a full view (simulation), and a model at scale")
    if not args.skip_convergence:
        convergence(args)
    if not args.skip_scale:
        scale_model(args)


if __name__ == "__main__":
    main()
