"""`peerfed run`, `status` and `peers` as an operator meets them: clear one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peerfed.errors import ExitCode
from peerfed.localswarm import LocalSwarm, set_config_values

from swarmtools import NO_TRAINING, listed, make_swarm


def peerfed(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "peerfed", *args], capture_output=True, text=True, timeout=timeout)


def one_clear_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and "peerfed: error:" in line]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    swarm = LocalSwarm(tmp_path)
    node = swarm.add_node(settings=NO_TRAINING)
    return node.home


def test_status_and_peers_without_a_daemon_say_so_in_one_line(home: Path) -> None:
    for command in ("status", "peers"):
        result = peerfed(command, "--home", str(home), "--json")
        assert result.returncode == ExitCode.NOT_RUNNING
        assert "no peerfed daemon" in one_clear_line(result.stderr)
        assert result.stdout == ""


def test_run_with_its_p2p_port_taken_exits_address_in_use(home: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        set_config_values(home / "peerfed.toml", {"p2p.listen": [f"/ip4/127.0.0.1/tcp/{port}"]})
        result = peerfed("run", "--home", str(home))
    assert result.returncode == ExitCode.ADDRESS_IN_USE, result.stderr
    assert "p2p.listen" in one_clear_line(result.stderr)


def test_run_with_its_api_port_taken_exits_address_in_use(home: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        set_config_values(home / "peerfed.toml", {"api.listen": f"127.0.0.1:{port}"})
        result = peerfed("run", "--home", str(home))
    assert result.returncode == ExitCode.ADDRESS_IN_USE, result.stderr
    assert "api.listen" in one_clear_line(result.stderr)


def test_run_with_an_unassignable_listen_address_is_a_config_error(home: Path) -> None:
    set_config_values(home / "peerfed.toml", {"p2p.listen": ["/ip4/192.0.2.1/tcp/7401"]})  # not ours
    result = peerfed("run", "--home", str(home))
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert "192.0.2.1" in one_clear_line(result.stderr)


def test_run_without_a_key_or_with_a_bad_config_fails_clearly(home: Path) -> None:
    (home / "peerfed.toml").write_text((home / "peerfed.toml").read_text() + "\nnetwrok = \"x\"\n")
    result = peerfed("run", "--home", str(home))
    assert result.returncode == ExitCode.CONFIG
    assert "netwrok" in result.stderr and "Traceback" not in result.stderr

    (home / "peerfed.toml").write_text((home / "peerfed.toml").read_text().replace('netwrok = "x"', ""))
    (home / "identity.key").unlink()
    result = peerfed("run", "--home", str(home))
    assert result.returncode == ExitCode.IDENTITY
    assert "identity.key" in one_clear_line(result.stderr)


def test_status_and_peers_json_shapes(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 2) as swarm:
        swarm.start_all()
        swarm.wait_full_view(timeout=30)
        a, b = swarm.nodes
        status = json.loads(peerfed("status", "--home", str(a.home), "--json").stdout)
        for key in ("peer_id", "network", "version", "uptime_s", "peers_connected"):
            assert key in status
        assert status["peer_id"] == a.peer_id and status["peers_connected"] == 1
        peers = json.loads(peerfed("peers", "--home", str(a.home), "--json").stdout)
        assert [p["peer_id"] for p in peers] == [b.peer_id]
        row = peers[0]
        assert row["state"] == "connected" and row["addrs"] and "last_seen" in row and "rtt_ms" in row
        header, row_line = peerfed("peers", "--home", str(a.home)).stdout.splitlines()
        assert header.split() == ["PEER", "ID", "STATE", "RTT", "ADDRESS"]
        assert row_line.startswith(b.peer_id) and "connected" in row_line


@pytest.mark.slow
def test_bootstrap_answering_with_another_peer_id_is_refused_and_logged(tmp_path: Path) -> None:
    with make_swarm(tmp_path, 2) as swarm:
        a, b = swarm.nodes
        impostor = swarm.add_node(bootstrap=[], settings=NO_TRAINING)
        # c's bootstrap entry has b's address but a's PeerID: whoever answers there is not a.
        wrong = b.p2p_addr.rsplit("/p2p/", 1)[0] + "/p2p/" + a.peer_id
        c = swarm.add_node(bootstrap=[wrong], settings=NO_TRAINING)
        swarm.start_all()
        time.sleep(6)
        assert b.peer_id not in listed(c)
        assert a.peer_id not in {p["peer_id"] for p in c.get("/peers") if p["state"] == "connected"}
        log = c.log_path.read_text()
        assert "could not connect" in log and a.peer_id in log
        assert impostor.is_up()


def test_run_with_a_task_that_cannot_be_imported_is_a_config_error(home: Path) -> None:
    set_config_values(home / "peerfed.toml", {"train.enabled": True, "train.task": "no_such_module:factory"})
    result = peerfed("run", "--home", str(home), timeout=120)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    line = one_clear_line(result.stderr)
    assert "train.task" in line and "no_such_module" in line and "PYTHONPATH" in line
    # Found before anything started: said once, no trainer, no daemon log lines.
    assert len(result.stderr.strip().splitlines()) == 1 and "peerfed-trainer" not in result.stderr


def test_run_with_a_raising_task_factory_exits_3_naming_train_task_and_the_exception(
        home: Path, tmp_path: Path) -> None:
    (tmp_path / "raising_factory.py").write_text(
        "def factory(settings, ctx):\n    raise FileNotFoundError('/srv/data/train.csv')\n")
    set_config_values(home / "peerfed.toml", {"train.enabled": True, "train.task": "raising_factory:factory",
                                               "train.threads": 1})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "peerfed", "run", "--home", str(home)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    line = one_clear_line(result.stderr)
    assert "train.task 'raising_factory:factory'" in line
    assert "FileNotFoundError: /srv/data/train.csv" in line and "raising_factory.py:2" in line
    # Said once: not by the trainer, nor logged by its supervisor, only in the CLI's error line.
    assert (result.stdout + result.stderr).count("/srv/data/train.csv") == 1, result.stdout + result.stderr
    assert "will not be restarted" not in result.stderr and "peerfed-trainer" not in result.stderr


def test_status_text_labels_its_two_losses_and_peers_have_a_header() -> None:
    from peerfed.cli import peer_lines, status_lines

    status = {"peer_id": "12D3KooWx", "step": 1200, "loss": 0.1850,
              "metrics": {"accuracy": 0.931, "loss": 0.2134}, "exchanges": {"ok": 3, "refused": 0},
              "trainer": {"evaluated_at": 1000.0, "evaluated_step": 1100}}
    lines = status_lines(status, now=1004.0)
    test_line = next(line for line in lines if line.startswith("test "))
    train_line = next(line for line in lines if line.startswith("train loss "))
    assert "accuracy 93.1%" in test_line and "loss 0.2134" in test_line
    assert "evaluated 4 s ago, at step 1100" in test_line
    assert "0.1850" in train_line and "0.2134" not in train_line and "moving average" in train_line
    assert "exchanges        ok=3, refused=0" in lines
    peers = [{"peer_id": "12D3KooWabc", "state": "connected", "rtt_ms": 1.25, "addrs": ["/ip4/1.2.3.4/tcp/1"]}]
    header, row = peer_lines(peers)
    assert header.split() == ["PEER", "ID", "STATE", "RTT", "ADDRESS"]
    assert row.split() == ["12D3KooWabc", "connected", "1.2", "ms", "/ip4/1.2.3.4/tcp/1"]
    assert header.index("STATE") == row.index("connected")
    assert peer_lines([]) == []
