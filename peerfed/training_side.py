"""What the daemon asks of a node's training side, and the stand-in for a relay node.

``Training`` (training.py, which imports torch) is the real one; ``NoTraining`` serves a node
with train.enabled = false, so the daemon never asks "do we train?" and never imports torch.
"""

from __future__ import annotations

from typing import Protocol

from peerfed.config import Config


class TrainingSide(Protocol):
    """What the daemon asks of its training side (Training or NoTraining)."""

    exchange_url: str
    fingerprint: str

    async def start(self) -> None: ...
    async def run(self) -> None: ...
    async def stop(self) -> None: ...
    def reload(self, config: Config) -> None: ...
    def status(self) -> dict[str, object]: ...
    def progress(self) -> int | None: ...
    async def exchange_now(self, peer_id: str | None) -> dict[str, object]: ...
    def banned(self) -> dict[str, dict[str, object]]: ...


class NoTraining:
    """A relay node (train.enabled = false): membership only, no model, no exchange."""

    exchange_url = ""
    fingerprint = ""

    async def start(self) -> None:
        pass

    async def run(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def reload(self, config: Config) -> None:
        pass

    def status(self) -> dict[str, object]:
        return {}

    def progress(self) -> int | None:
        return None  # nothing to watch: the watchdog looks at the event loop alone

    async def exchange_now(self, peer_id: str | None) -> dict[str, object]:
        return {"outcome": "disabled"}

    def banned(self) -> dict[str, dict[str, object]]:
        return {}  # no exchange, nobody to ban
