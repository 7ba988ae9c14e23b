"""Human rendering of a daemon's status reply."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table

from shardkeep.proto.sizes import format_size


def plan_advice(st: dict[str, Any]) -> tuple[str, dict | None]:
    """A line of snapshot interval advice (and the whole plan) for a per-node MTBF in $SHARDKEEP_MTBF_HOURS."""
    from . import plan

    raw = os.environ.get("SHARDKEEP_MTBF_HOURS", "")
    if not raw:
        return "interval advice: shardkeep plan --mtbf HOURS --nodes N (or set SHARDKEEP_MTBF_HOURS)", None
    grp = st.get("group")
    if not grp:
        return "interval advice: no group on this daemon; shardkeep plan --mtbf HOURS --nodes N", None
    try:
        inputs = plan.resolve_inputs(float(raw), grp["n"], {}, st)
        inputs.sources.update(mtbf_hours=("env", "SHARDKEEP_MTBF_HOURS"), nodes=("daemon", "the group's n"))
        result = plan.plan(inputs)
    except (ValueError, KeyError, TypeError) as exc:
        return f"interval advice: SHARDKEEP_MTBF_HOURS={raw!r}: {exc}", None
    return plan.status_line(result, f"$SHARDKEEP_MTBF_HOURS={float(raw):g} h per node"), result


def render_status(st: dict[str, Any]) -> None:
    console = Console()
    mem = st.get("memory", {})
    limit = mem.get("limit")
    console.print(
        f"[bold]shardkeepd[/bold] pid {st.get('pid')}  instance {st.get('instance')}  "
        f"up {st.get('uptime_s')} s  socket {st.get('socket')}  prefix {st.get('shm_prefix')}"
    )
    console.print(
        f"memory: {format_size(mem.get('used', 0))} used"
        + (f" of {format_size(limit)}" if limit else "")
        + "; headroom: "
        + ", ".join(f"{k}: {format_size(v)}" for k, v in mem.get("headroom", {}).items())
    )
    console.print(
        f"errors {st.get('errors', 0)}, rate-limited requests {st.get('rate_limited', 0)}, slots adopted "
        f"{st.get('adopted_slots', 0)}, bad slots dropped {st.get('dropped_bad_slots', 0)}"
        + (f"; metrics at {st['metrics']}" if st.get("metrics") else "")
    )
    per = st.get("persist")
    if per:
        newest = ", ".join(f"{j} step {s}" for j, s in sorted(per.get("newest", {}).items())) or "none yet"
        console.print(
            f"persist tier: {per['dir']} every {per['every']} steps, keep {per['keep']}; committed "
            f"{per.get('committed', 0)}, running {per.get('running', 0)}, skipped while busy "
            f"{per.get('skipped_busy', 0)}, failed {per.get('failed', 0)}; newest: {newest}"
            + (f"; last error: {per['last_error']}" if per.get("last_error") else "")
        )
    grp = st.get("group")
    if grp:
        console.print(
            f"group {grp['group']}: node {grp['node']} of {grp['n']}, parity {grp['parity']}, {grp['codec']}, "
            f"generation {grp['generation']}, {grp['security']}"
            + f", coordinator node {grp.get('coordinator', '?')}"
            + (" [bold red]DEGRADED[/bold red]" if grp["degraded"] else " healthy")
        )
        peers = Table(title="peers")
        for col in ("node", "control", "data", "generation", "state", "last seen", "error"):
            peers.add_column(col)
        for p in grp["peers"]:
            peers.add_row(str(p["node"]), p["control"], p["data"] or "-", str(p["generation"]),
                          "[green]up[/green]" if p["up"] else "[red]down[/red]",
                          "-" if p["last_seen_s"] is None else f"{p['last_seen_s']} s ago", p["error"][:60])
        console.print(peers)
        versions = grp.get("versions", [])
        if versions:
            vt = Table(title="group commits (versions this node holds or is committing)")
            for col in ("job", "step", "decision", "acks from", "parity stripes held", "encode"):
                vt.add_column(col)
            for v in versions:
                t = v.get("timing") or {}
                enc = t.get("encode_wall_s")
                vt.add_row(v["job"], str(v["step"]), v.get("decision", "?"), ",".join(map(str, v["acks_from"])),
                           ",".join(map(str, v["parity_stripes"])) or "-",
                           "-" if enc is None else f"{format_size(t.get('encode_in_bytes', 0))} in {enc:.2f} s")
            console.print(vt)
        rec = st.get("recover")
        if rec:
            console.print(f"recover: {rec.get('state')}, stripes {rec.get('stripes_done')}/{rec.get('stripes_total')}, "
                          f"{format_size(rec.get('bytes_fetched', 0))} fetched")
    console.print(plan_advice(st)[0], highlight=False, markup=False, soft_wrap=True)
    jobs = st.get("jobs", [])
    if not jobs:
        console.print("no jobs")
        return
    table = Table(title="jobs")
    for col in ("job", "ranks", "newest restorable", "restorable steps", "group level", "commits", "skips",
                "memory", "idle"):
        table.add_column(col)
    for j in jobs:
        ranks = j.get("ranks", {})
        table.add_row(
            j["job"],
            f"{len(ranks)}/{j.get('local_world_size')} local, world {j.get('world_size')}",
            str(j.get("newest")),
            ", ".join(map(str, j.get("restorable", []))),
            str((j.get("group_committed") or ["-"])[0]) if grp else "n/a",
            str(j.get("commits")),
            str(j.get("skips")),
            format_size(j.get("bytes", 0)),
            f"{j.get('idle_s')} s",
        )
    console.print(table)
