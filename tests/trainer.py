"""A small but real training job used by the fault tests (run as a subprocess).

An MLP with BatchNorm and Dropout (so buffers and RNG matter), Adam, data
drawn from a per-step generator.  Prints one JSON event per line.  A restarted
run seeds its RNG and perturbs its parameters differently before restore(), so
only a correct restore can make it finish bitwise equal to a clean run.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import torch

from shardkeep.client import Snapshotter

_print_lock = threading.Lock()


def emit(**event) -> None:
    with _print_lock:
        print(json.dumps(event), flush=True)


def build(width: int):
    m = torch.nn.Sequential(
        torch.nn.Linear(32, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(width, 4),
    )
    return m, torch.optim.Adam(m.parameters(), lr=1e-3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="seed before building the model")
    ap.add_argument("--sleep", type=float, default=0.0, help="extra seconds per step")
    ap.add_argument("--no-snapshot", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    model, opt = build(args.width)
    if args.seed:  # a restart: different RNG, different weights; restore() must undo both
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    state = {"model": model, "optim": opt, "progress": {"samples": 0, "tag": ("run", 1)}}

    snap = None if args.no_snapshot else Snapshotter(socket=args.socket, job=args.job, rank=0, world_size=1)
    start = snap.restore(state) if snap else None
    emit(event="restored", step=start, info=str(snap.last_restore) if snap else "")
    first = 0 if start is None else start + 1
    ran = 0
    for step in range(first, args.steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(64, 32, generator=g)
        y = torch.randint(0, 4, (64,), generator=g)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["progress"]["samples"] += 64
        ran += 1
        if snap:
            fut = snap.snapshot(state, step)
            fut.add_done_callback(
                lambda f, s=step: emit(event="committed", step=s)
                if not f.exception() and f.result().status == "committed"
                else emit(event="not-committed", step=s, why=str(f.exception() or f.result().reason))
            )
        emit(event="step", step=step)
        if args.sleep:
            time.sleep(args.sleep)
    if snap:
        snap.wait()
        snap.close()
    torch.save(
        {"model": model.state_dict(), "optim": opt.state_dict(), "progress": state["progress"],
         "rng": torch.get_rng_state()},
        args.out,
    )
    emit(event="done", ran=ran, first=first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
