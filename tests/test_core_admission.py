"""core/admission.py: who may push or download, per-peer limits, bans and their expiry.

Fed plain values and a clock we advance by hand, like the other core tests.
"""

from __future__ import annotations

import pytest

from peerfed.core.admission import CLIPPED, STALLED, Limits, PeerGate, Roster

A, B, STRANGER = "peer-a", "peer-b", "stranger"
T0 = 1_000_000.0


def gate(**limits: object) -> PeerGate:
    g = PeerGate(Limits(**limits))  # type: ignore[arg-type]
    g.set_roster(Roster.of({A: "ff" * 32, B: ""}))
    return g


def test_only_roster_peers_are_admitted_whatever_they_sign() -> None:
    g = gate()
    assert g.admit(A, T0) is None
    refusal = g.admit(STRANGER, T0)
    assert refusal is not None and (refusal.status, refusal.reason) == (401, "not_a_peer")
    assert refusal.counted
    g.set_roster(Roster.of({}))
    assert g.admit(A, T0) is not None  # disconnected: out at once
    assert g.statistics().admitted == 0


def test_exchanges_per_minute_is_a_sliding_window_per_peer() -> None:
    g = gate(exchanges_per_minute=3)
    assert [g.admit(A, T0 + i) for i in range(3)] == [None, None, None]
    refusal = g.admit(A, T0 + 3)
    assert refusal is not None and (refusal.status, refusal.reason) == (429, "peer_rate_limit")
    assert g.admit(B, T0 + 3) is None          # the other peer has its own window
    assert g.admit(A, T0 + 60.5) is None       # the first start left the window


def test_bytes_per_hour_counts_what_moved() -> None:
    g = gate(bytes_per_hour=1000)
    assert g.admit(A, T0) is None
    g.charge(A, 600, T0)
    assert g.admit(A, T0 + 1) is None
    g.charge(A, 600, T0 + 1)
    refusal = g.admit(A, T0 + 2)
    assert refusal is not None and refusal.reason == "peer_byte_limit"
    assert g.admit(A, T0 + 3601.5) is None


@pytest.mark.parametrize("reason", ["digest_mismatch", "bad_values"])
def test_a_bad_payload_bans_at_once_and_the_ban_expires(reason: str) -> None:
    g = gate(ban_seconds=30.0)
    ban = g.offence(A, reason, T0)
    assert ban is not None and (ban.reason, ban.until) == (reason, T0 + 30.0)
    refusal = g.admit(A, T0 + 29)
    assert refusal is not None and (refusal.status, refusal.reason) == (403, "banned")
    stats = g.statistics()
    assert [b.peer_id for b in stats.bans] == [A] and stats.bans_total == {reason: 1}
    assert stats.banned(A, T0 + 29) == ban and stats.banned(A, T0 + 31) is None
    assert g.admit(B, T0 + 29) is None          # only A
    assert g.admit(A, T0 + 30.5) is None        # expired: admitted again
    assert g.statistics().bans == ()


def test_soft_faults_are_strikes_within_one_ban_period() -> None:
    g = gate(ban_seconds=100.0, strikes_to_ban=3)
    assert g.offence(A, STALLED, T0) is None
    assert g.offence(A, CLIPPED, T0 + 10) is None
    assert g.offence(A, STALLED, T0 + 105) is None  # the first strike is older than a ban period
    ban = g.offence(A, CLIPPED, T0 + 108)
    assert ban is not None and ban.reason == CLIPPED
    assert g.statistics().offences == {STALLED: 2, CLIPPED: 2}


def test_expire_drops_ended_bans_from_the_snapshot() -> None:
    g = gate(ban_seconds=5.0)
    g.offence(A, "bad_values", T0)
    g.expire(T0 + 4)
    assert len(g.statistics().bans) == 1
    g.expire(T0 + 6)
    assert g.statistics().bans == ()


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        PeerGate(Limits(ban_seconds=0))


def test_peer_records_carry_the_tls_fingerprint_and_old_ones_still_decode() -> None:
    from peerfed.core.records import PeerRecord

    pin = "ab" * 32
    new = PeerRecord(addrs=(), exchange_url="https://h:1", tls_fingerprint=pin)
    assert PeerRecord.from_wire(new.to_wire()).tls_fingerprint == pin
    old = PeerRecord(addrs=(), exchange_url="http://h:1")
    assert "tls_fingerprint" not in old.to_wire()  # what an older node signs: the same bytes as before
    assert PeerRecord.from_wire(old.to_wire()).tls_fingerprint == ""


def test_whom_the_gossip_loop_skips_and_why() -> None:
    from peerfed.admission import why_not_exchange
    from peerfed.core.admission import Ban, GateStats

    pin, gate = "ab" * 32, GateStats()
    assert why_not_exchange(A, "https://h:1", pin=pin, gate=gate, require_tls=True, now=T0) is None
    old = why_not_exchange(A, "https://h:1", pin="", gate=gate, require_tls=True, now=T0)
    assert old is not None and "no TLS certificate fingerprint" in old
    plain = why_not_exchange(A, "http://h:1", pin="", gate=gate, require_tls=True, now=T0)
    assert plain is not None and "without TLS" in plain
    assert why_not_exchange(A, "http://h:1", pin="", gate=gate, require_tls=False, now=T0) is None  # trusted LAN
    banned = GateStats(bans=(Ban(A, "bad_values", since=T0, until=T0 + 10),))
    assert "banned for bad_values" in (why_not_exchange(A, "https://h:1", pin=pin, gate=banned,
                                                          require_tls=True, now=T0 + 1) or "")
    assert why_not_exchange(A, "https://h:1", pin=pin, gate=banned, require_tls=True, now=T0 + 11) is None


def test_the_roster_is_the_connected_peers_with_the_pins_of_their_signed_records() -> None:
    import time
    from types import SimpleNamespace

    from peerfed.admission import RosterPublisher
    from peerfed.core.envelope import seal
    from peerfed.core.peerid import Signer
    from peerfed.core.peerinfo import PeerInfo, SignedRecord
    from peerfed.core.records import PeerRecord

    new, old = Signer.generate(), Signer.generate()
    pin = "cd" * 32
    records = {
        new.peer_id: seal(new, network="n", recipient="", now=time.time(),
                          body=PeerRecord(addrs=(), exchange_url="https://h:1", tls_fingerprint=pin)),
        old.peer_id: seal(old, network="n", recipient="", now=time.time(), body=PeerRecord(addrs=())),
    }
    table = SimpleNamespace(max_peers=8, get=lambda p: PeerInfo(p, record=SignedRecord(records[p], 1.0)))
    connected = [new.peer_id, old.peer_id]
    membership = SimpleNamespace(table=table, connected_peers=lambda: list(connected))
    published = []
    publisher = RosterPublisher(published.append)
    roster = publisher.update(membership)  # type: ignore[arg-type]
    assert dict(roster.pins) == {new.peer_id: pin, old.peer_id: ""}
    publisher.update(membership)  # type: ignore[arg-type]
    assert len(published) == 1  # unchanged: not published again
    connected.remove(old.peer_id)
    assert old.peer_id not in publisher.update(membership)  # type: ignore[arg-type]
    assert len(published) == 2


def test_only_requests_that_go_ahead_count_against_the_limit() -> None:
    g = gate(exchanges_per_minute=2)
    for i in range(5):  # refused for another reason (busy): checked, never recorded
        assert g.check(A, T0 + i) is None
    assert g.admit(A, T0 + 5) is None and g.admit(A, T0 + 6) is None
    assert g.check(A, T0 + 7) is not None
