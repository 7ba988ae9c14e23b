"""GPU state: what a snapshot every step costs a trainer whose model and optimizer live on a GPU.

One run, one machine, baselines in the same run:

* reference: one plain device-to-host copy of the state into page-locked memory
  (``Tensor.copy_(non_blocking=True)`` into ``pin_memory()`` buffers), and into pageable memory;
* shardkeep: a snapshot every step (side-stream copies into page-locked shm, xxh3 checksums,
  local commit), with GPU compute per step longer and shorter than the copy: the time the
  training thread is blocked in shardkeep calls (``snapshot()`` + hooks), the step time against
  the same loop without snapshots, snapshot -> local commit, the copy's GB/s;
* warm restore from shm into the GPU model and optimizer, against ``torch.load`` of the same
  state (``map_location="cuda"``) from a file just written (page cache) and ``torch.save`` + fsync;
* ``dcp.async_save`` every step on the same loop: blocked per step.

Needs a CUDA device; exits 0 with a message where there is none.  Writes a JSON
(``--out``) and prints a table.  ``python benchmarks/bench_gpu.py --size 1.6``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warnings

import torch

warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
perf = time.perf_counter
DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()




def summ(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))],
            "max": xs[-1], "min": xs[0]}


def build(size_gb: float, width: int):
    layer = (width * width + width) * 4 * 3  # params + Adam's two moments
    n = max(1, round(size_gb * 1e9 / layer))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n)]).to(DEV)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in list(model.state_dict().values()) +
                 [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)])
    return model, opt, n, nbytes


def gpu_compute(a: torch.Tensor, iters: int) -> None:
    for _ in range(iters):
        torch.mm(a, a, out=a)
        a.mul_(1e-3)


def calibrate(a: torch.Tensor, target_s: float) -> int:
    gpu_compute(a, 10)
    sync()
    t0 = perf()
    gpu_compute(a, 50)
    sync()
    per = (perf() - t0) / 50
    return max(1, round(target_s / per))


def plain_copy(tensors: list[torch.Tensor], pinned: bool, reps: int = 5) -> dict:
    pinned = pinned and DEV == "cuda"
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in tensors]
    times = []
    for _ in range(reps):
        sync()
        t0 = perf()
        for d, s in zip(dst, tensors):
            d.copy_(s, non_blocking=pinned)
        sync()
        times.append(perf() - t0)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"s": min(times), "gbps": nbytes / min(times) / 1e9}


def loop(model, opt, a, iters, steps, first_step, snap=None, dcp_dir=None) -> dict:
    """Training steps with simulated GPU compute; every step synchronized at its end for timing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    state = {"model": model, "opt": opt}
    recs, futs, prev = [], [], None
    for step in range(first_step, first_step + steps):
        t0 = perf()
        gpu_compute(a, iters)                          # forward + backward stand-in
        b0 = snap.stats.blocked_s if snap else 0.0
        opt.step()                                     # pre-hook: waits for the copy (on the GPU)
        blocked = dcp_blocked = 0.0
        if snap is not None:
            c0 = perf()
            fut = snap.snapshot(state, step)
            fut.add_done_callback(lambda f, c=c0: futs.append((perf() - c, f.result().status,
                                                               dict(snap.stats.last_phases))))
            blocked = snap.stats.blocked_s - b0
        if dcp_dir is not None:
            c0 = perf()
            if prev is not None:
                prev.result()
            msd, osd = get_state_dict(model, opt)
            prev = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=dcp_dir)
            dcp_blocked = perf() - c0
        sync()
        recs.append({"step_s": perf() - t0, "blocked_s": blocked, "dcp_blocked_s": dcp_blocked})
    if snap is not None:
        snap.wait(300)
    if prev is not None:
        prev.result()
    warm = recs[1:]  # the first step of a block pays for what the last one left behind
    out = {k: summ([r[k] for r in warm]) for k in ("step_s", "blocked_s", "dcp_blocked_s")}
    if snap is not None:
        time.sleep(0.5)
        out["commit_s"] = summ([t for t, s, _ in futs if s == "committed"])
        out["committed"] = sum(1 for _, s, _ in futs if s == "committed")
        out["skipped"] = sum(1 for _, s, _ in futs if s != "committed")
        names = ("started", "begun", "issued", "copied", "hashed", "committed")
        out["phases_s"] = {k: statistics.median([ph[k] for _, _, ph in futs if k in ph] or [float("nan")])
                           for k in names}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=float, default=1.6, help="GB of params + Adam state on the GPU (default 1.6)")
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10, help="steps per loop block (default 10)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/out/gpu-<time>.json)")
    ap.add_argument("--tmp-dir", default=os.environ.get("TMPDIR", "/tmp"))
    ap.add_argument("--hash-threads", type=int, default=None, help="Snapshotter(hash_threads=...) (default: its own)")
    ap.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval (default: Python's)")
    ap.add_argument("--long-only", action="store_true", help="only the regime with compute longer than the copy")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: the same loops on the CPU, to check this script on a machine without a GPU")
    args = ap.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark did not run")
        return 0
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    from shardkeep.bench.single_node import Daemon
    from shardkeep.client import Snapshotter

    R: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               "gpu": torch.cuda.get_device_name() if DEV == "cuda" else "none (--device cpu)",
               "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
               "args": vars(args)}
    model, opt, n, nbytes = build(args.size, args.width)
    R["state_bytes"], R["layers"] = nbytes, n
    tensors = list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()
                                                   if torch.is_tensor(v) and v.device.type == DEV]
    R["copy_pinned"] = plain_copy(tensors, True)
    R["copy_pageable"] = plain_copy(tensors, False, reps=2)
    t_copy = R["copy_pinned"]["s"]
    a = torch.randn(2048 if DEV == "cuda" else 256, 2048 if DEV == "cuda" else 256, device=DEV)
    root = Path(tempfile.mkdtemp(prefix="skgpu", dir=args.tmp_dir))
    daemon = Daemon(root).start()  # its own socket and shm prefix; stop() removes its segments
    try:
        with Snapshotter(socket=daemon.socket, job=f"gpu-{secrets.token_hex(3)}", rank=0, world_size=1,
                         hash_threads=args.hash_threads) as snap:
            t0 = perf()
            first = snap.snapshot({"model": model, "opt": opt}, 1).result(timeout=600)
            R["first_snapshot_s"], R["first_status"] = perf() - t0, first.status
            snap.snapshot({"model": model, "opt": opt}, 2).result(timeout=600)
            step = 3
            R["copy_into_shm_s"] = snap.stats.last_copy_s
            R["copy_into_shm_gbps"] = nbytes / snap.stats.last_copy_s / 1e9
            for regime, mult in (("long", 3.0), ("short", 0.3))[: 1 if args.long_only else 2]:
                iters = calibrate(a, mult * max(R["copy_into_shm_s"], t_copy))
                base = loop(model, opt, a, iters, args.steps, step)
                with_sk = loop(model, opt, a, iters, args.steps, step, snap=snap)
                step += args.steps
                ckpt = root / f"dcp-{regime}"
                with_dcp = loop(model, opt, a, iters, max(3, args.steps // 2), step, dcp_dir=str(ckpt))
                R[regime] = {"compute_iters": iters, "no_checkpoint": base, "shardkeep": with_sk, "dcp_async": with_dcp}
                subprocess.run(["rm", "-rf", str(ckpt)], check=False)
            # warm restore: into the existing GPU model and optimizer
            last = max(snap.versions())
            times = []
            for _ in range(3):
                sync()
                t0 = perf()
                assert snap.restore({"model": model, "opt": opt}) == last
                sync()
                times.append(perf() - t0)
            R["restore_s"] = min(times)
            R["restore_gbps"] = nbytes / min(times) / 1e9
        path = root / "state.pt"
        t0 = perf()
        with open(path, "wb") as f:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        R["torch_save_fsync_s"] = perf() - t0
        sync()
        t0 = perf()
        sd = torch.load(path, map_location=DEV, weights_only=True)  # the file this run wrote
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["opt"])
        sync()
        R["torch_load_cached_s"] = perf() - t0
    finally:
        daemon.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    out = Path(args.out or Path(__file__).resolve().parent / "out" / f"gpu-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(R, indent=1))
    print(render(R))
    print(f"JSON: {out}")
    return 0


def render(R: dict) -> str:
    ms = lambda x: f"{x * 1e3:.2f} ms"  # noqa: E731
    gb = R["state_bytes"] / 1e9
    lines = [f"GPU: {R['gpu']}; torch {R['torch']}; {R['cpus']} CPUs; {R['date']}",
             f"state: {gb:.2f} GB ({R['layers']} x Linear({R['args']['width']}) fp32 + Adam) on the GPU",
             f"plain D2H copy, pinned: {ms(R['copy_pinned']['s'])} ({R['copy_pinned']['gbps']:.1f} GB/s); "
             f"pageable: {ms(R['copy_pageable']['s'])} ({R['copy_pageable']['gbps']:.1f} GB/s)",
             f"first snapshot (slots made, mapped, page-locked): {R['first_snapshot_s']:.2f} s ({R['first_status']})",
             f"copy into shm (side stream + xxh3): {ms(R['copy_into_shm_s'])} ({R['copy_into_shm_gbps']:.1f} GB/s)"]
    for regime in ("long", "short"):
        if regime not in R:
            continue
        d = R[regime]
        b, s, c = d["no_checkpoint"], d["shardkeep"], d["dcp_async"]
        lines += [f"compute {regime} ({d['compute_iters']} matmuls): step {ms(b['step_s']['median'])} without; "
                  f"{ms(s['step_s']['median'])} with a snapshot every step "
                  f"({s['step_s']['median'] / b['step_s']['median']:.2f}x); "
                  f"dcp.async_save every step {ms(c['step_s']['median'])} "
                  f"({c['step_s']['median'] / b['step_s']['median']:.2f}x)",
                  f"  training thread blocked per step: shardkeep {ms(s['blocked_s']['median'])} median, "
                  f"{ms(s['blocked_s']['p99'])} p99; dcp.async_save {ms(c['dcp_blocked_s']['median'])} median",
                  f"  snapshot -> local commit {ms(s['commit_s'].get('median', float('nan')))}; "
                  f"committed {s['committed']}, skipped {s['skipped']}",
                  "  phases after snapshot() (median): " + ", ".join(f"{k} {ms(v)}" for k, v in s["phases_s"].items())]
    lines += [f"warm restore into the GPU model + Adam: {ms(R['restore_s'])} ({R['restore_gbps']:.1f} GB/s); "
              f"torch.load(map_location=cuda) from page cache {ms(R['torch_load_cached_s'])}; "
              f"torch.save + fsync {ms(R['torch_save_fsync_s'])}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
