"""``shardkeep bench``: the benchmark cases of the project in one run, one summary table and one chart.

Each case is one run of ``shardkeep.bench.single_node`` (one daemon, one trainer, with the baselines
torch.save/torch.load/dcp.save/dcp.async_save on the same state) or ``shardkeep.bench.group`` (n daemons
and n trainers on loopback, a node lost and rebuilt, the same baselines on one node's state), in its
own process: one case's memory is gone before the next starts, and each child removes its daemons,
shared memory and temp files itself, also on error, Ctrl-C or SIGTERM (which this process passes on).

Writes ``<out-dir>/out/bench-<stamp>.json`` (every case's raw results, the summary rows, the machine),
``<out-dir>/out/bench-<stamp>-<case>.{json,log}`` (each child's own JSON and output),
``<out-dir>/bench-<stamp>.png`` and a copy ``<out-dir>/bench.png``; with ``--record`` a dated section in
``<out-dir>/RESULTS.md``. Nothing here imports torch or matplotlib at module level (``shardkeep --help``
builds this parser).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shardkeep.bench.fmt import fmt_gbps

GB = 1e9
SHM = Path("/dev/shm")
DEFAULT_SIZES = "0.1,0.5,1.6"
DEFAULT_GROUP_SIZES = "0.1,0.4"
BENCH_EXTRA_HINT = "pip install 'shardkeep[bench]'"
# (seconds, seconds per GB of state) of a case on a 2-core VM, from the runs of 0.1 GB cases and the
# recorded runs in RESULTS.md; only for the estimate printed before each case
_EST = {("single", False): (15, 100), ("single", True): (20, 60), ("group", False): (45, 330),
        ("group", True): (45, 150)}


# --- arguments -------------------------------------------------------------------------------------


def _sizes(text: str) -> list[float]:
    text = (text or "").strip()
    if text.lower() in ("", "none", "0"):
        return []
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of GB: {text!r}") from None
    if any(x <= 0 for x in out):
        raise argparse.ArgumentTypeError(f"sizes must be > 0: {text!r}")
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="smoke run: only the smallest single-node and group size, few steps (a few minutes)")
    p.add_argument("--sizes", type=_sizes, default=None, metavar="GB,...",
                   help=f"single-node cases, GB of params + Adam state; 'none' to skip (default: {DEFAULT_SIZES}; "
                        "--quick: the smallest)")
    p.add_argument("--group-sizes", type=_sizes, default=None, metavar="GB,...",
                   help=f"group cases, GB per node; 'none' to skip (default: {DEFAULT_GROUP_SIZES}; --quick: the "
                        "smallest)")
    p.add_argument("--nodes", type=int, default=4, help="nodes of the group cases, all on this machine (default: 4)")
    p.add_argument("--parity", type=int, default=1, help="parity m of the group cases (default: 1)")
    p.add_argument("--out-dir", default=None,
                   help="where results go (default: ./benchmarks if it exists, else ./shardkeep-bench)")
    p.add_argument("--record", action="store_true",
                   help="append a dated section (command, machine, load, the tables) to <out-dir>/RESULTS.md")
    p.add_argument("--tmp-dir", default=None,
                   help="parent of the cases' temp dirs and checkpoint files; a local disk, not tmpfs "
                        "(default: $TMPDIR or /tmp)")
    p.add_argument("--single-args", default="", metavar="ARGS",
                   help="extra arguments for every single-node case (python -m shardkeep.bench.single_node "
                        "--help), e.g. --single-args='--steps 4 --rounds 1'")
    p.add_argument("--group-args", default="", metavar="ARGS",
                   help="extra arguments for every group case (python -m shardkeep.bench.group --help), "
                        "e.g. --group-args='--modes curve'")
    p.add_argument("--no-chart", action="store_true", help="no PNG (matplotlib not needed)")
    p.add_argument("--verbose", "-v", action="store_true", help="print the cases' whole output, not only progress")


# --- machine ---------------------------------------------------------------------------------------


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"cpu_model": "?", "cpu_count": os.cpu_count(), "kernel": platform.release(),
            "platform": platform.platform(), "python": platform.python_version(), "hostname": platform.node()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(Exception):
        import psutil

        info["memory_total"] = psutil.virtual_memory().total
        info["memory_available"] = psutil.virtual_memory().available
    for pkg in ("torch", "shardkeep"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "?"
    with contextlib.suppress(OSError):
        st = os.statvfs(str(SHM))
        info["dev_shm_free"] = st.f_bavail * st.f_frsize
    return info


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_line(m: dict) -> str:
    return (f"{m.get('cpu_count')} CPU {m.get('cpu_model')}, {(m.get('memory_total') or 0) / 2**30:.1f} GiB RAM, "
            f"Linux {m.get('kernel')}, Python {m.get('python')}, torch {m.get('torch')}")


# --- the cases -------------------------------------------------------------------------------------


def single_width(size_gb: float) -> int:
    """Linear(4096) layers (201 MB each with Adam) from 1 GB up, Linear(2048) (50 MB) below."""
    return 4096 if size_gb >= 1.0 else 2048


def plan(args: argparse.Namespace) -> list[dict]:
    sizes = args.sizes if args.sizes is not None else _sizes(DEFAULT_SIZES)
    gsizes = args.group_sizes if args.group_sizes is not None else _sizes(DEFAULT_GROUP_SIZES)
    if args.quick:
        sizes = sorted(sizes)[:1] if args.sizes is None else sizes
        gsizes = sorted(gsizes)[:1] if args.group_sizes is None else gsizes
    cases = []
    for s in sizes:
        cmd = ["--size", f"{s:g}", "--width", str(single_width(s))] + (["--quick"] if args.quick else [])
        cases.append({"kind": "single", "size_gb": s, "nodes": 1, "parity": 0,
                      "name": f"single-{s:g}GB", "label": f"single node, {s:g} GB",
                      "args": cmd + shlex.split(args.single_args)})
    for s in gsizes:
        cmd = ["--size", f"{s:g}", "--nodes", str(args.nodes), "--parity", str(args.parity)]
        cases.append({"kind": "group", "size_gb": s, "nodes": args.nodes, "parity": args.parity,
                      "name": f"group{args.nodes}m{args.parity}-{s:g}GB",
                      "label": f"group n={args.nodes} m={args.parity}, {s:g} GB/node",
                      "args": cmd + (["--quick"] if args.quick else []) + shlex.split(args.group_args)})
    for c in cases:
        if args.tmp_dir:
            c["args"] += ["--tmp-dir", args.tmp_dir]
    return cases


def estimate_s(case: dict, quick: bool) -> float:
    base, per_gb = _EST[(case["kind"], quick)]
    return base + per_gb * case["size_gb"]


def fmt_dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Stop(Exception):
    pass


class Runner:
    """Runs one case at a time in its own session; SIGINT/SIGTERM here become SIGTERM to the case."""

    GRACE_S = 180.0  # a case cleans up (stops its daemons, removes its segments) before it exits

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.proc: subprocess.Popen | None = None
        self.stopping: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def uninstall(self) -> None:
        for sig, h in self._old.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, h)

    def _on_signal(self, signum, frame) -> None:
        first = self.stopping is None
        self.stopping = signum
        p = self.proc
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                p.send_signal(signal.SIGTERM)
        if first:
            print(f"\n{signal.Signals(signum).name}: stopping the running case (it stops its daemons and removes "
                  f"its shared memory and temp files), then writing what was measured", flush=True)

    def run(self, case: dict, module: str, json_path: Path, log_path: Path) -> dict:
        cmd = [sys.executable, "-m", module, *case["args"], "--out", str(json_path)]
        t0 = time.monotonic()
        prefixes: set[str] = set()
        with open(log_path, "w") as logf:
            logf.write("$ " + shlex.join(cmd) + "\n")
            logf.flush()
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
            reader = threading.Thread(target=self._pump, args=(self.proc, logf, case, prefixes), daemon=True)
            reader.start()
            rc = self._wait(self.proc)
            reader.join(timeout=10)
        self.proc = None
        out = {"cmd": cmd, "rc": rc, "seconds": time.monotonic() - t0}
        if rc is None:  # it did not exit in time: killed, its segments removed by their prefixes
            out["rc"] = -9
            out["killed"] = True
            for pre in prefixes:
                for f in SHM.glob(f"{pre}*"):
                    with contextlib.suppress(OSError):
                        f.unlink()
        return out

    def _wait(self, p: subprocess.Popen) -> int | None:
        deadline = None
        while True:
            try:
                return p.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if self.stopping is not None:
                if deadline is None:
                    deadline = time.monotonic() + self.GRACE_S
                elif time.monotonic() > deadline:
                    with contextlib.suppress(OSError):
                        os.killpg(p.pid, signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=10)
                    return None

    def _pump(self, p: subprocess.Popen, logf, case: dict, prefixes: set[str]) -> None:
        tag = f"  [{case['name']}]"
        with contextlib.suppress(ValueError, OSError):
            for line in p.stdout:
                logf.write(line)
                for m in re.finditer(r"\b(skbench[0-9a-f]{8}|skbg[0-9a-f]{6})\b", line):
                    prefixes.add(m.group(1))
                # progress: the children's timestamped log lines ("[HH:MM:SS load [...]] ..."), not their tables
                if self.verbose:
                    print(tag + " " + line.rstrip(), flush=True)
                elif line.startswith("["):
                    msg = re.sub(r"^\[(\d\d:\d\d:\d\d) load \[[^\]]*\]\]", r"\1", line.rstrip())
                    print(f"{tag} {msg[:150]}", flush=True)


# --- summary ---------------------------------------------------------------------------------------


def _g(d, *keys):
    for k in keys:
        if isinstance(d, dict) and k in d:
            d = d[k]
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
    return d


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def quantile(xs, q: float):
    xs = sorted(float(x) for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def row_single(R: dict) -> dict:
    su, ra = R.get("summary") or {}, R.get("ratios") or {}
    loops = R.get("loops") or {}
    blocked = [r.get("blocked_s") for name, lp in loops.items() if name.startswith("shardkeep_long_")
               for r in lp.get("records", []) if not r.get("warmup")]
    sk_s, base_s = _g(su, "shardkeep_short", "step_s", "median"), _g(su, "baseline_short", "step_s", "median")
    t_copy = _g(R, "calibration", "t_copy_s")
    shm = R.get("shm") or {}
    warm = _g(R, "restore", "warm") or {}
    skipped = [_g(su, f"shardkeep_{k}", "skipped") for k in ("short", "long")]
    taken = sum(len(lp.get("records", [])) for name, lp in loops.items() if name.startswith("shardkeep_"))
    return {
        "state_bytes": _g(R, "state", "bytes", "total"),
        "snapshot_bytes": _g(R, "state", "snapshot_bytes"),
        "t_copy_s": t_copy,
        "blocked_median_s": _g(su, "shardkeep_long", "blocked_s", "median"),
        "blocked_p99_s": quantile(blocked, 0.99),
        "overhead_short_x_copy": _ratio(None if sk_s is None or base_s is None else sk_s - base_s, t_copy),
        "overhead_short_ratio": ra.get("step_overhead_shardkeep_short"),
        "overhead_long_ratio": ra.get("step_overhead_shardkeep_long"),
        "dcp_loop_blocked_s": _g(su, "dcp_long", "blocked_s", "median"),
        "dcp_loop_overhead_long_ratio": ra.get("step_overhead_dcp_long"),
        "local_commit_s": _g(su, "shardkeep_long", "commit_latency_s", "median"),
        "group_commit_s": None,
        "restore_s": _g(warm, "s", "median"),
        "restore_gbps": warm.get("gbps"),
        "rebuild_s": None, "rebuild_gbps": None, "rebuild_bytes": None,
        "shm_per_node_bytes": shm.get("bytes"),
        "shm_vs_target": _ratio(shm.get("bytes"), shm.get("target")),
        "shm_peak_vs_target": None,
        "skipped": None if None in skipped else sum(skipped), "snapshots": taken or None,
        **_baselines(R.get("torch_file"), R.get("dcp")),
    }


def row_group(R: dict) -> dict:
    A = R.get("analysis") or {}
    TL, TS = A.get("train_long") or {}, A.get("train_short") or {}
    modes = R.get("modes") or {}
    first = next(iter(modes), None)
    M = modes.get(first) or {}
    rec = _g(A, "recover", first) or {}
    info = _g(M, "verify", "restore_info") or {}
    sh = A.get("shm") or {}
    rests = [v.get("rest") for v in (sh.get("per_node") or {}).values() if v.get("rest") is not None]
    st_l, st_s = TL.get("status") or {}, TS.get("status") or {}
    bl = R.get("baselines") or {}
    return {
        "state_bytes": _g(R, "state", "bytes", "total"),
        "snapshot_bytes": _g(R, "state", "payload_bytes"),
        "t_copy_s": _g(R, "calibration", "t_copy_s"),
        "blocked_median_s": _g(TL, "blocked", "median"),
        "blocked_p99_s": _g(TL, "blocked", "p99"),
        "overhead_short_x_copy": TS.get("overhead_vs_copy"),
        "overhead_short_ratio": TS.get("overhead"),
        "overhead_long_ratio": TL.get("overhead"),
        "dcp_loop_blocked_s": _g(TL, "dcp", "blocked", "median"),
        "dcp_loop_overhead_long_ratio": _g(TL, "dcp", "overhead"),
        "local_commit_s": _g(TL, "local_commit", "median"),
        "group_commit_s": _g(TL, "to_group", "median"),
        "restore_s": info.get("seconds"),
        "restore_gbps": _ratio(info.get("bytes"), (info.get("seconds") or 0) * GB),
        "rebuild_s": rec.get("daemon_s"),
        "rebuild_gbps": rec.get("gbps"),
        "rebuild_bytes": rec.get("bytes_fetched"),
        "rebuild_verified": rec.get("verified"),
        "shm_per_node_bytes": max(rests) if rests else None,
        "shm_vs_target": sh.get("rest_max_vs_target"),
        "shm_peak_vs_target": sh.get("peak_max_vs_target"),
        "skipped": (st_l.get("skipped") or 0) + (st_s.get("skipped") or 0) if (st_l or st_s) else None,
        "snapshots": (st_l.get("taken") or 0) + (st_s.get("taken") or 0) if (st_l or st_s) else None,
        **_baselines(bl.get("torch_file"), bl.get("dcp")),
    }


def _baselines(tf: dict | None, d: dict | None) -> dict:
    return {
        "torch_save_s": _g(tf, "save", "total_s", "median"),
        "torch_load_evicted_s": _g(tf, "load_evicted", "total_s", "median"),
        "torch_load_cached_s": _g(tf, "load_cached", "total_s", "median"),
        "dcp_save_s": _g(d, "save", "median"),
        "dcp_async_call_s": _g(d, "async_call", "median"),
        "dcp_async_total_s": _g(d, "async_total", "median"),
    }


def summary_row(case: dict) -> dict:
    """One row of the summary table from a case's raw result (``case["result"]``: the child's JSON)."""
    R = case.get("result") or {}
    row = {"name": case["name"], "label": case["label"], "kind": case["kind"], "size_gb": case["size_gb"],
           "nodes": case.get("nodes", 1), "parity": case.get("parity", 0), "ok": bool(R.get("ok")) and not case.get("rc"),
           "seconds": case.get("seconds"), "error": None}
    if not R:
        row["error"] = case.get("error") or f"no result (exit status {case.get('rc')})"
        return row
    if not row["ok"]:
        row["error"] = ((R.get("error") or "").strip().splitlines() or [f"exit status {case.get('rc')}"])[-1][:200]
    try:
        row.update(row_group(R) if case["kind"] == "group" else row_single(R))
    except Exception as exc:  # noqa: BLE001 - a partial result still gives a partial row
        row["error"] = (row["error"] or "") + f" (summary: {type(exc).__name__}: {exc})"
    # shardkeep's commit on the save side: local for one node, group level for a group
    commit = row.get("group_commit_s") if case["kind"] == "group" else row.get("local_commit_s")
    row["commit_s"] = commit
    row["vs_torch_save"] = _ratio(row.get("torch_save_s"), commit)
    row["vs_dcp_save"] = _ratio(row.get("dcp_save_s"), commit)
    row["vs_dcp_async_total"] = _ratio(row.get("dcp_async_total_s"), commit)
    row["vs_dcp_async_blocking"] = _ratio(row.get("dcp_async_call_s"), row.get("blocked_median_s"))
    row["vs_dcp_loop_blocked"] = _ratio(row.get("dcp_loop_blocked_s"), row.get("blocked_median_s"))
    row["vs_torch_load_evicted"] = _ratio(row.get("torch_load_evicted_s"), row.get("restore_s"))
    row["vs_torch_load_cached"] = _ratio(row.get("torch_load_cached_s"), row.get("restore_s"))
    return row


def fs(x) -> str:
    """Seconds, human-readable."""
    if x is None:
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 0.01:
        return f"{x * 1e3:.2f} ms"
    if x < 0.1:
        return f"{x * 1e3:.1f} ms"
    if x < 1:
        return f"{x * 1e3:.0f} ms"
    return f"{x:.2f} s"


def fx(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def case_cell(r: dict) -> str:
    if r["kind"] == "group":
        return f"group {r['nodes']}x{r['size_gb']:g} GB (m={r['parity']})"
    return f"single {r['size_gb']:g} GB"


def tables(rows: list[dict]) -> str:
    """The two Markdown tables (shardkeep; baselines and ratios), one row per case, and their notes."""
    t1 = ["| case | state / node | trainer blocked per step, compute > copy: median / p99 | step overhead, "
          "compute < copy (x one plain copy) | step overhead, compute > copy | dcp.async_save every step: "
          "blocked per step (step overhead) | snapshot → local commit | snapshot → group commit | local restore | "
          "node rebuild | /dev/shm per node (x target) | skipped snapshots |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    t2 = ["| case | torch.save + fsync | torch.load + load_state_dict: evicted / cached | dcp.save | "
          "dcp.async_save: blocking / total | shardkeep commit vs torch.save / dcp.save / dcp.async_save total | "
          "trainer blocked vs dcp.async_save blocking (alone / every step) | restore vs torch.load: evicted / cached |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = case_cell(r)
        if r.get("state_bytes") is None:
            t1.append(f"| {c} | failed: {r.get('error') or '?'} |" + " |" * 10)
            t2.append(f"| {c} | failed |" + " |" * 6)
            continue
        fail = "" if r["ok"] else f" (failed: {r.get('error') or '?'})"
        rb = "-"
        if r.get("rebuild_s") is not None:
            rb = f"{fs(r['rebuild_s'])} ({fmt_gbps(r.get('rebuild_gbps'))})"
            if r.get("rebuild_verified") is False:
                rb += " NOT bitwise equal"
        shm = "-"
        if r.get("shm_per_node_bytes") is not None:
            shm = f"{r['shm_per_node_bytes'] / GB:.3f} GB ({fx(r.get('shm_vs_target'))})"
            if r.get("shm_peak_vs_target") is not None:
                shm += f", peak {fx(r['shm_peak_vs_target'])}"
        skipped = "-" if r.get("skipped") is None else f"{r['skipped']} of {r.get('snapshots') or '?'}"
        dcp_loop = "-" if r.get("dcp_loop_blocked_s") is None else \
            f"{fs(r['dcp_loop_blocked_s'])} ({fx(r.get('dcp_loop_overhead_long_ratio'))})"
        t1.append(
            f"| {c}{fail} | {r['state_bytes'] / GB:.3f} GB | **{fs(r.get('blocked_median_s'))}** / "
            f"{fs(r.get('blocked_p99_s'))} | {fx(r.get('overhead_short_x_copy'))} | {fx(r.get('overhead_long_ratio'))}"
            f" | {dcp_loop} | {fs(r.get('local_commit_s'))} | {fs(r.get('group_commit_s'))} | "
            f"{fs(r.get('restore_s'))} ({fmt_gbps(r.get('restore_gbps'))}) | {rb} | {shm} | {skipped} |")
        t2.append(
            f"| {c} | {fs(r.get('torch_save_s'))} | {fs(r.get('torch_load_evicted_s'))} / "
            f"{fs(r.get('torch_load_cached_s'))} | {fs(r.get('dcp_save_s'))} | {fs(r.get('dcp_async_call_s'))} / "
            f"{fs(r.get('dcp_async_total_s'))} | {fx(r.get('vs_torch_save'), 1)} / {fx(r.get('vs_dcp_save'), 1)} / "
            f"{fx(r.get('vs_dcp_async_total'), 1)} | {fx(r.get('vs_dcp_async_blocking'), 0)} / "
            f"{fx(r.get('vs_dcp_loop_blocked'), 0)} | {fx(r.get('vs_torch_load_evicted'), 1)} / "
            f"{fx(r.get('vs_torch_load_cached'), 1)} |")
    notes = [
        "*Trainer blocked*: time the training thread spends in shardkeep calls per step (the `snapshot()` call and "
        "the waits in the forward and optimizer pre-hooks), with compute longer than the copy. *Step overhead*: "
        "the whole step-time cost, which on a CPU-only machine also holds the background copy's contention for "
        "cores and memory bandwidth: with compute < copy as (step with - step without) / one plain `copy_` of "
        "the state measured in the same run, with compute > copy as step with / step without. *dcp.async_save "
        "every step*: the same loop saving with `dcp.async_save` instead (wait for the previous save + the "
        "call), its step time over the loop without checkpointing in brackets. *Group commit*: the future "
        "resolved at group level (erasure-coded across the nodes). *Local restore*: into the existing model and "
        "optimizer (group rows: the lost rank, from its rebuilt node). *Node rebuild*: `shardkeep recover` of a "
        "node lost with its shared memory, bytes fetched / time. */dev/shm target*: slots x S (one node), "
        "slots x S x (1 + m/k) (group), at rest.",
        "Baselines on the same state in the same run (group rows: one node's state). Ratios are baseline time / "
        "shardkeep time (> 1: shardkeep faster); the commit is the local one on single-node rows and the group "
        "one on group rows.",
    ]
    return "\n".join(t1) + "\n\n" + "\n".join(t2) + "\n\n" + "\n\n".join(notes)


def record_section(S: dict, text: str, out_dir: Path) -> str:
    m = S["machine"]
    day = S["date"][:10]

    def rel(p):
        try:
            return str(Path(p).resolve().relative_to(out_dir.resolve()))
        except ValueError:
            return str(p)

    loads = "; ".join(f"{c['name']} {c.get('load_before')} -> {c.get('load_after')}" for c in S["cases"])
    times = ", ".join(f"{c['name']} {fmt_dur(c.get('seconds'))}" for c in S["cases"])
    lines = [
        f"\n## `shardkeep bench` — {day}\n",
        f"Command: `{S['command']}` (JSON in `{rel(S['json'])}`"
        + (f", chart `{rel(S['chart'])}`" if S.get("chart") else "") + ").",
        f"Machine: {machine_line(m)}; {m.get('platform')}.",
        f"Load average (1/5/15 min): {S['load_start']} at start, {S.get('load_end')} at the end; before -> after "
        f"each case: {loads}.",
        f"Time: {times}; {fmt_dur(S.get('seconds'))} in all.\n",
        text,
        "",
    ]
    return "\n".join(lines)


# --- the run ---------------------------------------------------------------------------------------


def run_suite(args: argparse.Namespace) -> int:
    from shardkeep.bench import default_out_dir

    if not args.no_chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(f"shardkeep bench draws its chart with matplotlib, which is not installed: {BENCH_EXTRA_HINT} "
                  f"(or run with --no-chart)", file=sys.stderr)
            return 2
    if not 1 <= args.parity < args.nodes:
        print("shardkeep bench: need 1 <= --parity < --nodes", file=sys.stderr)
        return 2
    cases = plan(args)
    if not cases:
        print("shardkeep bench: no cases (--sizes and --group-sizes are both empty)", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir()
    raw_dir = out_dir / "out"
    raw_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now().astimezone()
    stamp = now.strftime("%Y%m%d-%H%M%S")
    json_path = raw_dir / f"bench-{stamp}.json"
    argv = getattr(args, "argv", None) or sys.argv[1:]
    command = "shardkeep " + shlex.join(a for a in argv if a != "--record")
    S: dict = {"benchmark": "suite", "date": now.isoformat(timespec="seconds"), "command": command,
               "config": {k: v for k, v in vars(args).items() if k not in ("func",) and not callable(v)},
               "machine": machine(), "load_start": loadavg(), "json": str(json_path), "cases": []}
    m = S["machine"]
    est = sum(estimate_s(c, args.quick) for c in cases)
    print(f"shardkeep bench: {len(cases)} case(s), roughly {fmt_dur(est)} on a 2-core machine; {machine_line(m)}; "
          f"load {S['load_start']}", flush=True)
    print(f"  results in {json_path}", flush=True)
    runner = Runner(args.verbose)
    runner.install()
    t_all = time.monotonic()
    rc = 0
    try:
        for i, case in enumerate(cases):
            if runner.stopping is not None:
                case.update(skipped=True, error="not run: interrupted")
                S["cases"].append(case)
                continue
            module = "shardkeep.bench.group" if case["kind"] == "group" else "shardkeep.bench.single_node"
            cj, cl = raw_dir / f"bench-{stamp}-{case['name']}.json", raw_dir / f"bench-{stamp}-{case['name']}.log"
            case["load_before"] = loadavg()
            print(f"[{i + 1}/{len(cases)}] {case['label']} (about {fmt_dur(estimate_s(case, args.quick))}; "
                  f"log {cl})", flush=True)
            case.update(runner.run(case, module, cj, cl))
            case["load_after"] = loadavg()
            case["json"], case["log"] = str(cj), str(cl)
            try:
                case["result"] = json.loads(cj.read_text())
            except (OSError, ValueError) as exc:
                case["result"] = None
                case["error"] = f"no JSON from the case ({type(exc).__name__}); see {cl}"
            ok = case["rc"] == 0 and bool((case.get("result") or {}).get("ok"))
            if not ok:
                rc = 1
            print(f"[{i + 1}/{len(cases)}] {case['label']}: {'done' if ok else 'FAILED'} in "
                  f"{fmt_dur(case['seconds'])}" + ("" if ok else f" (exit status {case['rc']}; see {cl})"),
                  flush=True)
            S["cases"].append(case)
    finally:
        runner.uninstall()
        S["seconds"] = time.monotonic() - t_all
        S["load_end"] = loadavg()
        S["rows"] = [summary_row(c) for c in S["cases"]]
        text = tables(S["rows"])
        S["summary_text"] = text
        if not args.no_chart and any(r.get("state_bytes") is not None for r in S["rows"]):
            try:
                from shardkeep.bench.chart import write_chart

                png = out_dir / f"bench-{stamp}.png"
                write_chart(S["rows"], png, title=chart_title(S))
                shutil.copyfile(png, out_dir / "bench.png")
                S["chart"] = str(png)
            except Exception as exc:  # noqa: BLE001 - the numbers matter more than the picture
                S["chart_error"] = f"{type(exc).__name__}: {exc}"
                rc = rc or 1
        json_path.write_text(json.dumps(S, indent=1, default=str))
        print("\n" + text + "\n", flush=True)
        print(f"results: {json_path}", flush=True)
        if S.get("chart"):
            print(f"chart:   {S['chart']} (and {out_dir / 'bench.png'})", flush=True)
        elif S.get("chart_error"):
            print(f"chart failed: {S['chart_error']}", flush=True)
        if args.record and runner.stopping is None:
            with open(out_dir / "RESULTS.md", "a") as f:
                f.write(record_section(S, text, out_dir))
            print(f"appended to {out_dir / 'RESULTS.md'}", flush=True)
    if runner.stopping is not None:
        return 128 + runner.stopping
    return rc


def chart_title(S: dict) -> str:
    m = S["machine"]
    return (f"shardkeep bench, {S['date'][:10]}: {m.get('cpu_count')} CPU {m.get('cpu_model')}, "
            f"{(m.get('memory_total') or 0) / 2**30:.0f} GiB RAM, torch {m.get('torch')}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardkeep.bench.suite", description=__doc__.split("\n\n")[0])
    add_args(ap)
    args = ap.parse_args(argv)
    args.argv = ["bench", *(sys.argv[1:] if argv is None else argv)]
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
