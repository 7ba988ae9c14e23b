"""A torchrun worker for the multi-rank tests: snapshot per a plan, then restore collectively."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from shardkeep.client import Snapshotter


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="steps every rank snapshots")
    ap.add_argument("--extra-on-rank0", type=int, default=0, help="steps only rank 0 snapshots afterwards")
    ap.add_argument("--restore-only", action="store_true")
    ap.add_argument("--out-dir", required=True)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.zeros(1000)
    state = {"t": t, "meta": {"rank": rank}}
    snap = Snapshotter()  # everything from the environment, as under torchrun
    if not args.restore_only:
        for step in range(args.steps):
            t.fill_(100 * rank + step)
            assert snap.snapshot(state, step).result(timeout=60).status == "committed"
            dist.barrier()
        if rank == 0:
            for step in range(args.steps, args.steps + args.extra_on_rank0):
                t.fill_(100 * rank + step)
                assert snap.snapshot(state, step).result(timeout=60).status == "committed"
        dist.barrier()
    t.fill_(-1)
    restored = snap.restore(state)
    ok = restored is not None and bool(torch.all(t == 100 * rank + restored))
    with open(os.path.join(args.out_dir, f"rank{rank}.json"), "w") as f:  # ranks share stdout: use files
        json.dump({"rank": rank, "restored": restored, "values_ok": ok, "local_rank": snap.local_rank,
                   "local_world_size": snap.local_world_size}, f)
    snap.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
