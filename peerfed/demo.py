"""`peerfed demo`: a real swarm on 127.0.0.1 next to its two baselines (design.md section 6).

N daemons, each a separate process with a fresh key, all bootstrapped to node 0, train the same
task on Dirichlet(alpha) shards and gossip. The demo watches every node's /status, stops them
with SIGTERM, trains the all-reduce and local-only baselines (here and in one helper process),
and writes report.json and accuracy.png. Every accuracy reported is a node's own evaluation of
its own model on the test set, read after the end of training. It prints a line every few
seconds while the daemons start and while the baselines train; the clock of the curves and the
progress lines starts when every node is up. `--device` is every node's train.device and the
baselines' device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from peerfed.demo_report import (
    DemoSettings,
    DemoTraining,
    NodeView,
    build_report,
    fmt_acc,
    fmt_bytes,
    plot_accuracy,
    print_summary,
)
from peerfed.errors import ExitCode

NETWORK = "peerfed-demo"
PLAIN_LINE_EVERY_S = 5.0  # not a terminal: one progress line this often


def parse_alpha(text: str) -> float | None:
    if text.lower() == "iid":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number nor 'iid': {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"alpha must be > 0 (or 'iid'), got {text}")
    return value


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    d, t = DemoSettings(), DemoTraining()
    parser.add_argument("--nodes", type=positive(int), default=d.nodes, help=f"daemons to start (default {d.nodes})")
    parser.add_argument("--task", default=d.task, help=f"task to train (default {d.task})")
    parser.add_argument("--alpha", type=parse_alpha, default=d.alpha, metavar="A|iid",
                        help=f"Dirichlet alpha of the label split, or 'iid' (default {d.alpha})")
    parser.add_argument("--duration", type=positive(float), default=d.duration, metavar="S",
                        help=f"seconds of training once every node is up (default {d.duration:.0f})")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="write report.json, accuracy.png and the nodes' homes and logs here "
                             "(default: a new temporary folder for the results; homes removed)")
    parser.add_argument("--seed", type=int, default=t.seed, help=f"model init and batch order seed (default {t.seed})")
    parser.add_argument("--exchange-interval", type=positive(float), default=d.exchange_interval, metavar="S",
                        help=f"seconds between a node's exchanges (default {d.exchange_interval})")
    parser.add_argument("--encoding", choices=("auto", "float32", "float16", "bfloat16", "int8"), default=d.encoding,
                        help=f"every node's exchange.encoding (default {d.encoding})")
    parser.add_argument("--lr", type=positive(float), default=t.lr, help=f"learning rate (default {t.lr})")
    parser.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default=t.lr_schedule,
                        help=f"decay of the lr over the duration (default {t.lr_schedule})")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default=t.device,
                        help=f"train.device of every node, and the baselines' (default {t.device}; "
                             f"auto: cuda, then mps, then cpu)")


def cmd_demo(args: argparse.Namespace) -> int:
    training = DemoTraining(seed=args.seed, lr=args.lr, lr_schedule=args.lr_schedule, device=args.device)
    settings = DemoSettings(nodes=args.nodes, task=args.task, alpha=args.alpha, duration=args.duration,
                            exchange_interval=args.exchange_interval, training=training, encoding=args.encoding)
    return run_demo(settings, args.out)


# ---------------------------------------------------------------- the run


def run_demo(settings: DemoSettings, out: Path | None, console: Console | None = None) -> int:
    from peerfed.baselines import set_baseline_threads

    set_baseline_threads(1)  # before any torch op in this process
    console = console or Console()
    results = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="peerfed-demo-"))
    results.mkdir(parents=True, exist_ok=True)
    homes = results / "nodes" if out is not None else Path(tempfile.mkdtemp(prefix="peerfed-demo-homes-"))
    if out is not None and not clear_old_homes(homes):
        console.print(f"peerfed demo: {homes} holds something else than an earlier demo's nodes; "
                      "choose another --out", markup=False)
        return int(ExitCode.EXISTS)
    # The daemons run in their own sessions (Ctrl+C in a terminal does not reach them): on
    # Ctrl+C or SIGTERM the demo itself stops them.
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return _run(settings, results, homes, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: the nodes were stopped[/]")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if out is None:
            shutil.rmtree(homes, ignore_errors=True)
            if not (results / "report.json").exists():  # interrupted: nothing worth keeping
                shutil.rmtree(results, ignore_errors=True)


def clear_old_homes(homes: Path) -> bool:
    """Remove DIR/nodes of an earlier demo; False (and touch nothing) if it holds anything else."""
    if not homes.exists():
        return True
    if not homes.is_dir() or not all(p.is_dir() and p.name.startswith("node") for p in homes.iterdir()):
        return False
    shutil.rmtree(homes)
    return True


def _run(settings: DemoSettings, results: Path, homes: Path, console: Console) -> int:
    from peerfed.localswarm import LocalSwarm

    started = time.monotonic()
    with LocalSwarm(homes, network=NETWORK) as swarm:
        try:
            nodes = [swarm.add_node(settings=settings.node_config(i)) for i in range(settings.nodes)]
            views = [NodeView(n.index, n.peer_id) for n in nodes]
            console.print(f"starting {settings.nodes} daemons on 127.0.0.1 (homes in {homes}, "
                          f"device {settings.training.device}) ...")
            swarm.start_all(wait=False)
            try:
                wait_all_up(swarm, 180.0, console)
            except (RuntimeError, TimeoutError) as exc:  # it died or hung: the message has its log
                console.print("[red]a node did not start:[/]")
                console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
                swarm.stop_all()
                return int(ExitCode.INTERNAL)
            up_s = time.monotonic() - started
            t0 = time.time()  # the curves' zero: every node is up and training
            console.print(f"all {settings.nodes} nodes up after {up_s:.1f} s; training for {settings.duration:.0f} s")
            console.print(f"dashboard of node 0: http://127.0.0.1:{nodes[0].api_port}/", highlight=False)
            watch(swarm, views, settings, t0, console)
            final = read_final(swarm, views, settings, t0, console)
        except BaseException:
            console.print("stopping the nodes ...")
            swarm.stop_all()  # SIGTERM first, also on Ctrl+C; the context manager kills leftovers
            raise
        # Stop the daemons while the baselines train: their shutdown is mostly waiting.
        stopper = threading.Thread(target=lambda: [setattr(v, "exit_code", c) for v, c in zip(views, swarm.stop_all())])
        stopper.start()
        try:
            baselines = run_baselines(settings, views, console)
        finally:
            stopper.join()
    report = build_report(settings, views, final, baselines, up_s, time.monotonic() - started)
    (results / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_accuracy(results / "accuracy.png", views, baselines, settings, ended_at=final["ended_at"])
    print_summary(console, report, results)
    return int(ExitCode.OK) if report["clean_exit"] else int(ExitCode.INTERNAL)


def wait_all_up(swarm: Any, timeout: float, console: Console) -> None:
    """Wait until every daemon answers /healthz, with a line every few seconds saying how many
    are up; RuntimeError (with its log) if one exits, TimeoutError if one does not come up."""
    started = time.monotonic()
    next_line = started + PLAIN_LINE_EVERY_S
    pending = list(swarm.nodes)
    with ThreadPoolExecutor(len(pending)) as pool:
        while pending:
            for node in pending:
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"node {node.index} exited with {node.process.returncode}:\n{node.log_tail()}")
            pending = [n for n, up in zip(pending, pool.map(lambda n: n.is_up(), pending), strict=True) if not up]
            now = time.monotonic()
            if pending and now - started > timeout:
                slow = pending[0]
                raise TimeoutError(f"node {slow.index} did not come up in {timeout:.0f} s:\n{slow.log_tail()}")
            if pending and now >= next_line:
                console.print(f"  {len(swarm.nodes) - len(pending)}/{len(swarm.nodes)} nodes up after "
                              f"{now - started:.0f} s (loading torch and the task) ...")
                next_line = now + PLAIN_LINE_EVERY_S
            if pending:
                time.sleep(0.2)


def poll_all(swarm: Any, views: list[NodeView], t0: float, pool: ThreadPoolExecutor, console: Console) -> None:
    """Refresh every view from its node's /status; report nodes that died."""
    def fetch(i: int) -> dict[str, Any] | None:
        try:
            return swarm.nodes[i].get("/status", timeout=2.0)
        except Exception:  # noqa: BLE001 - a slow or gone node: keep its last status
            return None

    for view, status in zip(views, pool.map(fetch, range(len(views)))):
        if status is not None:
            view.observe(status, t0)
        process = swarm.nodes[view.index].process
        if view.died is None and process is not None and process.poll() is not None:
            view.died = process.returncode
            console.print(f"[red]node {view.index} ({view.peer_id}) exited with code {view.died}; "
                          f"its log ends with:[/]")
            console.print(swarm.nodes[view.index].log_tail(20), markup=False, highlight=False, soft_wrap=True)


def watch(swarm: Any, views: list[NodeView], settings: DemoSettings, t0: float, console: Console) -> None:
    end = time.monotonic() + settings.duration
    with ThreadPoolExecutor(len(views)) as pool:
        if console.is_terminal:
            with Live(progress_table(views, settings, t0), console=console, refresh_per_second=2) as live:
                while time.monotonic() < end:
                    poll_all(swarm, views, t0, pool, console)
                    live.update(progress_table(views, settings, t0))
                    time.sleep(0.5)
        else:
            next_line = 0.0
            while time.monotonic() < end:
                poll_all(swarm, views, t0, pool, console)
                if time.monotonic() >= next_line:
                    print(progress_line(views, t0), flush=True)
                    next_line = time.monotonic() + PLAIN_LINE_EVERY_S
                time.sleep(0.5)


def read_final(swarm: Any, views: list[NodeView], settings: DemoSettings, t0: float, console: Console) -> dict[str, Any]:
    """Wait until every live node evaluated its model after the end of training, so that the
    accuracy read includes every exchange up to then."""
    ended = time.time()
    deadline = time.monotonic() + 2 * settings.training.eval_interval + 10.0
    with ThreadPoolExecutor(len(views)) as pool:
        while True:
            poll_all(swarm, views, t0, pool, console)
            stale = [v.index for v in views if v.died is None and fresh_age(v, ended) is None]
            if not stale or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    if stale:
        console.print(f"[yellow]no evaluation after the end from node(s) {stale}: their last one is used[/]")
    return {"ended_at": ended - t0, "stale": stale}


def fresh_age(view: NodeView, ended: float) -> float | None:
    """Seconds between the end of training and the node's last evaluation; None if before."""
    at = (view.status.get("trainer") or {}).get("evaluated_at")
    return at - ended if at is not None and at > ended else None


def run_baselines(settings: DemoSettings, views: list[NodeView], console: Console) -> dict[str, Any]:
    from peerfed.baselines import init_baseline_worker, train_allreduce, train_local_one
    from peerfed.train.tasks import TrainSettings

    t = settings.training
    train = TrainSettings(task=settings.task, device=t.device, batch_size=t.batch_size, lr=t.lr, seed=t.seed,
                          options=settings.task_options())
    samples = [int(v.status.get("samples", 0)) for v in views]
    console.print(f"training the baselines on {sum(samples):,} samples: all-reduce (one model) here, "
                  f"local-only ({len(samples)} models, one per node) in a helper process ...")
    started = time.monotonic()
    local_done: list[int] = []  # appended to by the pool's result thread
    # local-only in a second process, all-reduce here: one core each. Leaving the block
    # terminates the helper (also on Ctrl+C, which the helper ignores from birth).
    with ignoring_sigint():
        pool = mp.get_context("spawn").Pool(1, initializer=init_baseline_worker)
    with pool, ticking(lambda: f"  baselines: {time.monotonic() - started:.0f} s, local-only "
                               f"{len(local_done)}/{len(samples)} models trained ...", console):
        local_later = [pool.apply_async(train_local_one, (train, settings.nodes, i, n, settings.local_only_max_steps),
                                        callback=lambda _, i=i: local_done.append(i))
                       for i, n in enumerate(samples)]
        allreduce = train_allreduce(train, settings.nodes, sum(samples))
        console.print(f"  all-reduce: {fmt_acc(allreduce.accuracy)} after {allreduce.steps:,} steps of "
                      f"{allreduce.batch_size} ({allreduce.seconds:.0f} s)")
        local = [result.get() for result in local_later]
    console.print(f"  local-only: mean {fmt_acc(sum(r.accuracy for r in local) / len(local))} "
                  f"({time.monotonic() - started:.0f} s)")
    return {"allreduce": allreduce, "local_only": local}


@contextlib.contextmanager
def ticking(line: Callable[[], str], console: Console, every: float | None = None) -> Iterator[None]:
    """Print `line()` every `every` seconds (default PLAIN_LINE_EVERY_S) from a helper thread
    while the block runs."""
    every = PLAIN_LINE_EVERY_S if every is None else every
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(every):
            console.print(line(), markup=False, highlight=False)

    thread = threading.Thread(target=tick, name="demo-ticker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def ignoring_sigint() -> Iterator[None]:
    """Processes started in here inherit an ignored SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- output


def progress_table(views: list[NodeView], settings: DemoSettings, t0: float) -> Table:
    alpha = "iid" if settings.alpha is None else settings.alpha
    table = Table(title=f"peerfed demo: {settings.nodes} nodes, {settings.task}, alpha {alpha}, "
                        f"t = {time.time() - t0:.0f} s")
    for name in ("node", "step", "lr", "accuracy", "exchanges ok/refused/failed", "sent"):
        table.add_column(name, justify="left" if name == "node" else "right")
    for v in views:
        s, ex = v.status, v.exchanges()
        lr = (s.get("trainer") or {}).get("lr")
        table.add_row(f"{v.index} {v.peer_id[-8:]}" + (" [red]dead[/]" if v.died is not None else ""),
                      f"{s.get('step', 0):,}", "-" if lr is None else f"{lr:.4f}", fmt_acc(v.accuracy),
                      f"{ex['ok']}/{ex['refused']}/{ex['failed']}", fmt_bytes(s.get("bytes_sent", 0)))
    return table


def progress_line(views: list[NodeView], t0: float) -> str:
    accs = [v.accuracy for v in views if v.accuracy is not None and v.died is None]
    ok = sum(v.exchanges()["ok"] for v in views)
    steps = sum(int(v.status.get("step", 0)) for v in views)
    mean = fmt_acc(sum(accs) / len(accs)) if accs else "-"
    return (f"t={time.time() - t0:5.0f}s  mean {mean}  worst {fmt_acc(min(accs) if accs else None)}  "
            f"steps {steps:,}  exchanges ok {ok}  dead {sum(v.died is not None for v in views)}")


def main(argv: list[str] | None = None) -> int:
    """`python -m peerfed.demo ...` until the CLI registers the command."""
    parser = argparse.ArgumentParser(prog="peerfed demo", description=__doc__.splitlines()[0])
    add_demo_arguments(parser)
    return cmd_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
