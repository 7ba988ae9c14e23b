"""FSDP2 (``fully_shard``) on CPU with gloo: each rank snapshots only its shards, and a resumed run is bitwise the same.

    shardkeep daemon &
    torchrun --nproc-per-node 2 examples/train_fsdp2.py --steps 200

The model's parameters and AdamW's moments are DTensors sharded over the
ranks; ``Snapshotter`` keeps each rank's local shards (plus the mesh and the
placements) and ``restore()`` puts them back into the sharded model and
optimizer in place. After a ``kill -9`` and the same command again, the run
ends bitwise equal to one that never stopped. shardkeep's part is the three
lines marked "shardkeep".
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DistributedSampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from shardkeep.client import Snapshotter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", help="save this rank's final shards here (rank r writes OUT.r)")
    ap.add_argument("--trace", help="append each step's sample ids here (rank r writes TRACE.r), to check a resume")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)

    data = TensorDataset(torch.randn(4096, 32), torch.randint(0, 4, (4096,)), torch.arange(4096))
    sampler = DistributedSampler(data, shuffle=True, seed=0)
    loader_rng = torch.Generator().manual_seed(0)
    loader = StatefulDataLoader(data, batch_size=32, sampler=sampler, generator=loader_rng)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                                torch.nn.GELU(), torch.nn.Linear(256, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    snap = Snapshotter()  # shardkeep
    state = {"model": model, "optim": opt, "sched": sched, "loader": loader, "loader_rng": loader_rng}
    start = snap.restore(state)  # shardkeep: None on a fresh start
    step = 0 if start is None else start + 1
    trace = open(f"{args.trace}.{rank}", "a") if args.trace else None

    while step < args.steps:
        sampler.set_epoch(step // len(loader))
        for x, y, ids in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # FSDP2 reduce-scatters the gradients into each rank's shards
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
        shards = {f"model.{k}": v.to_local() for k, v in model.state_dict().items()}
        for i, p in enumerate(model.parameters()):
            for k, v in opt.state[p].items():
                shards[f"optim.{i}.{k}"] = v.to_local() if hasattr(v, "to_local") else v
        torch.save({"shards": shards, "sched": sched.state_dict()}, f"{args.out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # past gloo's teardown, which now and then aborts a finished rank


if __name__ == "__main__":
    main()
