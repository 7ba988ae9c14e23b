"""The copy of one version into a slot, and its checksums.

Contiguous CPU tensors are copied with ``memmove`` (releases the GIL, one
thread, no intra-op thread pool fighting the training thread for cores) in
pieces of a few MiB; each checksum chunk is hashed as soon as it is complete,
while it is still in cache.  Other tensors go through ``Tensor.copy_``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
from typing import Callable

import torch

from shardkeep.proto.layout import TensorEntry
from shardkeep.proto.manifest import checksum

PIECE = 8 << 20
JOB = 16 << 20  # bytes per hashing job on the executor


def default_hash_threads(local_world_size: int) -> int:
    """Hashing threads per trainer: none where cores are scarce (hash inline, in cache), up to 4.

    A GPU trainer's device-to-host copy runs at tens of GB/s (55 GB/s on an
    H200), one xxh3 thread over fresh memory at ~6 GB/s: cores to spare go to hashing.
    """
    per_rank = (os.cpu_count() or 1) // max(1, local_world_size)
    return 0 if per_rank < 4 else min(4, per_rank // 4)


class ChunkHasher:
    """Hashes the data region chunk by chunk, as far as the copy has written.

    With an executor, the chunks are hashed on another thread while the copy
    goes on (xxh3 releases the GIL); without one, inline right after each piece
    is copied, while it is still in cache.
    """

    def __init__(self, data: memoryview, nbytes: int, chunk: int,
                 executor: "concurrent.futures.Executor | None" = None) -> None:
        self.data, self.nbytes, self.chunk = data, nbytes, chunk
        self.executor = executor
        self.sums: list[int] = []
        self.pending: list[concurrent.futures.Future] = []
        self.done = 0  # bytes hashed (or handed to the executor)

    def _hash(self, start: int, end: int) -> list[int]:
        c = self.chunk
        return [checksum(self.data[a : min(a + c, end)]) for a in range(start, end, c)]

    def advance(self, upto: int) -> None:
        upto = min(upto, self.nbytes)
        end = upto if upto == self.nbytes else self.done + (upto - self.done) // self.chunk * self.chunk
        if end <= self.done:
            return
        if self.executor is None:
            self.sums.extend(self._hash(self.done, end))
        else:  # in jobs of a few MiB, so that several hashing threads share a large tensor
            step = max(self.chunk, JOB // self.chunk * self.chunk)
            for a in range(self.done, end, step):
                self.pending.append(self.executor.submit(self._hash, a, min(a + step, end)))
        self.done = end

    def finish(self) -> list[int]:
        self.advance(self.nbytes)
        for f in self.pending:
            self.sums.extend(f.result())
        self.pending.clear()
        return self.sums


def dst_view(region: torch.Tensor, e: TensorEntry, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of the entry's dtype and shape over the slot's bytes (no copy)."""
    raw = region[e.offset : e.offset + e.nbytes]
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=dtype)
    return raw.view(dtype).view(e.shape)


def copy_tensor(src: torch.Tensor, dst: torch.Tensor, nbytes: int, base: int, hasher: ChunkHasher | None) -> None:
    """Copy host tensor ``src`` into ``dst`` (which starts ``base`` bytes into the data region)."""
    if nbytes == 0:
        return
    if src.device.type == "cpu" and src.is_contiguous() and not src.is_conj() and not src.is_neg():
        sp, dp = src.data_ptr(), dst.data_ptr()
        for off in range(0, nbytes, PIECE):
            n = min(PIECE, nbytes - off)
            ctypes.memmove(dp + off, sp + off, n)
            if hasher is not None:
                hasher.advance(base + off + n)
        return
    dst.copy_(src)
    if hasher is not None:
        hasher.advance(base + nbytes)


def copy_all(
    tensors: list[torch.Tensor], entries: list[TensorEntry], dtypes: list[torch.dtype],
    region: torch.Tensor, hasher: ChunkHasher, order: list[int], after: Callable[[int], None],
    stream: "torch.cuda.Stream | None" = None, issued: Callable[[object], None] | None = None,
) -> None:
    """Copy tensors in ``order``; ``after(i)`` runs once the i-th of the order is in shm.

    Checksums need offsets in increasing order, so the layout already follows ``order``.

    With ``stream`` (some tensors live on a GPU): host tensors are copied first
    (``optimizer.step`` changes some of them in place, e.g. Adam's step counts),
    then every device-to-host copy is queued on ``stream``, one CUDA event each,
    and ``issued(last_event)`` runs: from then on training may go on, as long as
    its own stream waits for ``last_event`` before it writes the state (the hooks
    do that, without blocking the CPU).  The chunks are hashed as each copy lands.
    """
    with torch.no_grad():  # sources may require grad; the copy must not join their graph
        if stream is None:
            for pos, i in enumerate(order):
                e = entries[i]
                copy_tensor(tensors[i], dst_view(region, e, dtypes[i]), e.nbytes, e.offset, hasher)
                after(pos)
            if issued is not None:
                issued(None)
            return
        events: dict[int, torch.cuda.Event] = {}
        last = None
        for i in order:
            e, t = entries[i], tensors[i]
            if not t.is_cuda:
                copy_tensor(t, dst_view(region, e, dtypes[i]), e.nbytes, e.offset, None)
        with torch.cuda.stream(stream):
            for i in order:
                e, t = entries[i], tensors[i]
                if t.is_cuda and e.nbytes:
                    dst_view(region, e, dtypes[i]).copy_(t, non_blocking=True)
                    last = events[i] = torch.cuda.Event()
                    last.record(stream)
        if issued is not None:
            issued(last)
        for pos, i in enumerate(order):
            e = entries[i]
            ev = events.get(i)
            if ev is not None:
                ev.synchronize()
            hasher.advance(e.offset + e.nbytes)
            after(pos)
