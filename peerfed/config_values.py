"""The values a config may hold: the checks behind the schema in config.py.

Each check raises ValueError with the text shown after the key path ("must be HOST:PORT, e.g.
..."); the Annotated types (Str, ListenAddr, HostPort, ...) attach them to schema fields.
Strict types: a string is not taken for a number, nor a number for a string.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any

import multiaddr
from pydantic import AfterValidator, BeforeValidator, PlainValidator, Strict

from peerfed.core.peerid import is_valid_peer_id
from peerfed.core.rates import check_share, parse_rate

NETWORK_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
DEVICE_RE = re.compile(r"auto|cpu|cuda|cuda:\d+|mps")
_TASK_MODULE_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
# The names of peerfed.train.tasks.BUILTIN_TASKS (this module imports no torch; a test keeps
# the two equal).
BUILTIN_TASK_NAMES = ("digits-lr", "digits-mlp", "digits-wide")
_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_EXAMPLE_BOOTSTRAP = "/ip4/203.0.113.5/tcp/7401/p2p/12D3KooW..."


def parse_host_port(value: str) -> tuple[str, int]:
    """'0.0.0.0:7402', 'localhost:7403', '[::1]:7403' -> (host, port); port 0 = pick a free one."""
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        try:
            ok = bool(sep) and ipaddress.ip_address(host).version == 6
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("an IPv6 address must be written [ADDRESS]:PORT, e.g. [::1]:7403")
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError("must be HOST:PORT, e.g. 0.0.0.0:7402 or [::1]:7403")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets, e.g. [::1]:7403")
        if not _HOSTNAME_RE.fullmatch(host) or (re.fullmatch(r"[\d.]+", host) and not _is_ipv4(host)):
            raise ValueError(f"{host!r} is not an IP address or host name")
    if not (port_text.isascii() and port_text.isdigit() and int(port_text) <= 65535):
        raise ValueError("port must be a number from 0 to 65535 (0 = pick a free one)")
    return host, int(port_text)


def _is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def _check_host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _check_loopback_host_port(value: str) -> str:
    host = parse_host_port(value)[0]
    try:
        loopback = host.lower() in ("localhost", "localhost.") or ipaddress.ip_address(host).is_loopback
    except ValueError:  # another host name
        loopback = False
    if not loopback:
        raise ValueError("the admin API is never exposed: use a loopback address "
                         "(127.0.0.1, ::1 or localhost), e.g. 127.0.0.1:7403")
    return value


def _parse_multiaddr(value: str, example: str = "/ip4/0.0.0.0/tcp/7401") -> multiaddr.Multiaddr:
    if not value:
        raise ValueError("must not be empty")
    try:
        return multiaddr.Multiaddr(value)
    except Exception as exc:  # the package raises several types; all mean "bad address"
        reason = str(exc).split(" (string:")[0].split("': ")[-1]
        raise ValueError(f"not a valid multiaddr: {reason} (e.g. {example})") from exc


def _check_listen_addr(value: str) -> str:
    if any(p.name == "p2p" for p in _parse_multiaddr(value).protocols()):
        raise ValueError("must not contain /p2p/ (the node's own PeerID is added when shown)")
    return value


def check_peer_id(value: str) -> str:
    if not is_valid_peer_id(value):
        raise ValueError("not a valid Ed25519 PeerID (12D3KooW..., see `peerfed id`)")
    return value


def check_bootstrap_address(value: str) -> str:
    """A dialable multiaddr ending in /p2p/<PeerID>; raises ValueError saying what is wrong."""
    names = [p.name for p in _parse_multiaddr(value, _EXAMPLE_BOOTSTRAP).protocols()]
    if len(names) < 2 or names[-1] != "p2p":
        raise ValueError(f"must be an address ending in /p2p/<PeerID>, e.g. {_EXAMPLE_BOOTSTRAP}")
    peer_id = value.rstrip("/").rsplit("/", 1)[-1]
    if not is_valid_peer_id(peer_id):
        raise ValueError(f"{peer_id!r} after /p2p/ is not a valid Ed25519 PeerID (12D3KooW...)")
    return value


def check_pattern(regex: re.Pattern[str], allowed: str) -> Any:
    def check(value: str) -> str:
        if not regex.fullmatch(value):
            raise ValueError(f"must be {allowed}")
        return value
    return AfterValidator(check)


def check_task(value: str) -> str:
    if ":" in value:
        if not _TASK_MODULE_RE.fullmatch(value):
            raise ValueError('must be "package.module:factory" (Python names), or a built-in task: '
                             + ", ".join(BUILTIN_TASK_NAMES))
        return value
    if value not in BUILTIN_TASK_NAMES:
        close = difflib.get_close_matches(value, BUILTIN_TASK_NAMES, n=2, cutoff=0.6)
        hint = "; did you mean " + " or ".join(f'"{c}"' for c in close) + "?" if close else ""
        raise ValueError(f'not a built-in task ({", ".join(BUILTIN_TASK_NAMES)}) nor "module:factory"{hint}')
    return value


def check_url(value: str) -> str:
    if value and not re.fullmatch(r"https?://[^/\s:]+(:\d+)?(/\S*)?|https?://\[[0-9a-fA-F:.]+\](:\d+)?(/\S*)?", value):
        raise ValueError('must be empty or an http(s) URL such as "http://203.0.113.5:7402"')
    return value


def _check_rate(value: Any) -> str:
    parse_rate(value)  # its ValueError lists the allowed forms (a number, too, is refused so)
    return str(value)


def _check_share(value: Any) -> float:
    try:
        return check_share(value)
    except ValueError:
        raise ValueError("must be a number with 0 < x <= 1, e.g. 0.5 (the share of max_upload_rate "
                         "this node's exchanges may use on average)") from None


def _to_path(value: Any) -> Path:
    if isinstance(value, Path):
        return value
    if not isinstance(value, str) or not value:
        raise ValueError("must be a non-empty path string")
    return Path(value).expanduser()


def check_scalar(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)):
        return value
    raise ValueError("task options must be a string, number or boolean")


Str = Annotated[str, Strict()]
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]
ListenAddr = Annotated[Str, AfterValidator(_check_listen_addr)]
BootstrapAddr = Annotated[Str, AfterValidator(check_bootstrap_address)]
PeerIdStr = Annotated[Str, AfterValidator(check_peer_id)]
HostPort = Annotated[Str, AfterValidator(_check_host_port)]
LoopbackHostPort = Annotated[Str, AfterValidator(_check_loopback_host_port)]
FilePath = Annotated[Path, BeforeValidator(_to_path)]
Rate = Annotated[str, PlainValidator(_check_rate)]  # "" (unlimited) or e.g. "20Mbit", "2.5MB"
Share = Annotated[float, PlainValidator(_check_share)]
