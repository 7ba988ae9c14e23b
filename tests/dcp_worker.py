"""One rank of a DCP job for tests/test_dcp.py: save a sharded state through shardkeep (and to the
filesystem, the reference), or load it back at this world size and compare.

The state: a weight sharded by rows over the ranks (a DTensor on a CPU mesh when there are several
ranks; an uneven 37-element vector too), a replicated bias, an optimizer-like nested dict and plain
values.  Every rank builds the same full tensors from a seed, so each can check what it loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from shardkeep.client.dcp import ShardkeepReader, ShardkeepWriter


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 48, generator=g),
        "vec": torch.randn(37, generator=g).to(torch.float64),
        "b": torch.randn(48, generator=g),
        "m": torch.randint(-1000, 1000, (96, 8), generator=g, dtype=torch.int32),
    }


def build(full: dict[str, torch.Tensor], world: int, blank: bool) -> dict:
    """The state at this world size: sharded entries as DTensors (plain tensors at world size 1)."""
    def prep(t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, -7) if blank else t.clone()

    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))

        def shard(t):
            return distribute_tensor(prep(t), mesh, [Shard(0)])
    else:
        def shard(t):
            return prep(t)

    return {
        "model": {"w": shard(full["w"]), "b": prep(full["b"])},
        "vec": shard(full["vec"]),
        "optim": {"state": {"m": shard(full["m"]), "step": 0 if blank else 123},
                  "param_groups": [{"lr": 0.0 if blank else 0.01, "betas": [0.0, 0.0] if blank else [0.9, 0.99],
                                    "name": "" if blank else "main"}]},
        "epoch": -1 if blank else 3,
    }


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def compare(a: dict, b: dict, path: str = "") -> list[str]:
    bad = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            bad += compare(x, y, f"{path}{k}.")
        elif isinstance(x, torch.Tensor):
            lx, ly = local(x), local(y)
            if lx.dtype != ly.dtype or lx.shape != ly.shape or not torch.equal(lx, ly):
                bad.append(f"{path}{k}")
        elif x != y:
            bad.append(f"{path}{k}: {x!r} != {y!r}")
    return bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["save", "load"], required=True)
    ap.add_argument("--step", type=int, default=7)
    ap.add_argument("--fs-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--async-save", action="store_true")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    full = full_tensors(1234)
    out: dict = {"rank": rank, "world": world}
    if args.mode == "save":
        state = build(full, world, blank=False)
        with ShardkeepWriter() as w:
            if args.async_save:
                fut = dcp.async_save(state, storage_writer=w, checkpoint_id=args.step)
                fut.result(timeout=120)
            else:
                dcp.save(state, storage_writer=w, checkpoint_id=args.step)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(args.fs_dir))
        out["saved"] = True
    else:
        mine = build(full, world, blank=True)
        reader = ShardkeepReader()
        with reader:
            dcp.load(mine, storage_reader=reader)
        ref = build(full, world, blank=True)
        dcp.load(ref, storage_reader=dcp.FileSystemReader(args.fs_dir))
        want = build(full, world, blank=False)
        out.update(step=reader.step, bytes_local=reader.bytes_local, bytes_remote=reader.bytes_remote,
                   vs_filesystem=compare(ref, mine), vs_expected=compare(want, mine),
                   filesystem_vs_expected=compare(want, ref))
    with open(args.out, "w") as f:
        json.dump(out, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
