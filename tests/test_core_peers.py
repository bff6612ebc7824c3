"""PeerTable: fed events with explicit times, decisions read back (no I/O, no clock)."""

from __future__ import annotations

import json
import math
import pathlib
import random

import pytest
from test_layering import top_level_imports
from hypothesis import given, settings
from hypothesis import strategies as st

import peerfed.core.peers as peers_module
from peerfed.core.peerinfo import SignedRecord
from peerfed.core.peers import PeerState, PeerTable, jittered_backoff

ME = "12D3KooWme"
T0 = 1_700_000_000.0


def pid(i: int) -> str:
    return f"12D3KooWpeer{i:03d}"


def addr(i: int) -> str:
    return f"/ip4/127.0.0.1/tcp/{7400 + i}/p2p/{pid(i)}"


def table(**kw) -> PeerTable:
    kw.setdefault("rng", random.Random(1))
    return PeerTable(ME, **kw)


def add(t: PeerTable, i: int, *, now: float = T0, record_time: float | None = None, **kw) -> bool:
    return t.add_record(
        pid(i),
        addrs=kw.get("addrs", [addr(i)]),
        exchange_url=kw.get("exchange_url", f"http://127.0.0.1:{8400 + i}"),
        fingerprint=kw.get("fingerprint", "fp1"),
        record=kw.get("record", f"record-{i}".encode()),
        record_time=now if record_time is None else record_time,
        now=now,
    )


# -- backoff ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    failures=st.integers(min_value=1, max_value=10_000),
    base=st.floats(min_value=0.01, max_value=100.0),
    cap=st.floats(min_value=100.0, max_value=10_000.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_within_jitter_bounds_and_cap(failures, base, cap, seed):
    delay = jittered_backoff(failures, base=base, cap=cap, rng=random.Random(seed))
    expected = min(base * 2.0 ** min(failures - 1, 64), cap)
    assert 0.5 * expected * (1 - 1e-12) <= delay <= expected * (1 + 1e-12)
    assert delay <= cap * (1 + 1e-12)


def test_backoff_zero_failures_is_zero():
    assert jittered_backoff(0, base=1.0, cap=10.0, rng=random.Random(0)) == 0.0


def test_record_failure_backoff_grows_then_caps():
    t = table(base_backoff=1.0, max_backoff=60.0)
    add(t, 1)
    delays = []
    for n in range(1, 13):
        now = T0 + 1000.0 * n
        delays.append(t.record_failure(pid(1), now) - now)
    for n, d in enumerate(delays, start=1):
        nominal = min(2.0 ** (n - 1), 60.0)
        assert 0.5 * nominal <= d <= nominal
    assert all(d <= 60.0 for d in delays)
    assert min(delays[7:]) >= 30.0  # at the cap, jitter still keeps it in [cap/2, cap]
    info = t.get(pid(1))
    assert info.failures == 12 and info.state is PeerState.FAILED


def test_jitter_spreads_retries():
    t = table(base_backoff=1.0, max_backoff=300.0, rng=random.Random(7))
    for i in range(50):
        add(t, i)
        for _ in range(5):
            t.record_failure(pid(i), T0)
    attempts = {round(t.get(pid(i)).next_attempt, 6) for i in range(50)}
    assert len(attempts) == 50  # not all at the same instant


@pytest.mark.parametrize("success", ["connected", "ping"])
def test_success_resets_failures(success):
    t = table()
    add(t, 1)
    for k in range(5):
        t.record_failure(pid(1), T0 + k)
    if success == "connected":
        t.mark_connected(pid(1), T0 + 100)
    else:
        t.record_ping(pid(1), 12.5, T0 + 100)
        assert t.get(pid(1)).rtt_ms == 12.5
    info = t.get(pid(1))
    assert info.failures == 0 and info.state is PeerState.CONNECTED
    assert info.last_seen == T0 + 100
    # the next failure starts from the base again
    now = T0 + 200
    assert t.record_failure(pid(1), now) - now <= 1.0


def test_failure_of_unknown_peer_schedules_nothing():
    t = table()
    assert t.record_failure(pid(9), T0) == math.inf
    assert len(t) == 0


def test_disconnect_waits_a_little_before_redial():
    t = table(base_backoff=2.0)
    add(t, 1)
    t.mark_connected(pid(1), T0)
    t.mark_disconnected(pid(1), T0 + 10)
    info = t.get(pid(1))
    assert info.state is PeerState.KNOWN and info.failures == 0 and info.last_seen == T0 + 10
    assert 11.0 <= info.next_attempt - T0 <= 12.0
    assert t.due_for_dial(T0 + 10) == []
    assert t.due_for_dial(T0 + 12) == [pid(1)]


# -- dialing ----------------------------------------------------------------------------


def test_due_for_dial_ordering_and_filters():
    t = table(rng=random.Random(3))
    for i in range(1, 8):
        add(t, i, now=T0)
    t.mark_connected(pid(1), T0)  # connected: never due
    t.mark_connected(pid(2), T0 + 5)
    t.mark_disconnected(pid(2), T0 + 5)  # seen at T0+5
    t.mark_connected(pid(3), T0 + 2)
    t.mark_disconnected(pid(3), T0 + 2)  # seen at T0+2
    t.record_failure(pid(4), T0)  # 1 failure
    for _ in range(3):
        t.record_failure(pid(5), T0)  # 3 failures
    # pid 6 and 7: never seen, no failures
    t.mark_connected(pid(50), T0)  # inbound, no address: cannot be dialled
    t.mark_disconnected(pid(50), T0)
    t.add_address(pid(8), [addr(8)], T0, pinned=True)  # bootstrap
    later = T0 + 1000
    assert t.due_for_dial(later) == [
        pid(8),  # 0 failures, pinned
        pid(2),  # 0 failures, most recently seen
        pid(3),
        pid(6),  # never seen
        pid(7),
        pid(4),  # 1 failure
        pid(5),  # 3 failures
    ]


def test_backoff_keeps_peer_out_of_dial_list_until_its_time():
    t = table()
    add(t, 1)
    nxt = t.record_failure(pid(1), T0)
    assert pid(1) not in t.due_for_dial(nxt - 0.001)
    assert pid(1) in t.due_for_dial(nxt)


# -- eviction ---------------------------------------------------------------------------


def test_evicts_failed_peer_unseen_for_evict_after():
    t = table(evict_after=3600.0, unreached_limit=100)
    add(t, 1)
    t.mark_connected(pid(1), T0)
    t.mark_disconnected(pid(1), T0 + 10)
    t.record_failure(pid(1), T0 + 20)
    assert t.evict_stale(T0 + 10 + 3599) == []
    assert t.evict_stale(T0 + 10 + 3600) == [pid(1)]
    assert pid(1) not in t and t.statistics()["evicted"] == 1


def test_does_not_evict_healthy_known_peer_however_old():
    t = table(evict_after=10.0)
    add(t, 1)
    t.mark_connected(pid(1), T0)
    t.mark_disconnected(pid(1), T0)
    assert t.evict_stale(T0 + 1e6) == []


def test_evicts_never_reached_relayed_peer_after_unreached_limit():
    t = table(evict_after=1e9, unreached_limit=8)
    add(t, 1)
    for k in range(7):
        t.record_failure(pid(1), T0 + k)
    assert t.evict_stale(T0 + 10) == []
    t.record_failure(pid(1), T0 + 10)
    assert t.evict_stale(T0 + 10) == [pid(1)]


def test_reached_once_is_not_evicted_by_unreached_rule():
    t = table(evict_after=1e9, unreached_limit=3)
    add(t, 1)
    t.mark_connected(pid(1), T0)
    t.mark_disconnected(pid(1), T0)
    for k in range(10):
        t.record_failure(pid(1), T0 + k)
    assert t.evict_stale(T0 + 20) == []


def test_never_evicts_connected_or_pinned():
    t = table(evict_after=1.0, unreached_limit=1)
    add(t, 1)
    for k in range(20):
        t.record_failure(pid(1), T0 + k)
    t.mark_connected(pid(1), T0 - 1e6)  # connected long ago, still connected
    t.add_address(pid(2), [addr(2)], T0, pinned=True)
    for k in range(20):
        t.record_failure(pid(2), T0 + k)
    assert t.evict_stale(T0 + 1e7) == []
    assert len(t) == 2
    t.unpin(pid(2))
    assert t.evict_stale(T0 + 1e7) == [pid(2)]


# -- max_peers --------------------------------------------------------------------------


def test_full_table_replaces_failed_first_then_least_recently_seen():
    t = table(max_peers=3)
    for i in (1, 2, 3):
        add(t, i)
    for i, seen in ((1, T0 + 30), (2, T0 + 10), (3, T0 + 20)):
        t.mark_connected(pid(i), seen)
        t.mark_disconnected(pid(i), seen)
    t.record_failure(pid(1), T0 + 40)  # most recently seen, but failed
    assert add(t, 4, now=T0 + 50)
    assert pid(1) not in t and len(t) == 3
    t.mark_connected(pid(4), T0 + 55)
    t.mark_disconnected(pid(4), T0 + 55)
    # all reached and healthy: a relayed record may only replace failed/never-reached ones
    assert not add(t, 5, now=T0 + 60)
    assert pid(5) not in t
    # a live newcomer (inbound connection) may replace the least recently seen healthy one
    assert t.mark_connected(pid(6), T0 + 70)
    assert pid(2) not in t  # seen at T0+10, the oldest
    assert t.mark_connected(pid(7), T0 + 80)
    assert pid(3) not in t  # seen at T0+20
    assert set(t.connected()) == {pid(6), pid(7)}
    stats = t.statistics()
    assert stats["dropped_full"] == 1 and stats["replaced"] == 3 and stats["total"] == 3


def test_full_of_connected_peers_drops_newcomer():
    t = table(max_peers=2)
    for i in (1, 2):
        add(t, i)
        t.mark_connected(pid(i), T0)
    assert not add(t, 3)
    assert not t.mark_connected(pid(4), T0)
    t.add_address(pid(5), [addr(5)], T0, pinned=True)
    assert set(t.connected()) == {pid(1), pid(2)} and len(t) == 2
    assert t.statistics()["dropped_full"] == 3


def test_relayed_record_replaces_never_reached_peer():
    t = table(max_peers=2)
    add(t, 1)
    t.mark_connected(pid(1), T0)
    t.mark_disconnected(pid(1), T0)
    add(t, 2)  # never reached
    assert add(t, 3, now=T0 + 1)
    assert pid(2) not in t and pid(1) in t and pid(3) in t


# -- records ----------------------------------------------------------------------------


def test_ignores_own_record_and_address():
    t = table()
    assert not t.add_record(
        ME, addrs=["/x"], exchange_url="", fingerprint="", record=b"r", record_time=T0, now=T0
    )
    t.add_address(ME, ["/x"], T0)
    assert not t.mark_connected(ME, T0)
    assert len(t) == 0


def test_stale_record_does_not_roll_back():
    t = table()
    assert add(t, 1, record_time=T0 + 10, now=T0 + 10, fingerprint="new", record=b"new")
    assert not add(t, 1, record_time=T0 + 5, now=T0 + 20, fingerprint="old", record=b"old")
    assert not add(t, 1, record_time=T0 + 10, now=T0 + 20, fingerprint="same", record=b"same")
    info = t.get(pid(1))
    assert info.fingerprint == "new" and info.record == SignedRecord(b"new", T0 + 10)


def test_newer_record_updates_data_but_keeps_liveness():
    t = table()
    add(t, 1, now=T0)
    t.mark_connected(pid(1), T0 + 1)
    t.record_ping(pid(1), 3.0, T0 + 2)
    assert add(
        t, 1, now=T0 + 5, addrs=["/ip4/10.0.0.1/tcp/1"], exchange_url="http://10.0.0.1:2",
        fingerprint="fp2", record=b"v2",
    )
    info = t.get(pid(1))
    assert info.addrs == ("/ip4/10.0.0.1/tcp/1",)
    assert (info.exchange_url, info.fingerprint, info.record.envelope) == ("http://10.0.0.1:2", "fp2", b"v2")
    assert info.state is PeerState.CONNECTED and info.last_seen == T0 + 2 and info.rtt_ms == 3.0


def test_new_addresses_cut_backoff_short_but_keep_failures():
    t = table()
    add(t, 1, now=T0)
    for _ in range(6):
        t.record_failure(pid(1), T0)
    assert pid(1) not in t.due_for_dial(T0 + 1)
    add(t, 1, now=T0 + 1, addrs=["/ip4/10.0.0.9/tcp/9"])
    assert pid(1) in t.due_for_dial(T0 + 1)
    assert t.get(pid(1)).failures == 6


def test_future_record_is_ignored():
    t = table()
    assert not add(t, 1, record_time=T0 + 10_000, now=T0)
    assert not add(t, 2, record_time=math.nan, now=T0)
    assert len(t) == 0 and t.statistics()["ignored_future"] == 2


def test_pinned_addresses_survive_record_updates():
    t = table()
    t.add_address(pid(1), ["/dns4/boot.example/tcp/7401/p2p/x"], T0, pinned=True)
    add(t, 1, now=T0 + 1, addrs=[addr(1)])
    assert t.get(pid(1)).addrs == (addr(1), "/dns4/boot.example/tcp/7401/p2p/x")


def test_records_for_exchange_only_reached_and_healthy_connected_first():
    t = table()
    for i in range(1, 6):
        add(t, i, record=f"r{i}".encode())
    t.mark_connected(pid(1), T0 + 1)  # connected
    t.mark_connected(pid(2), T0 + 5)
    t.mark_disconnected(pid(2), T0 + 5)  # reached, seen later than 1
    t.mark_connected(pid(3), T0 + 3)
    t.mark_disconnected(pid(3), T0 + 3)
    t.record_failure(pid(3), T0 + 4)  # failing now
    # pid 4, 5: never reached
    t.mark_connected(pid(6), T0)  # connected but no record
    assert t.records_for_exchange() == [b"r1", b"r2"]
    assert t.records_for_exchange(limit=1) == [b"r1"]


def test_get_returns_a_copy():
    t = table()
    add(t, 1)
    t.get(pid(1)).failures = 99
    assert t.get(pid(1)).failures == 0


def test_exchange_candidates():
    t = table()
    add(t, 1, fingerprint="a")
    add(t, 2, fingerprint="b")
    add(t, 3, fingerprint="a", exchange_url="")
    add(t, 4, fingerprint="a")
    for i in (1, 2, 3):
        t.mark_connected(pid(i), T0)
    assert t.exchange_candidates("a") == [pid(1)]


# -- snapshot, statistics, persistence ---------------------------------------------------


def test_snapshot_is_json_and_has_the_fields():
    t = table()
    add(t, 2)
    add(t, 1)
    t.record_ping(pid(1), 4.25, T0 + 1)
    snap = t.snapshot()
    json.dumps(snap)
    assert [s["peer_id"] for s in snap] == [pid(1), pid(2)]
    s = snap[0]
    assert s["state"] == "connected" and s["addrs"] == [addr(1)] and s["rtt_ms"] == 4.25
    assert s["last_seen"] == T0 + 1 and s["failures"] == 0
    assert s["exchange_url"] == "http://127.0.0.1:8401" and s["fingerprint"] == "fp1"


def test_statistics_counts_by_state():
    t = table()
    for i in range(1, 5):
        add(t, i)
    t.mark_connected(pid(1), T0)
    t.record_failure(pid(2), T0)
    stats = t.statistics()
    assert stats["total"] == 4
    assert (stats["connected"], stats["failed"], stats["known"]) == (1, 1, 2)
    assert stats["dropped_full"] == stats["evicted"] == stats["skipped_on_load"] == 0


def test_round_trip_through_json():
    t = table()
    add(t, 1, record=bytes(range(256)))
    add(t, 2)
    t.mark_connected(pid(1), T0 + 1)
    t.record_ping(pid(1), 2.5, T0 + 2)
    for _ in range(3):
        t.record_failure(pid(2), T0 + 3)
    t.add_address(pid(3), [addr(3)], T0, pinned=True)
    loaded = PeerTable.from_dict(json.loads(json.dumps(t.to_dict())), ME, rng=random.Random(2))
    assert len(loaded) == 3
    for i in (1, 2, 3):
        before, after = t.get(pid(i)), loaded.get(pid(i))
        assert after.state is PeerState.KNOWN  # nobody is connected after a restart
        assert after.pinned is False  # the config re-pins bootstrap peers
        for name in ("addrs", "exchange_url", "fingerprint", "last_seen", "rtt_ms", "failures",
                     "next_attempt", "record", "first_seen"):
            assert getattr(after, name) == getattr(before, name), name
    assert loaded.get(pid(1)).record.envelope == bytes(range(256))
    assert loaded.get(pid(2)).failures == 3
    assert loaded.statistics()["skipped_on_load"] == 0
    assert loaded.to_dict() == PeerTable.from_dict(loaded.to_dict(), ME).to_dict()


def test_load_skips_bad_entries():
    good = table()
    add(good, 1)
    entry = good.to_dict()["peers"][0]
    bad = [
        "not a dict",
        {**entry, "peer_id": 5},
        {**entry, "peer_id": ""},
        {**entry, "addrs": "one string"},
        {**entry, "addrs": [1, 2]},
        {**entry, "failures": -1},
        {**entry, "failures": True},
        {**entry, "last_seen": "yesterday"},
        {**entry, "next_attempt": None},
        {**entry, "rtt_ms": -3},
        {**entry, "record": "!!not base64!!"},
        {**entry, "peer_id": ME},  # ourselves
        dict(entry),  # duplicate of the first good one
        {**entry, "peer_id": pid(2), "last_seen": float("inf")},
    ]
    data = {"version": 1, "peers": [entry, *bad, {"peer_id": pid(3), "future_field": 1}]}
    loaded = PeerTable.from_dict(json.loads(json.dumps(data)), ME)
    assert [p["peer_id"] for p in loaded.snapshot()] == [pid(1), pid(3)]
    assert loaded.statistics()["skipped_on_load"] == len(bad)


@pytest.mark.parametrize(
    "data, skipped",
    [
        ({"version": 2, "peers": [{}, {}]}, 2),
        ({"version": True, "peers": []}, 0),
        ({"peers": [{}]}, 1),
        ([], 1),
        (None, 1),
        ({"version": 1, "peers": "x"}, 1),
    ],
)
def test_load_wrong_version_or_shape_gives_empty_table(data, skipped):
    loaded = PeerTable.from_dict(data, ME)
    assert len(loaded) == 0 and loaded.statistics()["skipped_on_load"] == skipped


def test_load_respects_lowered_max_peers_keeping_the_best():
    t = table(max_peers=10)
    for i in range(1, 5):
        add(t, i)
        t.mark_connected(pid(i), T0 + i)
        t.mark_disconnected(pid(i), T0 + i)
    t.record_failure(pid(4), T0 + 10)
    loaded = PeerTable.from_dict(t.to_dict(), ME, max_peers=2)
    assert sorted(p["peer_id"] for p in loaded.snapshot()) == [pid(2), pid(3)]
    assert loaded.statistics()["skipped_on_load"] == 2


# -- long run ---------------------------------------------------------------------------


def test_random_churn_keeps_invariants():
    """Months of random events compressed: the table never exceeds max_peers, never holds
    itself, never evicts a connected peer, and persists cleanly at every point."""
    rng = random.Random(42)
    t = PeerTable(ME, max_peers=20, evict_after=500.0, rng=random.Random(43))
    now = T0
    for step in range(5000):
        now += rng.uniform(0, 5)
        i = rng.randrange(60)
        op = rng.randrange(6)
        if op == 0:
            add(t, i, now=now, record_time=now - rng.uniform(0, 100))
        elif op == 1:
            t.mark_connected(pid(i), now)
        elif op == 2:
            t.mark_disconnected(pid(i), now)
        elif op == 3:
            t.record_failure(pid(i), now)
        elif op == 4:
            connected = set(t.connected())
            gone = t.evict_stale(now)
            assert not connected & set(gone)
        else:
            t.due_for_dial(now)
        assert len(t) <= 20 and ME not in t
        if step % 500 == 0:
            again = PeerTable.from_dict(json.loads(json.dumps(t.to_dict())), ME, max_peers=20)
            assert len(again) == len(t)


def test_module_is_pure():
    """No I/O or event-loop imports, no clock reads (the layering test covers packages too)."""
    imported = top_level_imports(pathlib.Path(peers_module.__file__))
    assert imported <= {"__future__", "base64", "binascii", "dataclasses", "enum", "math",
                         "random", "collections", "typing", "peerfed"}
    assert "time" not in imported


def test_a_record_allowed_to_replace_takes_the_least_recently_seen_place_in_a_full_table():
    t = PeerTable("me", max_peers=2, rng=random.Random(0))
    for i, seen in ((1, 10.0), (2, 20.0)):
        t.mark_connected(f"p{i}", seen)
        t.mark_disconnected(f"p{i}", seen)
    kwargs = dict(addrs=["/ip4/1.2.3.4/tcp/1"], exchange_url="", fingerprint="", record=b"r", record_time=30.0, now=30.0)
    assert not t.add_record("p3", **kwargs)  # a relayed record cannot push out peers we reached...
    assert t.add_record("p3", **kwargs, may_replace=True)  # ...unless membership allows it
    assert "p3" in t and "p1" not in t and "p2" in t
