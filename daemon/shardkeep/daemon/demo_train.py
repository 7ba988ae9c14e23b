"""The demo's trainer: a small GPT-style language model, snapshotting every step.

Run by ``shardkeep demo`` as a child process; prints one JSON event per line
(to stdout, or to ``--events FILE``).  Only ``shardkeep.client`` is used,
exactly as a user's training script would.  With ``WORLD_SIZE`` > 1 in the
environment it is one rank of a gloo data-parallel job that all-reduces each
gradient tensor on its own: a reduction whose order never changes, so a run
resumed after a restart can be bitwise identical to an uninterrupted one (DDP
rebuilds its gradient buckets after the first iteration of every process and
is not, on gloo).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.nn as nn


_emit_lock = threading.Lock()
_out = sys.stdout


def emit(**ev) -> None:
    # snapshot futures call back on the client's copy thread: one whole line at a time
    line = json.dumps(ev) + "\n"
    with _emit_lock:
        _out.write(line)
        _out.flush()


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int = 4, ctx: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(0.1)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(ctx), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t)))
        x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(x))


def shape_for(size_bytes: int, vocab: int = 4096) -> tuple[int, int]:
    """(d_model, layers) whose params + Adam state come to about ``size_bytes``."""
    params = size_bytes / 12  # fp32 params + exp_avg + exp_avg_sq
    d = 128
    while d < 1024 and 2 * vocab * (d * 2) + 4 * 12 * (d * 2) ** 2 <= params:
        d *= 2
    layers = max(1, round((params - 2 * vocab * d) / (12 * d * d)))
    return d, min(layers, 48)


def dump_state(obj) -> bytes:
    """The final state, every tensor as (dtype, shape, raw bytes), in shardkeep's msgpack codec (no pickle)."""
    from shardkeep.proto.leaves import pack_skeleton

    def conv(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().contiguous().reshape(-1)
            return ("tensor", str(x.dtype), tuple(x.shape), t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(conv(v) for v in x)
        return x

    return pack_skeleton(conv(obj))


def batch(step: int, vocab: int, ctx: int = 64, n: int = 16, rank: int = 0):
    g = torch.Generator().manual_seed(10_000 + step + 1_000_003 * rank)
    # a learnable pattern: each sequence counts up from a random start
    start = torch.randint(0, vocab, (n, 1), generator=g)
    seq = (start + torch.arange(ctx + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job")
    ap.add_argument("--socket")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", action="store_true", help="no shardkeep: the uninterrupted run")
    ap.add_argument("--baselines", action="store_true", help="also time torch.save/torch.load (and DCP)")
    ap.add_argument("--events", help="write the JSON events to this file instead of stdout")
    ap.add_argument("--baseline-dir", help="a directory every rank can write (for the dcp.async_save baseline)")
    args = ap.parse_args()
    global _out
    if args.events:
        _out = open(args.events, "a", buffering=1)
    t_start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = None
    rank = 0
    if world > 1:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        rank = dist.get_rank()
        torch.set_num_threads(1)  # several ranks share this machine's cores
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))  # leave a core for the daemon and the copy

    vocab = 4096
    d, layers = shape_for(args.size, vocab)
    torch.manual_seed(0)
    model = TinyGPT(vocab, d, layers)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    if args.seed:  # a restarted process starts from other weights and another RNG: restore() must fix both
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5).add_(torch.randn_like(p))
    state = {"model": model, "optim": opt, "data": {"consumed": 0}}
    nbytes = sum(p.numel() * 4 * 3 for p in model.parameters())
    emit(event="model", d_model=d, layers=layers, params=sum(p.numel() for p in model.parameters()),
         state_bytes=nbytes)

    snap = None
    start = None
    if not args.reference:
        from shardkeep.client import Snapshotter

        snap = Snapshotter(socket=args.socket, job=args.job, rank=rank, world_size=world,
                           local_world_size=1 if world > 1 else None)
        start = snap.restore(state)
        lr = snap.last_restore
        emit(event="restored", step=start, seconds=lr.seconds, bytes=lr.bytes, info=str(lr))
    first = 0 if start is None else start + 1
    stalls, commits, losses, group_commits = [], [], [], []
    for step in range(first, args.steps):
        x, y = batch(step, vocab, rank=rank)
        model.train()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if dist is not None:
            for p in model.parameters():  # one all-reduce per tensor, always in the same order
                dist.all_reduce(p.grad)
                p.grad.div_(world)
        opt.step()
        state["data"]["consumed"] += x.numel()
        if first == step:
            emit(event="first-step", seconds_since_start=time.perf_counter() - t_start)
        if snap is not None:
            blocked0 = snap.stats.blocked_s
            t0 = time.perf_counter()
            fut = snap.snapshot(state, step)
            def done(f, s=step, t0=t0):
                r = f.result()
                if r.status != "committed":
                    emit(event="skipped", step=s, reason=r.reason)
                    return
                took = time.perf_counter() - t0
                (group_commits if r.level == "group" else commits).append(took)
                emit(event="committed", step=s, seconds=took, level=r.level)

            fut.add_done_callback(done)
            stalls.append(snap.stats.blocked_s - blocked0)
        losses.append(loss.item())
        emit(event="step", step=step, loss=round(loss.item(), 4))
    if snap is not None:
        snap.wait()
        # stall of step s = time in snapshot(s) + hook waits until snapshot(s+1)
        emit(event="stats", stall_median=statistics.median(stalls[1:] or stalls),
             stall_max=max(stalls[1:] or stalls), first_snapshot=stalls[0] if stalls else None,
             commit_median=statistics.median(commits) if commits else None,
             group_commit_median=statistics.median(group_commits) if group_commits else None,
             group_committed=len(group_commits),
             committed=snap.stats.committed, skipped=snap.stats.skipped)
    final = {"model": model.state_dict(), "optim": opt.state_dict(), "data": state["data"],
             "rng": torch.get_rng_state()}
    with open(args.out, "wb") as f:
        f.write(dump_state(final))
    if snap is not None:
        if args.baselines:  # like for like with torch.load below: into live tensors, optimizer state allocated
            t0 = time.perf_counter()
            snap.restore(state)
            emit(event="warm-restore", seconds=time.perf_counter() - t0)
        snap.close()
    if args.baselines:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            save_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            # the baseline being measured: a file this process has just written
            loaded = torch.load(path, weights_only=True)
            model.load_state_dict(loaded["model"])
            opt.load_state_dict(loaded["optim"])
            load_s = time.perf_counter() - t0
        dcp_s = dcp_blocked = None
        if dist is not None and args.baseline_dir:  # collective: every rank saves its part, as DCP users do
            import torch.distributed.checkpoint as dcp

            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            dist.barrier()
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=os.path.join(args.baseline_dir, "dcp"))
            dcp_blocked = time.perf_counter() - t0
            fut.result()
            dcp_s = time.perf_counter() - t0
            dist.barrier()
        emit(event="baselines", torch_save_fsync=save_s, torch_load=load_s, dcp_async_blocked=dcp_blocked,
             dcp_async_total=dcp_s)
    emit(event="done", ran=args.steps - first, first=first, final_loss=losses[-1] if losses else math.nan)
    if dist is not None:
        dist.barrier()
        # every rank is done and its files are written: leave without the interpreter's teardown, where
        # gloo's threads now and then abort rank 0 ("terminate called without an active exception")
        _out.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    try:
        rc = main()
    except BaseException:  # noqa: BLE001 - reported, then the exit status of an uncaught error
        traceback.print_exc()
        sys.stderr.flush()
        # past the interpreter's teardown: with a gloo group alive it can abort the process
        # ("terminate called without an active exception"), and the exit status would say SIGABRT
        os._exit(1)
    sys.exit(rc)
