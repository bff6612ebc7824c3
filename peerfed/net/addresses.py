"""Where peers reach this node's exchange port, when the config does not say (advertise_url).

A listen address that names one host is that host; an unspecified one (0.0.0.0, ::) is the
first IPv4 of the announce or listen multiaddrs, else of this machine's interfaces.
"""

from __future__ import annotations

from collections.abc import Sequence

from peerfed.net.p2p import local_ipv4_addresses


def advertised_host(listen_host: str, multiaddrs: Sequence[str]) -> str:
    """The host part of our exchange URL (IPv6 in brackets)."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return f"[{listen_host}]" if ":" in listen_host else listen_host
    for addr in multiaddrs:
        parts = addr.split("/")
        if len(parts) > 2 and parts[1] == "ip4" and parts[2] != "0.0.0.0":
            return parts[2]
    local = local_ipv4_addresses()
    return local[0] if local else "127.0.0.1"
