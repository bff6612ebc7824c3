"""Which wire encoding a weight buffer travels in: the names, their sizes on the wire, and the
choice from our preferences and what the peer accepts. Names, sizes and decisions only:
peerfed/codecs.py (torch) does the encoding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

ENCODINGS: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8")
AUTO = "auto"
# What "auto" means: the smallest encoding first (int8 kept float32's accuracy in
# bench_convergence when the sender merges against codecs.encode_rounded_'s values). float16
# before bfloat16: same size, three more mantissa bits; weights beyond +-65504 cannot be sent
# as float16, and the sender goes on to the next encoding both accept.
AUTO_ORDER: tuple[str, ...] = ("int8", "float16", "bfloat16", "float32")
# Every node accepts float32 (lossless, and all a peer from before encodings sends).
LOSSLESS = "float32"

# int8's layout (codecs.py explains the choice): per block of INT8_BLOCK elements, a float32
# scale of SCALE_BYTES, then one byte per element.
INT8_BLOCK = 2048
SCALE_BYTES = 4
INT8_RECORD = SCALE_BYTES + INT8_BLOCK
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def check_encoding(name: str) -> str:
    """`name` if it is an encoding (not "auto"), else ValueError listing the allowed ones."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; allowed: {', '.join(ENCODINGS)}")
    return name


def wire_length(encoding: str, numel: int) -> int:
    """Bytes on the wire for `numel` float32 values (the payload, no trailer)."""
    if numel < 0:
        raise ValueError("numel must be >= 0")
    if check_encoding(encoding) != "int8":
        return numel * ITEMSIZE[encoding]
    full, rest = divmod(numel, INT8_BLOCK)
    return full * INT8_RECORD + (SCALE_BYTES + rest if rest else 0)


def block_count(encoding: str, numel: int) -> int:
    """Scales on the wire (int8: one per block, the last one possibly short); 0 otherwise."""
    return -(-numel // INT8_BLOCK) if check_encoding(encoding) == "int8" else 0


def expand_preferences(ours: Sequence[str]) -> list[str]:
    """Our preference list with "auto" replaced by AUTO_ORDER, duplicates dropped, names checked."""
    result: list[str] = []
    for name in ours:
        for item in AUTO_ORDER if name == AUTO else (check_encoding(name),):
            if item not in result:
                result.append(item)
    return result


def choose_encoding(ours: Sequence[str], theirs: Collection[str]) -> str | None:
    """The first of our preferences ("auto" = smallest first) that the peer accepts, else None.

    Names in `theirs` we do not know are ignored (a newer peer may accept more).
    """
    return next((name for name in expand_preferences(ours) if name in theirs), None)


class EncodingChoice:
    """What this node accepts, and which encoding it offers each peer (exchange.encoding).

    A node accepts its configured encoding ("auto": all of them) and float32. It offers a peer
    its first preference until it learns what that peer accepts: from the `accepts` of the
    peer's manifests, or from the peer's 415 answer. Remembers the last `max_peers` peers.
    """

    def __init__(self, setting: str = AUTO, *, max_peers: int = 1024) -> None:
        self.accepts: tuple[str, ...] = tuple(expand_preferences([setting, LOSSLESS]))
        self.preferences = self.accepts  # what we send in, best first (less what we failed to encode)
        self._theirs: OrderedDict[str, tuple[str, ...]] = OrderedDict()
        self._max_peers = max_peers

    def offer(self, peer_id: str) -> str:
        """The encoding of our next push to `peer_id`."""
        known = self._theirs.get(peer_id)
        chosen = choose_encoding(self.preferences, known) if known is not None else None
        return chosen or self.preferences[0]

    def cannot_send(self, encoding: str) -> None:
        """Our weights did not fit `encoding` (float16's range): send in the next one from now on."""
        if encoding != LOSSLESS:
            self.preferences = tuple(name for name in self.preferences if name != encoding)

    def learn(self, peer_id: str, theirs: Sequence[str]) -> None:
        """`peer_id` accepts `theirs` (an empty list: a peer from before encodings, float32)."""
        self._theirs[peer_id] = tuple(theirs) or (LOSSLESS,)
        self._theirs.move_to_end(peer_id)
        while len(self._theirs) > self._max_peers:
            self._theirs.popitem(last=False)

    def retry_after_refusal(self, peer_id: str, refused: str, theirs: Sequence[str]) -> str | None:
        """`peer_id` refused `refused` and accepts `theirs`: the encoding to try once more, or
        None when no other encoding is common to both."""
        self.learn(peer_id, theirs)
        chosen = choose_encoding(self.preferences, theirs)
        return chosen if chosen != refused else None

    def reply_encoding(self, theirs: Sequence[str]) -> str | None:
        """The encoding of our reply to a push whose manifest accepts `theirs`."""
        return choose_encoding(self.preferences, tuple(theirs) or (LOSSLESS,))
