"""What the local API and systemd show of a node: /status, /peers and the one-line STATUS=.

Pure assembly of the parts' published statistics into the JSON the CLI, the dashboard and
the tests read (its keys are an interface: never rename one). Runs on the main loop.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from peerfed import __version__
from peerfed.net.membership import Membership
from peerfed.net.p2p import P2PHost
from peerfed.training_side import TrainingSide


def node_status(*, peer_id: str, network: str, started_at: float, host: P2PHost, membership: Membership,
                training: TrainingSide) -> dict[str, Any]:
    status: dict[str, Any] = {
        "peer_id": peer_id,
        "network": network,
        "version": __version__,
        "uptime_s": round(time.time() - started_at, 3),
        "peers_connected": len(membership.connected_peers()),
        "addrs": host.addrs(),
        "exchange_url": training.exchange_url,
    }
    status.update(training.status())
    status["membership"] = dataclasses.asdict(membership.statistics())
    status.update(reachability_status(membership))
    return status


def reachability_status(membership: Membership) -> dict[str, Any]:
    """"reachability" ("public" | "private" | "unknown"), "observed_addrs" (how peers see us),
    and "nat": the record's addresses, dial-back checks and port mappings."""
    service = membership.reachability
    if service is None:
        return {"reachability": "unknown", "observed_addrs": [], "nat": {}}
    stats = service.statistics()
    nat = dataclasses.asdict(stats)
    nat["port_mapping"] = dataclasses.asdict(service.port_mapping())
    nat["tunnels"] = service.routes.tunnels()  # PeerID -> local URL of its exchange over libp2p
    return {"reachability": stats.reachability, "observed_addrs": list(stats.observed_addrs), "nat": nat}


def peer_rows(membership: Membership, banned: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The peer table, with "connected" only for peers whose connection is up right now, and
    each peer's ban in force (None if none: {reason, since, until})."""
    live = set(membership.connected_peers())
    rows = membership.peers_snapshot()
    banned = banned or {}
    for row in rows:
        if row["state"] == "connected" and row["peer_id"] not in live:
            row["state"] = "known"
        ban = banned.get(row["peer_id"])
        row["ban"] = None if ban is None else {k: ban[k] for k in ("reason", "since", "until")}
    return rows


def status_line(status: dict[str, Any]) -> str:
    """systemd's STATUS=: peers, step, accuracy, the last exchange."""
    parts = [f"peers {status['peers_connected']}"]
    if "step" in status:
        parts.append(f"step {status['step']}")
    accuracy = (status.get("metrics") or {}).get("accuracy")
    if accuracy is not None:
        parts.append(f"accuracy {accuracy:.3f}")
    last = status.get("last_exchange")
    if last:
        parts.append(f"last exchange {last['outcome']} {time.time() - last['at']:.0f} s ago")
    return ", ".join(parts)
