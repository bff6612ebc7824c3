"""The node's TOML config: schema (frozen pydantic models) and loading with operator-friendly
errors. The value checks behind the schema are in config_values.py; writing config files (the
commented default, bootstrap edits) is in config_files.py.

Every problem is reported as `FILE: key.path: what is wrong (got VALUE)`, all problems at once.
A config file that others can write is refused before it is parsed (like ssh's StrictModes):
it names the Python module the daemon imports (train.task) and the folders it writes.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import stat
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from peerfed.config_values import (
    BUILTIN_TASK_NAMES,
    DEVICE_RE,
    NETWORK_RE,
    Bool,
    BootstrapAddr,
    FilePath,
    Float,
    HostPort,
    Int,
    ListenAddr,
    LoopbackHostPort,
    PeerIdStr,
    Rate,
    Share,
    Str,
    check_bootstrap_address,
    check_pattern,
    check_peer_id,
    check_scalar,
    check_task,
    check_url,
    parse_host_port,
)
from peerfed.errors import ConfigError

# What `from peerfed.config import ...` offers (the value checks live in config_values.py).
__all__ = ["BUILTIN_TASK_NAMES", "CONFIG_FILE_NAME", "KEY_FILE_NAME", "AdmissionConfig", "ApiConfig", "CheckpointConfig", "Config",
           "ExchangeConfig", "MergeConfig", "P2PConfig", "TrainConfig", "check_bootstrap_address", "check_config_permissions",
           "check_peer_id", "load_config", "parse_config", "parse_host_port"]

CONFIG_FILE_NAME = "peerfed.toml"
KEY_FILE_NAME = "identity.key"  # default `identity`, next to the config


# ---- schema ----

class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class P2PConfig(_Section):
    listen: tuple[ListenAddr, ...] = ("/ip4/0.0.0.0/tcp/7401",)
    announce: tuple[ListenAddr, ...] = ()
    bootstrap: tuple[BootstrapAddr, ...] = ()
    allowlist: tuple[PeerIdStr, ...] = ()
    max_peers: Int = Field(64, ge=1)
    max_connections: Int = Field(16, ge=1)  # the active view: live connections kept, whatever the swarm's size
    port_mapping: Bool = True  # ask the home router (UPnP IGD, else NAT-PMP) to forward our p2p and exchange ports
    relay_service: Bool = False  # relay circuits for peers behind NATs (a public box), within the caps below
    relay_max_bytes: Int = Field(64 << 20, ge=1)  # per relayed circuit, both directions together
    relay_max_seconds: Int = Field(300, ge=1)  # per relayed circuit

    @field_validator("listen")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError('must list at least one address, e.g. ["/ip4/0.0.0.0/tcp/7401"]')
        return value


class ExchangeConfig(_Section):
    listen: HostPort = "0.0.0.0:7402"
    advertise_url: Annotated[Str, AfterValidator(check_url)] = ""
    interval: Float = Field(10.0, gt=0)
    connect_timeout: Float = Field(5.0, gt=0)
    transfer_timeout: Float = Field(120.0, gt=0)
    max_incoming: Int = Field(1, ge=1)
    # Weights on the wire (core/encodings.py): "auto" = the smallest both sides accept; float32 always accepted.
    encoding: Literal["auto", "float32", "float16", "bfloat16", "int8"] = "auto"
    max_upload_rate: Rate = ""  # every transfer's upload, paced by one token bucket; "" = unlimited
    max_download_rate: Rate = ""  # every transfer's download, the same way
    max_upload_share: Share = 0.5  # own exchanges spaced so average upload <= share x max_upload_rate
    tls: Bool = True  # TLS 1.3 with the certificate pinned in the signed peer record; false only on a trusted LAN

    @property
    def listen_host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return parse_host_port(self.listen)[1]


class MergeConfig(_Section):
    """How a peer's weights are folded into ours (train/merging.py)."""
    # "nesterov" = an outer Nesterov step on the pair's average at each exchange (DiLoCo/NoLoCo)
    outer: Literal["none", "nesterov"] = "none"
    outer_lr: Float = Field(0.7, gt=0, le=2)  # the outer step's learning rate (outer = "nesterov")
    outer_momentum: Float = Field(0.9, ge=0, lt=1)  # the outer step's momentum
    clip: Float = Field(2.0, ge=0)  # robust merge: peer differences clipped to clip x the recent spread (clipping.py); 0 = off


class AdmissionConfig(_Section):
    """What one peer may cost this node (net/guard.py, net/pacing.py)."""
    max_connections_per_address: Int = Field(16, ge=1)  # open exchange connections from one IP address
    header_timeout: Float = Field(10.0, gt=0)  # seconds a connection may take to send a request's headers
    peer_exchanges_per_minute: Int = Field(0, ge=0)  # per peer, pushes and downloads; 0 = 2 x 60 / interval, at least 60
    peer_mib_per_hour: Float = Field(0.0, ge=0)  # per peer, payload MiB both ways; 0 = no limit
    ban_duration: Float = Field(600.0, gt=0)  # seconds a peer at fault (bad digest or values, stalls) is refused


class TrainConfig(_Section):
    enabled: Bool = True
    task: Annotated[Str, AfterValidator(check_task)] = "digits-mlp"
    device: Annotated[Str, check_pattern(DEVICE_RE, "auto, cpu, cuda, cuda:N or mps")] = "auto"
    batch_size: Int = Field(32, ge=1)
    lr: Float = Field(0.05, gt=0)
    seed: Int = Field(0, ge=0)
    threads: Int = Field(0, ge=0)
    eval_interval: Float = Field(5.0, gt=0)
    init: Literal["auto", "peer", "local"] = "auto"
    node_index: Int = Field(0, ge=0)
    node_count: Int = Field(1, ge=1)
    options: dict[Str, Annotated[Any, PlainValidator(check_scalar)]] = Field(default_factory=dict)


class ApiConfig(_Section):
    listen: LoopbackHostPort = "127.0.0.1:7403"

    @property
    def host(self) -> str:
        return parse_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.listen)[1]


class CheckpointConfig(_Section):
    interval: Float = Field(300.0, gt=0)
    keep: Int = Field(3, ge=1)


class Config(_Section):
    network: Annotated[Str, check_pattern(NETWORK_RE, "1-64 of a-z 0-9 . _ - starting with a letter or digit")] = "peerfed"
    identity: FilePath = Path(KEY_FILE_NAME)
    state_dir: FilePath = Path("state")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    p2p: P2PConfig = P2PConfig()
    exchange: ExchangeConfig = ExchangeConfig()
    merge: MergeConfig = MergeConfig()
    admission: AdmissionConfig = AdmissionConfig()
    train: TrainConfig = TrainConfig()
    api: ApiConfig = ApiConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    _path: Path | None = PrivateAttr(None)

    @field_validator("identity", "state_dir")
    @classmethod
    def _resolve(cls, value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        return Path(base) / value if base is not None and not value.is_absolute() else value

    @property
    def path(self) -> Path | None:
        """The file this config was loaded from (None when built in code)."""
        return self._path

    def __eq__(self, other: object) -> bool:
        # Equal settings are equal configs, whichever file they came from (pydantic would
        # also compare the private _path).
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # train.options is a dict; compare digest() instead

    def digest(self) -> str:
        """sha256 hex of the normalized settings (two nodes' configs compare equal by this)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---- loading and error reporting ----

def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _section_model(loc: Sequence[int | str]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    text = json.dumps(value) if isinstance(value, (str, bool)) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(err: Any) -> str:
    kind, loc = err["type"], err["loc"]
    if kind == "extra_forbidden":
        model = _section_model(loc[:-1])
        known = list(model.model_fields) if model else []
        where = f"[{_key_path(loc[:-1])}]" if loc[:-1] else "the top level"
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.7)
        if close:
            return f"unknown key; did you mean '{close[0]}'?"
        return f"unknown key (known keys in {where}: {', '.join(known)})"
    if kind == "value_error":
        message = str(err["ctx"]["error"])
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = "must be a table"
    elif kind in ("tuple_type", "list_type"):
        message = "must be a list, e.g. [\"...\"]"
    elif kind == "bool_type":
        message = "must be true or false"
    else:
        message = err["msg"].replace("Input should be", "must be")
    return f"{message} (got {_show(err['input'])})"


def _cross_checks(cfg: Config) -> list[tuple[str, str]]:
    problems = []
    if cfg.train.node_index >= cfg.train.node_count:
        problems.append(("train.node_index", f"must be less than train.node_count "
                         f"({cfg.train.node_count}) (got {cfg.train.node_index})"))
    return problems


def parse_config(data: dict[str, Any], *, base_dir: Path | None, source: str = "<config>") -> Config:
    """Validate already-parsed TOML data; relative paths resolve against base_dir."""
    try:
        cfg = Config.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        problems = [f"{source}: {_key_path(e['loc'])}: {_describe(e)}" for e in exc.errors()]
    else:
        problems = [f"{source}: {key}: {text}" for key, text in _cross_checks(cfg)]
        if not problems:
            return cfg
    count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
    raise ConfigError(f"invalid config {source} ({count}):", problems)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config file at {path}; create one with `peerfed init` "
                          f"(or `peerfed init --home DIR`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python 3.11 puts the position only in the message: "... (at line 3, column 9)".
        match = re.search(r"^(.*) \(at line (\d+), column (\d+)\)$", str(exc))
        if match:
            reason, line, column = match.groups()
        else:  # "(at end of document)"
            reason, line, column = str(exc).split(" (at ")[0], str(text.count("\n") + 1), "end"
        raise ConfigError(f"{path}:{line}: TOML syntax error: {reason} "
                          f"(line {line}, column {column})") from None


def _group_is_only_its_owner(info: os.stat_result) -> bool:
    """The file's group is its owner's private group (Debian/Ubuntu give every user one, and
    a umask of 002 makes files group-writable): writable by the group is then by the owner."""
    import grp
    import pwd

    try:
        owner = pwd.getpwuid(info.st_uid).pw_name
        group = grp.getgrgid(info.st_gid)
    except KeyError:  # ids without a name: assume the worst
        return False
    return group.gr_name == owner and set(group.gr_mem) <= {owner}


def check_config_permissions(path: Path) -> None:
    """Refuse a config that others can write (world, or a group shared with others): it
    decides which Python module the daemon imports, so writing it is running code as us."""
    try:
        info = os.stat(path)
    except OSError:
        return  # reading it reports the problem
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o002:
        who = "every user"
    elif mode & 0o020 and not _group_is_only_its_owner(info):
        who = "its group"
    else:
        return
    raise ConfigError(f"{path} is writable by {who} (mode {mode:04o}); refusing it, because the config "
                      f"names the Python module the daemon imports (train.task) and where it writes; "
                      f"run `chmod go-w {path}`")


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; raises ConfigError listing every problem found."""
    path = Path(path).expanduser().absolute()
    text = _read_text(path)
    check_config_permissions(path)
    cfg = parse_config(_parse_toml(text, path), base_dir=path.parent, source=str(path))
    cfg._path = path
    return cfg
