"""The node's identity: one Ed25519 key pair in one file.

The file holds the libp2p protobuf-serialized private key (what `libp2p.identity_utils`
writes; go-libp2p uses the same protobuf), so py-libp2p and other libp2p tools can read it.
We do not call identity_utils.save_identity: it truncates and overwrites an existing file, and a
lost key is a lost identity. Instead the key is written to a temp file (0600) and linked into
place, which fails if the name exists. `replace_identity` (``peerfed identity new --replace``)
is the one way to change a node's key: it moves the old file to a timestamped backup first.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType, PrivateKey

from peerfed.config import KEY_FILE_NAME
from peerfed.config_files import make_private_dir, write_file_atomically
from peerfed.core.peerid import Signer, peer_id_from_public_key
from peerfed.errors import AlreadyExistsError, IdentityError

__all__ = ["KEY_FILE_NAME", "NewIdentity", "create_identity", "load_identity", "peer_id_of", "replace_identity",
           "signer_of"]

# Where every key error points: init refuses on an existing node folder, this does not.
NEW_KEY_HINT = "`peerfed identity new --replace` (same --home/--config; it keeps the old file as a backup)"


def create_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Make a new Ed25519 key and save it at `path` (0600); never overwrites (AlreadyExistsError)."""
    path = Path(path).expanduser().absolute()
    if os.path.lexists(path):
        raise AlreadyExistsError(f"identity key {path} already exists; peerfed never overwrites a key")
    make_private_dir(path.parent)
    key_pair = create_new_key_pair()
    try:
        write_file_atomically(path, key_pair.private_key.serialize(), mode=0o600, overwrite=False)
    except AlreadyExistsError:  # created by someone else between the check and the link
        raise AlreadyExistsError(f"identity key {path} already exists; peerfed never overwrites a key") from None
    return key_pair


def _decode_private_key(data: bytes) -> KeyPair:
    """Parse a protobuf PrivateKey holding an Ed25519 key; ValueError says what is wrong."""
    if not data:
        raise ValueError("the file is empty")
    try:
        message = PrivateKey.deserialize_from_protobuf(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"not a libp2p private key: {exc}") from None
    if message.key_type != KeyType.Ed25519.value:
        name = next((t.name for t in KeyType if t.value == message.key_type), str(message.key_type))
        raise ValueError(f"a {name} key, peerfed needs Ed25519")
    raw = bytes(message.data)
    if len(raw) not in (32, 64):  # py-libp2p writes the 32-byte seed, go-libp2p seed + public key
        raise ValueError(f"an Ed25519 private key is 32 or 64 bytes, not {len(raw)}")
    private_key = Ed25519PrivateKey.from_bytes(raw[:32])
    public_key = private_key.get_public_key()
    if len(raw) == 64 and raw[32:] != public_key.to_bytes():
        raise ValueError("the public half does not match the private key")
    return KeyPair(private_key, public_key)


def load_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Read the key at `path`; IdentityError (one line naming the file and the fix) if it is
    missing, unreadable, corrupt, or readable by group/others."""
    path = Path(path).expanduser().absolute()
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise IdentityError(f"no identity key at {path}; make one with `peerfed identity new` "
                            f"(same --home/--config)") from None
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file; make a new identity with "
                            f"{NEW_KEY_HINT}")
    if info.st_mode & 0o077:
        # Like ssh: refuse a private key others can read, it may already be leaked.
        raise IdentityError(f"identity key {path} is accessible by group/others (mode "
                            f"{stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`, or if others "
                            f"may have read it, make a new identity with {NEW_KEY_HINT}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {path}: {exc.strerror}") from None
    try:
        return _decode_private_key(data)
    except ValueError as exc:
        raise IdentityError(f"identity key {path} is corrupt ({exc}); restore it from backup, or "
                            f"make a new identity with {NEW_KEY_HINT}") from None


@dataclass(frozen=True)
class NewIdentity:
    """What `replace_identity` did: the new key, and where the old one went."""

    key_pair: KeyPair
    path: Path
    backup: Path | None  # the old key file, moved aside (None: there was none)
    old_peer_id: str | None  # None: there was no old key, or it could not be read
    old_problem: str | None  # why the old key could not be read (corrupt, not a file, ...)


def _read_old_key(path: Path) -> tuple[str | None, str | None]:
    """(old PeerID, None) or (None, why not): its mode does not matter here, it is going away."""
    try:
        if not path.is_file():
            return None, "not a regular file"
        return peer_id_of(_decode_private_key(path.read_bytes())), None
    except (OSError, ValueError) as exc:
        return None, str(getattr(exc, "strerror", None) or exc)


def _backup_path(path: Path, now: float) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    candidate = path.with_name(f"{path.name}.{stamp}.bak")
    n = 1
    while os.path.lexists(candidate):
        candidate = path.with_name(f"{path.name}.{stamp}-{n}.bak")
        n += 1
    return candidate


def replace_identity(path: str | os.PathLike[str], *, now: float | None = None) -> NewIdentity:
    """Make a new key at `path`; an existing file (key, corrupt or not) is first moved to
    `<name>.<UTC time>.bak` next to it (mode 0600), never deleted. If making the new key
    fails, the old file is moved back."""
    path = Path(path).expanduser().absolute()
    if not os.path.lexists(path):
        return NewIdentity(create_identity(path), path, None, None, None)
    old_peer_id, problem = _read_old_key(path)
    backup = _backup_path(path, time.time() if now is None else now)
    os.rename(path, backup)
    if backup.is_file() and not backup.is_symlink():
        os.chmod(backup, 0o600)  # a private key, even if the old file was too open
    try:
        key_pair = create_identity(path)
    except BaseException:
        if not os.path.lexists(path):
            os.rename(backup, path)
        raise
    return NewIdentity(key_pair, path, backup, old_peer_id, problem)


def peer_id_of(key_pair: KeyPair) -> str:
    """The PeerID ("12D3KooW...") of a key pair; equals libp2p's ID.from_pubkey(...).to_base58()."""
    return peer_id_from_public_key(key_pair.public_key.to_bytes())


def signer_of(key_pair: KeyPair) -> Signer:
    """A protocol-core Signer holding the same key (for envelopes and manifests)."""
    return Signer(key_pair.private_key.to_bytes())
