"""Snapshot interval and group-size advice: the arithmetic behind ``shardkeep plan`` (no I/O here).

Failures are independent and exponential: each node fails at rate
``lam = 1 / mtbf`` (``mtbf`` per node, seconds), so a job on ``N`` nodes sees a
failure every ``M = mtbf / N`` on average (the *system* MTBF). Every failure is
taken to be the loss of a whole node, the expensive case (a process crash
costs less and is shown beside it).

**Interval** (Young 1974, Daly 2006). A checkpoint costs ``C`` seconds of
training time (for shardkeep: the trainer's blocked time plus the slowdown of
the step by the background copy; for a disk checkpoint: the save). Young's
interval is ``sqrt(2 C M)``; Daly's higher-order one is::

    tau = sqrt(2 C M) * [1 + (1/3) sqrt(C / (2M)) + (1/9) (C / (2M))] - C   for C < 2M, else M

**Waste** (first order, as in Daly's paper), the expected fraction of time
lost, with checkpoints every ``tau`` seconds of work::

    waste = C / tau + ((D + C) / 2 + L + R) / M

``C / tau`` is the checkpoints' own cost. The rest is the work lost per
failure, divided by the time between failures: a failure falls uniformly
within a period of ``D + C`` (``D`` the spacing of checkpoints that
*survive the failure*), so on average half of it is lost; ``L`` is how long
after it starts a checkpoint is durable; ``R`` the time to restart from it.
A disk checkpoint blocks training (``L = 0``, ``D = tau``) and ``R`` is the
load from disk; this is then exactly the model of Young and Daly. A shardkeep
snapshot is asynchronous: it survives a node loss only once it has reached
group level, ``L`` = the group-commit latency after ``snapshot()``, and a
snapshot that arrives while the previous one is still being group-committed
is skipped (two slots), so group-level versions come every
``D = tau * ceil(L / tau)`` (never closer than ``L``); ``R`` = rebuild of the
lost node + restore. For a process crash the local commit counts instead
(``L`` = snapshot() to local commit, ``R`` = restore). ``L`` and ``R`` do not
move the optimum (they add a constant), so Daly's interval stands for both.
The lost work per failure is ``(D + C) / 2 + L + R``. The job's own restart
(processes, rendezvous) is the same for both and left out. First order: good
while ``tau + R`` is well below ``M``.

**Data loss** in a group of ``n`` nodes with parity ``m`` (any ``m`` nodes can
be lost): a lost node's data is missing for a window ``W`` (detection +
replacement + rebuild). A node fails within a given window of length ``W``
with ``p = 1 - exp(-W / mtbf)``; more than ``m`` of the ``n`` fail within
one window with::

    P(> m of n in W) = sum_{j > m} C(n, j) p^j (1 - p)^(n - j)

summed term by term (each term positive, computed in log space, fsum), never
as ``1 -`` the complement, so it stays accurate for ``p`` of 1e-12 and below.

The group loses data when ``m`` more of its nodes fail while a first one is
still missing. Derivation, rebuild windows of fixed length ``W``: take the
*earliest* failure of such a cluster of failures, at rate ``n lam`` per group.
Its node is back at ``+W``; every later failure in the cluster happens before
that and its own window reaches beyond it, so the ``m + 1`` nodes are all down
at once exactly when at least ``m`` of the other ``n - 1`` fail within
``(0, W]`` after it. Hence, per group::

    rate ~= n * lam * P(Bin(n - 1, p) >= m)

(for ``m = 1``: ``n (n - 1) lam^2 W``, the textbook RAID-5 ``1/MTTDL``; for
``m = 2``: ``n (n-1) (n-2) lam^3 W^2 / 2``). It counts a cluster once by its
first failure and leaves out clusters of clusters: first order, good while
``n p`` is well below 1. The job has ``N / n`` groups, so across the job::

    loss events per year ~= N * lam * P(Bin(n - 1, p) >= m) * seconds per year

The rebuild fetches about ``n * S`` bytes (``k`` fragments for each of the
``k`` data stripes of the node's own data, ``S`` per parity stripe), so when it
is not given a rebuild time scales with ``n`` (and the window with it).

**Defaults** (when neither a flag nor a running daemon gives a value) come
from benchmarks/RESULTS.md, measured on a 2-core VM where the daemons, codec
workers and trainers share two cores: slow for a real cluster, so pass your
own measurements. They scale with the state per node ``S`` (default 1.6 GB,
the single-node benchmark's): restore at 10.9 GB/s (1.6 GB in 148 ms),
snapshot() to local commit at 12.6 GB/s (127 ms), group commit at 0.17 GB/s
per node (0.403 GB per node reached group level 2.37 s after snapshot(),
median, n=4 m=1), rebuild fetching ``n * S`` at 0.244 GB/s (1.612 GB in
6.60 s), ``torch.save`` + fsync at 1.29 GB/s (1.24 s) and ``torch.load``
(file evicted) + ``load_state_dict`` at 1.58 GB/s (1.01 s). The snapshot cost
is 4.8 ms: a 240 ms step ran 1.02x as long with a snapshot every step (0.6 ms
of it blocked in shardkeep); the step time 0.24 s is that run's.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

SECONDS_PER_HOUR = 3600.0
SECONDS_PER_YEAR = 365.25 * 86400.0

# benchmarks/RESULTS.md (see the module docstring); bytes per second
DEFAULT_STATE_BYTES = 1.6e9
RESTORE_RATE = 10.9e9
LOCAL_COMMIT_RATE = 1.6e9 / 0.127
GROUP_COMMIT_RATE = 0.403e9 / 2.37
REBUILD_RATE = 1.612e9 / 6.60
DISK_SAVE_RATE = 1.6e9 / 1.24
DISK_LOAD_RATE = 1.6e9 / 1.01
DEFAULT_SNAPSHOT_COST = 0.0048
DEFAULT_STEP_TIME = 0.24
DEFAULT_DETECTION = 5.0  # the daemons' default peer-down timeout (Timeouts.peer_down)
DEFAULT_GROUP = (4, 1)

#: the (n, m) choices of the table (plus the plan's own)
TABLE_SIZES = (4, 6, 8, 12, 16)
TABLE_PARITIES = (1, 2, 3)


# --- the formulas ------------------------------------------------------------------------

def young_interval(cost: float, mtbf: float) -> float:
    """Young's checkpoint interval ``sqrt(2 C M)`` (seconds of work between checkpoints)."""
    return math.sqrt(2.0 * cost * mtbf)


def daly_interval(cost: float, mtbf: float) -> float:
    """Daly's (2006) higher-order optimum; ``M`` itself once the cost reaches ``2 M``."""
    if cost >= 2.0 * mtbf:
        return mtbf
    x = cost / (2.0 * mtbf)
    return math.sqrt(2.0 * cost * mtbf) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - cost


def durable_spacing(interval: float, latency: float) -> float:
    """Spacing of versions that reach durability ``latency`` after they start, taken every ``interval``.

    A snapshot that arrives while the previous one is still in flight is skipped, so it is the
    first multiple of ``interval`` that is at least ``latency`` (at least one interval).
    """
    if latency <= interval:
        return interval
    return interval * math.ceil(latency / interval - 1e-9)


def lost_work(spacing: float, cost: float, restart: float, latency: float = 0.0) -> float:
    """Expected seconds lost per failure: half a period, the durability latency, the restart."""
    return (spacing + cost) / 2.0 + latency + restart


def waste_fraction(interval: float, cost: float, restart: float, mtbf: float, latency: float = 0.0,
                   spacing: float | None = None) -> float:
    """``C / tau + ((D + C) / 2 + L + R) / M`` with ``D = spacing`` (default ``tau``)."""
    d = interval if spacing is None else spacing
    return cost / interval + lost_work(d, cost, restart, latency) / mtbf


def node_failure_probability(window: float, mtbf: float) -> float:
    """Probability that one node fails within ``window`` seconds: ``1 - exp(-W / mtbf)``, accurate when tiny."""
    return -math.expm1(-window / mtbf)


def binomial_tail(n: int, p: float, at_least: int) -> float:
    """``P(X >= at_least)`` for ``X ~ Bin(n, p)``, as a sum of positive terms (no cancellation for tiny p)."""
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if at_least <= 0:
        return 1.0
    if at_least > n or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.exp(math.log(math.comb(n, j)) + j * lp + (n - j) * lq) for j in range(at_least, n + 1)]
    return min(1.0, math.fsum(terms))


def loss_in_window(n: int, m: int, window: float, mtbf: float) -> float:
    """Probability that more than ``m`` of a group's ``n`` nodes fail within one window of ``window`` s."""
    return binomial_tail(n, node_failure_probability(window, mtbf), m + 1)


def loss_events_per_year(nodes: float, n: int, m: int, window: float, mtbf: float) -> float:
    """Expected data-losing events per year over ``nodes / n`` groups: ``N lam P(Bin(n-1, p) >= m)`` (see above)."""
    p = node_failure_probability(window, mtbf)
    return nodes / mtbf * binomial_tail(n - 1, p, m) * SECONDS_PER_YEAR


# --- inputs ------------------------------------------------------------------------------

#: input name -> (command-line flag, what it is)
INPUTS = {
    "mtbf_hours": ("--mtbf", "per-node MTBF, hours"),
    "nodes": ("--nodes", "nodes in the job"),
    "group_size": ("--group-size", "nodes per group, n"),
    "parity": ("--parity", "parity nodes per group, m"),
    "state_bytes": ("--state-size", "state per node (all its ranks)"),
    "snapshot_cost": ("--snapshot-cost", "training time lost per snapshot"),
    "step_time": ("--step-time", "training step"),
    "commit_latency": ("--commit-latency", "snapshot() to group level"),
    "local_latency": ("", "snapshot() to local commit"),
    "restore": ("--restore", "restore from memory"),
    "rebuild": ("--rebuild", "rebuild of a lost node"),
    "window": ("--window", "rebuild window: loss to rebuilt"),
    "disk_save": ("--disk-save", "checkpoint to disk"),
    "disk_load": ("--disk-load", "restart from disk"),
}


@dataclass
class PlanInputs:
    """Everything ``plan`` needs; times in seconds. ``sources``: input -> (flag|daemon|default, detail)."""

    mtbf_hours: float
    nodes: int
    group_size: int
    parity: int
    state_bytes: float
    snapshot_cost: float
    step_time: float
    commit_latency: float
    local_latency: float
    restore: float
    rebuild: float
    window: float
    disk_save: float
    disk_load: float
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def mtbf(self) -> float:
        """Per-node MTBF in seconds."""
        return self.mtbf_hours * SECONDS_PER_HOUR

    def validate(self) -> None:
        """Raise ValueError naming the flag of the first bad input."""
        def flag(name: str) -> str:
            return INPUTS[name][0] or name

        for name in INPUTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{flag(name)} must be a finite number, not {v!r}")
        for name in ("mtbf_hours", "state_bytes", "snapshot_cost", "step_time", "window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)} must be > 0, not {getattr(self, name):g}")
        for name in ("commit_latency", "local_latency", "restore", "rebuild", "disk_save", "disk_load"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0, not {getattr(self, name):g}")
        if self.disk_save <= 0:
            raise ValueError(f"--disk-save must be > 0, not {self.disk_save:g}")
        for name in ("nodes", "group_size", "parity"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"{flag(name)} must be a whole number, not {getattr(self, name)!r}")
        if self.nodes < 2:
            raise ValueError(f"--nodes must be >= 2, not {self.nodes}: a group spans nodes (a single node is "
                             "protected against process crashes only)")
        n, m = self.group_size, self.parity
        if n < 2:
            raise ValueError(f"--group-size must be >= 2, not {n}")
        if not 0 < m < n:
            raise ValueError(f"--parity must be between 1 and --group-size - 1 = {n - 1}, not {m}")
        if n > self.nodes:
            where = self.sources.get("group_size", ("flag", ""))[0]
            raise ValueError(f"the group size n={n}" + ("" if where == "flag" else f" (from the {where})")
                             + f" is more than --nodes {self.nodes}: a group is n distinct nodes (pass --group-size)")


def _median_commit_latency(grp: dict) -> tuple[float, int] | None:
    lat = [c["since_start_s"] for c in grp.get("recent_commits") or []
           if isinstance(c, dict) and c.get("decision") == "commit" and isinstance(c.get("since_start_s"), (int, float))]
    return (statistics.median(lat), len(lat)) if lat else None


def _state_per_node(st: dict) -> tuple[float, str] | None:
    """The largest job's payload on this node: one slot per local rank."""
    best: tuple[float, str] | None = None
    for j in st.get("jobs") or []:
        ranks = j.get("ranks") or {}
        size = sum(max((s.get("bytes") or 0 for s in r.get("slots") or []), default=0) for r in ranks.values())
        if size > 0 and (best is None or size > best[0]):
            best = (float(size), f"job {j.get('job')}, {len(ranks)} rank(s) on this node")
    return best


def from_status(st: dict | None) -> dict[str, tuple[float, str]]:
    """What a daemon's status reply measures: input -> (value, detail). Empty without a reply."""
    out: dict[str, tuple[float, str]] = {}
    if not st:
        return out
    grp = st.get("group")
    if grp and isinstance(grp.get("n"), int) and isinstance(grp.get("parity"), int):
        out["group_size"] = (grp["n"], f"the daemon's group {grp.get('group', '')}".rstrip())
        out["parity"] = (grp["parity"], "the daemon's group")
        lat = _median_commit_latency(grp)
        if lat is not None:
            out["commit_latency"] = (lat[0], f"median local commit -> group level of {lat[1]} recent versions")
    size = _state_per_node(st)
    if size is not None:
        out["state_bytes"] = size
    rec = st.get("recover")
    if isinstance(rec, dict) and rec.get("state") == "done" and isinstance(rec.get("seconds"), (int, float)):
        out["rebuild"] = (float(rec["seconds"]), f"this node's last recover: {rec.get('bytes_fetched', 0) / 1e9:.3g} GB "
                                                 f"fetched in {rec['seconds']:g} s")
    return out


def resolve_inputs(mtbf_hours: float, nodes: int, flags: dict[str, float | None],
                   status: dict | None = None) -> PlanInputs:
    """Each input from its flag, else the daemon's status, else a default (``sources`` says which)."""
    measured = from_status(status)
    src: dict[str, tuple[str, str]] = {"mtbf_hours": ("flag", ""), "nodes": ("flag", "")}
    val: dict[str, Any] = {"mtbf_hours": mtbf_hours, "nodes": nodes}

    def pick(name: str, default: Any, detail: str) -> Any:
        if flags.get(name) is not None:
            val[name], src[name] = flags[name], ("flag", "")
        elif name in measured:
            val[name], src[name] = measured[name][0], ("daemon", measured[name][1])
        else:
            val[name], src[name] = default, ("default", detail)
        return val[name]

    n = pick("group_size", min(DEFAULT_GROUP[0], nodes), "")
    pick("parity", DEFAULT_GROUP[1], "")
    size = pick("state_bytes", DEFAULT_STATE_BYTES, "RESULTS.md single-node run")
    size_source = "daemon" if src["state_bytes"][0] == "daemon" else "default"

    def scaled(name: str, nbytes: float, rate: float, what: str) -> None:
        pick(name, nbytes / rate, "")
        if src[name][0] == "default":  # derived from the state per node, wherever that came from
            src[name] = (size_source, f"{nbytes / 1e9:.3g} GB at {rate / 1e9:.3g} GB/s, RESULTS.md {what}")

    pick("snapshot_cost", DEFAULT_SNAPSHOT_COST, "RESULTS.md: 240 ms steps took 1.02x with a snapshot each")
    pick("step_time", DEFAULT_STEP_TIME, "RESULTS.md single-node run")
    scaled("commit_latency", size, GROUP_COMMIT_RATE, "group run")
    scaled("local_latency", size, LOCAL_COMMIT_RATE, "single-node run")
    scaled("restore", size, RESTORE_RATE, "warm restore")
    scaled("rebuild", n * size, REBUILD_RATE, "recover, n x S fetched")
    pick("window", DEFAULT_DETECTION + val["rebuild"],
         f"peer-down {DEFAULT_DETECTION:g} s + rebuild: a spare node standing by")
    scaled("disk_save", size, DISK_SAVE_RATE, "torch.save + fsync")
    scaled("disk_load", size, DISK_LOAD_RATE, "torch.load, file evicted")
    return PlanInputs(**val, sources=src)


# --- the plan ----------------------------------------------------------------------------

def _scenario(interval: float, step: float, cost: float, mtbf_sys: float, node_restart: float,
              node_latency: float, crash: tuple[float, float] | None) -> dict:
    spacing = durable_spacing(interval, node_latency)
    out = {
        "interval_s": interval,
        "interval_steps": interval / step,
        "durable_spacing_s": spacing,
        "overhead_fraction": cost / interval,
        "waste_fraction": waste_fraction(interval, cost, node_restart, mtbf_sys, node_latency, spacing),
        "lost_work_node_loss_s": lost_work(spacing, cost, node_restart, node_latency),
    }
    if crash is not None:
        latency, restart = crash
        out["lost_work_crash_s"] = lost_work(durable_spacing(interval, latency), cost, restart, latency)
    return out


def group_row(inp: PlanInputs, n: int, m: int) -> dict:
    """One (n, m) choice: memory, window, loss probability per window, loss events per year."""
    window = inp.window
    if inp.sources.get("window", ("default",))[0] != "flag":
        # detection + a rebuild that fetches about n * S: scale the rebuild with n
        window = inp.window - inp.rebuild + inp.rebuild * n / inp.group_size
    rate = loss_events_per_year(inp.nodes, n, m, window, inp.mtbf)
    return {
        "n": n, "m": m, "k": n - m, "memory_factor": 1.0 + m / (n - m), "window_s": window,
        "p_node_in_window": node_failure_probability(window, inp.mtbf),
        "p_loss_in_window": loss_in_window(n, m, window, inp.mtbf),
        "loss_events_per_year": rate,
        "years_between_losses": (1.0 / rate) if rate > 0 else None,
        "chosen": (n, m) == (inp.group_size, inp.parity),
    }


def plan(inp: PlanInputs) -> dict:
    """The advice for ``inp`` (validated here) as a JSON-able dict."""
    inp.validate()
    msys = inp.mtbf / inp.nodes
    daly = daly_interval(inp.snapshot_cost, msys)
    steps = max(1, round(daly / inp.step_time))
    node_restart = inp.rebuild + inp.restore
    crash = (inp.local_latency, inp.restore)
    advised = _scenario(steps * inp.step_time, inp.step_time, inp.snapshot_cost, msys, node_restart,
                        inp.commit_latency, crash)
    every = _scenario(inp.step_time, inp.step_time, inp.snapshot_cost, msys, node_restart, inp.commit_latency, crash)
    disk_tau = daly_interval(inp.disk_save, msys)
    disk = _scenario(disk_tau, inp.step_time, inp.disk_save, msys, inp.disk_load, 0.0, None)
    rows = [group_row(inp, n, m)
            for n in sorted(set(TABLE_SIZES) | {inp.group_size}) if n <= inp.nodes
            for m in sorted(set(TABLE_PARITIES) | {inp.parity}) if m < n
            if (n in TABLE_SIZES and m in TABLE_PARITIES) or (n, m) == (inp.group_size, inp.parity)]
    chosen = next(r for r in rows if r["chosen"])
    return {
        "inputs": {k: v for k, v in asdict(inp).items() if k != "sources"},
        "sources": {k: {"source": s, "detail": d} for k, (s, d) in inp.sources.items()},
        "system_mtbf_s": msys,
        "interval": {"young_s": young_interval(inp.snapshot_cost, msys), "daly_s": daly, "steps": steps,
                     "advised_s": steps * inp.step_time},
        "shardkeep_advised": advised,
        "shardkeep_every_step": every,
        "disk": {**disk, "young_s": young_interval(inp.disk_save, msys), "daly_s": disk_tau},
        "group": chosen,
        "table": rows,
    }


# --- text --------------------------------------------------------------------------------

def fmt_seconds(x: float) -> str:
    if x < 1.0:
        return f"{x * 1000:.3g} ms"
    if x < 100.0:
        return f"{x:.3g} s"
    if x < 2 * 86400.0:
        return f"{x:,.0f} s" if x < 7200.0 else f"{x / 3600:.1f} h"
    return f"{x / 86400:.1f} d"


def _pct(x: float) -> str:
    return f"{x * 100:.3g}%"


def _years(x: float | None) -> str:
    if x is None:
        return "never"
    return f"{x:.3g}"


def render(result: dict) -> str:
    """The human report of ``plan()``."""
    inp, src = result["inputs"], result["sources"]
    msys = result["system_mtbf_s"]
    lines = [f"shardkeep plan: {inp['nodes']} nodes, MTBF {inp['mtbf_hours']:g} h per node: a failure somewhere "
             f"in the job every {msys / 3600:.3g} h ({msys:,.0f} s)"]
    d = result.get("daemon")
    if d:
        lines.append(f"daemon at {d['socket']}: " + ("answered" if d["answered"] else f"none ({d['error']})"))
    lines += ["", "inputs (from: flag, daemon or default)"]

    def row(name: str, value: str) -> None:
        s = src.get(name, {"source": "flag", "detail": ""})
        detail = f" ({s['detail']})" if s["detail"] else ""
        lines.append(f"  {INPUTS[name][1]:<34} {value:>10}  {s['source']}{detail}")

    row("group_size", str(inp["group_size"]))
    row("parity", str(inp["parity"]))
    row("state_bytes", f"{inp['state_bytes'] / 1e9:.3g} GB")
    for name in ("snapshot_cost", "step_time", "local_latency", "commit_latency", "restore", "rebuild", "window",
                 "disk_save", "disk_load"):
        row(name, fmt_seconds(inp[name]))
    iv = result["interval"]
    adv, every, disk = result["shardkeep_advised"], result["shardkeep_every_step"], result["disk"]
    lines += [
        "",
        f"advice: snapshot every {iv['steps']} step(s) = {fmt_seconds(iv['advised_s'])} "
        f"(Daly {fmt_seconds(iv['daly_s'])}, Young {fmt_seconds(iv['young_s'])})",
        "",
        f"  {'':<26} {'interval':>10} {'group-level':>12} {'waste':>8} {'lost work per':>14} {'per process':>12}",
        f"  {'':<26} {'':>10} {'every':>12} {'':>8} {'node loss':>14} {'crash':>12}",
    ]
    for label, sc in (("shardkeep, advised", adv), ("shardkeep, every step", every),
                      ("disk checkpoint (Daly)", disk)):
        lines.append(f"  {label:<26} {fmt_seconds(sc['interval_s']):>10} "
                     f"{fmt_seconds(sc['durable_spacing_s']) if sc is not disk else '-':>12} "
                     f"{_pct(sc['waste_fraction']):>8} {fmt_seconds(sc['lost_work_node_loss_s']):>14} "
                     f"{fmt_seconds(sc['lost_work_crash_s']) if 'lost_work_crash_s' in sc else '-':>12}")
    lines += [
        "",
        f"data loss: more than m of a group's n nodes lost within one rebuild window "
        f"({inp['nodes']} nodes in groups of n)",
        f"  {'n':>3} {'m':>2} {'memory':>7} {'window':>9} {'P(>m lost in a window)':>23} "
        f"{'loss events/year':>17} {'years between':>14}",
    ]
    for r in result["table"]:
        lines.append(f"  {r['n']:>3} {r['m']:>2} {r['memory_factor']:>6.2f}x {fmt_seconds(r['window_s']):>9} "
                     f"{r['p_loss_in_window']:>23.2e} {r['loss_events_per_year']:>17.2e} "
                     f"{_years(r['years_between_losses']):>14}" + ("  <- this plan" if r["chosen"] else ""))
    lines.append("  memory: shared memory per node per slot, as a multiple of the state (1 + m/k)")
    return "\n".join(lines) + "\n"


def status_line(result: dict, mtbf_from: str) -> str:
    """One line of interval advice for ``shardkeep status``."""
    iv, adv, disk, g = result["interval"], result["shardkeep_advised"], result["disk"], result["group"]
    measured = any(s["source"] == "daemon" for k, s in result["sources"].items() if k not in ("group_size", "parity"))
    return (f"advice ({mtbf_from}, {result['inputs']['nodes']} nodes"
            + ("" if measured else ", nothing measured yet") + "): snapshot every "
            f"{fmt_seconds(iv['daly_s'])}; lost per node loss {fmt_seconds(adv['lost_work_node_loss_s'])} "
            f"vs {fmt_seconds(disk['lost_work_node_loss_s'])} from disk; P(>{g['m']} of {g['n']} lost in "
            f"{fmt_seconds(g['window_s'])}) {g['p_loss_in_window']:.1e} (shardkeep plan)")
