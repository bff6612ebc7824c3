"""`peerfed init --public-relay`: the settings of a public bootstrap box, and the line its
operator gives to the rigs that use it.

A public bootstrap box does not train (no model, no exchange: train.enabled = false), relays
circuits for rigs behind NAT routers that cannot be dialed (p2p.relay_service, within the
per-circuit caps of the template), asks no router for port mappings (it has a public address),
and listens on every interface. Its address is learnt from nothing on the internet: a specific
--p2p-listen address is used as given, 0.0.0.0 becomes this machine's public interface
addresses, or the <PUBLIC_IP> placeholder where it has none (a cloud VM behind 1:1 NAT).

Owner: none; plain values and functions for the CLI.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from peerfed.config import Config

HELP = ("write a public bootstrap box's config: training off, relays circuits for rigs behind "
        "NAT routers, no port mapping, listens on all interfaces; prints the line rigs paste")

# Dotted key -> value, written into the commented template (explicit init options win).
SETTINGS: dict[str, Any] = {
    "train.enabled": False,          # a relay box only introduces and relays peers
    "p2p.relay_service": True,       # caps: the template's p2p.relay_max_bytes / relay_max_seconds
    "p2p.port_mapping": False,       # a public box has nothing to ask a router for
    "p2p.listen": ["/ip4/0.0.0.0/tcp/7401"],  # every interface, the default port
    "exchange.listen": "0.0.0.0:7402",        # not served while training is off; ready if it is turned on
}

PUBLIC_IP = "<PUBLIC_IP>"
PUBLIC_IPV6 = "<PUBLIC_IPV6>"
PORT = "<PORT>"


def _is_public(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_global


def dialable_addrs(listen: Sequence[str], local_ips: Sequence[str]) -> list[str]:
    """What rigs dial for each listen address: a specific address as given; 0.0.0.0 (::)
    as each public address among local_ips, else a placeholder; port 0 as <PORT>."""
    out: list[str] = []
    for addr in listen:
        parts = addr.split("/")  # "", "ip4", host, "tcp", port, ...
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4] == "0":
            parts[4] = PORT  # picked afresh at every start: rigs cannot keep it
        hosts = [parts[2]] if len(parts) >= 3 else []
        if parts[1:3] == ["ip4", "0.0.0.0"]:
            hosts = [ip for ip in local_ips if _is_public(ip)] or [PUBLIC_IP]
        elif parts[1:3] == ["ip6", "::"]:
            hosts = [PUBLIC_IPV6]
        out.extend("/".join(parts[:2] + [host] + parts[3:]) for host in hosts)
    return list(dict.fromkeys(out))


def instructions(cfg: Config, peer_id: str, local_ips: Sequence[str] | None = None) -> list[str]:
    """The lines `init --public-relay` prints after the config: what the box does, which port
    to open, and the exact `peerfed bootstrap add` line for every rig."""
    if local_ips is None:
        from peerfed.net.addrs import local_ipv4_addresses

        local_ips = local_ipv4_addresses()
    addrs = dialable_addrs(cfg.p2p.announce or cfg.p2p.listen, local_ips)
    ports = sorted({f"{parts[4]}/{parts[3]}" for parts in (a.split("/") for a in addrs) if len(parts) >= 5})
    caps = f"at most {cfg.p2p.relay_max_bytes / 2**20:g} MiB and {cfg.p2p.relay_max_seconds} s each"
    lines = [f"public relay: training off, relays circuits for rigs behind NAT routers ({caps}), no port mapping",
             f"open {', '.join(ports)} to the internet; then, on each rig:",
             "  peerfed bootstrap add " + " ".join(f"{a}/p2p/{peer_id}" for a in addrs)]
    for placeholder in (PUBLIC_IP, PUBLIC_IPV6):
        if any(placeholder in a for a in addrs):
            lines.append(f"({placeholder}: this box's public address, which its interfaces do not show)")
    if any(PORT in a for a in addrs):
        lines.append(f"({PORT}: p2p.listen has port 0, a new one at every start; "
                     f"set a fixed port in the config before giving this line out)")
    return lines
