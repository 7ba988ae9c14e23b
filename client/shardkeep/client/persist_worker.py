"""The persist tier's worker process (the daemon's only torch import): one run per task.

    python -m shardkeep.client.persist_worker node --socket S --manifests F --job J --step N --dir D --tag T --out R
    python -m shardkeep.client.persist_worker commit --job J --step N --dir D --tag T --keep K RESULT...

``node``: as a client of its own daemon, write this node's ranks of the group-level
version (job, step) into the shared partial directory ``D/J/.step-N.T`` (the node
holding rank 0 also puts dp_shard tensors back together, reading the other
replicas' slices over the peer plane), paced at ``--rate`` bytes/s, fsynced;
the plain-data result (msgpack) goes to RESULT for the daemon to send to the
coordinator. ``commit``: on the coordinator, once every node's RESULT is in:
DCP's ``.metadata`` and ``shardkeep.manifest``, the rename to ``step-N``,
``latest``, pruning to ``--keep``. Exit status 0 on success; the reason on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import msgpack

from shardkeep.proto.errors import ShardkeepError


def node(args: argparse.Namespace) -> int:
    from .dpshard import _nodes
    from .export import partial_dir, write_part
    from .remote import Version

    task = msgpack.unpackb(Path(args.manifests).read_bytes(), raw=False, strict_map_key=False)
    v = Version(args.job, socket=args.socket, timeout=args.timeout).use(args.step, task["node"], task["manifests"],
                                                                        task.get("epoch", 0))
    try:
        mine = sorted(r for r, at in v.ranks.items() if at.node == v.node)
        parts_needed = 0 in mine and any(_nodes(at.skeleton, []) for at in v.ranks.values())
        with contextlib.ExitStack() as stack:
            views = {}
            for r, at in sorted(v.ranks.items()):
                if r in mine:
                    views[r] = stack.enter_context(v.open(r, set(range(len(at.manifest.tensors)))))
                elif parts_needed:  # rank 0's node writes the dp_shard tensors whole: the other slices too
                    need = {n["part"].index for n in _nodes(at.skeleton, []) if n["part"] is not None}
                    views[r] = stack.enter_context(v.open(r, need))
            result = write_part(partial_dir(Path(args.dir), args.job, args.step, args.tag),
                                {r: (at.manifest, at.skeleton) for r, at in v.ranks.items()}, views, mine,
                                rate=args.rate)
    finally:
        v.close()
    result["node"] = v.node
    Path(args.out).write_bytes(msgpack.packb(result, use_bin_type=True))
    return 0


def commit(args: argparse.Namespace) -> int:
    from .export import commit_version, partial_dir

    parts = [msgpack.unpackb(Path(p).read_bytes(), raw=False, strict_map_key=False) for p in args.results]
    path = commit_version(Path(args.dir), args.job, args.step, partial_dir(Path(args.dir), args.job, args.step,
                                                                             args.tag), parts, keep=args.keep)
    print(path)
    return 0


def background() -> None:
    """Run only on CPU and disk time nobody else wants: training and the daemon always come first."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):
        with contextlib.suppress(OSError):
            os.nice(19)
    nr = {"x86_64": 251, "aarch64": 30}.get(os.uname().machine)  # ioprio_set: the idle I/O class
    if nr is not None:
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).syscall(nr, 1, 0, 3 << 13)  # IOPRIO_WHO_PROCESS, self, CLASS_IDLE
    import torch

    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    background()
    ap = argparse.ArgumentParser(prog="python -m shardkeep.client.persist_worker")
    sub = ap.add_subparsers(dest="what", required=True)
    for name in ("node", "commit"):
        p = sub.add_parser(name)
        p.add_argument("--job", required=True)
        p.add_argument("--step", type=int, required=True)
        p.add_argument("--dir", required=True)
        p.add_argument("--tag", required=True)
    p = sub.choices["node"]
    p.add_argument("--socket", required=True)
    p.add_argument("--manifests", required=True, help="msgpack {node, epoch, manifests: {node: {rank: manifest}}}")
    p.add_argument("--out", required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=60.0)
    p = sub.choices["commit"]
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("results", nargs="+")
    args = ap.parse_args(argv)
    try:
        return node(args) if args.what == "node" else commit(args)
    except (ShardkeepError, OSError, ValueError, TypeError) as exc:
        print(f"persist {args.what} of job {args.job} step {args.step}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
