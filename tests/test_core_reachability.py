"""core/reachability.py: verdicts in, reachability and record addresses out (no sockets)."""

from __future__ import annotations

from peerfed.core.envelope import seal
from peerfed.core.peerid import Signer
from peerfed.core.reachability import (
    GIVE_UP_AFTER,
    VERDICT_TTL,
    AddressBook,
    Reachability,
    is_lan_addr,
    stored_record,
    worth_initiating,
)
from peerfed.core.records import PeerRecord

LAN = "/ip4/192.168.1.10/tcp/7401"
PUBLIC_LISTEN = "/ip4/198.18.0.10/tcp/7401"
MAPPED = "/ip4/11.18.0.1/tcp/7401"
OBSERVED = "/ip4/198.18.1.1/tcp/7401"


def test_lan_addresses_are_told_apart_from_the_internet() -> None:
    assert is_lan_addr(LAN) and is_lan_addr("/ip4/10.1.2.3/tcp/1") and is_lan_addr("/ip4/100.64.0.1/tcp/1")
    assert not is_lan_addr(PUBLIC_LISTEN)  # 198.18.0.0/15: the namespace tests' internet
    assert not is_lan_addr("/dns4/example.org/tcp/1")


def test_a_dialed_back_mapped_address_makes_us_public_and_comes_first() -> None:
    book = AddressBook()
    book.set_listen([LAN])
    book.add_candidate(MAPPED, "mapped")
    assert book.reachability(0) is Reachability.UNKNOWN
    rec = book.record(0)
    assert rec.addrs == (LAN,) and rec.private_addrs == 1  # a guess is not published
    book.dial_back("server1", server_saw_lan=False, ok=True, addr=MAPPED, asked=[MAPPED], now=10)
    rec = book.record(10)
    assert rec.reachability is Reachability.PUBLIC
    assert rec.addrs == (MAPPED, LAN) and rec.private_addrs == 1


def test_failed_dial_backs_make_us_private_and_a_guess_stops_being_checked() -> None:
    book = AddressBook()
    book.set_listen([LAN])
    book.observe("/ip4/198.18.1.1/tcp/40312", 0)
    book.add_candidate(OBSERVED, "observed")
    for i in range(GIVE_UP_AFTER):
        assert OBSERVED in book.to_check()
        book.dial_back(f"s{i}", server_saw_lan=False, ok=False, addr=None, asked=[OBSERVED], now=i)
    assert book.to_check() == []
    assert book.reachability(5) is Reachability.PRIVATE
    assert OBSERVED not in book.record(5).addrs
    # Long after the verdicts expired, what was observed still says "behind a NAT".
    assert book.reachability(VERDICT_TTL + 100) is Reachability.PRIVATE


def test_a_neighbour_on_our_lan_proves_nothing_about_the_internet() -> None:
    book = AddressBook()
    book.set_listen([LAN, PUBLIC_LISTEN])
    book.dial_back("neighbour", server_saw_lan=True, ok=True, addr=PUBLIC_LISTEN, asked=[PUBLIC_LISTEN], now=1)
    assert book.reachability(1) is Reachability.UNKNOWN
    book.dial_back("far", server_saw_lan=False, ok=True, addr=PUBLIC_LISTEN, asked=[PUBLIC_LISTEN], now=2)
    book.dial_back("far2", server_saw_lan=False, ok=False, addr=None, asked=[PUBLIC_LISTEN], now=3)
    assert book.reachability(3) is Reachability.UNKNOWN  # one each way: no verdict
    book.dial_back("far3", server_saw_lan=False, ok=True, addr=PUBLIC_LISTEN, asked=[PUBLIC_LISTEN], now=4)
    assert book.reachability(4) is Reachability.PUBLIC
    assert book.record(4).addrs[0] == PUBLIC_LISTEN


def test_pairing_skips_nat_peers_without_a_path_but_not_lan_neighbours() -> None:
    addrs = ("/ip4/192.168.2.10/tcp/7401/p2p/x",)
    assert worth_initiating("public", (), 0, our_lan_ips=[])
    assert worth_initiating("", addrs, 1, our_lan_ips=[])  # unknown: try
    assert not worth_initiating("private", addrs, 1, our_lan_ips=["198.18.0.10"])
    assert not worth_initiating("private", addrs, 1, our_lan_ips=["192.168.1.10"])
    assert worth_initiating("private", addrs, 1, our_lan_ips=["192.168.2.11"])  # same LAN


def test_the_record_carries_reachability_and_reads_back() -> None:
    signer = Signer.generate()
    addr = f"{MAPPED}/p2p/{signer.peer_id}"
    lan = f"{LAN}/p2p/{signer.peer_id}"
    raw = seal(signer, network="n", now=1.0,
               body=PeerRecord(addrs=(addr, lan), reachability="public", private_addrs=1))
    rec = stored_record(raw)
    assert rec is not None and rec.reachability == "public" and rec.private_addrs == 1
    assert rec.addrs == (addr, lan)
    assert stored_record(b"junk") is None
    # Without the new fields the wire form is what older nodes sign and read.
    assert set(PeerRecord(addrs=(addr,)).to_wire()) == {"addrs", "exchange_url", "fingerprint", "version"}


def test_status_text_says_reachability_and_the_mapping() -> None:
    from peerfed.cli import status_lines

    status = {"peer_id": "x", "reachability": "public", "observed_addrs": ["/ip4/11.18.0.1/tcp/40000"],
              "nat": {"port_mapping": {"mapped": [{"external_ip": "11.18.0.1", "external_port": 7401,
                                                   "internal_port": 7401}], "protocol": "NAT-PMP"}}}
    line = [x for x in status_lines(status) if x.startswith("reachability")]
    assert line == ["reachability     public (seen at: /ip4/11.18.0.1/tcp/40000; mapped 11.18.0.1:7401->7401 by NAT-PMP)"]
