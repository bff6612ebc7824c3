"""The local dashboard (GET / on the local API) as an operator sees it: real daemons on
127.0.0.1, the page rendered by a real headless Chromium, and assertions on what its scripts
drew (peer rows, accuracy, chart paths with points), not only on the HTML that was served.

Chromium is driven with its own command line (--dump-dom for the DOM after the scripts ran,
--screenshot for a picture), so no Python dependency is added. The screenshot is kept at
$PEERFED_TEST_ARTIFACTS/dashboard.png (default: out/dashboard.png in the repository).
Without a chromium binary the browser tests skip; .ci/run installs it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from peerfed.localswarm import LocalNode, LocalSwarm
from peerfed.ops.api import dashboard_page
from peerfed.ops.history import History, sample_of

from swarmtools import wait_until

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("PEERFED_TEST_ARTIFACTS") or ROOT / "out")
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH "
                                    "(apt-get install chromium; .ci/run does)")
# Two trainers that exchange every second and evaluate every second, and one node that does
# not train (its page shows peers only).
TRAIN = {"train.threads": 1, "train.init": "local", "train.eval_interval": 1.0, "exchange.interval": 1.0}
SAMPLES_WANTED = 3


# ---------------------------------------------------------------- the history, alone


def status_at(step: int, accuracy: float | None, sent: int, ok: int, last_peer: str | None = None) -> dict:
    status: dict = {"peers_connected": 1, "step": step, "metrics": {"accuracy": accuracy, "loss": 0.5},
                    "loss": 0.25, "bytes_sent": sent, "bytes_received": sent,
                    "exchanges": {"ok": ok, "busy": 0, "refused": 0, "failed": 0}}
    if last_peer:
        status["last_exchange"] = {"peer_id": last_peer, "outcome": "ok", "at": float(step)}
    return status


def test_history_samples_at_its_interval_and_stays_bounded_over_the_whole_run() -> None:
    history = History(interval=2.0, capacity=8)
    for second in range(100):
        history.observe(status_at(second, 0.5, 100 * second, second), now=float(second))
        assert len(history) <= 8
    snap = json.loads(json.dumps(history.snapshot(now=99.0), allow_nan=False))
    times = snap["samples"]["t"]
    assert times[0] == 0.0 and times[-1] >= 96.0        # spans the whole run
    assert times == sorted(times) and len(times) >= 4
    assert snap["interval_s"] > 2.0                     # compacted: the grain got coarser
    assert snap["samples"]["bytes_sent"] == [100 * t for t in times]  # cumulative counters stay exact


def test_history_remembers_each_peers_last_exchange_and_reads_missing_values_as_null() -> None:
    history = History(interval=2.0, capacity=8)
    history.observe(status_at(1, float("nan"), 0, 0, last_peer="A"), now=1.0)
    history.observe(status_at(2, 0.9, 0, 1, last_peer="B"), now=2.0)
    history.observe(status_at(5, 0.9, 0, 2, last_peer="A"), now=5.0)
    snap = history.snapshot(now=5.0)
    assert snap["samples"]["accuracy"] == [None, 0.9]   # NaN is not JSON: it reads as no value
    assert {p: e["at"] for p, e in snap["last_exchange_by_peer"].items()} == {"A": 5.0, "B": 2.0}
    idle = sample_of({"peers_connected": 3}, now=0.0)   # a node that does not train
    assert (idle.step, idle.accuracy, idle.bytes_sent, idle.ok, idle.peers) == (None, None, 0, 0, 3)


def test_the_page_loads_nothing_from_elsewhere() -> None:
    page = dashboard_page().decode()
    assert not re.search(r"\b(src|href)\s*=|@import|url\(", page)
    assert re.findall(r"https?://[^\s\"'`]+", page) == ["http://www.w3.org/2000/svg"]  # a namespace name


# ---------------------------------------------------------------- the page in a browser


class Rendered(HTMLParser):
    """What a DOM dump shows: every element's attributes, and the text of leaf elements by id."""

    def __init__(self, dom: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open_id: str | None = None
        self.feed(dom)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.elements.append((tag, values))
        self._open_id = values.get("id")
        if self._open_id:
            self.text[self._open_id] = ""

    def handle_data(self, data: str) -> None:
        if self._open_id:
            self.text[self._open_id] += data

    def handle_endtag(self, tag: str) -> None:
        self._open_id = None

    def find(self, tag: str, **attrs: str) -> list[dict[str, str]]:
        """Elements by tag and exact attributes (data_points= is data-points, class_= is class)."""
        return [a for t, a in self.elements
                if t == tag and all(a.get(k.rstrip("_").replace("_", "-")) == v for k, v in attrs.items())]


def chromium(url: str, profile: Path, *args: str, timeout: float = 60.0) -> str:
    """Run headless Chromium on `url` with `args`; its stdout. The whole process group is
    killed on a timeout (Chromium starts a tree of helpers)."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", "--disable-extensions",
               "--disable-background-networking", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--virtual-time-budget=4000", *args, url]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish within {timeout} s on {url}") from None
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{err[-2000:]}"
    return out


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSwarm]:
    """Node 0 and node 1 train and exchange; node 2 does not train. Stopped even on failure."""
    with LocalSwarm(tmp_path_factory.mktemp("dashboard")) as swarm:
        try:
            for settings in (TRAIN, TRAIN, {"train.enabled": False}):
                swarm.add_node(settings=settings)
            swarm.start_all(timeout=60)
            yield swarm
        finally:
            swarm.stop_all()


def wait_for_history(node: LocalNode) -> dict:
    """Until node's /history holds SAMPLES_WANTED samples with accuracy and losses, and an
    exchange went ok."""
    seen: dict = {}

    def ready() -> bool:
        seen.update(node.get("/history"))
        samples = seen["samples"]
        evaluated = all(sum(v is not None for v in samples[key]) >= SAMPLES_WANTED
                        for key in ("accuracy", "test_loss", "train_loss"))
        return evaluated and bool(samples["ok"]) and samples["ok"][-1] >= 1

    wait_until(ready, 60, f"node {node.index}'s history to hold {SAMPLES_WANTED} evaluations and an exchange")
    return seen


@needs_chromium
def test_dashboard_renders_peers_accuracy_and_charts_with_history(swarm: LocalSwarm, tmp_path: Path) -> None:
    node, trainer_peer, idle_peer = swarm.nodes
    wait_for_history(node)
    url = f"http://127.0.0.1:{node.api_port}/"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]

    dom = chromium(url, tmp_path / "profile", "--dump-dom")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dashboard-dom.html").write_text(dom)
    page = Rendered(dom)
    assert page.text["live"].startswith("live"), page.text["live"]
    assert page.text["node-id"] == node.peer_id
    assert "no-training" not in page.find("body")[0].get("class", "")
    rows = {row["data-peer"]: row["data-state"] for row in page.find("tr") if "data-peer" in row}
    assert rows == {trainer_peer.peer_id: "connected", idle_peer.peer_id: "connected"}, rows
    accuracy = float(page.find("div", id="accuracy")[0]["data-value"])
    assert 0.0 <= accuracy <= 1.0
    assert re.fullmatch(r"\d{1,3}\.\d %", page.text["accuracy"]), page.text["accuracy"]
    assert int(page.text["ex-ok"].replace(",", "")) >= 1
    # The charts drew the server's history at once (one load, no waiting in the page).
    for series, at_least in (("accuracy", SAMPLES_WANTED), ("test_loss", SAMPLES_WANTED),
                             ("train_loss", SAMPLES_WANTED), ("sent_rate", 1), ("received_rate", 1), ("ok", 2)):
        paths = page.find("path", data_series=series)
        assert len(paths) == 1, f"no chart line for {series}"
        points = int(paths[0]["data-points"])
        assert points >= at_least, f"{series}: {points} points"
        coords = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", paths[0]["d"])]
        assert len(coords) == 2 * points and all(math.isfinite(v) for v in coords)

    screenshot = ARTIFACTS / "dashboard.png"
    screenshot.unlink(missing_ok=True)
    chromium(url, tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1280,900")
    assert png_size(screenshot) == (1280, 900)
    assert screenshot.stat().st_size > 30_000, "the screenshot is nearly blank"

    status = subprocess.run([sys.executable, "-m", "peerfed", "status", "--home", str(node.home)],
                            capture_output=True, text=True, timeout=60)
    assert re.search(rf"^dashboard\s+{re.escape(url)}$", status.stdout, re.MULTILINE), status.stdout


@needs_chromium
def test_a_node_that_does_not_train_shows_its_peers(swarm: LocalSwarm, tmp_path: Path) -> None:
    trainer, other_trainer, node = swarm.nodes
    wait_until(lambda: len(node.connected_peers()) == 2, 30, "the idle node to see both trainers")
    started = time.monotonic()
    page = Rendered(chromium(f"http://127.0.0.1:{node.api_port}/", tmp_path / "profile", "--dump-dom"))
    assert time.monotonic() - started < 30
    assert page.text["node-id"] == node.peer_id
    assert page.find("body", class_="no-training")
    rows = {row["data-peer"]: row["data-state"] for row in page.find("tr") if "data-peer" in row}
    assert rows == {trainer.peer_id: "connected", other_trainer.peer_id: "connected"}
