"""Remote reads: bytes of another node's payload, brought over the peer data plane into shared memory.

A client's ``read`` (docs/PROTOCOL.md 4.13) names a node of the group and a
byte range of that node's payload of a group-level version.  This daemon takes
a staging segment (``<prefix>-r-<id>``, MAX_READ bytes, reused within a job,
never across jobs), asks the node ``fetch {what: "payload", reply_via: "data",
rid}``, and the node sends the range as BLAKE3-tagged ``fetch-reply`` data
messages straight out of its shared memory; each is copied into the staging
segment in a thread.  The reply names the segment; the client maps it (in
multi-user mode through the descriptor socket, which serves a job's staging
segments to that job only), copies the bytes out, checks them against the
manifest's checksums and says ``read-done``.  Payload bytes never travel on
the trainer's socket.  A read the client never finishes is dropped after the
pin lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from typing import Any

from shardkeep.proto import wire
from shardkeep.proto.errors import NotFoundError, ProtocolError, ShardkeepTimeoutError, UnavailableError

from .arena import Segment, create_segment, pwrite_all

log = logging.getLogger("shardkeep.reads")

MAX_READS = 64        # reads in flight on one daemon (each holds a MAX_READ staging segment)
SPARES_PER_JOB = 4    # staging segments kept for a job's next reads


@dataclasses.dataclass(eq=False)
class _Read:
    rid: str
    job: str
    node: int
    seg: Segment
    length: int
    done: asyncio.Future
    received: int = 0
    lease: asyncio.TimerHandle | None = None


class RemoteReads:
    def __init__(self, cfg: Any, group: Any, executor: Any) -> None:
        self.cfg, self.group, self.executor = cfg, group, executor
        self.reads: dict[str, _Read] = {}
        self.spares: dict[str, list[Segment]] = {}
        self.served = 0
        self.bytes = 0

    def names(self, job: str) -> set[str]:
        """The staging segments of ``job`` (the descriptor socket serves them to that job only)."""
        return {r.seg.name for r in self.reads.values() if r.job == job}

    async def read(self, job: str, step: int, epoch: int, node: int, offset: int, length: int) -> dict:
        g = self.group
        if node == g.node:
            raise ProtocolError(f"read: node {node} is this node; map its ranks with open")
        if node not in g.clients:
            raise NotFoundError(f"read: node {node} is not in this group")
        if not g.peer_up(node):
            raise UnavailableError(f"read: node {node} is down; its data of job {job!r} step {step} needs "
                                   "`shardkeep recover` on its replacement first")
        if len(self.reads) >= MAX_READS:
            raise UnavailableError(f"read: {MAX_READS} reads in flight on this daemon; try again")
        loop = asyncio.get_running_loop()
        rid = secrets.token_hex(8)
        spares = self.spares.get(job)
        seg = spares.pop() if spares else await loop.run_in_executor(
            self.executor, create_segment, f"{self.cfg.shm_prefix}-r-{rid}", wire.MAX_READ, "read staging")
        r = self.reads[rid] = _Read(rid, job, node, seg, length, loop.create_future())
        limit = self.cfg.timeouts.rebuild_chunk
        clean = False
        try:
            t0 = time.monotonic()
            await g.clients[node].request(
                "fetch", {"job": job, "step": step, "epoch": epoch, "what": "payload", "offset": offset,
                          "length": length, "reply_via": "data", "rid": rid}, timeout=limit)
            # the pieces travel on the data plane, beside that reply: wait for the last one's copy
            try:
                await asyncio.wait_for(asyncio.shield(r.done), max(1.0, limit - (time.monotonic() - t0)))
            except asyncio.TimeoutError:
                raise ShardkeepTimeoutError(f"read: {r.received} of {length} bytes from node {node} arrived "
                                            f"within {limit:.0f}s", what="read", after=limit) from None
            clean = True
        finally:
            if not clean:
                self.end(rid, reuse=False)
        r.lease = loop.call_later(self.cfg.timeouts.pin_lease, self.end, rid, False)
        self.served += 1
        self.bytes += length
        return {"read": rid, "segment": seg.name, "size": seg.size}

    def on_data(self, src: int, meta: dict, payload: Any) -> Any:
        """A ``fetch-reply`` piece: checked, then copied into its read's staging segment (the returned
        awaitable; the data plane awaits it before it takes the next message)."""
        rid, off = meta.get("rid"), meta.get("offset")
        r = self.reads.get(rid) if isinstance(rid, str) else None
        if r is None or r.node != src or r.done.done():
            raise ProtocolError(f"fetch-reply from node {src} for no read in flight ({str(rid)[:32]!r})")
        n = payload.nbytes
        if type(off) is not int or off < 0 or off + n > r.length:
            raise ProtocolError(f"fetch-reply of bytes {off}+{n} for a {r.length}-byte read")

        async def copy() -> None:
            await asyncio.get_running_loop().run_in_executor(self.group.gc.copier, pwrite_all, r.seg.fd, payload, off)
            if self.reads.get(rid) is r and not r.done.done():
                r.received += n
                if r.received >= r.length:
                    r.done.set_result(None)

        return copy()

    def done(self, job: str, rid: str) -> None:
        """The client copied its bytes out (``read-done``)."""
        r = self.reads.get(rid)
        if r is None or r.job != job:
            raise NotFoundError(f"read-done: no read {rid[:32]!r} of job {job!r} (ended, or its lease ran out)")
        self.end(rid, reuse=True)

    def end(self, rid: str, reuse: bool = True) -> None:
        r = self.reads.pop(rid, None)
        if r is None:
            return
        if r.lease is not None:
            r.lease.cancel()
        if not r.done.done():
            r.done.cancel()
        spares = self.spares.setdefault(r.job, [])
        # reused within the job only, and only after a clean read: a late piece of a failed one could land
        if reuse and len(spares) < SPARES_PER_JOB:
            spares.append(r.seg)
        else:
            r.seg.destroy()

    def drop_job(self, job: str) -> None:
        for seg in self.spares.pop(job, []):
            seg.destroy()

    def close(self) -> None:
        for rid in list(self.reads):
            self.end(rid, reuse=False)
        for job in list(self.spares):
            self.drop_job(job)

    def status(self) -> dict:
        return {"in_flight": len(self.reads), "served": self.served, "bytes": self.bytes,
                "staging_bytes": sum(r.seg.size for r in self.reads.values())
                + sum(s.size for ss in self.spares.values() for s in ss)}
