"""Which wire encoding a weight buffer travels in: the names, and the choice from our
preferences and what the peer accepts. Names and decisions only: peerfed/codecs.py (torch)
does the encoding.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

ENCODINGS: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8")
AUTO = "auto"
# What "auto" means: the smallest encoding first (int8 kept float32's accuracy in
# bench_convergence when the sender merges against codecs.encode_rounded_'s values). float16
# before bfloat16: same size, three more mantissa bits; weights beyond +-65504 cannot be sent
# as float16, and the sender goes on to the next encoding both accept.
AUTO_ORDER: tuple[str, ...] = ("int8", "float16", "bfloat16", "float32")


def check_encoding(name: str) -> str:
    """`name` if it is an encoding (not "auto"), else ValueError listing the allowed ones."""
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; allowed: {', '.join(ENCODINGS)}")
    return name


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
