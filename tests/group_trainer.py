"""One rank of a multi-node gloo training job, each "node" with its own daemon (run as a subprocess).

The environment carries RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK=0,
LOCAL_WORLD_SIZE=1 and SHARDKEEP_SOCKET (this node's daemon), as a launcher
would set them.  ``--mode dp`` all-reduces each gradient tensor on its own, a
reduction whose order never changes, so a resumed run is bitwise equal to an
uninterrupted one; ``--mode ddp`` uses DistributedDataParallel, whose gradient
buckets are rebuilt after the first iteration of every process, so a resumed
run matches only to rounding.  Events go to ``--events`` as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

from shardkeep.client import Snapshotter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--mode", choices=("dp", "ddp"), default="dp")
    ap.add_argument("--seed", type=int, default=0, help="a restart: perturb RNG and weights before restore()")
    ap.add_argument("--sleep", type=float, default=0.0)
    ap.add_argument("--no-snapshot", action="store_true")
    ap.add_argument("--hidden", type=int, default=384, help="width of the hidden layers (state ~ 12 x hidden^2 bytes)")
    ap.add_argument("--digest", action="store_true", help="report a BLAKE3 digest of the state after each step")
    args = ap.parse_args(argv)
    events = open(args.events, "a", buffering=1)

    def emit(**ev) -> None:
        events.write(json.dumps(ev) + "\n")

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    h = args.hidden
    model = torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 8))
    net = torch.nn.parallel.DistributedDataParallel(model) if args.mode == "ddp" else model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(100 + rank)  # dropout differs per rank, as in real data parallelism
    if args.seed:
        torch.manual_seed(args.seed + rank)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    state = {"model": model, "optim": opt, "progress": {"samples": 0}}
    snap = None if args.no_snapshot else Snapshotter()
    start = snap.restore(state) if snap else None
    extra = {"digest": digest(state), "bytes": snap.last_restore.bytes} if args.digest and start is not None else {}
    emit(event="restored", step=start, **extra)
    first = 0 if start is None else start + 1
    for step in range(first, args.steps):
        g = torch.Generator().manual_seed(10_000 * step + rank)
        x, y = torch.randn(32, 64, generator=g), torch.randint(0, 8, (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.mode == "dp":
            for p in model.parameters():  # one all-reduce per tensor: a fixed reduction order
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
        state["progress"]["samples"] += 32
        # before the snapshot: a version can never be committed without its step on record
        emit(event="step", step=step, **({"digest": digest(state)} if args.digest else {}))
        if snap:
            fut = snap.snapshot(state, step)
            fut.add_done_callback(lambda f, s=step: emit(event="result", step=s, status=f.result().status,
                                                         level=f.result().level))
        if args.sleep:
            time.sleep(args.sleep)
    if snap:
        snap.wait()
        snap.close()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "progress": state["progress"]}, args.out)
    emit(event="done", first=first, ran=args.steps - first)
    dist.barrier()
    # every rank is done and its files are written: leave without the interpreter's teardown, where
    # gloo's threads now and then abort rank 0 ("terminate called without an active exception")
    events.close()
    os._exit(0)


def digest(state: dict) -> str:
    """BLAKE3 of every tensor and number of the state, in a fixed order: equal states, equal digests."""
    import blake3

    h = blake3.blake3()
    for k, v in sorted(state["model"].state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy())
    for group in state["optim"].state_dict()["state"].values():
        for k, v in sorted(group.items()):
            h.update(k.encode())
            h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy())
    h.update(json.dumps(state["progress"], sort_keys=True).encode())
    return h.hexdigest()


def forked(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """Entry point in a child of a forkserver that imported torch and shardkeep already (tests/groupjob.py):
    the environment a launcher would set, output to ``log_path``, then :func:`main`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    from shardkeep.proto import faults

    faults._PLAN = None  # read this trainer's SHARDKEEP_FAULTS, not the forkserver's
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    try:
        rc = main(argv)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    try:
        rc = main()
    except BaseException:  # noqa: BLE001 - reported, then the same exit as an uncaught error
        traceback.print_exc()
        sys.stderr.flush()
        # not through the interpreter's teardown: with a gloo group alive it can abort the process
        # ("terminate called without an active exception") and the exit status would say SIGABRT
        os._exit(1)
    sys.exit(rc)
