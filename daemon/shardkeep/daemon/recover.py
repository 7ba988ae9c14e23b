"""Rebuild a replacement node from its group: its slots from the survivors' data and parity, its parity too.

Run by the replacement daemon (``shardkeep recover`` sends it the ``recover``
request).  For each version its peers hold at group level: fetch every node's
manifests and sizes, recreate this node's slots from its own manifests, and for
each stripe in which this node holds data, fetch ``k`` surviving fragments
(the other data holders' chunks and parity) and reconstruct this node's chunk
straight into its slots; for each stripe in which it holds parity, fetch the
``k`` data chunks and re-encode.  Every rebuilt slot is verified against its
manifest's checksums before it is offered.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import msgpack

from shardkeep.proto.errors import IntegrityError, ShardkeepError, UnavailableError
from shardkeep.proto.manifest import Manifest

from shardkeep.proto.faults import Phase

from . import metrics
from .arena import Segment, create_segment, create_slot, pwrite_all, verify_slot
from .jobs import JobState
from .stripes import chunk_bounds

log = logging.getLogger("shardkeep.recover")

FETCH = 8 << 20   # bytes per fetch request
WINDOW = 4        # fetch requests in flight per source: the survivor copies the next piece while one travels
STRIPES = 2       # stripes rebuilt at once: one's fragments travel while another is decoded


async def rebuild(daemon: Any) -> dict:
    group = daemon.group
    if group is None or group.gc is None:
        raise UnavailableError("this daemon has no group to recover from")
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    # a replacement just started may not have heard from its peers yet: give them a moment
    deadline = t0 + 2 * group.cfg.timeouts.peer_down + 5
    while time.monotonic() < deadline and not all(group.peer_up(j) for j in group.clients):
        await asyncio.sleep(0.2)
    live = [j for j, c in group.clients.items() if group.peer_up(j)]
    if not live:
        raise UnavailableError(f"no peer of node {group.node}'s group is up: nothing to recover from "
                               f"(peers: {', '.join(c.address for c in group.clients.values())})")
    held: dict[tuple[str, int], list[int]] = {}
    for j in live:
        try:
            r = await group.clients[j].request("inventory", {}, timeout=10)
        except ShardkeepError as exc:
            log.warning("inventory of node %d failed: %s", j, exc)
            continue
        for v in r.fields.get("versions", []):
            if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str)
                    and all(type(x) is int and x >= 0 for x in v[1:])):
                log.warning("node %d sent a malformed inventory entry %r", j, v)
                continue
            held.setdefault((v[0], v[1], v[2]), []).append(j)
    newest: dict[str, tuple[int, int]] = {}  # job -> (step, epoch) of its newest group-level version
    for job, step, epoch in held:
        newest[job] = max((step, epoch), newest.get(job, (-1, 0)))
    per_version = len(group.placement.data_stripes(group.node)) + len(group.placement.parity_stripes(group.node))
    daemon.recover_progress = {"state": "running", "versions": len(newest), "stripes_done": 0,
                               "stripes_total": per_version * len(newest), "bytes_fetched": 0}
    done, failed = [], []
    n, m = group.placement.n, group.placement.m
    for job, (step, epoch) in sorted(newest.items()):
        # only the nodes that hold this version can serve it (another replacement may be up, but empty)
        holders = sorted(held[(job, step, epoch)])
        lost = sorted(set(range(n)) - set(holders))
        if len(lost) > m:
            why = (f"job {job!r} step {step} (its newest group-level version) cannot be rebuilt: nodes {lost} "
                   f"do not hold it (this node {group.node} among them), more than the group's parity "
                   f"m={m} can recover; only nodes {holders} hold it")
            daemon.unrecoverable[job] = why
            failed.append(why)
            continue
        try:
            done.append(await _rebuild_version(daemon, job, step, epoch, holders, loop))
            daemon.unrecoverable.pop(job, None)
        except BaseException as exc:
            daemon.recover_progress["state"] = "failed"
            daemon.unrecoverable[job] = f"rebuilding job {job!r} step {step} failed: {exc}"
            raise
    if failed:
        daemon.recover_progress["state"] = "failed"
        raise UnavailableError("; ".join(failed) + (f" (rebuilt: {[(v['job'], v['step']) for v in done]})"
                                                      if done else ""))
    daemon.recover_progress["state"] = "done"
    daemon.recover_progress["seconds"] = round(time.monotonic() - t0, 3)
    return {"versions": done, "seconds": round(time.monotonic() - t0, 3)}


async def _fetch(group: Any, sources: list[int], fields: dict, length: int, dst: Segment, at: int,
                 progress: dict | None = None) -> None:
    """Fill ``length`` bytes of ``dst`` from offset ``at``, fetched from the first source that answers.

    Up to ``WINDOW`` requests of ``FETCH`` bytes are in flight at a time; each reply goes
    from the received frame into the segment by ``pwrite`` in a copy thread (no
    page faults in this process, no GIL, off the event loop).
    """
    loop = asyncio.get_running_loop()
    last: Exception | None = None
    for j in sources:
        client = group.clients[j]
        window = asyncio.Semaphore(WINDOW)

        async def piece(off: int) -> None:
            n = min(FETCH, length - off)
            async with window:
                r = await client.request("fetch", {**fields, "offset": off, "length": n},
                                         timeout=group.cfg.timeouts.rebuild_chunk)
            frame = r.payload[0]
            data = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
            if data.nbytes != n:
                raise IntegrityError(f"node {j} sent {data.nbytes} bytes for {n}")
            await loop.run_in_executor(group.gc.copier, pwrite_all, dst.fd, data, at + off)
            if progress is not None:
                progress["bytes_fetched"] = progress.get("bytes_fetched", 0) + n

        try:
            await _all([piece(off) for off in range(0, length, FETCH)])
            return
        except ShardkeepError as exc:
            last = exc
            log.warning("fetch %s from node %d failed: %s", fields, j, exc)
    raise UnavailableError(f"no survivor could send {fields}: {last}")


async def _all(coros: list) -> list:
    """Run ``coros`` together; the first error cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _rebuild_version(daemon: Any, job: str, step: int, epoch: int, live: list[int], loop) -> dict:
    created: list = []  # slots and segments this attempt made: all go if it fails
    try:
        return await _rebuild_version_into(daemon, job, step, epoch, live, loop, created)
    except BaseException:
        for seg in created:
            seg.destroy()
        raise


async def _rebuild_version_into(daemon: Any, job: str, step: int, epoch: int, live: list[int], loop,
                                created: list) -> dict:
    group = daemon.group
    gc, p, me, k, m = group.gc, group.placement, group.node, group.placement.k, group.placement.m
    spec = gc.spec
    info = None
    for j in live:
        try:
            info = await group.clients[j].request("fetch", {"job": job, "step": step, "epoch": epoch, "what": "manifest"},
                                                  timeout=30)
            break
        except ShardkeepError as exc:
            log.warning("manifests of %s step %d from node %d: %s", job, step, j, exc)
    if info is None:
        raise UnavailableError(f"no survivor holds job {job!r} step {step} at group level")
    sizes = {int(a): b for a, b in info.fields["sizes"].items()}
    body = msgpack.unpackb(info.payload[0].bytes, raw=False, strict_map_key=False)
    manifests = {int(a): b for a, b in body["manifests"].items()}
    headers_any = {int(a): b for a, b in body["headers"].items()}
    mine = msgpack.unpackb(manifests[me], raw=False, strict_map_key=False)
    # 1. this node's slots, from its own manifests
    if job in daemon.jobs:
        raise UnavailableError(f"job {job!r} already exists on this node; recover runs on an empty replacement")
    slots, decoded = [], {}
    for rank in sorted(int(r) for r in mine):
        raw = mine[rank] if rank in mine else mine[str(rank)]
        mf = Manifest.decode(raw, 1 << 62)
        decoded[rank] = (mf, raw)
        slot = await loop.run_in_executor(daemon._pool, create_slot, daemon._next_slot_id(), daemon.cfg.shm_prefix,
                                          job, rank, mf.data_bytes, int(len(raw) * 1.25) + (64 << 10))
        slots.append(slot)
        created.append(slot)
    first = next(iter(decoded.values()))[0]
    jobstate = JobState(job, first.world_size, first.local_world_size, history=first.history)
    views = [memoryview(s.mm)[s.header.data_offset : s.header.data_offset + decoded[r][0].data_bytes]
             for s, r in zip(slots, sorted(decoded))]
    assert sum(len(v) for v in views) == sizes[me], "manifests and payload size disagree"

    def extents(a: int, b: int) -> list[tuple[str, int, int]]:
        out, pos = [], 0
        for s, v in zip(slots, views):
            lo, hi = max(a, pos), min(b, pos + len(v))
            if lo < hi:
                out.append((s.name, s.header.data_offset + lo - pos, hi - lo))
            pos += len(v)
        return out

    def chunk(h: int, s: int) -> tuple[int, int]:
        return chunk_bounds(sizes[h], k)[p.chunk_of(h, s)]

    def L(s: int) -> int:
        return max((b - a for a, b in (chunk(h, s) for h in p.data_holders(s))), default=0)

    def pad(s: int) -> int:
        return -(-L(s) // spec.piece) * spec.piece

    async def headers_of(s: int) -> bytes:
        """Fragment headers of stripe s: kept by its parity holders."""
        if s not in headers_any:
            for h in p.parity_holders(s):
                if h == me or h not in live:
                    continue
                try:
                    r = await group.clients[h].request("fetch", {"job": job, "step": step, "epoch": epoch, "what": "manifest"},
                                                       timeout=30)
                except ShardkeepError:
                    continue
                more = msgpack.unpackb(r.payload[0].bytes, raw=False, strict_map_key=False)["headers"]
                headers_any.update({int(a): b for a, b in more.items()})
                if s in headers_any:
                    break
        if s not in headers_any:
            raise UnavailableError(f"no survivor holds the parity headers of stripe {s} of {job!r} step {step}")
        return headers_any[s]

    tag = secrets.token_hex(3)
    layout, off = {}, 0
    for s_, _ in p.parity_stripes(me):
        layout[s_] = (off, pad(s_))
        off += pad(s_)
    parity: Segment = await loop.run_in_executor(daemon._pool, create_segment,
                                                 f"{daemon.cfg.shm_prefix}-g-parity-{job}-{step}-{tag}", off)
    created.append(parity)
    headers: dict[int, bytes] = {}

    async def rebuild_stripe(s: int, want: dict[int, list]) -> None:
        """Fragments ``want`` of stripe s from k fragments the survivors hold (data first, then parity)."""
        Ls, ps = L(s), pad(s)
        await daemon.faults.ahit(Phase.REBUILD)
        st = await loop.run_in_executor(daemon._pool, create_segment,
                                        f"{daemon.cfg.shm_prefix}-g-rebuild-{tag}-{s}", k * Ls + m * ps)
        try:
            have: dict[int, list] = {}
            fetches = []
            for idx, h in enumerate(p.data_holders(s)):
                if h == me or h not in live:
                    continue
                n = (lambda ab: ab[1] - ab[0])(chunk(h, s))
                if n:
                    fetches.append(_fetch(group, [h], {"job": job, "step": step, "epoch": epoch, "what": "data",
                                                      "stripe": s}, n, st, idx * Ls, daemon.recover_progress))
                have[idx] = [(st.name, idx * Ls, n)] if n else []
            spare = [(j, h) for j, h in enumerate(p.parity_holders(s)) if h != me and h in live]
            for j, h in spare[: max(0, k - len(have))]:  # the parity that stands in for lost chunks
                fetches.append(_fetch(group, [h], {"job": job, "step": step, "epoch": epoch, "what": "parity",
                                                  "stripe": s}, ps, st, k * Ls + j * ps, daemon.recover_progress))
                have[k + j] = [(st.name, k * Ls + j * ps, ps)]
            await _all(fetches)  # every survivor's fragment at once
            if all(i in have for i in range(k)):  # every data chunk survives: encode (this also gives the headers)
                out = [[(st.name, k * Ls + q * ps, ps)] for q in range(m)]
                hdr = await gc.pool.encode(spec, [have[i] for i in range(k)], Ls, out) if Ls else b""
                for idx, ext in want.items():
                    if idx >= k:
                        q = idx - k
                        base = ext[0][1]
                        await loop.run_in_executor(gc.copier, pwrite_all, parity.fd,
                                                   memoryview(st.mm)[k * Ls + q * ps : k * Ls + (q + 1) * ps], base)
                headers[s] = hdr
                return
            if len(have) < k:
                raise UnavailableError(f"stripe {s} of {job!r} step {step}: only {len(have)} of {k} fragments survive")
            hdr = await headers_of(s)
            if Ls:
                t_dec = time.monotonic()
                await gc.pool.reconstruct(spec, have, hdr, Ls, want)
                metrics.CODEC_BYTES.labels("decode").inc(Ls * len(want))
                metrics.CODEC_SECONDS.labels("decode").inc(time.monotonic() - t_dec)
            headers[s] = hdr
        finally:
            st.destroy()
            daemon.recover_progress["stripes_done"] += 1

    gate = asyncio.Semaphore(STRIPES)

    async def gated(s: int, want: dict[int, list]) -> None:
        async with gate:
            await rebuild_stripe(s, want)

    # 2. this node's data chunks, straight into its slots
    todo = []
    for s in p.data_stripes(me):
        a, b = chunk(me, s)
        if b > a:
            todo.append(gated(s, {p.data_index(s, me): extents(a, b)}))
        else:
            daemon.recover_progress["stripes_done"] += 1  # nothing of ours in this stripe
    await _all(todo)
    # 3. verify and commit the slots
    for slot, rank in zip(slots, sorted(decoded)):
        mf, raw = decoded[rank]
        daemon._commit_seq += 1
        slot.commit(mf, raw, daemon._commit_seq)
        slot.epoch = epoch
        try:
            await loop.run_in_executor(daemon._pool, verify_slot, slot)
        except Exception as exc:
            raise IntegrityError(f"rebuilt job {job!r} rank {rank} step {step} fails verification: {exc}") from None
        jobstate.rank_state(rank).slots.append(slot)
    # 4. this node's parity
    await _all([gated(s, {k + j: [(parity.name, layout[s][0], layout[s][1])]}) for s, j in p.parity_stripes(me)])
    gc.adopt_rebuilt(job, step, sizes, manifests, views, parity, layout, headers, epoch)
    jobstate.recorded = [step]
    jobstate.group_recorded = [step]
    daemon.jobs[job] = jobstate
    log.info("rebuilt job %s step %d: %d ranks, %d bytes of data, %d parity stripes",
             job, step, len(slots), sizes[me], len(layout))
    return {"job": job, "step": step, "ranks": sorted(decoded), "bytes": sizes[me], "parity_stripes": sorted(layout)}
