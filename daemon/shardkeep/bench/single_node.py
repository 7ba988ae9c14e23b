#!/usr/bin/env python
"""Single-node benchmark of shardkeep against torch.save/torch.load and torch.distributed.checkpoint.

One run measures, on the same training state (N x Linear(W, W) float32 + Adam, after one step):

* a plain ``Tensor.copy_`` of the whole state into pre-faulted memory (the reference bound);
* a simulated training loop without checkpointing, with shardkeep snapshotting every step and with
  ``dcp.async_save`` every step, in two regimes: compute shorter than the copy (0.3 x T_copy) and
  longer (3 x T_copy), where T_copy is the plain ``copy_`` time;
* the first snapshot of a new layout (registration of the slots) separately;
* restore: warm (in process) and cold (a fresh process, from interpreter start to the first resumed step);
* ``torch.save`` + fsync, ``torch.load`` from a page-cache-evicted and from a cached file, in process and
  cold in a fresh process; ``dcp.save``, ``dcp.async_save`` (blocking part and total).

It starts its own daemon (private socket, shm prefix and state dir) and removes everything it made.
See benchmarks/README.md for what every number means.

    python benchmarks/bench_single_node.py                # 1.6 GB of state, 8 steps per loop
    python benchmarks/bench_single_node.py --quick        # smoke run, 0.1 GB
    python -m shardkeep.bench.single_node --quick         # the same from an installed package
"""

from __future__ import annotations

import time as _time

_T_PROC = _time.monotonic()  # as early as possible: the cold-restore children report from here

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from shardkeep.bench.fmt import fmt_gbps, fmt_s, fmt_x, layout_rows  # noqa: E402,F401

_T_TORCH = _time.monotonic()

perf = _time.perf_counter
GB = 1e9
SHM = Path("/dev/shm")
RESULT_TAG = "BENCH_RESULT "


# --- helpers ---------------------------------------------------------------------------------------


def summ(xs: list[float]) -> dict:
    """Median, mean, min, max of a list of seconds (or anything)."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return {"n": 0, "median": None, "mean": None, "min": None, "max": None}
    return {"n": len(xs), "median": statistics.median(xs), "mean": statistics.fmean(xs), "min": min(xs),
            "max": max(xs)}


def med(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)


def fs_type(path: str) -> str:
    """Filesystem type of the mount holding ``path`` (from /proc/mounts)."""
    best, typ = "", "?"
    try:
        real = os.path.realpath(path)
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) >= len(best):
                        best, typ = parts[1], parts[2]
    except OSError:
        pass
    return f"{typ} on {best or '?'}"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine_info(tmp_dir: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "tmp_dir": tmp_dir,
        "tmp_dir_fs": fs_type(tmp_dir),
    }
    try:
        import psutil

        vm = psutil.virtual_memory()
        info["memory_total"] = vm.total
        info["memory_available_at_start"] = vm.available
    except ImportError:
        info["memory_total"] = None
    try:
        st = os.statvfs("/dev/shm")
        info["dev_shm_free"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    try:
        from importlib.metadata import version

        info["shardkeep"] = version("shardkeep")
    except Exception:  # noqa: BLE001
        info["shardkeep"] = "?"
    return info


class Timeout(Exception):
    pass


def _on_sigterm(signum, frame):  # make `finally` blocks run on SIGTERM too
    raise SystemExit(128 + signum)


# --- the training state --------------------------------------------------------------------------


def layer_bytes(width: int) -> int:
    """params + exp_avg + exp_avg_sq of one Linear(width, width)."""
    return 3 * (width * width + width) * 4


def build(n_layers: int, width: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(n_layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    return model, opt


def set_grads(model: torch.nn.Module, full: bool) -> None:
    """Small constant grads: biases only (cheap Adam step), or every parameter with ``full``."""
    for name, p in model.named_parameters():
        if full or name.endswith("bias"):
            if p.grad is None:
                p.grad = torch.full_like(p, 1e-6)
        else:
            p.grad = None


def first_optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, full: bool) -> None:
    """One step with grads on every parameter so that Adam has state for all of them."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-6)
    opt.step()
    set_grads(model, full)  # drops the weights' grads unless --full-step


def state_tensor_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    params = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    optim = 0
    for st in opt.state_dict()["state"].values():
        optim += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
    return {"params": params, "optim": optim, "total": params + optim}


def empty_batch(width: int) -> torch.Tensor:
    """Zero rows: the forward pass fires the pre-hook but costs nothing (compute is simulated)."""
    return torch.empty(0, width)


class Compute:
    """Simulated compute: matmuls on scratch tensors (never the model), a fixed amount of work."""

    N = 256

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(self.N, self.N, generator=g)
        self.b = torch.randn(self.N, self.N, generator=g)
        self.c = torch.empty(self.N, self.N)

    def run(self, iters: int) -> None:
        for _ in range(iters):
            torch.mm(self.a, self.b, out=self.c)

    def calibrate(self, reps: int = 40) -> float:
        self.run(5)
        times = []
        for _ in range(3):
            t = perf()
            self.run(reps)
            times.append((perf() - t) / reps)
        return min(times)


# --- the daemon -----------------------------------------------------------------------------------


def shardkeep_cmd(*args: str) -> list[str]:
    exe = Path(sys.executable).parent / "shardkeep"
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-m", "shardkeep.daemon.cli", *args]


class Daemon:
    extra: tuple[str, ...] = ()   # more daemon flags (a group node's)
    new_session = False           # its own process session (a group node: signals to the bench are not its)
    start_timeout = 30.0
    what = "daemon"

    def __init__(self, root: Path) -> None:
        self.prefix = f"skbench{secrets.token_hex(4)}"
        self.root = root
        self.socket = str(root / "run" / "sk.sock")
        self.state_dir = str(root / "state")
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self, timeout: float | None = None) -> "Daemon":
        from shardkeep.proto.errors import ShardkeepError
        from shardkeep.proto.transport import Channel

        (self.root / "run").mkdir(mode=0o700, parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            shardkeep_cmd("daemon", "--socket", self.socket, "--shm-prefix", self.prefix,
                          "--state-dir", self.state_dir, "--log-level", "INFO", *self.extra),
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=self.new_session,
        )
        timeout = self.start_timeout if timeout is None else timeout
        deadline = _time.monotonic() + timeout
        while _time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.what} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                Channel(self.socket, timeout=1.0).request("ping")
                return self
            except ShardkeepError:
                _time.sleep(0.05)
        raise RuntimeError(f"{self.what} did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self._log is not None:
            self._log.close()
            self._log = None
        for p in SHM.glob(f"{self.prefix}*"):
            with contextlib.suppress(OSError):
                p.unlink()


# --- measurements ---------------------------------------------------------------------------------


def plain_copy(tensors: list[torch.Tensor], reps: int, threads: int) -> dict:
    """``Tensor.copy_`` of every state tensor into one pre-faulted buffer."""
    total = sum(t.numel() * t.element_size() for t in tensors)
    buf = torch.empty(total, dtype=torch.uint8)
    buf.fill_(0)  # pre-fault
    dsts, off = [], 0
    for t in tensors:
        n = t.numel() * t.element_size()
        dsts.append(buf[off: off + n].view(t.dtype).view(t.shape))
        off += n
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    times = []
    try:
        for _ in range(reps + 1):
            t0 = perf()
            for s, d in zip(tensors, dsts):
                d.copy_(s)
            times.append(perf() - t0)
    finally:
        torch.set_num_threads(old)
    del dsts, buf
    times = times[1:]  # the first pass warms caches and TLBs
    return {"threads": threads, "bytes": total, "seconds": times, "s": summ(times),
            "gbps": total / med(times) / GB}


def train_loop(*, name: str, model, opt, width: int, compute: Compute, iters: int, steps: int, warmup: int,
               full_step: bool, step0: int, snap=None, state=None, dcp_saver=None,
               timeout: float = 600.0) -> dict:
    """Simulated training; with ``snap`` a shardkeep snapshot per step, with ``dcp_saver`` a dcp.async_save."""
    x = empty_batch(width)
    recs = []
    futs = []
    set_grads(model, full_step)
    for i in range(warmup + steps):
        step = step0 + i
        b0 = snap.stats.blocked_s if snap is not None else 0.0
        t0 = perf()
        model(x)                                   # forward pre-hook: waits for the buffers' copy
        t1 = perf()
        compute.run(iters)                         # "forward + backward"
        t2 = perf()
        opt.step()                                 # step pre-hook: waits for params + optimizer state
        t3 = perf()
        rec = {"step": step, "warmup": i < warmup, "forward_s": t1 - t0, "compute_s": t2 - t1,
               "optim_step_s": t3 - t2}
        if snap is not None:
            call0 = perf()
            fut = snap.snapshot(state, step)
            call1 = perf()
            rec["snapshot_call_s"] = call1 - call0
            rec["call_t"] = call0

            def done(f, rec=rec, call0=call0):
                rec["commit_latency_s"] = perf() - call0
                try:
                    r = f.result()
                    rec["status"], rec["reason"] = r.status, r.reason
                    if r.status == "committed":
                        rec["copy_s"] = snap.stats.last_copy_s
                        rec["last_commit_s"] = snap.stats.last_commit_s
                except Exception as exc:  # noqa: BLE001
                    rec["status"], rec["reason"] = "failed", f"{type(exc).__name__}: {exc}"

            fut.add_done_callback(done)
            futs.append(fut)
        elif dcp_saver is not None:
            rec.update(dcp_saver.step(step, rec))
        t4 = perf()
        rec["step_s"] = t4 - t0
        rec["blocked_s"] = (snap.stats.blocked_s - b0) if snap is not None else rec.get("dcp_blocked_s", 0.0)
        recs.append(rec)
    tail0 = perf()
    if snap is not None:
        snap.wait(timeout)
        for f in futs:
            f.result(timeout=timeout)
    if dcp_saver is not None:
        dcp_saver.drain(timeout)
    _time.sleep(0.005)  # done callbacks run right after a result is set
    return {"name": name, "iters": iters, "records": recs, "tail_wait_s": perf() - tail0, "load": loadavg()}


def summarize(recs: list[dict]) -> dict:
    """Summaries of the measured (non-warmup) steps of one or more loops."""
    steady = [r for r in recs if not r["warmup"]]
    out = {"steps": len(steady)}
    for k in ("step_s", "forward_s", "compute_s", "optim_step_s", "blocked_s", "snapshot_call_s",
              "commit_latency_s", "copy_s", "dcp_wait_prev_s", "dcp_call_s", "dcp_total_s"):
        vals = [r[k] for r in steady if r.get(k) is not None]
        if vals:
            out[k] = summ(vals)
    if any("status" in r or "snapshot_call_s" in r for r in recs):
        out["committed"] = sum(1 for r in recs if r.get("status") == "committed")
        out["skipped"] = sum(1 for r in recs if r.get("status") == "skipped")
        out["failed"] = sum(1 for r in recs if r.get("status") == "failed")
        out["skip_reasons"] = sorted({r.get("reason", "") for r in recs
                                      if "status" in r and r.get("status") != "committed"})
    return out


class DcpLoopSaver:
    """``dcp.async_save`` every step; waits for the previous save first, as a user must."""

    def __init__(self, model, opt, ckpt_dir: str, no_dist: bool = False) -> None:
        self.model, self.opt, self.dir, self.no_dist = model, opt, ckpt_dir, no_dist
        self.prev = None

    def step(self, step: int, rec: dict) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        t0 = perf()
        if self.prev is not None:
            self.prev.result(timeout=600)
        t1 = perf()
        msd, osd = get_state_dict(self.model, self.opt)
        fut = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=self.dir,
                             **({"no_dist": True} if self.no_dist else {}))
        t2 = perf()
        fut.add_done_callback(lambda f, c=t1: rec.__setitem__("dcp_total_s", perf() - c))
        self.prev = fut
        return {"dcp_wait_prev_s": t1 - t0, "dcp_call_s": t2 - t1, "dcp_blocked_s": t2 - t0}

    def drain(self, timeout: float) -> None:
        if self.prev is not None:
            self.prev.result(timeout=timeout)
            self.prev = None


def torch_save(sd: dict, path: str) -> dict:
    t0 = perf()
    with open(path, "wb") as f:
        torch.save(sd, f)
        f.flush()
        t1 = perf()
        os.fsync(f.fileno())
    t2 = perf()
    return {"serialize_write_s": t1 - t0, "fsync_s": t2 - t1, "total_s": t2 - t0, "bytes": os.path.getsize(path)}


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: str) -> float | None:
    """Share of the file's pages in the page cache (mincore), to check that eviction worked."""
    import ctypes
    import mmap as _mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        size = os.path.getsize(path)
        page = _mmap.PAGESIZE
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, _mmap.PROT_READ, _mmap.MAP_SHARED, fd, 0)
            if addr is None or addr == ctypes.c_void_p(-1).value:
                return None
            try:
                pages = (size + page - 1) // page
                vec = ctypes.create_string_buffer(pages)
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident = vec.raw[:pages].translate(bytes(i & 1 for i in range(256))).count(1)
                return resident / pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        return None


def cache(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def torch_load_into(path: str, model, opt) -> dict:
    t0 = perf()
    sd = torch.load(path, weights_only=True)
    t1 = perf()
    model.load_state_dict(sd["model"])
    opt.load_state_dict(sd["optim"])
    t2 = perf()
    del sd
    return {"load_s": t1 - t0, "load_state_dict_s": t2 - t1, "total_s": t2 - t0}


# --- cold-restore children -------------------------------------------------------------------------


def child_main(args: argparse.Namespace) -> int:
    """A fresh trainer process: build, restore (shardkeep or torch.load), run one step, report."""
    spec = json.loads(args.child_spec)
    t = {"proc_start": _T_PROC, "torch_imported": _T_TORCH}
    torch.set_num_threads(spec["threads"])
    model, opt = build(spec["layers"], spec["width"])
    t["built"] = _time.monotonic()
    state = {"model": model, "optim": opt}
    out: dict = {"kind": args.child}
    if args.child == "shardkeep":
        from shardkeep.client import Snapshotter

        snap = Snapshotter(socket=spec["socket"], job=spec["job"], rank=0, world_size=1)
        t["client_ready"] = _time.monotonic()
        step = snap.restore(state)
        t["restored"] = _time.monotonic()
        out["step"] = step
        out["restore_info"] = str(snap.last_restore)
        out["restore_seconds_reported"] = snap.last_restore.seconds if snap.last_restore else None
    else:
        t["client_ready"] = _time.monotonic()
        sd = torch.load(spec["file"], weights_only=True)
        t["loaded"] = _time.monotonic()
        model.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        del sd
        t["restored"] = _time.monotonic()
    set_grads(model, spec["full_step"])
    model(empty_batch(spec["width"]))
    opt.step()
    t["first_step"] = _time.monotonic()
    if args.child == "shardkeep":
        snap.close()
    out["t"] = t
    out["adam_state_entries"] = len(opt.state)
    print(RESULT_TAG + json.dumps(out), flush=True)
    return 0


def run_child(kind: str, spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "shardkeep.bench.single_node", "--child", kind, "--child-spec", json.dumps(spec)]
    t_spawn = _time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    t_exit = _time.monotonic()
    if p.returncode != 0:
        raise RuntimeError(f"child {kind} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith(RESULT_TAG)), None)
    if line is None:
        raise RuntimeError(f"child {kind} printed no result:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    out = json.loads(line[len(RESULT_TAG):])
    t = out["t"]
    out["phases_s"] = {
        "interpreter_start": t["proc_start"] - t_spawn,
        "import_torch": t["torch_imported"] - t["proc_start"],
        "build_model": t["built"] - t["torch_imported"],
        "client_setup": t["client_ready"] - t["built"],
        "restore": t["restored"] - t["client_ready"],
        "first_step": t["first_step"] - t["restored"],
    }
    if "loaded" in t:
        out["phases_s"]["torch_load"] = t["loaded"] - t["client_ready"]
        out["phases_s"]["load_state_dict"] = t["restored"] - t["loaded"]
    out["spawn_to_first_step_s"] = t["first_step"] - t_spawn
    out["spawn_to_exit_s"] = t_exit - t_spawn
    out["stderr_tail"] = p.stderr[-1500:]
    return out


# --- report -----------------------------------------------------------------------------------------


def render(R: dict) -> str:
    rows: list[tuple[str, str, str]] = []

    def sec(title: str) -> None:
        rows.append(("", "", ""))
        rows.append((f"== {title}", "", ""))

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))

    def g(d: dict | None, *keys, default=None):
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return default
            d = d[k]
        return d

    m, st, cfg = R["machine"], R.get("state"), R["config"]
    sec("setup")
    if st:
        row("state", f"{st['bytes']['total'] / GB:.3f} GB",
            f"{st['bytes']['total']:,} B: {st['layers']} x Linear({st['width']},{st['width']}) fp32 + Adam; "
            f"snapshot {st['snapshot_bytes']:,} B in {st['snapshot_tensors']} tensors (incl. RNG)")
    row("machine", f"{m['cpu_count']} CPU", f"{m['cpu_model']}; {(m.get('memory_total') or 0) / 2**30:.1f} GiB RAM; "
        f"torch {m['torch']} ({m['torch_threads']} threads); {m['platform']}")
    row("load average", f"{R['load_start'][0] if R['load_start'] else '?'}",
        f"1/5/15 min: start {R['load_start']}, end {R.get('load_end')}")
    row("torch threads", str(cfg["threads"]), f"intra-op threads outside the simulated compute (torch default "
        f"{m['torch_threads']})")
    row("loops", f"{cfg['rounds']} x {cfg['steps']}",
        f"rounds x measured steps per mode and regime (+{cfg['warmup']} warmup per block); compute threads "
        f"{cfg['compute_threads']}; optimizer step updates {'all params' if cfg['full_step'] else 'biases only'}")

    pc = R.get("plain_copy")
    if pc:
        sec("reference: plain Tensor.copy_ of the state into pre-faulted memory")
        for k in ("one_thread", "torch_default"):
            c = pc[k]
            row(f"copy_, {c['threads']} thread{'s' if c['threads'] > 1 else ''}", fmt_gbps(c["gbps"]),
                f"{fmt_s(c['s']['median'])} median of {c['s']['n']} (best {fmt_s(c['s']['min'])})")
        cal = R.get("calibration", {})
        row("T_copy (calibration)", fmt_s(cal.get("t_copy_s")), f"matmul {Compute.N}^2: {fmt_s(cal.get('matmul_s'))}")

    fs = R.get("first_snapshot")
    if fs:
        sec("shardkeep: first snapshot (new layout: slots created and mapped)")
        row("snapshot() call", fmt_s(fs.get("snapshot_call_s")), "")
        dur = fs.get("steps_during") or []
        row("steps trained until it resolved", str(len(dur)),
            f"{fmt_s(sum(d['step_s'] for d in dur))} in all; "
            f"slowest {fmt_s(max((d['step_s'] for d in dur), default=None))}; "
            f"blocked in hooks {fmt_s(fs.get('blocked_during_s'))}")
        row("  stall beyond a normal step", fmt_s(fs.get("stall_s")),
            f"sum over those steps of (step - median step without checkpointing, {fmt_s(fs.get('normal_step_s'))})")
        row("call -> future resolved", fmt_s(fs.get("commit_latency_s")),
            f"status {fs.get('status')}{': ' + fs['reason'] if fs.get('reason') else ''}")

    summ_ = R.get("summary", {})
    ra = R.get("ratios", {})
    for reg in R.get("regimes", []):
        k = reg["key"]
        sk, base, dl = summ_.get(f"shardkeep_{k}"), summ_.get(f"baseline_{k}"), summ_.get(f"dcp_{k}")
        if not (sk and base):
            continue
        sec(f"training loop, {reg['label']}: medians of {base['steps']} steps per mode")
        row("compute per step (target)", fmt_s(reg["target_s"]),
            f"measured: none {fmt_s(g(base, 'compute_s', 'median'))}, shardkeep {fmt_s(g(sk, 'compute_s', 'median'))}"
            + (f", dcp {fmt_s(g(dl, 'compute_s', 'median'))}" if dl else ""))
        row("step, no checkpointing", fmt_s(base["step_s"]["median"]),
            "per round " + " / ".join(fmt_s(x) for x in base["round_step_medians_s"]))
        row("step, shardkeep every step", fmt_s(sk["step_s"]["median"]),
            f"overhead {fmt_x(ra.get(f'step_overhead_shardkeep_{k}'))}; per round "
            + " / ".join(fmt_s(x) for x in sk["round_step_medians_s"]))
        row("  snapshot() call", fmt_s(g(sk, "snapshot_call_s", "median")),
            f"max {fmt_s(g(sk, 'snapshot_call_s', 'max'))}")
        row("  blocked per step (call + hooks)", fmt_s(g(sk, "blocked_s", "median")),
            f"max {fmt_s(g(sk, 'blocked_s', 'max'))}; forward pre-hook alone {fmt_s(g(sk, 'forward_s', 'median'))}")
        row("  call -> local commit", fmt_s(g(sk, "commit_latency_s", "median")),
            f"max {fmt_s(g(sk, 'commit_latency_s', 'max'))}")
        row("  copy throughput", fmt_gbps(ra.get(f"copy_gbps_{k}")),
            f"copy {fmt_s(g(sk, 'copy_s', 'median'))}; "
            f"{fmt_x(ra.get(f'copy_vs_plain_copy_{k}'))} of plain copy_ (1 thread)")
        row("  committed / skipped / failed", f"{sk['committed']} / {sk['skipped']} / {sk['failed']}",
            "; ".join(sk["skip_reasons"])[:80])
        if dl:
            row("step, dcp.async_save every step", fmt_s(dl["step_s"]["median"]),
                f"overhead {fmt_x(ra.get(f'step_overhead_dcp_{k}'))}; per round "
                + " / ".join(fmt_s(x) for x in dl["round_step_medians_s"]))
            row("  blocked per step (wait prev + call)", fmt_s(g(dl, "blocked_s", "median")),
                f"wait {fmt_s(g(dl, 'dcp_wait_prev_s', 'median'))} + call {fmt_s(g(dl, 'dcp_call_s', 'median'))}; "
                f"save total {fmt_s(g(dl, 'dcp_total_s', 'median'))}")

    sh = R.get("shm")
    if sh:
        sec("memory")
        row("daemon's /dev/shm after the loops", f"{sh['bytes'] / GB:.3f} GB",
            f"{fmt_x(ratio(sh['bytes'], sh['target']))} of --slots {sh['slots']} x the snapshot bytes; "
            f"{len(sh['files'])} files")

    rs, tl, cold = R.get("restore"), R.get("torch_file"), R.get("cold", {})
    if rs or tl:
        sec("restore (into the existing model and optimizer)")
    if rs:
        row("shardkeep warm restore (in process)", fmt_s(rs["warm"]["s"]["median"]),
            f"{fmt_gbps(rs['warm']['gbps'])}; {rs['warm']['bytes']:,} B; min {fmt_s(rs['warm']['s']['min'])}")
    if tl and "load_evicted" in tl:
        for mode in ("evicted", "cached"):
            res = [x for x in tl[f"load_{mode}"].get("resident_before", []) if x is not None]
            row(f"torch.load + load_state_dict, {mode}", fmt_s(tl[f"load_{mode}"]["total_s"]["median"]),
                f"torch.load alone {fmt_s(tl[f'load_{mode}']['load_s']['median'])}"
                + (f"; file {100 * max(res):.0f}% in page cache before" if res else ""))
    if cold:
        sec("cold restore: fresh process (interpreter + import torch + build model + restore + 1 step)")
        for name, c in cold.items():
            p = c["phases_s"]
            row(f"{name}: restore", fmt_s(p["restore"]),
                f"process start -> first step {fmt_s(c['spawn_to_first_step_s'])} "
                f"(python {fmt_s(p['interpreter_start'])}, "
                f"import torch {fmt_s(p['import_torch'])}, build {fmt_s(p['build_model'])}, "
                f"client {fmt_s(p['client_setup'])}, step {fmt_s(p['first_step'])})"
                + (f"; file {100 * c['resident_before']:.0f}% cached" if c.get("resident_before") is not None else ""))

    d = R.get("dcp")
    if tl or d:
        sec(f"checkpoint to disk ({m['tmp_dir_fs']})")
    if tl and "save" in tl:
        row("torch.save + fsync", fmt_s(tl["save"]["total_s"]["median"]),
            f"fsync {fmt_s(tl['save']['fsync_s']['median'])}; {tl['save']['bytes']:,} B")
    if d:
        row("dcp.save", fmt_s(d["save"]["median"]), "")
        row("dcp.async_save, blocking (until the call returns)", fmt_s(d["async_call"]["median"]), "")
        row("dcp.async_save, total (until the future is done)", fmt_s(d["async_total"]["median"]), "")

    labels = [
        ("restore_warm_vs_torch_load_evicted", "torch.load+load_state_dict (evicted) / shardkeep warm restore"),
        ("restore_warm_vs_torch_load_cached", "torch.load+load_state_dict (cached) / shardkeep warm restore"),
        ("restore_warm_vs_torch_load_only_evicted", "torch.load alone (evicted) / shardkeep warm restore"),
        ("restore_warm_vs_torch_load_only_cached", "torch.load alone (cached) / shardkeep warm restore"),
        ("cold_restore_vs_torch_load_evicted", "cold restore: torch.load+lsd (evicted) / shardkeep"),
        ("cold_restore_vs_torch_load_cached", "cold restore: torch.load+lsd (cached) / shardkeep"),
        ("cold_first_step_vs_torch_load_evicted", "cold start->first step: torch.load (evicted) / shardkeep"),
        ("cold_first_step_vs_torch_load_cached", "cold start->first step: torch.load (cached) / shardkeep"),
        ("dcp_async_call_vs_blocked_short", "dcp.async_save call / shardkeep blocked per step, short"),
        ("dcp_async_call_vs_blocked_long", "dcp.async_save call / shardkeep blocked per step, long"),
        ("dcp_loop_blocked_vs_blocked_short", "dcp loop blocked / shardkeep blocked per step, short"),
        ("dcp_loop_blocked_vs_blocked_long", "dcp loop blocked / shardkeep blocked per step, long"),
        ("copy_vs_plain_copy_short", "shardkeep copy GB/s / plain copy_ 1 thread, short"),
        ("copy_vs_plain_copy_long", "shardkeep copy GB/s / plain copy_ 1 thread, long"),
        ("copy_vs_plain_copy_best_long", "shardkeep copy GB/s / best plain copy_, long"),
        ("step_overhead_shardkeep_short", "step time shardkeep / no checkpointing, short"),
        ("step_overhead_shardkeep_long", "step time shardkeep / no checkpointing, long"),
        ("step_overhead_dcp_short", "step time dcp.async_save / no checkpointing, short"),
        ("step_overhead_dcp_long", "step time dcp.async_save / no checkpointing, long"),
    ]
    if ra:
        sec("ratios (speed-ups: >1 means shardkeep is faster; overheads: 1.00x means none)")
        for k, label in labels:
            if ra.get(k) is not None:
                row(label, fmt_x(ra[k]), "")

    if not R.get("ok", True):
        sec("FAILED")
        row("error", "", (R.get("error") or "").strip().splitlines()[-1] if R.get("error") else "")

    return layout_rows(rows)


# --- the run ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.6, help="params + Adam state in GB (1e9 B) (default: 1.6)")
    ap.add_argument("--steps", type=int, default=8, help="measured steps per training loop (default: 8)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/out/single_node-<timestamp>.json)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.1 GB of Linear(2048) layers, 4 steps")
    ap.add_argument("--width", type=int, default=None, help="Linear width (default: 4096; 2048 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of each loop (default: 1)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds of (no checkpoint, shardkeep, dcp) loop blocks per regime, interleaved so that "
                         "load from other work hits all three alike (default: 2)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of copy, restore and load (default: 3)")
    ap.add_argument("--disk-reps", type=int, default=2,
                    help="repetitions of torch.save, dcp.save and dcp.async_save (default: 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for everything but the simulated compute (restore, torch.load, "
                         "load_state_dict, the children). Default: torch's default, but 1 on machines with <= 2 "
                         "CPUs, where a multi-threaded copy_ stalls (up to 10x) whenever other work holds a core")
    ap.add_argument("--compute-threads", type=int, default=1,
                    help="torch threads of the simulated compute; the rest of the cores are left to the "
                         "background copy, as on a GPU trainer whose CPU waits (default: 1)")
    ap.add_argument("--full-step", action="store_true",
                    help="give every parameter a grad so Adam updates all of them each step (on CPU this is "
                         "a full memory pass per step, slower than the copy); default: biases only")
    ap.add_argument("--short", type=float, default=0.3, help="short compute as a fraction of T_copy (default 0.3)")
    ap.add_argument("--long", type=float, default=3.0, help="long compute as a multiple of T_copy (default 3)")
    ap.add_argument("--no-dcp", action="store_true", help="skip torch.distributed.checkpoint")
    ap.add_argument("--tmp-dir", default=None, help="where checkpoint files go (default: $TMPDIR or /tmp)")
    ap.add_argument("--child", choices=["shardkeep", "torch_load"], help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        if args.size == 1.6:
            args.size = 0.1
        if args.steps == 8:
            args.steps = 4
        args.width = args.width or 2048
    args.width = args.width or 4096
    if args.threads is None:
        args.threads = 1 if (os.cpu_count() or 1) <= 2 else torch.get_num_threads()
    return args


def main(argv=None, out_dir: Path | None = None) -> int:
    """``out_dir``: where ``out/single_node-<timestamp>.json`` goes without ``--out`` (default: ./benchmarks or
    ./shardkeep-bench, see ``shardkeep.bench.default_out_dir``)."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
    warnings.filterwarnings("ignore", category=FutureWarning)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir is None:
        from shardkeep.bench import default_out_dir

        out_dir = default_out_dir()
    out_path = Path(args.out) if args.out else Path(out_dir) / "out" / f"single_node-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = tempfile.mkdtemp(prefix="skbench-", dir=args.tmp_dir)
    R: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "argv": sys.argv, "load_start": loadavg()}
    R["machine"] = machine_info(tmp_root)
    R["config"] = {k: v for k, v in vars(args).items() if not k.startswith("child")}
    R["loads"] = {}
    daemon: Daemon | None = None
    snap = None
    pg = False
    ok = False
    torch_default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    default_threads = args.threads
    try:
        # 1. state ------------------------------------------------------------------------------------
        n_layers = max(1, round(args.size * GB / layer_bytes(args.width)))
        log(f"building {n_layers} x Linear({args.width}) + Adam")
        torch.manual_seed(0)
        model, opt = build(n_layers, args.width)
        first_optimizer_step(model, opt, args.full_step)
        state = {"model": model, "optim": opt}
        from shardkeep.client import Snapshotter
        from shardkeep.client import rng as sk_rng
        from shardkeep.client.flatten import flatten

        flat = flatten(state, sk_rng.capture())
        snap_bytes = sum(t.numel() * t.element_size() for t in flat.tensors)
        tensors = list(flat.tensors)
        del flat
        R["state"] = {"layers": n_layers, "width": args.width, "bytes": state_tensor_bytes(model, opt),
                      "snapshot_bytes": snap_bytes, "snapshot_tensors": len(tensors)}
        log(f"state: {R['state']['bytes']['total']:,} B ({R['state']['bytes']['total'] / GB:.3f} GB); "
            f"snapshot {snap_bytes:,} B in {len(tensors)} tensors")

        # 2. reference copy and calibration ------------------------------------------------------------
        R["loads"]["plain_copy"] = loadavg()
        R["plain_copy"] = {"torch_default": plain_copy(tensors, max(5, args.reps), torch_default_threads),
                           "one_thread": plain_copy(tensors, max(5, args.reps), 1)}
        del tensors
        # the faster of the two: on a small shared machine the multi-threaded copy_ can be the slower one
        t_copy = min(R["plain_copy"]["torch_default"]["s"]["median"], R["plain_copy"]["one_thread"]["s"]["median"])
        torch.set_num_threads(args.compute_threads)
        compute = Compute()
        mm_s = compute.calibrate()
        torch.set_num_threads(default_threads)
        regimes = [
            {"key": "short", "label": f"compute < copy ({args.short:g} x T_copy)", "target_s": args.short * t_copy},
            {"key": "long", "label": f"compute > copy ({args.long:g} x T_copy)", "target_s": args.long * t_copy},
        ]
        for reg in regimes:
            reg["iters"] = max(1, round(reg["target_s"] / mm_s))
        R["calibration"] = {"t_copy_s": t_copy, "matmul_s": mm_s, "matmul_n": Compute.N}
        R["regimes"] = regimes
        log(f"plain copy_ {R['plain_copy']['torch_default']['gbps']:.2f} GB/s "
            f"({torch_default_threads} threads), {R['plain_copy']['one_thread']['gbps']:.2f} GB/s (1 thread); "
            f"T_copy {t_copy * 1e3:.1f} ms; matmul {mm_s * 1e3:.2f} ms; iters "
            + ", ".join(f"{r['key']}={r['iters']}" for r in regimes))

        loops: dict = {}      # every block of steps, raw
        summary: dict = {}    # per (mode, regime): all rounds' measured steps together
        R["loops"], R["summary"] = loops, summary
        step = 1
        common = dict(model=model, opt=opt, width=args.width, compute=compute, steps=args.steps,
                      warmup=args.warmup, full_step=args.full_step)

        def run_loop(name: str, iters: int, **kw) -> dict:
            nonlocal step
            torch.set_num_threads(args.compute_threads)
            try:
                res = train_loop(name=name, iters=iters, step0=step, **common, **kw)
            finally:
                torch.set_num_threads(default_threads)
            step += args.warmup + args.steps
            loops[name] = res
            sm = summarize(res["records"])
            res["summary"] = sm
            log(f"{name}: step {sm['step_s']['median'] * 1e3:.1f} ms, compute {sm['compute_s']['median'] * 1e3:.1f} ms"
                f", blocked {sm['blocked_s']['median'] * 1e3:.2f} ms (medians)")
            return res

        # 3a. shardkeep: daemon, client, first snapshot (a new layout: registration) --------------------------
        daemon = Daemon(Path(tmp_root) / "daemon")
        R["shm_prefix"] = daemon.prefix
        daemon.start()
        log(f"daemon up: prefix {daemon.prefix}, socket {daemon.socket}")
        job = f"bench-{secrets.token_hex(4)}"
        snap = Snapshotter(socket=daemon.socket, job=job, rank=0, world_size=1)
        R["loads"]["first_snapshot"] = loadavg()
        torch.set_num_threads(args.compute_threads)
        fs: dict = {"step": step}
        b0 = snap.stats.blocked_s
        c0 = perf()
        fut = snap.snapshot(state, step)
        fs["snapshot_call_s"] = perf() - c0
        fut.add_done_callback(lambda f: fs.__setitem__("commit_latency_s", perf() - c0))
        b1 = snap.stats.blocked_s
        # training goes on (no further snapshots) until this one resolves: its hooks, and whatever the
        # registration costs the training thread (e.g. the GIL), land in these steps
        x0 = empty_batch(args.width)
        during = []
        deadline = perf() + 300
        while not fut.done() and perf() < deadline:
            bb = snap.stats.blocked_s
            t0 = perf()
            model(x0)
            t1 = perf()
            compute.run(regimes[0]["iters"])
            t2 = perf()
            opt.step()
            t3 = perf()
            during.append({"step_s": t3 - t0, "forward_s": t1 - t0, "compute_s": t2 - t1, "optim_step_s": t3 - t2,
                           "blocked_s": snap.stats.blocked_s - bb})
        fs["steps_during"] = during
        fs["next_step_blocked_s"] = during[0]["blocked_s"] if during else 0.0
        fs["blocked_during_s"] = snap.stats.blocked_s - b1
        fs["blocked_in_call_s"] = b1 - b0
        res = fut.result(timeout=600)
        _time.sleep(0.01)  # the done callback runs right after the result is set
        fs.update(status=res.status, reason=res.reason, copy_s=snap.stats.last_copy_s,
                  registrations=snap.stats.registrations)
        torch.set_num_threads(default_threads)
        R["first_snapshot"] = fs
        step += 1
        log(f"first snapshot: {fs['status']} {fs['reason']}; call {fs['snapshot_call_s'] * 1e3:.2f} ms, resolved after "
            f"{fs.get('commit_latency_s', 0):.3f} s; {len(during)} steps meanwhile, slowest "
            f"{max((d['step_s'] for d in during), default=0):.3f} s, blocked in hooks {fs['blocked_during_s']:.3f} s")

        # 3b. training loops: rounds of (no checkpoint, shardkeep, dcp.async_save) blocks, per regime --------
        if not args.no_dcp:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp_root, "pg-store"), 1),
                                    rank=0, world_size=1)
            pg = True
        ckpt = os.path.join(tmp_root, "dcp")
        modes = ["baseline", "shardkeep"] + ([] if args.no_dcp else ["dcp"])
        for reg in regimes:
            k = reg["key"]
            R["loads"][f"loops_{k}"] = loadavg()
            for rnd in range(args.rounds):
                run_loop(f"baseline_{k}_r{rnd}", reg["iters"])
                run_loop(f"shardkeep_{k}_r{rnd}", reg["iters"], snap=snap, state=state)
                if not args.no_dcp:
                    run_loop(f"dcp_{k}_r{rnd}", reg["iters"], dcp_saver=DcpLoopSaver(model, opt, ckpt))
            for mode in modes:
                recs = [r for rnd in range(args.rounds) for r in loops[f"{mode}_{k}_r{rnd}"]["records"]]
                summary[f"{mode}_{k}"] = summarize(recs)
                summary[f"{mode}_{k}"]["round_step_medians_s"] = [
                    loops[f"{mode}_{k}_r{rnd}"]["summary"]["step_s"]["median"] for rnd in range(args.rounds)]
        R["snapshot_stats"] = dict(vars(snap.stats))
        # the daemon's shared memory after the loops (its slots; target: --slots x the snapshot bytes)
        from shardkeep.proto.config import DEFAULT_SLOTS

        shm_files = {}
        for p in SHM.glob(f"{daemon.prefix}*"):
            with contextlib.suppress(OSError):
                shm_files[p.name] = p.stat().st_size
        R["shm"] = {"prefix": daemon.prefix, "bytes": sum(shm_files.values()), "files": shm_files,
                    "slots": DEFAULT_SLOTS, "target": DEFAULT_SLOTS * snap_bytes}
        normal = summary[f"baseline_{regimes[0]['key']}"]["step_s"]["median"]
        fs["normal_step_s"] = normal
        fs["stall_s"] = sum(max(0.0, d["step_s"] - normal) for d in fs["steps_during"])

        # 4. dcp.save and dcp.async_save on their own ------------------------------------------------------------
        if not args.no_dcp:
            R["loads"]["dcp"] = loadavg()
            d = {"save_runs": [], "async_runs": []}
            for _ in range(args.disk_reps):
                t0 = perf()
                msd, osd = get_state_dict(model, opt)
                dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
                d["save_runs"].append(perf() - t0)
                del msd, osd
            for _ in range(args.disk_reps):
                t0 = perf()
                msd, osd = get_state_dict(model, opt)
                f = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
                t1 = perf()
                f.result(timeout=600)
                t2 = perf()
                d["async_runs"].append({"call_s": t1 - t0, "total_s": t2 - t0})
                del msd, osd, f
            d["save"] = summ(d["save_runs"])
            d["async_call"] = summ([r["call_s"] for r in d["async_runs"]])
            d["async_total"] = summ([r["total_s"] for r in d["async_runs"]])
            R["dcp"] = d
            log(f"dcp.save {d['save']['median']:.3f} s; async_save call {d['async_call']['median']:.3f} s, "
                f"total {d['async_total']['median']:.3f} s")
            shutil.rmtree(ckpt, ignore_errors=True)
            dist.destroy_process_group()  # restore() below must not see a process group
            pg = False

        # 5a. warm restore -----------------------------------------------------------------------------------
        R["loads"]["restore"] = loadavg()
        last_committed = max(r["step"] for lp in loops.values() for r in lp["records"]
                             if r.get("status") == "committed")
        gc.collect()
        warm = []
        for _ in range(args.reps):
            t0 = perf()
            got = snap.restore(state)
            wall = perf() - t0
            info = snap.last_restore
            warm.append({"wall_s": wall, "reported_s": info.seconds, "bytes": info.bytes, "step": got})
            if got != last_committed:
                raise RuntimeError(f"warm restore returned step {got}, expected {last_committed}")
        ws = summ([w["wall_s"] for w in warm])
        R["restore"] = {"warm": {"runs": warm, "s": ws, "bytes": warm[0]["bytes"],
                                 "gbps": warm[0]["bytes"] / ws["median"] / GB}}
        log(f"warm restore: {ws['median'] * 1e3:.1f} ms, {R['restore']['warm']['gbps']:.2f} GB/s")
        snap.close()
        snap = None

        # 5b. cold restore, shardkeep -------------------------------------------------------------------------
        spec = {"layers": n_layers, "width": args.width, "threads": default_threads, "full_step": args.full_step}
        R["cold"] = {}
        R["loads"]["cold_shardkeep"] = loadavg()
        gc.collect()
        c = run_child("shardkeep", dict(spec, socket=daemon.socket, job=job), timeout=600)
        if c["step"] != last_committed:
            raise RuntimeError(f"cold restore returned step {c['step']}, expected {last_committed}")
        R["cold"]["shardkeep"] = c
        log(f"cold shardkeep: restore {c['phases_s']['restore']:.3f} s, start->first step "
            f"{c['spawn_to_first_step_s']:.3f} s ({c.get('restore_info')})")
        R["daemon_log_tail"] = daemon.log_tail()
        daemon.stop()  # frees its shared memory before the file baselines
        daemon = None

        # 6. torch.save / torch.load --------------------------------------------------------------------------
        tf: dict = {}
        R["torch_file"] = tf
        path = os.path.join(tmp_root, "state.pt")
        R["loads"]["torch_save"] = loadavg()
        saves = []
        for _ in range(args.disk_reps):
            sd = {"model": model.state_dict(), "optim": opt.state_dict()}
            saves.append(torch_save(sd, path))
            del sd
        tf["save"] = {"runs": saves, "total_s": summ([s["total_s"] for s in saves]),
                      "fsync_s": summ([s["fsync_s"] for s in saves]), "bytes": saves[0]["bytes"]}
        log(f"torch.save+fsync {tf['save']['total_s']['median']:.3f} s ({saves[0]['bytes']:,} B)")
        for mode in ("evicted", "cached"):
            runs = []
            for _ in range(args.reps):
                if mode == "evicted":
                    evict(path)
                else:
                    cache(path)
                gc.collect()
                resident = resident_fraction(path)
                runs.append(dict(torch_load_into(path, model, opt), resident_before=resident))
            tf[f"load_{mode}"] = {"runs": runs, "load_s": summ([r["load_s"] for r in runs]),
                                  "total_s": summ([r["total_s"] for r in runs]),
                                  "resident_before": [r["resident_before"] for r in runs]}
            log(f"torch.load {mode}: {tf[f'load_{mode}']['load_s']['median']:.3f} s, + load_state_dict "
                f"{tf[f'load_{mode}']['total_s']['median']:.3f} s")
        for mode in ("evicted", "cached"):
            if mode == "evicted":
                evict(path)
            else:
                cache(path)
            gc.collect()
            R["loads"][f"cold_torch_load_{mode}"] = loadavg()
            resident = resident_fraction(path)
            c = run_child("torch_load", dict(spec, file=path), timeout=600)
            c["resident_before"] = resident
            R["cold"][f"torch_load_{mode}"] = c
            log(f"cold torch.load ({mode}): restore {c['phases_s']['restore']:.3f} s, start->first step "
                f"{c['spawn_to_first_step_s']:.3f} s")
        os.unlink(path)

        # 7. ratios ---------------------------------------------------------------------------------------------
        ra: dict = {}
        pc1 = R["plain_copy"]["one_thread"]["gbps"]
        pcb = max(pc1, R["plain_copy"]["torch_default"]["gbps"])
        warm_s = R["restore"]["warm"]["s"]["median"]
        for mode in ("evicted", "cached"):
            ra[f"restore_warm_vs_torch_load_{mode}"] = ratio(tf[f"load_{mode}"]["total_s"]["median"], warm_s)
            ra[f"restore_warm_vs_torch_load_only_{mode}"] = ratio(tf[f"load_{mode}"]["load_s"]["median"], warm_s)
            cs, ct = R["cold"]["shardkeep"], R["cold"][f"torch_load_{mode}"]
            ra[f"cold_restore_vs_torch_load_{mode}"] = ratio(ct["phases_s"]["restore"], cs["phases_s"]["restore"])
            ra[f"cold_first_step_vs_torch_load_{mode}"] = ratio(ct["spawn_to_first_step_s"],
                                                                 cs["spawn_to_first_step_s"])
        for reg in regimes:
            k = reg["key"]
            sk, base = summary[f"shardkeep_{k}"], summary[f"baseline_{k}"]
            gbps = ratio(snap_bytes, sk["copy_s"]["median"])
            ra[f"copy_gbps_{k}"] = gbps / GB if gbps else None
            ra[f"copy_vs_plain_copy_{k}"] = ratio(ra[f"copy_gbps_{k}"], pc1)
            ra[f"copy_vs_plain_copy_best_{k}"] = ratio(ra[f"copy_gbps_{k}"], pcb)
            ra[f"step_overhead_shardkeep_{k}"] = ratio(sk["step_s"]["median"], base["step_s"]["median"])
            if "dcp" in R:
                dl = summary[f"dcp_{k}"]
                ra[f"step_overhead_dcp_{k}"] = ratio(dl["step_s"]["median"], base["step_s"]["median"])
                ra[f"dcp_async_call_vs_blocked_{k}"] = ratio(R["dcp"]["async_call"]["median"],
                                                             sk["blocked_s"]["median"])
                ra[f"dcp_loop_blocked_vs_blocked_{k}"] = ratio(dl["blocked_s"]["median"], sk["blocked_s"]["median"])
        R["ratios"] = ra
        ok = True
    finally:
        R["ok"] = ok
        if not ok:
            R["error"] = traceback.format_exc()
        if snap is not None:
            with contextlib.suppress(Exception):
                snap.close()
        if daemon is not None:
            R["daemon_log_tail"] = daemon.log_tail()
            daemon.stop()
        if pg:
            with contextlib.suppress(Exception):
                import torch.distributed as dist

                dist.destroy_process_group()
        shutil.rmtree(tmp_root, ignore_errors=True)
        R["load_end"] = loadavg()
        with contextlib.suppress(Exception):
            import psutil

            R["machine"]["memory_available_at_end"] = psutil.virtual_memory().available
        try:
            text = render(R)
        except Exception:  # noqa: BLE001 - a partial run still writes its JSON
            text = "(no summary: " + traceback.format_exc().strip().splitlines()[-1] + ")"
        R["summary_text"] = text
        with open(out_path, "w") as f:
            json.dump(R, f, indent=1, default=str)
        print("\n" + text, flush=True)
        print(f"\nresults: {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
