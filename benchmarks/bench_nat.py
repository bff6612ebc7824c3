"""Exchange time between two rigs behind NAT routers, against the same rigs made public.

Run (root: network namespaces, tests/netlab.py): python benchmarks/bench_nat.py [--mib 16]
     [--reps 3] [--rate 100mbit]

Three swarms, one after another, each with a public node (training off; it relays) and two
rigs training ``synthetic:sized`` (``--mib`` MiB of float32 weights, throttled trainers),
every rig's link shaped alike (tc tbf on its eth0, egress: ``--rate``):
- public:       the rigs sit on the internet themselves (the baseline of this run);
- hole-punched: each rig behind its own masquerading router, no port mapping: they meet
                through the relay and DCUtR punches a direct TCP connection; the HTTP
                exchange runs over a libp2p stream on it (net/tunnel.py);
- relayed:      both routers pick a random outside port per connection, so punching fails
                and the exchange runs through the relay (caps raised out of the way).
Printed: the median of the daemon's duration_s of ``--reps`` exchanges (POST /exchange on rig
a1, a push-pull with b1) and its ratio to the public baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchutil import median, settings_for
from natswarm import NsNode, NsSwarm
from netlab import NetLab, missing_requirements


def exchange(node: NsNode, peer_id: str) -> dict[str, Any]:
    def post() -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{node.node.api_port}/exchange?peer={peer_id}",
                                         data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    return node.lab.inside(node.machine.ns, post)  # type: ignore[no-any-return]


def run_variant(variant: str, args: argparse.Namespace) -> list[float]:
    rig_settings = settings_for({}, **{
        "train.task": "synthetic:sized", "train.options": {"mib": args.mib, "step_sleep": 0.05},
        "train.node_count": 2, "exchange.transfer_timeout": 600.0, "p2p.port_mapping": False})
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix=f"bench-nat-{variant}-") as tmp:
        if variant == "public":
            t = lab.home_topology({})
            rigs = [lab.on_internet(t, "a1", "198.18.0.21"), lab.on_internet(t, "b1", "198.18.0.22")]
        else:
            t = lab.home_topology({"a": 1, "b": 1}, symmetric=["a", "b"] if variant == "relayed" else [])
            rigs = [t.rig("a1"), t.rig("b1")]
        for rig in rigs:
            # tbf: this kernel has no netem (no added delay); burst as benchmarks/shaped_loopback.sh
            lab.sh(rig.ns, f"tc qdisc add dev eth0 root tbf rate {args.rate} burst 1mb latency 100ms")
        swarm = NsSwarm(lab, Path(tmp))
        public = swarm.add(t.public, settings={"train.enabled": False, "p2p.relay_service": True,
                                               "p2p.relay_max_bytes": 1 << 40, "p2p.relay_max_seconds": 3600})
        a1, b1 = (swarm.add(m, bootstrap=public, settings={**rig_settings, "train.node_index": i})
                  for i, m in enumerate(rigs))
        swarm.start_all(timeout=300)
        ready = _ready(a1, b1, variant)
        swarm.wait(ready, 180, f"{variant}: a1 can exchange with b1")
        times = []
        for _ in range(args.reps):
            answer = exchange(a1, b1.peer_id)
            if answer.get("outcome") != "ok":
                raise RuntimeError(f"{variant}: exchange {answer}")
            times.append(float(answer["duration_s"]))
        return times


def _ready(a1: NsNode, b1: NsNode, variant: str) -> Any:
    def check() -> bool:
        status = a1.status()
        tunnel = status["nat"]["tunnels"].get(b1.peer_id)
        if variant == "public":
            return b1.peer_id in a1.connected() and tunnel is None
        want = "direct" if variant == "hole-punched" else "relayed"
        return tunnel is not None and tunnel["connection"] == want

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=16.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--variants", default="public,hole-punched,relayed")
    args = parser.parse_args()
    if (why := missing_requirements()) is not None:
        sys.exit(f"bench_nat: {why}")
    results: dict[str, list[float]] = {}
    for variant in args.variants.split(","):
        started = time.monotonic()
        results[variant] = run_variant(variant, args)
        print(f"{variant:13} exchanges {', '.join(f'{x:.2f}' for x in results[variant])} s "
              f"(swarm and runs: {time.monotonic() - started:.0f} s)", flush=True)
    base = median(results["public"]) if "public" in results else None
    print(f"\n{args.mib:g} MiB push-pull, each rig's egress shaped to {args.rate}; median of {args.reps}:")
    for variant, times in results.items():
        ratio = f"{median(times) / base:.2f}x public" if base else ""
        print(f"  {variant:13} {median(times):7.2f} s  {ratio}")


if __name__ == "__main__":
    main()
