"""The README's set-up commands stay true: CI runs the same test command, and each line runs
verbatim as root without sudo (containers) and as a user with sudo."""

from __future__ import annotations

import re
import shutil
import subprocess
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


def apt_part(command: str) -> str:
    """The line up to its package install (what needs root), without what follows it."""
    head, sep, _ = command.partition(" && python3 -m venv")
    assert sep, command
    return head


def test_setup_lines_run_as_root_without_sudo_and_as_a_user_with_sudo() -> None:
    for command in setup_commands():
        assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0, command
        assert not re.search(r"(^|[;&|(]\s*)sudo\s", command), f"bare sudo fails as root: {command}"
        assert "apt-get update" in apt_part(command)  # a fresh container has no package lists


def run_apt_part(tmp_path: Path, with_sudo: bool) -> list[str]:
    """Run the README's apt part with fake apt-get (and sudo) on PATH; return the calls."""
    bin_dir = tmp_path / ("with-sudo" if with_sudo else "no-sudo")
    bin_dir.mkdir()
    calls = tmp_path / f"calls-{with_sudo}"
    (bin_dir / "env").symlink_to(shutil.which("env") or "/usr/bin/env")
    fakes = {"apt-get": f'echo "apt-get $* DEBIAN_FRONTEND=${{DEBIAN_FRONTEND:-}}" >> {calls}\n'}
    if with_sudo:
        fakes["sudo"] = f'echo "sudo $1" >> {calls}\nexec "$@"\n'
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    bash = shutil.which("bash") or "/bin/bash"
    command = apt_part(setup_commands()[0])
    result = subprocess.run([bash, "-c", command], env={"PATH": str(bin_dir)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return calls.read_text().splitlines()


def test_apt_part_calls_apt_directly_without_sudo_and_through_sudo_with_it(tmp_path: Path) -> None:
    install = "apt-get install -y gcc libgmp-dev python3-venv DEBIAN_FRONTEND=noninteractive"
    assert run_apt_part(tmp_path, with_sudo=False) == ["apt-get update DEBIAN_FRONTEND=", install]
    assert run_apt_part(tmp_path, with_sudo=True) == [
        "sudo apt-get", "apt-get update DEBIAN_FRONTEND=", "sudo env", install]


def test_readme_config_examples_are_valid_configs() -> None:
    """Every ```toml block of the README, laid over the defaults, passes the config's checks
    (the home rig's whole example included: rates, share, outer step, bootstrap address)."""
    import tomllib

    from peerfed.config import parse_config

    blocks = re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    home_rig = [b for b in blocks if "max_upload_share" in b and "[merge]" in b]
    assert home_rig, "the README lost its home rig example"
    for block in blocks:
        parse_config(tomllib.loads(block), base_dir=ROOT, source="README.md")
