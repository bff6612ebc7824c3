"""Eight training daemons on shaped home uplinks (issue 10): accuracy, bytes and link use.

Run (root: network namespaces and tc; nothing leaves them):
    python benchmarks/bench_home_links.py [--duration 60] [--runs alone,float32,capped,...]

Each daemon sits in its own network namespace, joined to one bridge through a veth pair that
tc (tbf) shapes both ways: upload (the node's eth0) so that one float32 push of the model
takes ``--push-seconds`` (profile "home": 18 s, a ResNet-18 on 20 Mbit/s; "fiber": 0.4 s),
download 5x faster. Task digits-wide (built in for this benchmark: digits-mlp's 9.6 kB
would make the uplink a few kbit/s, where libp2p's own chatter fills it and the transfer
floor of 16 kB/s cuts every exchange; digits-wide's 2.46 MB makes it 1.1 Mbit/s), Dirichlet
alpha 0.1, the demo's training settings and duration.

Runs (``--runs``, in order; each starts fresh daemons):
- alone:    no peers at all: each node's step rate when training alone (same CPU load);
- float32:  today's gossip: float32, no caps, no outer step;
- capped:   a home rig's config: encoding auto, max_upload_rate = 0.8 x the uplink,
            max_upload_share 0.5;
- nesterov: capped + merge.outer = "nesterov";
- fiber:    capped on the fiber profile;
- mixed:    capped, with 2 of the 8 nodes on uplinks 4x slower and trainers 4x slower.

Measured, per run: mean and worst test accuracy after the duration (a fresh evaluation),
the all-reduce baseline on the same number of samples (same run), bytes each uplink carried
(the bridge side's rx counter: every byte on the wire, TLS and libp2p included), the highest
upload rate over any 10 s window, the uplink's busy share (its bytes over what max_upload_rate,
or the link when uncapped, could carry in the run), step rate against "alone", and the wire
bytes per node each run needed to first reach float32's final mean accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from natswarm import NsNode, NsSwarm
from netlab import Machine, NetLab, missing_requirements

from peerfed.demo_report import DemoSettings, DemoTraining
from peerfed.train.tasks import NodeContext, TrainSettings, digits_wide

TASK = "digits-wide"
NODES = 8
MODEL_BYTES = 4 * sum(p.numel() for p in digits_wide(TrainSettings(task=TASK), NodeContext(0, 1, 0)).model.parameters())
PROFILES = {"home": 18.0, "fiber": 0.4}  # seconds for one float32 push
DOWNLOAD_FACTOR = 5
CAP_OF_LINK = 0.8  # the capped runs' max_upload_rate, as a share of the uplink
SHARE = 0.5
SLOW = (6, 7)  # the mixed run's slow nodes
SLOW_FACTOR = 4


@dataclass
class Run:
    name: str
    profile: str = "home"
    settings: dict[str, Any] = field(default_factory=dict)
    peers: bool = True
    mixed: bool = False


RUNS = {
    "alone": Run("alone", peers=False),
    "float32": Run("float32", settings={"exchange.encoding": "float32"}),
    "capped": Run("capped", settings={"exchange.encoding": "auto"}),
    "nesterov": Run("nesterov", settings={"exchange.encoding": "auto", "merge.outer": "nesterov"}),
    "fiber": Run("fiber", profile="fiber", settings={"exchange.encoding": "auto"}),
    "mixed": Run("mixed", settings={"exchange.encoding": "auto"}, mixed=True),
}


def uplink_bps(profile: str) -> float:
    """Bits per second on the wire that carry one float32 push in the profile's time."""
    return MODEL_BYTES * 8 / PROFILES[profile]


def node_uplink_bps(run: Run, index: int) -> float:
    """The node's uplink: the profile's, 4x slower for the mixed run's slow nodes."""
    return uplink_bps(run.profile) / (SLOW_FACTOR if run.mixed and index in SLOW else 1)


def capped(run: Run) -> bool:
    return run.name not in ("alone", "float32")


def shape(lab: NetLab, inet: str, m: Machine, up_bps: float) -> None:
    for ns, dev, rate in ((m.ns, "eth0", up_bps), (inet, f"i-{m.name}"[:15], up_bps * DOWNLOAD_FACTOR)):
        burst = max(3000, int(rate / 8 * 0.01))  # >= 2 MTU; 10 ms of the rate
        lab.sh(ns, f"tc qdisc add dev {dev} root tbf rate {int(rate)}bit burst {burst} latency 200ms")


class LinkMeter:
    """Samples every uplink's byte counter once a second (the bridge side's rx: all the node sent)."""

    def __init__(self, lab: NetLab, inet: str, names: list[str]) -> None:
        self.lab, self.inet, self.ports = lab, inet, {f"i-{n}"[:15]: n for n in names}
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(1.0 - (time.monotonic() % 1.0)):
            links = json.loads(self.lab.sh(self.inet, "ip -s -j link show"))
            self.samples.append((time.monotonic(), {self.ports[x["ifname"]]: int(x["stats64"]["rx"]["bytes"])
                                                    for x in links if x["ifname"] in self.ports}))

    def between(self, name: str, t0: float, t1: float) -> list[tuple[float, int]]:
        return [(t, counts[name]) for t, counts in self.samples if t0 <= t <= t1]


def highest_window(marks: list[tuple[float, int]], window: float = 10.0) -> float:
    best = 0.0
    for i, (t, b) in enumerate(marks):
        for t2, b2 in marks[i + 1:]:
            if t2 - t >= window - 0.01:
                best = max(best, (b2 - b) / (t2 - t))
                break
    return best


def node_settings(run: Run, demo: DemoSettings, index: int, step_sleep: float) -> dict[str, Any]:
    s = {**demo.node_config(index), **run.settings, "p2p.port_mapping": False, "log_level": "warning"}
    if capped(run):
        s.update({"exchange.max_upload_rate": f"{CAP_OF_LINK * node_uplink_bps(run, index) / 1e3:.1f}kbit", "exchange.max_upload_share": SHARE})
    if run.mixed:  # the same model under the benchmark's throttled wrapper: trainers 4x slower
        sleep = step_sleep if index in SLOW else 0.0
        s.update({"train.task": "synthetic:digits", "train.options": {**s["train.options"], "base": TASK,
                                                                    "step_sleep": sleep}})
    if not run.peers:
        s["p2p.bootstrap"] = []
    return s


def run_one(run: Run, demo: DemoSettings, step_sleep: float) -> dict[str, Any]:
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix=f"bench-home-{run.name}-") as tmp:
        t = lab.home_topology({})
        machines = [t.public] + [lab.on_internet(t, f"n{i}", f"198.18.0.{20 + i}") for i in range(1, NODES)]
        for i, m in enumerate(machines):
            shape(lab, t.internet, m, node_uplink_bps(run, i))
        swarm = NsSwarm(lab, Path(tmp))
        first: NsNode | None = None
        for i, m in enumerate(machines):
            node = swarm.add(m, bootstrap=first if run.peers else None,
                             settings=node_settings(run, demo, i, step_sleep))
            first = first or node
        meter = LinkMeter(lab, t.internet, [m.name for m in machines])
        meter.start()
        for n in swarm.nodes:
            swarm.start(n)
        swarm.wait_up(timeout=300)
        t0 = time.monotonic()
        steps0 = [int(n.status().get("step", 0)) for n in swarm.nodes]
        curve: list[tuple[float, list[float], list[int]]] = []  # (t, accuracies, uplink bytes)
        payload_peak = [0.0] * NODES  # the data plane's own 10 s upload rate (exchange payload)
        slowest_status = 0.0  # the longest a node's local API took to answer /status
        while time.monotonic() - t0 < demo.duration + 5:
            time.sleep(2.0)
            answers = [timed_status(n) for n in swarm.nodes]
            statuses = [status for status, _ in answers]
            slowest_status = max(slowest_status, *(seconds for _, seconds in answers))
            payload_peak = [max(p, float(s["link"]["upload_rate_now"])) for p, s in zip(payload_peak, statuses, strict=True)]
            counts = meter.samples[-1][1] if meter.samples else {}
            curve.append((time.monotonic() - t0, [float((s.get("metrics") or {}).get("accuracy") or 0.0)
                                                  for s in statuses], [counts.get(m.name, 0) for m in machines]))
        t1 = time.monotonic()
        final = [n.status() for n in swarm.nodes]
        meter.stop()
        start_counts = next((c for ts, c in meter.samples if ts >= t0), meter.samples[0][1])
    limit = [node_uplink_bps(run, i) * (CAP_OF_LINK if capped(run) else 1.0) for i in range(NODES)]  # bit/s
    nodes = []
    for i, (m, s) in enumerate(zip(machines, final, strict=True)):
        marks = meter.between(m.name, t0, t1)
        sent = marks[-1][1] - marks[0][1] if len(marks) > 1 else 0
        span = marks[-1][0] - marks[0][0] if len(marks) > 1 else 1.0
        nodes.append({
            "accuracy": float(s["metrics"]["accuracy"]), "samples": int(s.get("samples", 0)),
            "steps_per_s": (int(s.get("step", 0)) - steps0[i]) / (t1 - t0), "exchanges": s["exchanges"]["ok"],
            "wire_up_bytes": sent, "peak10_bps": 8 * highest_window(marks), "limit_bps": limit[i],
            "busy": 8 * sent / span / limit[i], "slow": run.mixed and i in SLOW,
            "counters": s["exchanges"], "bytes_sent": s.get("bytes_sent"), "payload_peak10_bps": 8 * payload_peak[i],
            "payload_avg_bps": 8 * float(s["link"]["upload_rate_avg"]),
        })
    return {"run": run.name, "profile": run.profile, "nodes": nodes, "start_counts": start_counts,
            "slowest_status_s": slowest_status,
            "curve": [(tt, acc, [b - start_counts.get(m.name, 0) for b, m in zip(bts, machines, strict=True)])
                      for tt, acc, bts in curve]}


def timed_status(node: NsNode) -> tuple[dict[str, Any], float]:
    """/status and the seconds it took, waiting up to 60 s: a node whose main loop stalls is
    reported, not fatal."""
    started = time.monotonic()
    status = node.status(timeout=60.0)
    return status, time.monotonic() - started


def allreduce_baseline(demo: DemoSettings, samples: int) -> float:
    from peerfed.baselines import train_allreduce

    t = demo.training
    train = TrainSettings(task=TASK, device="cpu", batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                          options=demo.task_options())
    return train_allreduce(train, demo.nodes, samples).accuracy


def bytes_to_reach(result: dict[str, Any], target: float) -> float | None:
    """Mean wire bytes uploaded per node when the mean accuracy first reached ``target``."""
    for _, acc, sent in result["curve"]:
        if sum(acc) / len(acc) >= target:
            return sum(sent) / len(sent)
    return None


def report(result: dict[str, Any], allreduce: float, alone_rate: float | None) -> None:
    nodes = result["nodes"]
    fast = [n for n in nodes if not n["slow"]]
    acc = [100 * n["accuracy"] for n in nodes]
    mean, worst = sum(acc) / len(acc), min(acc)
    rate = sum(n["steps_per_s"] for n in fast) / len(fast)
    rel = f"{rate / alone_rate:.3f}x alone" if alone_rate else "-"
    print(f"\n[{result['run']}] profile {result['profile']} (uplink {uplink_bps(result['profile']) / 1e3:.0f} kbit/s)")
    print(f"  accuracy mean {mean:.2f}%, worst {worst:.2f}%; all-reduce {100 * allreduce:.2f}% "
          f"(mean {mean - 100 * allreduce:+.2f}, worst {worst - 100 * allreduce:+.2f} points)")
    print(f"  step rate {rate:.1f}/s per {'fast ' if len(fast) < len(nodes) else ''}node ({rel}); "
          f"exchanges per node {sum(n['exchanges'] for n in nodes) / len(nodes):.1f}; "
          f"slowest /status answer {result['slowest_status_s']:.2f} s")
    for tag, group in (("fast", fast), ("slow", [n for n in nodes if n["slow"]])):
        if not group:
            continue
        print(f"  {tag} uplinks: {sum(n['wire_up_bytes'] for n in group) / len(group) / 1e6:.2f} MB sent per node; "
              f"highest 10 s window {max(n['peak10_bps'] / n['limit_bps'] for n in group):.3f}x the "
              f"{'cap' if result['run'] not in ('alone', 'float32') else 'link'} on the wire, "
              f"{max(n['payload_peak10_bps'] / n['limit_bps'] for n in group):.3f}x in exchange payload; busy share "
              f"max {max(n['busy'] for n in group):.3f}, mean {sum(n['busy'] for n in group) / len(group):.3f} on the "
              f"wire, max {max(n['payload_avg_bps'] / n['limit_bps'] for n in group):.3f} in payload since start")
        ok = [n["counters"] for n in group]
        print(f"  {tag} exchanges: " + ", ".join(f"{k} {sum(c[k] for c in ok)}" for k in ("ok", "busy", "refused", "failed")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=DemoSettings().duration)
    parser.add_argument("--runs", default="alone,float32,capped,nesterov,fiber,mixed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write every run's raw results here")
    args = parser.parse_args()
    if (why := missing_requirements()) is not None:
        sys.exit(f"bench_home_links: {why}")
    demo = DemoSettings(nodes=NODES, task=TASK, duration=args.duration, training=DemoTraining(seed=args.seed))
    results: dict[str, dict[str, Any]] = {}
    alone_rate: float | None = None
    for name in args.runs.split(","):
        step_sleep = 0.0 if alone_rate is None else (SLOW_FACTOR - 1) / alone_rate
        result = run_one(RUNS[name], demo, step_sleep)
        samples = sum(n["samples"] for n in result["nodes"])
        allreduce = allreduce_baseline(demo, samples)
        results[name] = {**result, "allreduce": allreduce}
        report(result, allreduce, alone_rate)
        if name == "alone":
            alone_rate = sum(n["steps_per_s"] for n in result["nodes"]) / NODES
        if args.json:  # after every run: a later run that fails keeps the earlier ones
            args.json.write_text(json.dumps(results, indent=1))
    if "float32" in results:
        f32 = results["float32"]
        target = sum(n["accuracy"] for n in f32["nodes"]) / NODES
        base = bytes_to_reach(f32, target)
        print(f"\nwire bytes per node to first reach float32's final mean accuracy ({100 * target:.2f}%):")
        for name, r in results.items():
            got = bytes_to_reach(r, target) if r["run"] != "alone" else None
            ratio = f" = {base / got:.1f}x fewer than float32" if got and base else ""
            print(f"  {name:9} {'never' if got is None else f'{got / 1e6:.2f} MB'}{ratio}")


if __name__ == "__main__":
    main()
