"""DistributedDataParallel on CPU (gloo) with a snapshot every step, resumable after a crash.

    shardkeep daemon &                      # one daemon per node (or the systemd unit)
    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 200

Kill it at any moment (`kill -9` the whole torchrun) and run the same command
again: every rank restores the newest step all ranks hold, and the run goes on
with the same model, optimizer, LR schedule, GradScaler and the same next
batch as if it had never stopped.  shardkeep's part is the three lines marked
"shardkeep"; the rest is an ordinary DDP loop with torchdata's
StatefulDataLoader (`pip install -e '.[data]'`).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from shardkeep.client import Snapshotter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="save the final state here (rank r writes OUT.r)")
    ap.add_argument("--trace", help="append each step's sample ids here (rank r writes TRACE.r), to check a resume")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)

    data = TensorDataset(torch.randn(4096, 32), torch.randint(0, 4, (4096,)), torch.arange(4096))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    # its own generator: a new iterator (each epoch, and after a restore) draws a seed from it, not from the
    # global RNG that dropout uses, so a resumed run draws exactly what an uninterrupted one does
    loader_rng = torch.Generator().manual_seed(0)
    loader = StatefulDataLoader(data, batch_size=32, sampler=sampler, generator=loader_rng)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                    torch.nn.Linear(128, 4)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    scaler = torch.amp.GradScaler("cpu")
    progress = {"samples": 0}

    snap = Snapshotter()  # shardkeep: job, rank and world from torchrun's environment
    state = {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader,
             "loader_rng": loader_rng, "progress": progress}
    start = snap.restore(state)  # shardkeep: None on a fresh start; RNG restored too
    step = 0 if start is None else start + 1
    trace = open(f"{args.trace}.{rank}", "a") if args.trace else None

    while step < args.steps:
        sampler.set_epoch(step // len(loader))  # the epoch of the next batch, after a restore too
        for x, y, ids in loader:  # a restored loader resumes mid-epoch at the next batch
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            progress["samples"] += len(ids)
            if trace:
                trace.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
                trace.flush()
            snap.snapshot(state, step)  # shardkeep: returns at once; the copy overlaps the next step
            step += 1
            if step == args.steps:
                break
    snap.close()
    if args.out:
        torch.save({"model": model.module.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict(),
                    "scaler": scaler.state_dict(), "progress": progress}, f"{args.out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # past gloo's teardown, which now and then aborts a finished rank


if __name__ == "__main__":
    main()
