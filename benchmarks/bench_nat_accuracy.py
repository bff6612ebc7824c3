"""Accuracy of two rigs behind NAT routers against the same two rigs made public (demo settings).

Run (root): python benchmarks/bench_nat_accuracy.py [--duration 60] [--seeds 1,2]

For each seed, two swarms run at the same time (so they share the loaded CPU alike), each a
public node (training off, relaying) and two rigs with the demo's training settings for
2 nodes (digits-mlp, Dirichlet alpha 0.1 shards, cosine lr over ``--duration``, an exchange
every 0.5 s): "public" rigs sit on the internet, "nat" rigs each behind a masquerading router
with no port mapping (they meet through the relay and hole-punch, case (b) of issue 11).
Printed per seed: each rig's test accuracy after ``--duration`` s of training and the
exchanges it made; the mean over rigs and seeds of both, and their difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from natswarm import NsNode, NsSwarm
from netlab import NetLab, missing_requirements

from peerfed.demo_report import DemoSettings, DemoTraining


def swarm_of(lab: NetLab, tmp: Path, nat: bool, settings: DemoSettings) -> tuple[NsSwarm, list[NsNode]]:
    if nat:
        t = lab.home_topology({"a": 1, "b": 1})
        machines = [t.rig("a1"), t.rig("b1")]
    else:
        t = lab.home_topology({})
        machines = [lab.on_internet(t, "a1", "198.18.0.21"), lab.on_internet(t, "b1", "198.18.0.22")]
    swarm = NsSwarm(lab, tmp)
    public = swarm.add(t.public, settings={"train.enabled": False, "p2p.relay_service": True})
    rigs = [swarm.add(m, bootstrap=public, settings={**settings.node_config(i), "p2p.port_mapping": False,
                                                      "log_level": "warning"})
            for i, m in enumerate(machines)]
    return swarm, rigs


def run_seed(seed: int, duration: float) -> dict[str, list[dict[str, Any]]]:
    settings = DemoSettings(nodes=2, duration=duration, training=DemoTraining(seed=seed))
    out: dict[str, list[dict[str, Any]]] = {}
    with NetLab() as lab_pub, NetLab() as lab_nat, tempfile.TemporaryDirectory() as tmp:
        swarms = {name: swarm_of(lab, Path(tmp) / name, name == "nat", settings)
                  for name, lab in (("public", lab_pub), ("nat", lab_nat))}
        for swarm, _ in swarms.values():
            for n in swarm.nodes:
                swarm.start(n)
        for swarm, _ in swarms.values():
            swarm.wait_up(timeout=300)
        time.sleep(duration + 5)  # the lr schedule ends; one more evaluation
        for name, (_, rigs) in swarms.items():
            out[name] = [{"accuracy": float(s["metrics"]["accuracy"]), "ok": s["exchanges"]["ok"],
                          "tunnel": s["nat"]["tunnels"]} for s in (r.status() for r in rigs)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--seeds", default="1")
    args = parser.parse_args()
    if (why := missing_requirements()) is not None:
        sys.exit(f"bench_nat_accuracy: {why}")
    mean: dict[str, list[float]] = {"public": [], "nat": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        result = run_seed(seed, args.duration)
        for name, rigs in result.items():
            line = ", ".join(f"{100 * r['accuracy']:.1f}% ({r['ok']} exchanges)" for r in rigs)
            kinds = {t["connection"] for r in rigs for t in r["tunnel"].values()}
            print(f"seed {seed} {name:6} {line}" + (f"; tunnels: {', '.join(sorted(kinds))}" if kinds else ""),
                  flush=True)
            mean[name] += [r["accuracy"] for r in rigs]
    pub, nat = (100 * sum(v) / len(v) for v in (mean["public"], mean["nat"]))
    print(f"\nmean accuracy after {args.duration:g} s: public {pub:.2f}%, nat {nat:.2f}%, "
          f"difference {nat - pub:+.2f} points (acceptance: within 1.0)")


if __name__ == "__main__":
    main()
