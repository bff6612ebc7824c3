"""The layering rule (design.md section 2), checked on the source with ast.

peerfed.core is the protocol core: no I/O frameworks, no torch, nothing of ours
outside peerfed.core. peerfed.averaging is math: torch yes, I/O and drivers no.
The drivers (net, train, ops) are siblings: none imports another, only what lies
below them (core, averaging, and the bottom helpers errors.py and serving.py).
No import circle anywhere in the package.
Every import counts: top level, inside functions, under TYPE_CHECKING, relative,
and importlib.import_module / __import__ with a constant name.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "peerfed"

IO_FRAMEWORKS = frozenset({"asyncio", "trio", "anyio", "trio_asyncio", "aiohttp", "uvloop",
                           "libp2p", "socket", "ssl", "selectors"})
CORE_FORBIDDEN = IO_FRAMEWORKS | {"torch"}
# Drivers and everything above them (arrows only point down).
ABOVE_AVERAGING = ("peerfed.net", "peerfed.train", "peerfed.ops", "peerfed.daemon",
                   "peerfed.demo", "peerfed.cli")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted target) for every import in ``source``; relative ones made absolute.

    ``from a.b import c`` yields "a.b.c", so ``from peerfed import config`` is seen as
    peerfed.config (c may be a submodule or an attribute: the prefix rules handle both).
    """
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base)
                      for alias in node.names]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) \
                    and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def top_level_imports(path: Path) -> set[str]:
    """The top-level package of everything a module imports (e.g. {"random", "peerfed"})."""
    return {name.split(".")[0] for _, name in imported_names(path.read_text(), module_name(path))}


def _within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def core_rule(target: str) -> str | None:
    if target.split(".")[0] in CORE_FORBIDDEN:
        return "an I/O framework or torch"
    if _within(target, "peerfed") and not _within(target, "peerfed.core"):
        return "peerfed code outside peerfed.core"
    return None


def averaging_rule(target: str) -> str | None:
    if target.split(".")[0] in IO_FRAMEWORKS:
        return "an I/O framework"
    if any(_within(target, p) for p in ABOVE_AVERAGING):
        return "a layer above averaging"
    return None


def violations(path: Path, rule: Callable[[str], str | None], root: Path = ROOT) -> list[str]:
    module = module_name(path, root)
    found = imported_names(path.read_text(encoding="utf-8"), module,
                           is_package=path.name == "__init__.py")
    problems = []
    for line, target in found:
        why = rule(target)
        if why:
            problems.append(f"{module} ({path.relative_to(root)}:{line}) imports {target}: {why}")
    return problems


def test_core_imports_no_io_no_torch_nothing_above() -> None:
    files = sorted((PACKAGE / "core").rglob("*.py"))
    names = {module_name(p) for p in files}
    # Guard against a vacuous pass (wrong folder, renamed package).
    assert {"peerfed.core", "peerfed.core.envelope", "peerfed.core.peerid",
            "peerfed.core.manifest", "peerfed.core.framing", "peerfed.core.errors"} <= names
    problems = [p for f in files for p in violations(f, core_rule)]
    assert not problems, "layering rule broken:\n" + "\n".join(problems)


def test_averaging_imports_no_io() -> None:
    path = PACKAGE / "averaging.py"
    if not path.exists():
        pytest.skip("peerfed/averaging.py does not exist yet")
    problems = violations(path, averaging_rule) + violations(PACKAGE / "clipping.py", averaging_rule)
    assert not problems, "layering rule broken:\n" + "\n".join(problems)


BAD_SOURCE = '''
import json
import asyncio.events
from peerfed.core import errors
from . import peers
from .. import config
from ..net.p2p import Host

def later():
    import torch
    from trio import sleep
    importlib.import_module("libp2p.peer.id")
    __import__("socket")

if TYPE_CHECKING:
    from peerfed.ops import api
'''


def test_checker_finds_every_kind_of_import(tmp_path: Path) -> None:
    found = imported_names(BAD_SOURCE, "peerfed.core.example")
    targets = [t for _, t in found]
    assert "peerfed.core.peers" in targets and "peerfed.config" in targets
    assert "peerfed.net.p2p.Host" in targets
    flagged = {t for t in targets if core_rule(t)}
    assert flagged == {"asyncio.events", "peerfed.config", "peerfed.net.p2p.Host", "torch",
                       "trio.sleep", "libp2p.peer.id", "socket", "peerfed.ops.api"}
    assert not core_rule("json") and not core_rule("peerfed.core.errors")
    assert not core_rule("msgpack") and not core_rule("asyncio_helpers")
    # A package's own relative imports resolve against itself.
    assert imported_names("from .errors import X", "peerfed.core", is_package=True) == [
        (1, "peerfed.core.errors.X")]
    # On a file: one message per bad import, naming the module, the line and the import.
    bad = tmp_path / "peerfed" / "core" / "example.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(BAD_SOURCE, encoding="utf-8")
    messages = violations(bad, core_rule, root=tmp_path)
    assert len(messages) == len(flagged)
    assert "peerfed.core.example (peerfed/core/example.py:3) imports asyncio.events" in messages[0]
    assert any("example.py:10) imports torch" in m for m in messages)
    assert averaging_rule("torch") is None and averaging_rule("aiohttp.web")
    assert averaging_rule("peerfed.net.exchange") and not averaging_rule("peerfed.core.manifest")


# -- the sibling rule and circles ----------------------------------------------------------

DRIVERS = ("peerfed.net", "peerfed.train", "peerfed.ops")
# What every layer may use: the package root (__version__) and the bottom helpers.
BOTTOM = ("peerfed.errors", "peerfed.serving")


def driver_rule(own: str) -> Callable[[str], str | None]:
    """For modules of driver ``own``: only core, averaging, the bottom helpers and itself."""
    def rule(target: str) -> str | None:
        if not _within(target, "peerfed") or target == "peerfed.__version__":
            return None
        allowed = (own, "peerfed.core", "peerfed.averaging", "peerfed.clipping", *BOTTOM)
        if any(_within(target, a) for a in allowed):
            return None
        if any(_within(target, d) for d in DRIVERS):
            return "a sibling driver (drivers only meet in the composition root)"
        return "a layer above the drivers"
    return rule


def bottom_rule(target: str) -> str | None:
    if _within(target, "peerfed") and target != "peerfed.__version__" \
            and not any(_within(target, b) for b in ("peerfed.core", *BOTTOM)):
        return "peerfed code above the bottom helpers"
    return None


@pytest.mark.parametrize("driver", DRIVERS)
def test_drivers_import_no_sibling_and_nothing_above(driver: str) -> None:
    files = sorted((PACKAGE / driver.split(".")[1]).rglob("*.py"))
    assert len(files) >= 3, f"{driver} looks empty: wrong folder?"
    problems = [p for f in files for p in violations(f, driver_rule(driver))]
    assert not problems, "layering rule broken:\n" + "\n".join(problems)


def test_bottom_helpers_import_only_the_core() -> None:
    problems = [p for name in BOTTOM
                for p in violations(PACKAGE / f"{name.split('.')[1]}.py", bottom_rule)]
    assert not problems, "layering rule broken:\n" + "\n".join(problems)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the peerfed modules it imports (``from m import name`` counts as m)."""
    files = sorted((root / "peerfed").rglob("*.py"))
    modules = {module_name(f, root): f for f in files}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for _, target in imported_names(path.read_text(encoding="utf-8"), module,
                                        is_package=path.name == "__init__.py"):
            while target and target not in modules:  # "a.b.name" -> the module "a.b"
                target = target.rpartition(".")[0]
            if target and target != module and target != "peerfed":
                targets.add(target)
        graph[module] = targets
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_circle() -> None:
    graph = import_graph()
    assert "peerfed.daemon" in graph and graph["peerfed.daemon"], "import graph looks empty"
    circle = find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle or [])


def test_checker_sees_sideways_arrows_and_circles() -> None:
    net = driver_rule("peerfed.net")
    assert net("peerfed.train.shared.TrainerUnavailable") and net("peerfed.ops.api.serve")
    assert net("peerfed.daemon") and net("peerfed.config.Config")
    assert not net("peerfed.core.manifest") and not net("peerfed.errors.TrainerUnavailable")
    assert not net("peerfed.net.transfer") and not net("peerfed.__version__")
    assert driver_rule("peerfed.train")("peerfed.net.exchange")
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
