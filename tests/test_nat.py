"""Rigs behind home NAT routers, in network namespaces (tests/netlab.py; root, slow).

Case (a) of issue 11: router a runs miniupnpd, router b does not. The rig behind a maps its
p2p and exchange ports, learns it is public once a peer dials the mapping back (AutoNAT),
and puts the mapped address first in its record; the rig behind b learns it is private.
b1 dials a1's mapping and they exchange weights; a1 never tries b1's private URL (an exchange
it opens runs over the libp2p connection b1 made) and the public node (training off) wastes
no dial on b1's LAN address.
Stopping a1 removes its mappings from the router.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from natswarm import NsNode, NsSwarm
from netlab import NetLab, missing_requirements

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(missing_requirements(upnp=True) is not None, reason=missing_requirements(upnp=True) or ""),
]

RIG = {"exchange.interval": 2.0, "p2p.port_mapping": True}


def _exchanged(n: NsNode) -> int:
    return int((n.status().get("exchanges") or {}).get("ok", 0))


def test_a_rig_behind_a_upnp_router_maps_its_ports_and_exchanges_with_a_rig_behind_another(
        tmp_path: Path) -> None:
    with NetLab() as lab:
        t = lab.home_topology({"a": 1, "b": 1}, upnp=["a"])
        router_a = t.routers["a"].machine
        swarm = NsSwarm(lab, tmp_path)
        public = swarm.add(t.public, settings={"train.enabled": False})
        a1 = swarm.add(t.rig("a1"), bootstrap=public, settings=RIG)
        b1 = swarm.add(t.rig("b1"), bootstrap=public, settings=RIG)
        started = time.monotonic()
        swarm.start_all()
        up = time.monotonic() - started

        mapped = f"/ip4/{router_a.ip}/tcp/{a1.node.p2p_port}"
        swarm.wait(lambda: a1.status()["reachability"] == "public", 60, "a1 public through its mapping")
        nat = a1.status()["nat"]
        assert nat["record_addrs"][0] == mapped                      # dialable first
        assert nat["record_addrs"][-nat["private_addrs"]:] == [f"/ip4/{a1.machine.ip}/tcp/{a1.node.p2p_port}"]
        assert nat["exchange_url"] == f"http://{router_a.ip}:{a1.node.exchange_port}"
        assert {m["internal_port"] for m in nat["port_mapping"]["mapped"]} == {a1.node.p2p_port,
                                                                                a1.node.exchange_port}
        assert nat["port_mapping"]["protocol"] == "UPnP IGD"   # tried before NAT-PMP
        # As a user sees it: `peerfed status` and `--json` inside a1's namespace.
        cli = f"{sys.executable} -m peerfed status --home {a1.node.home}"
        as_json = json.loads(lab.sh(a1.machine.ns, cli + " --json"))
        assert as_json["reachability"] == "public" and as_json["observed_addrs"]
        text = lab.sh(a1.machine.ns, cli)
        assert "reachability     public" in text and f"{router_a.ip}:{a1.node.p2p_port}->" in text
        swarm.wait(lambda: b1.status()["reachability"] == "private", 60, "b1 private")
        assert b1.status()["observed_addrs"][0].startswith(f"/ip4/{t.routers['b'].machine.ip}/tcp/")
        assert public.status()["reachability"] == "public"

        took = swarm.wait(lambda: _exchanged(a1) >= 1 and _exchanged(b1) >= 1, 60, "a1 and b1 exchange")
        everyone = {n.peer_id for n in (public, a1, b1)}
        swarm.wait(lambda: all(n.connected() == everyone - {n.peer_id} for n in (public, a1, b1)), 30,
                   "full membership")
        a_status, b_status = a1.status(), b1.status()
        assert b_status["last_exchange"]["peer_id"] == a1.peer_id
        assert a_status["last_exchange"]["peer_id"] == b1.peer_id
        # b1 opens a1's mapped URL directly; a1 never tries b1's private URL: when it opens an
        # exchange itself, it goes over the libp2p connection b1 made (a tunnel)
        assert a1.peer_id not in b_status["nat"]["tunnels"]
        assert a_status["exchanges"]["failed"] == 0
        assert set(a_status["nat"]["tunnels"]) <= {b1.peer_id}
        print(f"\ncase (a): daemons up in {up:.1f} s; a1 public, first a1-b1 exchange "
              f"{took:.1f} s after that; exchanges a1={_exchanged(a1)} b1={_exchanged(b1)}")
        # The public node never dialed b1's LAN address (no path; b1 dials it).
        assert f"could not connect to /ip4/{b1.machine.ip}" not in public.node.log_path.read_text()

        rules = lab.sh(router_a.ns, "nft list chain inet home prerouting_miniupnpd")
        assert f"dport {a1.node.p2p_port}" in rules
        a1.node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        a1.node.process.wait(30)  # type: ignore[union-attr]
        rules = lab.sh(router_a.ns, "nft list chain inet home prerouting_miniupnpd")
        assert f"dport {a1.node.p2p_port}" not in rules and f"dport {a1.node.exchange_port}" not in rules


def test_two_rigs_behind_plain_nats_exchange_through_a_hole_punched_or_relayed_connection(
        tmp_path: Path) -> None:
    """Case (b): no port mapping anywhere; the public node (training off) relays."""
    with NetLab() as lab:
        t = lab.home_topology({"a": 1, "b": 1})
        swarm = NsSwarm(lab, tmp_path)
        public = swarm.add(t.public, settings={"train.enabled": False, "p2p.relay_service": True})
        a1 = swarm.add(t.rig("a1"), bootstrap=public, settings=RIG)
        b1 = swarm.add(t.rig("b1"), bootstrap=public, settings=RIG)
        started = time.monotonic()
        swarm.start_all()
        up = time.monotonic() - started
        took = swarm.wait(lambda: _exchanged(a1) >= 1 and _exchanged(b1) >= 1, 60, "a1 and b1 exchange")
        since_start = time.monotonic() - started
        everyone = {n.peer_id for n in (public, a1, b1)}
        swarm.wait(lambda: all(n.connected() == everyone - {n.peer_id} for n in (public, a1, b1)), 30,
                   "full membership")
        for rig, other in ((a1, b1), (b1, a1)):
            status = rig.status()
            assert status["reachability"] == "private"
            assert status["nat"]["relay"].startswith(f"/ip4/{t.public.ip}/tcp/{public.node.p2p_port}/p2p/")
            assert status["exchanges"]["ok"] >= 1 and status["last_exchange"]["peer_id"] == other.peer_id
            # DCUtR replaced the relayed connection by a hole-punched one
            swarm.wait(lambda rig=rig, other=other: rig.status()["nat"]["tunnels"].get(other.peer_id, {})
                       .get("connection") == "direct", 60, f"{rig.machine.name}: direct connection")
        print(f"\ncase (b): daemons up in {up:.1f} s; first a1-b1 exchange {took:.1f} s after that, "
              f"{since_start:.1f} s after start; exchanges a1={_exchanged(a1)} b1={_exchanged(b1)}")


def test_a_relay_carries_no_more_than_its_caps(tmp_path: Path) -> None:
    """Case (c): both routers pick a random outside port per connection, so hole punching
    cannot work and every exchange goes through the relay, whose circuits are capped at
    60 000 bytes: exchanges complete until a circuit's budget runs out, then the relay cuts
    that circuit (the exchange in flight fails, nothing of it is merged) and a new one is made."""
    cap = 60_000
    with NetLab() as lab:
        t = lab.home_topology({"a": 1, "b": 1}, symmetric=["a", "b"])
        swarm = NsSwarm(lab, tmp_path)
        public = swarm.add(t.public, settings={"train.enabled": False, "p2p.relay_service": True,
                                               "p2p.relay_max_bytes": cap})
        a1 = swarm.add(t.rig("a1"), bootstrap=public, settings=RIG)
        b1 = swarm.add(t.rig("b1"), bootstrap=public, settings=RIG)
        swarm.start_all()
        swarm.wait(lambda: _exchanged(a1) >= 2 and _exchanged(b1) >= 2, 90, "exchanges through the relay")
        swarm.wait(lambda: "data limit exceeded" in public.node.log_path.read_text(), 60, "the relay's cap")
        log = public.node.log_path.read_text()
        # py-libp2p checks each chunk against what is left and cuts the circuit before it
        # would pass the cap: "remaining=R, attempted=A" with A > R.
        for line in (x for x in log.splitlines() if "data limit exceeded" in x):
            remaining, attempted = (int(v) for v in re.findall(r"remaining=(\d+), attempted=(\d+)", line)[0])
            assert 0 <= remaining < attempted and remaining <= cap
        for rig, other in ((a1, b1), (b1, a1)):
            tunnel = rig.status()["nat"]["tunnels"].get(other.peer_id)
            assert tunnel is None or tunnel["connection"] == "relayed"  # never hole-punched
        failed = a1.status()["exchanges"]["failed"] + b1.status()["exchanges"]["failed"]
        print(f"\ncase (c): exchanges ok a1={_exchanged(a1)} b1={_exchanged(b1)}, cut by the cap: {failed}")
