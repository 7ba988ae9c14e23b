#!/usr/bin/env python
"""Group benchmark: n real daemons erasure-coding n trainers' state, a node lost and rebuilt, in one run.

One run, on one machine (every "node" is a daemon on 127.0.0.1 with its own port, socket, /dev/shm
prefix and state dir, and one trainer process):

* references measured in the same run: a plain ``Tensor.copy_`` of one node's state, raw pyeclib
  encode + one memcpy of the same bytes (tuned malloc, as the daemons' codec workers), and the
  loopback bandwidth of the peer data plane and of the control channel in each security mode;
* in the default CURVE mode: each trainer trains (simulated compute, compute longer and shorter than
  the copy) with a ``snapshot()`` every step, and the same loop without shardkeep; the time to group
  commit (client and daemon side), encode throughput against the bound, skips, the trainer-visible
  stall, step-time overhead, ``/dev/shm`` and daemon RSS per node against ``slots * S * (1 + m/k)``;
* in each security mode (``--insecure``, CURVE, CURVE + ``--encrypt-data``): node n-1 is lost
  (SIGKILL, its shm and state dir wiped), a replacement starts at a new port, ``shardkeep recover``
  rebuilds it (timed against bytes fetched / loopback bandwidth of that mode), and the lost rank is
  restored from the replacement and compared bitwise with the trainer's own state.

See benchmarks/README.md for what every number means.

    python benchmarks/bench_group.py --quick     # smoke run, 0.05 GB per node, ~2 minutes
    python benchmarks/bench_group.py             # 4 nodes, m=1, 0.4 GB per node
    python -m shardkeep.bench.group --quick      # the same from an installed package
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from shardkeep.bench import single_node as bsn

perf = time.perf_counter
GB = bsn.GB
SHM = bsn.SHM
TAG = "BENCH_GROUP "
MODES = ("curve", "insecure", "encrypt-data")  # the first one runs the training phases

summ, med, ratio, loadavg, log = bsn.summ, bsn.med, bsn.ratio, bsn.loadavg, bsn.log
fmt_s, fmt_x, fmt_gbps = bsn.fmt_s, bsn.fmt_x, bsn.fmt_gbps


def quantile(xs: list[float], q: float) -> float | None:
    xs = sorted(float(x) for x in xs if x is not None)
    if not xs:
        return None
    i = min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))
    return xs[i]


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def peers_arg(ports: list[int]) -> str:
    return ",".join(f"tcp://127.0.0.1:{p}" for p in ports)


# --- the trainer child ------------------------------------------------------------------------------


def payload_bytes(state: dict) -> int:
    """Data bytes of one snapshot of ``state`` as the client lays it out (what the daemon calls S)."""
    from shardkeep.client import rng as sk_rng
    from shardkeep.client.flatten import flatten
    from shardkeep.proto.layout import plan_layout

    flat = flatten(state, sk_rng.capture())
    specs = [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for t, name in zip(flat.tensors, flat.names)]
    kinds = [2 if priv else 1 if late else 0 for late, priv in zip(flat.late, flat.private)]
    order = [i for kind in (0, 1, 2) for i, k in enumerate(kinds) if k == kind]
    return plan_layout(specs, order)[1]


def _tensors_of(model, opt) -> list[tuple[str, object]]:
    out = [(f"model.{k}", v) for k, v in model.state_dict().items()]
    sd = opt.state_dict()
    for pid, st in sorted(sd["state"].items()):
        for k, v in sorted(st.items()):
            out.append((f"optim.{pid}.{k}", v))
    out.append(("optim.param_groups", sd["param_groups"]))
    return out


class TrainerChild:
    """One node's trainer: commands on stdin (JSON lines), tagged JSON replies on stdout."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.rank, self.n = spec["rank"], spec["n"]
        torch.set_num_threads(1)
        torch.manual_seed(1000 + self.rank)
        self.model, self.opt = bsn.build(spec["layers"], spec["width"])
        bsn.first_optimizer_step(self.model, self.opt, False)
        self.state = {"model": self.model, "optim": self.opt}
        self.compute = bsn.Compute()
        self.x = bsn.empty_batch(spec["width"])
        self.snap = None
        self.job = None
        self.dist = False
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # anything else printed goes to the log, never into the reply stream

    def emit(self, obj: dict) -> None:
        self.out.write(TAG + json.dumps(obj, default=str) + "\n")
        self.out.flush()

    def serve(self) -> int:
        self.emit({"ok": True, "event": "ready", "pid": os.getpid(), "payload_bytes": payload_bytes(self.state),
                   "state_bytes": bsn.state_tensor_bytes(self.model, self.opt)})
        while True:
            line = sys.stdin.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                self.emit({"ok": True})
                break
            try:
                out = getattr(self, "cmd_" + cmd["cmd"])(cmd)
                self.emit({"ok": True, **(out or {})})
            except Exception:
                self.emit({"ok": False, "error": traceback.format_exc()})
        self.close_snap()
        return 0

    def close_snap(self) -> None:
        if self.snap is not None:
            with contextlib.suppress(Exception):
                self.snap.close()
            self.snap = None

    def cmd_attach(self, c: dict) -> dict:
        from shardkeep.client import Snapshotter

        self.close_snap()
        self.job = c["job"]
        self.snap = Snapshotter(socket=c["socket"], job=c["job"], rank=self.rank, world_size=self.n,
                                local_world_size=1)
        return {"durability": self.snap.durability}

    def cmd_detach(self, c: dict) -> dict:
        self.close_snap()
        return {}

    def train_step(self, iters: int) -> None:
        bsn.set_grads(self.model, False)
        self.model(self.x)
        self.compute.run(iters)
        self.opt.step()

    def cmd_settle(self, c: dict) -> dict:
        """(Optionally one training step, then) one snapshot, waited for until its future resolves."""
        if c.get("train"):
            self.train_step(c.get("iters", 1))
        self.snap.wait(60)
        t0 = perf()
        fut = self.snap.snapshot(self.state, c["step"])
        try:
            r = fut.result(timeout=c.get("timeout", 120))
            return {"step": c["step"], "status": r.status, "level": r.level, "reason": r.reason,
                    "latency_s": perf() - t0}
        except concurrent.futures.TimeoutError:
            return {"step": c["step"], "status": "timeout", "level": None, "reason": "no result in time",
                    "latency_s": perf() - t0}
        except Exception as exc:
            return {"step": c["step"], "status": "failed", "level": None, "reason": f"{type(exc).__name__}: {exc}",
                    "latency_s": perf() - t0}

    def loop(self, *, name: str, iters: int, steps: int, warmup: int, step0: int, use_snap: bool,
             tail_timeout: float, dcp_dir: str | None = None) -> dict:
        import torch.distributed as dist

        tiny = torch.zeros(1)
        recs, futs = [], []
        bsn.set_grads(self.model, False)
        snap = self.snap if use_snap else None
        # dcp.async_save every step instead: each rank its own checkpoint of its own state (no_dist)
        dcp_saver = bsn.DcpLoopSaver(self.model, self.opt, dcp_dir, no_dist=True) if dcp_dir and not snap else None
        if self.dist:
            dist.barrier()
        last_copy = snap.stats.last_copy_s if snap else 0.0
        # the client's snapshot() -> local commit time (stats.last_commit_s) of each local commit seen between
        # two steps; the future itself resolves only at group level
        seen = (snap.stats.committed, snap.stats.skipped, snap.stats.last_commit_s) if snap else None
        t_block = perf()
        for i in range(warmup + steps):
            step = step0 + i
            if snap is not None:
                seen = self._local_commit(snap, seen, recs)
            b0 = snap.stats.blocked_s if snap else 0.0
            wall0 = time.time()
            t0 = perf()
            self.model(self.x)                 # forward pre-hook: waits for the buffers' copy
            t1 = perf()
            self.compute.run(iters)            # "forward + backward"
            t2 = perf()
            if self.dist:
                dist.all_reduce(tiny)          # the gradient all-reduce of data parallel training
            t3 = perf()
            self.opt.step()                    # step pre-hook: waits for params + optimizer state
            t4 = perf()
            rec = {"step": step, "t": wall0, "warmup": i < warmup, "forward_s": t1 - t0, "compute_s": t2 - t1,
                   "sync_s": t3 - t2, "optim_step_s": t4 - t3}
            if snap is not None:
                lc = snap.stats.last_copy_s
                if lc != last_copy and recs:   # the previous snapshot's copy (its hooks have waited for it)
                    recs[-1]["copy_s"] = lc
                last_copy = lc
                c0 = perf()
                fut = snap.snapshot(self.state, step)
                rec["snapshot_call_s"] = perf() - c0

                def done(f, rec=rec, c0=c0):
                    rec["resolved_s"] = perf() - c0
                    try:
                        r = f.result()
                        rec["status"], rec["level"], rec["reason"] = r.status, r.level, r.reason
                    except Exception as exc:
                        rec["status"], rec["level"], rec["reason"] = "failed", None, f"{type(exc).__name__}: {exc}"

                fut.add_done_callback(done)
                futs.append(fut)
            elif dcp_saver is not None:
                rec.update(dcp_saver.step(step, rec))
            else:
                # control for the machine's scheduling noise: the Python work of a snapshot() call
                # (flatten the state, capture the RNG), timed where shardkeep is not involved
                from shardkeep.client import rng as sk_rng
                from shardkeep.client.flatten import flatten

                c0 = perf()
                flatten(self.state, sk_rng.capture())
                rec["control_s"] = perf() - c0
            t5 = perf()
            rec["step_s"] = t5 - t0
            rec["blocked_s"] = (snap.stats.blocked_s - b0) if snap is not None else rec.get("dcp_blocked_s", 0.0)
            recs.append(rec)
        t_end = perf()
        tail = perf()
        unresolved = 0
        if dcp_saver is not None:
            dcp_saver.drain(tail_timeout)
            time.sleep(0.01)  # the done callback that records dcp_total_s
        if snap is not None:
            snap.wait(tail_timeout)
            self._local_commit(snap, seen, recs)
            _, pending = concurrent.futures.wait(futs, timeout=tail_timeout)
            unresolved = len(pending)
            time.sleep(0.01)  # done callbacks run right after a result is set
            if snap.stats.last_copy_s != last_copy and recs:
                recs[-1]["copy_s"] = snap.stats.last_copy_s
        return {"name": name, "iters": iters, "records": recs, "block_s": t_end - t_block,
                "tail_wait_s": perf() - tail, "unresolved": unresolved, "load": loadavg()}

    @staticmethod
    def _local_commit(snap, seen: tuple, recs: list[dict]) -> tuple:
        """Record ``stats.last_commit_s`` on the last record when exactly one local commit (and no skip,
        which sets it too) happened since ``seen``; returns the new ``seen``."""
        st = snap.stats
        lc = st.last_commit_s
        now = (st.committed, st.skipped, lc)
        if recs and now[0] == seen[0] + 1 and now[1] == seen[1] and lc != seen[2] and st.last_commit_s == lc:
            recs[-1]["local_commit_s"] = lc
        return now

    def cmd_train(self, c: dict) -> dict:
        import datetime as _dt

        import torch.distributed as dist

        if c.get("sync_file"):
            dist.init_process_group("gloo", init_method=f"file://{c['sync_file']}", rank=self.rank,
                                    world_size=self.n, timeout=_dt.timedelta(seconds=120))
            self.dist = True
        step = c["step0"]
        blocks = []
        modes = c.get("modes") or ["baseline", "shardkeep"]
        try:
            for reg in c["regimes"]:
                for rnd in range(c["rounds"]):
                    for mode in modes:
                        steps = {"shardkeep": reg["sk_steps"], "baseline": reg["base_steps"],
                                 "dcp": reg.get("dcp_steps", 0)}[mode]
                        name = f"{mode}_{reg['key']}_r{rnd}"
                        dcp_dir = os.path.join(c["dcp_dir"], f"rank{self.rank}") if mode == "dcp" else None
                        b = self.loop(name=name, iters=reg["iters"], steps=steps, warmup=c["warmup"], step0=step,
                                      use_snap=mode == "shardkeep", tail_timeout=c["tail_timeout"], dcp_dir=dcp_dir)
                        step += c["warmup"] + steps
                        b["regime"], b["mode"], b["round"] = reg["key"], mode, rnd
                        blocks.append(b)
        finally:
            if self.dist:
                with contextlib.suppress(Exception):
                    dist.destroy_process_group()
                self.dist = False
        return {"blocks": blocks, "next_step": step, "stats": dict(vars(self.snap.stats))}

    def cmd_verify(self, c: dict) -> dict:
        """Restore this rank from ``socket`` into zeroed tensors of the same shapes; compare bitwise."""
        from shardkeep.client import Snapshotter

        model2, opt2 = bsn.build(self.spec["layers"], self.spec["width"])
        bsn.first_optimizer_step(model2, opt2, False)
        with torch.no_grad():
            for p in model2.parameters():
                p.zero_()
            for st in opt2.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        state2 = {"model": model2, "optim": opt2}
        t0 = perf()
        with Snapshotter(socket=c["socket"], job=c["job"], rank=self.rank, world_size=self.n,
                         local_world_size=1) as snap:
            got = snap.restore(state2)
            wall = perf() - t0
            info = snap.last_restore
            info = {"step": info.step, "source": info.source, "seconds": info.seconds, "bytes": info.bytes,
                    "text": str(info)} if info else None
        a, b = _tensors_of(self.model, self.opt), _tensors_of(model2, opt2)
        compared, mismatched, nbytes = 0, [], 0
        for (ka, va), (kb, vb) in zip(a, b):
            compared += 1
            if ka != kb:
                mismatched.append(f"{ka} vs {kb}")
            elif isinstance(va, torch.Tensor):
                nbytes += va.numel() * va.element_size()
                if not (isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and va.shape == vb.shape
                        and torch.equal(va, vb)):
                    mismatched.append(ka)
            elif va != vb:
                mismatched.append(ka)
        if len(a) != len(b):
            mismatched.append(f"{len(a)} entries vs {len(b)}")
        del model2, opt2, state2
        return {"restored_step": got, "restore_wall_s": wall, "restore_info": info, "compared": compared,
                "compared_bytes": nbytes, "mismatched": mismatched[:20], "n_mismatched": len(mismatched),
                "bitwise_equal": not mismatched}


def child_main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    return TrainerChild(json.loads(args.child_spec)).serve()


class Trainers:
    """The n trainer children, driven over their stdin/stdout."""

    def __init__(self, n: int, spec: dict, root: Path) -> None:
        self.n, self.root = n, root
        self.procs: list[subprocess.Popen] = []
        self.queues: list[queue.Queue] = []
        self.logs = [root / f"trainer{r}.log" for r in range(n)]
        env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
        for r in range(n):
            cmd = [sys.executable, "-m", "shardkeep.bench.group", "--child", "trainer",
                   "--child-spec", json.dumps(dict(spec, rank=r))]
            with open(self.logs[r], "ab") as lf:
                p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=lf, text=True,
                                     bufsize=1, env=env, start_new_session=True)
            q: queue.Queue = queue.Queue()
            threading.Thread(target=self._read, args=(p, q), daemon=True).start()
            self.procs.append(p)
            self.queues.append(q)

    @staticmethod
    def _read(p: subprocess.Popen, q: queue.Queue) -> None:
        try:
            for line in p.stdout:
                if line.startswith(TAG):
                    q.put(json.loads(line[len(TAG):]))
        except (ValueError, OSError):
            pass
        q.put(None)

    def log_tail(self, r: int, n: int = 3000) -> str:
        try:
            return self.logs[r].read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def send(self, r: int, cmd: dict) -> None:
        try:
            self.procs[r].stdin.write(json.dumps(cmd) + "\n")
            self.procs[r].stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeError(f"trainer {r} is gone ({exc}):\n{self.log_tail(r)}") from None

    def get(self, r: int, deadline: float, what: str) -> dict:
        left = deadline - time.monotonic()
        try:
            msg = self.queues[r].get(timeout=max(0.01, left))
        except queue.Empty:
            raise bsn.Timeout(f"trainer {r}: no reply to {what} within the time allowed:\n{self.log_tail(r)}") from None
        if msg is None:
            raise RuntimeError(f"trainer {r} exited ({self.procs[r].poll()}) during {what}:\n{self.log_tail(r)}")
        if not msg.get("ok"):
            raise RuntimeError(f"trainer {r} failed {what}:\n{msg.get('error')}")
        return msg

    def call(self, cmds: dict[int, dict], timeout: float) -> dict[int, dict]:
        for r, cmd in cmds.items():
            self.send(r, cmd)
        deadline = time.monotonic() + timeout
        return {r: self.get(r, deadline, cmd["cmd"]) for r, cmd in cmds.items()}

    def call_all(self, cmd: dict | list[dict], timeout: float) -> list[dict]:
        cmds = {r: (cmd[r] if isinstance(cmd, list) else cmd) for r in range(self.n)}
        out = self.call(cmds, timeout)
        return [out[r] for r in range(self.n)]

    def ready(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        return [self.get(r, deadline, "start-up") for r in range(self.n)]

    def stop(self) -> None:
        for r, p in enumerate(self.procs):
            if p.poll() is None:
                with contextlib.suppress(Exception):
                    self.send(r, {"cmd": "quit"})
        deadline = time.monotonic() + 10  # an idle trainer quits at once; a busy one is killed
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=10)


# --- daemons ----------------------------------------------------------------------------------------


class GroupDaemon(bsn.Daemon):
    """One node's daemon: single_node.Daemon with a given prefix and the group's flags."""

    new_session = True
    start_timeout = 60.0

    def __init__(self, root: Path, prefix: str, node: int, extra: list[str]) -> None:
        super().__init__(root)
        self.prefix, self.node, self.extra = prefix, node, tuple(extra)
        self.what = f"daemon {node}"

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
        if self._log is not None:
            self._log.close()
            self._log = None

    def wipe(self) -> None:
        for p in list(SHM.glob(f"{self.prefix}-*")) + list(SHM.glob(f"{self.prefix}.*")):
            with contextlib.suppress(OSError):
                p.unlink()

    def stop(self) -> None:
        super().stop()
        self.wipe()

    def status(self, timeout: float = 10.0) -> dict:
        from shardkeep.proto.transport import Channel

        ch = Channel(self.socket, timeout=timeout)
        try:
            return ch.request("status").fields
        finally:
            ch.close()

    def status_cli(self) -> dict | None:
        """``shardkeep status --json --socket S``, as a user would read it."""
        try:
            out = subprocess.run(bsn.shardkeep_cmd("status", "--json", "--socket", self.socket),
                                 capture_output=True, text=True, timeout=60)
            return json.loads(out.stdout) if out.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError):
            return None


def wait_until(cond, timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception as exc:
            last = exc
        time.sleep(every)
    raise bsn.Timeout(f"{what}: not reached within {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


class Group:
    """n daemons of one security mode; polls their status for group-commit timings."""

    def __init__(self, root: Path, tok: str, mode: str, n: int, m: int, keydir: Path, flags: list[str]) -> None:
        self.root, self.mode, self.n, self.m, self.keydir, self.flags = root, mode, n, m, keydir, flags
        self.tag = f"skbg{tok}{MODES.index(mode)}"
        self.ports = free_ports(n)
        self.daemons: list[GroupDaemon] = []
        self.retired: list[GroupDaemon] = []
        self.commits: dict[tuple, dict] = {}   # (node, job, step) -> recent_commits entry
        self.status_polls = 0
        self.phase = "start"
        self.pings: dict[str, list[float]] = {}   # phase -> ping round trips to any daemon of the group
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    def prefix(self, i: int) -> str:
        return f"{self.tag}n{i:02d}x"  # no prefix is the start of another one

    def daemon_flags(self, i: int, ports: list[int]) -> list[str]:
        sec = ["--insecure"] if self.mode == "insecure" else [
            "--curve-secret", str(self.keydir / f"node-{i}.key_secret"), "--curve-public-dir", str(self.keydir)]
        if self.mode == "encrypt-data":
            sec.append("--encrypt-data")
        return ["--peers", peers_arg(ports), "--node", str(i), "--parity", str(self.m), *self.flags, *sec]

    def make(self, i: int, ports: list[int], gen: int) -> GroupDaemon:
        return GroupDaemon(self.root / f"{self.mode}-node{i}-r{gen}", self.prefix(i), i, self.daemon_flags(i, ports))

    def start(self, timeout: float = 120.0) -> None:
        self.daemons = [self.make(i, self.ports, 1) for i in range(self.n)]
        for d in self.daemons:
            d.start()
        wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in self.daemons),
                   timeout, f"group ({self.mode}) up")
        self._poller = threading.Thread(target=self._poll, daemon=True, name="status-poller")
        self._poller.start()

    def _poll(self) -> None:
        from shardkeep.proto.transport import Channel

        chans: dict[str, Channel] = {}
        pings: dict[str, Channel] = {}
        last = 0.0
        while not self._stop.wait(0.1):
            for d in list(self.daemons):  # the daemon's answer time to a client request (its event loop)
                if d.proc is None or d.proc.poll() is not None:
                    continue
                try:
                    ch = pings.get(d.socket) or pings.setdefault(d.socket, Channel(d.socket, timeout=5.0))
                    t0 = perf()
                    ch.request("ping")
                    self.pings.setdefault(self.phase, []).append(perf() - t0)
                except Exception:  # noqa: BLE001 - a daemon being killed
                    pings.pop(d.socket, None)
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                self.collect(chans)
        for ch in pings.values():
            with contextlib.suppress(Exception):
                ch.close()
        for ch in chans.values():
            with contextlib.suppress(Exception):
                ch.close()

    def collect(self, chans: dict | None = None) -> None:
        from shardkeep.proto.transport import Channel

        for d in list(self.daemons):
            if d.proc is None or d.proc.poll() is not None:
                continue
            try:
                if chans is None:
                    st = d.status(5.0)
                else:
                    ch = chans.get(d.socket)
                    if ch is None:
                        ch = chans[d.socket] = Channel(d.socket, timeout=5.0)
                    st = ch.request("status").fields
            except Exception:
                continue
            self.status_polls += 1
            for e in (st.get("group") or {}).get("recent_commits", []):
                self.commits[(d.node, e["job"], e["step"])] = dict(e, node=d.node)

    def lose(self, i: int) -> None:
        d = self.daemons[i]
        d.kill9()
        d.wipe()
        shutil.rmtree(d.state_dir, ignore_errors=True)
        self.retired.append(d)

    def replace(self, i: int, timeout: float = 120.0) -> GroupDaemon:
        ports = list(self.ports)
        ports[i] = free_ports(1)[0]  # a replacement at a new address
        d = self.make(i, ports, 2)
        d.start()
        self.daemons[i] = d
        wait_until(lambda: all(p["up"] for p in d.status()["group"]["peers"]), timeout,
                   f"replacement of node {i} ({self.mode}) sees its peers up")
        return d

    def stop(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(timeout=15)
        for d in self.daemons + self.retired:
            with contextlib.suppress(Exception):
                d.stop()

    def log_tails(self) -> dict:
        """Every WARNING/ERROR line (up to 300) and the tail of each daemon's log, retired ones included."""
        out = {}
        for d in self.retired + self.daemons:
            try:
                text = d.log_path.read_text(errors="replace")
            except OSError:
                text = ""
            warn = [ln for ln in text.splitlines() if " WARNING " in ln or " ERROR " in ln]
            key = f"node{d.node}" + ("-retired" if d in self.retired else "")
            out[key] = {"warnings": warn[-300:], "tail": text[-3000:]}
        return out

    def forged(self) -> dict:
        out = {}
        for d in self.daemons:
            with contextlib.suppress(Exception):
                out[f"node{d.node}"] = d.status(5.0)["group"]["forged_data_frames_dropped"]
        return out


# --- memory sampler -------------------------------------------------------------------------------


def shm_mappings(pids: list[int], prefix: str) -> dict:
    """Bytes of /dev/shm/<prefix>-* files mapped by ``pids``, per distinct file: still linked and already
    unlinked ("(deleted)": its memory stays allocated until the last mapping goes)."""
    files: dict[str, tuple[int, bool]] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) < 6 or not parts[5].startswith(f"/dev/shm/{prefix}-"):
                        continue
                    a, b = (int(x, 16) for x in parts[0].split("-"))
                    deleted = parts[5].rstrip().endswith("(deleted)")
                    key = f"{parts[3]}:{parts[4]}"  # device:inode
                    size = max(files.get(key, (0, deleted))[0], int(parts[2], 16) + (b - a))
                    files[key] = (size, deleted)
        except OSError:
            continue
    return {"linked": sum(sz for sz, d in files.values() if not d),
            "deleted": sum(sz for sz, d in files.values() if d),
            "deleted_files": sum(1 for _, d in files.values() if d)}


def meminfo_shmem() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Shmem:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Sampler(threading.Thread):
    """Every ``every`` s: bytes of /dev/shm/<prefix>-* per prefix, RSS of the daemons (and their
    codec workers) and trainers; keeps the peak per phase and a coarse time series."""

    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True, name="shm-sampler")
        self.every = every
        self.phase = "idle"
        self.prefixes: list[str] = []
        self.daemon_pids: dict[str, int] = {}   # prefix -> daemon pid
        self.trainer_pids: list[int] = []
        self.peak: dict[str, dict] = {}          # phase -> {"shm": {prefix: bytes}, "shm_total", "rss": {...}}
        self.series: list[dict] = []
        self.samples = 0
        self._halt = threading.Event()
        self._procs: dict[int, object] = {}
        self._kids: dict[int, list] = {}
        self._kids_t = 0.0
        self._maps_t = 0.0
        self.last_held: dict = {}

    def shm(self) -> dict[str, tuple[int, int, dict]]:
        """prefix -> (sum of st_size, sum of allocated bytes, {kind: st_size}); kinds: slots, parity, stage,
        meta, rebuild (the daemon's ``<prefix>-g-<kind>-...`` names)."""
        out: dict[str, list] = {p: [0, 0, {}] for p in self.prefixes}
        try:
            with os.scandir(SHM) as it:
                for e in it:
                    for p in self.prefixes:
                        if e.name.startswith(p + "-"):
                            rest = e.name[len(p) + 1:]
                            kind = rest.split("-")[1] if rest.startswith("g-") else "slots"
                            with contextlib.suppress(OSError):
                                st = e.stat(follow_symlinks=False)
                                out[p][0] += st.st_size
                                out[p][1] += st.st_blocks * 512
                                out[p][2][kind] = out[p][2].get(kind, 0) + st.st_size
                            break
        except OSError:
            pass
        return {p: (a, b, kinds) for p, (a, b, kinds) in out.items()}

    def rss(self) -> dict[str, dict]:
        import psutil

        now = time.monotonic()
        refresh = now - self._kids_t > 2.0
        if refresh:
            self._kids_t = now
        out = {}
        for key, pid in list(self.daemon_pids.items()) + [(f"trainer{i}", p) for i, p in enumerate(self.trainer_pids)]:
            try:
                proc = self._procs.get(pid) or self._procs.setdefault(pid, psutil.Process(pid))
                mi = proc.memory_info()
                d = {"rss": mi.rss, "shared": getattr(mi, "shared", 0), "workers_rss": 0, "workers_shared": 0}
                if key in self.daemon_pids:
                    if refresh or pid not in self._kids:
                        self._kids[pid] = proc.children(recursive=True)
                    d["worker_pids"] = [kp.pid for kp in self._kids[pid]]
                    for k in self._kids[pid]:
                        with contextlib.suppress(psutil.Error):
                            km = k.memory_info()
                            d["workers_rss"] += km.rss
                            d["workers_shared"] += getattr(km, "shared", 0)
                out[key] = d
            except (psutil.Error, OSError):
                continue
        return out

    def sample(self) -> dict:
        shm = self.shm()
        rss = self.rss()
        pk = self.peak.setdefault(self.phase, {"shm": {}, "shm_alloc": {}, "shm_kinds_at_peak": {}, "shm_total": 0,
                                               "rss": {}, "samples": 0})
        pk["samples"] += 1
        total = 0
        for p, (size, alloc, kinds) in shm.items():
            total += size
            if size > pk["shm"].get(p, -1):
                pk["shm"][p] = size
                pk["shm_kinds_at_peak"][p] = kinds
            pk["shm_alloc"][p] = max(pk["shm_alloc"].get(p, 0), alloc)
        pk["shm_total"] = max(pk["shm_total"], total)
        now = time.monotonic()
        if now - self._maps_t >= 1.0:  # mappings of unlinked segments: every second (parses /proc maps)
            self._maps_t = now
            held = {}
            for p, pid in list(self.daemon_pids.items()):
                d = rss.get(p) or {}
                held[p] = shm_mappings([pid] + d.get("worker_pids", []), p)
                held[p]["main_deleted"] = shm_mappings([pid], p)["deleted"]
                held[p]["workers_deleted"] = shm_mappings(d.get("worker_pids", []), p)["deleted"]
                cur = pk.setdefault("mapped_deleted", {})
                if held[p]["deleted"] >= cur.get(p, {}).get("deleted", -1):
                    cur[p] = held[p]
            sh = meminfo_shmem()
            if sh is not None:
                pk["meminfo_shmem"] = max(pk.get("meminfo_shmem", 0), sh)
            self.last_held = held
        for key, d in rss.items():
            cur = pk["rss"].setdefault(key, {"rss": 0, "private": 0, "workers_rss": 0})
            cur["rss"] = max(cur["rss"], d["rss"])
            cur["private"] = max(cur["private"], d["rss"] - d["shared"])
            cur["workers_rss"] = max(cur["workers_rss"], d["workers_rss"])
        self.samples += 1
        return {"shm": shm, "rss": rss}

    def run(self) -> None:
        last_series = 0.0
        while not self._halt.wait(self.every):
            try:
                s = self.sample()
            except Exception:
                continue
            now = time.monotonic()
            if now - last_series >= 1.0:
                last_series = now
                self.series.append({"t": round(time.time(), 2), "phase": self.phase,
                                    "shm": {p: v[0] for p, v in s["shm"].items() if v[0]},
                                    "rss": {k: v["rss"] for k, v in s["rss"].items()},
                                    "mapped_deleted": {p: v["deleted"] for p, v in self.last_held.items()}})

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


# --- references measured in this run ---------------------------------------------------------------


async def _dataplane_gbps(mode: str, keydir: Path, total: int, msg: int = 4 << 20) -> dict:
    """4 MiB data-plane messages node 0 -> node 1 on loopback, as tests/test_peerlink.py measures."""
    from shardkeep.daemon.peerlink import (
        DataPlane,
        PeerContext,
        PeerSecurity,
        new_session_key,
        wait_released,
    )

    def sec(i: int):
        if mode == "insecure":
            return PeerSecurity.from_files("insecure", i)
        return PeerSecurity.from_files(mode, i, str(keydir / f"node-{i}.key_secret"), str(keydir))

    p0 = await PeerContext(sec(0)).start()
    p1 = await PeerContext(sec(1)).start()
    d0, d1 = DataPlane(p0, "127.0.0.1"), DataPlane(p1, "127.0.0.1")
    view = os.urandom(msg)  # sent zero-copy; bytes, so nothing to release afterwards
    try:
        await d0.start()
        await d1.start()
        key = new_session_key()
        d1.set_recv_key(0, key)
        d0.set_send_key(1, key)
        d0.connect(1, d1.endpoint)
        await d0.send(1, "chunk", {}, view, timeout=20)  # warm up the connection
        await d1.recv(timeout=20)
        count = max(4, total // msg)

        async def consume():
            for _ in range(count):
                await d1.recv(timeout=30)

        t = perf()
        reader = asyncio.create_task(consume())
        tracker = None
        for _ in range(count):
            tracker = await d0.send(1, "chunk", {}, view, timeout=30, track=True)
        await reader
        elapsed = perf() - t
        await wait_released(tracker, 10)
        return {"bytes": count * msg, "seconds": elapsed, "gbps": count * msg / elapsed / GB,
                "forged_dropped": d1.forged_dropped, "message_bytes": msg}
    finally:
        for x in (d0, d1, p0, p1):
            with contextlib.suppress(Exception):
                await x.close()


async def _control_fetch_gbps(mode: str, keydir: Path, total: int, piece: int = 8 << 20) -> dict:
    """Sequential 8 MiB ``fetch`` request/replies over the control channel, the way ``recover`` pulls."""
    from shardkeep.daemon.peerlink import (
        ControlClient,
        ControlServer,
        PeerContext,
        PeerSecurity,
    )

    def sec(i: int):
        if mode == "insecure":
            return PeerSecurity.from_files("insecure", i)
        return PeerSecurity.from_files(mode, i, str(keydir / f"node-{i}.key_secret"), str(keydir))

    payload = os.urandom(piece)
    p0 = await PeerContext(sec(0)).start()
    p1 = await PeerContext(sec(1)).start()
    srv = ControlServer(p0, "tcp://127.0.0.1:0", lambda msg: ({}, [payload]))
    cli = None
    try:
        await srv.start()
        cli = ControlClient(p1, 0, srv.endpoint, timeout=30).connect()
        fields = {"job": "bench", "step": 0, "what": "data", "stripe": 0, "offset": 0, "length": piece}
        await cli.request("fetch", fields, timeout=30)
        count = max(4, total // piece)
        t = perf()
        for _ in range(count):
            r = await cli.request("fetch", fields, timeout=30)
            assert len(r.payload[0]) == piece
        elapsed = perf() - t
        return {"bytes": count * piece, "seconds": elapsed, "gbps": count * piece / elapsed / GB,
                "request_bytes": piece}
    finally:
        for x in (cli, srv, p0, p1):
            if x is not None:
                with contextlib.suppress(Exception):
                    await x.close()


def loopback(mode: str, keydir: Path, total: int) -> dict:
    """Both measurements; one that fails is reported (gbps None), not fatal to the run."""
    async def one(coro) -> dict:
        try:
            return await asyncio.wait_for(coro, 120)
        except Exception as exc:  # noqa: BLE001
            return {"gbps": None, "error": f"{type(exc).__name__}: {exc}"}

    async def both():
        dp = await one(_dataplane_gbps(mode, keydir, total if mode != "encrypt-data" else total // 3))
        cc = await one(_control_fetch_gbps(mode, keydir, total if mode == "insecure" else total // 3))
        return {"data_plane": dp, "control_fetch": cc}

    return asyncio.run(both())


def encode_bound(n: int, m: int, S: int, reps: int) -> dict:
    """Raw pyeclib encode + one memcpy of one stripe's data bytes (k chunks of ceil(S/k)), tuned malloc."""
    from shardkeep.bench import codec as bc
    from shardkeep.daemon.codec import make_spec, substripes

    k = n - m
    spec = make_spec(k, m, None)
    L = -(-S // k)
    nsub = substripes(L, spec.piece)
    raw = bc.raw_children(k, m, spec.ec_type, spec.piece, nsub, reps, tuned=True)[0]
    rb = raw["bytes"]
    enc, cpy = statistics.median(raw["encode_s"]), statistics.median(raw["memcpy_s"])
    return {"k": k, "m": m, "ec_type": spec.ec_type, "piece": spec.piece, "chunk_len": L, "substripes": nsub,
            "bytes": rb, "encode_s": raw["encode_s"], "memcpy_s": raw["memcpy_s"],
            "raw_encode_gbps": rb / enc / GB, "memcpy_gbps": rb / cpy / GB, "bound_gbps": rb / (enc + cpy) / GB}


def file_baselines(model, opt, root: Path, reps: int) -> dict:
    """torch.save + fsync, torch.load (evicted and cached) + load_state_dict, dcp.save and dcp.async_save of
    one node's state in this process: the measurements of ``single_node`` (same keys), for the same state."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    warnings.filterwarnings("ignore", message=".*existing checkpoint.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    tf: dict = {}
    path = str(root / "state.pt")
    saves = []
    for _ in range(reps):
        sd = {"model": model.state_dict(), "optim": opt.state_dict()}
        saves.append(bsn.torch_save(sd, path))
        del sd
    tf["save"] = {"runs": saves, "total_s": summ([x["total_s"] for x in saves]),
                  "fsync_s": summ([x["fsync_s"] for x in saves]), "bytes": saves[0]["bytes"]}
    for how in ("evicted", "cached"):
        runs = []
        for _ in range(reps):
            (bsn.evict if how == "evicted" else bsn.cache)(path)
            resident = bsn.resident_fraction(path)
            runs.append(dict(bsn.torch_load_into(path, model, opt), resident_before=resident))
        tf[f"load_{how}"] = {"runs": runs, "load_s": summ([x["load_s"] for x in runs]),
                             "total_s": summ([x["total_s"] for x in runs]),
                             "resident_before": [x["resident_before"] for x in runs]}
    os.unlink(path)
    ckpt = str(root / "dcp")
    d: dict = {"save_runs": [], "async_runs": []}
    for _ in range(reps):
        t0 = perf()
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt, no_dist=True)
        d["save_runs"].append(perf() - t0)
        del msd, osd
    for _ in range(reps):
        t0 = perf()
        msd, osd = get_state_dict(model, opt)
        f = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=ckpt, no_dist=True)
        t1 = perf()
        f.result(timeout=600)
        d["async_runs"].append({"call_s": t1 - t0, "total_s": perf() - t0})
        del msd, osd, f
    d["save"] = summ(d["save_runs"])
    d["async_call"] = summ([x["call_s"] for x in d["async_runs"]])
    d["async_total"] = summ([x["total_s"] for x in d["async_runs"]])
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"torch_file": tf, "dcp": d}


# --- the run --------------------------------------------------------------------------------------


def settle(tr: Trainers, step: int, *, train: bool, iters: int, timeout: float, what: str,
           commit_timeout: float) -> tuple[int, list[dict], list[list[dict]]]:
    """Snapshot every rank at one step until every rank's future resolves at group level."""
    deadline = time.monotonic() + timeout
    attempts = []
    while True:
        replies = tr.call_all({"cmd": "settle", "step": step, "train": train, "iters": iters,
                               "timeout": commit_timeout + 30}, commit_timeout + 120)
        attempts.append(replies)
        if all(r["level"] == "group" for r in replies):
            return step, replies, attempts
        step += 1
        train = False  # retry the same state
        if time.monotonic() > deadline:
            raise bsn.Timeout(f"{what}: no snapshot reached group level on every rank within {timeout:.0f}s; "
                              f"last: {[(r['status'], r['level'], r['reason']) for r in replies]}")
        time.sleep(0.5)


def shm_at_rest(sampler: Sampler, prefixes: list[str], timeout: float = 20.0) -> dict:
    """Per-prefix /dev/shm bytes once they stop changing (older parity released after a commit)."""
    deadline = time.monotonic() + timeout
    prev = None
    cur = sampler.shm()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        cur = sampler.shm()
        if cur == prev:
            break
        prev = cur
    return {p: {"size": cur[p][0], "allocated": cur[p][1], "kinds": cur[p][2]} for p in prefixes if p in cur}


def minflt(pid: int) -> int:
    """Minor page faults of a process so far (/proc/<pid>/stat field 10)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def cpu_of(pids: dict[str, int]) -> dict[str, dict]:
    """CPU seconds (user + system) and minor page faults so far of each process and of its live children
    (codec workers)."""
    import psutil

    out = {}
    for key, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            t = proc.cpu_times()
            kids, kflt = 0.0, 0
            for kp in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kt = kp.cpu_times()
                    kids += kt.user + kt.system
                    kflt += minflt(kp.pid)
            out[key] = {"main": t.user + t.system, "workers": kids, "main_minflt": minflt(pid),
                        "workers_minflt": kflt}
        except (psutil.Error, OSError):
            continue
    return out


def cpu_delta(a: dict, b: dict) -> dict:
    return {k: {x: round(b[k][x] - a[k].get(x, 0.0), 4) for x in b[k]} for k in b if k in a}


def daemon_mem(d: GroupDaemon) -> dict:
    import psutil

    try:
        proc = psutil.Process(d.proc.pid)
        fi = proc.memory_full_info()
        out = {"rss": fi.rss, "pss": getattr(fi, "pss", None), "uss": getattr(fi, "uss", None),
               "shared": getattr(fi, "shared", None), "workers": []}
        for k in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                kf = k.memory_full_info()
                out["workers"].append({"pid": k.pid, "rss": kf.rss, "pss": getattr(kf, "pss", None),
                                       "uss": getattr(kf, "uss", None)})
        out["workers_rss"] = sum(w["rss"] for w in out["workers"])
        out["workers_uss"] = sum(w["uss"] or 0 for w in out["workers"])
        return out
    except (psutil.Error, OSError) as exc:
        return {"error": str(exc)}


def recover_node(g: Group, lost: int, job: str, expected: int, sampler: Sampler, timeout: float) -> dict:
    """Lose node ``lost`` for good, start its replacement, run ``shardkeep recover`` and time it."""
    out: dict = {"lost_node": lost, "expected_step": expected}
    t0 = perf()
    g.lose(lost)
    out["kill_wipe_s"] = perf() - t0
    t1 = perf()
    rep = g.replace(lost)
    out["replacement_up_s"] = perf() - t1
    st = rep.status()
    out["replacement_generation"] = st["group"]["generation"]
    sampler.prefixes = sorted(set(sampler.prefixes) | {rep.prefix})
    sampler.daemon_pids[rep.prefix] = rep.proc.pid
    sampler.phase = f"recover_{g.mode}"
    progress = []
    rpids = {f"node{d.node}": d.proc.pid for d in g.daemons}
    rcpu0 = cpu_of(rpids)
    t2 = perf()
    p = subprocess.Popen(bsn.shardkeep_cmd("recover", "--socket", rep.socket), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    from shardkeep.proto.transport import Channel

    ch = Channel(rep.socket, timeout=5)
    deadline = time.monotonic() + timeout
    try:
        while p.poll() is None:
            if time.monotonic() > deadline:
                p.kill()
                p.wait(timeout=10)
                raise bsn.Timeout(f"shardkeep recover ({g.mode}) did not finish within {timeout:.0f}s:\n"
                                  f"{rep.log_tail()}")
            with contextlib.suppress(Exception):
                rp = ch.request("status").fields.get("recover") or {}
                if rp:
                    progress.append({"t": round(perf() - t2, 3), **{k: rp.get(k) for k in
                                                                    ("state", "stripes_done", "stripes_total",
                                                                     "bytes_fetched")}})
            time.sleep(0.2)
        wall = perf() - t2
        stdout, stderr = p.communicate(timeout=30)
        final = rep.status().get("recover") or {}
        out["cpu"] = cpu_delta(rcpu0, cpu_of(rpids))
    finally:
        ch.close()
    sampler.phase = f"after_recover_{g.mode}"
    out.update(cli_wall_s=wall, returncode=p.returncode, stdout=stdout[-2000:], stderr=stderr[-2000:],
               progress=progress, final=final)
    if p.returncode != 0:
        raise RuntimeError(f"shardkeep recover ({g.mode}) failed ({p.returncode}):\n{stdout}\n{stderr}\n"
                           f"{rep.log_tail()}")
    mm = re.search(r"recovered (\d+) versions in ([0-9.]+) s", stdout)
    out["daemon_s"] = float(mm.group(2)) if mm else None
    out["versions"] = int(mm.group(1)) if mm else None
    out["step_ok"] = f"job {job} step {expected}" in stdout
    out["bytes_fetched"] = final.get("bytes_fetched")
    if not out["step_ok"]:
        raise RuntimeError(f"recover ({g.mode}) did not rebuild job {job} step {expected}:\n{stdout}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=4, help="daemons (and trainers) in the group (default: 4)")
    ap.add_argument("--parity", type=int, default=1, help="parity m (default: 1)")
    ap.add_argument("--size", type=float, default=None, help="GB (1e9 B) of params + Adam state per node (0.4)")
    ap.add_argument("--width", type=int, default=2048, help="Linear(W, W) layers (default: 2048)")
    ap.add_argument("--slots", type=int, default=2, help="daemon --slots (default: 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help="shardkeep steps per round, compute > copy (default: 40; 8 with --quick)")
    ap.add_argument("--short-steps", type=int, default=None,
                    help="shardkeep steps per round, compute < copy (default: 120; 24 with --quick)")
    ap.add_argument("--base-steps", type=int, default=None,
                    help="steps without shardkeep per regime and round (default: 12; 4 with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved (baseline, shardkeep) rounds per regime (default: 2; 1 with --quick)")
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured steps at the start of each block (default: 1)")
    ap.add_argument("--short", type=float, default=0.3, help="short compute as a fraction of T_copy (default 0.3)")
    ap.add_argument("--long", type=float, default=3.0, help="long compute as a multiple of T_copy (default 3)")
    ap.add_argument("--no-sync", action="store_true",
                    help="no per-step gloo all_reduce between the trainers (default: synchronized steps)")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="security modes to run, the first with the training phases (default: %(default)s)")
    ap.add_argument("--mode-snapshots", type=int, default=2,
                    help="group-level snapshots before the loss in the modes without training (default: 2)")
    ap.add_argument("--dcp-steps", type=int, default=None,
                    help="steps per regime with dcp.async_save every step on every rank, after the shardkeep "
                         "phases; 0 to skip (default: 6; 2 with --quick)")
    ap.add_argument("--baseline-reps", type=int, default=None,
                    help="repetitions of torch.save + fsync, torch.load, dcp.save and dcp.async_save of one "
                         "node's state before the daemons start; 0 to skip (default: 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 0.05 GB per node, few steps (~2 minutes)")
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/out/group-<timestamp>.json)")
    ap.add_argument("--record", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--tmp-dir", default=None, help="parent of the temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--child", choices=["trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.size is None:
        args.size = 0.05 if args.quick else 0.4
    if args.steps is None:
        args.steps = 8 if args.quick else 40
    if args.short_steps is None:
        args.short_steps = 24 if args.quick else 120
    if args.base_steps is None:
        args.base_steps = 4 if args.quick else 12
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.dcp_steps is None:
        args.dcp_steps = 2 if args.quick else 6
    if args.baseline_reps is None:
        args.baseline_reps = 1 if args.quick else 2
    args.modes = [x for x in args.modes.split(",") if x]
    bad = [x for x in args.modes if x not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {list(MODES)}")
    if not 1 <= args.parity < args.nodes:
        ap.error("need 1 <= --parity < --nodes")
    return args


def main(argv=None, out_dir: Path | None = None, prog: str = "python -m shardkeep.bench.group") -> int:
    """``out_dir``: where ``out/group-<timestamp>.json`` goes without ``--out`` and the RESULTS.md that
    ``--record`` appends to (default: ./benchmarks or ./shardkeep-bench, ``shardkeep.bench.default_out_dir``);
    ``prog``: the command named in the recorded section."""
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    signal.signal(signal.SIGTERM, bsn._on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if out_dir is None:
        from shardkeep.bench import default_out_dir

        out_dir = default_out_dir()
    out_dir = Path(out_dir)
    out_path = Path(args.out) if args.out else out_dir / "out" / f"group-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix="skbgroup-", dir=args.tmp_dir))
    n, m = args.nodes, args.parity
    k = n - m
    S = 0
    tok = secrets.token_hex(3)
    R: dict = {"benchmark": "group", "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "argv": sys.argv, "load_start": loadavg(), "loads": {}, "shm_prefix": f"skbg{tok}"}
    R["machine"] = bsn.machine_info(str(tmp_root))
    R["config"] = {kk: v for kk, v in vars(args).items() if not kk.startswith("child")}
    group_flags = ["--heartbeat", "0.5", "--peer-timeout", "3", "--group-commit-timeout", "60",
                   "--slots", str(args.slots)]
    R["config"]["daemon_flags"] = group_flags
    commit_timeout = 60.0
    sampler = Sampler()
    groups: list[Group] = []
    tr: Trainers | None = None
    ok = False
    t_run = perf()
    try:
        log(f"shm prefix skbg{tok}, temp dir {tmp_root}")
        sampler.start()
        # 1. the state, the plain copy and the compute calibration (idle machine) ----------------
        n_layers = max(1, round(args.size * GB / bsn.layer_bytes(args.width)))
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model, opt = bsn.build(n_layers, args.width)
        bsn.first_optimizer_step(model, opt, False)
        state = {"model": model, "optim": opt}
        S = payload_bytes(state)
        from shardkeep.client import rng as sk_rng
        from shardkeep.client.flatten import flatten

        flat = flatten(state, sk_rng.capture())
        tensors = list(flat.tensors)
        del flat
        R["state"] = {"layers": n_layers, "width": args.width, "bytes": bsn.state_tensor_bytes(model, opt),
                      "payload_bytes": S, "tensors": len(tensors)}
        log(f"state per node: {n_layers} x Linear({args.width}) + Adam = {R['state']['bytes']['total'] / GB:.3f} GB; "
            f"payload S = {S:,} B")
        R["loads"]["references"] = loadavg()
        R["plain_copy"] = bsn.plain_copy(tensors, 5, 1)
        del tensors
        if args.baseline_reps:
            R["loads"]["baselines"] = loadavg()
            R["baselines"] = file_baselines(model, opt, tmp_root, args.baseline_reps)
            bl = R["baselines"]
            log(f"one node's state: torch.save+fsync {bl['torch_file']['save']['total_s']['median']:.3f} s, torch.load "
                f"+ load_state_dict {bl['torch_file']['load_evicted']['total_s']['median']:.3f} s (evicted), "
                f"{bl['torch_file']['load_cached']['total_s']['median']:.3f} s (cached); dcp.save "
                f"{bl['dcp']['save']['median']:.3f} s, async_save call {bl['dcp']['async_call']['median']:.3f} s, "
                f"total {bl['dcp']['async_total']['median']:.3f} s")
        del state, model, opt
        t_copy = R["plain_copy"]["s"]["median"]
        compute = bsn.Compute()
        mm_s = compute.calibrate()
        regimes = [
            {"key": "long", "label": f"compute > copy ({args.long:g} x T_copy)", "target_s": args.long * t_copy},
            {"key": "short", "label": f"compute < copy ({args.short:g} x T_copy)", "target_s": args.short * t_copy},
        ]
        for reg in regimes:
            reg["iters"] = max(1, round(reg["target_s"] / mm_s))
            reg["sk_steps"] = args.steps if reg["key"] == "long" else args.short_steps
            reg["base_steps"] = args.base_steps
            reg["dcp_steps"] = args.dcp_steps
        R["calibration"] = {"t_copy_s": t_copy, "matmul_s": mm_s}
        R["regimes"] = regimes
        log(f"plain copy_ {R['plain_copy']['gbps']:.2f} GB/s (T_copy {t_copy * 1e3:.1f} ms); matmul "
            f"{mm_s * 1e3:.2f} ms; iters long={regimes[0]['iters']} short={regimes[1]['iters']}")

        # 2. the encode bound and the loopback bandwidths ------------------------------------------
        R["encode_bound"] = encode_bound(n, m, S, 3)
        eb = R["encode_bound"]
        log(f"encode bound ({eb['ec_type']}, k={k}, {eb['bytes'] / GB:.3f} GB): raw encode {eb['raw_encode_gbps']:.2f}"
            f" GB/s + memcpy {eb['memcpy_gbps']:.2f} GB/s -> {eb['bound_gbps']:.2f} GB/s")
        keydir = tmp_root / "keys"
        r = subprocess.run(bsn.shardkeep_cmd("keygen", "--nodes", str(n), str(keydir)), capture_output=True,
                           text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"shardkeep keygen failed: {r.stderr}")
        R["loopback"] = {}
        lb_total = max(64 << 20, min(512 << 20, int(S * n)))
        for mode in args.modes:
            R["loopback"][mode] = loopback(mode, keydir, lb_total)
            lb = R["loopback"][mode]
            log(f"loopback {mode}: data plane {fmt_gbps(lb['data_plane']['gbps'])}, control fetch "
                f"{fmt_gbps(lb['control_fetch']['gbps'])}" + "".join(f"; {x['error']}" for x in lb.values()
                                                                      if x.get("error")))

        # 3. trainers ----------------------------------------------------------------------------
        R["loads"]["trainers_start"] = loadavg()
        t0 = perf()
        tr = Trainers(n, {"n": n, "layers": n_layers, "width": args.width}, tmp_root)
        sampler.trainer_pids = [p.pid for p in tr.procs]
        ready = tr.ready(300)
        R["trainers"] = {"start_s": perf() - t0, "payload_bytes": [x["payload_bytes"] for x in ready]}
        if any(x["payload_bytes"] != S for x in ready):
            log(f"note: trainer payloads {R['trainers']['payload_bytes']} differ from {S}")
        S = max(x["payload_bytes"] for x in ready)
        log(f"{n} trainers ready in {R['trainers']['start_s']:.1f} s")

        step = 1
        R["modes"] = {}
        for mi, mode in enumerate(args.modes):
            M: dict = {"mode": mode}
            R["modes"][mode] = M
            job = f"bg-{mode}-{tok}"
            M["job"] = job
            R["loads"][f"{mode}_start"] = loadavg()
            g = Group(tmp_root, tok, mode, n, m, keydir, group_flags)
            groups.append(g)
            sampler.phase = f"start_{mode}"
            t0 = perf()
            g.start()
            M["group_up_s"] = perf() - t0
            sampler.prefixes = [g.prefix(i) for i in range(n)]
            sampler.daemon_pids = {d.prefix: d.proc.pid for d in g.daemons}
            st0 = g.daemons[0].status()["group"]
            M["security"], M["codec"] = st0["security"], st0["codec"]
            log(f"[{mode}] group of {n} up in {M['group_up_s']:.1f} s (security {st0['security']}, {st0['codec']})")
            tr.call_all([{"cmd": "attach", "socket": d.socket, "job": job} for d in g.daemons], 120)

            # warm-up: registration of the slots, first group commit
            sampler.phase = f"warmup_{mode}"
            t0 = perf()
            try:
                s_ok, replies, attempts = settle(tr, step, train=True, iters=1, timeout=200,
                                                 what=f"[{mode}] warm-up", commit_timeout=commit_timeout)
            except bsn.Timeout as exc:
                raise bsn.Timeout(f"{exc}; data frames dropped as forged per node: {g.forged()}") from None
            M["warmup"] = {"seconds": perf() - t0, "step": s_ok, "attempts": attempts}
            step = s_ok + 1
            log(f"[{mode}] first group-level snapshot (slots registered) at step {s_ok} after "
                f"{M['warmup']['seconds']:.1f} s, {len(attempts)} attempt(s)")

            if mi == 0:
                # 4. training phases --------------------------------------------------------------
                sampler.phase = g.phase = "train"
                R["loads"]["train"] = loadavg()
                sync_file = None if args.no_sync else str(tmp_root / f"gloo-{mode}")
                pids = {**{f"node{d.node}": d.proc.pid for d in g.daemons},
                        **{f"trainer{r}": p.pid for r, p in enumerate(tr.procs)}}
                cpu0 = cpu_of(pids)
                t0 = perf()
                res = tr.call_all({"cmd": "train", "regimes": regimes, "rounds": args.rounds, "warmup": args.warmup,
                                   "step0": step, "sync_file": sync_file, "tail_timeout": commit_timeout + 30}, 3000)
                M["train_s"] = perf() - t0
                M["train_steps"] = [step, res[0]["next_step"] - 1]
                M["train_cpu"] = cpu_delta(cpu0, cpu_of(pids))
                M["train"] = res
                step = res[0]["next_step"]
                R["loads"]["train_end"] = loadavg()
                log(f"[{mode}] training phases done in {M['train_s']:.1f} s")
                g.collect()
                M["status_cli"] = {f"node{d.node}": d.status_cli() for d in g.daemons}
                if args.dcp_steps:
                    # the same loop with dcp.async_save every step on every rank (its own directory), for
                    # comparison; after the shardkeep phases so that neither disturbs the other's numbers
                    sampler.phase = g.phase = "train_dcp"
                    R["loads"]["train_dcp"] = loadavg()
                    t0 = perf()
                    res = tr.call_all({"cmd": "train", "regimes": regimes, "rounds": 1, "warmup": args.warmup,
                                       "step0": step, "modes": ["dcp"], "dcp_dir": str(tmp_root / "dcp-train"),
                                       "sync_file": None if args.no_sync else str(tmp_root / f"gloo-dcp-{mode}"),
                                       "tail_timeout": 600}, 3000)
                    M["train_dcp_s"] = perf() - t0
                    M["train_dcp"] = res
                    step = res[0]["next_step"]
                    shutil.rmtree(tmp_root / "dcp-train", ignore_errors=True)
                    log(f"[{mode}] dcp.async_save every step done in {M['train_dcp_s']:.1f} s")

            # 5. the last group-level version = the trainers' current state; memory at rest ------
            sampler.phase = f"settle_{mode}"
            g.phase = "settle"
            spids = {**{f"node{d.node}": d.proc.pid for d in g.daemons},
                     **{f"trainer{r}": p.pid for r, p in enumerate(tr.procs)}}
            scpu0, st0_ = cpu_of(spids), perf()
            settle_first = step
            snaps = []
            for i in range(1 if mi == 0 else args.mode_snapshots):
                s_ok, replies, attempts = settle(tr, step, train=True, iters=1, timeout=200,
                                                 what=f"[{mode}] snapshot before the loss",
                                                 commit_timeout=commit_timeout)
                snaps.append({"step": s_ok, "attempts": len(attempts),
                              "latency_s": [x["latency_s"] for x in replies]})
                step = s_ok + 1
            M["final_snapshots"] = snaps
            M["settle_s"] = perf() - st0_
            M["settle_steps"] = [settle_first, snaps[-1]["step"]]
            M["settle_cpu"] = cpu_delta(scpu0, cpu_of(spids))
            expected = snaps[-1]["step"]
            M["expected_step"] = expected
            sampler.phase = f"rest_{mode}"
            g.phase = "rest"
            M["shm_at_rest"] = shm_at_rest(sampler, [g.prefix(i) for i in range(n)])
            M["daemon_mem_at_rest"] = {f"node{d.node}": daemon_mem(d) for d in g.daemons}
            g.collect()
            M["status_at_rest"] = {f"node{d.node}": d.status() for d in g.daemons}
            M["forged_data_frames_dropped"] = g.forged()
            log(f"[{mode}] step {expected} at group level on every rank; shm at rest per node "
                + ", ".join(f"{v['size'] / GB:.3f}" for v in M["shm_at_rest"].values()) + " GB")

            # 6. node n-1 lost, replaced, rebuilt ---------------------------------------------------
            sampler.phase = f"loopback_{mode}"
            lbs = [loopback(mode, keydir, lb_total) for _ in range(2)]
            M["loopback_before_loss"] = max(lbs, key=lambda x: x["data_plane"]["gbps"] or 0)
            M["loopback_before_loss"]["runs"] = [{kk: vv["gbps"] for kk, vv in x.items()} for x in lbs]
            lost = n - 1
            R["loads"][f"recover_{mode}"] = loadavg()
            rec = recover_node(g, lost, job, expected, sampler, timeout=900)
            M["recover"] = rec
            log(f"[{mode}] recover: {rec['daemon_s']} s in the daemon ({rec['cli_wall_s']:.2f} s CLI), "
                f"{(rec['bytes_fetched'] or 0) / GB:.3f} GB fetched")
            rep = g.daemons[lost]
            M["replacement_shm"] = shm_at_rest(sampler, [rep.prefix], timeout=5)
            tr.call({r: {"cmd": "detach"} for r in range(n) if r != lost}, 120)
            v = tr.call({lost: {"cmd": "verify", "socket": rep.socket, "job": job}}, 300)[lost]
            M["verify"] = v
            log(f"[{mode}] rank {lost} restored step {v['restored_step']} from the replacement: "
                f"{'bitwise equal' if v['bitwise_equal'] else 'MISMATCH ' + str(v['mismatched'])} "
                f"({v['compared']} entries, {v['compared_bytes']:,} B)")
            if v["restored_step"] != expected or not v["bitwise_equal"]:
                raise RuntimeError(f"[{mode}] verification failed: restored {v['restored_step']} "
                                   f"(expected {expected}), mismatched {v['mismatched']}")
            tr.call({lost: {"cmd": "detach"}}, 120)
            g.collect()
            M["commits"] = [e for (node, jb, s), e in sorted(g.commits.items()) if jb == job]
            M["ping_s"] = {ph: summ(v) | {"p99": quantile(v, 0.99)} for ph, v in g.pings.items()}
            M["status_polls"] = g.status_polls
            M["daemon_logs"] = g.log_tails()
            sampler.phase = f"stop_{mode}"
            g.stop()
            groups.remove(g)
        sampler.phase = "end"
        R["loads"]["encode_bound_end"] = loadavg()
        R["encode_bound_end"] = encode_bound(n, m, S, 3)  # drift of the bound over the run
        ok = True
    except BaseException as exc:
        R["error"] = traceback.format_exc()
        if isinstance(exc, KeyboardInterrupt):
            R["error"] = "interrupted\n" + R["error"]
        log(f"FAILED: {type(exc).__name__}: {exc}")
        for g in groups:
            with contextlib.suppress(Exception):
                R.setdefault("failed_daemon_logs", {})[g.mode] = g.log_tails()
        if tr is not None:
            R["trainer_logs"] = {f"trainer{r}": tr.log_tail(r) for r in range(tr.n)}
    finally:
        R["ok"] = ok
        for g in groups:
            with contextlib.suppress(Exception):
                g.stop()
        if tr is not None:
            with contextlib.suppress(Exception):
                tr.stop()
        sampler.stop()
        R["shm_peaks"] = sampler.peak
        R["shm_series"] = sampler.series
        R["sampler_samples"] = sampler.samples
        leftover = [p.name for p in SHM.glob(f"skbg{tok}*")]
        for p in SHM.glob(f"skbg{tok}*"):
            with contextlib.suppress(OSError):
                p.unlink()
        R["leftover_shm"] = leftover
        shutil.rmtree(tmp_root, ignore_errors=True)
        R["load_end"] = loadavg()
        R["run_s"] = perf() - t_run
        with contextlib.suppress(Exception):
            import psutil

            R["machine"]["memory_available_at_end"] = psutil.virtual_memory().available
        try:  # after the sampler stopped: its peaks are part of it (a failed run: whatever can be analyzed)
            R["analysis"] = analyze(R, n, m, S, args.slots)
        except Exception:  # noqa: BLE001
            R["analysis_error"] = traceback.format_exc()
        try:
            text = render(R)
        except Exception:
            text = "(no summary: " + traceback.format_exc().strip().splitlines()[-1] + ")"
        R["summary_text"] = text
        with open(out_path, "w") as f:
            json.dump(R, f, indent=1, default=str)
        print("\n" + text, flush=True)
        print(f"\nresults: {out_path}", flush=True)
        if args.record and ok:
            record(R, text, out_path, out_dir, prog)
            print(f"appended to {out_dir / 'RESULTS.md'}", flush=True)
    return 0 if ok else 1


# --- analysis and report ------------------------------------------------------------------------


def _steps(M: dict, regime: str, mode: str) -> list[dict]:
    out = []
    for rank, res in enumerate(M.get("train") or []):
        for b in res["blocks"]:
            if b["regime"] == regime and b["mode"] == mode:
                out.extend(dict(r, rank=rank) for r in b["records"])
    return out


def analyze(R: dict, n: int, m: int, S: int, slots: int) -> dict:
    A: dict = {}
    k = n - m
    modes = R.get("modes", {})
    first = next(iter(modes.values()), None)
    target_shm = slots * S * (1 + m / k)
    A["shm_target_per_node"] = target_shm
    if first and first.get("train"):
        for reg in R["regimes"]:
            key = reg["key"]
            base = [r for r in _steps(first, key, "baseline") if not r["warmup"]]
            sk_all = _steps(first, key, "shardkeep")
            sk = [r for r in sk_all if not r["warmup"]]
            blocked = [r["blocked_s"] for r in sk]
            grp = [r["resolved_s"] for r in sk_all if r.get("level") == "group"]
            status = {"taken": len(sk_all), "group": sum(1 for r in sk_all if r.get("level") == "group"),
                      "local": sum(1 for r in sk_all if r.get("status") == "committed" and r.get("level") == "local"),
                      "skipped": sum(1 for r in sk_all if r.get("status") == "skipped"),
                      "failed": sum(1 for r in sk_all if r.get("status") == "failed"),
                      "unresolved": sum(1 for r in sk_all if "status" not in r)}
            reasons: dict[str, int] = {}
            for r in sk_all:
                if r.get("status") != "committed" or r.get("level") != "group":
                    why = f"{r.get('status')}/{r.get('level')}: " + (r.get("reason") or "")
                    why = re.sub(r"\b(rank|node) \d+", r"\1 i", why.split(" (sizes from")[0])
                    why = re.sub(r"step \d+", "step s", why)[:110]
                    reasons[why] = reasons.get(why, 0) + 1
            # the longest time any rank went without a new group-level version (lost work after a node loss)
            gaps = []
            for res in first.get("train") or []:
                for b in res["blocks"]:
                    if b["regime"] != key or b["mode"] != "shardkeep" or not b["records"]:
                        continue
                    start = b["records"][0]["t"]
                    resolved = [r["t"] + r["resolved_s"] for r in b["records"] if r.get("resolved_s") is not None]
                    end = max([b["records"][-1]["t"] + b["records"][-1]["step_s"]] + resolved)
                    done = sorted(r["t"] + r["resolved_s"] for r in b["records"]
                                  if r.get("level") == "group" and r.get("resolved_s") is not None)
                    marks = [start] + done + [end]
                    gaps.append(max(bb - aa for aa, bb in zip(marks, marks[1:])))
            timeouts = sorted({r["step"] for r in sk_all if r.get("level") == "local"
                               and "did not finish in" in (r.get("reason") or "")})
            steps_group = sorted({r["step"] for r in sk_all if r.get("level") == "group"})
            # the hooks of step s wait for the snapshot taken at the end of step s-1
            after_skip, after_copy = [], []
            for rank, res in enumerate(first.get("train") or []):
                for b in res["blocks"]:
                    if b["regime"] != key or b["mode"] != "shardkeep":
                        continue
                    recs = b["records"]
                    for prev, cur in zip(recs, recs[1:]):
                        if cur["warmup"]:
                            continue
                        hooks = max(0.0, cur["blocked_s"] - cur.get("snapshot_call_s", 0.0))
                        (after_skip if prev.get("status") == "skipped" else after_copy).append(hooks)
            control = [r.get("control_s") for r in base]
            A[f"train_{key}"] = {
                "step_base": summ([r["step_s"] for r in base]), "step_sk": summ([r["step_s"] for r in sk]),
                "compute_base": summ([r["compute_s"] for r in base]), "compute_sk": summ([r["compute_s"] for r in sk]),
                "sync_base": summ([r["sync_s"] for r in base]), "sync_sk": summ([r["sync_s"] for r in sk]),
                "blocked": dict(summ(blocked), p99=quantile(blocked, 0.99),
                                over_5ms=sum(1 for x in blocked if x > 5e-3)),
                "hooks_after_skip": dict(summ(after_skip), p99=quantile(after_skip, 0.99)),
                "hooks_after_copy": dict(summ(after_copy), p99=quantile(after_copy, 0.99)),
                "control": dict(summ(control), p99=quantile(control, 0.99)),
                "call_p99": quantile([r.get("snapshot_call_s") for r in sk], 0.99),
                "snapshot_call": summ([r.get("snapshot_call_s") for r in sk]),
                "forward": summ([r["forward_s"] for r in sk]), "optim_step": summ([r["optim_step_s"] for r in sk]),
                "copy": summ([r.get("copy_s") for r in sk_all]),
                "to_group": summ(grp),
                "to_any": summ([r.get("resolved_s") for r in sk_all]),
                "status": status, "reasons": reasons, "group_steps": steps_group,
                "max_gap_s": max(gaps) if gaps else None, "timed_out_steps": timeouts,
                "tail_wait": summ([b["tail_wait_s"] for res in first.get("train") or [] for b in res["blocks"]
                                   if b["regime"] == key and b["mode"] == "shardkeep"]),
                "block_s": med([b["block_s"] for res in first.get("train") or [] for b in res["blocks"]
                                if b["regime"] == key and b["mode"] == "shardkeep"]),
                "overhead": ratio(med([r["step_s"] for r in sk]), med([r["step_s"] for r in base])),
                "overhead_vs_copy": ratio((med([r["step_s"] for r in sk]) or 0) - (med([r["step_s"] for r in base]) or 0),
                                          R["calibration"]["t_copy_s"]),
            }
            lc = [r.get("local_commit_s") for r in sk_all if r.get("local_commit_s") is not None]
            A[f"train_{key}"]["local_commit"] = dict(summ(lc), p99=quantile(lc, 0.99))
            dc = [r for res in first.get("train_dcp") or [] for b in res["blocks"] if b["regime"] == key
                  for r in b["records"] if not r["warmup"]]
            if dc:
                dblk = [r["blocked_s"] for r in dc]
                A[f"train_{key}"]["dcp"] = {
                    "step": summ([r["step_s"] for r in dc]), "compute": summ([r["compute_s"] for r in dc]),
                    "blocked": dict(summ(dblk), p99=quantile(dblk, 0.99)),
                    "call": summ([r.get("dcp_call_s") for r in dc]), "wait_prev": summ([r.get("dcp_wait_prev_s") for r in dc]),
                    "total": summ([r.get("dcp_total_s") for r in dc]),
                    "overhead": ratio(med([r["step_s"] for r in dc]), med([r["step_s"] for r in base])),
                }
        bound = R["encode_bound"]["bound_gbps"]
        lo, hi = first.get("train_steps", [0, -1])
        A["daemon_commits"] = commit_stats([e for e in first.get("commits", []) if lo <= e["step"] <= hi], bound)
        A["cpu_train"] = cpu_stats(first.get("train_cpu"), first.get("train_s"), R["machine"]["cpu_count"],
                                   A["daemon_commits"], n)
        peaks = R.get("shm_peaks", {})
        tr_pk = peaks.get("train", {})
        rest = first.get("shm_at_rest", {})
        per_node = {}
        for p, v in rest.items():
            per_node[p] = {"rest": v["size"], "rest_alloc": v["allocated"],
                           "peak_train": tr_pk.get("shm", {}).get(p), "peak_train_alloc": tr_pk.get("shm_alloc", {}).get(p),
                           "rss_peak_train": tr_pk.get("rss", {}).get(p)}
        A["shm"] = {"per_node": per_node,
                    "rest_max_vs_target": ratio(max((v["rest"] for v in per_node.values()), default=None), target_shm),
                    "peak_max_vs_target": ratio(max((v["peak_train"] or 0 for v in per_node.values()), default=None),
                                                target_shm),
                    "peak_total_train": tr_pk.get("shm_total"),
                    "kinds_at_peak": tr_pk.get("shm_kinds_at_peak", {}),
                    "mapped_deleted_train": tr_pk.get("mapped_deleted", {}),
                    "mapped_deleted_rest": peaks.get(f"rest_{next(iter(modes))}", {}).get("mapped_deleted", {}),
                    "meminfo_shmem_idle": peaks.get("idle", {}).get("meminfo_shmem"),
                    "meminfo_shmem_train": tr_pk.get("meminfo_shmem"),
                    "ping_s": first.get("ping_s"),
                    "kinds_at_rest": {p: v.get("kinds", {}) for p, v in rest.items()}}
    idle, settle_cpu, settle_s = [], {}, 0.0
    for mode, M in modes.items():
        lo, hi = M.get("settle_steps", [0, -1])
        idle += [e for e in M.get("commits", []) if lo <= e["step"] <= hi]
        settle_s += M.get("settle_s") or 0.0
        for key, v in (M.get("settle_cpu") or {}).items():
            cur = settle_cpu.setdefault(key, {})
            for kk, vv in v.items():
                cur[kk] = cur.get(kk, 0) + vv
    if idle and R.get("encode_bound"):
        A["daemon_commits_idle"] = commit_stats(idle, R["encode_bound"]["bound_gbps"])
        A["cpu_idle"] = cpu_stats(settle_cpu, settle_s, R["machine"]["cpu_count"], A["daemon_commits_idle"], n)
    A["recover"] = {}
    for mode, M in modes.items():
        rc = M.get("recover")
        if not rc:
            continue
        lb = M.get("loopback_before_loss") or R.get("loopback", {}).get(mode, {})
        dp = lb.get("data_plane", {}).get("gbps")
        cc = max((x.get("control_fetch") or 0 for x in lb.get("runs", [])), default=None) \
            or lb.get("control_fetch", {}).get("gbps")
        b = rc.get("bytes_fetched") or 0
        t = rc.get("daemon_s")
        A["recover"][mode] = {
            "bytes_fetched": b, "daemon_s": t, "cli_wall_s": rc.get("cli_wall_s"),
            "gbps": ratio(b / GB, t), "loopback_gbps": dp, "bound_s": ratio(b / GB, dp),
            "vs_bound": ratio(t, ratio(b / GB, dp)), "control_gbps": cc, "control_bound_s": ratio(b / GB, cc),
            "vs_control_bound": ratio(t, ratio(b / GB, cc)),
            "verified": (M.get("verify") or {}).get("bitwise_equal"),
            "restored_step": (M.get("verify") or {}).get("restored_step"), "expected_step": M.get("expected_step"),
            "restore_s": ((M.get("verify") or {}).get("restore_info") or {}).get("seconds"),
        }
        cpu = rc.get("cpu") or {}
        lost = f"node{rc['lost_node']}"
        if cpu:
            A["recover"][mode]["cpu"] = {
                "replacement_main": (cpu.get(lost) or {}).get("main"),
                "replacement_workers": (cpu.get(lost) or {}).get("workers"),
                "survivors_main": sum(v["main"] for kk, v in cpu.items() if kk != lost),
                "survivors_workers": sum(v["workers"] for kk, v in cpu.items() if kk != lost),
            }
    return A


def commit_stats(entries: list[dict], bound: float) -> dict:
    """Summaries of status ``group.recent_commits`` entries (one per node and version).

    Entries without ``sizes_known_s`` are versions a node adopted (a rebuilt replacement, a restart),
    not committed through the encode path: counted, left out of the timings."""
    dec = [e for e in entries if e.get("decision") == "commit" and e.get("sizes_known_s") is not None]
    enc = [e for e in dec if e.get("encode_wall_s") and e.get("encode_in_bytes")]
    wall_gbps = [e["encode_in_bytes"] / e["encode_wall_s"] / GB for e in enc]
    busy_gbps = [e["encode_in_bytes"] / e["encode_busy_s"] / GB for e in enc if e.get("encode_busy_s")]
    return {
        "entries": len(entries), "committed": len(dec),
        "adopted": sum(1 for e in entries if e.get("decision") == "commit" and e.get("sizes_known_s") is None),
        "aborted": sum(1 for e in entries if e.get("decision") == "abort"),
        "versions_committed": len({(e["job"], e["step"]) for e in dec}),
        "encoded_bytes": sum(e["encode_in_bytes"] for e in enc),
        "since_start": summ([e["since_start_s"] for e in dec]),
        "sizes_known": summ([e["sizes_known_s"] for e in dec]),
        "encode_wall": summ([e["encode_wall_s"] for e in enc]),
        "encode_busy": summ([e["encode_busy_s"] for e in enc]),
        "encode_in_bytes": med([e["encode_in_bytes"] for e in enc]),
        "parity_bytes": med([e["parity_bytes"] for e in dec]),
        "rows": med([e["rows"] for e in dec]), "ring_rows": med([e["ring_rows"] for e in dec]),
        "wall_gbps": summ(wall_gbps), "busy_gbps": summ(busy_gbps),
        "wall_vs_bound": ratio(med(wall_gbps), bound), "busy_vs_bound": ratio(med(busy_gbps), bound),
    }


def cpu_stats(cpu: dict | None, wall: float | None, cores: int, commits: dict, n: int) -> dict | None:
    """Where the CPU went over a phase: trainers, daemons' main processes, codec workers."""
    if not cpu or not wall:
        return None
    tr = sum(v["main"] for k, v in cpu.items() if k.startswith("trainer"))
    dm = sum(v["main"] for k, v in cpu.items() if k.startswith("node"))
    dw = sum(v["workers"] for k, v in cpu.items() if k.startswith("node"))
    wf = sum(v.get("workers_minflt", 0) for k, v in cpu.items() if k.startswith("node"))
    mf = sum(v.get("main_minflt", 0) for k, v in cpu.items() if k.startswith("node"))
    versions = commits.get("versions_committed") or 0
    enc_bytes = commits.get("encoded_bytes") or 0
    return {
        "wall_s": wall, "cores": cores, "trainers_s": tr, "daemons_main_s": dm, "codec_workers_s": dw,
        "busy_share": (tr + dm + dw) / (wall * cores), "versions": versions,
        "daemon_main_per_version_s": ratio(dm, versions), "codec_workers_per_version_s": ratio(dw, versions),
        "encode_gb_per_worker_cpu_s": ratio(enc_bytes / GB, dw),
        "workers_minflt": wf, "daemons_main_minflt": mf,
        "workers_minflt_per_version_node": ratio(wf, versions * n),
    }


def render(R: dict) -> str:
    rows: list[tuple[str, str, str]] = []

    def sec(title: str) -> None:
        rows.append(("", "", ""))
        rows.append((f"== {title}", "", ""))

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))

    A = R.get("analysis") or {}
    cfg, mach = R["config"], R["machine"]
    n, m = cfg["nodes"], cfg["parity"]
    k = n - m
    st = R.get("state")
    sec("setup")
    if st:
        row("state per node", f"{st['bytes']['total'] / GB:.3f} GB",
            f"{st['layers']} x Linear({st['width']}) fp32 + Adam; payload S = {st['payload_bytes']:,} B per node")
    row("group", f"n={n} m={m} k={k}",
        f"{(R.get('encode_bound') or {}).get('ec_type', '?')}; --slots {cfg['slots']}; "
        f"{' '.join(cfg['daemon_flags'])}; one daemon + one trainer per node on 127.0.0.1")
    row("machine", f"{mach['cpu_count']} CPU", f"{mach['cpu_model']}; {(mach.get('memory_total') or 0) / 2**30:.1f} "
        f"GiB RAM; torch {mach['torch']}; {mach['platform']}")
    row("load average", f"{R['load_start'][0] if R['load_start'] else '?'}",
        f"1/5/15 min: start {R['load_start']}, end {R.get('load_end')}")
    row("trainers", f"{n} x 1 thread", ("steps synchronized by a gloo all_reduce" if not cfg["no_sync"] else
                                       "steps not synchronized") + f"; {cfg['rounds']} round(s) per regime of {cfg['base_steps']} "
        f"steps without and {cfg['steps']} (compute > copy) / {cfg['short_steps']} (compute < copy) with shardkeep "
        f"(+{cfg['warmup']} warm-up per block)")

    bl = R.get("baselines")
    if bl:
        sec("one node's state to and from a file, in the benchmark process (before the daemons start)")
        tf, d = bl["torch_file"], bl["dcp"]
        row("torch.save + fsync", fmt_s(tf["save"]["total_s"]["median"]),
            f"{tf['save']['bytes']:,} B; fsync {fmt_s(tf['save']['fsync_s']['median'])}; {R['machine']['tmp_dir_fs']}")
        for how in ("evicted", "cached"):
            row(f"torch.load + load_state_dict, {how}", fmt_s(tf[f"load_{how}"]["total_s"]["median"]),
                f"torch.load alone {fmt_s(tf[f'load_{how}']['load_s']['median'])}")
        row("dcp.save", fmt_s(d["save"]["median"]), "no_dist")
        row("dcp.async_save, blocking / total", f"{fmt_s(d['async_call']['median'])} / "
            f"{fmt_s(d['async_total']['median'])}", "default stager, thread executor")

    sec("references measured in this run (before the daemons start)")
    pc = R.get("plain_copy")
    if pc:
        row("plain Tensor.copy_ of one node's state, 1 thread", fmt_gbps(pc["gbps"]),
            f"T_copy {fmt_s(pc['s']['median'])}")
    eb = R.get("encode_bound")
    if eb:
        row("raw pyeclib encode, tuned malloc, 1 process", fmt_gbps(eb["raw_encode_gbps"]),
            f"{eb['bytes'] / GB:.3f} GB = one stripe's k chunks, {eb['substripes']} sub-stripes of k x {eb['piece']} B")
        row("memcpy of the same bytes", fmt_gbps(eb["memcpy_gbps"]), "")
        ebe = R.get("encode_bound_end") or {}
        row("encode bound: raw encode + one memcpy", fmt_gbps(eb["bound_gbps"]),
            f"the same at the end of the run: {fmt_gbps(ebe.get('bound_gbps'))}")
    for mode, lb in (R.get("loopback") or {}).items():
        row(f"loopback data plane, {mode}", fmt_gbps(lb["data_plane"]["gbps"]),
            f"4 MiB messages, {lb['data_plane'].get('bytes', 0) / 2**20:.0f} MiB; "
            + {"curve": "plain TCP + BLAKE3 tags", "insecure": "plain TCP + BLAKE3 tags",
               "encrypt-data": "CURVE + BLAKE3 tags"}[mode])
        row(f"loopback control channel fetch, {mode}", fmt_gbps(lb["control_fetch"]["gbps"]),
            "sequential 8 MiB request/replies (how recover pulls); "
            + ("CURVE" if mode != "insecure" else "plain TCP"))

    first_mode = next(iter(R.get("modes", {})), None)
    for reg in R.get("regimes", []):
        key = reg["key"]
        T = A.get(f"train_{key}")
        if not T:
            continue
        sec(f"training ({first_mode}), {reg['label']}: all ranks' measured steps")
        row("compute per step (target, idle)", fmt_s(reg["target_s"]),
            f"measured median: without shardkeep {fmt_s(T['compute_base']['median'])}, with "
            f"{fmt_s(T['compute_sk']['median'])}")
        row("step, no shardkeep", fmt_s(T["step_base"]["median"]),
            f"max {fmt_s(T['step_base']['max'])}; all_reduce {fmt_s(T['sync_base']['median'])}")
        row("step, snapshot every step", fmt_s(T["step_sk"]["median"]),
            f"overhead {fmt_x(T['overhead'])} (+{fmt_s((T['step_sk']['median'] or 0) - (T['step_base']['median'] or 0))}"
            f" = {T['overhead_vs_copy'] or 0:.2f} x T_copy); max {fmt_s(T['step_sk']['max'])}")
        b = T["blocked"]
        row("  blocked per step (call + hooks)", fmt_s(b["median"]),
            f"p99 {fmt_s(b['p99'])}, max {fmt_s(b['max'])} (target < 5 ms with compute > copy)")
        row("    steps blocked > 5 ms", f"{b['over_5ms']} of {b['n']}", "")
        row("  snapshot() call", fmt_s(T["snapshot_call"]["median"]),
            f"p99 {fmt_s(T['call_p99'])}, max {fmt_s(T['snapshot_call']['max'])}")
        c = T["control"]
        row("    control: same Python work, no shardkeep", fmt_s(c["median"]),
            f"p99 {fmt_s(c['p99'])}, max {fmt_s(c['max'])}: flatten + RNG capture timed in the loop without "
            f"shardkeep (scheduling noise of this machine)")
        hs, hc = T["hooks_after_skip"], T["hooks_after_copy"]
        row("  hooks waiting on a snapshot then skipped", fmt_s(hs["median"]),
            f"p99 {fmt_s(hs['p99'])}, max {fmt_s(hs['max'])} over {hs['n']} steps (the daemon's answer to begin)")
        row("  hooks waiting on a snapshot copied", fmt_s(hc["median"]),
            f"p99 {fmt_s(hc['p99'])}, max {fmt_s(hc['max'])} over {hc['n']} steps")
        row("  copy into shm (client)", fmt_s(T["copy"]["median"]),
            f"max {fmt_s(T['copy']['max'])}; {T['copy']['n']} copies")
        s = T["status"]
        row("  snapshots: group / local / skipped / failed", f"{s['group']} / {s['local']} / {s['skipped']} / {s['failed']}",
            f"of {s['taken']} taken (one per step per rank, warm-up included); {len(T['group_steps'])} steps "
            f"reached group level" + (f"; {s['unresolved']} unresolved" if s["unresolved"] else ""))
        for why, cnt in sorted(T["reasons"].items(), key=lambda kv: -kv[1])[:3]:
            row("    not group-level:", str(cnt), why)
        row("  longest time without a new group-level version", fmt_s(T["max_gap_s"]),
            f"any rank, from a block's start until its last future resolved (median block {fmt_s(T['block_s'])}, "
            f"then waiting for its futures up to {fmt_s(T['tail_wait']['max'])})")
        if T["timed_out_steps"]:
            row("  versions stuck until --group-commit-timeout", str(len(T["timed_out_steps"])),
                f"steps {T['timed_out_steps'][:6]}: committed on some nodes, skipped on others; nothing aborts "
                f"them sooner, and every snapshot is skipped meanwhile")
        row("  snapshot() -> future resolved at group level", fmt_s(T["to_group"]["median"]),
            f"max {fmt_s(T['to_group']['max'])} (median over {T['to_group']['n']} group-level futures)")
        lc = T.get("local_commit") or {}
        if lc.get("n"):
            row("  snapshot() -> local commit (client)", fmt_s(lc["median"]),
                f"p99 {fmt_s(lc['p99'])}, max {fmt_s(lc['max'])} over {lc['n']} local commits seen between two steps")
        dc = T.get("dcp")
        if dc:
            row("  step, dcp.async_save every step", fmt_s(dc["step"]["median"]),
                f"overhead {fmt_x(dc['overhead'])} of the steps without checkpointing above (a later phase, not "
                f"interleaved); compute {fmt_s(dc['compute']['median'])}")
            row("    blocked per step (dcp: wait + call)", fmt_s(dc["blocked"]["median"]),
                f"p99 {fmt_s(dc['blocked']['p99'])}; call {fmt_s(dc['call']['median'])}, wait "
                f"{fmt_s(dc['wait_prev']['median'])}, save total {fmt_s(dc['total']['median'])}; each rank its own "
                f"checkpoint (no_dist) in --tmp-dir")

    eb = R.get("encode_bound") or {}
    for dkey, ckey, title in (("daemon_commits", "cpu_train", f"during the training phases ({first_mode})"),
                              ("daemon_commits_idle", "cpu_idle", "trainers idle (snapshots before each loss, "
                                                                   "all modes)")):
        D, C = A.get(dkey), A.get(ckey)
        if not D or not D["committed"]:
            continue
        sec(f"group commits, daemon side, {title}; status group.recent_commits of every node")
        row("versions committed / aborted", f"{D['versions_committed']} / {D['aborted']}",
            f"{D['committed']} node entries (+{D['adopted']} adopted by a rebuilt node, left out)")
        row("local commit -> group decision (since_start_s)", fmt_s(D["since_start"]["median"]),
            f"max {fmt_s(D['since_start']['max'])}; all sizes known after {fmt_s(D['sizes_known']['median'])}")
        row("encode wall (first row encode -> last row)", fmt_s(D["encode_wall"]["median"]),
            f"busy (sum of row encode calls) {fmt_s(D['encode_busy']['median'])}; "
            f"{(D['encode_in_bytes'] or 0) / GB:.3f} GB in, parity {(D['parity_bytes'] or 0) / GB:.3f} GB; "
            f"{D['rows']:.0f} rows, ring {D['ring_rows']:.0f}")
        row("encode throughput, in_bytes / encode wall", fmt_gbps(D["wall_gbps"]["median"]),
            f"{fmt_x(D['wall_vs_bound'])} of the bound {eb.get('bound_gbps', 0):.2f} GB/s (target >= 0.80x); "
            f"includes waiting for pulled rows")
        row("encode throughput, in_bytes / encode busy", fmt_gbps(D["busy_gbps"]["median"]),
            f"{fmt_x(D['busy_vs_bound'])} of the bound; row encodes overlap and queue for the 2 workers")
        if C:
            row("encode throughput per codec-worker CPU second", fmt_gbps(C["encode_gb_per_worker_cpu_s"]),
                f"{fmt_x(ratio(C['encode_gb_per_worker_cpu_s'], eb.get('bound_gbps')))} of the 1-core bound; "
                f"{C['codec_workers_s']:.2f} CPU-s of codec workers for {C['versions']} versions x {n} stripes")
            row("CPU over the phase", f"{C['busy_share'] * 100:.0f}% of {C['cores']} cores",
                f"{C['wall_s']:.1f} s wall: trainers {C['trainers_s']:.1f} s, daemons' main processes "
                f"{C['daemons_main_s']:.1f} s, codec workers {C['codec_workers_s']:.1f} s (CPU-s, all nodes)")
            row("codec workers' minor page faults per version and node", f"{C['workers_minflt_per_version_node'] or 0:,.0f}",
                "staging ring and parity segments are reused across versions and stay mapped; faults "
                "left: first versions of a layout and the workers' own heaps")
            row("daemon CPU per group-committed version", fmt_s(C["daemon_main_per_version_s"]),
                f"main processes of all {n} nodes (transfer, BLAKE3 tags, staging copies, event loop) + "
                f"{fmt_s(C['codec_workers_per_version_s'])} in codec workers")

    SH = A.get("shm")
    pg = (SH or {}).get("ping_s") or {}
    if pg.get("train"):
        sec(f"daemon responsiveness ({first_mode}): client 'ping' round trip, every 0.1 s to every daemon")
        for ph, label in (("train", "during training (group commits running)"), ("rest", "at rest"),
                          ("settle", "trainers idle, group commits running")):
            v = pg.get(ph)
            if v and v.get("n"):
                row(f"ping, {label}", fmt_s(v["median"]), f"p99 {fmt_s(v['p99'])}, max {fmt_s(v['max'])}, n={v['n']}")

    if SH:
        tgt = A["shm_target_per_node"]
        sec(f"memory per node ({first_mode}); target slots x S x (1 + m/k) = {tgt / GB:.3f} GB")
        for p, v in sorted(SH["per_node"].items()):
            node = int(re.search(r"n(\d+)x$", p).group(1))
            rss = v.get("rss_peak_train") or {}
            row(f"node {node}: /dev/shm at rest / peak in training",
                f"{v['rest'] / GB:.3f} / {(v['peak_train'] or 0) / GB:.3f} GB",
                f"{fmt_x(ratio(v['rest'], tgt))} / {fmt_x(ratio(v['peak_train'], tgt))} of target; daemon RSS peak "
                f"{rss.get('rss', 0) / GB:.2f} GB ({rss.get('private', 0) / 2**20:.0f} MiB not shm), "
                f"codec workers {rss.get('workers_rss', 0) / 2**20:.0f} MiB")
        kinds = next(iter(SH.get("kinds_at_peak", {}).values()), None)
        if kinds:
            row("  composition of node 0's peak", f"{sum(kinds.values()) / GB:.3f} GB",
                ", ".join(f"{kk} {vv / 2**20:.0f} MiB" for kk, vv in sorted(kinds.items())))
        rk = next(iter(SH.get("kinds_at_rest", {}).values()), None)
        if rk:
            row("  composition at rest", f"{sum(rk.values()) / GB:.3f} GB",
                ", ".join(f"{kk} {vv / 2**20:.0f} MiB" for kk, vv in sorted(rk.items())))
        row("all nodes, peak in training", f"{(SH['peak_total_train'] or 0) / GB:.3f} GB",
            f"target {n * tgt / GB:.3f} GB")
        md, mr = SH.get("mapped_deleted_train") or {}, SH.get("mapped_deleted_rest") or {}
        if mr:
            eff = max(SH["per_node"][p]["rest"] + v["deleted"] for p, v in mr.items() if p in SH["per_node"])
            row("memory held at rest, /dev/shm + unlinked but mapped", f"{eff / GB:.3f} GB",
                f"{fmt_x(ratio(eff, tgt))} of target (worst node)")
        if md:
            worst = max(md.values(), key=lambda x: x["deleted"])
            row("unlinked segments still mapped (per node, peak)", f"{worst['deleted'] / GB:.3f} GB",
                f"{worst['deleted_files']} files /dev/shm no longer lists, still mapped (daemon main process "
                f"{worst.get('main_deleted', 0) / GB:.3f} GB, codec workers {worst.get('workers_deleted', 0) / GB:.3f} GB); "
                f"at rest: "
                + ", ".join(f"{v['deleted'] / GB:.2f}" for _, v in sorted(mr.items())) + " GB per node")
        if SH.get("meminfo_shmem_train") and SH.get("meminfo_shmem_idle") is not None:
            row("system Shmem (/proc/meminfo), peak in training", f"{SH['meminfo_shmem_train'] / GB:.3f} GB",
                f"{(SH['meminfo_shmem_train'] - SH['meminfo_shmem_idle']) / GB:.3f} GB above the start of the run "
                f"(machine-wide: other processes' shm counts too)")

    RC = A.get("recover") or {}
    if RC:
        sec(f"rebuild of node {n - 1} (SIGKILL, shm + state dir wiped, replacement at a new port)")
    for mode, v in RC.items():
        row(f"{mode}: shardkeep recover", fmt_s(v["daemon_s"]),
            f"in the daemon ({fmt_s(v['cli_wall_s'])} CLI wall); {v['bytes_fetched'] / GB:.3f} GB fetched = "
            f"{fmt_gbps(v['gbps'])}")
        row(f"{mode}: bound = bytes / loopback data plane", fmt_s(v["bound_s"]),
            f"loopback measured just before the loss (best of 2): {fmt_gbps(v['loopback_gbps'])}")
        row(f"{mode}: recover / bound", fmt_x(v["vs_bound"]),
            f"target <= 2x; against the control channel's sequential-fetch rate ({fmt_gbps(v['control_gbps'])}, "
            f"what recover uses): {fmt_x(v['vs_control_bound'])}")
        c = v.get("cpu")
        if c:
            row(f"{mode}: CPU during recover", f"{(c['replacement_main'] or 0) + (c['replacement_workers'] or 0):.2f} s",
                f"replacement: main {c['replacement_main'] or 0:.2f} s + codec workers {c['replacement_workers'] or 0:.2f} s; "
                f"survivors: main {c['survivors_main']:.2f} s + workers {c['survivors_workers']:.2f} s "
                f"(CPU-s over {fmt_s(v['cli_wall_s'])})")
        row(f"{mode}: rank {n - 1} restored from the replacement",
            "bitwise equal" if v["verified"] else "MISMATCH",
            f"step {v['restored_step']} (expected {v['expected_step']}); restore {fmt_s(v['restore_s'])}")

    if SH or RC or D:
        sec("targets")
        if D:
            row("encode >= 80% of raw encode + memcpy", "met" if (D["wall_vs_bound"] or 0) >= 0.8 else "MISSED",
                f"{fmt_x(D['wall_vs_bound'])} (wall), {fmt_x(D['busy_vs_bound'])} (busy)")
        T = A.get("train_long")
        if T:
            row("blocked < 5 ms per step, compute > copy",
                "met" if (T["blocked"]["p99"] or 1) < 5e-3 else "MISSED",
                f"p99 {fmt_s(T['blocked']['p99'])}, max {fmt_s(T['blocked']['max'])}")
        T = A.get("train_short")
        if T:
            row("step overhead <= 1.5 x T_copy, compute < copy",
                "met" if (T["overhead_vs_copy"] or 9) <= 1.5 else "MISSED", f"{T['overhead_vs_copy'] or 0:.2f} x T_copy")
        if SH:
            row("/dev/shm per node within 5% of target", "met" if (SH["peak_max_vs_target"] or 9) <= 1.05 else "MISSED",
                f"peak {fmt_x(SH['peak_max_vs_target'])}, at rest {fmt_x(SH['rest_max_vs_target'])}; "
                f"not counting unlinked segments still mapped")
        for mode, v in RC.items():
            row(f"rebuild within 2x of loopback bound, {mode}", "met" if (v["vs_bound"] or 9) <= 2 else "MISSED",
                fmt_x(v["vs_bound"]))

    if not R.get("ok", True):
        sec("FAILED")
        row("error", "", (R.get("error") or "").strip().splitlines()[-1] if R.get("error") else "")
    row("", "", "")
    row("run time", fmt_s(R.get("run_s")), f"leftover /dev/shm segments: {len(R.get('leftover_shm') or [])}")

    return bsn.layout_rows(rows)


def record(R: dict, text: str, out_path: Path, out_dir: Path, prog: str) -> None:
    cfg, mach = R["config"], R["machine"]
    day = R["date"][:10]
    st = R.get("state", {})
    try:
        rel = out_path.resolve().relative_to(out_dir.resolve().parent)
    except ValueError:
        rel = out_path
    cmd = prog + (" " + " ".join(a for a in sys.argv[1:] if a != "--record") if len(sys.argv) > 1 else "")
    sec = [
        f"\n## Group, n={cfg['nodes']} m={cfg['parity']}, {st.get('bytes', {}).get('total', 0) / GB:.2f} GB per node"
        f" — {day}\n",
        f"Command: `{cmd.strip()}` (JSON in `{rel}`).",
        f"Machine: {mach['cpu_count']} vCPU {mach['cpu_model']}, {(mach.get('memory_total') or 0) / 2**30:.1f} GiB RAM, "
        f"Python {mach['python']}, torch {mach['torch']}; load average {R['load_start']} at start, "
        f"{R.get('load_end')} at the end; {R.get('run_s', 0):.0f} s in all.\n",
        "```",
        text,
        "```",
        "",
    ]
    with open(out_dir / "RESULTS.md", "a") as f:
        f.write("\n".join(sec))


if __name__ == "__main__":
    sys.exit(main())
