"""The code stays readable in an afternoon (issue 13): small modules, small classes, a slim
composition root. Checked on the source with ast, like the layering rule."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peerfed"
MAX_MODULE_LINES = 400
MAX_CLASS_ATTRIBUTES = 12
MAX_DAEMON_LINES = 250
OPTIONAL = re.compile(r"\|\s*None\b|\bNone\s*\||Optional\[")  # "X | None", "Optional[X]"


def class_attributes(node: ast.ClassDef) -> set[str]:
    """Fields declared in the class body (dataclass, pydantic, NamedTuple) and every
    ``self.x`` any of its methods assigns."""
    names = {item.target.id for item in node.body
             if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assign):
            targets = sub.targets
        elif isinstance(sub, (ast.AnnAssign, ast.AugAssign)):
            targets = [sub.target]
        else:
            continue
        for target in targets:
            for element in target.elts if isinstance(target, ast.Tuple) else [target]:
                if isinstance(element, ast.Attribute) and isinstance(element.value, ast.Name) \
                        and element.value.id == "self":
                    names.add(element.attr)
    return names


def modules() -> list[Path]:
    found = sorted(PACKAGE.rglob("*.py"))
    assert len(found) > 30, "no package found: wrong folder?"
    return found


def test_no_module_over_400_lines() -> None:
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not long, "split these by responsibility:\n" + "\n".join(long)


def test_no_class_with_more_than_12_attributes() -> None:
    big = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and len(attrs := class_attributes(node)) > MAX_CLASS_ATTRIBUTES:
                big.append(f"{path.relative_to(PACKAGE)}: {node.name} has {len(attrs)}: {sorted(attrs)}")
    assert not big, "group related attributes into a part of their own:\n" + "\n".join(big)


def test_the_composition_root_is_slim_and_typed() -> None:
    source = (PACKAGE / "daemon.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) < MAX_DAEMON_LINES
    tree = ast.parse(source)
    anys = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == "Any"]
    assert not anys, f"daemon.py uses Any on lines {anys}"
    daemon = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Daemon")
    # Every part is built in __init__: no attribute that starts as None and is filled in later.
    optional = [n.lineno for n in ast.walk(daemon)
                if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant) and n.value.value is None
                or isinstance(n, ast.AnnAssign) and OPTIONAL.search(ast.unparse(n.annotation))]
    assert not optional, f"daemon.py: optional attributes on lines {optional}"


def test_the_checker_counts_fields_and_self_assignments() -> None:
    tree = ast.parse(
        "class A:\n"
        "    x: int\n"
        "    def __init__(self):\n"
        "        self.a, self.b = 1, 2\n"
        "        self.c: int = 3\n"
        "        self.c += 1\n"
        "        other.d = 4\n")
    assert class_attributes(tree.body[0]) == {"x", "a", "b", "c"}  # type: ignore[arg-type]
