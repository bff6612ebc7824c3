"""What `peerfed demo` watches and leaves behind: its settings, each node's view, report.json,
accuracy.png and the summary table (demo.py runs the swarm and imports this, never the reverse)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from peerfed import __version__

DIGITS_TRAIN_SIZE = 1437  # one epoch of the built-in digits tasks
DEFAULT_DURATION = 60.0  # seconds of training once all nodes are up; the whole run fits in 3 min
LOCAL_ONLY_MAX_STEPS = 5000  # per node, to keep the run short (a lone node is still slowly learning)


@dataclass(frozen=True)
class DemoTraining:
    """How every node trains (its train.* settings), and the baselines with it."""

    seed: int = 0
    lr: float = 0.05
    batch_size: int = 32
    lr_schedule: str = "cosine"  # decays to lr_min over the demo's duration of each node's training
    lr_min: float = 0.0
    eval_interval: float = 2.0
    threads: int = 1  # per trainer: N trainers share the machine's cores
    device: str = "cpu"  # auto | cpu | cuda | mps


@dataclass(frozen=True)
class DemoSettings:
    nodes: int = 8
    task: str = "digits-mlp"
    alpha: float | None = 0.1  # None: iid shards
    duration: float = DEFAULT_DURATION
    exchange_interval: float = 0.5
    local_only_max_steps: int = LOCAL_ONLY_MAX_STEPS
    training: DemoTraining = DemoTraining()
    encoding: str = "auto"  # every node's exchange.encoding

    def task_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"alpha": "iid" if self.alpha is None else self.alpha}
        t = self.training
        if t.lr_schedule != "constant":
            options.update(lr_schedule=t.lr_schedule, lr_schedule_seconds=self.duration, lr_min=t.lr_min)
        return options

    def node_config(self, index: int) -> dict[str, Any]:
        t = self.training
        return {
            "log_level": "info", "train.task": self.task, "train.device": t.device, "train.threads": t.threads,
            "train.node_index": index, "train.node_count": self.nodes, "train.options": self.task_options(),
            "train.seed": t.seed, "train.lr": t.lr, "train.batch_size": t.batch_size,
            "train.eval_interval": t.eval_interval,
            "train.init": "local",  # same seed, same init everywhere: no state sync wait
            "exchange.interval": self.exchange_interval, "checkpoint.interval": 3600.0,
            "exchange.encoding": self.encoding,
        }

    def as_report(self) -> dict[str, Any]:
        """report.json's "settings": one flat table, as it always was."""
        t = self.training
        return {
            "nodes": self.nodes, "task": self.task, "alpha": self.alpha, "duration": self.duration, "seed": t.seed,
            "lr": t.lr, "batch_size": t.batch_size, "lr_schedule": t.lr_schedule, "lr_min": t.lr_min,
            "exchange_interval": self.exchange_interval, "eval_interval": t.eval_interval, "threads": t.threads,
            "device": t.device, "local_only_max_steps": self.local_only_max_steps,
            "task_options": self.task_options(), "encoding": self.encoding,
        }


@dataclass
class NodeView:
    """What the demo knows about one node: its latest /status and its accuracy curve."""

    index: int
    peer_id: str
    status: dict[str, Any] = field(default_factory=dict)
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds since training began, accuracy)
    died: int | None = None  # exit code, when it exited on its own
    exit_code: int | None = None

    def observe(self, status: dict[str, Any], t0: float) -> None:
        self.status = status
        trainer = status.get("trainer") or {}
        at, accuracy = trainer.get("evaluated_at"), (status.get("metrics") or {}).get("accuracy")
        if at is not None and accuracy is not None and (not self.curve or at - t0 > self.curve[-1][0]):
            self.curve.append((at - t0, float(accuracy)))

    @property
    def accuracy(self) -> float | None:
        return (self.status.get("metrics") or {}).get("accuracy")

    def exchanges(self) -> dict[str, int]:
        ex = self.status.get("exchanges") or {}
        return {k: int(ex.get(k, 0)) for k in ("ok", "refused", "failed", "busy")}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def build_report(settings: DemoSettings, views: list[NodeView], final: dict[str, Any], baselines: dict[str, Any],
                 startup_s: float, total_s: float) -> dict[str, Any]:
    allreduce, local = baselines["allreduce"], baselines["local_only"]
    alive = [v for v in views if v.died is None and v.accuracy is not None]
    accs = [float(v.accuracy) for v in alive]  # type: ignore[arg-type]
    samples = sum(int(v.status.get("samples", 0)) for v in views)
    mean = sum(accs) / len(accs) if accs else 0.0
    worst = min(accs) if accs else 0.0
    local_mean = sum(r.accuracy for r in local) / len(local) if local else 0.0
    train_size = DIGITS_TRAIN_SIZE if settings.task.startswith("digits") else None
    nodes = []
    for v in views:
        trainer = v.status.get("trainer") or {}
        nodes.append({
            "index": v.index, "peer_id": v.peer_id, "accuracy": v.accuracy,
            "loss": (v.status.get("metrics") or {}).get("loss"), "step": v.status.get("step", 0),
            "samples": v.status.get("samples", 0), "shard_size": trainer.get("num_samples"),
            "bytes_sent": v.status.get("bytes_sent", 0), "bytes_received": v.status.get("bytes_received", 0),
            "exchanges": v.exchanges(), "evaluated_step": trainer.get("evaluated_step"),
            "final_lr": trainer.get("lr"), "died": v.died is not None, "exit_code": v.exit_code,
            "curve": [[round(t, 2), a] for t, a in v.curve],
        })
    return {
        "version": __version__,
        "settings": settings.as_report(),
        "duration": round(total_s, 1), "startup_s": round(startup_s, 1),
        "curve_time": "seconds since every node was up (negative: a node up earlier)",
        "samples": samples, "epochs": samples / train_size if train_size else None,
        "mean_accuracy": mean, "worst_accuracy": worst,
        "baselines": {"allreduce": allreduce.accuracy, "local_only": local_mean},
        "baseline_details": {
            "allreduce": {**asdict(allreduce), "samples": allreduce.samples},
            "local_only": [{**asdict(r), "samples": r.samples} for r in local],
            "local_only_capped_at_steps": settings.local_only_max_steps if any(r.capped for r in local) else None,
        },
        "acceptance": {
            "mean_within_2_points_of_allreduce": mean >= allreduce.accuracy - 0.02,
            "worst_within_4_points_of_allreduce": worst >= allreduce.accuracy - 0.04,
            "local_only_30_points_below_gossip": local_mean <= mean - 0.30,
        },
        "final_reading": final,
        "nodes": nodes,
        "clean_exit": all(v.died is None and v.exit_code == 0 for v in views),
    }


def plot_accuracy(path: Path, views: list[NodeView], baselines: dict[str, Any], settings: DemoSettings,
                  ended_at: float | None = None) -> None:
    """Write accuracy_figure(...) as a PNG."""
    import matplotlib.pyplot as plt

    fig = accuracy_figure(views, baselines, settings, ended_at)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_figure(views: list[NodeView], baselines: dict[str, Any], settings: DemoSettings,
                    ended_at: float | None = None) -> Any:
    """Each node's test accuracy from the moment all nodes were up (t = 0: training began; a
    node up earlier enters at its value then), and the baselines as what they are: one final
    accuracy each, after the same number of samples, drawn as points at the end of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for v in views:
        if v.curve:
            ax.plot([t for t, _ in v.curve], [a for _, a in v.curve], lw=1, alpha=0.8, label=f"node {v.index}")
    end = ended_at if ended_at is not None else settings.duration
    allreduce, local = baselines["allreduce"].accuracy, baselines["local_only"]
    ax.plot([end], [allreduce], marker="*", ms=14, color="black", ls="none",
            label=f"all-reduce, final ({100 * allreduce:.1f}%)")
    ax.annotate("all-reduce", (end, allreduce), xytext=(-8, 8), textcoords="offset points", ha="right")
    if local:
        accs = [r.accuracy for r in local]
        mean = sum(accs) / len(accs)
        ax.plot([end] * len(accs), accs, marker=".", color="gray", ls="none", alpha=0.6)
        ax.plot([end], [mean], marker="D", ms=8, color="gray", ls="none",
                label=f"local-only, final (mean {100 * mean:.1f}%; dots: each node)")
        ax.annotate("local-only", (end, mean), xytext=(-8, -14), textcoords="offset points", ha="right")
    ax.axvline(end, color="gray", lw=0.5, ls=":")
    alpha = "iid" if settings.alpha is None else f"alpha {settings.alpha}"
    ax.set(xlabel="seconds of training (0: every node up)", ylabel="test accuracy", ylim=(0, 1),
           xlim=(0, end * 1.06), title=f"peerfed demo: {settings.nodes} nodes, {settings.task}, {alpha}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2, loc="lower right")
    fig.tight_layout()
    return fig


def print_summary(console: Console, report: dict[str, Any], results: Path) -> None:
    table = Table(title="peerfed demo: results")
    for name in ("node", "accuracy", "samples", "ok", "refused", "failed", "sent", "exit"):
        table.add_column(name, justify="left" if name == "node" else "right")
    for n in report["nodes"]:
        ex = n["exchanges"]
        exit_text = "died" if n["died"] else str(n["exit_code"])
        table.add_row(f"{n['index']} {n['peer_id'][-8:]}", fmt_acc(n["accuracy"]), f"{n['samples']:,}",
                      str(ex["ok"]), str(ex["refused"]), str(ex["failed"]), fmt_bytes(n["bytes_sent"]), exit_text)
    console.print(table)
    b = report["baselines"]
    epochs = f", {report['epochs']:.1f} epochs" if report["epochs"] else ""
    console.print(f"gossip: mean {fmt_acc(report['mean_accuracy'])}, worst {fmt_acc(report['worst_accuracy'])}"
                  f"   all-reduce {fmt_acc(b['allreduce'])}   local-only {fmt_acc(b['local_only'])}"
                  f"   ({report['samples']:,} samples{epochs}, {report['duration']:.0f} s in all)")
    capped = report["baseline_details"]["local_only_capped_at_steps"]
    if capped:
        console.print(f"local-only: capped at {capped} steps per node to keep the demo short")
    if not report["clean_exit"]:
        bad = [f"node {n['index']}: " + ("died" if n["died"] else f"exit code {n['exit_code']}")
               for n in report["nodes"] if n["died"] or n["exit_code"] != 0]
        console.print(f"[red]not every daemon stopped cleanly: {', '.join(bad)}[/]")
    else:
        console.print("every daemon stopped cleanly (exit code 0)")
    console.print(f"report: {results / 'report.json'}   plot: {results / 'accuracy.png'}")
