"""The upload cap holds on a shaped link (issue 10): a sender paced by net/pacing.py at
exchange.max_upload_rate pushes through a veth pair between two network namespaces of our
own, shaped with tc (tbf) to a faster link; the receiver meters the payload that arrives and
the sender's veth counts what went on the wire (headers included: the cap is the wire's). Root
only (namespaces and tc); nothing leaves the two namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAP = "8Mbit"  # the node's max_upload_rate: 1 MB/s of payload
CAP_BPS = 1_000_000.0
LINK = "20mbit"  # the shaped link, faster than the cap: the cap is what limits
SECONDS = 14.0
PORT = 7931
A_IP, B_IP = "10.231.7.1", "10.231.7.2"

RECEIVER = textwrap.dedent("""
    import asyncio, json, sys, time
    from aiohttp import web

    async def main():
        marks = []
        done = asyncio.Event()

        async def take(request):
            got, start = 0, time.monotonic()
            marks.append((0.0, 0))
            while True:
                data, _ = await request.content.readchunk()
                if not data:
                    break
                got += len(data)
                marks.append((time.monotonic() - start, got))
            done.set()
            return web.Response(text="ok")

        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/take", take)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, sys.argv[1], int(sys.argv[2])).start()
        print("ready", flush=True)
        await asyncio.wait_for(done.wait(), 120)
        print(json.dumps(marks), flush=True)
        await runner.cleanup()

    asyncio.run(main())
""")

SENDER = textwrap.dedent("""
    import asyncio, sys
    import aiohttp
    from peerfed.core.rates import parse_rate
    from peerfed.net.pacing import Pacing
    from peerfed.net.transfer import StreamPayload

    async def main():
        cap, size, url = parse_rate(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        pacing = Pacing(max_upload_rate=cap)
        guard = pacing.guard("receiver", size)
        payload = memoryview(bytearray(size))

        async def produce(writer):
            await guard.writer(writer).write(payload)

        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=StreamPayload(size, produce),
                                    headers={"Content-Length": str(size)}) as response:
                assert response.status == 200, response.status
        print("sent", flush=True)

    asyncio.run(main())
""")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


@pytest.fixture
def shaped_pair() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("needs root: it makes two network namespaces and shapes their link with tc")
    if not (shutil.which("ip") and shutil.which("tc")):
        pytest.skip("needs iproute2 (ip, tc)")
    a, b = f"pf-cap-a-{os.getpid()}", f"pf-cap-b-{os.getpid()}"
    try:
        _run("ip", "netns", "add", a)
        _run("ip", "netns", "add", b)
        _run("ip", "link", "add", "pfcapa", "netns", a, "type", "veth", "peer", "name", "pfcapb", "netns", b)
        for ns, dev, ip in ((a, "pfcapa", A_IP), (b, "pfcapb", B_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", LINK,
                 "burst", "32kbit", "latency", "50ms")
        yield a, b
    finally:
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def _tx_bytes(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", dev], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])


def _window_max(marks: list[tuple[float, int]], window: float) -> float:
    """The highest bytes per second over any `window` seconds of the receiver's marks."""
    best, j = 0.0, 0
    for i, (t, got) in enumerate(marks):
        while j < i and marks[j][0] < t - window:
            j += 1
        if t - marks[j][0] >= window * 0.999:
            best = max(best, (got - marks[j][1]) / (t - marks[j][0]))
    return best


@pytest.mark.slow
def test_the_upload_cap_holds_within_5_percent_on_a_shaped_link(shaped_pair: tuple[str, str]) -> None:
    a, b = shaped_pair
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    receiver = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", RECEIVER, B_IP, str(PORT)],
                                stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
        size = int(CAP_BPS * SECONDS)
        wire_before = _tx_bytes(a, "pfcapa")
        sent = subprocess.run(["ip", "netns", "exec", a, sys.executable, "-c", SENDER, CAP, str(size),
                               f"http://{B_IP}:{PORT}/take"], capture_output=True, text=True, timeout=120, env=env,
                              check=False)
        assert sent.returncode == 0, sent.stderr[-2000:]
        wire = _tx_bytes(a, "pfcapa") - wire_before
        marks = [tuple(m) for m in json.loads(receiver.stdout.readline())]
    finally:
        receiver.kill()
        receiver.wait(10)
    duration, total = marks[-1]
    average, wire_average = total / duration, wire / duration
    highest_10s = _window_max(marks, 10.0)  # type: ignore[arg-type]
    print(f"cap {CAP_BPS:.0f} B/s on a {LINK} link: {total} payload bytes in {duration:.2f} s = {average:.0f} B/s "
          f"({average / CAP_BPS:.3f}x), highest 10 s window {highest_10s:.0f} B/s ({highest_10s / CAP_BPS:.3f}x); "
          f"on the wire {wire} bytes = {wire_average:.0f} B/s ({wire_average / CAP_BPS:.3f}x)")
    assert total == size
    assert highest_10s <= 1.0 * CAP_BPS  # the headers fit under the cap, not on top of it
    assert wire_average <= 1.05 * CAP_BPS
    assert wire_average >= 0.95 * CAP_BPS  # the cap, not something slower, is what limited it
