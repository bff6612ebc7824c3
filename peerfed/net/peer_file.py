"""The saved peer table: ``<state_dir>/peers.json``, so a restarted node rejoins without bootstrap.

The file is written atomically (``peers.json.tmp``, fsync, rename). A write that fails - a
full disk, a read-only or vanished folder - never raises: it removes its temp file, logs one
line naming the path and the OS error (the first failure at ERROR, the same failure again at
DEBUG until a write succeeds, which is logged too), and the table stays marked as changed so
the next save tries again. Stopping a node on a full disk therefore still finishes.

Owner: the membership service on the daemon's main loop; only ``write`` runs in a worker
thread, and it touches nothing but the file, the failure note and (to set it) the dirty flag.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from peerfed.core.peers import PeerTable

log = logging.getLogger("peerfed.membership")


class PeerTableFile:
    """Where the peer table is saved, whether it changed since, and the last write's failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.dirty = False  # the table changed since it was last written
        self._failing: str | None = None  # the last write's error, until one succeeds
        # stop() saves while a cancelled save loop's thread may still be writing: one at a time
        self._writing = threading.Lock()

    def serialize(self, table: PeerTable) -> str:
        """The table as JSON, taken now (on the owner's loop); marks it clean, since a change
        made while the text is written marks it dirty again."""
        self.dirty = False
        return json.dumps(table.to_dict())

    def write(self, text: str) -> bool:
        """Write ``text`` atomically; False (logged, dirty again) if it could not be written."""
        try:
            with self._writing:
                write_atomically(self.path, text)
        except OSError as exc:
            self.dirty = True  # try again at the next save
            problem = exc.strerror or str(exc)
            level = logging.DEBUG if problem == self._failing else logging.ERROR
            self._failing = problem
            log.log(level, "cannot save the peer table to %s: %s (keeping the one there, if any)", self.path, problem)
            return False
        if self._failing is not None:
            log.info("saved the peer table to %s again", self.path)
            self._failing = None
        return True

    def save(self, table: PeerTable) -> bool:
        """serialize and write, in the calling thread."""
        return self.write(self.serialize(table))


def load_peer_table(path: Path, own_peer_id: str, **kwargs: Any) -> PeerTable:
    """The saved table, or an empty one if there is none or it is unreadable (logged)."""
    try:
        with open(path, encoding="utf-8") as f:
            return PeerTable.from_dict(json.load(f), own_peer_id, **kwargs)
    except FileNotFoundError:
        return PeerTable(own_peer_id, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable peer table %s: %s", path, exc)
        return PeerTable(own_peer_id, **kwargs)


def write_atomically(path: Path, text: str) -> None:
    """``text`` to ``path`` via a temp file beside it; on any failure the temp file is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
