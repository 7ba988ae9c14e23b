"""The daemon's control plane: an asyncio loop serving trainers on an ipc ROUTER socket.

Handlers change state synchronously (no await between a check and its update);
blocking work (reserving segments, verifying checksums) runs in a thread pool,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import fcntl
import logging
import os
import secrets
import signal
import socket as pysocket
import stat
import time
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from shardkeep.proto import wire
from shardkeep.proto.errors import (
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ShardkeepError,
    UnavailableError,
)
from shardkeep.proto.faults import Phase, plan as fault_plan
from shardkeep.proto.manifest import Manifest
from shardkeep.proto.slotfile import STATE_COMMITTED, STATE_WRITING, geometry
from shardkeep.proto.transport import ipc_endpoint

from . import admission, metrics, multiuser, sdnotify
from .arena import SHM_DIR, Slot, create_slot, open_existing, verify_slot
from .codec import cpu_by_thread_role, lower_thread_priority
from .config import DaemonConfig
from .jobs import JobState
from .ratelimit import TokenBuckets

log = logging.getLogger("shardkeep.daemon")


class Daemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg.validate()
        self.instance = secrets.token_hex(8)
        self.jobs: dict[str, JobState] = {}
        self._job_locks: dict[str, asyncio.Lock] = {}
        self._slot_ids = 0
        self._commit_seq = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sk-io",
                                                           initializer=lower_thread_priority, initargs=(0,))
        self._stop: asyncio.Event | None = None
        self._lockfds: list[tuple[str, int]] = []
        self.started = time.time()
        self.loop_lag: collections.deque = collections.deque(maxlen=3000)  # (seconds late, loop CPU s) per wake
        self._lag_period = 0.02
        self.errors = 0
        self.adopted = 0
        self.metrics_port = 0
        self.rate_limited = 0
        self._limiter = TokenBuckets(cfg.max_request_rate) if cfg.max_request_rate > 0 else None
        self.tokens = None   # multi-user mode: job -> token digest (multiuser.Tokens)
        self.fd_server = None
        self.dropped_bad = 0
        self.faults = fault_plan()
        self.group = None
        self.reads = None        # remote reads over the peer data plane (reads.RemoteReads), in a group
        self.fenced = ""
        self._group_waiters: dict[tuple[str, int], asyncio.Future] = {}
        self.recover_progress: dict = {}
        self.unrecoverable: dict[str, str] = {}  # job -> why `recover` could not rebuild it here
        self.persister = None    # the persist tier (persist.Persister), with --persist-dir

    # --- lifecycle ---------------------------------------------------------------

    def _next_slot_id(self) -> int:
        self._slot_ids += 1
        return self._slot_ids

    def _lock(self) -> None:
        os.makedirs(self.cfg.state_dir, mode=0o700, exist_ok=True)
        for path in (os.path.join(self.cfg.state_dir, "daemon.lock"),
                     os.path.join(SHM_DIR, f"{self.cfg.shm_prefix}.lock")):
            fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UnavailableError(f"another shardkeep daemon holds {path}") from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._lockfds.append((path, fd))

    def _segment_names(self) -> list[str]:
        """Slot segments (group segments, ``<prefix>-g-*``, are the group's to re-adopt or remove)."""
        head, group = f"{self.cfg.shm_prefix}-", f"{self.cfg.shm_prefix}-g-"
        names = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(head))
        if not self.cfg.peers:  # no group any more: its leftovers are of no use
            for n in names:
                if n.startswith(group):
                    _unlink(n)
        return [n for n in names if not n.startswith(group)]

    async def adopt(self) -> None:
        """Re-adopt committed slots left by an earlier daemon; drop anything unverifiable."""
        loop = asyncio.get_running_loop()
        found: list[tuple[Slot, Manifest]] = []
        for name in self._segment_names():
            try:
                slot = open_existing(self._next_slot_id(), name)
            except PermissionDeniedError as exc:
                log.warning("skipping segment %s: %s", name, exc)  # not ours: leave it alone
                continue
            except (OSError, IntegrityError) as exc:
                log.warning("dropping segment %s: %s", name, exc)
                self.dropped_bad += 1
                metrics.INTEGRITY.labels("adoption").inc()
                _unlink(name)
                continue
            if slot.state != STATE_COMMITTED:
                slot.destroy()  # free or half-written: nothing to keep
                continue
            try:
                m = await loop.run_in_executor(self._pool, verify_slot, slot)
            except (IntegrityError, ProtocolError) as exc:
                log.error("dropping bad slot %s (job %s rank %d step %d): %s",
                          name, slot.header.job, slot.header.rank, slot.step, exc)
                self.dropped_bad += 1
                metrics.INTEGRITY.labels("adoption").inc()
                slot.destroy()
                continue
            slot.manifest = m
            found.append((slot, m))
        for slot, m in found:
            job = self.jobs.get(m.job)
            if job is None:
                job = self.jobs[m.job] = JobState(m.job, m.world_size, m.local_world_size, history=m.history)
            job.history = max(job.history, m.history)
            job.rank_state(m.rank).slots.append(slot)
            self._commit_seq = max(self._commit_seq, slot.header.commit_seq)
        for job in self.jobs.values():
            # a dropped version is marked free at once, so every committed slot is of this history
            # (versions kept across a resume carry the history they were written in)
            steps: dict[int, set[int]] = {}
            for rs in job.ranks.values():
                for s in rs.slots:
                    steps.setdefault(s.step, set()).add(rs.rank)
            need = set(job.local_ranks())
            job.recorded = sorted(st for st, rk in steps.items() if rk >= need)[-16:]
            n = sum(len(rs.slots) for rs in job.ranks.values())
            self.adopted += n
            log.info("adopted job %s: %d slots, restorable steps %s", job.job, n, job.restorable())

    def _bind(self) -> zmq.asyncio.Socket:
        path = os.path.abspath(self.cfg.socket)
        d = os.path.dirname(path)
        gid = multiuser.resolve_group(self.cfg.trainer_group) if self.cfg.trainer_group else None
        if gid is not None:  # multi-user: the trainer group may enter the directory and use the socket
            os.makedirs(d, mode=0o750, exist_ok=True)
            os.chown(d, -1, gid)
            os.chmod(d, 0o750)
        elif not os.path.isdir(d):
            os.makedirs(d, mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)
        else:
            st = os.stat(d)
            if st.st_mode & 0o077 and not st.st_mode & stat.S_ISVTX:
                log.warning("socket directory %s is accessible to others (mode %o)", d, st.st_mode & 0o777)
        if os.path.exists(path):
            if _daemon_alive(path):
                raise UnavailableError(f"a shardkeep daemon is already serving {path}")
            os.unlink(path)
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_PAYLOAD_BYTES + wire.MAX_HEADER_BYTES)
        sock.setsockopt(zmq.RCVHWM, 4096)
        old = os.umask(0o177)
        try:
            sock.bind(ipc_endpoint(path))
        finally:
            os.umask(old)
        if gid is not None:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
            self.tokens = multiuser.Tokens(self.cfg.state_dir)
            self.fd_server = multiuser.FdServer(multiuser.fd_socket_path(path), gid, self.tokens,
                                                self._slot_names, _open_segment)
            self.fd_server.bind()
        else:
            os.chmod(path, 0o600)
        return sock

    def _unlock(self) -> None:
        """Remove the lock files while still holding them: nothing is left in /dev/shm or the state dir."""
        for path, fd in self._lockfds:
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)
        self._lockfds.clear()

    async def run(self) -> None:
        self._lock()
        try:
            await self._run_locked()
        finally:
            self._unlock()

    async def _run_locked(self) -> None:
        await self.adopt()
        self._stop = asyncio.Event()
        if self.cfg.peers:
            from .codec import pick_ec_type
            from .group import Group

            loop = asyncio.get_running_loop()
            codec = await loop.run_in_executor(self._pool, pick_ec_type)
            self.group = Group(self.cfg, self.instance, codec, self._fenced, self._peer_skipped)
            await self.group.setup_codec(loop, self._pool)
            from .reads import RemoteReads

            self.reads = RemoteReads(self.cfg, self.group, self._pool)
            self.group.on_fetch_reply = self.reads.on_data
            for job, step, _epoch in self.group.gc.adopt_saved(self._payload):
                self.jobs[job].group_recorded = [step]
            await self.group.start()
        if self.cfg.persist_dir:
            from .persist import Persister

            self.persister = Persister(self)
            if self.group is not None:
                self.group.on_persist_done = self.persister.part_in
        sock = self._bind()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        log.info("shardkeepd %s serving %s (prefix %s, pid %d, %d jobs adopted)",
                 self.instance, self.cfg.socket, self.cfg.shm_prefix, os.getpid(), len(self.jobs))
        reader = asyncio.create_task(self._serve(sock))
        tasks = [reader, asyncio.create_task(self._janitor()), asyncio.create_task(self._lag_monitor())]
        if self.fd_server is not None:
            tasks.append(asyncio.create_task(self.fd_server.serve()))
        # systemd (Type=notify): ready once the socket is bound, adopted slots verified, the group started
        sdnotify.notify(f"READY=1\nSTATUS=serving {self.cfg.socket}, {len(self.jobs)} jobs adopted\n"
                        f"MAINPID={os.getpid()}")
        if self.cfg.metrics_port:
            self.metrics_port = metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host,
                                              lambda: self.h_status({}, None), loop)
            log.info("metrics at http://%s:%d/metrics", self.cfg.metrics_host, self.metrics_port)
        if (every := sdnotify.watchdog_interval()) is not None:
            tasks.append(asyncio.create_task(self._watchdog(every)))
        await self._stop.wait()
        sdnotify.notify("STOPPING=1\nSTATUS=stopping: committed slots stay for the next daemon")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close(linger=0)
        if self.group is not None:
            await self.group.stop()
        if self.reads is not None:
            self.reads.close()
        self.shutdown()
        if self.fenced:
            raise UnavailableError(f"stood down: {self.fenced}")

    def _fenced(self, why: str) -> None:
        """A newer generation of this node exists: serve nothing more."""
        log.critical("this node was replaced in its group and stands down: %s", why)
        self.fenced = why
        if self._stop is not None:
            self._stop.set()

    def shutdown(self) -> None:
        """Free slots go; committed versions stay in /dev/shm for the next daemon."""
        try:
            os.unlink(os.path.abspath(self.cfg.socket))
        except FileNotFoundError:
            pass
        kept = 0
        for job in self.jobs.values():
            for s in job.all_slots():
                if s.state == STATE_COMMITTED:
                    kept += 1
                    s.close()
                else:
                    s.destroy()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("shardkeepd %s stopped; %d committed slots left for re-adoption", self.instance, kept)

    async def _watchdog(self, every: float) -> None:
        """``WATCHDOG=1`` from the event loop itself: a loop that stops turning stops the pings."""
        while True:
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(every)

    async def _janitor(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            if self.group is not None and self.group.gc is not None:
                self.group.gc.trim_spares()
            for job in list(self.jobs.values()):
                for s in job.all_slots():
                    for token, expiry in list(s.pins.items()):
                        if expiry < now:
                            log.warning("restore pin %s on %s expired", token, s.name)
                            self._unpin(job, s, token)
                idle = time.time() - job.last_active
                if self.cfg.job_ttl and idle > self.cfg.job_ttl and not any(s.pinned for s in job.all_slots()):
                    self._drop_job(job, f"idle for {idle:.0f} s, longer than --job-ttl {self.cfg.job_ttl:.0f} s")

    async def _lag_monitor(self) -> None:
        """How late the event loop wakes a sleeper: what a trainer's request waits before it is read."""
        period = self._lag_period
        loop = asyncio.get_running_loop()
        while True:
            t, c = loop.time(), time.thread_time()
            await asyncio.sleep(period)
            # with the CPU the loop's thread used meanwhile: a late wake with little CPU used means the
            # thread waited for a core (or in a syscall), not behind other callbacks
            self.loop_lag.append((max(0.0, loop.time() - t - period), time.thread_time() - c))

    def loop_status(self) -> dict:
        lags = sorted(self.loop_lag)
        if not lags:
            return {"samples": 0}

        def ms(q: float) -> float:
            return round(lags[min(len(lags) - 1, int(q * len(lags)))][0] * 1000, 2)

        worst = lags[int(0.99 * len(lags)):]  # the slowest 1% of wakes: how much of them was the loop busy
        busy = sum(c for _, c in worst) / max(1e-9, sum(lag + self._lag_period for lag, _ in worst))
        return {"samples": len(lags), "lag_ms_p50": ms(0.5), "lag_ms_p99": ms(0.99), "lag_ms_max": ms(1.0),
                "worst_1pct_busy": round(min(1.0, busy), 2)}

    # --- serving -----------------------------------------------------------------

    async def _serve(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            if len(frames) < 2:
                continue
            ident, body = frames[0], frames[1:]
            envelope = [ident]
            if self._limiter is not None and not self._limiter.allow(ident.bytes):
                self.rate_limited += 1
                if self.rate_limited in (1, 10, 100) or self.rate_limited % 1000 == 0:
                    log.warning("%d requests refused so far: a client sends more than %g requests/s",
                                self.rate_limited, self.cfg.max_request_rate)
                err = UnavailableError(f"rate limit: more than {self.cfg.max_request_rate:g} requests/s from this "
                                       "connection; slow down")
                await sock.send_multipart(envelope + wire.encode_error(wire.peek_id(body), err, self.instance))
                continue
            if len(body) > 1 and len(body[0]) == 0:  # a REQ client's empty delimiter
                envelope.append(body[0])
                body = body[1:]
            try:
                msg = wire.decode_request(body)
            except Exception as exc:  # ProtocolError, or a bug in validation: reply, never die
                self.errors += 1
                err = exc if isinstance(exc, ProtocolError) else ProtocolError(f"malformed message: {exc!r}")
                log.warning("rejected message: %s", err)
                await sock.send_multipart(envelope + wire.encode_error(wire.peek_id(body), err, self.instance))
                continue
            if msg.type in ("register", "wait", "recover", "locate", "read") or (
                    msg.type == "versions" and self.group is not None):
                asyncio.create_task(self._reply_async(sock, envelope, msg))
            else:
                reply = self._handle_sync(msg)
                await sock.send_multipart(envelope + reply, copy=False)

    async def _reply_async(self, sock, envelope, msg: wire.Message) -> None:
        try:
            handler = {"register": self.h_register, "wait": self.h_wait, "recover": self.h_recover,
                       "versions": self.h_versions_group, "locate": self.h_locate, "read": self.h_read}[msg.type]
            result = await handler(msg.fields)
            fields, payload = result if isinstance(result, tuple) else (result, [])
            reply = wire.encode(wire.REPLY_OK, msg.id, {**fields, "instance": self.instance}, payload)
        except ShardkeepError as exc:
            reply = self._error(msg, exc)
        except Exception as exc:  # never let one request take the daemon down
            log.exception("%s failed", msg.type)
            reply = self._error(msg, ShardkeepError(f"internal error: {type(exc).__name__}: {exc}"))
        await sock.send_multipart(envelope + reply, copy=False)

    def _error(self, msg: wire.Message, exc: ShardkeepError) -> list:
        self.errors += 1
        log.warning("%s failed: %s: %s", msg.type, type(exc).__name__, exc)
        return wire.encode_error(msg.id, exc, self.instance)

    def _handle_sync(self, msg: wire.Message) -> list:
        handler = getattr(self, "h_" + msg.type.replace("-", "_"))
        try:
            result = handler(msg.fields, msg.payload)
        except ShardkeepError as exc:
            return self._error(msg, exc)
        except Exception as exc:
            log.exception("%s failed", msg.type)
            return self._error(msg, ShardkeepError(f"internal error: {type(exc).__name__}: {exc}"))
        fields, payload = result if isinstance(result, tuple) else (result, [])
        return wire.encode(wire.REPLY_OK, msg.id, {**fields, "instance": self.instance}, payload)

    def _check_token(self, job: str, f: dict, *, record: bool = False) -> None:
        """Multi-user mode: the request carries the job's token (``record``: the first one becomes it)."""
        if self.tokens is not None:
            self.tokens.check(job, f.get("token"), record=record)

    def _slot_names(self, job: str) -> set[str]:
        j = self.jobs.get(job)
        names = {s.name for s in j.all_slots()} if j is not None else set()
        return names | (self.reads.names(job) if self.reads is not None else set())

    def _fd_fields(self) -> dict:
        return {"fd_socket": self.fd_server.path} if self.fd_server is not None else {}

    def _job(self, job: str) -> JobState:
        j = self.jobs.get(job)
        if j is None:
            raise NotFoundError(f"no job {job!r} on this daemon")
        return j

    def used_bytes(self) -> int:
        """/dev/shm bytes this daemon holds: slots, and the group commit's parity, staging and spares."""
        return sum(j.bytes() for j in self.jobs.values()) + sum(self.group_bytes().values())

    def group_bytes(self) -> dict[str, int]:
        if self.group is None or self.group.gc is None:
            return {}
        return self.group.gc.segment_bytes()

    # --- handlers ----------------------------------------------------------------

    async def h_register(self, f: dict[str, Any]) -> dict[str, Any]:
        name, rank = f["job"], f["rank"]
        if rank >= f["world_size"]:
            raise ProtocolError(f"rank {rank} is not below world_size {f['world_size']}")
        lock = self._job_locks.setdefault(name, asyncio.Lock())
        async with lock:
            await self.faults.ahit(Phase.REGISTER)
            self._check_token(name, f, record=True)
            job = self.jobs.get(name)
            if job is None:
                job = self.jobs[name] = JobState(name, f["world_size"], f["local_world_size"])
            job.world_size, job.local_world_size = f["world_size"], f["local_world_size"]
            job.last_active = time.time()
            rs = job.rank_state(rank)
            session = job.new_session(rank)
            rs.need_data, rs.need_manifest, rs.pid = f["data_bytes"], f["manifest_bytes"], f.get("pid", 0)
            for s in job.prune(rank):
                s.destroy()
            usable = [s for s in rs.slots if rs.usable(s)]
            count = max(0, f.get("slots", self.cfg.slots) - len(usable))
            if count:
                size = geometry(f["data_bytes"], f["manifest_bytes"])[2]
                admission.admit(count * size, self.cfg.memory_limit, self.used_bytes(),
                                f"job {name!r} rank {rank} ({count} slots of {size} bytes)")
                loop = asyncio.get_running_loop()
                for _ in range(count):
                    slot = await loop.run_in_executor(
                        self._pool, create_slot, self._next_slot_id(), self.cfg.shm_prefix, name, rank,
                        f["data_bytes"], f["manifest_bytes"],
                    )
                    if rs.session != session or self.jobs.get(name) is not job:
                        slot.destroy()  # re-registered by a newer process, or finished, meanwhile
                        raise UnavailableError(f"job {name!r} rank {rank} was registered again or finished meanwhile")
                    rs.slots.append(slot)
            log.info("registered job %s rank %d/%d (local %d): %d slots, %d bytes of data each",
                     name, rank, job.world_size, job.local_world_size, len(rs.slots), f["data_bytes"])
            return {
                "session": session,
                "history": job.history,
                "slots": [dict(s.describe(), usable=rs.usable(s)) for s in rs.slots],
                **self._fd_fields(),
            }

    async def h_recover(self, f: dict[str, Any]) -> dict[str, Any]:
        from .recover import rebuild

        t0 = time.monotonic()
        try:
            out = await rebuild(self)
        except BaseException:
            metrics.RECOVERIES.labels("failed").inc()
            raise
        metrics.RECOVERIES.labels("done").inc()
        metrics.REBUILD.observe(time.monotonic() - t0)
        return out

    async def h_wait(self, f: dict[str, Any]) -> dict[str, Any]:
        """Until (job, step) is group-committed, or cannot be: the level it reached."""
        job = self._job(f["job"])
        step = f["step"]
        if self.group is None:
            return {"level": "local", "reason": "this daemon has no group"}
        if step in job.group_recorded:
            return {"level": "group"}
        fut = self._group_waiters.get((job.job, step))
        if fut is None:
            return {"level": "local", "reason": f"step {step} is not being group-committed"}
        t = self.cfg.timeouts
        timeout = min(f.get("timeout", 600_000) / 1000, t.group_commit + 2 * t.peer_down + 15)
        try:
            level, why = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return {"level": "local", "reason": f"group commit still running after {timeout:.0f}s"}
        return {"level": level, "reason": why}

    def h_begin(self, f, payload):
        job = self._job(f["job"])
        slot, why = job.begin(f["rank"], f["session"], f["step"], f.get("epoch", 0))
        if slot is None:
            log.info("job %s rank %d step %d skipped: %s", job.job, f["rank"], f["step"], why)
            if self.group is not None and not why.startswith(f"step {f['step']} was aborted"):
                # the invariant across the group: a step one rank skips is aborted on every node, at once
                # (not when the other nodes' group commit of it times out, pinning their slots meanwhile)
                self.group.broadcast_soon("skip", {"job": job.job, "step": f["step"], "epoch": f.get("epoch", 0),
                                                   "ranks": [f["rank"]], "reason": why[:200]})
            return {"skip": why}
        return {"slot": slot.id, "history": job.history}

    def h_commit(self, f, payload):
        job = self._job(f["job"])
        rank, step = f["rank"], f["step"]
        job.check_session(rank, f["session"])
        slot = job.slot_by_id(rank, f["slot"])
        if slot.state != STATE_WRITING or slot.step != step:
            if step in job.aborted:
                return {"status": "skipped", "reason": job.aborted[step]}
            raise ProtocolError(f"slot {slot.id} is not being written for step {step}")
        if self.faults.hit(Phase.LOCAL_COMMIT) == "drop":
            return {"status": "skipped", "reason": "dropped by fault injection"}
        try:
            if not payload:
                raise ProtocolError("commit carries no manifest frame")
            raw = payload[0].bytes if hasattr(payload[0], "bytes") else bytes(payload[0])
            m = Manifest.decode(raw, slot.data_capacity)
            if (m.job, m.rank, m.step) != (job.job, rank, step):
                raise ProtocolError("manifest names another job, rank or step than the commit")
            m.history = job.history
            m.world_size, m.local_world_size = job.world_size, job.local_world_size
            m.created = time.time()
            self._commit_seq += 1
            slot.commit(m, m.encode(), self._commit_seq)
        except ShardkeepError as exc:  # the writer gets its error; the slot is free again
            slot.mark_free()
            job.abort_step(step, f"rank {rank}'s commit failed: {exc}")
            raise
        recorded = job.commit(rank, step, slot)
        if recorded:  # a version of a new layout frees the old layout's slots
            for s in job.prune(rank):
                s.destroy()
        if slot.state != STATE_COMMITTED:
            return {"status": "skipped", "reason": job.aborted.get(step, "aborted")}
        metrics.COMMIT.observe(time.monotonic() - slot.begun_at)
        metrics.SNAPSHOT_BYTES.labels(job.job).inc(m.data_bytes)
        if recorded and self.group is not None:
            self._group_commit(job, step)
        elif recorded and self.persister is not None and step in job.restorable():  # a single node: local level
            self.persister.version_committed(job, step, 0, [job.find(r, step) for r in job.local_ranks()])
        return {"status": "committed", "level": "local", "recorded": recorded, "history": job.history,
                "group": self.group is not None}

    def _payload(self, job_id: str, step: int) -> list[memoryview] | None:
        """This node's payload of (job, step): its ranks' data regions in rank order (None if not whole)."""
        job = self.jobs.get(job_id)
        if job is None or step not in job.restorable():
            return None
        slots = [job.find(r, step) for r in job.local_ranks()]
        return [memoryview(s.mm)[s.header.data_offset : s.header.data_offset + s.manifest.data_bytes]
                for s in slots]

    def _group_commit(self, job: JobState, step: int) -> None:
        """Erasure-code this node's part of (job, step) across the group, in the background.

        Degraded (a peer down): not even tried.  Every node's part is needed, so the
        version could only time out, pinning its slots meanwhile and making the
        next snapshots skip (DESIGN: degraded mode goes on at local level).  The
        nodes that already see the group whole are told to abort it at once.
        """
        loop = asyncio.get_running_loop()
        if self.group.degraded:
            down = sorted(j for j in self.group.membership.peers if not self.group.peer_up(j))
            why = f"the group is degraded (node(s) {', '.join(map(str, down))} down): local level only"
            if self.group.gc is not None:
                epoch = max((s.epoch for r in job.local_ranks() if (s := job.find(r, step)) is not None), default=0)
                self.group.gc.decline(job.job, step, epoch, why)
            waiter = self._group_waiters[(job.job, step)] = loop.create_future()
            waiter.set_result(("local", why))
            loop.call_later(60, self._forget_waiter, (job.job, step), waiter)
            return
        slots = [job.find(r, step) for r in job.local_ranks()]
        views = self._payload(job.job, step)
        manifests = msgpack.packb({
            s.header.rank: bytes(s.mm[s.header.manifest_offset : s.header.manifest_offset + s.header.manifest_len])
            for s in slots}, use_bin_type=True)
        epoch = max(s.epoch for s in slots)  # the launch of the job the ranks agreed on (0: unknown)
        token = f"group-{step}"
        limit = self.cfg.timeouts.group_commit
        for s in slots:  # the data must stay whole while it is being sent
            s.pins[token] = time.monotonic() + limit + 60
        # a new future even if the step was group-committed before: after a restart the step runs again
        # (another epoch), and the old attempt's outcome must not answer for the new one
        waiter = self._group_waiters[(job.job, step)] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            ok, why, t0 = False, "", time.monotonic()
            try:
                await self.group.gc.start(job.job, step, views, manifests, epoch)
                await self.group.gc.wait(job.job, step, limit, epoch)
                ok = True
            except Exception as exc:  # degraded or timed out: the version stays at local level
                why = str(exc)
                log.warning("job %s step %d stays at local level: %s", job.job, step, exc)
                self.group.gc.abandon(job.job, step, epoch, why)
            finally:
                for s in slots:
                    s.pins.pop(token, None)
            metrics.GROUP_COMMIT.labels("group" if ok else "local").observe(time.monotonic() - t0)
            if ok and self.jobs.get(job.job) is job and any(s.step == step for s in slots):
                job.group_recorded = (job.group_recorded + [step])[-16:]
                if self.persister is not None and all(s.step == step for s in slots):
                    self.persister.version_committed(job, step, epoch, slots)
                # the new group-level version replaces every other of the job (older steps, other launches)
                held = self.persister.holding if self.persister is not None else set()
                for old in [k for k in self.group.gc.versions if k[0] == job.job and k != (job.job, step, epoch)
                            and (k[1] < step or k[2] != epoch) and k not in held]:  # (a persist still reads it)
                    self.faults.hit(Phase.RELEASE)
                    self.group.gc.release(*old)  # parity of older versions: the new one replaces it
            if not waiter.done():
                waiter.set_result(("group", "") if ok else ("local", why))
            asyncio.get_running_loop().call_later(60, self._forget_waiter, (job.job, step), waiter)

        asyncio.get_running_loop().create_task(run())

    def _peer_skipped(self, src: int, f: dict) -> None:
        """Node ``src`` skipped (job, step): abort it here too, and its group commit."""
        job = self.jobs.get(f["job"])
        why = f"node {src} skipped it: {f.get('reason', '')}"
        if job is not None:
            job.abort_step(f["step"], why)
        if self.group is not None and self.group.gc is not None:
            self.group.gc.abort_version(f["job"], f["step"], f.get("epoch", 0), why)

    def _forget_waiter(self, key: tuple[str, int], waiter: asyncio.Future) -> None:
        if self._group_waiters.get(key) is waiter:
            del self._group_waiters[key]

    def h_abort(self, f, payload):
        job = self._job(f["job"])
        job.check_session(f["rank"], f["session"])
        slot = job.slot_by_id(f["rank"], f["slot"])
        epoch = getattr(slot, "epoch", 0) if slot.step == f["step"] else 0
        if slot.state == STATE_WRITING and slot.step == f["step"]:
            slot.mark_free()
        why = f"rank {f['rank']} aborted: {f.get('reason', 'client error')}"
        job.abort_step(f["step"], why)
        if self.group is not None:  # as for a skip at begin: the other nodes must not wait for this node's part
            self.group.broadcast_soon("skip", {"job": job.job, "step": f["step"], "epoch": epoch,
                                               "ranks": [f["rank"]], "reason": why[:200]})
        return {}

    def h_versions(self, f, payload):
        job = self.jobs.get(f["job"])
        if job is None:
            return {"restorable": [], "history": 0, "exists": False}
        self._check_token(job.job, f)
        job.last_active = time.time()
        out: dict[str, Any] = {"restorable": job.restorable(), "history": job.history, "exists": True,
                               "world_size": job.world_size, "local_world_size": job.local_world_size}
        if "rank" in f:
            rs = job.ranks.get(f["rank"])
            out["rank_steps"] = sorted(rs.committed()) if rs else []
        return out

    async def h_versions_group(self, f: dict[str, Any]) -> dict[str, Any]:
        """``versions`` in a group: when this node holds nothing of the job, say why (a lost node)."""
        out = self.h_versions(f, None)
        if out["restorable"]:
            return out
        job = f["job"]
        if job in self.unrecoverable:
            out["missing"], out["recoverable"] = self.unrecoverable[job], False
            return out
        async def inventory(j: int) -> list:
            try:
                r = await self.group.clients[j].request("inventory", {}, timeout=self.cfg.timeouts.heartbeat * 2)
                return [(j, v[1]) for v in r.fields.get("versions", []) if v[0] == job]
            except ShardkeepError:
                return []

        held: dict[int, list[int]] = {}
        for found in await asyncio.gather(*(inventory(j) for j in self.group.live_peers())):
            for j, step in found:
                held.setdefault(step, []).append(j)
        if held:
            step = max(held)
            # a rebuild needs k = n - m holders of the version; with fewer, only a persisted copy can serve
            out["recoverable"] = len(held[step]) >= self.group.placement.k
            out["missing"] = (
                f"node {self.group.node} holds no version of job {job!r}, but nodes {sorted(held[step])} hold "
                f"step {step} at group level: this node lost its memory or was replaced; " + (
                    "run `shardkeep recover` on it before restoring" if out["recoverable"] else
                    f"a rebuild needs {self.group.placement.k} of the {self.group.placement.n} nodes, more than hold "
                    "it: memory cannot serve it (a persisted copy can)"))
        return out

    async def h_locate(self, f: dict[str, Any]) -> tuple[dict, list]:
        """Where a version's ranks are: the newest group-level version of the job (or ``step``), else the
        newest local one; the reply's payload is msgpack ``{node: {rank: manifest}}``."""
        self._check_token(f["job"], f)
        job_id, want = f["job"], f.get("step")
        gc = self.group.gc if self.group is not None else None
        found = gc.group_version(job_id, want) if gc is not None else None
        if found is not None:
            step, epoch = found
            by_node = {node: msgpack.unpackb(raw, raw=False, strict_map_key=False)
                       for node, raw in gc.manifests_of(job_id, step, epoch).items()}
            return ({"step": step, "epoch": epoch, "level": "group", "node": self.group.node},
                    [msgpack.packb(by_node, use_bin_type=True)])
        job = self.jobs.get(job_id)
        steps = [s for s in (job.restorable() if job is not None else []) if want is None or s == want]
        if not steps:
            what = f"step {want}" if want is not None else "any version"
            raise NotFoundError(f"job {job_id!r}: this daemon knows {what} neither at group level nor locally")
        step = steps[0]
        assert job is not None
        node = self.group.node if self.group is not None else 0
        mine = {}
        for r in job.local_ranks():
            slot = job.find(r, step)
            mine[r] = bytes(slot.mm[slot.header.manifest_offset : slot.header.manifest_offset + slot.header.manifest_len])
        return ({"step": step, "epoch": 0, "level": "local", "node": node},
                [msgpack.packb({node: mine}, use_bin_type=True)])

    async def h_read(self, f: dict[str, Any]) -> dict:
        """Bytes of node ``node``'s payload of a group-level version (its ranks' data in rank order), brought
        over the peer data plane into a staging segment the client maps (reads.py)."""
        self._check_token(f["job"], f)
        if self.reads is None:
            raise NotFoundError("read: this daemon is not in a group; only its own ranks can be read (open)")
        out = await self.reads.read(f["job"], f["step"], f.get("epoch", 0), f["node"], f["offset"], f["length"])
        return {**out, **self._fd_fields()}

    def h_read_done(self, f, payload):
        self._check_token(f["job"], f)
        if self.reads is None:
            raise NotFoundError("read-done: this daemon is not in a group")
        self.reads.done(f["job"], f["read"])
        return {}

    def h_open(self, f, payload):
        self._check_token(f["job"], f)
        job = self._job(f["job"])
        slot = job.find(f["rank"], f["step"])
        job.last_active = time.time()
        token = secrets.token_hex(8)
        slot.pins[token] = time.monotonic() + self.cfg.timeouts.pin_lease
        metrics.restore_opened(token)
        h = slot.header
        return {
            "pin": token, "step": slot.step, "history": h.history, "slot": slot.describe(),
            "manifest_len": h.manifest_len, "manifest_xxh": h.manifest_xxh, **self._fd_fields(),
        }

    def _unpin(self, job: JobState, slot: Slot, token: str) -> None:
        slot.pins.pop(token, None)

    def h_release(self, f, payload):
        self._check_token(f["job"], f)
        job = self._job(f["job"])
        rs = job.ranks.get(f["rank"])
        slot = next((s for s in (rs.slots if rs else ()) if f["pin"] in s.pins), None)
        if slot is None:
            raise NotFoundError(f"no restore pin {f['pin']} for job {job.job!r} rank {f['rank']}")
        if f.get("bad"):
            self.dropped_bad += 1
            metrics.INTEGRITY.labels("reader").inc()
            log.error("job %s rank %d step %d reported bad by a reader (%s): dropped",
                      job.job, f["rank"], slot.step, f.get("reason", ""))
            job.recorded = [v for v in job.recorded if v != slot.step]
            if slot.state == STATE_COMMITTED:
                slot.mark_free()
        self._unpin(job, slot, f["pin"])
        metrics.restore_released(f["pin"])
        return {}

    def h_resume(self, f, payload):
        self._check_token(f["job"], f)
        job = self._job(f["job"])
        step = f["step"]
        if job.newest_held() > step:  # any rank's slots and the job's record alike
            job.start_history(f"rank {f['rank']} resumed from step {step}", keep=lambda v: v <= step)
        for s in [s for s in job.aborted if s > step]:  # the old run's skips: the steps run again now
            del job.aborted[s]
        return {"history": job.history}

    def h_finish(self, f, payload):
        self._check_token(f["job"], f)
        return {"freed_slots": self._drop_job(self._job(f["job"]), "finished")}

    def _drop_job(self, job: JobState, why: str) -> int:
        if self.group is not None and self.group.gc is not None:
            for key in [k for k in self.group.gc.versions if k[0] == job.job]:
                self.group.gc.release(*key)
            self.group.gc.drop_spares(job.job)
        if self.reads is not None:
            self.reads.drop_job(job.job)
        slots = job.all_slots()
        freed = sum(s.size for s in slots)
        for s in slots:
            s.destroy()
        del self.jobs[job.job]
        if self.tokens is not None:
            self.tokens.forget(job.job)
        log.info("job %s %s: %d slots, %d bytes freed", job.job, why, len(slots), freed)
        return len(slots)

    def h_ping(self, f, payload):
        return {"pid": os.getpid()}

    def h_status(self, f, payload):
        jobs = [j.describe() for n, j in sorted(self.jobs.items()) if "job" not in f or n == f["job"]]
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "socket": self.cfg.socket,
            "shm_prefix": self.cfg.shm_prefix,
            "protocol": wire.PROTOCOL_VERSION,
            "memory": {
                "used": self.used_bytes(),
                "group": self.group_bytes(),
                "limit": self.cfg.memory_limit,
                "headroom": {h.name: h.free for h in admission.headrooms(self.cfg.memory_limit, self.used_bytes())},
            },
            "errors": self.errors,
            "rate_limited": self.rate_limited,
            "loop": self.loop_status(),
            "cpu_s": cpu_by_thread_role(),
            "adopted_slots": self.adopted,
            "metrics": f"http://{self.cfg.metrics_host}:{self.metrics_port}/metrics" if self.metrics_port else None,
            "dropped_bad_slots": self.dropped_bad,
            "jobs": jobs,
            "group": self.group.status() if self.group is not None else None,
            "recover": self.recover_progress or None,
            "persist": self.persister.status() if self.persister is not None else None,
            "reads": self.reads.status() if self.reads is not None else None,
        }


def _open_segment(name: str) -> int:
    """A descriptor of one of our segments, for a trainer in multi-user mode."""
    if "/" in name or name.startswith("."):
        raise ProtocolError(f"bad segment name {name!r}")
    return os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:
        pass


def _daemon_alive(path: str) -> bool:
    """Is something listening on this unix socket? (A crashed daemon leaves a dead file.)"""
    s = pysocket.socket(pysocket.AF_UNIX, pysocket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


async def _profiled(coro: Any, where: str) -> Any:
    """SHARDKEEP_PROFILE=DIR (a diagnostic, not a setting): cProfile the event loop's thread and write
    ``DIR/shardkeepd-<pid>.prof`` every 5 s and at exit (pstats format); times are the thread's CPU time
    (SHARDKEEP_PROFILE_CLOCK=wall for wall-clock time, which counts time the thread was not running)."""
    import cProfile

    os.makedirs(where, exist_ok=True)
    path = os.path.join(where, f"shardkeepd-{os.getpid()}.prof")
    wall = os.environ.get("SHARDKEEP_PROFILE_CLOCK") == "wall"
    prof = cProfile.Profile() if wall else cProfile.Profile(time.thread_time)

    async def dump() -> None:
        while True:
            await asyncio.sleep(5.0)
            prof.disable()
            prof.dump_stats(path)
            prof.enable()

    task = asyncio.get_running_loop().create_task(dump())
    prof.enable()
    try:
        return await coro
    finally:
        prof.disable()
        task.cancel()
        prof.dump_stats(path)


def _tune_malloc() -> None:
    """Keep freed data-plane buffers (4 MiB ZeroMQ messages, one per received piece) in the heap for the
    next piece instead of returning them to the kernel and faulting them in again (~8,000 minor faults per
    version and node of 0.2 GB): a fixed mmap threshold above the piece size and a high trim threshold.
    Costs at most a few tens of MiB of RSS kept for reuse."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)   # M_MMAP_THRESHOLD (glibc's maximum for the dynamic one)
    except (OSError, AttributeError):
        pass


def run_daemon(cfg: DaemonConfig) -> None:
    if cfg.peers:
        _tune_malloc()
    daemon = Daemon(cfg)
    main = daemon.run()
    if os.environ.get("SHARDKEEP_PROFILE"):
        main = _profiled(main, os.environ["SHARDKEEP_PROFILE"])
    try:
        import uvloop  # type: ignore
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
