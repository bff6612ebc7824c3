"""Writing config files: the commented default written by `peerfed init`, in-place bootstrap
list edits that keep the file's comments, and the atomic, never-overwriting file writes that
the identity key uses too."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import multiaddr
import tomlkit

from peerfed.config import (Config, _parse_toml, _read_text, check_bootstrap_address, load_config,
                            parse_config)
from peerfed.errors import AlreadyExistsError, ConfigError


# ---- writing ----

def make_private_dir(folder: Path) -> None:
    """Create `folder` (and parents) with the last one 0700; leave an existing folder alone."""
    if not folder.is_dir():
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask


def write_file_atomically(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write via a temp file in the same folder so readers never see a partial file.

    overwrite=False links the temp file into place, which fails if the path exists (like
    O_CREAT|O_EXCL): AlreadyExistsError. overwrite=True uses os.replace.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AlreadyExistsError(f"{path} already exists; not overwriting it") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the new name itself durable
    finally:
        os.close(dir_fd)


def default_config_text() -> str:
    """The commented template shipped with the package (all settings at their defaults)."""
    return resources.files("peerfed").joinpath("default_config.toml").read_text(encoding="utf-8")


def _array(values: Iterable[str]) -> Any:
    array = tomlkit.array()
    array.extend(values)
    return array.multiline(len(array) > 1)


def write_default_config(path: str | os.PathLike[str], *, network: str | None = None,
                         p2p_listen: str | Sequence[str] | None = None,
                         exchange_listen: str | None = None, api_listen: str | None = None,
                         bootstrap: Sequence[str] = (), settings: Mapping[str, Any] | None = None) -> Config:
    """Write the commented template with these values filled in and return it loaded.

    settings: dotted key -> value (e.g. public_relay.SETTINGS), applied before the options, so
    an explicit option wins. The result is validated before anything is written (a bad value
    leaves no file or folder behind: ConfigError); a missing folder is created 0700; never
    overwrites (AlreadyExistsError).
    """
    path = Path(path).expanduser().absolute()
    doc = tomlkit.parse(default_config_text())
    p2p: Any = doc["p2p"]
    # Assigning a value keeps the template's comment on that line.
    for key, value in (settings or {}).items():
        *tables, name = key.split(".")
        table: Any = doc
        for part in tables:
            table = table[part]
        table[name] = _array(value) if isinstance(value, list) else value
    if network is not None:
        doc["network"] = network
    if p2p_listen is not None:
        p2p["listen"] = _array([p2p_listen] if isinstance(p2p_listen, str) else p2p_listen)
    if bootstrap:
        p2p["bootstrap"] = _array(bootstrap)
    if exchange_listen is not None:
        doc["exchange"]["listen"] = exchange_listen  # type: ignore[index]
    if api_listen is not None:
        doc["api"]["listen"] = api_listen  # type: ignore[index]
    text = tomlkit.dumps(doc)
    parse_config(_parse_toml(text, path), base_dir=path.parent, source=str(path))
    make_private_dir(path.parent)
    write_file_atomically(path, text.encode(), mode=0o644, overwrite=False)
    return load_config(path)


def _same_address(a: str, b: str) -> bool:
    try:
        return a == b or str(multiaddr.Multiaddr(a)) == str(multiaddr.Multiaddr(b))
    except Exception:  # an unparsable entry only matches itself
        return False


def edit_bootstrap(path: str | os.PathLike[str], *, add: Sequence[str] = (),
                   remove: Sequence[str] = ()) -> tuple[str, ...]:
    """Add/remove p2p.bootstrap entries in place, keeping the file's comments and layout.

    Adding an entry already present is a no-op; removing an absent one is a ConfigError.
    The edited file is validated before it atomically replaces the old one.
    Returns the new bootstrap list.
    """
    path = Path(path).expanduser().absolute()
    text = _read_text(path)
    _parse_toml(text, path)  # tomllib's syntax errors carry line numbers; tomlkit's are vaguer
    for addr in add:
        try:
            check_bootstrap_address(addr)
        except ValueError as exc:
            raise ConfigError(f"bootstrap address {addr!r}: {exc}") from None
    doc = tomlkit.parse(text)
    p2p = doc.setdefault("p2p", tomlkit.table())
    if not isinstance(p2p, dict) or not isinstance(p2p.setdefault("bootstrap", tomlkit.array()), list):
        raise ConfigError(f"{path}: p2p.bootstrap: must be a list inside a [p2p] table")
    array = p2p["bootstrap"]
    for addr in remove:
        index = next((i for i, v in enumerate(array) if _same_address(str(v), addr)), None)
        if index is None:
            raise ConfigError(f"{addr} is not in p2p.bootstrap of {path} "
                              f"(`peerfed bootstrap list` shows the entries)")
        del array[index]
    for addr in add:
        if not any(_same_address(str(v), addr) for v in array):
            array.append(addr)
    if len(array) > 1 and "\n" not in array.as_string():
        array.multiline(True)  # one address per line reads better than one long line
    new_text = tomlkit.dumps(doc)
    cfg = parse_config(_parse_toml(new_text, path), base_dir=path.parent, source=str(path))
    real = path.resolve()  # edit a symlinked config's target, keep the link
    write_file_atomically(real, new_text.encode(), mode=os.stat(real).st_mode & 0o7777, overwrite=True)
    return cfg.p2p.bootstrap
