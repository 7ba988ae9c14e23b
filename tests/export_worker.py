"""A rank of a job for tests/test_export.py: train a few steps, snapshot one version at group level, and
write what a plain DCP load of it must give (rank 0: ``expected.pt``, whole tensors).

``--kind dp``: a replicated model (every rank the same); ``dp-shard``: the same with
``Snapshotter(dp_shard=True)``; ``fsdp2``: ``fully_shard`` per layer, parameters and AdamW's moments
DTensors sharded over the ranks (uneven: 37 rows over 2 ranks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 37), torch.nn.ReLU(), torch.nn.Linear(37, 5))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> int:
    from shardkeep.client import Snapshotter  # here: plain_dcp_load.py imports this module without shardkeep

    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["dp", "dp-shard", "fsdp2"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--step", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="snapshot the final state at this many steps, "
                    "STEP, STEP+1, ... (each at group level before the next)")
    ap.add_argument("--go-file", help="before each repeated snapshot, wait (up to 120 s) for GO_FILE.<step>")
    ap.add_argument("--restore-from", metavar="PERSIST_DIR",
                    help="instead: restore (memory is gone) and check against OUT/expected.pt")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    model = build_model()
    if args.kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if args.restore_from:
        return check_restore(args, model, opt)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 16, generator=g), torch.randn(8, 5, generator=g)
    for _ in range(args.step):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if args.kind != "fsdp2":
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
    snap = Snapshotter(dp_shard=args.kind == "dp-shard")
    state = {"model": model, "optim": opt, "extra": {"epoch": 2, "name": "run-a", "ratios": [0.5, 0.25]}}
    for step in range(args.step, args.step + args.repeat):
        if args.go_file and step > args.step:
            deadline = time.monotonic() + 120
            while not os.path.exists(f"{args.go_file}.{step}") and time.monotonic() < deadline:
                time.sleep(0.05)
        res = snap.snapshot(state, step).result(timeout=120)
        assert (res.status, res.level) == ("committed", "group"), res
    snap.close()
    want = {"model": {k: full(v).clone() for k, v in model.state_dict().items()},
            "optim": {i: {k: full(v).clone() for k, v in opt.state[p].items()}
                      for i, p in enumerate(model.parameters())}}
    if dist.get_rank() == 0:
        torch.save(want, os.path.join(args.out, "expected.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


def check_restore(args, model, opt) -> int:
    """A relaunch after every daemon lost its memory: restore() must come from the persist directory."""
    from shardkeep.client import Snapshotter

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # not what was saved
    snap = Snapshotter(dp_shard=args.kind == "dp-shard", persist_dir=args.restore_from)
    extra = {"epoch": 0, "name": "", "ratios": [0.0, 0.0]}
    step = snap.restore({"model": model, "optim": opt, "extra": extra})
    info = snap.last_restore
    assert step == args.step and "persist tier" in str(info) and info.note, (step, str(info))
    assert extra == {"epoch": 2, "name": "run-a", "ratios": [0.5, 0.25]}, extra
    want = torch.load(os.path.join(args.out, "expected.pt"), weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(full(v), want["model"][k]), k
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            assert torch.equal(full(v), want["optim"][i][k]), (i, k)
    print(f"RESTORED {info}")
    snap.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
