"""Addresses we advertise must be dialable: 0.0.0.0 expands to the interfaces' addresses."""

from __future__ import annotations

import ipaddress

from peerfed.net.addrs import expand_unspecified, local_ipv4_addresses


def test_local_addresses_are_ipv4_with_loopback_last() -> None:
    found = local_ipv4_addresses()
    assert "127.0.0.1" in found
    parsed = [ipaddress.ip_address(ip) for ip in found]
    assert all(ip.version == 4 for ip in parsed)
    assert parsed[-1].is_loopback


def test_unspecified_address_expands_and_others_stay() -> None:
    out = expand_unspecified(["/ip4/0.0.0.0/tcp/7401/p2p/12D3KooWX", "/ip4/203.0.113.9/tcp/7401"])
    assert "/ip4/0.0.0.0/tcp/7401/p2p/12D3KooWX" not in out
    assert "/ip4/127.0.0.1/tcp/7401/p2p/12D3KooWX" in out
    assert out[-1] == "/ip4/203.0.113.9/tcp/7401"
    assert len(out) == len(local_ipv4_addresses()) + 1
