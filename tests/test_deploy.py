"""The deploy/ files: units that systemd accepts and rates well, and files that agree with
each other and with the code (exit codes, ports, paths).

systemd-analyze is required: if it is missing, the tests install the `systemd` package once
(root with apt-get only) and fail with a clear message when that is not possible.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from peerfed.config import load_config
from peerfed.errors import ExitCode

# Installing systemd on a fresh machine can take minutes.
pytestmark = pytest.mark.timeout(900)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SYSTEM_UNIT = DEPLOY / "peerfed.service"
USER_UNIT = DEPLOY / "peerfed-user.service"
MAX_EXPOSURE = 2.5


def _apt_install_systemd() -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "systemd"]
    if subprocess.run(install, env=env, capture_output=True, timeout=400).returncode != 0:
        # Typically a stale or empty package list (fresh containers): refresh, try again.
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300)
        subprocess.run(install, env=env, capture_output=True, timeout=400)


@pytest.fixture(scope="session")
def systemd_tools() -> dict[str, str]:
    """Paths of systemd-analyze and systemd-sysusers, installing systemd once if needed."""
    names = ("systemd-analyze", "systemd-sysusers")
    if not all(shutil.which(n) for n in names):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            _apt_install_systemd()
    found = {n: shutil.which(n) for n in names}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} not found and could not be installed (needs root and apt-get); "
            "install the systemd package to check deploy/",
            pytrace=False,
        )
    return {n: p for n, p in found.items() if p is not None}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values in file order (keys such as DeviceAllow= repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def with_existing_executable(unit: Path, executable: str, folder: Path) -> Path:
    """A copy of `unit` whose ExecStart= runs this Python instead of `executable`, which does
    not exist on a development machine (verify checks that ExecStart is executable). Every
    other line is unchanged, so verify still judges the real unit."""
    text = unit.read_text()
    assert f"ExecStart={executable} " in text
    copy = folder / unit.name
    copy.write_text(text.replace(f"ExecStart={executable} ", f"ExecStart={sys.executable} "))
    return copy


def analyze(
    tools: dict[str, str], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tools["systemd-analyze"], *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def complaints_about(result: subprocess.CompletedProcess[str], unit_name: str) -> list[str]:
    # verify also loads the host's units; only lines about ours count (unknown keys,
    # bad values, missing executables).
    return [line for line in (result.stdout + result.stderr).splitlines() if unit_name in line]


def test_system_unit_verifies(systemd_tools: dict[str, str], tmp_path: Path) -> None:
    unit = with_existing_executable(SYSTEM_UNIT, "/opt/peerfed/venv/bin/peerfed", tmp_path)
    result = analyze(systemd_tools, "verify", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints_about(result, unit.name) == []


def test_system_unit_exposure(systemd_tools: dict[str, str]) -> None:
    result = analyze(systemd_tools, "security", "--offline=yes", str(SYSTEM_UNIT))
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert match, f"no exposure level in systemd-analyze security output:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, output


def test_user_unit_verifies(systemd_tools: dict[str, str], tmp_path: Path) -> None:
    unit = with_existing_executable(USER_UNIT, "%h/.local/bin/peerfed", tmp_path)
    # A user manager needs a runtime dir even just to load units.
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    result = analyze(systemd_tools, "--user", "verify", str(unit), env={"XDG_RUNTIME_DIR": str(runtime)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert complaints_about(result, unit.name) == []


def test_sysusers_file_is_valid(systemd_tools: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run(
        [systemd_tools["systemd-sysusers"], f"--root={tmp_path}", "--dry-run", "-"],
        input=(DEPLOY / "peerfed.sysusers").read_text(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "peerfed" in result.stdout + result.stderr


def test_install_script_parses() -> None:
    script = DEPLOY / "install.sh"
    assert os.access(script, os.X_OK)
    assert "set -euo pipefail" in script.read_text()
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    if shutil.which("shellcheck"):  # extra lint where available
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=lambda p: p.name)
def test_units_match_the_exit_codes_and_keep_torch_working(unit: Path) -> None:
    settings = unit_settings(unit)
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["WatchdogSec"] == ["60"]
    prevented = {int(code) for code in settings["RestartPreventExitStatus"][0].split()}
    assert prevented == {ExitCode.USAGE, ExitCode.CONFIG, ExitCode.IDENTITY}
    # Each of these breaks torch or the GPU (see the comments in the unit).
    assert "MemoryDenyWriteExecute" not in settings
    assert "ProcSubset" not in settings
    assert settings.get("PrivateDevices", ["no"]) == ["no"]
    assert "PrivateUsers" not in settings


def test_system_unit_paths_agree_with_example_config() -> None:
    settings = unit_settings(SYSTEM_UNIT)
    env = dict(value.split("=", 1) for value in settings["Environment"])
    assert env["PEERFED_HOME"] == "/var/lib/peerfed"
    for name in ("TORCH_HOME", "XDG_CACHE_HOME", "CUDA_CACHE_PATH", "TRITON_CACHE_DIR"):
        assert env[name].startswith("/var/cache/peerfed"), name
    assert settings["StateDirectory"] == ["peerfed"]
    assert settings["CacheDirectory"] == ["peerfed"]
    assert "--config /etc/peerfed/peerfed.toml" in settings["ExecStart"][0]
    # The example must pass the real validator (extra keys are refused).
    cfg = load_config(DEPLOY / "peerfed.example.toml")
    assert cfg.identity == Path("/var/lib/peerfed/identity.key")
    assert cfg.state_dir == Path("/var/lib/peerfed")


def test_ufw_profile_opens_the_configured_ports() -> None:
    profile = configparser.ConfigParser()
    profile.read(DEPLOY / "ufw-peerfed")
    assert profile.sections() == ["peerfed"]
    app = profile["peerfed"]
    assert app["title"] and app["description"]
    cfg = load_config(DEPLOY / "peerfed.example.toml")
    p2p_port = int(re.search(r"/tcp/(\d+)", cfg.p2p.listen[0]).group(1))  # type: ignore[union-attr]
    assert app["ports"].split("|") == [f"{p2p_port}/tcp", f"{cfg.exchange.listen_port}/tcp"]
    assert app["ports"] == "7401/tcp|7402/tcp"


def test_readme_exit_code_table_matches_the_code() -> None:
    readme = (DEPLOY / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", readme, flags=re.MULTILINE))
    assert rows == {str(int(code)): code.name for code in ExitCode}
