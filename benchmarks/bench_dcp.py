#!/usr/bin/env python
"""DCP through shardkeep against DCP to the filesystem, and dp_shard's memory per node.

    python benchmarks/bench_dcp.py [--size-mb 256] [--world 4] [--tmp-dir /var/tmp]

Starts two daemons as a group (n=2, m=1, loopback, plain TCP, their own shm
prefix) and ``--world`` ranks as processes (gloo), half on each daemon. Each rank
holds ``--size-mb`` of a row-sharded DTensor state. In the same run it measures:

* ``dcp.save`` with ``ShardkeepWriter`` (returns at group level) and with
  ``FileSystemWriter`` (fsync'd files in ``--tmp-dir``, a local disk);
* the time ``dcp.async_save`` holds the training thread, both ways;
* ``dcp.load`` at the same world size (ShardkeepReader: every rank on its own
  node, from shm) and at half the world size with ranks on the other node than
  the data (half of it over the peer data plane), against ``FileSystemReader``
  with the page cache dropped where allowed;
* dp_shard: two data-parallel ranks, one per daemon, snapshot a replicated
  model + Adam of ``--size-mb`` with and without ``dp_shard=True``; the slot
  bytes each daemon holds for each job.

Prints a table and one JSON line; nothing is asserted (benchmarks measure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


# --- one rank ------------------------------------------------------------------------------------


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from shardkeep.client import Snapshotter
    from shardkeep.client.dcp import ShardkeepReader, ShardkeepWriter

    world = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    if args.mode in ("save", "load"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        rows = args.size_mb * (1 << 20) // 4 // 1024 * args.save_world // 8  # 8 tensors, full over the save world
        g = torch.Generator().manual_seed(0)

        def state(blank: bool) -> dict:
            return {f"layer{i}": distribute_tensor(
                torch.zeros(rows, 1024) if blank else torch.randn(rows, 1024, generator=g), mesh, [Shard(0)])
                for i in range(8)}

        if args.mode == "save":
            sd = state(False)
            async_pg = dist.new_group(backend="gloo")  # async_save's collectives run beside the main thread's
            with ShardkeepWriter() as w:
                dcp.save(sd, storage_writer=w, checkpoint_id=0)  # first: slots created
                out["sk_save_s"] = timed(lambda: dcp.save(sd, storage_writer=w, checkpoint_id=1))
                fut = None

                def async_sk():
                    nonlocal fut
                    fut = dcp.async_save(sd, storage_writer=w, checkpoint_id=2, process_group=async_pg)

                out["sk_async_blocked_s"] = timed(async_sk)
                fut.result(timeout=600)
            fs = Path(args.fs_dir)
            out["fs_save_s"] = timed(lambda: dcp.save(sd, storage_writer=dcp.FileSystemWriter(fs / "a")))

            def async_fs():
                nonlocal fut
                fut = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(fs / "b"), process_group=async_pg)

            out["fs_async_blocked_s"] = timed(async_fs)
            fut.result(timeout=600)
            out["bytes"] = sum(t.to_local().numel() * 4 for t in sd.values())
        else:
            sd = state(True)
            reader = ShardkeepReader()
            out["sk_load_s"] = timed(lambda: dcp.load(sd, storage_reader=reader))  # the newest: step 2
            out["sk_remote_bytes"], out["sk_local_bytes"] = reader.bytes_remote, reader.bytes_local
            reader.close()
            if rank == 0:
                out["dropped_cache"] = drop_caches()
            out["fs_load_s"] = timed(lambda: dcp.load(sd, storage_reader=dcp.FileSystemReader(Path(args.fs_dir) / "a")))
    else:  # dp: a replicated model + Adam, snapshotted with or without dp_shard
        width = 2048
        layers = max(1, args.size_mb * (1 << 20) // (3 * 4 * width * width))  # params + 2 Adam moments
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        opt = torch.optim.Adam(model.parameters())
        model(torch.randn(4, width)).sum().backward()
        opt.step()
        snap = Snapshotter(dp_shard=args.mode == "dp-shard", rng=False)
        for step in range(3):
            res = snap.snapshot({"model": model, "optim": opt}, step).result(timeout=600)
            out.setdefault("levels", []).append(res.level)
        snap.close()
        if args.mode == "dp":  # the baseline for `shardkeep export`: DCP writes the same state to the filesystem
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            out["fs_save_s"] = timed(lambda: dcp.save(sd, storage_writer=dcp.FileSystemWriter(
                Path(args.fs_dir) / "dp")))
    print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# --- driver --------------------------------------------------------------------------------------


def run_ranks(placement: list[str], job: str, mode: str, extra: list[str]) -> list[dict]:
    port = free_port()
    procs = []
    for r, sock in enumerate(placement):
        local = [i for i, s in enumerate(placement) if s == sock]
        env = dict(os.environ, SHARDKEEP_SOCKET=sock, SHARDKEEP_JOB=job, RANK=str(r), WORLD_SIZE=str(len(placement)),
                   LOCAL_RANK=str(local.index(r)), LOCAL_WORLD_SIZE=str(len(local)), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", mode, *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    for p in procs:
        text = p.communicate(timeout=1800)[0]
        if p.returncode != 0:
            raise SystemExit(f"a {mode} rank failed:\n{text[-3000:]}")
        outs.append(json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:]))
    return outs


def status(sock: str) -> dict:
    r = subprocess.run(["shardkeep", "status", "--json", "--socket", sock], capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(r.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=256, help="state per rank, MB (default 256)")
    ap.add_argument("--world", type=int, default=4, help="ranks that save (even; default 4)")
    ap.add_argument("--tmp-dir", default="/var/tmp", help="where the filesystem baseline writes (a local disk)")
    ap.add_argument("--worker", choices=["save", "load", "dp", "dp-shard"], help=argparse.SUPPRESS)
    ap.add_argument("--fs-dir", help=argparse.SUPPRESS)
    ap.add_argument("--save-world", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.mode = args.worker
        worker(args)
        return 0

    root = Path(tempfile.mkdtemp(prefix="skbench-dcp-"))
    fs_dir = Path(tempfile.mkdtemp(prefix="skbench-dcp-fs-", dir=args.tmp_dir))
    ports = [free_port(), free_port()]
    peers = ",".join(f"tcp://127.0.0.1:{p}" for p in ports)
    prefix = f"skbd{os.getpid()}"
    daemons, socks = [], []
    try:
        for i in range(2):
            (root / f"run{i}").mkdir(mode=0o700)
            sock = str(root / f"run{i}" / "sk.sock")
            socks.append(sock)
            daemons.append(subprocess.Popen(
                ["shardkeep", "daemon", "--socket", sock, "--shm-prefix", f"{prefix}n{i}", "--state-dir",
                 str(root / f"state{i}"), "--peers", peers, "--node", str(i), "--parity", "1", "--insecure"],
                stdout=open(root / f"daemon{i}.log", "w"), stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if all(all(p["up"] for p in status(s)["group"]["peers"]) for s in socks):
                    break
            except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError, TypeError):
                pass
            time.sleep(0.5)
        w = args.world
        extra = ["--fs-dir", str(fs_dir), "--size-mb", str(args.size_mb), "--save-world", str(w)]
        t0 = time.time()
        save = run_ranks([socks[0]] * (w // 2) + [socks[1]] * (w // 2), "bdcp", "save", extra)
        load_same = run_ranks([socks[0]] * (w // 2) + [socks[1]] * (w // 2), "bdcp", "load", extra)
        # half the world, each rank on the other node than the rows it loads first
        load_half = run_ranks([socks[1]] * (w // 4 or 1) + [socks[0]] * (w // 4 or 1), "bdcp", "load", extra)
        dp, exports, dp_fs = {}, {}, None
        for mode in ("dp", "dp-shard"):
            ranks = run_ranks(socks, f"b{mode}", mode, ["--size-mb", str(args.size_mb), "--fs-dir", str(fs_dir)])
            dp_fs = dp_fs or max(r.get("fs_save_s", 0) for r in ranks)
            dp[mode] = [next(j["bytes"] for j in status(s)["jobs"] if j["job"] == f"b{mode}") for s in socks]
            t = time.perf_counter()  # from node 1: rank 0's data comes over the peer data plane
            subprocess.run(["shardkeep", "export", "--job", f"b{mode}", "--to", str(fs_dir / "export"),
                            "--socket", socks[1]], check=True, capture_output=True, timeout=1800)
            exports[mode] = time.perf_counter() - t
        res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), "size_mb_per_rank": args.size_mb,
               "world": w, "load": os.getloadavg(), "save": save, "load_same": load_same, "load_half": load_half,
               "dp_slot_bytes_per_node": dp, "export_s": exports, "dp_fs_save_s": dp_fs}
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(timeout=30)
            except subprocess.TimeoutExpired:
                d.kill()
        for p in Path("/dev/shm").glob(f"{prefix}*"):
            p.unlink(missing_ok=True)
        shutil.rmtree(fs_dir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)

    def worst(rows, key):
        return max(r[key] for r in rows)

    total = sum(r["bytes"] for r in save) / 1e9
    print(f"\nDCP, {w} ranks x {args.size_mb} MB ({total:.2f} GB) on a 2-node group (m=1), same run:")
    print(f"{'':44} {'shardkeep':>10} {'filesystem':>11} {'ratio':>7}")

    def row(name, a, b):
        print(f"{name:44} {a:9.3f}s {b:10.3f}s {b / a if a else float('nan'):6.1f}x")

    row("dcp.save (shardkeep: at group level)", worst(save, "sk_save_s"), worst(save, "fs_save_s"))
    row("dcp.async_save, training thread blocked", worst(save, "sk_async_blocked_s"),
        worst(save, "fs_async_blocked_s"))
    row(f"dcp.load, world {w}, every rank on its node", worst(load_same, "sk_load_s"), worst(load_same, "fs_load_s"))
    row(f"dcp.load, world {len(load_half)}, other nodes (resharded)", worst(load_half, "sk_load_s"),
        worst(load_half, "fs_load_s"))
    remote = sum(r["sk_remote_bytes"] for r in load_half) / 1e9
    print(f"  (world {len(load_half)}: {remote:.2f} GB came over the peer data plane; page cache dropped before "
          f"the filesystem loads: {load_same[0].get('dropped_cache')})")
    a, b = dp["dp"], dp["dp-shard"]
    print(f"dp_shard, 2 replicas of ~{args.size_mb} MB model + Adam: slot bytes per node "
          f"{[f'{x / 1e6:.0f} MB' for x in a]} -> {[f'{x / 1e6:.0f} MB' for x in b]} "
          f"({sum(b) / sum(a):.2f}x)")
    row("`shardkeep export` of the dp job (CLI, from node 1) vs dcp.save", exports["dp"], dp_fs)
    print(f"  (`shardkeep export` of the dp_shard job: {exports['dp-shard']:.3f}s; both include the CLI's start)")
    print("JSON " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
