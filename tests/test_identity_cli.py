"""Identity key handling and the `peerfed` CLI (acceptance checks run it as a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair
from libp2p.peer.id import ID

from peerfed import cli
from peerfed.config import load_config
from peerfed.core.peerid import Signer, verify_signature
from peerfed.errors import AlreadyExistsError, IdentityError
from peerfed.identity import create_identity, load_identity, peer_id_of, signer_of

PEER_A = Signer(b"\x01" * 32).peer_id
ADDR_A = f"/ip4/192.0.2.1/tcp/7401/p2p/{PEER_A}"


def peerfed(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PEERFED_HOME"}
    if home is not None:
        env["PEERFED_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "peerfed", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An initialized node folder (made in-process: faster than a subprocess)."""
    folder = tmp_path / "node"
    assert cli.main(["init", "--home", str(folder), "--p2p-listen", "/ip4/127.0.0.1/tcp/0"]) == 0
    return folder


# ---- identity module ----

def test_create_and_load_identity(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.key"
    key_pair = create_identity(path)
    assert mode(path) == 0o600 and mode(path.parent) == 0o700
    loaded = load_identity(path)
    assert peer_id_of(loaded) == peer_id_of(key_pair) == ID.from_pubkey(key_pair.public_key).to_base58()
    assert peer_id_of(key_pair).startswith("12D3KooW")
    signer = signer_of(loaded)
    assert signer.peer_id == peer_id_of(key_pair)
    assert verify_signature(signer.peer_id, b"hello", signer.sign(b"hello"))


def test_create_identity_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    create_identity(path)
    before = path.read_bytes()
    with pytest.raises(AlreadyExistsError, match=str(path)):
        create_identity(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["identity.key"]


def test_load_identity_accepts_go_libp2p_64_byte_keys(tmp_path: Path) -> None:
    key_pair = create_new_key_pair()
    seed, public = key_pair.private_key.to_bytes(), key_pair.public_key.to_bytes()
    path = tmp_path / "go.key"
    # protobuf PrivateKey{Type: Ed25519, Data: seed + public key}, as go-libp2p/kubo write it
    path.write_bytes(b"\x08\x01\x12\x40" + seed + public)
    path.chmod(0o600)
    assert peer_id_of(load_identity(path)) == peer_id_of(key_pair)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"\xff\xff\xff", "not a libp2p private key"),
    (b"\x08\x01\x12\x03abc", "32 or 64 bytes"),
])
def test_load_identity_corrupt(tmp_path: Path, data: bytes, reason: str) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(IdentityError) as info:
        load_identity(path)
    message = str(info.value)
    assert reason in message and str(path) in message and "`peerfed identity new --replace`" in message
    assert "\n" not in message


def test_load_identity_refuses_non_ed25519_key(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(create_rsa_key_pair(bits=1024).private_key.serialize())
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="RSA key, peerfed needs Ed25519"):
        load_identity(path)


# ---- init and id (subprocess) ----

def test_init_twice_keeps_the_key(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    first = peerfed("init", "--home", str(folder))
    assert first.returncode == 0, first.stderr
    key = folder / "identity.key"
    key_bytes = key.read_bytes()
    assert mode(key) == 0o600 and mode(folder) == 0o700
    assert load_config(folder / "peerfed.toml").identity == key
    peer_id = peer_id_of(load_identity(key))
    assert peer_id in first.stdout and str(key) in first.stdout

    second = peerfed("init", "--home", str(folder))
    assert second.returncode == 7
    assert second.stderr.startswith("peerfed: error: ") and "Traceback" not in second.stderr
    assert str(key) in second.stderr and "move" in second.stderr and "--home" in second.stderr
    assert key.read_bytes() == key_bytes and mode(key) == 0o600 and mode(folder) == 0o700


def test_init_refuses_when_only_the_config_exists(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    folder.mkdir()
    (folder / "peerfed.toml").write_text("# mine\n")
    assert cli.main(["init", "--home", str(folder)]) == 7
    assert not (folder / "identity.key").exists()
    assert (folder / "peerfed.toml").read_text() == "# mine\n"


def test_init_with_a_bad_option_leaves_nothing_behind(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    result = peerfed("init", "--home", str(folder), "--bootstrap", ADDR_A,
                     "--bootstrap", "/ip4/192.0.2.1/tcp/7401")
    assert result.returncode == 3
    assert "p2p.bootstrap[1]" in result.stderr and "/p2p/<PeerID>" in result.stderr
    assert "Traceback" not in result.stderr
    assert not folder.exists()


def test_init_options_land_in_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "D"
    assert cli.main(["init", "--home", str(folder), "--network", "lab", "--p2p-listen",
                     "/ip4/127.0.0.1/tcp/4001", "--p2p-listen", "/ip6/::1/tcp/4001",
                     "--exchange-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:9999",
                     "--bootstrap", ADDR_A]) == 0
    cfg = load_config(folder / "peerfed.toml")
    assert cfg.network == "lab"
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4001")
    assert cfg.exchange.listen == "127.0.0.1:0" and cfg.api.port == 9999
    assert cfg.p2p.bootstrap == (ADDR_A,)


def test_id_json_is_stable(home: Path) -> None:
    first = peerfed("id", "--home", str(home), "--json")
    second = peerfed("id", "--home", str(home), "--json")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    info = json.loads(first.stdout)
    assert set(info) == {"peer_id", "addrs"}
    assert info["peer_id"] == peer_id_of(load_identity(home / "identity.key"))
    assert info["peer_id"].startswith("12D3KooW")
    assert info["addrs"] == [f"/ip4/127.0.0.1/tcp/0/p2p/{info['peer_id']}"]


def test_id_prefers_announce_and_reads_peerfed_home(home: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = home / "peerfed.toml"
    config.write_text(config.read_text().replace(
        "announce = []", 'announce = ["/dns4/node.example/tcp/7401", "/ip4/203.0.113.7/tcp/7401"]'))
    monkeypatch.setenv("PEERFED_HOME", str(home))
    assert cli.main(["id"]) == 0
    peer_id, *addrs = capsys.readouterr().out.splitlines()
    assert addrs == [f"/dns4/node.example/tcp/7401/p2p/{peer_id}", f"/ip4/203.0.113.7/tcp/7401/p2p/{peer_id}"]
    assert cli.main(["id", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peer_id"] == peer_id


@pytest.mark.parametrize("damage", ["missing", "corrupt", "mode 0644"])
def test_id_with_a_bad_key_is_one_line_exit_4(home: Path, damage: str) -> None:
    key = home / "identity.key"
    if damage == "missing":
        key.unlink()
    elif damage == "corrupt":
        key.write_bytes(b"\x08\x01\x12\x20short")
    else:
        key.chmod(0o644)
    before = (key.read_bytes(), mode(key)) if key.exists() else None
    result = peerfed("id", "--home", str(home))
    assert result.returncode == 4
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peerfed: error: ") and str(key) in lines[0]
    expected_fix = {"missing": "`peerfed identity new`", "corrupt": "restore it from backup",
                    "mode 0644": f"chmod 600 {key}"}[damage]
    assert expected_fix in lines[0]
    assert "peerfed init" not in lines[0]  # init refuses on an existing node folder (exit 7)
    if damage != "missing":
        assert "`peerfed identity new --replace`" in lines[0]
    assert ((key.read_bytes(), mode(key)) if key.exists() else None) == before


# ---- config check and bootstrap (subprocess for the exit codes) ----

def test_config_check(home: Path) -> None:
    config = home / "peerfed.toml"
    ok = peerfed("config", "check", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    task_line, ok_line = ok.stdout.splitlines()
    assert ok_line == f"ok: {config}"
    assert task_line.startswith("task: digits-mlp builds: Sequential, 2,410 weights") and "fingerprint" in task_line
    only_file = peerfed("config", "--config", str(config), "check", "--no-task")  # options before the action
    assert only_file.returncode == 0 and only_file.stdout.splitlines() == [f"ok: {config}"]
    config.write_text(config.read_text().replace('device = "auto"', 'device = "gpu"'))
    bad = peerfed("config", "check", home=home)  # home from $PEERFED_HOME
    assert bad.returncode == 3 and bad.stdout == ""
    assert bad.stderr.startswith(f"peerfed: error: invalid config {config}")
    assert "train.device" in bad.stderr and "Traceback" not in bad.stderr


def test_config_check_imports_and_builds_the_task(home: Path, tmp_path: Path) -> None:
    config = home / "peerfed.toml"
    text = config.read_text()
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "raising_task.py").write_text("def factory(settings, ctx):\n    raise OSError('no data in /srv/x')\n"
                                          "def not_a_task(settings, ctx):\n    return 42\n")
    env_path = os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")])
    cases = [
        ("nosuchpkg.tasks:factory", "no module named 'nosuchpkg.tasks'", "PYTHONPATH"),
        ("raising_task:missing", "module 'raising_task' has no 'missing'", ""),
        ("raising_task:factory", "the factory raised OSError: no data in /srv/x", "raising_task.py:2"),
        ("raising_task:not_a_task", "the factory returned int, not a peerfed.train.tasks.Task", ""),
        ("digits_mlp", 'did you mean "digits-mlp"', ""),
    ]
    for task, expected, also in cases:
        config.write_text(text.replace('task = "digits-mlp"', f'task = "{task}"'))
        result = subprocess.run([sys.executable, "-m", "peerfed", "config", "check", "--home", str(home)],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": env_path})
        assert result.returncode == 3, (task, result.stderr)
        error = [line for line in result.stderr.splitlines() if line.startswith("peerfed: error:")]
        assert len(error) == 1 and "train.task" in result.stderr and expected in result.stderr, (task, result.stderr)
        assert also in result.stderr and result.stdout == ""
        if task == "raising_task:factory":  # the factory's traceback, for its author
            assert "Traceback" in result.stderr and "raise OSError" in result.stderr


def test_identity_new_replaces_the_key_only_when_asked_and_keeps_a_backup(home: Path) -> None:
    key = home / "identity.key"
    old_bytes, old_id = key.read_bytes(), peer_id_of(load_identity(key))
    refused = peerfed("identity", "new", "--home", str(home))
    assert refused.returncode == 7 and "--replace" in refused.stderr and key.read_bytes() == old_bytes

    made = peerfed("identity", "new", "--replace", "--home", str(home))
    assert made.returncode == 0, made.stderr
    new_id = peer_id_of(load_identity(key))
    backups = sorted(home.glob("identity.key.*.bak"))
    assert new_id != old_id and len(backups) == 1
    assert backups[0].read_bytes() == old_bytes and mode(backups[0]) == 0o600 and mode(key) == 0o600
    lines = made.stdout.splitlines()
    assert lines[0] == f"old peer id: {old_id}" and lines[1] == f"new peer id: {new_id}"
    assert str(backups[0]) in made.stdout and "restart" in made.stderr
    assert json.loads(peerfed("id", "--home", str(home), "--json").stdout)["peer_id"] == new_id


@pytest.mark.parametrize("damage", ["missing", "corrupt", "mode 0644"])
def test_every_key_error_is_fixed_by_what_it_advises(home: Path, damage: str) -> None:
    key = home / "identity.key"
    if damage == "missing":
        key.unlink()
    elif damage == "corrupt":
        key.write_bytes(b"garbage")
    else:
        key.chmod(0o644)
    error = peerfed("id", "--home", str(home)).stderr
    advised = ["identity", "new", "--home", str(home)] + (["--replace"] if "--replace" in error else [])
    fixed = peerfed(*advised)
    assert fixed.returncode == 0, fixed.stderr
    assert peerfed("id", "--home", str(home)).returncode == 0
    if damage == "missing":
        assert not list(home.glob("*.bak")) and not fixed.stdout.startswith("old peer id")
    elif damage == "corrupt":
        assert fixed.stdout.startswith("old peer id: unreadable (")
        assert [b.read_bytes() for b in home.glob("identity.key.*.bak")] == [b"garbage"]
    else:
        assert fixed.stdout.startswith("old peer id: 12D3KooW")
        assert [mode(b) for b in home.glob("identity.key.*.bak")] == [0o600]  # no longer readable by others


def test_init_on_a_node_without_a_key_points_to_identity_new(home: Path) -> None:
    (home / "identity.key").unlink()
    result = peerfed("init", "--home", str(home))
    assert result.returncode == 7 and f"`peerfed identity new --home {home}`" in result.stderr


def test_replace_identity_moves_the_old_file_back_if_the_new_key_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peerfed.identity as identity

    path = tmp_path / "identity.key"
    create_identity(path)
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(identity, "write_file_atomically", fail)
    with pytest.raises(OSError):
        identity.replace_identity(path)
    assert path.read_bytes() == before and list(tmp_path.glob("*.bak")) == []


def test_bootstrap_add_list_rm(home: Path) -> None:
    config = home / "peerfed.toml"
    config.write_text(config.read_text().replace("bootstrap = []", "# my own note\nbootstrap = []"))

    added = peerfed("bootstrap", "add", ADDR_A, "--home", str(home))
    assert added.returncode == 0, added.stderr
    warning = added.stderr.splitlines()
    assert len(warning) == 1 and "trusted" in warning[0]
    listed = peerfed("bootstrap", "list", "--home", str(home))
    assert listed.stdout.splitlines() == [ADDR_A]
    before_action = peerfed("bootstrap", "--home", str(home), "list")  # options on either side
    assert before_action.returncode == 0 and before_action.stdout.splitlines() == [ADDR_A]
    both = peerfed("bootstrap", "--home", str(home), "list", "--config", str(config))
    assert both.returncode == 2 and "exclude each other" in both.stderr

    no_p2p = peerfed("bootstrap", "add", "/ip4/192.0.2.9/tcp/7401", "--home", str(home))
    assert no_p2p.returncode == 3 and "/p2p/<PeerID>" in no_p2p.stderr

    absent = f"/ip4/192.0.2.9/tcp/7401/p2p/{PEER_A}"
    missing = peerfed("bootstrap", "rm", absent, "--home", str(home))
    assert missing.returncode == 3 and "is not in" in missing.stderr and absent in missing.stderr

    removed = peerfed("bootstrap", "rm", ADDR_A, "--home", str(home))
    assert removed.returncode == 0, removed.stderr
    assert load_config(config).p2p.bootstrap == ()
    assert "# my own note\n" in config.read_text()


def test_os_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert cli.main(["init", "--home", str(tmp_path / "file" / "node")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peerfed: error: ") and str(tmp_path / "file") in err
    assert len(err.splitlines()) == 1


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["bootstrap"]) == 2
    assert cli.main(["id", "--home", "a", "--config", "b"]) == 2
    assert cli.main(["--help"]) == 0
    assert "exit codes: 0 ok" in capsys.readouterr().out
