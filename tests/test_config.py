"""Config schema, error reporting, the default template and bootstrap edits (in-process, fast)."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

from peerfed.config import Config, load_config, parse_config, parse_host_port
from peerfed.config_files import default_config_text, edit_bootstrap, write_default_config
from peerfed.core.peerid import Signer
from peerfed.errors import AlreadyExistsError, ConfigError, ExitCode

PEER_A = Signer(b"\x01" * 32).peer_id
PEER_B = Signer(b"\x02" * 32).peer_id
ADDR_A = f"/ip4/192.0.2.1/tcp/7401/p2p/{PEER_A}"
ADDR_B = f"/ip4/192.0.2.2/tcp/7401/p2p/{PEER_B}"


def write(tmp_path: Path, text: str, name: str = "peerfed.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    os.chmod(path, 0o644)  # whatever the umask: a group-writable config is refused
    return path


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.exit_code == ExitCode.CONFIG
    return info.value


def only_problem(tmp_path: Path, text: str) -> str:
    err = config_error(tmp_path, text)
    assert len(err.problems) == 1, err.problems
    assert err.problems[0].startswith(f"{tmp_path / 'peerfed.toml'}: ")  # names the file
    return err.problems[0]


# ---- defaults and the template ----

def test_written_default_config_loads_and_equals_the_defaults(tmp_path: Path) -> None:
    cfg = write_default_config(tmp_path / "peerfed.toml")
    assert cfg == parse_config({}, base_dir=tmp_path)
    assert cfg.digest() == parse_config({}, base_dir=tmp_path).digest()
    assert cfg.path == tmp_path / "peerfed.toml"
    assert cfg.identity == tmp_path / "identity.key" and cfg.state_dir == tmp_path / "state"
    assert (cfg.exchange.listen_host, cfg.exchange.listen_port) == ("0.0.0.0", 7402)
    assert (cfg.api.host, cfg.api.port) == ("127.0.0.1", 7403)
    assert cfg.p2p.listen == ("/ip4/0.0.0.0/tcp/7401",) and cfg.p2p.bootstrap == ()


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _leaf_keys(field.annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_template_lists_every_setting_with_a_comment() -> None:
    data = tomllib.loads(default_config_text())
    for dotted in _leaf_keys(Config):
        node = data
        for part in dotted.split("."):
            assert part in node, f"{dotted} missing from default_config.toml"
            node = node[part]
    for line in default_config_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "  # " in line, f"setting without a comment: {line!r}"


def test_write_default_config_substitutes_values_and_keeps_comments(tmp_path: Path) -> None:
    path = tmp_path / "node" / "peerfed.toml"
    cfg = write_default_config(path, network="lab-1", p2p_listen="/ip4/127.0.0.1/tcp/0",
                               exchange_listen="127.0.0.1:0", api_listen="[::1]:9000",
                               bootstrap=[ADDR_A, ADDR_B])
    assert cfg.network == "lab-1" and cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert cfg.exchange.listen_port == 0 and (cfg.api.host, cfg.api.port) == ("::1", 9000)
    assert cfg.p2p.bootstrap == (ADDR_A, ADDR_B)
    text = path.read_text()
    assert "# swarm id" in text and "# local admin API" in text
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"


def test_write_default_config_never_overwrites(tmp_path: Path) -> None:
    path = write(tmp_path, "# mine\n")
    with pytest.raises(AlreadyExistsError):
        write_default_config(path)
    assert path.read_text() == "# mine\n"
    assert os.listdir(tmp_path) == ["peerfed.toml"]  # no temp file left


def test_write_default_config_bad_value_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        write_default_config(tmp_path / "node" / "peerfed.toml", bootstrap=["/ip4/192.0.2.1/tcp/1"])
    assert "p2p.bootstrap[0]" in str(info.value)
    assert not (tmp_path / "node").exists()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    path = write(sub, f'identity = "keys/id.key"\nstate_dir = "{tmp_path / "abs"}"\n')
    cfg = load_config(path)
    assert cfg.identity == sub / "keys" / "id.key"
    assert cfg.state_dir == tmp_path / "abs"


def test_digest_changes_with_a_setting_and_configs_are_frozen(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, "[exchange]\ninterval = 10.0\n", "a.toml"))
    b = load_config(write(tmp_path, "[exchange]\ninterval = 10\n", "b.toml"))
    c = load_config(write(tmp_path, "[exchange]\ninterval = 11\n", "c.toml"))
    assert a.digest() == b.digest() != c.digest()
    with pytest.raises(Exception):
        a.network = "other"  # type: ignore[misc]


def test_train_options_accept_scalars(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[train.options]\nalpha = 0.1\nname = "x"\niid = true\nk = 3\n'))
    assert cfg.train.options == {"alpha": 0.1, "name": "x", "iid": True, "k": 3}


# ---- one test per error class, each asserting the key path ----

def test_unknown_top_level_key(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "colour = 1\n")
    assert ": colour: unknown key" in problem and "network" in problem  # lists the known keys


def test_unknown_top_level_key_close_to_a_known_one(tmp_path: Path) -> None:
    assert "netwrk: unknown key; did you mean 'network'?" in only_problem(tmp_path, 'netwrk = "x"\n')


def test_unknown_nested_key_suggests_the_close_one(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, "[exchange]\nintervall = 3\n")
    assert problem.endswith("exchange.intervall: unknown key; did you mean 'interval'?")


@pytest.mark.parametrize("text, key, expected", [
    ('[train]\nbatch_size = "32"\n', "train.batch_size", 'must be a valid integer (got "32")'),
    ("[train]\nbatch_size = 3.5\n", "train.batch_size", "must be a valid integer (got 3.5)"),
    ('[exchange]\ninterval = "10"\n', "exchange.interval", 'must be a valid number (got "10")'),
    ("[checkpoint]\ninterval = true\n", "checkpoint.interval", "must be a valid number (got true)"),
    ('[p2p]\nlisten = "/ip4/0.0.0.0/tcp/1"\n', "p2p.listen", "must be a list"),
    ("p2p = 5\n", "p2p", "must be a table (got 5)"),
    ("network = 7\n", "network", "must be a valid string (got 7)"),
    ("[train.options]\nsub = {a = 1}\n", "train.options.sub", "string, number or boolean (got a table)"),
])
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str) -> None:
    problem = only_problem(tmp_path, text)
    assert f": {key}: " in problem and expected in problem


@pytest.mark.parametrize("text, key, expected", [
    ("[exchange]\ninterval = -1\n", "exchange.interval", "must be greater than 0 (got -1)"),
    ("[exchange]\nconnect_timeout = 0\n", "exchange.connect_timeout", "greater than 0"),
    ("[train]\nlr = 0\n", "train.lr", "greater than 0 (got 0)"),
    ("[train]\nbatch_size = 0\n", "train.batch_size", "greater than or equal to 1 (got 0)"),
    ("[checkpoint]\nkeep = 0\n", "checkpoint.keep", "greater than or equal to 1 (got 0)"),
    ('[exchange]\nlisten = "0.0.0.0:65536"\n', "exchange.listen", "port must be a number from 0 to 65535"),
    ('[exchange]\nlisten = "7402"\n', "exchange.listen", "must be HOST:PORT"),
    ('[exchange]\nlisten = "::1:7402"\n', "exchange.listen", "IPv6 address in brackets"),
    ('log_level = "loud"\n', "log_level", "'debug', 'info', 'warning' or 'error'"),
    ('network = "Lab"\n', "network", "a-z 0-9"),
    ("[train]\nnode_index = 2\nnode_count = 2\n", "train.node_index", "less than train.node_count (2)"),
])
def test_out_of_range_value(tmp_path: Path, text: str, key: str, expected: str) -> None:
    problem = only_problem(tmp_path, text)
    assert f": {key}: " in problem and expected in problem


def test_bad_multiaddr(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[p2p]\nlisten = ["/ip4/0.0.0.0/tcp/7401", "/ip4/1.2.3/tcp/1"]\n')
    assert ": p2p.listen[1]: not a valid multiaddr" in problem and '"/ip4/1.2.3/tcp/1"' in problem


def test_listen_address_with_p2p_component_is_refused(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f'[p2p]\nannounce = ["{ADDR_A}"]\n')
    assert ": p2p.announce[0]: must not contain /p2p/" in problem


def test_bootstrap_without_p2p_component(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[p2p]\nbootstrap = ["/ip4/192.0.2.1/tcp/7401"]\n')
    assert ": p2p.bootstrap[0]: must be an address ending in /p2p/<PeerID>" in problem


def test_bad_bootstrap_multiaddr_example_has_a_peer_id(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, '[p2p]\nbootstrap = ["/ip4/1.2.3/tcp/7401/p2p/12D3KooW"]\n')
    assert ": p2p.bootstrap[0]: not a valid multiaddr" in problem and "/tcp/7401/p2p/12D3KooW..." in problem


def test_bootstrap_with_non_ed25519_peer_id(tmp_path: Path) -> None:
    qm = "/ip4/192.0.2.1/tcp/7401/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    assert "p2p.bootstrap[0]: 'QmYyQ" in only_problem(tmp_path, f'[p2p]\nbootstrap = ["{qm}"]\n')


def test_bad_peer_id_in_allowlist(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, f'[p2p]\nallowlist = ["{PEER_A}", "{PEER_B[:-1]}"]\n')
    assert ": p2p.allowlist[1]: not a valid Ed25519 PeerID" in problem


@pytest.mark.parametrize("listen", ["0.0.0.0:7403", "192.168.1.5:7403", "[::]:7403", "example.com:7403"])
def test_non_loopback_api_listen(tmp_path: Path, listen: str) -> None:
    problem = only_problem(tmp_path, f'[api]\nlisten = "{listen}"\n')
    assert ": api.listen: " in problem and "loopback" in problem and listen in problem


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:7403", "[::1]:7403", "localhost:7403"])
def test_loopback_api_listen_is_accepted(tmp_path: Path, listen: str) -> None:
    assert load_config(write(tmp_path, f'[api]\nlisten = "{listen}"\n')).api.listen == listen


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_bad_device(tmp_path: Path, device: str) -> None:
    problem = only_problem(tmp_path, f'[train]\ndevice = "{device}"\n')
    assert ": train.device: must be auto, cpu, cuda, cuda:N or mps" in problem


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_good_device(tmp_path: Path, device: str) -> None:
    assert load_config(write(tmp_path, f'[train]\ndevice = "{device}"\n')).train.device == device


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    err = config_error(tmp_path, 'network = "a"\n\nlog_level = \n[p2p]\n')
    path = tmp_path / "peerfed.toml"
    assert str(err).startswith(f"{path}:3:") and "line 3" in str(err)
    assert "\n" not in str(err)


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert str(tmp_path / "nope.toml") in str(info.value) and "peerfed init" in str(info.value)


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    err = config_error(tmp_path, (
        'netwrk = "x"\n[exchange]\ninterval = 0\n[train]\ndevice = "gpu"\n'
        '[api]\nlisten = "0.0.0.0:1"\n'))
    keys = sorted(p.split(": ")[1] for p in err.problems)
    assert keys == ["api.listen", "exchange.interval", "netwrk", "train.device"]
    lines = str(err).splitlines()
    assert lines[0] == f"invalid config {tmp_path / 'peerfed.toml'} (4 problems):"
    assert len(lines) == 5


@pytest.mark.parametrize("text, expected", [
    ("0.0.0.0:7402", ("0.0.0.0", 7402)), ("[::1]:0", ("::1", 0)),
    ("node-1.example:65535", ("node-1.example", 65535)),
])
def test_parse_host_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected


@pytest.mark.parametrize("text", ["[::1]", "[1.2.3.4]:5", "host:", ":80", "a b:1", "1.2.3:4", "300.1.1.1:5"])
def test_parse_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


# ---- bootstrap edits ----

def test_bootstrap_add_and_remove_keep_comments(tmp_path: Path) -> None:
    path = tmp_path / "peerfed.toml"
    write_default_config(path)
    text = path.read_text().replace("bootstrap = []", "# lab machines, ask Ana first\nbootstrap = []")
    path.write_text(text)
    assert edit_bootstrap(path, add=[ADDR_A, ADDR_B]) == (ADDR_A, ADDR_B)
    assert edit_bootstrap(path, add=[ADDR_A]) == (ADDR_A, ADDR_B)  # already there: no-op
    assert edit_bootstrap(path, remove=[ADDR_A]) == (ADDR_B,)
    edited = path.read_text()
    assert "# lab machines, ask Ana first\n" in edited and "# swarm id" in edited
    assert load_config(path).p2p.bootstrap == (ADDR_B,)
    assert sorted(os.listdir(tmp_path)) == ["peerfed.toml"]  # temp file gone


def test_bootstrap_creates_the_table_when_missing(tmp_path: Path) -> None:
    path = write(tmp_path, '# top\nnetwork = "lab"\n')
    assert edit_bootstrap(path, add=[ADDR_A]) == (ADDR_A,)
    assert path.read_text().startswith('# top\nnetwork = "lab"\n')


@pytest.mark.parametrize("addr", ["/ip4/192.0.2.1/tcp/7401", "/ip4/192.0.2.1/tcp/7401/p2p/12D3KooWnope", "junk"])
def test_bootstrap_add_refuses_bad_address_and_leaves_the_file(tmp_path: Path, addr: str) -> None:
    path = write(tmp_path, f'[p2p]\nbootstrap = ["{ADDR_A}"]  # keep\n')
    before = path.read_bytes()
    with pytest.raises(ConfigError) as info:
        edit_bootstrap(path, add=[addr])
    assert addr in str(info.value)
    assert path.read_bytes() == before


def test_bootstrap_remove_absent_entry(tmp_path: Path) -> None:
    path = write(tmp_path, f'[p2p]\nbootstrap = ["{ADDR_A}"]\n')
    with pytest.raises(ConfigError, match="is not in p2p.bootstrap"):
        edit_bootstrap(path, remove=[ADDR_B])
    assert load_config(path).p2p.bootstrap == (ADDR_A,)


def test_bootstrap_edit_refuses_to_write_an_invalid_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[exchange]\ninterval = 0\n")
    with pytest.raises(ConfigError, match="exchange.interval"):
        edit_bootstrap(path, add=[ADDR_A])
    assert path.read_text() == "[exchange]\ninterval = 0\n"


def test_bootstrap_edit_keeps_the_file_mode(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    os.chmod(path, 0o600)
    edit_bootstrap(path, add=[ADDR_A])
    assert os.stat(path).st_mode & 0o777 == 0o600


# ---- train.task names and file permissions ----

def test_builtin_task_names_match_the_tasks_module() -> None:
    from peerfed.config import BUILTIN_TASK_NAMES
    from peerfed.train.tasks import BUILTIN_TASKS

    assert set(BUILTIN_TASK_NAMES) == set(BUILTIN_TASKS)


@pytest.mark.parametrize("task, expected", [
    ("digits_mlp", 'did you mean "digits-mlp"'),
    ("digit-lr", 'did you mean "digits-lr"'),
    ("resnet", 'not a built-in task (digits-lr, digits-mlp, digits-wide) nor "module:factory" (got'),
    ("my-pkg:factory", '"package.module:factory"'),
])
def test_a_task_that_is_no_builtin_nor_module_factory_is_refused(tmp_path: Path, task: str, expected: str) -> None:
    problem = only_problem(tmp_path, f'[train]\ntask = "{task}"\n')
    assert ": train.task: " in problem and expected in problem


def test_module_factory_task_passes_the_file_check(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, '[train]\ntask = "my_pkg.tasks:factory"\n')).train.task == "my_pkg.tasks:factory"


@pytest.mark.parametrize("mode, who", [(0o666, "every user"), (0o646, "every user")])
def test_a_world_writable_config_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    path = write(tmp_path, "")
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path} is writable by {who} (mode {mode:04o})" in message
    assert "train.task" in message and f"chmod go-w {path}" in message
    os.chmod(path, 0o644)
    assert load_config(path).network == "peerfed"


def test_a_group_writable_config_is_refused_unless_the_group_is_only_its_owner(tmp_path: Path) -> None:
    import grp
    import pwd

    path = write(tmp_path, "")
    os.chmod(path, 0o664)
    owner = pwd.getpwuid(os.getuid()).pw_name
    own_group = grp.getgrgid(os.stat(path).st_gid)
    if own_group.gr_name == owner and set(own_group.gr_mem) <= {owner}:
        assert load_config(path).network == "peerfed"  # a private group: the owner alone
    # root may give the file to any group, others to a group they belong to.
    allowed = [g for g in grp.getgrall() if os.getuid() == 0 or g.gr_gid in os.getgroups()]
    shared = next((g for g in allowed if g.gr_name != owner), None)
    if shared is None:
        pytest.skip("no other group to give the file to")
    os.chown(path, -1, shared.gr_gid)
    with pytest.raises(ConfigError, match="is writable by its group"):
        load_config(path)
