"""``shardkeep`` and ``shardkeepd`` command lines."""

from __future__ import annotations

import argparse
import json
import sys

from shardkeep.proto.config import Timeouts, default_socket
from shardkeep.proto.errors import ShardkeepError
from shardkeep.proto.sizes import parse_size


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: daemon flag (argparse dest) -> config key; every flag defaults to None = not given
_FLAG_KEYS = {
    "socket": "socket", "shm_prefix": "shm_prefix", "memory_limit": "memory_limit", "state_dir": "state_dir",
    "slots": "slots", "job_ttl": "job_ttl", "log_level": "log_level", "log_format": "log_format",
    "metrics_port": "metrics_port", "metrics_host": "metrics_host", "trainer_group": "trainer_group",
    "max_request_rate": "max_request_rate", "peers": "peers", "node": "node",
    "persist_dir": "persist_dir", "persist_every": "persist_every", "persist_rate": "persist_rate",
    "persist_keep": "persist_keep",
    "parity": "parity", "data_port": "data_port", "advertise": "advertise", "curve_secret": "curve_secret",
    "curve_public_dir": "curve_public_dir", "insecure": "insecure", "encrypt_data": "encrypt_data",
    "heartbeat": "timeouts.heartbeat", "peer_timeout": "timeouts.peer_down",
    "group_commit_timeout": "timeouts.group_commit", "request_timeout": "timeouts.client_request",
    "rebuild_timeout": "timeouts.rebuild_chunk", "pin_lease": "timeouts.pin_lease",
}


def add_daemon_args(p: argparse.ArgumentParser) -> None:
    t = Timeouts()
    p.add_argument("--config", metavar="FILE",
                   help="TOML file of settings (keys as in --print-config); SHARDKEEP_<KEY> environment "
                        "variables override it, flags override both")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    p.add_argument("--socket", help=f"ipc socket path for trainers (default: $SHARDKEEP_SOCKET, else {default_socket()})")
    p.add_argument("--shm-prefix", help="name prefix of this daemon's /dev/shm segments (default: shardkeep)")
    p.add_argument("--memory-limit", type=_size,
                   help="most shared memory to hold, e.g. 8GB, 8GiB, 512MB (default: no limit "
                        "beyond /dev/shm free space, MemAvailable and the cgroup)")
    p.add_argument("--state-dir", help="daemon state directory (default: /var/lib/shardkeep/PREFIX for root, "
                                       "else ~/.local/state/shardkeep/PREFIX)")
    p.add_argument("--slots", type=int, help="shm slots per (job, rank), 2..8 (default: 2)")
    p.add_argument("--job-ttl", type=float,
                   help="free a job no trainer has touched for this many seconds (default: 0 = keep until "
                        "snap.finish() or shardkeep release)")
    p.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="(default: INFO)")
    p.add_argument("--log-format", type=str.lower, choices=["text", "json"],
                   help="json: one JSON object per line with time, level, logger, message and the event's "
                        "job, rank, step, version, peer where it has them (default: text)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port at /metrics (default: 0 = off)")
    p.add_argument("--trainer-group", metavar="GROUP",
                   help="multi-user mode: trainers of users in GROUP may use this daemon; each job needs a token "
                        "(SHARDKEEP_JOB_TOKEN) and gets its slots by descriptor, never by name (docs/SECURITY.md)")
    p.add_argument("--max-request-rate", type=float,
                   help="requests per second one trainer connection may send, in bursts of twice that; more "
                        "are answered with an error (default: 10000; 0 = no limit)")
    p.add_argument("--metrics-host", help="address the metrics endpoint binds (default: 127.0.0.1; 0.0.0.0 "
                                          "for a scraper on another host)")
    p.add_argument("--request-timeout", type=float,
                   help=f"seconds a request to a peer may take (default: {t.client_request:g})")
    p.add_argument("--pin-lease", type=float,
                   help=f"a restore pin whose reader vanished is dropped after this many seconds "
                        f"(default: {t.pin_lease:g})")
    g = p.add_argument_group("persist tier (off without --persist-dir)")
    g.add_argument("--persist-dir", metavar="DIR",
                   help="storage every node of the group shares (NFS, a parallel file system): every Nth "
                        "group-level version is written to DIR/<job>/step-<step> in DCP's layout by a worker "
                        "process, DIR/<job>/latest moved once every node's files are in (default: off; with it "
                        "--slots defaults to 3)")
    g.add_argument("--persist-every", type=int, metavar="N",
                   help="persist a version when its step crosses a multiple of N (default: 10)")
    g.add_argument("--persist-rate", type=_size, metavar="BYTES",
                   help="bytes per second this node's worker writes at most, e.g. 200MB (default: 256MiB; 0 = no "
                        "limit)")
    g.add_argument("--persist-keep", type=int, metavar="K", help="step directories kept per job (default: 3)")
    g = p.add_argument_group("group (omit --peers for a single node)")
    g.add_argument("--peers",
                   help="comma-separated control addresses of the group, in order: tcp://HOST0:PORT0,... "
                        "(this node's own entry is the address it binds)")
    g.add_argument("--node", help="this daemon's index in --peers, or auto: the entry whose host is --advertise "
                                  "(default: 0)")
    g.add_argument("--parity", type=int, help="parity nodes per stripe, m (default: 1)")
    g.add_argument("--data-port", type=int,
                   help="port of the bulk data endpoint on the control host (default: 0 = any free port)")
    g.add_argument("--advertise", help="host peers should use to reach this node, if not the bound one")
    g.add_argument("--curve-secret", help="this node's node-<i>.key_secret (shardkeep keygen)")
    g.add_argument("--curve-public-dir", help="directory of the group's node-<i>.key public keys")
    g.add_argument("--insecure", action="store_true", default=None,
                   help="no CURVE: plain TCP between daemons; refused unless every address is loopback")
    g.add_argument("--encrypt-data", action="store_true", default=None,
                   help="send bulk data over CURVE too (slower) instead of plain frames with keyed BLAKE3 tags")
    g.add_argument("--heartbeat", type=float, help=f"seconds between heartbeats to peers (default: {t.heartbeat:g})")
    g.add_argument("--peer-timeout", type=float,
                   help=f"a peer silent this many seconds is down and the group degraded (default: {t.peer_down:g})")
    g.add_argument("--group-commit-timeout", type=float,
                   help=f"seconds a version may take to reach group level before it stays local "
                        f"(default: {t.group_commit:g})")
    g.add_argument("--rebuild-timeout", type=float,
                   help=f"seconds one piece of a rebuild may take (default: {t.rebuild_chunk:g})")


def daemon_config(args: argparse.Namespace, env=None):
    """The daemon's effective config from --config, SHARDKEEP_* and the flags given (and the sources)."""
    from .config import load_config

    flags = {key: getattr(args, dest) for dest, key in _FLAG_KEYS.items() if getattr(args, dest, None) is not None}
    return load_config(flags, env, args.config)


def cmd_daemon(args: argparse.Namespace) -> int:
    from .config import render_config
    from .server import run_daemon

    try:
        cfg, source = daemon_config(args)
        cfg.validate()
    except ValueError as exc:
        print(f"shardkeepd: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_config(cfg, source))
        return 0
    from .logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_format, cfg.node if cfg.peers else None)
    try:
        run_daemon(cfg)
    except (ShardkeepError, ValueError, OSError) as exc:
        print(f"shardkeepd: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from shardkeep.proto.transport import Channel

    from .status import render_status

    try:
        reply = Channel(args.socket or default_socket(), timeout=args.timeout).request(
            "status", {"job": args.job} if args.job else None
        )
    except ShardkeepError as exc:
        print(f"shardkeep status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from .status import plan_advice

        advice = plan_advice(reply.fields)[1]
        json.dump(reply.fields if advice is None else {**reply.fields, "plan": advice}, sys.stdout, indent=2,
                  sort_keys=True, default=str)
        print()
    else:
        render_status(reply.fields)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from shardkeep.proto.transport import Channel

    try:
        import os

        token = args.token or os.environ.get("SHARDKEEP_JOB_TOKEN")
        reply = Channel(args.socket or default_socket(), timeout=args.timeout).request(
            "finish", {"job": args.job, **({"token": token} if token else {})})
    except ShardkeepError as exc:
        print(f"shardkeep release: {exc}", file=sys.stderr)
        return 1
    print(f"released job {args.job}: {reply.fields.get('freed_slots', 0)} slots freed")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import os

    try:
        from shardkeep.client.export import export
    except ImportError as exc:  # the daemon-only install has no torch
        print(f"shardkeep export: needs torch and the shardkeep client ({exc})", file=sys.stderr)
        return 1
    try:
        res = export(args.job, args.to, step=args.step, socket=args.socket or default_socket(),
                     token=args.token or os.environ.get("SHARDKEEP_JOB_TOKEN"), keep=args.keep, timeout=args.timeout)
    except (ShardkeepError, OSError, TypeError, ValueError) as exc:
        print(f"shardkeep export: {exc}", file=sys.stderr)
        return 1
    print(res)
    print(f"{res.path.parent / 'latest'} -> {os.readlink(res.path.parent / 'latest')}")
    return 0


RECOVER_SILENCE_S = 10.0  # `recover` gives up on a daemon that answers no status request for this long


def cmd_recover(args: argparse.Namespace) -> int:
    import threading
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from shardkeep.proto.sizes import format_size

    from shardkeep.proto.transport import Channel

    sock = args.socket or default_socket()
    print("rebuilding this node's data and parity from the survivors ...", flush=True)
    done: dict = {}

    def run() -> None:  # a daemon thread: a request to a daemon that died never holds up our exit
        try:
            done["reply"] = Channel(sock, timeout=args.timeout).request("recover")
        except Exception as exc:  # noqa: BLE001 - reported below, as every other failure of recover
            done["error"] = exc

    worker = threading.Thread(target=run, name="recover", daemon=True)
    worker.start()
    with Progress(TextColumn("stripes"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("fetched {task.fields[fetched]}"), TimeElapsedColumn(),
                  transient=not sys.stdout.isatty()) as progress:
        task = progress.add_task("recover", total=None, fetched="0 B")
        answered = time.monotonic()
        while True:
            worker.join(timeout=0.5)
            if not worker.is_alive():
                break
            try:
                st = Channel(sock, timeout=2).request("status").fields.get("recover") or {}
                answered = time.monotonic()
            except ShardkeepError:
                if time.monotonic() - answered > RECOVER_SILENCE_S:
                    # the rebuild's own request would wait for --timeout: a dead daemon never answers it
                    done["error"] = f"the daemon at {sock} has not answered for {RECOVER_SILENCE_S:g} s (stopped " \
                                    "or crashed?); restart it and run `shardkeep recover` again"
                    break
                continue
            progress.update(task, total=st.get("stripes_total") or None, completed=st.get("stripes_done", 0),
                            fetched=format_size(st.get("bytes_fetched", 0)))
    if "error" in done:
        print(f"shardkeep recover: {done['error']}", file=sys.stderr)
        return 1
    reply = done["reply"]
    for v in reply.fields.get("versions", []):
        print(f"job {v['job']} step {v['step']}: ranks {v['ranks']}, {v['bytes']} bytes rebuilt and verified, "
              f"parity of stripes {v['parity_stripes']} re-encoded")
    print(f"recovered {len(reply.fields.get('versions', []))} versions in {reply.fields.get('seconds')} s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from shardkeep.proto.transport import Channel

    from .plan import INPUTS, plan, render, resolve_inputs

    sock = args.socket or default_socket()
    status, daemon = None, {"socket": sock, "answered": False, "error": ""}
    try:
        status = Channel(sock, timeout=args.timeout).request("status").fields
        daemon["answered"] = True
    except ShardkeepError as exc:
        daemon["error"] = str(exc)
    flags = {name: getattr(args, name) for name in INPUTS if name not in ("mtbf_hours", "nodes", "local_latency")}
    try:
        result = plan(resolve_inputs(args.mtbf, args.nodes, flags, status))
    except ValueError as exc:
        print(f"shardkeep plan: {exc}", file=sys.stderr)
        return 2
    result["daemon"] = daemon
    if args.json:
        json.dump(result, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        sys.stdout.write(render(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.nodes > 1:
        from .demo_group import run_group_demo

        args.size = args.size or _size("16MB")
        return run_group_demo(args)
    from .demo import run_demo

    args.size = args.size or _size("64MB")
    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from shardkeep.bench.suite import run_suite

    return run_suite(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardkeep",
        description="In-memory fault tolerance for PyTorch training: snapshot every step, restore in under a second.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("daemon", help="run the per-node daemon (same as shardkeepd)")
    add_daemon_args(p)
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("status", help="show jobs, ranks, versions and memory of a daemon")
    p.add_argument("--socket", default=None, help="daemon socket (default: $SHARDKEEP_SOCKET or the default path)")
    p.add_argument("--job", default=None, help="only this job")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default: 5)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("release", help="free every version of a job that is really over (same as snap.finish())")
    p.add_argument("--job", required=True, help="the job id")
    p.add_argument("--socket", default=None, help="daemon socket (default: $SHARDKEEP_SOCKET or the default path)")
    p.add_argument("--token", default=None,
                   help="the job's token, for a daemon in multi-user mode (default: $SHARDKEEP_JOB_TOKEN)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default: 10)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("export", help="write a version of a job in torch.distributed.checkpoint's layout "
                                      "(plain dcp.load reads it)",
                       description="Write job J's version (the newest, or --step) to DIR/J/step-S in DCP's file "
                                   "layout, with shardkeep's own manifest beside it, and point DIR/J/latest at it. "
                                   "Ranks held by other nodes of the group are read over the peer data plane.")
    p.add_argument("--job", required=True, help="the job id")
    p.add_argument("--to", required=True, metavar="DIR", help="where to write (shared storage, a local disk)")
    p.add_argument("--step", type=int, default=None, help="the version (default: the newest the group holds)")
    p.add_argument("--keep", type=int, default=None, help="keep only the newest N step directories of the job")
    p.add_argument("--socket", default=None, help="daemon socket (default: $SHARDKEEP_SOCKET or the default path)")
    p.add_argument("--token", default=None,
                   help="the job's token, for a daemon in multi-user mode (default: $SHARDKEEP_JOB_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each daemon request (default: 60)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("recover", help="rebuild a replacement node's data and parity from its group")
    p.add_argument("--socket", default=None,
                   help="the replacement daemon's socket (default: $SHARDKEEP_SOCKET or the default path)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the rebuild (default: 3600)")
    p.set_defaults(func=cmd_recover)

    p = sub.add_parser("plan", help="recommend a snapshot interval (Young/Daly) and a group size n, m for a "
                                    "cluster, from measured snapshot, restore and rebuild costs",
                       description="Recommend a snapshot interval (Young/Daly), the work lost per failure against "
                                   "checkpoints to disk, and the data-loss risk of group sizes n, m for a job of "
                                   "--nodes nodes. Inputs not given are taken from a running daemon's status, else "
                                   "from defaults scaled from benchmarks/RESULTS.md; the report says which.")
    p.add_argument("--mtbf", type=float, required=True, metavar="HOURS", help="mean time between failures of one node")
    p.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes in the job (cluster size)")
    p.add_argument("--group-size", type=int, metavar="n", help="nodes per group (default: the daemon's, else 4)")
    p.add_argument("--parity", type=int, metavar="m", help="parity nodes per group (default: the daemon's, else 1)")
    p.add_argument("--state-size", dest="state_bytes", type=_size, metavar="SIZE",
                   help="training state per node, e.g. 40GB (default: the daemon's largest job, else 1.6GB); "
                        "scales the defaults below")
    p.add_argument("--snapshot-cost", type=float, metavar="S",
                   help="training time lost per snapshot: blocked time + step slowdown (default: 0.0048)")
    p.add_argument("--step-time", type=float, metavar="S", help="seconds per training step (default: 0.24)")
    p.add_argument("--commit-latency", type=float, metavar="S",
                   help="snapshot() to group level (default: the daemon's recent group commits, else from the size)")
    p.add_argument("--restore", type=float, metavar="S", help="restore from memory (default: from the size)")
    p.add_argument("--rebuild", type=float, metavar="S", help="rebuild of a lost node (default: from the size and n)")
    p.add_argument("--window", type=float, metavar="S",
                   help="a lost node's data missing: detection + replacement + rebuild (default: 5 + --rebuild, "
                        "a spare node standing by)")
    p.add_argument("--disk-save", type=float, metavar="S", help="one checkpoint to disk (default: from the size)")
    p.add_argument("--disk-load", type=float, metavar="S", help="restart from a disk checkpoint (default: from the size)")
    p.add_argument("--socket", default=None, help="daemon socket (default: $SHARDKEEP_SOCKET or the default path)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the daemon (default: 2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_plan)

    from . import keys

    p = sub.add_parser("keygen", help="write CURVE keypairs for the nodes of a group")
    keys.add_keygen_args(p)
    p.set_defaults(func=keys.cmd_keygen)

    p = sub.add_parser("demo", help="train on a local group, lose a whole node, rebuild it, resume, "
                                    "and compare bitwise against an uninterrupted run")
    p.add_argument("--nodes", type=int, default=4,
                   help="daemons (one trainer rank each) in the local group; 1 = a single node whose "
                        "trainer is SIGKILLed and restored from local memory (default: 4)")
    p.add_argument("--parity", type=int, default=1, help="parity nodes m of the group (default: 1)")
    p.add_argument("--steps", type=int, default=30, help="training steps (default: 30)")
    p.add_argument("--kill-at", type=int, default=None, help="step at which to kill (default: random)")
    p.add_argument("--size", type=_size, default=None,
                   help="approximate model + optimizer state per rank (default: 16MB with a group, 64MB alone)")
    p.add_argument("--seed", type=int, default=None, help="seed for the kill step and the lost node (default: random)")
    p.add_argument("--keep", action="store_true", help="leave the daemons running to inspect with shardkeep status")
    p.set_defaults(func=cmd_demo)

    from shardkeep.bench import suite as bench_suite

    p = sub.add_parser("bench", help="benchmark against torch.save/torch.load and DCP on one node and on a "
                                     "local group; a table, a JSON and a chart (benchmarks/README.md)")
    bench_suite.add_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


def daemon_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardkeepd", description="shardkeep per-node daemon")
    add_daemon_args(parser)
    return cmd_daemon(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
