"""Erasure-coding one version of a job across the group (the data path of the group commit).

For version (job, step) every node knows its own payload (its ranks' committed
data, in rank order) and learns every other node's size from their
``local-commit``.  Then, per DESIGN.md's stripe layout (``stripes.py``):

1. each node sends chunk ``c`` of its payload to the encoder of the ``c``-th
   stripe in which it is a data holder, in pieces over the data plane (zero-copy
   from shared memory);
2. the encoder of stripe ``s`` (node ``s``) gathers the ``k`` chunks in a staging
   segment, encodes them in worker processes (``codec.CodecPool``), keeps parity
   0, and ships parity ``1..m-1`` (and the fragment headers) to the other parity
   holders;
3. a node that holds all the parity it is due for the version tells every node
   (``ack``);
4. the job's coordinator (the lowest-index live node) decides: with every
   node's ack it records the version at group level and tells every node
   (``committed``); when the commit cannot finish in time it decides abort
   (``abort``).  Only the coordinator decides, so no two nodes can disagree on
   a version: a node that acked keeps the version whole (data and parity)
   until it learns the decision, and if the coordinator is lost first it asks
   the survivors (``outcome``) and the new coordinator decides.

This module holds no sockets: the caller passes ``send_data`` and ``broadcast``
and feeds it the peer messages; it owns the staging and parity segments.
Any one stripe is recoverable from any ``k`` of its ``k + m`` fragments with the
headers kept here (``parity_of``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging

import os
import secrets
import time

import msgpack
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from shardkeep.proto.errors import IntegrityError, ProtocolError, ShardkeepError, ShardkeepTimeoutError
from shardkeep.proto.faults import Phase, plan as fault_plan

from . import metrics
from .arena import SHM_DIR, Segment, create_segment, open_segment, pread_exact, pwrite_all
from .groupmeta import MAX_RECORD, ParityRecord
from .codec import CodecPool, CodecSpec, lower_thread_priority, substripes
from .stripes import Placement, chunk_bounds

log = logging.getLogger("shardkeep.groupcommit")


class GroupCommitAborted(ShardkeepError):
    """The coordinator aborted the group commit of a version (it stays at local level)."""

PIECE = 4 << 20  # bytes per data-plane message
ROW_BYTES = 4 << 20  # per data chunk and ring row of the encoder (whole codec pieces)
RING_BYTES = 64 << 20  # the encoder's staging ring, at most (at least 2 rows)
# Staging rings and parity segments are kept for the next version of the job instead of being created
# (and faulted in by every codec worker) anew each time.  Only a released version's segments are kept
# (the parity of the newest group-level version is never reused while it is held), at most this many
# free ones per job and kind; a spare of another size (a layout change) is removed.
SPARES = {"stage": 1, "parity": 2}
SPARE_SLACK = 1 / 8  # a spare up to this much larger than needed is reused
SPARE_IDLE_S = 60.0  # spares of a job that started no version for this long are removed (memory at rest)
COPY_THREADS = 2  # threads that copy data and parity pieces into shm (pwrite/pread: no GIL held)


@dataclass
class _Version:
    job: str
    step: int
    epoch: int = 0               # the job's launch, agreed by its ranks at restore(): a re-run step is a new version
    sizes: dict[int, int] = field(default_factory=dict)
    manifests: dict[int, bytes] = field(default_factory=dict)  # node -> its ranks' manifests (opaque here)
    views: list[memoryview] | None = None
    staging: Segment | None = None
    early: list[tuple[str, dict, memoryview]] = field(default_factory=list)
    parity: Segment | None = None
    layout: dict[int, tuple[int, int]] = field(default_factory=dict)   # stripe -> (offset, padded len)
    parity_got: dict[int, int] = field(default_factory=dict)
    headers: dict[int, bytes] = field(default_factory=dict)
    stored: set[int] = field(default_factory=set)
    acked: bool = False
    acks: set[int] = field(default_factory=set)
    committed: asyncio.Future | None = None   # the decision: True = group level, False = aborted
    decided: str = ""                           # "", "commit" or "abort"
    reason: str = ""
    preparing: asyncio.Task | None = None
    ready: bool = False          # segments exist: data pieces go straight to them
    tag: str = ""
    row: int = 0                 # encoder: bytes of each data chunk per ring row
    rows: int = 0
    window: int = 0              # rows in the ring
    row_need: dict[int, int] = field(default_factory=dict)
    row_got: dict[int, int] = field(default_factory=dict)    # bytes of row q accepted (copies may be running)
    row_in: dict[int, int] = field(default_factory=dict)     # ... and copied into the ring
    row_headers: dict[int, bytes] = field(default_factory=dict)
    rows_done: int = 0
    t0: float = field(default_factory=time.monotonic)
    t_sizes: float = 0.0
    t_encode0: float = 0.0
    t_encode1: float = 0.0
    encode_s: float = 0.0        # summed time of the row encodes
    record: str = ""             # name of the saved ParityRecord (a restarted daemon re-adopts it)
    released: bool = False       # out of ``versions``: its segments go back to the spares
    busy: int = 0                # row encodes (codec workers) and copies (threads) writing into its segments
    saving: bool = False         # its ParityRecord is being written (it names the parity segment)


class GroupCommit:
    def __init__(self, node: int, placement: Placement, spec: CodecSpec, pool: CodecPool, prefix: str,
                 send_data: Callable[..., Awaitable[Any]], broadcast: Callable[..., Awaitable[None]],
                 executor: Any = None, *, coordinator: Callable[[], int] | None = None,
                 ask: Callable[[int, str, dict], Awaitable[dict]] | None = None,
                 tell: Callable[[int, str, dict], Awaitable[None]] | None = None,
                 live: Callable[[], list[int]] | None = None, resolve_timeout: float = 15.0,
                 commit_timeout: float = 30.0) -> None:
        if spec.k != placement.k or spec.m != placement.m:
            raise ValueError("codec spec and placement disagree on k and m")
        self.node, self.p, self.spec, self.pool = node, placement, spec, pool
        self.prefix, self.send_data, self.broadcast, self.executor = prefix, send_data, broadcast, executor
        # who decides (the lowest live node), how to ask a peer, which peers are up
        self.coordinator = coordinator or (lambda: 0)
        self.ask = ask
        self.tell = tell or _no_tell
        self.live = live or (lambda: [])
        self.resolve_timeout = resolve_timeout
        self.commit_timeout = commit_timeout
        self.faults = fault_plan()
        self.versions: dict[tuple[str, int], _Version] = {}
        self.abandoned: collections.OrderedDict = collections.OrderedDict()  # (job, step, epoch): late messages dropped
        self.declined: collections.OrderedDict = collections.OrderedDict()  # (job, step, epoch) -> why (``decline``)
        self.recent: collections.deque = collections.deque(maxlen=32)  # timing of the last decided versions
        self.spares: dict[tuple[str, str], list[Segment]] = {}   # (job, kind) -> free segments of released versions
        self.segments_created: collections.Counter[str] = collections.Counter()
        self.segments_reused: collections.Counter[str] = collections.Counter()
        self.spares_dropped: set[str] = set()   # jobs whose spares were dropped: late segments are removed
        self.spares_used: dict[str, float] = {}  # job -> when it last took a segment
        # bulk copies run here, never on the event loop (which answers the trainers' begin and commit)
        self.copier = concurrent.futures.ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="sk-copy",
                                                            initializer=lower_thread_priority)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("node %d: group commit task failed: %r", self.node, task.exception(),
                      exc_info=task.exception())

    # --- geometry ------------------------------------------------------------------------

    def _chunk(self, v: _Version, holder: int, s: int) -> tuple[int, int]:
        return chunk_bounds(v.sizes[holder], self.p.k)[self.p.chunk_of(holder, s)]

    def stripe_len(self, v: _Version, s: int) -> int:
        return max((b - a for a, b in (self._chunk(v, h, s) for h in self.p.data_holders(s))), default=0)

    def padded(self, v: _Version, s: int) -> int:
        return substripes(self.stripe_len(v, s), self.spec.piece) * self.spec.piece

    def _v(self, job: str, step: int, epoch: int = 0) -> _Version:
        v = self.versions.get((job, step, epoch))
        if v is None:
            v = self.versions[(job, step, epoch)] = _Version(job, step, epoch)
            self._spawn(self._watchdog(v))
            v.committed = asyncio.get_running_loop().create_future()
        return v

    # --- entry points ------------------------------------------------------------------------

    async def start(self, job: str, step: int, views: list[memoryview], manifests: bytes = b"",
                    epoch: int = 0) -> _Version:
        """This node's payload of (job, step) is committed locally: join the group commit.

        ``manifests`` (this node's ranks' manifests) go to every node, so that a
        rebuild of this node can recreate its slots from any survivor.
        """
        if (job, step, epoch) in self.abandoned:
            why = self.abandoned[(job, step, epoch)]
            raise GroupCommitAborted(f"group commit of job {job!r} step {step} was aborted before this node "
                                     f"joined it{': ' + why if why else ''}")
        v = self._v(job, step, epoch)
        v.views = views
        v.sizes[self.node] = sum(len(x) for x in views)
        v.manifests[self.node] = manifests
        await self.broadcast("local-commit", {**_ident(v), "bytes": v.sizes[self.node]}, [manifests])
        self._advance(v)
        return v

    async def wait(self, job: str, step: int, timeout: float, epoch: int = 0) -> None:
        """Until (job, step) is decided; raises unless it reached group level.

        After ``timeout`` a node that never acked gives up at once (no version
        commits without every node's ack); one that acked first learns or makes
        the decision (``_resolve``), because the coordinator may have recorded
        the version and released the one before.
        """
        v = self._v(job, step, epoch)
        try:
            ok = await asyncio.wait_for(asyncio.shield(v.committed), timeout)
        except asyncio.TimeoutError:
            why = (f"group commit of job {job!r} step {step} on node {self.node} did not finish in {timeout:.0f}s "
                   f"(sizes from {sorted(v.sizes)}, parity stored for stripes {sorted(v.stored)}, "
                   f"acks from {sorted(v.acks)}, rows encoded {v.rows_done} of {v.rows}, early {len(v.early)})")
            if self.coordinator() == self.node:
                await self._coordinate(v, "commit" if len(v.acks) == self.p.n else "abort", why)
            elif not v.acked:
                self._decide(v, "abort", broadcast=False, reason=why)
            if not v.decided:
                await self._resolve(v)
            ok = v.committed.result()
            if not ok:
                raise ShardkeepTimeoutError(why, what="group-commit", after=timeout) from None
        if not ok:
            raise GroupCommitAborted(f"group commit of job {job!r} step {step} was aborted: {v.reason}")

    async def _watchdog(self, v: _Version) -> None:
        """A version other nodes began but this one never joined (its trainers died first, say) must not
        stay open for ever: after the group-commit timeout it is aborted (it cannot commit without us)."""
        assert v.committed is not None
        try:
            await asyncio.wait_for(asyncio.shield(v.committed), self.commit_timeout + 1)
        except asyncio.TimeoutError:
            if v.views is None and not v.decided and self.versions.get((v.job, v.step, v.epoch)) is v:
                why = f"node {self.node} never joined it within {self.commit_timeout:.0f}s"
                if self.coordinator() == self.node:
                    await self._coordinate(v, "abort", why)
                if not v.decided:
                    self._decide(v, "abort", broadcast=False, reason=why)

    async def _resolve(self, v: _Version) -> None:
        """Learn the decision on a version this node acked: ask the survivors, or decide as coordinator."""
        assert v.committed is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.resolve_timeout
        while not v.committed.done():
            if self.coordinator() == self.node:
                # the old coordinator is gone: a survivor that heard its decision wins, else ours
                heard = await self._ask_outcomes(v)
                if v.committed.done():
                    break
                if "commit" in heard:
                    self._decide(v, "commit", broadcast=True, reason="")
                elif "abort" in heard:
                    self._decide(v, "abort", broadcast=True, reason="aborted by the coordinator")
                else:
                    await self._coordinate(v, "commit" if len(v.acks) == self.p.n else "abort",
                                           f"no decision arrived; acks from {sorted(v.acks)}")
                if v.committed.done():
                    break
            heard = await self._ask_outcomes(v)
            if v.committed.done():
                break
            if "commit" in heard or "abort" in heard:
                self._decide(v, "commit" if "commit" in heard else "abort", broadcast=False,
                             reason="aborted by the coordinator")
                break
            if loop.time() > deadline and not v.committed.done():
                # nobody knows and we do not decide: keeping the data would block this node's
                # snapshots forever; no live node recorded it, so the version before stays whole
                self._decide(v, "abort", broadcast=False,
                             reason=f"no decision within {self.resolve_timeout:.0f}s from coordinator "
                                    f"node {self.coordinator()}")
                break
            try:
                await asyncio.wait_for(asyncio.shield(v.committed), 0.5)
            except asyncio.TimeoutError:
                pass

    def abort_version(self, job: str, step: int, epoch: int, reason: str) -> None:
        """A node skipped the step: it will never commit, so nobody waits for it."""
        v = self.versions.get((job, step, epoch))
        if v is None:
            self._mark_abandoned(job, step, epoch, reason)  # its local-commits may still arrive: drop them
            return
        if not v.decided:
            self._decide(v, "abort", broadcast=False, reason=reason)

    def decline(self, job: str, step: int, epoch: int, reason: str) -> None:
        """This node keeps (job, step) at local level and will not join its group commit (it sees the
        group degraded).  The version can never have this node's ack, so aborting it anywhere is
        consistent; the nodes that did join it (their ``local-commit`` came, or comes later) are told
        at once.  Otherwise a node that sees the group whole a moment earlier (at a heal, over a
        flapping link) waits out the group-commit timeout with the version's slots pinned.  While
        every node sees the group degraded nobody joins, and nothing is sent."""
        key = (job, step, epoch)
        self.declined[key] = reason[:200]
        while len(self.declined) > 4096:
            self.declined.popitem(last=False)
        v = self.versions.get(key)
        joined = sorted(j for j in v.sizes if j != self.node) if v is not None else []
        self.abort_version(job, step, epoch, reason)
        for j in joined:
            self._tell_declined(j, key)

    def _tell_declined(self, j: int, key: tuple[str, int, int]) -> None:
        job, step, epoch = key
        reason = self.declined.get(key, "declined")

        async def tell() -> None:
            try:
                await self.tell(j, "abort", {"job": job, "step": step, "epoch": epoch, "reason": reason})
            except ShardkeepError as exc:  # it learns from the coordinator or its own timeout
                log.debug("node %d: abort of job %s step %d not sent to node %d: %s", self.node, job, step, j, exc)

        self._spawn(tell())

    def peers_down(self, down: set[int]) -> None:
        """Peers just went down: the coordinator decides what they leave undecided without waiting out
        the group-commit timeout (every ack in: commit; a lost node's ack missing: abort)."""
        if self.coordinator() != self.node:
            return
        for v in list(self.versions.values()):
            if v.decided:
                continue
            if len(v.acks) == self.p.n:
                self._spawn(self._coordinate(v, "commit", ""))
            elif down - v.acks:
                self._spawn(self._coordinate(
                    v, "abort", f"node(s) {sorted(down - v.acks)} went down before acknowledging"))

    async def _coordinate(self, v: _Version, proposal: str, reason: str) -> None:
        """Decide v as the coordinator (the lowest node this one sees up).

        A node is coordinator because every lower node seems down; under load
        that can be a false suspicion, and two deciders could disagree.  So it
        first asks the lower nodes: a decision one of them heard wins; one that
        answers "pending" is alive and decides itself; only when none answers
        (or none knows the version) does this node decide.
        """
        if v.decided:
            return
        lower = list(range(self.node))
        if lower and self.ask is not None:
            answers = await self._ask_outcomes(v, lower)  # the down ones do not answer, as we thought
            if v.decided:
                return
            if "commit" in answers or "abort" in answers:
                self._decide(v, "commit" if "commit" in answers else "abort", broadcast=True,
                             reason="decided by a lower node")
                return
            if "pending" in answers:
                log.info("node %d: a lower node is up and decides job %s step %d", self.node, v.job, v.step)
                return
        self._decide(v, proposal, broadcast=True, reason=reason)

    async def _ask_outcomes(self, v: _Version, nodes: list[int] | None = None) -> set[str]:
        """The outcomes ``nodes`` (default: every live peer) know of v; a peer that does not answer adds ""."""
        if self.ask is None:
            return set()
        if nodes is None:
            nodes = [j for j in self.live() if j != self.node]

        async def one(j: int) -> str:
            try:
                r = await self.ask(j, "outcome", _ident(v))
                return str(r.get("outcome", ""))
            except Exception as exc:  # a dead peer is no answer
                log.debug("outcome of %s step %d from node %d: %r", v.job, v.step, j, exc)
                return ""

        return set(await asyncio.gather(*(one(j) for j in nodes)))

    def outcome(self, job: str, step: int, epoch: int = 0) -> str:
        """What this node knows of (job, step, epoch): commit, abort, pending, or unknown."""
        if (job, step, epoch) in self.abandoned:
            return "abort"
        v = self.versions.get((job, step, epoch))
        if v is None:
            return "unknown"
        return v.decided or "pending"

    def _decide(self, v: _Version, outcome: str, *, broadcast: bool, reason: str = "") -> None:
        if v.decided:
            return
        if outcome == "commit" and broadcast:
            self.faults.hit(Phase.GROUP_COMMIT)  # the coordinator's decision, before anyone hears it
        v.decided, v.reason = outcome, reason
        if v.committed is not None and not v.committed.done():
            v.committed.set_result(outcome == "commit")
        self.recent.append(self.timing(v))
        if outcome == "abort" and v.views is None and self.versions.get((v.job, v.step, v.epoch)) is v:
            self.abandon(v.job, v.step, v.epoch, reason)  # never joined here: nobody else will free it
        if outcome == "commit":
            log.info("node %d: job %s step %d group-committed", self.node, v.job, v.step)
            if v.parity is not None and not v.record:
                self._spawn(self._save_record(v))
        else:
            log.warning("node %d: job %s step %d aborted at group level: %s", self.node, v.job, v.step, reason)
        if broadcast:
            if outcome == "commit":
                self._spawn(self.broadcast("committed", {**_ident(v), "level": "group"}))
            else:
                self._spawn(self.broadcast("abort", {**_ident(v), "reason": reason[:200]}))

    def on_control(self, src: int, mtype: str, f: dict, payload: list | None = None) -> None:
        if _key(f) in self.abandoned:
            if mtype == "local-commit" and _key(f) in self.declined:  # joined after this node declined it
                self._tell_declined(src, _key(f))
            return
        v = self._v(*_key(f))
        if mtype == "local-commit":
            if "bytes" not in f:
                raise ProtocolError("local-commit without its payload size")
            v.sizes[src] = f["bytes"]
            if payload:
                v.manifests[src] = bytes(payload[0])
            self._advance(v)
        elif mtype == "ack":
            v.acks.add(src)
            self._check_committed(v)
        elif mtype == "committed":
            if not v.acked:  # every node acks before anyone decides commit: this one is confused
                raise ProtocolError(f"node {src} says step {f['step']} committed, but this node never acked it")
            self._decide(v, "commit", broadcast=False)
        elif mtype == "abort":
            # from the coordinator, or from a node that declined the version (``decline``): the
            # coordinator passes the latter on, since the sender may not see every node up
            relay = self.coordinator() == self.node and src != self.node and bool(v.sizes)
            self._decide(v, "abort", broadcast=relay, reason=f"node {src}: {f.get('reason', '')}")

    def on_data(self, src: int, kind: str, meta: dict, payload: memoryview) -> Awaitable[None] | None:
        """A data message: checked here; the copy into shm is the returned awaitable (await it before the
        next message of the same sender: it runs in a thread, the payload must stay alive until then)."""
        if _key(meta) in self.abandoned:
            return None
        v = self._v(*_key(meta))
        if not self._ready(v):
            v.early.append((kind, meta, payload))  # sizes or segments not known yet (the view keeps the frame)
            return None
        return self._store(v, kind, meta, payload)

    # --- the steps ------------------------------------------------------------------------------

    def _ready(self, v: _Version) -> bool:
        return v.ready

    def _advance(self, v: _Version) -> None:
        if len(v.sizes) < self.p.n or v.preparing is not None:
            return
        v.preparing = self._spawn(self._prepare(v))

    async def _prepare(self, v: _Version) -> None:
        """All sizes known: take the staging ring and the parity segment, then pull the first rows."""
        me = self.node  # the stripe this node encodes
        L = self.stripe_len(v, me)
        v.tag = secrets.token_hex(3)
        v.t_sizes = time.monotonic()
        k, m = self.p.k, self.p.m
        v.row = self.row_bytes()
        v.rows = -(-L // v.row)
        v.window = max(1, min(v.rows, self.ring_rows()))
        off = 0
        for s, _ in self.p.parity_stripes(self.node):
            v.layout[s] = (off, self.padded(v, s))
            off += self.padded(v, s)
        if v.rows:
            seg = await self._segment(v.job, "stage", v.window * (k + m - 1) * v.row)
            if v.released:  # released while the segment was made: it goes straight back
                self._give(v.job, "stage", seg)
                return
            v.staging = seg
        seg = await self._segment(v.job, "parity", off)
        if v.released:
            self._give(v.job, "parity", seg)
            self._retire(v)
            return
        v.parity = seg
        v.ready = True
        early, v.early = v.early, []
        for kind, meta, payload in early:
            copy = self._store(v, kind, meta, memoryview(payload))
            if copy is not None:
                self._spawn(copy)
        if not v.rows:
            self._spawn(self._finish_stripe(v))
        for q in range(v.window):
            self._pull(v, q)

    # --- staging and parity segments, kept across versions -----------------------------------

    async def _segment(self, job: str, kind: str, size: int) -> Segment:
        """A ``kind`` ("stage" or "parity") segment of at least ``size`` bytes for ``job``: a spare of a
        released version when one fits (already mapped here and in the codec workers), else a new one."""
        size = max(size, 4096)
        self.spares_dropped.discard(job)
        self.spares_used[job] = time.monotonic()
        free = self.spares.get((job, kind), [])
        for i, seg in enumerate(free):
            if size <= seg.size <= size + int(size * SPARE_SLACK):
                self.segments_reused[kind] += 1
                return free.pop(i)
        for seg in free:  # the layout changed: spares of another size are no use any more
            seg.destroy()
        free.clear()
        self.segments_created[kind] += 1
        name = f"{self.prefix}-{kind}-{job}-{secrets.token_hex(4)}"
        return await asyncio.get_running_loop().run_in_executor(self.executor, create_segment, name, size)

    def _give(self, job: str, kind: str, seg: Segment) -> None:
        free = self.spares.setdefault((job, kind), [])
        if len(free) < SPARES[kind] and seg not in free and job not in self.spares_dropped:
            free.append(seg)
        else:
            seg.destroy()

    def _retire(self, v: _Version) -> None:
        """A released version's segments become spares once nothing can write into them any more
        (no row encode running in the codec workers, no parity record naming the segment being written)."""
        if not v.released or v.busy or v.saving:
            return
        if v.staging is not None:
            self._give(v.job, "stage", v.staging)
        if v.parity is not None:
            self._give(v.job, "parity", v.parity)
        v.staging = v.parity = None

    def drop_spares(self, job: str | None = None) -> None:
        """Remove the spare segments of ``job`` (it finished or was evicted), or of every job."""
        for key in [key for key in self.spares if job is None or key[0] == job]:
            for seg in self.spares.pop(key):
                seg.destroy()
            self.spares_dropped.add(key[0])
        if job is not None:  # segments of its versions still being encoded or recorded follow them
            self.spares_dropped.add(job)

    def trim_spares(self, idle: float = SPARE_IDLE_S) -> None:
        """Remove the spares of jobs that took no segment for ``idle`` seconds: a job that snapshots to
        group level that rarely pays a new segment per version, and memory at rest is only what it holds."""
        now = time.monotonic()
        for job in {key[0] for key in self.spares}:
            if now - self.spares_used.get(job, 0.0) > idle:
                self.drop_spares(job)
                self.spares_dropped.discard(job)  # not finished: the next version's segments are kept again

    def segment_bytes(self) -> dict[str, int]:
        """/dev/shm bytes of the group commit: parity held by versions, staging rings, spares."""
        vs = list(self.versions.values())
        return {"parity": sum(v.parity.size for v in vs if v.parity is not None),
                "staging": sum(v.staging.size for v in vs if v.staging is not None),
                "spare": sum(seg.size for free in self.spares.values() for seg in free)}

    # --- the encoder of stripe `node`: a bounded ring of rows, pulled from the data holders -----

    def row_bytes(self) -> int:
        """Bytes of one data chunk per ring row: whole codec pieces, about ROW_BYTES."""
        piece = self.spec.piece
        return max(1, ROW_BYTES // piece) * piece

    def ring_rows(self) -> int:
        per_row = (self.p.k + self.p.m - 1) * self.row_bytes()
        return max(2, min(8, RING_BYTES // per_row))

    def _row_bytes_of(self, v: _Version, holder: int, q: int) -> int:
        a, b = self._chunk(v, holder, self.node)
        return max(0, min(v.row, (b - a) - q * v.row))

    def _pull(self, v: _Version, q: int) -> None:
        """Ask every data holder for its bytes of row ``q``; they arrive as ``chunk`` data messages."""
        need = 0
        for h in self.p.data_holders(self.node):
            n = self._row_bytes_of(v, h, q)
            need += n
            if n:
                self._spawn(self.tell(h, "pull", {**_ident(v), "stripe": self.node,
                                                  "offset": q * v.row, "length": n}))
        v.row_need[q] = need
        v.row_got[q] = v.row_in[q] = 0
        if need == 0:
            self._spawn(self._encode_row(v, q))

    async def serve_pull(self, src: int, f: dict) -> None:
        """A data holder: send bytes [offset, offset+length) of our chunk of the stripe to its encoder."""
        v = self.versions.get(_key(f))
        s, off, n = f["stripe"], f.get("offset", 0), f.get("length", 0)
        if v is None or v.views is None or _key(f) in self.abandoned:
            raise ProtocolError(f"node {self.node} is not committing job {f['job']!r} step {f['step']}")
        if src != self.p.encoder(s) or s not in self.p.data_stripes(self.node):
            raise ProtocolError(f"node {src} does not encode stripe {s}, or node {self.node} holds no data in it")
        a, b = self._chunk(v, self.node, s)
        if not (0 <= off and 0 < n and off + n <= b - a):
            raise ProtocolError(f"pull of bytes {off}+{n} of a {b - a}-byte chunk")
        await self.faults.ahit(Phase.CHUNK_SEND)
        index = self.p.data_index(s, self.node)
        for start in range(a + off, a + off + n, PIECE):
            for piece_off, mv in _slices(v.views, start, min(start + PIECE, a + off + n)):
                await self.send_data(src, "chunk", {**_ident(v), "stripe": s, "index": index,
                                                    "offset": piece_off - a}, mv)

    def _ring(self, v: _Version, q: int, i: int) -> int:
        """Offset in the staging ring of fragment ``i`` (data 0..k-1, parity 1..m-1 as k..) of row q."""
        return (q % v.window) * (self.p.k + self.p.m - 1) * v.row + i * v.row

    async def _encode_row(self, v: _Version, q: int) -> None:
        loop = asyncio.get_running_loop()
        k, m, me = self.p.k, self.p.m, self.node
        st, par = v.staging, v.parity
        assert st is not None and par is not None
        n_q = min(v.row, self.stripe_len(v, me) - q * v.row)
        prow = substripes(n_q, self.spec.piece) * self.spec.piece
        base, _ = v.layout[me]
        data = []
        for i, h in enumerate(self.p.data_holders(me)):
            n = self._row_bytes_of(v, h, q)
            data.append([(st.name, self._ring(v, q, i), n)] if n else [])
        out = [[(par.name, base + q * v.row, prow)]] + [[(st.name, self._ring(v, q, k + j - 1), prow)]
                                                      for j in range(1, m)]
        if q == 0:
            await self.faults.ahit(Phase.ENCODE)
        t0 = time.monotonic()
        v.t_encode0 = v.t_encode0 or t0
        v.busy += 1
        try:
            v.row_headers[q] = await self.pool.encode(self.spec, data, n_q, out)
        finally:
            v.busy -= 1
        v.encode_s += time.monotonic() - t0
        if v.released:  # given up meanwhile: its segments may be reused now
            self._retire(v)
            return
        for j, holder in enumerate(self.p.parity_holders(me)[1:], start=1):
            at = self._ring(v, q, k + j - 1)
            for off in range(0, prow, PIECE):
                n = min(PIECE, prow - off)
                # a copy (in a thread): the ring row is reused before ZeroMQ has necessarily sent it
                v.busy += 1
                try:
                    piece = await loop.run_in_executor(self.copier, pread_exact, st.fd, n, at + off)
                finally:
                    v.busy -= 1
                if v.released:
                    self._retire(v)
                    return
                await self.send_data(holder, "parity", {**_ident(v), "stripe": me, "offset": q * v.row + off},
                                     piece)
        v.rows_done += 1
        nxt = q + v.window
        if nxt < v.rows and v.staging is not None:
            self._pull(v, nxt)
        if v.rows_done == v.rows:
            v.t_encode1 = time.monotonic()
            metrics.CODEC_BYTES.labels("encode").inc(self.p.k * self.stripe_len(v, self.node))
            metrics.CODEC_SECONDS.labels("encode").inc(v.t_encode1 - v.t_encode0)
            await self._finish_stripe(v)

    async def _finish_stripe(self, v: _Version) -> None:
        """Every row encoded: the headers go to the other parity holders; our parity is stored."""
        me = self.node
        headers = b"".join(v.row_headers[q] for q in range(v.rows))
        v.headers[me] = headers
        for holder in self.p.parity_holders(me)[1:]:
            await self.send_data(holder, "parity", {**_ident(v), "stripe": me, "headers": True},
                                 headers)
        v.parity_got[me] = v.layout[me][1]
        if v.staging is not None and not v.busy:
            self._give(v.job, "stage", v.staging)
            v.staging = None
        self._stored(v, me)

    def _store(self, v: _Version, kind: str, meta: dict, payload: memoryview) -> Awaitable[None] | None:
        """Check a data message against what was pulled or is due; return the copy into shm to await."""
        s = meta["stripe"]
        if kind == "chunk":
            if s != self.node or v.staging is None:
                raise ProtocolError(f"node {self.node} does not encode stripe {s} of {v.job!r} step {v.step}")
            index, off, n = meta["index"], meta["offset"], len(payload)
            q = off // v.row if v.row else -1
            if not (0 <= index < self.p.k and 0 <= off and q in v.row_need and v.row_got[q] + n <= v.row_need[q]):
                raise ProtocolError(f"chunk piece index {index} offset {off} was not pulled")
            r = off - q * v.row
            if r + n > self._row_bytes_of(v, self.p.data_holders(s)[index], q):
                raise ProtocolError(f"chunk piece out of range: index {index}, offset {off}, {n} bytes")
            v.row_got[q] += n
            return self._copy_in(v, v.staging, self._ring(v, q, index) + r, payload, row=q)
        if kind == "parity":
            if s not in v.layout or v.parity is None:
                raise ProtocolError(f"node {self.node} holds no parity of stripe {s}")
            if meta.get("headers"):
                v.headers[s] = bytes(payload)
                self._check_parity(v, s)
                return None
            base, pad = v.layout[s]
            off = meta["offset"]
            if not (0 <= off and off + len(payload) <= pad):
                raise ProtocolError("parity piece out of range")
            return self._copy_in(v, v.parity, base + off, payload, stripe=s)
        return None

    async def _copy_in(self, v: _Version, seg: Segment, at: int, payload: memoryview, *, row: int = -1,
                       stripe: int = -1) -> None:
        """Copy a received piece into a segment in a thread (pwrite: the GIL is released), then count it."""
        v.busy += 1  # the segment must not be reused or unmapped under the copy
        try:
            await asyncio.get_running_loop().run_in_executor(self.copier, pwrite_all, seg.fd, payload, at)
        finally:
            v.busy -= 1
        if v.released:
            self._retire(v)
            return
        if row >= 0:
            v.row_in[row] = v.row_in.get(row, 0) + len(payload)
            if v.row_in[row] == v.row_need[row]:
                self._spawn(self._encode_row(v, row))
        else:
            v.parity_got[stripe] = v.parity_got.get(stripe, 0) + len(payload)
            self._check_parity(v, stripe)

    def _check_parity(self, v: _Version, s: int) -> None:
        if v.parity_got.get(s, 0) == v.layout[s][1] and s in v.headers and s not in v.stored:
            self._stored(v, s)

    def _stored(self, v: _Version, s: int) -> None:
        self.faults.hit(Phase.PARITY_STORE)  # parity of stripe s is complete here (received or encoded)
        v.stored.add(s)
        if not v.acked and v.stored >= set(v.layout):
            if self.faults.hit(Phase.ACK) == "drop":
                return
            v.acked = True
            v.acks.add(self.node)
            self._spawn(self.broadcast("ack", _ident(v)))
            self._check_committed(v)

    def _check_committed(self, v: _Version) -> None:
        if len(v.acks) == self.p.n and self.coordinator() == self.node and not v.decided:
            if self.node == 0:
                self._decide(v, "commit", broadcast=True)
            else:  # coordinator only because lower nodes seem down: make sure first
                self._spawn(self._coordinate(v, "commit", ""))

    def timing(self, v: _Version) -> dict:
        """Where the time of one version went on this node (seconds; bytes of this node's encode)."""
        now = time.monotonic()
        L = self.stripe_len(v, self.node) if len(v.sizes) == self.p.n else 0
        enc = (v.t_encode1 - v.t_encode0) if v.t_encode1 else None
        return {
            "job": v.job, "step": v.step, "epoch": v.epoch, "decision": v.decided or "pending",
            "since_start_s": round(now - v.t0, 4),
            "sizes_known_s": round(v.t_sizes - v.t0, 4) if v.t_sizes else None,
            "encode_in_bytes": self.p.k * L, "parity_bytes": sum(n for _, n in v.layout.values()),
            "encode_wall_s": None if enc is None else round(enc, 4),
            "encode_busy_s": round(v.encode_s, 4), "rows": v.rows, "ring_rows": v.window,
            "staging_bytes": v.staging.size if v.staging is not None else None,
        }

    # --- surviving a restart of this daemon -------------------------------------------------

    async def _save_record(self, v: _Version) -> None:
        """Write the ParityRecord of a group-level version beside its parity (tmp name, then rename)."""
        assert v.parity is not None
        rec = ParityRecord(v.job, v.step, self.node, self.p.n, self.p.m, v.parity.name, dict(v.layout),
                           dict(v.headers), dict(v.sizes), dict(v.manifests), v.epoch)
        name = f"{self.prefix}-meta-{v.job}-{v.step}-{v.tag or secrets.token_hex(3)}"
        v.saving = True
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, _write_file, name, rec.encode())
        finally:
            v.saving = False
        if self.versions.get((v.job, v.step, v.epoch)) is v:
            v.record = name
        else:  # released while we wrote: the record goes before its parity segment may be reused
            _unlink(name)
            self._retire(v)

    def adopt_saved(self, views_of: Callable[[str, int], list[memoryview] | None]) -> list[tuple[str, int, int]]:
        """At start: re-adopt the parity of the newest group-level version of each job left in /dev/shm.

        A record is kept only if it is intact, names this node of this group,
        its parity segment is there, and this node's own data of the version
        (``views_of``) was re-adopted; everything else of ours is removed.
        """
        found: dict[str, list[tuple[int, str, ParityRecord]]] = {}
        names = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(f"{self.prefix}-"))
        for name in names:
            if not name.startswith(f"{self.prefix}-meta-"):
                continue
            try:
                with open(os.path.join(SHM_DIR, name), "rb") as fh:
                    rec = ParityRecord.decode(fh.read(MAX_RECORD + 1))
                if (rec.node, rec.n, rec.m) != (self.node, self.p.n, self.p.m):
                    raise IntegrityError(f"record of node {rec.node} of a group ({rec.n}, {rec.m})")
                if not rec.parity.startswith(f"{self.prefix}-parity-"):
                    raise IntegrityError(f"record names a foreign segment {rec.parity!r}")
                if set(rec.layout) != {s for s, _ in self.p.parity_stripes(self.node)}:
                    raise IntegrityError("record's parity stripes are not this node's")
            except (OSError, IntegrityError) as exc:
                log.warning("node %d: dropping parity record %s: %s", self.node, name, exc)
                continue
            found.setdefault(rec.job, []).append((rec.step, name, rec))
        kept: set[str] = set()
        adopted = []
        for job, recs in found.items():
            for step, name, rec in sorted(recs, key=lambda t: t[0], reverse=True):
                views = views_of(job, step)
                if views is None or sum(len(x) for x in views) != rec.sizes.get(self.node):
                    log.warning("node %d: parity of job %s step %d left without its local data: dropped",
                                self.node, job, step)
                    continue
                try:
                    parity = open_segment(rec.parity, rec.parity_bytes())
                except (OSError, ShardkeepError) as exc:
                    log.warning("node %d: parity segment of job %s step %d: %s", self.node, job, step, exc)
                    continue
                self.adopt_rebuilt(job, step, rec.sizes, rec.manifests, views, parity, rec.layout, rec.headers,
                                   rec.epoch, record=name)
                kept |= {name, rec.parity}
                adopted.append((job, step, rec.epoch))
                log.info("node %d: re-adopted parity of job %s step %d (stripes %s)", self.node, job, step,
                         sorted(rec.layout))
                break
        for name in names:  # staging, rebuild scratch, older or orphaned parity
            if name not in kept:
                _unlink(name)
        return adopted

    def close_kept(self) -> None:
        """On a clean stop: group-level versions keep their parity in /dev/shm; the rest goes."""
        for key, v in list(self.versions.items()):
            if v.decided == "commit" and v.record and v.parity is not None:
                v.parity.close()
                self.versions.pop(key)
                if v.staging is not None:
                    v.staging.destroy()
            else:
                self.release(*key)
        self.drop_spares()
        self.copier.shutdown(wait=False)

    # --- what a rebuild needs -------------------------------------------------------------------

    def inventory(self) -> list[list]:
        return [[job, step, epoch] for (job, step, epoch), v in sorted(self.versions.items())
                if v.decided == "commit"]

    async def serve_fetch(self, f: dict, src: int | None = None) -> tuple[dict, list]:
        """Answer a rebuilding peer: sizes and manifests, a piece of our chunk, or a piece of our parity
        (the copy out of shm in a thread)."""
        key = _key(f)
        v = self.versions.get(key)
        if v is None or v.decided != "commit":
            raise ProtocolError(f"node {self.node} holds no group-level version {key}")
        what = f.get("what", "manifest")
        if what == "manifest":
            return {"sizes": {str(k): n for k, n in v.sizes.items()}}, [msgpack.packb(
                {"manifests": v.manifests, "headers": v.headers}, use_bin_type=True)]
        s, off, n = f.get("stripe", 0), f.get("offset", 0), f.get("length", 0)
        if n > PIECE * 4:
            raise ProtocolError(f"fetch of {n} bytes: at most {PIECE * 4} per request")
        if what == "payload":  # a remote reader: bytes of this node's own payload (its ranks' data, rank order)
            if f.get("reply_via") == "data":
                await self.send_payload(v, src, f.get("rid"), off, n)
                return {"sent": n}, []
            return {}, [await self.read_payload(v, off, n)]
        if what == "data":
            a, b = self._chunk(v, self.node, s)
            if s not in self.p.data_stripes(self.node) or off + n > b - a:
                raise ProtocolError(f"node {self.node} has no data bytes {off}+{n} of stripe {s}")
            assert v.views is not None
            pieces = [mv for _, mv in _slices(v.views, a + off, a + off + n)]
            return {}, [await asyncio.get_running_loop().run_in_executor(self.copier, b"".join, pieces)]
        if s not in v.layout or v.parity is None:
            raise ProtocolError(f"node {self.node} holds no parity of stripe {s}")
        base, pad = v.layout[s]
        if off + n > pad:
            raise ProtocolError("parity fetch out of range")
        v.busy += 1  # the segment must not be reused under the read
        try:
            data = await asyncio.get_running_loop().run_in_executor(self.copier, pread_exact, v.parity.fd, n, base + off)
        finally:
            v.busy -= 1
        if v.released:
            self._retire(v)
        return {}, [data]

    def group_version(self, job: str, step: int | None = None) -> tuple[int, int] | None:
        """(step, epoch) of the newest group-level version of ``job`` (or of ``step``), None if none."""
        found = [(st, ep) for (j, st, ep), v in self.versions.items()
                 if j == job and v.decided == "commit" and v.views is not None and (step is None or st == step)]
        return max(found) if found else None

    async def send_payload(self, v: _Version, dst: int | None, rid: Any, off: int, n: int) -> None:
        """Bytes [off, off + n) of this node's payload of ``v`` to node ``dst`` as ``fetch-reply`` data
        messages, straight out of shared memory (reads.py on the other side)."""
        if dst is None or not isinstance(rid, str) or not rid:
            raise ProtocolError("fetch of a payload over the data plane needs the read's rid")
        self._check_payload_range(v, off, n)
        for start in range(off, off + n, PIECE):
            for piece_off, mv in _slices(v.views, start, min(start + PIECE, off + n)):
                await self.send_data(dst, "fetch-reply", {**_ident(v), "rid": rid, "offset": piece_off - off}, mv)

    def _check_payload_range(self, v: _Version, off: int, n: int) -> None:
        total = sum(len(x) for x in v.views or ())
        if v.views is None or off + n > total:
            raise ProtocolError(f"node {self.node} has no payload bytes {off}+{n} of job {v.job!r} step {v.step} "
                                f"(it holds {total})")

    async def read_payload(self, v: _Version, off: int, n: int) -> bytes:
        """Bytes [off, off + n) of this node's payload of ``v`` (copied out of shm in a thread)."""
        self._check_payload_range(v, off, n)
        pieces = [mv for _, mv in _slices(v.views, off, off + n)]
        return await asyncio.get_running_loop().run_in_executor(self.copier, b"".join, pieces)

    def adopt_rebuilt(self, job: str, step: int, sizes: dict[int, int], manifests: dict[int, bytes],
                      views: list[memoryview], parity: Segment, layout: dict[int, tuple[int, int]],
                      headers: dict[int, bytes], epoch: int = 0, record: str = "") -> None:
        """A rebuilt node takes its place in (job, step, epoch) as if it had been there.

        ``record``: its ParityRecord already in /dev/shm (re-adoption at start), else one is written."""
        v = self._v(job, step, epoch)
        v.record = record
        v.sizes, v.manifests, v.views = dict(sizes), dict(manifests), views
        v.parity, v.layout, v.headers = parity, dict(layout), dict(headers)
        v.stored, v.acks, v.acked, v.ready = set(layout), set(range(self.p.n)), True, True
        self._decide(v, "commit", broadcast=False)

    def manifests_of(self, job: str, step: int, epoch: int = 0) -> dict[int, bytes]:
        """Every node's manifests of the version, as each sent them with its local-commit."""
        return dict(self.versions[(job, step, epoch)].manifests)

    def parity_of(self, job: str, step: int, s: int, epoch: int = 0) -> tuple[str, int, int, bytes]:
        """(segment name, offset, padded length, headers) of this node's parity of stripe ``s``."""
        v = self.versions[(job, step, epoch)]
        base, pad = v.layout[s]
        assert v.parity is not None
        return v.parity.name, base, pad, v.headers[s]

    def release(self, job: str, step: int, epoch: int = 0) -> None:
        """The version is no longer needed here: its record goes, its segments become spares for the next
        version of the job (once no codec worker and no record write can touch them any more)."""
        v = self.versions.pop((job, step, epoch), None)
        if v is None:
            return
        v.released = True  # a _prepare still running hands its segments back itself
        if v.record:  # first: a record must never name a segment another version writes into
            _unlink(v.record)
            v.record = ""
        self._retire(v)

    def abandon(self, job: str, step: int, epoch: int = 0, reason: str = "") -> None:
        """Give up on the version: free its segments and ignore what still arrives for it."""
        self.release(job, step, epoch)
        self._mark_abandoned(job, step, epoch, reason)

    def _mark_abandoned(self, job: str, step: int, epoch: int, reason: str = "") -> None:
        """``reason`` (why it was aborted) is what a later ``start`` of it says."""
        self.abandoned[(job, step, epoch)] = reason[:500]
        while len(self.abandoned) > 4096:
            self.abandoned.popitem(last=False)


def _ident(v: _Version) -> dict:
    """The fields that name a version in every message about it."""
    return {"job": v.job, "step": v.step, "epoch": v.epoch}


def _key(f: dict) -> tuple[str, int, int]:
    job, step, epoch = f.get("job"), f.get("step"), f.get("epoch", 0)
    if not isinstance(job, str) or type(step) is not int or type(epoch) is not int or step < 0 or epoch < 0:
        raise ProtocolError(f"a group-commit message names no valid version: {job!r} {step!r} {epoch!r}")
    return job, step, epoch


async def _no_tell(j: int, mtype: str, fields: dict) -> None:
    raise RuntimeError("this GroupCommit was built without a way to message one peer (tell=)")


def _write_file(name: str, data: bytes) -> None:
    path = os.path.join(SHM_DIR, name)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, path)




def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def _slices(views: list[memoryview], start: int, end: int):
    """(offset, memoryview) pieces of the payload [start, end) across its extents."""
    pos = 0
    for mv in views:
        n = len(mv)
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            yield a, mv[a - pos : b - pos]
        pos += n
        if pos >= end:
            return
