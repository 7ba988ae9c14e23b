#!/usr/bin/env python
"""The persist tier's effect on training: the same loop against a daemon without and with ``--persist-dir``.

    python benchmarks/bench_persist.py [--size-mb 300] [--steps 40] [--every 5] [--tmp-dir /var/tmp]

One daemon (its own shm prefix and socket); this process trains a model of
``--size-mb`` (Linear(2048) layers + Adam, one thread of compute of about 0.2 s a
step) and snapshots every step. It runs the loop twice, the daemon started
without and then with ``--persist-dir`` (every ``--every`` steps, the default
rate limit) and reports, per run, the training thread's blocked time per
snapshot (``snap.stats``), the step time, skipped snapshots and the versions the
persist tier wrote. Nothing is asserted: the target (DESIGN.md) is no
measurable difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def status(sock: str) -> dict:
    r = subprocess.run(["shardkeep", "status", "--json", "--socket", sock], capture_output=True, text=True,
                       timeout=60, check=True)
    return json.loads(r.stdout)


def run(args, root: Path, persist: Path | None) -> dict:
    import torch

    from shardkeep.client import Snapshotter

    tag = "persist" if persist else "plain"
    (root / tag).mkdir(mode=0o700)
    sock = str(root / tag / "sk.sock")
    prefix = f"skbp{os.getpid()}{tag[0]}"
    cmd = ["shardkeep", "daemon", "--socket", sock, "--shm-prefix", prefix, "--state-dir", str(root / f"st-{tag}")]
    if persist:
        cmd += ["--persist-dir", str(persist), "--persist-every", str(args.every)]
    else:
        cmd += ["--slots", "3"]  # the same slots as with a persist dir: only the persisting differs
    d = subprocess.Popen(cmd, stdout=open(root / f"daemon-{tag}.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.1)
        torch.manual_seed(0)
        width = 2048
        layers = max(1, args.size_mb * (1 << 20) // (3 * 4 * width * width))
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(4, width)
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        snap = Snapshotter(sock, f"bench-{tag}", rank=0, world_size=1)
        state = {"model": model, "optim": opt}
        blocked, steps, results = [], [], []
        for step in range(args.steps):
            t0 = time.perf_counter()
            for _ in range(args.compute):  # the training step's compute, one thread
                a @ b
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
            before = snap.stats.blocked_s
            results.append(snap.snapshot(state, step))
            blocked.append((snap.stats.blocked_s - before) * 1000)
            steps.append(time.perf_counter() - t0)
        snap.wait()
        res = [f.result(timeout=120) for f in results]
        snap.close()
        persisted = None
        if persist:
            deadline = time.monotonic() + 300
            while status(sock)["persist"]["running"] and time.monotonic() < deadline:
                time.sleep(0.5)
            persisted = status(sock)["persist"]
        warm = blocked[3:]  # the first steps create and map the slots
        return {"run": tag, "bytes": sum(p.numel() * 4 * 3 for p in model.parameters()),
                "blocked_ms_median": statistics.median(warm), "blocked_ms_p90": sorted(warm)[int(len(warm) * .9)],
                "blocked_ms_max": max(warm), "step_s_median": statistics.median(steps[3:]),
                "skipped": sum(r.status == "skipped" for r in res), "persist": persisted}
    finally:
        d.terminate()
        try:
            d.wait(timeout=30)
        except subprocess.TimeoutExpired:
            d.kill()
        for p in Path("/dev/shm").glob(f"{prefix}*"):
            p.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=5, help="--persist-every (default 5)")
    ap.add_argument("--compute", type=int, default=60, help="512x512 matmuls per step (default 60, ~0.2 s)")
    ap.add_argument("--tmp-dir", default="/var/tmp", help="where the persist tier writes (a local disk)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="skbench-persist-"))
    persist = Path(tempfile.mkdtemp(prefix="skbench-persist-dir-", dir=args.tmp_dir))
    try:
        t = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows = [run(args, root, None), run(args, root, persist)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(persist, ignore_errors=True)
    print(f"\n{t}, {rows[0]['bytes'] / 1e6:.0f} MB of state, snapshot every step, {args.steps} steps; "
          f"persist every {args.every} steps:")
    print(f"{'':22} {'blocked/snapshot median':>24} {'p90':>8} {'max':>8} {'step median':>12} {'skipped':>8}")
    for r in rows:
        print(f"{r['run']:22} {r['blocked_ms_median']:22.2f}ms {r['blocked_ms_p90']:6.2f}ms "
              f"{r['blocked_ms_max']:6.2f}ms {r['step_s_median']:11.3f}s {r['skipped']:8d}")
    p = rows[1]["persist"] or {}
    print(f"persisted versions: {p.get('committed')} (failed {p.get('failed')}; due while the previous one was "
          f"still being written, so skipped: {p.get('skipped_busy')}), newest {p.get('newest')}")
    print("JSON " + json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
