"""Plain data parallelism on CPU (gloo), one all-reduce per gradient: a resumed run is bitwise the same.

    shardkeep daemon &
    torchrun --nproc-per-node 2 examples/train_dp.py --steps 200

Each rank trains a replica of the model on its share of the data and
averages every gradient with its own all-reduce, a reduction whose order
never changes; so after a `kill -9` and the same command again, the run ends
bitwise equal to one that never stopped (DDP's gradient buckets change
order after a restart: examples/train_ddp.py matches only to rounding).
shardkeep's part is the three lines marked "shardkeep".
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from shardkeep.client import Snapshotter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="save the final state here (rank r writes OUT.r)")
    ap.add_argument("--trace", help="append each step's sample ids here (rank r writes TRACE.r), to check a resume")
    ap.add_argument("--width", type=int, default=128, help="hidden units of the model")
    ap.add_argument("--dp-shard", action="store_true",
                    help="each rank snapshots only its 1/world slice of the replicated model and optimizer")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)

    data = TensorDataset(torch.randn(4096, 32), torch.randint(0, 4, (4096,)), torch.arange(4096))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader_rng = torch.Generator().manual_seed(0)  # not the global RNG, which dropout uses
    loader = StatefulDataLoader(data, batch_size=32, sampler=sampler, generator=loader_rng)
    model = torch.nn.Sequential(torch.nn.Linear(32, args.width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(args.width, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=50, gamma=0.5)
    torch.manual_seed(100 + rank)  # dropout differs per rank, as in real data parallelism

    snap = Snapshotter(dp_shard=args.dp_shard)  # shardkeep
    state = {"model": model, "optim": opt, "sched": sched, "loader": loader, "loader_rng": loader_rng}
    start = snap.restore(state)  # shardkeep: None on a fresh start; RNG restored too
    step = 0 if start is None else start + 1
    trace = open(f"{args.trace}.{rank}", "a") if args.trace else None

    while step < args.steps:
        sampler.set_epoch(step // len(loader))
        for x, y, ids in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
            opt.step()
            sched.step()
            if trace:
                trace.write(json.dumps({"step": step, "ids": ids.tolist()}) + "\n")
                trace.flush()
            snap.snapshot(state, step)  # shardkeep
            step += 1
            if step == args.steps:
                break
    snap.close()
    if args.out:
        torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()},
                   f"{args.out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # past gloo's teardown, which now and then aborts a finished rank


if __name__ == "__main__":
    main()
