"""This machine's addresses: whether a TCP listen address can be bound, and what 0.0.0.0
means to a peer (one address per local interface: peers cannot dial 0.0.0.0).

Owner: none; plain functions (the bind probe opens and closes a socket at once).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Sequence

import multiaddr

from peerfed.errors import AddressInUseError, ConfigError


def check_listen_addrs(addrs: Sequence[str]) -> None:
    """Fail early, with a clear message, when a TCP listen address cannot be bound.

    py-libp2p only logs a failed listener and carries on with no addresses.
    """
    for text in addrs:
        try:
            maddr = multiaddr.Multiaddr(text)
            host = maddr.value_for_protocol("ip4") if "ip4" in text else maddr.value_for_protocol("ip6")
            port = int(maddr.value_for_protocol("tcp"))
        except Exception as exc:  # noqa: BLE001 - multiaddr raises many types
            raise ConfigError(f"p2p.listen: {text!r} is not a TCP multiaddr ({exc})") from exc
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        # Like the real listener: connections of our previous run in TIME_WAIT must not make
        # a quick restart fail; a live listener on the port still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUseError(f"p2p.listen: {text} is already in use by another process") from exc
            raise ConfigError(f"p2p.listen: cannot listen on {text}: {exc.strerror}") from exc
        finally:
            probe.close()


def local_ipv4_addresses() -> list[str]:
    """This machine's IPv4 interface addresses, non-loopback first (Linux ioctl; no extra deps)."""
    import fcntl
    import struct

    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), 0x8915,  # SIOCGIFADDR
                                     struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # interface without an IPv4 address
            found.append(socket.inet_ntoa(packed[20:24]))
    return sorted(set(found), key=lambda ip: (ipaddress.ip_address(ip).is_loopback, ip))


def expand_unspecified(addrs: Sequence[str]) -> list[str]:
    """Replace /ip4/0.0.0.0/... by one address per local interface: peers cannot dial 0.0.0.0."""
    out: list[str] = []
    for addr in addrs:
        if addr.startswith("/ip4/0.0.0.0/"):
            rest = addr[len("/ip4/0.0.0.0"):]
            out.extend(f"/ip4/{ip}{rest}" for ip in local_ipv4_addresses())
        else:
            out.append(addr)
    return list(dict.fromkeys(out))


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
