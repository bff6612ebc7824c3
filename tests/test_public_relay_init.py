"""`peerfed init --public-relay`: one flag writes a public bootstrap box's config, and the line
it prints is what a rig pastes to use the box."""

from __future__ import annotations

from pathlib import Path

import multiaddr
import pytest

from peerfed import cli
from peerfed.config import P2PConfig, check_bootstrap_address, load_config
from peerfed.config_files import default_config_text
from peerfed.identity import load_identity, peer_id_of
from peerfed.public_relay import PORT, PUBLIC_IP, PUBLIC_IPV6, dialable_addrs

OTHER = "/ip4/198.51.100.1/tcp/7401/p2p/12D3KooWGzBnJrMqoJ8mNBzjnRPbLK6PtDwWQn5Y9EvbBNUqQQRE"


def init(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    assert cli.main(["init", *args]) == 0
    return capsys.readouterr().out.splitlines()


def pasted_addrs(out: list[str]) -> list[str]:
    """The addresses of the `peerfed bootstrap add` line init printed."""
    lines = [line.strip() for line in out if line.strip().startswith("peerfed bootstrap add ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("peerfed bootstrap add ").split()


def test_the_flag_writes_a_relay_box_config_and_the_line_rigs_paste(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    box = tmp_path / "box"
    out = init(capsys, "--home", str(box), "--public-relay")
    cfg = load_config(box / "peerfed.toml")
    assert cfg.train.enabled is False
    assert cfg.p2p.relay_service is True and cfg.p2p.port_mapping is False
    defaults = P2PConfig()
    assert (cfg.p2p.relay_max_bytes, cfg.p2p.relay_max_seconds) == (defaults.relay_max_bytes,
                                                                    defaults.relay_max_seconds)
    assert cfg.p2p.listen == ("/ip4/0.0.0.0/tcp/7401",) and cfg.exchange.listen == "0.0.0.0:7402"
    text = (box / "peerfed.toml").read_text()
    assert "relay_service = true  # relay circuits" in text  # the template's comments stay
    assert "enabled = false  # false: a relay node" in text

    peer_id = peer_id_of(load_identity(box / "identity.key"))
    assert any("open 7401/tcp" in line for line in out), out
    [addr] = pasted_addrs(out)
    if PUBLIC_IP in addr:  # this machine shows no public address: the operator fills it in
        assert any(line.startswith(f"({PUBLIC_IP}:") for line in out), out
        addr = addr.replace(PUBLIC_IP, "198.51.100.7")
    assert check_bootstrap_address(addr) == addr
    assert multiaddr.Multiaddr(addr).value_for_protocol("p2p") == peer_id
    assert multiaddr.Multiaddr(addr).value_for_protocol("tcp") == "7401"

    # A rig takes the line as it is printed.
    rig = tmp_path / "rig"
    init(capsys, "--home", str(rig), "--p2p-listen", "/ip4/127.0.0.1/tcp/0")
    assert cli.main(["bootstrap", "add", addr, "--home", str(rig)]) == 0
    assert load_config(rig / "peerfed.toml").p2p.bootstrap == (addr,)
    # The box's config passes the same check an operator runs (no task: training is off).
    assert cli.main(["config", "check", "--home", str(box)]) == 0


def test_the_flag_with_listen_and_bootstrap_options(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    box = tmp_path / "box"
    out = init(capsys, "--home", str(box), "--public-relay", "--p2p-listen", "/ip4/203.0.113.7/tcp/4001",
               "--exchange-listen", "203.0.113.7:4002", "--bootstrap", OTHER, "--network", "lab")
    cfg = load_config(box / "peerfed.toml")
    assert cfg.p2p.listen == ("/ip4/203.0.113.7/tcp/4001",) and cfg.exchange.listen == "203.0.113.7:4002"
    assert cfg.p2p.bootstrap == (OTHER,) and cfg.network == "lab"
    assert not cfg.train.enabled and cfg.p2p.relay_service and not cfg.p2p.port_mapping
    peer_id = peer_id_of(load_identity(box / "identity.key"))
    assert pasted_addrs(out) == [f"/ip4/203.0.113.7/tcp/4001/p2p/{peer_id}"]  # the given address, no placeholder
    assert not any(PUBLIC_IP in line for line in out)
    assert any("open 4001/tcp" in line for line in out), out


def test_the_flag_with_a_bad_option_writes_nothing(tmp_path: Path) -> None:
    box = tmp_path / "box"
    assert cli.main(["init", "--home", str(box), "--public-relay", "--api-listen", "0.0.0.0:7403"]) == 3
    assert not box.exists()


def test_without_the_flag_nothing_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    node = tmp_path / "node"
    out = init(capsys, "--home", str(node))
    assert (node / "peerfed.toml").read_text() == default_config_text()
    cfg = load_config(node / "peerfed.toml")
    assert cfg.train.enabled and not cfg.p2p.relay_service and cfg.p2p.port_mapping
    assert [line.split()[0] for line in out] == ["initialized", "peer", "identity:", "config:"]


def test_dialable_addrs_fill_in_what_they_can_and_mark_the_rest() -> None:
    lan = ["127.0.0.1", "192.168.1.5", "198.18.0.9"]  # none of them public
    assert dialable_addrs(["/ip4/0.0.0.0/tcp/7401"], lan) == [f"/ip4/{PUBLIC_IP}/tcp/7401"]
    assert dialable_addrs(["/ip4/0.0.0.0/tcp/7401"], [*lan, "93.184.216.34"]) == ["/ip4/93.184.216.34/tcp/7401"]
    assert dialable_addrs(["/ip4/192.0.2.4/tcp/0"], lan) == [f"/ip4/192.0.2.4/tcp/{PORT}"]
    assert dialable_addrs(["/ip6/::/tcp/7401", "/ip4/203.0.113.7/tcp/7401"], lan) == [
        f"/ip6/{PUBLIC_IPV6}/tcp/7401", "/ip4/203.0.113.7/tcp/7401"]
