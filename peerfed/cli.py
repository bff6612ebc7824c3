"""The `peerfed` command: parsing and printing only. A PeerfedError prints one `peerfed: error:`
line on stderr and exits with its documented code, without a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerfed import __version__, public_relay
from peerfed.config import CONFIG_FILE_NAME, KEY_FILE_NAME, load_config
from peerfed.config_files import edit_bootstrap, write_default_config
from peerfed.demo import add_demo_arguments, cmd_demo
from peerfed.errors import AlreadyExistsError, ConfigError, ExitCode, PeerfedError

# peerfed.identity is imported inside the commands that use the key: it pulls in libp2p, which
# takes ~0.6 s to import, and `config check` or `bootstrap list` should not wait for that.

Handler = Callable[[argparse.Namespace], int]

EXIT_CODES_HELP = "exit codes: " + ", ".join(f"{int(c)} {c.name.lower()}" for c in ExitCode)
BOOTSTRAP_WARNING = ("warning: bootstrap peers are trusted to introduce this node to the swarm; "
                     "add only peers you trust")


# ---- where things are ----

def default_home() -> Path:
    """$PEERFED_HOME, else ~/.peerfed."""
    return Path(os.environ.get("PEERFED_HOME") or "~/.peerfed").expanduser()


def home_of(args: argparse.Namespace) -> Path:
    home = getattr(args, "home", None)  # absent when a command with actions was given neither
    return Path(home).expanduser().absolute() if home else default_home().absolute()


def config_path_of(args: argparse.Namespace) -> Path:
    """--config FILE, else HOME/peerfed.toml."""
    if getattr(args, "config", None):
        if getattr(args, "home", None):  # one given before the action, the other after it
            raise UsageError("--home and --config exclude each other")
        return Path(args.config).expanduser().absolute()
    return home_of(args) / CONFIG_FILE_NAME


def add_home_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", metavar="DIR",
                        help="node folder (default: $PEERFED_HOME, else ~/.peerfed)")


def add_location_options(parser: argparse.ArgumentParser, *, either_side: bool = False) -> None:
    """--home / --config. either_side: for a command with actions, which takes them before and
    after its action (`bootstrap --home X list`, `bootstrap list --home X`); their default is
    then left out, so that the action's parser does not overwrite a value given before it."""
    default = argparse.SUPPRESS if either_side else None
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--home", metavar="DIR", default=default,
                       help="node folder holding peerfed.toml (default: $PEERFED_HOME, else ~/.peerfed)")
    group.add_argument("--config", metavar="FILE", default=default,
                       help="config file (default: HOME/peerfed.toml)")


class UsageError(PeerfedError):
    exit_code = ExitCode.USAGE


# ---- init ----

def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    add_home_option(parser)
    parser.add_argument("--network", metavar="NAME", help="swarm id shared by all its nodes")
    parser.add_argument("--p2p-listen", metavar="MULTIADDR", action="append",
                        help="libp2p listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/7401")
    parser.add_argument("--exchange-listen", metavar="HOST:PORT", help="weight exchange address")
    parser.add_argument("--api-listen", metavar="HOST:PORT", help="local admin API (loopback only)")
    parser.add_argument("--bootstrap", metavar="MULTIADDR", action="append", default=[],
                        help="peer to contact first, ending /p2p/<PeerID> (repeatable)")
    parser.add_argument("--public-relay", action="store_true", help=public_relay.HELP)


def cmd_init(args: argparse.Namespace) -> int:
    from peerfed.identity import create_identity, peer_id_of

    home = home_of(args)
    key_path, config_path = home / KEY_FILE_NAME, home / CONFIG_FILE_NAME
    existing = [str(p) for p in (key_path, config_path) if os.path.lexists(p)]
    if existing == [str(config_path)]:
        raise AlreadyExistsError(
            f"{config_path} already exists; init never overwrites it. To make only a new identity key "
            f"for this node: `peerfed identity new --home {home}`")
    if existing:
        raise AlreadyExistsError(
            f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; init never "
            f"overwrites them. To start over, move {home} away (keep {KEY_FILE_NAME}: it is this "
            f"node's identity), or use --home DIR for another node")
    try:  # validates every option before it writes anything
        cfg = write_default_config(config_path, network=args.network, p2p_listen=args.p2p_listen,
                                   exchange_listen=args.exchange_listen, api_listen=args.api_listen,
                                   bootstrap=args.bootstrap, settings=public_relay.SETTINGS if args.public_relay else None)
    except ConfigError as exc:
        raise ConfigError("invalid init options; nothing was written:",
                          [p.removeprefix(f"{config_path}: ") for p in exc.problems]) from None
    try:
        key_pair = create_identity(cfg.identity)
    except BaseException:
        config_path.unlink()  # leave no half-made node folder behind
        raise
    print(f"initialized peerfed node in {home}")
    print(f"peer id:  {peer_id_of(key_pair)}")
    print(f"identity: {key_path} (private: back it up, never share it)")
    print(f"config:   {config_path}")
    if args.public_relay:  # what the box does, and the line its rigs paste
        print(*public_relay.instructions(cfg, peer_id_of(key_pair)), sep="\n")
    return ExitCode.OK


# ---- id ----

def add_id_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser)
    parser.add_argument("--json", action="store_true", help='print {"peer_id": ..., "addrs": [...]}')


def cmd_id(args: argparse.Namespace) -> int:
    from peerfed.identity import load_identity, peer_id_of

    cfg = load_config(config_path_of(args))
    peer_id = peer_id_of(load_identity(cfg.identity))
    from peerfed.net.addrs import expand_unspecified

    # 0.0.0.0 is not dialable: show one address per local interface instead.
    addrs = expand_unspecified([f"{addr}/p2p/{peer_id}" for addr in (cfg.p2p.announce or cfg.p2p.listen)])
    if args.json:
        print(json.dumps({"peer_id": peer_id, "addrs": addrs}))
    else:
        print(peer_id)
        for addr in addrs:
            print(addr)
    return ExitCode.OK


# ---- identity new ----

def add_identity_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser, either_side=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser("new", help="make a new identity key for this node (a new PeerID)")
    add_location_options(new, either_side=True)
    new.add_argument("--replace", action="store_true",
                     help="replace an existing key (it is moved to a timestamped backup, never deleted)")


def cmd_identity(args: argparse.Namespace) -> int:
    from peerfed.identity import peer_id_of, replace_identity

    key_path = load_config(config_path_of(args)).identity
    if os.path.lexists(key_path) and not args.replace:
        raise AlreadyExistsError(
            f"{key_path} already exists; a new key gives this node a new PeerID, and peers that list "
            f"the old one (bootstrap, allowlist) must be told. To do it: add --replace (the old key "
            f"is kept as a backup next to it)")
    made = replace_identity(key_path)
    if made.backup is not None:
        print(f"old peer id: {made.old_peer_id or f'unreadable ({made.old_problem})'}")
    print(f"new peer id: {peer_id_of(made.key_pair)}")
    print(f"identity:    {made.path} (private: back it up, never share it)")
    if made.backup is not None:
        print(f"backup:      {made.backup} (the old key)")
    print("restart a running daemon to use it; update peers that list the old PeerID", file=sys.stderr)
    return ExitCode.OK


# ---- config check ----

def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser, either_side=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = actions.add_parser("check", help="validate the config file, then build its task once (CPU)")
    add_location_options(check, either_side=True)
    check.add_argument("--no-task", action="store_true",
                       help="only the file: do not import and build train.task")


def cmd_config(args: argparse.Namespace) -> int:
    from peerfed.taskcheck import build_task, format_cause

    cfg = load_config(config_path_of(args))  # only "check" exists so far
    if cfg.train.enabled and not args.no_task:
        try:
            summary = build_task(cfg)
        except ConfigError as exc:
            cause = format_cause(exc)
            if cause:  # the factory raised: its traceback is what the operator needs
                print(cause, file=sys.stderr)
            raise
        size = f"{summary.nbytes / 2**20:.1f} MiB" if summary.nbytes >= 2**20 else f"{summary.nbytes / 2**10:.1f} KiB"
        print(f"task: {summary.task} builds: {summary.model}, {summary.numel:,} weights ({size}), "
              f"{summary.num_samples:,} local samples, fingerprint {summary.fingerprint[:12]}")
    print(f"ok: {cfg.path}")
    return ExitCode.OK


# ---- bootstrap list|add|rm ----

def add_bootstrap_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser, either_side=True)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_location_options(actions.add_parser("list", help="print the bootstrap peers"), either_side=True)
    for name, verb in (("add", "add to"), ("rm", "remove from")):
        sub = actions.add_parser(name, help=f"{verb} the list (edits the file, keeps its comments)")
        sub.add_argument("addrs", nargs="+", metavar="ADDR", help="multiaddr ending /p2p/<PeerID>")
        add_location_options(sub, either_side=True)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    path = config_path_of(args)
    before = load_config(path).p2p.bootstrap
    if args.action == "list":
        for addr in before:
            print(addr)
    elif args.action == "add":
        after = edit_bootstrap(path, add=args.addrs)
        print(BOOTSTRAP_WARNING, file=sys.stderr)
        for addr in args.addrs:
            print(f"{'already listed' if addr in before else 'added'}: {addr}")
        print(f"{len(after)} bootstrap peer(s) in {path}")
    else:
        after = edit_bootstrap(path, remove=args.addrs)
        for addr in args.addrs:
            print(f"removed: {addr}")
        print(f"{len(after)} bootstrap peer(s) in {path}")
    return ExitCode.OK


# ---- run / status / peers ----

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="overrides log_level from the config")


def cmd_run(args: argparse.Namespace) -> int:
    import multiprocessing.resource_tracker
    import signal

    from peerfed.daemon import run_daemon
    from peerfed.ops.logs import setup_logging

    # Until the daemon installs its own handler, a SIGHUP (reload) must not kill it; started
    # with SIGHUP ignored, multiprocessing's resource tracker keeps ignoring it for good.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    multiprocessing.resource_tracker.ensure_running()

    cfg = load_config(config_path_of(args))
    if cfg.train.enabled:
        from peerfed.taskcheck import find_task_module

        find_task_module(cfg)  # a module the trainer cannot import: say so now, not after start-up
    setup_logging(args.log_level or cfg.log_level)
    run_daemon(cfg, log_level_override=args.log_level)
    return ExitCode.OK


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    add_location_options(parser)
    parser.add_argument("--json", action="store_true", help="print the local API's JSON")


def cmd_status(args: argparse.Namespace) -> int:
    from peerfed.ops.api import dashboard_url, fetch_json

    cfg = load_config(config_path_of(args))
    status = fetch_json(cfg.api.host, cfg.api.port, "/status")
    if args.json:
        print(json.dumps(status, indent=1))
        return ExitCode.OK
    for line in status_lines(status):
        print(line)
    print(f"{'dashboard':16} {dashboard_url(cfg.api.host, cfg.api.port)}")
    return ExitCode.OK


def status_lines(status: dict[str, Any], now: float | None = None) -> list[str]:
    """`peerfed status` as text: one labelled line per fact (the test loss of the last
    evaluation and the training loss, a moving average over recent batches, told apart)."""
    lines = [f"{key:16} {status[key]}" for key in
             ("peer_id", "network", "version", "uptime_s", "peers_connected", "step", "samples") if key in status]
    metrics = dict(status.get("metrics") or {})
    trainer = status.get("trainer") or {}
    if metrics:
        parts = [f"accuracy {100 * metrics.pop('accuracy'):.1f}%" if "accuracy" in metrics else "",
                 f"loss {metrics.pop('loss'):.4f}" if "loss" in metrics else "",
                 *(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())]
        when = ""
        if trainer.get("evaluated_at") is not None:
            age = (time.time() if now is None else now) - float(trainer["evaluated_at"])
            when = f" (evaluated {max(0.0, age):.0f} s ago, at step {trainer.get('evaluated_step')})"
        lines.append(f"{'test':16} " + ", ".join(p for p in parts if p) + when)
    if status.get("loss") is not None:
        lines.append(f"{'train loss':16} {status['loss']:.4f} (moving average over recent batches)")
    if status.get("exchanges"):
        lines.append(f"{'exchanges':16} " + ", ".join(f"{k}={v}" for k, v in status["exchanges"].items()))
    if "reachability" in status:  # how peers see us (identify); the router's port mappings
        pm = (status.get("nat") or {}).get("port_mapping") or {}
        mapped = ", ".join(f"{m['external_ip']}:{m['external_port']}->{m['internal_port']}" for m in pm.get("mapped") or [])
        mapped += f" by {pm['protocol']}" if mapped and pm.get("protocol") else ""
        lines.append(f"{'reachability':16} {status['reachability']} (seen at: "
                     f"{', '.join(status.get('observed_addrs') or []) or 'none yet'}{'; mapped ' + mapped if mapped else ''})")
    return lines


def cmd_peers(args: argparse.Namespace) -> int:
    from peerfed.ops.api import fetch_json

    cfg = load_config(config_path_of(args))
    peers = fetch_json(cfg.api.host, cfg.api.port, "/peers")
    if args.json:
        print(json.dumps(peers, indent=1))
        return ExitCode.OK
    print("\n".join(peer_lines(peers)) or "no peers known yet")
    return ExitCode.OK


def peer_lines(peers: list[dict[str, Any]]) -> list[str]:
    """`peerfed peers` as a table with a header row ([] when there are none)."""
    if not peers:
        return []
    width = max(len("PEER ID"), *(len(p["peer_id"]) for p in peers))
    lines = [f"{'PEER ID':{width}}  {'STATE':9}  {'RTT':>9}  ADDRESS"]
    for peer in peers:
        rtt = f"{peer['rtt_ms']:.1f} ms" if peer.get("rtt_ms") is not None else "-"
        ban = peer.get("ban")  # a banned peer's line says why and until when
        why = f"  (banned for {ban['reason']} until {time.strftime('%H:%M:%S', time.localtime(ban['until']))})" if ban else ""
        lines.append(f"{peer['peer_id']:{width}}  {'banned' if ban else peer['state']:9}  {rtt:>9}  "
                     f"{' '.join(peer['addrs'][:1])}{why}")
    return lines


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Handler


# Subcommand name -> Command (handlers return an ExitCode and raise PeerfedError subclasses
# for expected failures).
COMMANDS: dict[str, Command] = {
    "init": Command("create a node folder: identity key and commented config", add_init_arguments, cmd_init),
    "id": Command("print this node's PeerID and addresses", add_id_arguments, cmd_id),
    "identity": Command("make a new identity key for an existing node (new)", add_identity_arguments, cmd_identity),
    "config": Command("config file tools (check)", add_config_arguments, cmd_config),
    "bootstrap": Command("list or edit the bootstrap peers", add_bootstrap_arguments, cmd_bootstrap),
    "run": Command("run the node: join the swarm, train, exchange weights", add_run_arguments, cmd_run),
    "status": Command("show the running node's status (from its local API)", add_query_arguments, cmd_status),
    "peers": Command("list the running node's peers (from its local API)", add_query_arguments, cmd_peers),
    "demo": Command("run N real nodes here next to both baselines; write a report", add_demo_arguments, cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peerfed", description="Peer-to-peer PyTorch training daemon (gossip weight averaging).",
        epilog=EXIT_CODES_HELP)
    parser.add_argument("--version", action="version", version=f"peerfed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help, epilog=EXIT_CODES_HELP)
        command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        return int(args.handler(args))
    except PeerfedError as exc:
        print(f"peerfed: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except OSError as exc:  # e.g. a folder we may not write: say which, no traceback
        print(f"peerfed: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return ExitCode.INTERNAL
    except KeyboardInterrupt:
        return 130  # the shell convention for Ctrl+C
