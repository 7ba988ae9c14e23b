#!/usr/bin/env python
"""Encode throughput of shardkeep's codec pool against raw pyeclib plus one memcpy, measured in one run.

For one stripe of k data chunks (default k=3, m=1, ~133 MB per chunk = ~0.4 GB of data) it measures:

1. raw pyeclib ``encode`` in a subprocess started with the tuned malloc environment (the one codec
   workers get), on k*piece-byte inputs that are already ``bytes`` in memory (as many distinct inputs
   as the stripe has sub-stripes, so the data comes from RAM, not from cache);
2. one memcpy of the same bytes (slice assignment into a preallocated, pre-faulted buffer), in the
   same subprocess;
3. ``CodecPool.encode`` from shm to shm with 1 and with 2 workers (first call reported apart: it maps
   the segments and faults their pages in), in GB/s of data bytes encoded;
4. raw encode in a subprocess with glibc's default malloc (the two variables removed), for contrast.

The bound is "raw encode plus one memcpy": time per byte t_encode + t_memcpy, both from (1)-(2) in this
run; the pool's encode does exactly that work (one copy out of shm per sub-stripe, then pyeclib) plus
writing the parity. The 2-worker figure is also compared with twice the bound (two cores).
Load average and date are recorded: absolute figures move 2-3x with load.

    python benchmarks/bench_codec.py               # k=3, m=1, 0.4 GB
    python benchmarks/bench_codec.py --quick       # ~40 MB smoke run
    python -m shardkeep.bench.codec --quick        # the same from an installed package
Writes benchmarks/out/codec-<timestamp>.json (./shardkeep-bench/out/ where there is no ./benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import mmap
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from shardkeep.daemon.codec import WORKER_ENV, CodecPool, make_spec, substripes

SHM = Path("/dev/shm")
GB = 1e9

RAW_CHILD = r"""
import json, os, sys, time
from pyeclib.ec_iface import ECDriver
k, m, ec_type, piece, nsub, reps, seed, start = json.loads(sys.argv[1])
# Inputs built without numpy and without freeing any large buffer first: a freed large block raises
# glibc's dynamic mmap threshold and would hide what default malloc does in a fresh worker.
n = k * piece
block = os.urandom(8 << 20)
offs = [(i * 7919 + seed * 104729) % (4 << 20) for i in range(nsub)]
inputs = [block[a:a + n] for a in offs]
total = n * nsub
drv = ECDriver(k=k, m=m, ec_type=ec_type)
dst = bytearray(total)
dv = memoryview(dst)
for off in range(0, total, 4096):  # fault the destination in once: the pool copies into warm memory too
    dst[off] = 1
drv.encode(inputs[0])
enc, cpy = [], []
if start:
    time.sleep(max(0.0, start - time.time()))  # parallel runs start together
for _ in range(reps):
    t = time.perf_counter()
    for x in inputs:
        drv.encode(x)
    enc.append(time.perf_counter() - t)
    t = time.perf_counter()
    off = 0
    for x in inputs:  # one memcpy per input, into preallocated memory
        dv[off:off + n] = x
        off += n
    cpy.append(time.perf_counter() - t)
print(json.dumps({"bytes": total, "encode_s": enc, "memcpy_s": cpy}))
"""


def raw_children(k: int, m: int, ec_type: str, piece: int, nsub: int, reps: int, tuned: bool,
                 procs: int = 1) -> list[dict]:
    """Raw encode + memcpy in ``procs`` processes at once, the sub-stripes split between them."""
    env = dict(os.environ)
    for var in WORKER_ENV:
        env.pop(var, None)
    if tuned:
        env.update(WORKER_ENV)
    start = time.time() + 3.0 if procs > 1 else 0  # after every child has built its inputs
    share = [nsub // procs + (1 if i < nsub % procs else 0) for i in range(procs)]
    ps = [subprocess.Popen([sys.executable, "-c", RAW_CHILD,
                            json.dumps([k, m, ec_type, piece, share[i], reps, i + 1, start])],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(procs)]
    outs = []
    for p in ps:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise SystemExit(f"raw encode child failed ({p.returncode}):\n{err}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def combined(outs: list[dict]) -> tuple[float, float, int]:
    """(encode seconds, memcpy seconds, bytes) of processes run together: the slowest one's medians."""
    enc = max(statistics.median(o["encode_s"]) for o in outs)
    cpy = max(statistics.median(o["memcpy_s"]) for o in outs)
    return enc, cpy, sum(o["bytes"] for o in outs)


def with_malloc_env(tuned: bool):
    """CodecPool workers started with (the default) or without the malloc tuning, for the contrast."""
    import contextlib

    from shardkeep.daemon import codec

    @contextlib.contextmanager
    def ctx():
        saved = dict(codec.WORKER_ENV)
        saved_env = {v: os.environ.pop(v) for v in list(saved) if v in os.environ}
        if not tuned:
            codec.WORKER_ENV.clear()
        try:
            yield
        finally:
            codec.WORKER_ENV.clear()
            codec.WORKER_ENV.update(saved)
            os.environ.update(saved_env)

    return ctx()


class ShmStripe:
    def __init__(self, k: int, m: int, chunk_len: int, parity_len: int) -> None:
        self.prefix = f"skbcodec{secrets.token_hex(4)}-"
        self.paths: list[Path] = []
        rng = np.random.default_rng(2)
        self.data = []
        for j in range(k):
            name = self._make(f"d{j}", chunk_len)
            with open(SHM / name, "r+b") as f, mmap.mmap(f.fileno(), chunk_len) as mm:
                step = 64 << 20
                for off in range(0, chunk_len, step):
                    n = min(step, chunk_len - off)
                    mm[off:off + n] = rng.bytes(n)
            self.data.append([(name, 0, chunk_len)])
        self.parity = [[(self._make(f"p{p}", parity_len), 0, parity_len)] for p in range(m)]

    def _make(self, tag: str, size: int) -> str:
        name = self.prefix + tag
        fd = os.open(SHM / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self.paths.append(SHM / name)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
        return name

    def remove(self) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)


def pool_encode(spec, stripe: ShmStripe, chunk_len: int, workers: int, reps: int, warmup: int) -> dict:
    async def go():
        with CodecPool(workers=workers) as pool:
            await pool.encode(spec, [[(stripe.data[0][0][0], 0, 100)]] + [[] for _ in range(spec.k - 1)],
                              100, [[(stripe.parity[p][0][0], 0, spec.piece)] for p in range(spec.m)])  # workers up
            t = time.perf_counter()
            await pool.encode(spec, stripe.data, chunk_len, stripe.parity)
            first = time.perf_counter() - t
            for _ in range(warmup):  # parts go to whichever worker is free: let each fault in every page
                await pool.encode(spec, stripe.data, chunk_len, stripe.parity)
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                await pool.encode(spec, stripe.data, chunk_len, stripe.parity)
                times.append(time.perf_counter() - t)
            return first, times

    first, times = asyncio.run(go())
    return {"first_s": first, "times_s": times}


def main(argv=None, out_dir: Path | None = None) -> None:
    if out_dir is None:
        from shardkeep.bench import default_out_dir

        out_dir = default_out_dir()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--stripe-gb", type=float, default=0.4, help="data bytes per stripe (k chunks), GB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed pool calls after the first one")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--ec-type", default=None)
    ap.add_argument("--quick", action="store_true", help="0.04 GB, 2 reps")
    ap.add_argument("--out", type=Path, default=Path(out_dir) / "out")
    args = ap.parse_args(argv)
    if args.quick:
        args.stripe_gb, args.reps = 0.04, 2
    k, m = args.k, args.m
    spec = make_spec(k, m, args.ec_type)
    chunk_len = int(args.stripe_gb * GB / k)
    nsub = substripes(chunk_len, spec.piece)
    data_bytes = k * chunk_len
    load_before = os.getloadavg()
    started = datetime.datetime.now().astimezone()
    print(f"shardkeep codec benchmark  {started.isoformat(timespec='seconds')}  load {load_before}")
    print(f"k={k} m={m} {spec.ec_type} piece={spec.piece} chunk={chunk_len} B  sub-stripes={nsub}  "
          f"stripe data={data_bytes / GB:.3f} GB  cpus={os.cpu_count()}")

    raw = raw_children(k, m, spec.ec_type, spec.piece, nsub, args.reps, tuned=True)[0]
    raw_default = raw_children(k, m, spec.ec_type, spec.piece, nsub, max(1, min(args.reps, 2)), tuned=False)[0]
    raw_par = raw_children(k, m, spec.ec_type, spec.piece, nsub, args.reps, tuned=True, procs=2)
    rb = raw["bytes"]
    enc_s = statistics.median(raw["encode_s"]) / rb  # seconds per data byte
    cpy_s = statistics.median(raw["memcpy_s"]) / rb
    bound_gbs = 1 / (enc_s + cpy_s) / GB
    penc, pcpy, pbytes = combined(raw_par)
    bound2_gbs = pbytes / (penc + pcpy) / GB
    results = {
        "raw_encode_tuned_gbs": 1 / enc_s / GB,
        "raw_encode_tuned_best_gbs": rb / min(raw["encode_s"]) / GB,
        "memcpy_gbs": 1 / cpy_s / GB,
        "bound_encode_plus_memcpy_gbs": bound_gbs,
        "raw_encode_default_malloc_gbs": rb / statistics.median(raw_default["encode_s"]) / GB,
        "raw_encode_2procs_gbs": pbytes / penc / GB,
        "memcpy_2procs_gbs": pbytes / pcpy / GB,
        "bound_2procs_gbs": bound2_gbs,
    }

    stripe = ShmStripe(k, m, chunk_len, nsub * spec.piece)
    pool_res = {}
    try:
        runs = [(int(x), True) for x in args.workers.split(",") if x] + [(1, False)]
        for w, tuned in runs:
            with with_malloc_env(tuned):
                r = pool_encode(spec, stripe, chunk_len, w, args.reps if tuned else max(1, min(args.reps, 2)),
                                args.warmup)
            med = statistics.median(r["times_s"])
            bound_w = bound_gbs if w == 1 else bound2_gbs
            pool_res[f"{w}" + ("" if tuned else "-default-malloc")] = {
                **r,
                "workers": w,
                "tuned_malloc": tuned,
                "median_gbs": data_bytes / med / GB,
                "best_gbs": data_bytes / min(r["times_s"]) / GB,
                "first_call_gbs": data_bytes / r["first_s"] / GB,
                "ratio_to_bound_1core": data_bytes / med / GB / bound_gbs,
                "ratio_to_bound_same_procs": data_bytes / med / GB / bound_w,
            }
    finally:
        stripe.remove()
    load_after = os.getloadavg()

    rows = [
        ("raw pyeclib encode, tuned malloc, 1 process", results["raw_encode_tuned_gbs"], ""),
        ("raw pyeclib encode, default malloc, 1 process", results["raw_encode_default_malloc_gbs"], ""),
        ("memcpy of the same bytes, 1 process", results["memcpy_gbs"], ""),
        ("bound: encode + one memcpy, 1 process", bound_gbs, "1.00"),
        ("raw encode, 2 processes at once (sum)", results["raw_encode_2procs_gbs"], ""),
        ("memcpy, 2 processes at once (sum)", results["memcpy_2procs_gbs"], ""),
        ("bound: encode + one memcpy, 2 processes (sum)", bound2_gbs, ""),
    ]
    for key, r in pool_res.items():
        w = r["workers"]
        label = f"CodecPool.encode shm->shm, {w} worker{'s' if w > 1 else ''}" + (
            "" if r["tuned_malloc"] else ", default malloc")
        ratio = f"{r['ratio_to_bound_1core']:.2f}"
        if w > 1:
            ratio += f"  ({r['ratio_to_bound_same_procs']:.2f} of the 2-process bound)"
        rows.append((label + ", median", r["median_gbs"], ratio))
        rows.append((label + ", first call", r["first_call_gbs"], "(maps segments, faults pages)"))
    print()
    print(f"{'measurement':<62} {'GB/s':>7}  ratio to bound")
    for name, v, ratio in rows:
        print(f"{name:<62} {v:7.2f}  {ratio}")
    print(f"\nload average before {load_before}, after {load_after}")
    print("the first call of a pool maps the segments and faults their pages into the worker; later calls\n"
          "reuse the mappings (the daemon reuses its segments every snapshot)")

    record = {
        "benchmark": "codec",
        "date": started.isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "k": k, "m": m, "ec_type": spec.ec_type, "piece": spec.piece, "chunk_len": chunk_len,
        "substripes": nsub, "data_bytes": data_bytes, "reps": args.reps,
        "raw_tuned": raw, "raw_default_malloc": raw_default,
        **results,
        "raw_2procs": raw_par,
        "pool": pool_res,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"codec-{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
