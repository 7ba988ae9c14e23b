"""``Snapshotter``: the trainer-side API (see DESIGN.md, "Client")."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from shardkeep.proto import wire
from shardkeep.proto.config import DEFAULT_TIMEOUTS, default_socket
from shardkeep.proto.errors import (
    IntegrityError,
    NotFoundError,
    ProtocolError,
    ShardkeepError,
    ShardkeepTimeoutError,
    StaleSessionError,
    UnavailableError,
)
from shardkeep.proto.faults import Phase, plan as fault_plan
from shardkeep.proto.layout import DEFAULT_CHUNK, check_job_id, plan_layout
from shardkeep.proto.leaves import pack_skeleton, unpack_skeleton
from shardkeep.proto.manifest import Manifest, checksum, chunk_count, chunk_ranges
from shardkeep.proto.transport import Channel

from . import dpshard, rng as rng_mod
from .copier import ChunkHasher, copy_all, default_hash_threads, dst_view
from .flatten import RNG_KEY, Flat, Restorer, flatten, meshes_in
from .shm import Mapping, SlotMaps

#: the longest a future waits for its group level (the daemon's own bound is usually shorter)
GROUP_WAIT_S = 3 * DEFAULT_TIMEOUTS.group_commit
NO_SLOT_RECHECK_S = 1.0  # a predicted "no free slot" is asked again after this long

log = logging.getLogger("shardkeep.client")


@dataclass(frozen=True)
class SnapshotResult:
    step: int
    status: Literal["committed", "skipped"]
    level: Literal["local", "group"] | None
    reason: str = ""


@dataclass
class RestoreInfo:
    """What the last ``restore()`` did: ``snap.last_restore``."""

    step: int | None
    source: str | None                      # "local shm", or None when nothing was restored
    fell_back_from: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0
    note: str = ""                          # why memory could not serve, when the persist tier did

    def __str__(self) -> str:
        if self.step is None:
            return "nothing restored: the daemon holds no version of this job"
        fb = "".join(f"; fell back from step {s} ({why})" for s, why in self.fell_back_from)
        note = f"; memory could not serve: {self.note}" if self.note else ""
        return f"restored step {self.step} from {self.source} ({self.bytes} bytes in {self.seconds:.3f} s){fb}{note}"


@dataclass
class Stats:
    snapshots: int = 0
    committed: int = 0
    skipped: int = 0
    failed: int = 0
    blocked_s: float = 0.0          # total time the training thread spent in shardkeep
    last_copy_s: float = 0.0
    last_commit_s: float = 0.0      # snapshot() call to local commit
    # seconds from the snapshot() call to each phase of the last snapshot written: started (the
    # background thread took it), begun (the daemon gave a slot), issued (GPU copies queued),
    # copied, hashed, committed; for profiling (benchmarks print them)
    last_phases: dict = field(default_factory=dict)
    registrations: int = 0
    predicted_skips: int = 0        # skipped at once: no slot can be free before a group commit resolves


def _env_int(name: str, default: int | None) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def resolve_job(job: str | None) -> str:
    if job is None:
        job = os.environ.get("SHARDKEEP_JOB")
    if job is None:
        rid = os.environ.get("TORCHELASTIC_RUN_ID")
        if rid and rid != "none":
            job = rid
    if job is None:
        raise ValueError(
            "no job id: pass Snapshotter(job=...), set SHARDKEEP_JOB, or run under torchrun with "
            "--rdzv-id (a job id names one run; the same id after a restart resumes it)"
        )
    return check_job_id(job)


@dataclass
class _Pending:
    flat: Flat
    step: int
    future: concurrent.futures.Future
    early: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)  # copy began (or never will)
    lock: threading.Lock = field(default_factory=threading.Lock)
    copying: bool = False
    cancelled: bool = False           # training went on before the copy began: skip this step
    torn: bool = False                # a hook stopped waiting mid-copy: never commit this copy
    t0: float = field(default_factory=time.perf_counter)
    phases: dict = field(default_factory=dict)
    cuda_device: Any = None           # the one GPU that holds the state's device tensors
    cuda_event: Any = None            # recorded on the training stream at snapshot(): the copy starts after it
    released: threading.Event = field(default_factory=threading.Event)  # GPU state: every copy is queued
    copied_event: Any = None          # GPU state: recorded on the copy stream after the last copy
    group: bool = False               # the daemon group-commits this version in the background


@dataclass
class _Prepare:
    """Register (and map) slots for a known layout, off the training thread."""

    data_bytes: int
    manifest_bytes: int


@dataclass
class _Registration:
    instance: str
    session: str
    data_capacity: int
    manifest_capacity: int
    slots: dict[int, dict]


_TOKEN_REQUESTS = frozenset({"register", "versions", "open", "release", "resume", "finish"})


class Snapshotter:
    """Snapshot a training state into the local shardkeep daemon every step, restore it after a crash.

    ``snapshot(state, step)`` returns a ``Future`` at once; the copy runs in a
    background thread and overlaps the next step's forward and backward.  The
    forward pre-hook on each module in ``state`` waits for the buffers, the
    optimizer's step pre-hook for parameters and optimizer state.  State that
    changes in place elsewhere (EMA, manual edits) needs ``wait()`` first.

    ``token`` (default ``$SHARDKEEP_JOB_TOKEN``): the job's secret, the same on
    every rank, required by a daemon in multi-user mode (``--trainer-group``).

    ``dp_shard=True``: each data-parallel replica (``dp_group``, default the
    world) keeps only its 1/DP slice of the modules' and optimizers' tensors.

    ``persist_dir`` (default ``$SHARDKEEP_PERSIST_DIR``): where ``shardkeep
    export`` (or the persist tier) writes this job's steps; ``restore()`` falls
    back to the newest of them when memory cannot serve.
    """

    def __init__(
        self,
        socket: str | None = None,
        job: str | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        local_rank: int | None = None,
        local_world_size: int | None = None,
        *,
        durability: Literal["local", "group"] | None = None,
        rng: bool = True,
        timeout: float = DEFAULT_TIMEOUTS.client_request,
        slots: int | None = None,
        max_stall: float = 1.0,
        hash_threads: int | None = None,
        token: str | None = None,
        dp_shard: bool = False,
        dp_group: Any = None,
        persist_dir: str | None = None,
    ) -> None:
        self.socket = socket or default_socket()
        self.job = resolve_job(job)
        self.rank = _env_int("RANK", 0) if rank is None else rank
        self.world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
        self.local_rank = _env_int("LOCAL_RANK", self.rank) if local_rank is None else local_rank
        lws = _env_int("LOCAL_WORLD_SIZE", None) if local_world_size is None else local_world_size
        self.local_world_size = lws if lws is not None else self.world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(f"local_world_size {self.local_world_size} is not in [1, {self.world_size}]")
        if durability not in (None, "local", "group"):
            raise ValueError(f"durability must be 'local' or 'group', not {durability!r}")
        self.durability = durability or "group"
        self.capture_rng = rng
        self.timeout = timeout
        self.slots = slots
        self.max_stall = max_stall
        # checksums on a thread of their own when there are cores to spare; inline on small machines
        if hash_threads is None:
            hash_threads = default_hash_threads(self.local_world_size)
        self._hash_pool = (concurrent.futures.ThreadPoolExecutor(hash_threads, thread_name_prefix="shardkeep-hash")
                           if hash_threads > 0 else None)
        self.stats = Stats()
        self.last_restore: RestoreInfo | None = None

        self.token = token or os.environ.get("SHARDKEEP_JOB_TOKEN") or None
        self.dp_shard = dp_shard
        self.dp_group = dp_group
        self.persist_dir = persist_dir or os.environ.get("SHARDKEEP_PERSIST_DIR") or None
        self._chan = Channel(self.socket, timeout=timeout)
        self._maps = SlotMaps()
        self._reg: _Registration | None = None
        self._instance: str | None = None
        self._epoch = 0  # this launch of the job (agreed in restore()); names group-commit versions
        self._pending: _Pending | None = None
        self._hooked: dict[int, Any] = {}
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._faults = fault_plan()
        self._cuda_streams: dict = {}  # torch.device -> the side stream of copies from that GPU
        self._daemon_ok = True  # False after a failed request: hooks then never wait for one
        self._registering = False  # slots for a new layout are being made: hooks never wait for that
        self._waiter: concurrent.futures.ThreadPoolExecutor | None = None
        self._group_inflight = 0                 # versions whose group commit this client waits for
        self._inflight_lock = threading.Lock()
        self._no_slot_at: float | None = None    # when the daemon last had no free slot for this rank
        self._wait_chan: Channel | None = None
        self._worker = threading.Thread(target=self._run, name=f"shardkeep-copy-{self.rank}", daemon=True)
        self._worker.start()

    # --- public API ----------------------------------------------------------------

    def snapshot(self, state: dict, step: int) -> concurrent.futures.Future:
        """Start a snapshot of ``state`` at ``step``; returns a Future of ``SnapshotResult``."""
        if self._closed:
            raise RuntimeError("Snapshotter is closed")
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= wire.MAX_STEP:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        t0 = time.perf_counter()
        prev = self._pending
        if prev is not None and prev.cuda_event is not None and not prev.done.is_set():
            # GPU state: the previous snapshot's copies are queued on the side stream; this one queues
            # behind them.  Waiting for its checksums and commit here would hold the training thread
            # until the GPU has reached that snapshot and the hashing is done, a step later
            self._wait_done(event=prev.released)
        else:
            self._wait_done()
        flat = flatten(state, rng_mod.capture() if self.capture_rng else None, self._dp_shard())
        self._install_hooks(flat)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        p = _Pending(flat, step, fut)
        if not any(not late and not priv for late, priv in zip(flat.late, flat.private)):
            p.early.set()  # no buffers to protect: forward never waits
        gpus = {t.device for t in flat.tensors if t.is_cuda}
        if self._no_slot_expected():
            # the daemon had no free slot and nothing has freed one since: skip at once rather than hold
            # training for its answer (the background thread still tells the daemon, which drops the step
            # on every rank, and gives a slot back if one was free after all)
            p.cancelled = True
            for ev in (p.started, p.early, p.released, p.done):
                ev.set()
            self.stats.predicted_skips += 1
        if len(gpus) == 1:  # state on several GPUs of one process is copied synchronously instead
            p.cuda_device = gpus.pop()
            p.cuda_event = torch.cuda.Event()
            p.cuda_event.record(torch.cuda.current_stream(p.cuda_device))
        self._pending = p
        self.stats.snapshots += 1
        self._queue.put(p)
        self.stats.blocked_s += time.perf_counter() - t0
        return fut

    def _dp_shard(self) -> tuple[int, int] | None:
        """(rank, size) in the data-parallel group when dp_shard=True."""
        if not self.dp_shard:
            return None
        dist = _dist()
        if dist is None:
            raise RuntimeError("Snapshotter(dp_shard=True) needs torch.distributed initialized (the data-parallel "
                               "group is dp_group=, by default the whole world)")
        return dist.get_rank(self.dp_group), dist.get_world_size(self.dp_group)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy of the last snapshot is in shared memory."""
        self._wait_done(timeout)

    def versions(self) -> list[int]:
        """Steps this job can restore from the local daemon, newest first."""
        return list(self._request("versions", {"job": self.job, "rank": self.rank}).fields.get("restorable", []))

    def restore(self, state: dict) -> int | None:
        """Restore the newest version every rank can get back, in place; return its step or None.

        With ``torch.distributed`` initialized this is collective: every rank must call it.
        """
        self._wait_done()
        t0 = time.perf_counter()
        memory_error = ""
        try:
            reply = self._request("versions", {"job": self.job, "rank": self.rank})
            candidates = [int(s) for s in reply.fields.get("restorable", [])]
            missing = str(reply.fields.get("missing", ""))  # this node lost versions the group holds
            candidates = _agree(candidates, self.job, missing, bool(reply.fields.get("recoverable", True)))
        except UnavailableError as exc:  # raised alike on every rank (the nodes of some ranks lost the job)
            if self.persist_dir is None or exc.details.get("recoverable", True):
                raise  # `shardkeep recover` brings the newer version back: never fall back past it
            memory_error, candidates = str(exc), []
        # this launch of the job, the same on every rank: a step run again after a restart is a new
        # version for the group, never mixed with the one the crash left half-committed
        self._epoch = _agree_epoch()
        fell_back: list[tuple[int, str]] = []
        restored: int | None = None
        nbytes = 0
        manifest_len = 0
        for step in candidates:
            self._faults.hit(Phase.RESTORE)
            try:
                nbytes, manifest_len = self._restore_version(state, step)
                ok = True
            except IntegrityError as exc:
                log.error("job %s rank %d: version %d failed verification: %s", self.job, self.rank, step, exc)
                fell_back.append((step, str(exc)))
                ok = False
            if _all_ok(ok):
                restored = step
                break
            if ok:
                fell_back.append((step, "another rank's copy of this version failed verification"))
        if restored is None and self.persist_dir is not None:
            restored = self._restore_persisted(state, t0, fell_back, memory_error or (
                "no version verified" if candidates else "no version of this job in memory"))
            if restored is not None:
                return restored
        if restored is None:
            if candidates:
                raise IntegrityError(
                    f"job {self.job!r} rank {self.rank}: no intact version to restore; tried "
                    + "; ".join(f"step {s}: {why}" for s, why in fell_back),
                    tried=[s for s, _ in fell_back],
                )
            self.last_restore = RestoreInfo(None, None, seconds=time.perf_counter() - t0)
            log.info("job %s rank %d: nothing to restore", self.job, self.rank)
            return None
        self._request("resume", {"job": self.job, "rank": self.rank, "step": restored})
        self.last_restore = RestoreInfo(restored, "local shm", fell_back, time.perf_counter() - t0, nbytes)
        # the next snapshot has the restored layout: register and map its slots in the background now
        self._queue.put(_Prepare(nbytes, _manifest_capacity(manifest_len)))
        log.info("job %s rank %d: %s", self.job, self.rank, self.last_restore)
        return restored

    def _restore_persisted(self, state: dict, t0: float, fell_back: list, why: str) -> int | None:
        """The newest version in the persist directory, when memory could not serve: collective like
        restore() (every rank must see the same step there), None if there is none."""
        from . import persisted

        path = persisted.newest(self.persist_dir, self.job)
        step = persisted.step_of(path) if path is not None else -1
        lo, hi = _agree_value(step)
        if hi < 0:
            return None
        if lo != hi:
            raise UnavailableError(f"job {self.job!r}: the ranks see different newest persisted steps ({lo} and "
                                   f"{hi}) under {self.persist_dir}; is it storage every node shares?")
        ok, nbytes, err = True, 0, None
        try:
            skeleton, tensors, nbytes = persisted.load_rank(path, self.job, self.rank, self.world_size, _torch_dtype)
        except (IntegrityError, NotFoundError, OSError) as exc:
            ok, err = False, exc
        if not _all_ok(ok):
            raise IntegrityError(f"job {self.job!r}: memory could not serve ({why}), and the persisted step {step} "
                                 f"at {path} failed on some rank: {err or 'see the other ranks'}")
        rest = Restorer(tensors, meshes_in(state))
        saved_rng = skeleton.pop(RNG_KEY, None) if isinstance(skeleton, dict) else None
        for key, saved in skeleton.items():
            rest.into(state, key, saved, str(key))
        if saved_rng is not None and self.capture_rng:
            rng_mod.restore(rest.owned(saved_rng))
        try:  # the daemon's record of the job (if any) goes back to this step
            self._request("resume", {"job": self.job, "rank": self.rank, "step": step})
        except NotFoundError:
            pass
        self.last_restore = RestoreInfo(step, f"the persist tier ({path})", fell_back, time.perf_counter() - t0,
                                        nbytes, note=why)
        log.warning("job %s rank %d: %s", self.job, self.rank, self.last_restore)
        return step

    def close(self) -> None:
        """Stop the background thread and remove hooks; the job's versions stay in the daemon."""
        if self._closed:
            return
        try:
            self._wait_done(self.timeout * 3)
        except ShardkeepTimeoutError:
            pass
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=self.timeout * 3)
        for h in self._hooked.values():
            h.remove()
        self._hooked.clear()
        self._chan.close()
        self._maps.clear()
        if self._hash_pool is not None:
            self._hash_pool.shutdown(wait=True)
        if self._waiter is not None:
            self._waiter.shutdown(wait=True, cancel_futures=False)
            self._wait_chan.close()

    def finish(self) -> None:
        """The run is over: free this job's memory on the daemon (every rank's versions)."""
        self.close()
        try:
            Channel(self.socket, timeout=self.timeout).request(
                "finish", {"job": self.job, **({"token": self.token} if self.token else {})})
        except NotFoundError:
            pass

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- hooks ---------------------------------------------------------------------

    def _install_hooks(self, flat: Flat) -> None:
        for m in flat.modules:
            if id(m) not in self._hooked:
                self._hooked[id(m)] = m.register_forward_pre_hook(lambda mod, args: self._wait_early())
        for o in flat.optimizers:
            if id(o) not in self._hooked:
                self._hooked[id(o)] = o.register_step_pre_hook(lambda opt, args, kwargs: self._wait_hook())

    def _wait_early(self) -> None:
        p = self._pending
        if p is not None and p.cuda_event is not None:
            self._wait_gpu(p)
        elif p is not None and not p.early.is_set():
            self._block_on(p, p.early)

    def _wait_hook(self) -> None:
        p = self._pending
        if p is not None and p.cuda_event is not None:
            self._wait_gpu(p)
        elif p is not None and not p.done.is_set():
            self._block_on(p, p.done)

    def _wait_gpu(self, p: _Pending) -> None:
        """GPU state: wait until the copies are queued, then let the GPU (not the CPU) wait for them.

        The training stream waits on the copy stream's last event, so kernels that
        change the state run after the device-to-host copies have read it, while
        the training thread goes on queuing work at once.
        """
        if not p.released.is_set():
            self._block_on(p, p.released)
        ev = p.copied_event
        if ev is not None:
            torch.cuda.current_stream(p.cuda_device).wait_event(ev)

    def _block_on(self, p: _Pending, ev: threading.Event, limit: float | None = None) -> None:
        """Wait for ``ev`` of snapshot ``p``; skip the snapshot rather than hold training.

        Until the copy has begun (registration, the daemon's answer to begin) the
        training thread waits at most ``max_stall`` seconds, none while the daemon
        is failing; then the snapshot is cancelled.  A copy that has begun runs at
        memory speed and is waited for.
        """
        t0 = time.perf_counter()
        limit = 3 * self.timeout if limit is None else limit
        stall = self.max_stall if self._daemon_ok and not self._registering else 0.0
        if not p.started.wait(stall):
            with p.lock:
                if not p.copying:
                    p.cancelled = True
                    p.started.set()
                    p.early.set()
                    p.released.set()
                    p.done.set()
                    log.warning("job %s rank %d: step %d skipped: its copy had not begun after %.1f s",
                                self.job, self.rank, p.step, time.perf_counter() - t0)
        if not ev.wait(max(0.0, limit - (time.perf_counter() - t0))):
            # never let training modify state under a copy that still runs: that copy is torn
            p.torn = True
            log.error("job %s rank %d: snapshot of step %d did not finish copying in %.0f s; it will be skipped",
                      self.job, self.rank, p.step, limit)
        self.stats.blocked_s += time.perf_counter() - t0

    def _wait_done(self, timeout: float | None = None, event: threading.Event | None = None) -> None:
        p = self._pending
        if p is None:
            return
        ev = p.done if event is None else event
        if ev.is_set():
            return
        self._block_on(p, ev, timeout)
        if not ev.is_set():
            raise ShardkeepTimeoutError(
                f"copy of step {p.step} into shared memory did not finish in {timeout or 3 * self.timeout:.0f} s"
            )

    # --- background thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            p = self._queue.get()
            if p is None:
                return
            if isinstance(p, _Prepare):
                self._prepare(p)
                continue
            try:
                result = self._write(p)
            except BaseException as exc:  # noqa: BLE001 - delivered through the future
                self.stats.failed += 1
                if isinstance(exc, (UnavailableError, ShardkeepTimeoutError)):
                    self._daemon_ok = False
                p.started.set()
                p.early.set()
                p.released.set()
                p.done.set()
                p.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                continue
            finally:
                p.started.set()
                p.early.set()
                p.released.set()
                p.done.set()
            if result.status == "committed":
                self.stats.committed += 1
            else:
                self.stats.skipped += 1
            self.stats.last_commit_s = time.perf_counter() - p.t0
            if p.group and self.durability == "group":
                with self._inflight_lock:
                    self._group_inflight += 1
                self._group_waiter().submit(self._await_group, p, result)
            else:
                p.future.set_result(result)

    def _group_waiter(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._waiter is None:
            self._waiter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shardkeep-group")
            # the daemon bounds the wait by its own group-commit timeout (plus the time to learn a
            # decision when the coordinator is lost); this only guards against a daemon that vanished
            self._wait_chan = Channel(self.socket, timeout=GROUP_WAIT_S + 15)
        return self._waiter

    def _await_group(self, p: _Pending, local: SnapshotResult) -> None:
        """Resolve the future at group level, or at local level if the group cannot take it (never raise)."""
        try:
            r = self._wait_chan.request("wait", {"job": self.job, "step": p.step,
                                                 "timeout": int(GROUP_WAIT_S * 1000)})
            level = "group" if r.fields.get("level") == "group" else "local"
            reason = str(r.fields.get("reason", ""))
        except ShardkeepError as exc:
            level, reason = "local", f"group level unknown: {exc}"
        finally:
            with self._inflight_lock:
                self._group_inflight -= 1
            self._no_slot_at = None  # a version was decided: the daemon may free a slot now
        p.future.set_result(SnapshotResult(p.step, "committed", level, reason))

    def _no_slot_expected(self) -> bool:
        """The daemon said "no free slot" while a group commit was in flight, and none resolved since.

        With two slots one holds the group-level version and one the version being
        group-committed; until that resolves every begin is answered "skip".  Asked
        again at least every ``NO_SLOT_RECHECK_S`` all the same.
        """
        t = self._no_slot_at
        return (t is not None and self._group_inflight > 0
                and time.monotonic() - t < NO_SLOT_RECHECK_S)

    def _request(self, mtype: str, fields: dict, payload: list | None = None) -> wire.Message:
        if self.token and mtype in _TOKEN_REQUESTS:
            fields = {**fields, "token": self.token}
        reply = self._chan.request(mtype, fields, payload)
        self._daemon_ok = True
        if "fd_socket" in reply.fields:  # multi-user mode: slots come by descriptor, never by name
            self._maps.use_fd_socket(str(reply.fields["fd_socket"]), self.job, self.token)
        inst = reply.fields.get("instance")
        if self._instance is not None and inst != self._instance:
            log.warning("job %s rank %d: daemon restarted (instance %s -> %s); registering again",
                        self.job, self.rank, self._instance, inst)
            self._reg = None
            self._maps.clear()
        self._instance = inst
        return reply

    def _prepare(self, p: "_Prepare") -> None:
        self._registering = True
        try:
            self._reg = self._register(p.data_bytes, p.manifest_bytes)
        except Exception as exc:  # the first snapshot will register again
            log.warning("job %s rank %d: could not prepare slots after restore: %s", self.job, self.rank, exc)
        finally:
            self._registering = False

    def _register(self, data_bytes: int, manifest_bytes: int) -> _Registration:
        self._faults.hit(Phase.REGISTER)
        fields = {
            "job": self.job, "rank": self.rank, "world_size": self.world_size,
            "local_world_size": self.local_world_size, "data_bytes": data_bytes,
            "manifest_bytes": manifest_bytes, "pid": os.getpid(),
        }
        if self.slots:
            fields["slots"] = self.slots
        reply = self._request("register", fields)
        slots = {int(s["id"]): s for s in reply.fields["slots"]}
        usable = [s for s in slots.values() if s.get("usable")]
        # map once, populated, off the training thread; reused by every later snapshot
        for s in usable:
            self._maps.get(s["name"], s["size"])
        self._maps.keep_only({s["name"] for s in slots.values()})
        self.stats.registrations += 1
        return _Registration(
            reply.fields["instance"], reply.fields["session"],
            min(s["data_capacity"] for s in usable), min(s["manifest_capacity"] for s in usable), slots,
        )

    def _begin(self, p: _Pending, data_bytes: int, manifest_len: int) -> tuple[_Registration, int | None, str]:
        for attempt in range(2):
            reg = self._reg
            if (reg is None or reg.instance != self._instance or data_bytes > reg.data_capacity
                    or manifest_len > reg.manifest_capacity):
                self._registering = True
                try:
                    reg = self._reg = self._register(data_bytes, _manifest_capacity(manifest_len))
                finally:
                    self._registering = False
            try:
                r = self._request("begin", {"job": self.job, "rank": self.rank, "step": p.step,
                                            "session": reg.session, "epoch": self._epoch})
            except (StaleSessionError, NotFoundError):
                if attempt:
                    raise
                self._reg = None
                continue
            if "skip" in r.fields:
                why = str(r.fields["skip"])
                if why.startswith("no free slot"):
                    self._no_slot_at = time.monotonic()
                return reg, None, why
            self._no_slot_at = None
            return reg, int(r.fields["slot"]), ""
        raise AssertionError("unreachable")

    def _write(self, p: _Pending) -> SnapshotResult:
        flat = p.flat
        p.phases = {"started": time.perf_counter() - p.t0}
        specs = []
        dtypes = []
        for t, name in zip(flat.tensors, flat.names):
            dtypes.append(t.dtype)
            specs.append((name, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
        # buffers (forward changes them), then params and optimizer state, then our private RNG copies
        kinds = [2 if priv else 1 if late else 0 for late, priv in zip(flat.late, flat.private)]
        order = [i for kind in (0, 1, 2) for i, k in enumerate(kinds) if k == kind]
        entries, data_bytes = plan_layout(specs, order)
        skeleton = pack_skeleton(flat.skeleton)
        manifest = Manifest(
            job=self.job, rank=self.rank, world_size=self.world_size, local_world_size=self.local_world_size,
            step=p.step, history=0, tensors=entries, data_bytes=data_bytes,
            checksums=[0] * chunk_count(data_bytes, DEFAULT_CHUNK), skeleton=skeleton,
        )
        est = len(manifest.encode()) + 64
        reg, slot_id, why = self._begin(p, data_bytes, est)
        if slot_id is None:
            return SnapshotResult(p.step, "skipped", None, why)
        p.phases["begun"] = time.perf_counter() - p.t0
        with p.lock:
            if p.cancelled:
                cancelled = True
            else:
                cancelled, p.copying = False, True
                p.started.set()
        if cancelled:
            self._abort(reg, p.step, slot_id, "training went on before the copy began")
            return SnapshotResult(p.step, "skipped", None, "training went on before the copy began")
        desc = reg.slots[slot_id]
        t_copy = time.perf_counter()
        try:
            mapping = self._maps.get(desc["name"], desc["size"])
            self._copy(p, mapping, desc["data_offset"], entries, dtypes, order, data_bytes, manifest)
        except BaseException as exc:
            self._abort(reg, p.step, slot_id, f"copy failed: {type(exc).__name__}: {exc}")
            raise
        self.stats.last_copy_s = time.perf_counter() - t_copy
        if p.torn:
            self._abort(reg, p.step, slot_id, "training resumed before the copy finished")
            return SnapshotResult(p.step, "skipped", None, "copy did not finish in time")
        r = self._request(
            "commit", {"job": self.job, "rank": self.rank, "step": p.step, "session": reg.session, "slot": slot_id},
            [manifest.encode()],
        )
        p.phases["committed"] = time.perf_counter() - p.t0
        self.stats.last_phases = p.phases
        if r.fields.get("status") != "committed":
            return SnapshotResult(p.step, "skipped", None, str(r.fields.get("reason", "")))
        p.group = bool(r.fields.get("group")) and bool(r.fields.get("recorded"))
        return SnapshotResult(p.step, "committed", "local")

    def _copy(self, p, mapping: Mapping, data_offset, entries, dtypes, order, data_bytes, manifest) -> None:
        flat = p.flat
        region = mapping.u8[data_offset : data_offset + max(data_bytes, 1)]
        data = memoryview(mapping.mm)[data_offset : data_offset + data_bytes]
        hasher = ChunkHasher(data, data_bytes, manifest.chunk, self._hash_pool)
        try:
            n_early = sum(1 for late, priv in zip(flat.late, flat.private) if not late and not priv)
            n_late = len(order) - n_early
            stream = None
            if p.cuda_event is not None:
                stream = self._cuda_streams.get(p.cuda_device)
                if stream is None:
                    stream = self._cuda_streams[p.cuda_device] = torch.cuda.Stream(device=p.cuda_device)
                stream.wait_event(p.cuda_event)
                self._maps.pin(mapping)  # page-locked, so the copies run asynchronously at full speed

            def issued(last_event) -> None:
                p.phases["issued"] = time.perf_counter() - p.t0
                p.copied_event = last_event
                p.released.set()

            def after(pos: int) -> None:
                if pos + 1 == n_early:
                    p.early.set()
                if pos + 1 == n_early + (n_late + 1) // 2:
                    self._faults.hit(Phase.COPY)  # tests crash here: mid-copy, deterministically

            if n_early == 0:
                p.early.set()
            copy_all(flat.tensors, entries, dtypes, region, hasher, order, after, stream, issued)
            if not order:
                self._faults.hit(Phase.COPY)
            p.phases["copied"] = time.perf_counter() - p.t0
            manifest.checksums = hasher.finish()
            p.phases["hashed"] = time.perf_counter() - p.t0
        finally:
            concurrent.futures.wait(hasher.pending)  # hashing threads hold views of ``data``
            data.release()

    def _abort(self, reg: _Registration, step: int, slot_id: int, reason: str) -> None:
        try:
            self._request("abort", {"job": self.job, "rank": self.rank, "step": step, "session": reg.session,
                                    "slot": slot_id, "reason": reason[:4000]})
        except ShardkeepError as exc:
            log.warning("abort of step %d failed: %s", step, exc)

    # --- restore -------------------------------------------------------------------

    def _restore_version(self, state: dict, step: int) -> int:
        r = self._request("open", {"job": self.job, "rank": self.rank, "step": step})
        pin = r.fields["pin"]
        bad: str | None = None
        try:
            desc = r.fields["slot"]
            mapping, m, mlen = open_manifest(self._maps, r, f"step {step}")
            if (m.job, m.rank, m.step) != (self.job, self.rank, step):
                raise IntegrityError(f"slot for step {step} holds job {m.job!r} rank {m.rank} step {m.step}")
            doff = desc["data_offset"]
            _verify_parallel(m, memoryview(mapping.mm)[doff : doff + m.data_bytes], f"step {step}")
            try:
                skeleton = unpack_skeleton(m.skeleton)
            except ProtocolError as exc:
                raise IntegrityError(f"non-tensor state of step {step} is unreadable: {exc}") from None
            region = mapping.u8[doff : doff + max(m.data_bytes, 1)]
            views = [dst_view(region, e, _torch_dtype(e.dtype)) for e in m.tensors]
            if self.dp_shard:
                verified = True  # the replicas gather their slices only once every one of them has its own
        except IntegrityError as exc:
            bad = str(exc)
            if self.dp_shard:
                _all_ok(False)
            self._release_pin(step, pin, bad)
            raise
        except BaseException:
            self._release_pin(step, pin, None)
            raise
        try:
            if self.dp_shard:
                if not _all_ok(verified):  # this copy is fine: release it without reporting it bad
                    self._release_pin(step, pin, None)
                    pin = None
                    raise IntegrityError(f"step {step}: another replica's slice failed verification")
                dist = _dist()
                skeleton = dpshard.gather(skeleton, views, self.dp_group, _dist_device(dist), _torch_dtype)
            rest = Restorer(views, meshes_in(state))
            saved_rng = skeleton.pop(RNG_KEY, None) if isinstance(skeleton, dict) else None
            if not isinstance(skeleton, dict):
                raise IntegrityError(f"step {step}: saved state is not a map")
            for key, saved in skeleton.items():
                rest.into(state, key, saved, str(key))
            if saved_rng is not None and self.capture_rng:
                rng_mod.restore(rest.owned(saved_rng))
            return m.data_bytes, mlen
        except IntegrityError as exc:
            bad = str(exc)
            raise
        finally:
            if pin is not None:
                self._release_pin(step, pin, bad)

    def _release_pin(self, step: int, pin: str, bad: str | None) -> None:
        fields = {"job": self.job, "rank": self.rank, "pin": pin}
        if bad:
            fields.update(bad=True, reason=bad[:4000])
        try:
            self._request("release", fields)
        except ShardkeepError as exc:
            log.warning("release of step %d failed: %s", step, exc)


def open_manifest(maps: SlotMaps, reply: wire.Message, where: str) -> tuple[Mapping, Manifest, int]:
    """Map the slot an ``open`` reply names and read its manifest, checked against the reply's checksum."""
    desc = reply.fields["slot"]
    try:
        mapping = maps.get(desc["name"], desc["size"])
    except NotFoundError as exc:  # the segment was removed behind the daemon's back
        raise IntegrityError(f"{where}: {exc}") from None
    moff, mlen = desc["manifest_offset"], int(reply.fields["manifest_len"])
    raw = bytes(mapping.mm[moff : moff + mlen])
    if checksum(raw) != reply.fields["manifest_xxh"]:
        raise IntegrityError(f"manifest of {where} does not match its checksum")
    try:
        return mapping, Manifest.decode(raw, desc["data_capacity"]), mlen
    except ProtocolError as exc:
        raise IntegrityError(f"manifest of {where} is unreadable: {exc}") from None


def _manifest_capacity(manifest_len: int) -> int:
    """Room for the manifest to grow (non-tensor state changes size between steps)."""
    return int(manifest_len * 1.25) + (64 << 10)


def _torch_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise IntegrityError(f"unknown dtype {name!r} in manifest")
    return dt


_VERIFY_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _verify_parallel(m: Manifest, data: memoryview, where: str) -> None:
    """Check every chunk before touching the user's tensors (xxh3 releases the GIL)."""
    global _VERIFY_POOL
    if _VERIFY_POOL is None:
        _VERIFY_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                                             thread_name_prefix="shardkeep-verify")
    ranges = list(chunk_ranges(m.data_bytes, m.chunk))
    try:
        n = max(1, len(ranges) // 32)
        batches = [ranges[i : i + n] for i in range(0, len(ranges), n)]

        def check(batch):
            for i, a, b in batch:
                if checksum(data[a:b]) != m.checksums[i]:
                    return i, a, b
            return None

        for bad in _VERIFY_POOL.map(check, batches):
            if bad is not None:
                i, a, b = bad
                raise IntegrityError(f"{where}: checksum mismatch in chunk {i} (bytes {a}..{b})", chunk=i)
    finally:
        data.release()


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist if dist.is_available() and dist.is_initialized() else None


def _dist_device(dist) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _agree(candidates: list[int], job: str, missing: str = "", recoverable: bool = True) -> list[int]:
    """With torch.distributed: the versions every rank holds, newest first.

    ``missing`` (this rank's daemon lost versions its group holds) makes every
    rank fail alike rather than restore nothing or something older in silence;
    the error's ``recoverable`` detail is False only when no rank's loss can be
    rebuilt by ``shardkeep recover`` (more than m nodes lost).
    """
    dist = _dist()
    if dist is None:
        if missing and not candidates:
            raise UnavailableError(f"job {job!r}: {missing}", recoverable=recoverable)
        return candidates
    n = 16
    dev = _dist_device(dist)
    mine = torch.full((n + 1,), -1, dtype=torch.int64, device=dev)
    if candidates:
        mine[: min(n, len(candidates))] = torch.tensor(candidates[:n], dtype=torch.int64)
    mine[n] = (1 if recoverable else 2) if missing and not candidates else 0
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    lost = [r for r, x in enumerate(gathered) if int(x[n]) != 0]
    if lost:
        rec = any(int(x[n]) == 1 for x in gathered)
        if missing and not candidates:
            raise UnavailableError(f"job {job!r}: {missing}", recoverable=rec)
        raise UnavailableError(f"job {job!r}: the nodes of ranks {lost} lost this job's versions (see the error "
                               "on those ranks); no version can be restored on every rank", recoverable=rec)
    sets = [set(x[:n].tolist()) - {-1} for x in gathered]
    common = sorted(set.intersection(*sets), reverse=True)
    if not common and any(sets):
        raise UnavailableError(
            f"job {job!r}: the ranks hold no version in common, so none can be restored without mixing "
            "versions: " + ", ".join(f"rank {r}: {sorted(s, reverse=True) or 'none'}" for r, s in enumerate(sets)),
        )
    return common


def _agree_epoch() -> int:
    """A random number every rank shares (rank 0's); 0 without torch.distributed."""
    dist = _dist()
    if dist is None:
        return 0
    t = torch.tensor([secrets.randbits(62) + 1 if dist.get_rank() == 0 else 0], dtype=torch.int64,
                     device=_dist_device(dist))
    dist.broadcast(t, src=0)
    return int(t.item())


def _agree_value(v: int) -> tuple[int, int]:
    """(min, max) of ``v`` over the ranks; (v, v) without torch.distributed."""
    dist = _dist()
    if dist is None:
        return v, v
    t = torch.tensor([v, -v], dtype=torch.int64, device=_dist_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0].item()), -int(t[1].item())


def _all_ok(ok: bool) -> bool:
    dist = _dist()
    if dist is None:
        return ok
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_dist_device(dist))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
