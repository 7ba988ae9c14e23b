"""The PNG of ``shardkeep bench``: four panels from the summary rows (``suite.summary_row``).

(a) time the training thread is blocked per step, shardkeep against ``dcp.async_save`` every step;
(b) save: snapshot to local / group commit against torch.save + fsync, dcp.save, dcp.async_save;
(c) restore: shardkeep's local restore against torch.load + load_state_dict;
(d) group: snapshot to group commit and node rebuild against the state per node.

matplotlib's object API on the Agg canvas: no display, no pyplot state. Sized for a README (~800 px).
"""

from __future__ import annotations

from pathlib import Path

SK = "#1f6fb4"       # shardkeep
SK2 = "#7fb2e0"      # shardkeep, second series (p99, group commit)
BASE = ["#d62728", "#ff9896", "#8c564b", "#c49c94"]  # baselines


def _short(r: dict) -> str:
    if r["kind"] == "group":
        return f"group {r['nodes']}x\n{r['size_gb']:g} GB"
    return f"single\n{r['size_gb']:g} GB"


def _bars(ax, rows: list[dict], series: list[tuple[str, str, str]], ylabel: str, title: str) -> None:
    """Grouped bars, one group per row, log scale; a missing value leaves a gap."""
    import numpy as np

    x = np.arange(len(rows))
    width = 0.8 / max(1, len(series))
    vals_all = []
    for i, (key, label, color) in enumerate(series):
        vals = [r.get(key) for r in rows]
        ys = [v if v is not None and v > 0 else np.nan for v in vals]
        vals_all += [v for v in ys if v == v]
        pos = x - 0.4 + width * (i + 0.5)
        ax.bar(pos, ys, width * 0.92, label=label, color=color)
        for px, v in zip(pos, ys):
            if v == v:
                ax.annotate(_fmt(v), (px, v), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6.5, rotation=90)
    ax.set_yscale("log")
    if vals_all:
        ax.set_ylim(min(vals_all) / 3, max(vals_all) * 12)
    ax.set_xticks(x)
    ax.set_xticklabels([_short(r) for r in rows], fontsize=8)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper left", ncol=2, frameon=False)


def _fmt(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.3g}ms"
    return f"{s:.2g}s"


def write_chart(rows: list[dict], path: str | Path, title: str = "shardkeep bench") -> Path:
    """Draw the four panels for the rows that have numbers; returns ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    rows = [r for r in rows if r.get("state_bytes") is not None]
    fig = Figure(figsize=(10, 7.6), dpi=120, layout="constrained")
    fig.suptitle(title, fontsize=10.5)
    (a, b), (c, d) = fig.subplots(2, 2)
    secs = FuncFormatter(lambda v, _: _fmt(v))

    _bars(a, rows, [("blocked_median_s", "shardkeep, median", SK), ("blocked_p99_s", "shardkeep, p99", SK2),
                    ("dcp_loop_blocked_s", "dcp.async_save every step", BASE[0])],
          "seconds per step (log)", "(a) training thread blocked per step, compute > copy")
    _bars(b, rows, [("local_commit_s", "shardkeep: snapshot → local commit", SK),
                    ("group_commit_s", "shardkeep: → group commit", SK2),
                    ("torch_save_s", "torch.save + fsync", BASE[0]), ("dcp_save_s", "dcp.save", BASE[2]),
                    ("dcp_async_total_s", "dcp.async_save (total)", BASE[3])],
          "seconds (log)", "(b) save: state to durable (local / group / file)")
    _bars(c, rows, [("restore_s", "shardkeep restore", SK),
                    ("torch_load_evicted_s", "torch.load, file evicted", BASE[0]),
                    ("torch_load_cached_s", "torch.load, page cache", BASE[1])],
          "seconds (log)", "(c) restore into the model and optimizer")
    for ax in (a, b, c):
        ax.yaxis.set_major_formatter(secs)

    groups = sorted((r for r in rows if r["kind"] == "group"), key=lambda r: r["size_gb"])
    d.set_title("(d) group: time to group commit and node rebuild", fontsize=10, loc="left")
    if groups:
        xs = [r["state_bytes"] / 1e9 for r in groups]
        for key, label, color, marker in (("group_commit_s", "snapshot → group commit", SK2, "o"),
                                          ("rebuild_s", "node rebuild (shardkeep recover)", SK, "s"),
                                          ("restore_s", "restore from the rebuilt node", "#2ca02c", "^"),
                                          ("torch_save_s", "torch.save + fsync (one node)", BASE[0], "x")):
            pts = [(x, r.get(key)) for x, r in zip(xs, groups) if r.get(key)]
            if pts:
                d.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
                for x, y in pts:
                    d.annotate(_fmt(y), (x, y), xytext=(4, 2), textcoords="offset points", fontsize=6.5)
        n, m = groups[0]["nodes"], groups[0]["parity"]
        d.set_xlabel(f"state per node, GB (n={n}, m={m}, all nodes on this machine)", fontsize=9)
        d.set_ylabel("seconds (log)", fontsize=9)
        d.set_yscale("log")
        d.yaxis.set_major_formatter(secs)
        d.set_xlim(0, max(xs) * 1.25)
        d.grid(alpha=0.3)
        d.tick_params(labelsize=8)
        d.legend(fontsize=7, loc="upper left", frameon=False)
    else:
        d.text(0.5, 0.5, "no group cases in this run", ha="center", va="center", transform=d.transAxes)
        d.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
