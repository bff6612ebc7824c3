"""The README's set-up commands stay true: CI runs the same test command."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_starts_with_two_setup_commands_demo_then_tests() -> None:
    demo, tests = setup_commands()
    for command in (demo, tests):
        assert "gcc libgmp-dev" in command
        assert "pip install torch==2.13.0" in command
    assert demo.rstrip().endswith("peerfed demo --out demo-out")
    assert tests.rstrip().endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    _, tests = setup_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/pip install -q torch==2.13.0" in ci
    assert ".venv/bin/pip install -q -e '.[test]'" in ci
    test_command = tests.rsplit("&& ", 1)[1].strip()
    assert test_command in ci.splitlines()[-1]
