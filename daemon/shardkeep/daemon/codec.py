"""Erasure coding of stripes in shared memory, run by worker processes (never on the event loop).

A *stripe* has ``k`` data chunks (indices ``0..k-1``) and ``m`` parity chunks (``k..k+m-1``), each
logically ``chunk_len`` bytes; a data chunk stored shorter is zero padded. The stripe is cut into
*sub-stripes*: sub-stripe ``t`` is bytes ``[t*piece, (t+1)*piece)`` of every chunk (the last one zero
padded to ``piece``), and pyeclib encodes the ``k`` data pieces of a sub-stripe concatenated
(``k*piece`` bytes) into ``k+m`` fragments of ``80 + piece`` bytes; the data fragments are the pieces.

* :func:`encode <CodecPool.encode>` writes, for each parity index, the fragment payloads of every
  sub-stripe one after the other (``substripes * piece`` bytes: the padded length) and returns the
  headers of all fragments: ``substripes * (k+m) * 80`` bytes, sub-stripe by sub-stripe, fragment 0
  first. Keep them with the parity (the manifest): they are what turns raw pieces back into valid
  pyeclib fragments.
* :func:`reconstruct <CodecPool.reconstruct>` rebuilds any chunks from any ``k`` others and those headers.

pyeclib never runs in the calling process: a decode or reconstruct given anything but ``bytes``
aborts the whole process, and pyeclib holds the GIL. :class:`CodecPool` runs
:mod:`shardkeep.daemon.codec_worker` in processes started with glibc's malloc tuned through the
environment (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``: encode runs ~10x faster), maps the
``/dev/shm`` segments by name there, and splits large calls by sub-stripe ranges across workers.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import itertools
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import msgpack

from shardkeep.proto.errors import (
    IntegrityError,
    ShardkeepError,
    ShardkeepTimeoutError,
    UnavailableError,
)


def _send(conn: Any, obj: Any) -> None:
    """msgpack over the worker's socketpair: nothing in shardkeep is ever unpickled."""
    conn.send_bytes(msgpack.packb(obj, use_bin_type=True))


def _recv(conn: Any) -> Any:
    return msgpack.unpackb(conn.recv_bytes(), raw=False, strict_map_key=False)

FRAGMENT_HEADER = 80  # bytes of pyeclib/liberasurecode header per fragment
SUBSTRIPE_BYTES = 1 << 20  # k pieces per sub-stripe add up to about this much data
PIECE_ALIGN = 64
DEFAULT_TIMEOUT = 120.0  # seconds a call may take when the caller gives no deadline
EC_TYPES = ("isa_l_rs_vand", "isa_l_rs_cauchy", "liberasurecode_rs_vand")
WORKER_ENV = {
    # glibc reads these at process start: without them every fragment pyeclib frees goes back to the
    # kernel and encode runs at ~0.4 GB/s instead of 5-7 GB/s per core (DESIGN.md, "Measured here").
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "1073741824",
}
BACKGROUND_NICE = 5  # codec workers and the daemon's bulk threads (tags, copies) yield to its event loop
MIN_PART_SUBSTRIPES = 4  # a call is split into parts of at least this many sub-stripes
PARTS_PER_WORKER = 2  # ... and into at most this many parts per worker (load balance vs. overhead)
_POLL = 0.05  # how often a busy worker's thread checks deadlines and cancellation
_GRACE = 10.0  # the awaiting side gives the worker threads this long past the deadline

Extent = tuple[str, int, int]  # (name of a file in /dev/shm, byte offset, length)

_BOOTSTRAP = (
    "import sys, json; sys.path[:] = json.loads(sys.argv[1]); "
    "from shardkeep.daemon.codec_worker import _entry; _entry(sys.argv[2:])"
)


def _child_path() -> str:
    seen: list[str] = []
    for p in sys.path:
        p = os.path.abspath(p) if p else os.getcwd()
        if p not in seen:
            seen.append(p)
    return json.dumps(seen)


def worker_env() -> dict[str, str]:
    """The environment codec processes start with: the caller's, plus the malloc tuning and their nice."""
    env = dict(os.environ)
    env.update(WORKER_ENV)
    env.setdefault("SHARDKEEP_CODEC_NICE", str(BACKGROUND_NICE))
    return env


def lower_thread_priority(by: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's scheduling priority (Linux: nice is per thread), so that the event loop's
    thread, which answers trainers, runs first on a busy machine; bulk work (BLAKE3, copies) fills the rest.
    A ThreadPoolExecutor ``initializer``; never fails."""
    tid = threading.get_native_id()
    THREAD_ROLES[tid] = threading.current_thread().name.rsplit("_", 1)[0]
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (OSError, AttributeError):
        pass


THREAD_ROLES: dict[int, str] = {}  # native thread id -> pool name (for the daemon's CPU per thread role)


def cpu_by_thread_role() -> dict[str, float]:
    """CPU seconds (user + system) of this process so far, by thread: the event loop (the main thread),
    each named pool of :func:`lower_thread_priority` threads, ZeroMQ's I/O threads, and the rest."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        tid = int(t)
        role = ("loop" if tid == pid else THREAD_ROLES.get(tid) or ("zmq" if comm.startswith("ZMQbg") else "other"))
        out[role] = round(out.get(role, 0.0) + cpu, 2)
    return out


def _worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-I", "-c", _BOOTSTRAP, _child_path(), *args]


# --- specs ---------------------------------------------------------------------------------------------

_probe_lock = threading.Lock()
_picked: str | None = None
_verified: dict[tuple[int, int, str, int], str | None] = {}


def _run_probe(req: dict, timeout: float = 60.0) -> dict:
    try:
        out = subprocess.run(_worker_cmd("probe", json.dumps(req)), env=worker_env(), capture_output=True,
                             text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise ShardkeepTimeoutError(f"codec probe (pyeclib check) timed out after {timeout:.0f} s") from None
    except OSError as e:
        raise UnavailableError(f"cannot start the codec probe: {e}") from None
    lines = out.stdout.strip().splitlines()
    try:
        res = json.loads(lines[-1]) if lines else None
    except ValueError:
        res = None
    if out.returncode != 0 or not isinstance(res, dict) or "fatal" in res:
        why = res.get("fatal") if isinstance(res, dict) else out.stderr.strip()[-2000:]
        raise UnavailableError(f"codec probe failed (exit {out.returncode}): {why}")
    return res


def pick_ec_type() -> str:
    """``"isa_l_rs_vand"`` if pyeclib can create it here, else ``"liberasurecode_rs_vand"`` (cached).

    Checked in a throwaway process, so the caller never loads pyeclib.
    """
    global _picked
    with _probe_lock:
        if _picked is None:
            _picked = str(_run_probe({"pick": True})["ec_type"])
        return _picked


@dataclass(frozen=True)
class CodecSpec:
    k: int  # data fragments per sub-stripe (>= 1)
    m: int  # parity fragments (>= 1)
    ec_type: str
    piece: int  # bytes per data piece per sub-stripe; pyeclib's fragments are exactly piece + 80

    @property
    def n(self) -> int:
        return self.k + self.m


def piece_size(k: int) -> int:
    """floor(1 MiB / k) rounded down to a multiple of 64."""
    return (SUBSTRIPE_BYTES // k) // PIECE_ALIGN * PIECE_ALIGN


def make_spec(k: int, m: int, ec_type: str | None = None) -> CodecSpec:
    """The spec for a ``k+m`` code; verifies with a real encode (in a throwaway process, cached)."""
    for v, what in ((k, "k"), (m, "m")):
        if type(v) is not int or v < 1:
            raise ValueError(f"{what} must be an int >= 1, got {v!r}")
    if ec_type is not None and ec_type not in EC_TYPES:
        raise ValueError(f"unknown ec_type {ec_type!r}; one of {', '.join(EC_TYPES)}")
    piece = piece_size(k)
    if piece < PIECE_ALIGN:
        raise ValueError(f"k={k} is too large: a piece of 1 MiB / k would be under {PIECE_ALIGN} bytes")
    ec = ec_type or pick_ec_type()
    key = (k, m, ec, piece)
    with _probe_lock:
        if key not in _verified:
            res = _run_probe({"spec": {"k": k, "m": m, "ec_type": ec, "piece": piece}})
            _verified[key] = None if res.get("ok") else str(res.get("error") or res)
        err = _verified[key]
    if err is not None:
        raise ValueError(f"codec spec k={k} m={m} {ec} piece={piece} is unusable: {err}")
    return CodecSpec(k=k, m=m, ec_type=ec, piece=piece)


def substripes(chunk_len: int, piece: int) -> int:
    """ceil(chunk_len / piece); 0 for 0."""
    if chunk_len < 0 or piece < 1:
        raise ValueError(f"substripes: bad chunk_len {chunk_len} or piece {piece}")
    return -(-chunk_len // piece)


# --- argument checks (in the caller, cheap; the worker checks file bounds) --------------------------------


def _check_spec(spec: Any) -> None:
    if not isinstance(spec, CodecSpec):
        raise ValueError(f"spec must be a CodecSpec, got {type(spec).__name__}")
    for v, what in ((spec.k, "k"), (spec.m, "m"), (spec.piece, "piece")):
        if type(v) is not int or v < 1:
            raise ValueError(f"spec.{what} must be an int >= 1, got {v!r}")
    if spec.ec_type not in EC_TYPES:
        raise ValueError(f"spec.ec_type {spec.ec_type!r} is not one of {', '.join(EC_TYPES)}")


def _check_extents(exts: Any, what: str) -> tuple[list[tuple[str, int, int]], int]:
    if not isinstance(exts, (list, tuple)):
        raise ValueError(f"{what}: extents must be a list of (name, offset, length), got {type(exts).__name__}")
    out = []
    total = 0
    for e in exts:
        if not isinstance(e, (list, tuple)) or len(e) != 3:
            raise ValueError(f"{what}: extent {e!r} is not (name, offset, length)")
        name, off, length = e
        if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
            raise ValueError(f"{what}: invalid shm segment name {name!r} (a file name in /dev/shm, without '/')")
        if type(off) is not int or type(length) is not int or off < 0 or length < 0:
            raise ValueError(f"{what}: extent {e!r}: offset and length must be non-negative ints")
        out.append((name, off, length))
        total += length
    return out, total


def _check_chunk_len(chunk_len: Any) -> int:
    if type(chunk_len) is not int or chunk_len < 0:
        raise ValueError(f"chunk_len must be a non-negative int, got {chunk_len!r}")
    return chunk_len


def _timeout_of(deadline: float | None) -> float:
    if deadline is None:
        return DEFAULT_TIMEOUT
    if not isinstance(deadline, (int, float)) or deadline != deadline or deadline <= 0:
        raise ValueError(f"deadline must be a positive number of seconds, got {deadline!r}")
    return float(deadline)


def _describe_exit(rc: int | None) -> str:
    if rc is None:
        return "stopped answering"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


# --- the pool ------------------------------------------------------------------------------------------


class _Skipped(Exception):
    """A part never ran because another part of the same call failed first."""


class _StartPending(Exception):
    """The worker is still starting when the call's deadline comes."""


class _Call:
    __slots__ = ("op", "timeout", "deadline", "skip", "abandon", "label")

    def __init__(self, op: str, timeout: float, label: str) -> None:
        self.op = op
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.skip = False  # do not start parts not yet started
        self.abandon = False  # the caller is gone: stop running parts too (kill their workers)
        self.label = label


class _Part:
    __slots__ = ("call", "msg", "future", "desc")

    def __init__(self, call: _Call, msg: tuple, desc: str) -> None:
        self.call = call
        self.msg = msg
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.desc = desc


class _WorkerSlot:
    """One worker process and the thread that feeds it parts from the pool's queue."""

    def __init__(self, pool: "CodecPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.conn: Connection | None = None
        self.ready = False
        self.pid: int | None = None
        self.starts = 0
        self._start_failures = 0
        self.spawned_at = 0.0
        self.thread = threading.Thread(target=self._run, name=f"shardkeep-codec-{index}", daemon=True)

    # process management (only this slot's thread touches proc/conn after start)

    def spawn(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                _worker_cmd("worker", str(child.fileno())),
                env=self.pool._env, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
            )
        except BaseException:
            parent.close()
            child.close()
            raise
        child.close()
        self.conn = Connection(parent.detach())
        self.proc = proc
        self.pid = proc.pid
        self.ready = False
        self.spawned_at = time.monotonic()
        self.starts += 1

    def _wait_ready(self, timeout: float) -> None:
        assert self.conn is not None and self.proc is not None
        try:
            if not self.conn.poll(timeout):
                raise UnavailableError(f"codec worker (pid {self.pid}) did not start within {timeout:.1f} s",
                                       pid=self.pid)
            msg = _recv(self.conn)
        except (EOFError, OSError):
            rc = self._reap(2.0)
            raise UnavailableError(f"codec worker (pid {self.pid}) {_describe_exit(rc)} while starting",
                                   pid=self.pid) from None
        if not (isinstance(msg, list) and msg and msg[0] == "ready"):
            why = msg[1] if isinstance(msg, list) and len(msg) > 1 else repr(msg)
            raise UnavailableError(f"codec worker (pid {self.pid}) failed to start: {why}", pid=self.pid)
        self.ready = True

    def _reap(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> int | None:
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except OSError:
                    pass
            rc = self._reap(10.0)
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
        self.proc = None
        self.conn = None
        self.ready = False
        return rc

    def _ensure(self, deadline: float) -> None:
        """A live, ready worker, or UnavailableError."""
        if self.proc is not None and self.proc.poll() is not None:
            self.kill()  # died while idle
        if self.proc is None:
            self.spawn()
        if not self.ready:
            now = time.monotonic()
            start_left = self.spawned_at + self.pool.start_timeout - now
            if deadline - now < start_left:
                # the call's deadline comes first: wait that long, but a slow start is not a dead worker
                if not self.conn.poll(max(deadline - now, 0.0)):
                    raise _StartPending()
            try:
                self._wait_ready(max(start_left, 0.0))
            except UnavailableError:
                self.kill()
                raise

    # the thread

    def _run(self) -> None:
        pool = self.pool
        try:
            self.spawn()  # start at once so that the first call finds a warm worker
        except Exception:
            pass  # the first part retries and reports it
        while True:
            part = pool._queue.get()
            if part is None:
                break
            if not part.future.set_running_or_notify_cancel():
                continue
            try:
                result = self._serve(part)
            except BaseException as e:  # every outcome ends up in the future, never in this thread
                if not part.future.done():
                    part.future.set_exception(e)
            else:
                if not part.future.done():
                    part.future.set_result(result)
        self.kill()

    def _serve(self, part: _Part) -> Any:
        pool = self.pool
        call = part.call
        if call.skip or pool._closed:
            raise _Skipped() if not pool._closed else UnavailableError("codec pool closed")
        if time.monotonic() >= call.deadline:
            raise ShardkeepTimeoutError(
                f"codec {call.op} timed out after {call.timeout:.1f} s waiting for a worker "
                f"({call.label}, {part.desc})",
                op=call.op, timeout_s=call.timeout)
        for attempt in (0, 1):
            try:
                self._ensure(call.deadline)
                self._start_failures = 0
            except _StartPending:
                raise ShardkeepTimeoutError(
                    f"codec {call.op} timed out after {call.timeout:.1f} s waiting for worker pid {self.pid} "
                    f"to start ({call.label}, {part.desc})", op=call.op, timeout_s=call.timeout) from None
            except UnavailableError as e:
                self._start_failures += 1
                # a broken installation must not spin: back off a little on repeated failures
                time.sleep(min(0.05 * 2 ** min(self._start_failures, 6), 2.0))
                raise UnavailableError(f"codec {call.op} ({call.label}, {part.desc}): {e.message}",
                                       op=call.op) from None
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                self.kill()
                raise UnavailableError(f"codec {call.op}: cannot start a worker process: {e}", op=call.op) from None
            assert self.conn is not None
            try:
                _send(self.conn, part.msg)
                break
            except (OSError, EOFError):
                # the worker died while idle, before it saw this part: nothing ran, start a fresh one
                self.kill()
                if attempt:
                    raise UnavailableError(f"codec {call.op} ({call.label}): cannot reach a worker",
                                           op=call.op) from None
        pid = self.pid
        conn = self.conn
        assert conn is not None
        while True:
            left = call.deadline - time.monotonic()
            if left <= 0:
                self.kill()
                self._respawn()
                raise ShardkeepTimeoutError(
                    f"codec {call.op} timed out after {call.timeout:.1f} s ({call.label}, {part.desc}); "
                    f"worker pid {pid} killed", op=call.op, timeout_s=call.timeout, pid=pid)
            if call.abandon or pool._closed:
                self.kill()
                if pool._closed:
                    raise UnavailableError(f"codec pool closed during {call.op} ({call.label})")
                self._respawn()
                raise _Skipped()
            try:
                if not conn.poll(min(left, _POLL)):
                    continue
                reply = _recv(conn)
            except (EOFError, OSError):
                rc = self.kill()
                if pool._closed:
                    raise UnavailableError(f"codec pool closed during {call.op} ({call.label})") from None
                self._respawn()
                raise UnavailableError(
                    f"codec worker (pid {pid}) {_describe_exit(rc)} during {call.op} ({call.label}, {part.desc}); "
                    f"a fresh worker was started", op=call.op, pid=pid, returncode=rc) from None
            break
        status = reply[0]
        if status == "ok":
            return reply[1]
        kind, message = reply[1], reply[2]
        if kind == "value":
            raise ValueError(f"codec {call.op}: {message}")
        if kind == "integrity":
            raise IntegrityError(f"codec {call.op} ({call.label}): {message}", op=call.op)
        raise ShardkeepError(f"codec {call.op} failed inside worker pid {pid} ({call.label}): {message}", op=call.op)

    def _respawn(self) -> None:
        if self.pool._closed:
            return
        try:
            self.spawn()
        except Exception:
            pass  # the next part retries and reports it


class CodecPool:
    """Worker processes that run pyeclib on shared memory. Never runs pyeclib in the calling process.

    Calls are coroutines; the event loop only checks arguments and waits on futures. A call is cut
    into parts by sub-stripe ranges that the workers take from one queue, so one large encode uses
    every worker. A worker that dies fails the call it was serving with :class:`UnavailableError`
    and is replaced; a call past its deadline raises :class:`ShardkeepTimeoutError` after its
    workers were killed (and replaced), so nothing writes into its extents afterwards. Once an
    awaited call returned or raised, none of its parts is running (except after cancellation of
    the awaiting task, which kills the workers serving it within ~50 ms).
    """

    def __init__(self, workers: int = 2, start_timeout: float = 30.0):
        if type(workers) is not int or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if not isinstance(start_timeout, (int, float)) or start_timeout <= 0:
            raise ValueError(f"start_timeout must be positive, got {start_timeout!r}")
        self.workers = workers
        self.start_timeout = float(start_timeout)
        self._env = worker_env()
        self._queue: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self._closed = False
        self._ids = itertools.count(1)
        self._slots = [_WorkerSlot(self, i) for i in range(workers)]
        for s in self._slots:
            s.thread.start()
        atexit.register(self.close)

    # introspection (status, tests)

    def worker_pids(self) -> list[int]:
        """Pids of the current worker processes (started or starting)."""
        return [s.pid for s in self._slots if s.proc is not None and s.pid is not None]

    def worker_starts(self) -> int:
        """How many worker processes were started so far (replacements included)."""
        return sum(s.starts for s in self._slots)

    # calls

    def _ranges(self, nsub: int) -> list[tuple[int, int]]:
        parts = max(1, min(self.workers * PARTS_PER_WORKER, nsub // MIN_PART_SUBSTRIPES))
        if self.workers == 1:
            parts = 1
        base, extra = divmod(nsub, parts)
        out, t = [], 0
        for i in range(parts):
            n = base + (1 if i < extra else 0)
            out.append((t, t + n))
            t += n
        return out

    async def _run(self, call: _Call, parts: list[_Part]) -> list[Any]:
        if self._closed:
            raise UnavailableError("codec pool closed")
        for p in parts:
            self._queue.put(p)
        waiters = [asyncio.wrap_future(p.future) for p in parts]
        try:
            pending = set(waiters)
            end = asyncio.get_running_loop().time() + call.timeout + _GRACE
            while pending:
                left = end - asyncio.get_running_loop().time()
                if left <= 0:
                    call.abandon = call.skip = True
                    raise ShardkeepTimeoutError(
                        f"codec {call.op} timed out after {call.timeout:.1f} s ({call.label}); workers did not answer",
                        op=call.op, timeout_s=call.timeout)
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_EXCEPTION)
                if any(not d.cancelled() and d.exception() is not None for d in done):
                    call.skip = True  # let running parts finish, start no more
        except BaseException:
            call.abandon = call.skip = True
            for p in parts:
                p.future.cancel()
            raise
        first: BaseException | None = None
        for w in waiters:
            if w.cancelled():
                continue
            e = w.exception()
            if e is not None and not isinstance(e, _Skipped):
                first = e
                break
        if first is not None:
            raise first
        return [w.result() for w in waiters]

    async def encode(self, spec: CodecSpec, data: list[list[Extent]], chunk_len: int,
                     parity_out: list[list[Extent]], deadline: float | None = None) -> bytes:
        """Encode one stripe; write parity payloads into ``parity_out``; return all fragment headers.

        ``data[j]``: extents of data chunk j (total <= chunk_len; shorter = zero padded, [] = zeros).
        ``parity_out[p]``: extents for parity chunk k+p, at least ``substripes * piece`` bytes; the first
        ``substripes * piece`` bytes are written. Returns ``substripes * (k+m) * 80`` header bytes.
        ``deadline``: seconds this call may take (default 120).
        """
        _check_spec(spec)
        chunk_len = _check_chunk_len(chunk_len)
        timeout = _timeout_of(deadline)
        k, m, piece = spec.k, spec.m, spec.piece
        if not isinstance(data, (list, tuple)) or len(data) != k:
            raise ValueError(f"encode: need k={k} data extent lists, got "
                             f"{len(data) if isinstance(data, (list, tuple)) else repr(data)}")
        if not isinstance(parity_out, (list, tuple)) or len(parity_out) != m:
            raise ValueError(f"encode: need m={m} parity extent lists")
        nsub = substripes(chunk_len, piece)
        dl = []
        for j, exts in enumerate(data):
            e, total = _check_extents(exts, f"data chunk {j}")
            if total > chunk_len:
                raise ValueError(f"data chunk {j}: extents hold {total} bytes, more than chunk_len {chunk_len}")
            dl.append(e)
        pl = []
        for p, exts in enumerate(parity_out):
            e, total = _check_extents(exts, f"parity chunk {k + p}")
            if total < nsub * piece:
                raise ValueError(f"parity chunk {k + p}: extents hold {total} bytes, need {nsub * piece} "
                                 f"({nsub} sub-stripes of {piece})")
            pl.append(e)
        if nsub == 0:
            return b""
        call = _Call("encode", timeout, f"k={k} m={m}, {nsub} sub-stripes, call {next(self._ids)}")
        parts = [_Part(call, ("encode", k, m, spec.ec_type, piece, dl, chunk_len, pl, t0, t1),
                       f"sub-stripes {t0}..{t1 - 1}") for t0, t1 in self._ranges(nsub)]
        return b"".join(await self._run(call, parts))

    async def reconstruct(self, spec: CodecSpec, have: dict[int, list[Extent]], headers: bytes, chunk_len: int,
                          want: dict[int, list[Extent]], deadline: float | None = None) -> None:
        """Rebuild the chunks in ``want`` from at least k chunks in ``have`` and ``encode``'s headers.

        A wanted data chunk gets the first min(extent total, chunk_len) bytes of the original chunk; a
        wanted parity chunk gets ``substripes * piece`` payload bytes as encode wrote them.
        ``deadline``: seconds this call may take (default 120).
        """
        _check_spec(spec)
        chunk_len = _check_chunk_len(chunk_len)
        timeout = _timeout_of(deadline)
        k, n, piece = spec.k, spec.n, spec.piece
        nsub = substripes(chunk_len, piece)
        if not isinstance(have, dict) or not isinstance(want, dict):
            raise ValueError("reconstruct: have and want must be dicts {chunk index: extents}")
        for i in itertools.chain(have, want):
            if type(i) is not int or not 0 <= i < n:
                raise ValueError(f"reconstruct: chunk index {i!r} outside [0, {n})")
        both = set(have) & set(want)
        if both:
            raise ValueError(f"reconstruct: chunks {sorted(both)} are both in have and want")
        if len(have) < k:
            raise ValueError(f"reconstruct: need at least k={k} available chunks, got {sorted(have)}")
        if not isinstance(headers, (bytes, bytearray, memoryview)):
            raise ValueError("reconstruct: headers must be bytes")
        headers = bytes(headers)
        hl = nsub * n * FRAGMENT_HEADER
        if len(headers) != hl:
            raise ValueError(f"reconstruct: headers have {len(headers)} bytes, expected {hl} "
                             f"({nsub} sub-stripes x {n} fragments x {FRAGMENT_HEADER})")
        hv: dict[int, list] = {}
        for i, exts in have.items():
            e, total = _check_extents(exts, f"chunk {i}")
            if i < k and total > chunk_len:
                raise ValueError(f"data chunk {i}: extents hold {total} bytes, more than chunk_len {chunk_len}")
            if i >= k and total < nsub * piece:
                raise ValueError(f"parity chunk {i}: extents hold {total} bytes, need {nsub * piece}")
            hv[i] = e
        wv: dict[int, list] = {}
        for i, exts in want.items():
            e, total = _check_extents(exts, f"chunk {i}")
            if i >= k and total < nsub * piece:
                raise ValueError(f"parity chunk {i}: extents hold {total} bytes, need {nsub * piece}")
            wv[i] = e
        if nsub == 0 or not wv:
            return None
        # only the k chunks the worker reads travel (data first, as the worker picks them)
        use = sorted(hv)[:k]
        hv = {i: hv[i] for i in use}
        call = _Call("reconstruct", timeout,
                     f"k={k} m={spec.m}, chunks {sorted(wv)} from {use}, {nsub} sub-stripes, call {next(self._ids)}")
        step = n * FRAGMENT_HEADER
        parts = [_Part(call, ("reconstruct", k, spec.m, spec.ec_type, piece, hv, headers[t0 * step:t1 * step],
                              chunk_len, wv, t0, t1), f"sub-stripes {t0}..{t1 - 1}")
                 for t0, t1 in self._ranges(nsub)]
        await self._run(call, parts)
        return None

    def close(self) -> None:
        """Stop the workers; calls still queued or running fail with UnavailableError."""
        if self._closed:
            return
        self._closed = True
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        for _ in self._slots:
            self._queue.put(None)
        for s in self._slots:
            proc = s.proc
            if proc is not None and proc.poll() is None:
                try:
                    proc.kill()
                except OSError:
                    pass
        for s in self._slots:
            if s.thread.is_alive() and s.thread is not threading.current_thread():
                s.thread.join(timeout=15.0)
        while True:  # anything still queued behind the sentinels
            try:
                part = self._queue.get_nowait()
            except queue.Empty:
                break
            if part is not None and part.future.set_running_or_notify_cancel():
                part.future.set_exception(UnavailableError("codec pool closed"))

    def __enter__(self) -> "CodecPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
