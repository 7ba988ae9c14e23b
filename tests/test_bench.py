"""`shardkeep bench`: the summary table and chart from results, the CLI, and one tiny end-to-end run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shardkeep_cmd
from shardkeep.bench import suite

SHM = Path("/dev/shm")


def _tf(save, evicted, cached):
    return {"save": {"total_s": {"median": save}}, "load_evicted": {"total_s": {"median": evicted}},
            "load_cached": {"total_s": {"median": cached}}}


def _dcp(save, call, total):
    return {"save": {"median": save}, "async_call": {"median": call}, "async_total": {"median": total}}


def synthetic_cases() -> list[dict]:
    """The parts of single_node's and group's JSON that the summary reads, with round numbers."""
    long_recs = ([{"warmup": True, "blocked_s": 5.0}] + [{"warmup": False, "blocked_s": 0.0006}] * 98
                 + [{"warmup": False, "blocked_s": 0.002}] * 2)
    single = {
        "ok": True,
        "state": {"bytes": {"total": 1.6e9}, "snapshot_bytes": 1_600_000_000},
        "calibration": {"t_copy_s": 0.1},
        "summary": {"shardkeep_long": {"blocked_s": {"median": 0.0006}, "commit_latency_s": {"median": 0.13},
                                       "skipped": 1},
                    "shardkeep_short": {"step_s": {"median": 0.25}, "skipped": 2},
                    "baseline_short": {"step_s": {"median": 0.05}},
                    "dcp_long": {"blocked_s": {"median": 2.5}}},
        "ratios": {"step_overhead_shardkeep_long": 1.02, "step_overhead_shardkeep_short": 5.0,
                   "step_overhead_dcp_long": 11.3},
        "loops": {"shardkeep_long_r0": {"records": long_recs}, "shardkeep_short_r0": {"records": [{}] * 20}},
        "restore": {"warm": {"s": {"median": 0.15}, "gbps": 10.9}},
        "shm": {"bytes": 3.2e9, "target": 3.2e9},
        "torch_file": _tf(1.3, 1.0, 0.75),
        "dcp": _dcp(1.34, 0.9, 2.6),
    }
    group = {
        "ok": True,
        "state": {"bytes": {"total": 0.4e9}, "payload_bytes": 400_000_000},
        "calibration": {"t_copy_s": 0.02},
        "analysis": {
            "train_long": {"blocked": {"median": 0.0006, "p99": 0.03}, "overhead": 2.67, "to_group": {"median": 2.37},
                           "local_commit": {"median": 0.2}, "status": {"skipped": 276, "taken": 328},
                           "dcp": {"blocked": {"median": 1.5}, "overhead": 8.0}},
            "train_short": {"overhead_vs_copy": 1.53, "overhead": 2.79, "status": {"skipped": 936, "taken": 968}},
            "recover": {"curve": {"daemon_s": 6.6, "gbps": 0.24, "bytes_fetched": 1.6e9, "verified": True}},
            "shm": {"per_node": {"p0": {"rest": 0.941e9}, "p1": {"rest": 0.94e9}}, "rest_max_vs_target": 0.88,
                    "peak_max_vs_target": 1.06},
        },
        "modes": {"curve": {"verify": {"restore_info": {"seconds": 0.125, "bytes": 400_000_000}}}},
        "baselines": {"torch_file": _tf(0.4, 0.3, 0.2), "dcp": _dcp(0.45, 0.3, 0.9)},
    }
    return [
        {"kind": "single", "size_gb": 1.6, "nodes": 1, "parity": 0, "name": "single-1.6GB",
         "label": "single node, 1.6 GB", "rc": 0, "seconds": 200.0, "result": single},
        {"kind": "group", "size_gb": 0.4, "nodes": 4, "parity": 1, "name": "group4m1-0.4GB",
         "label": "group n=4 m=1, 0.4 GB/node", "rc": 0, "seconds": 300.0, "result": group},
        {"kind": "single", "size_gb": 0.5, "nodes": 1, "parity": 0, "name": "single-0.5GB",
         "label": "single node, 0.5 GB", "rc": 1, "seconds": 3.0, "result": None, "error": "no JSON from the case"},
    ]


def test_summary_rows_and_tables():
    rows = [suite.summary_row(c) for c in synthetic_cases()]
    s, g, bad = rows
    assert s["ok"] and g["ok"] and not bad["ok"]
    assert s["blocked_p99_s"] == pytest.approx(0.002)          # measured steps only, warm-up left out
    assert s["overhead_short_x_copy"] == pytest.approx(2.0)    # (0.25 - 0.05) / 0.1
    assert s["vs_torch_save"] == pytest.approx(10.0)           # torch.save 1.3 s / local commit 0.13 s
    assert s["vs_torch_load_evicted"] == pytest.approx(1.0 / 0.15)
    assert s["skipped"] == 3 and s["snapshots"] == 121
    assert s["shm_vs_target"] == pytest.approx(1.0)
    assert g["commit_s"] == pytest.approx(2.37)                # a group's commit is the group-level one
    assert g["vs_torch_save"] == pytest.approx(0.4 / 2.37)
    assert g["restore_gbps"] == pytest.approx(3.2)             # 0.4 GB in 0.125 s
    assert g["skipped"] == 1212 and g["snapshots"] == 1296
    assert g["shm_per_node_bytes"] == pytest.approx(0.941e9)

    text = suite.tables(rows)
    lines = text.splitlines()
    single_rows = [ln for ln in lines if ln.startswith("| single 1.6 GB |")]
    group_rows = [ln for ln in lines if ln.startswith("| group 4x0.4 GB (m=1) |")]
    assert len(single_rows) == 2 and len(group_rows) == 2      # one row per case in each of the two tables
    assert "**600 us** / 2.00 ms" in single_rows[0] and "| 2.00x | 1.02x |" in single_rows[0]
    assert "2.50 s (11.30x)" in single_rows[0] and "150 ms (10.90 GB/s)" in single_rows[0]
    assert "3.200 GB (1.00x)" in single_rows[0] and "3 of 121" in single_rows[0]
    assert "| 1.30 s | 1.00 s / 750 ms | 1.34 s | 900 ms / 2.60 s | 10.0x / 10.3x / 20.0x |" in single_rows[1]
    assert "| 1500x / 4167x | 6.7x / 5.0x |" in single_rows[1]
    assert "**600 us** / 30.0 ms" in group_rows[0] and "| 1.53x | 2.67x |" in group_rows[0]
    assert "| 200 ms | 2.37 s |" in group_rows[0] and "6.60 s (0.24 GB/s)" in group_rows[0]
    assert "0.941 GB (0.88x), peak 1.06x" in group_rows[0] and "1212 of 1296" in group_rows[0]
    assert any(ln.startswith("| single 0.5 GB | failed: no JSON from the case |") for ln in lines)
    # every table line has as many cells as its header
    for table in text.split("\n\n")[:2]:
        tl = table.splitlines()
        assert len({ln.count("|") for ln in tl}) == 1, tl


def test_record_section_names_the_command_machine_and_load(tmp_path):
    S = {"date": "2026-12-01T10:00:00+00:00", "command": "shardkeep bench --quick",
         "machine": {"cpu_count": 2, "cpu_model": "AMD EPYC", "memory_total": 24 * 2**30, "kernel": "6.18",
                     "python": "3.11.7", "torch": "2.13.0+cpu", "platform": "Linux-6.18"},
         "load_start": [0.2, 0.3, 0.4], "load_end": [1.0, 0.5, 0.4], "seconds": 400.0,
         "json": str(tmp_path / "out" / "bench-x.json"), "chart": str(tmp_path / "bench-x.png"),
         "cases": [{"name": "single-0.1GB", "seconds": 61.0, "load_before": [0.2], "load_after": [0.9]}]}
    sec = suite.record_section(S, "TABLES", tmp_path)
    assert "## `shardkeep bench` — 2026-12-01" in sec and "`shardkeep bench --quick`" in sec
    assert "`out/bench-x.json`" in sec and "`bench-x.png`" in sec
    assert "2 CPU AMD EPYC, 24.0 GiB RAM, Linux 6.18, Python 3.11.7, torch 2.13.0+cpu" in sec
    assert "[0.2, 0.3, 0.4] at start" in sec and "single-0.1GB 1m01s" in sec and "TABLES" in sec


def test_chart_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    from shardkeep.bench.chart import write_chart

    rows = [suite.summary_row(c) for c in synthetic_cases()]
    out = write_chart(rows, tmp_path / "sub" / "bench.png", title="test chart")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    only_single = [r for r in rows if r["kind"] == "single"]   # no group panel data: still a chart
    assert write_chart(only_single, tmp_path / "single.png").stat().st_size > 10_000


def test_plan_of_the_default_and_quick_suites():
    import argparse

    p = argparse.ArgumentParser()
    suite.add_args(p)
    full = suite.plan(p.parse_args([]))
    assert [(c["kind"], c["size_gb"]) for c in full] == [("single", 0.1), ("single", 0.5), ("single", 1.6),
                                                         ("group", 0.1), ("group", 0.4)]
    assert full[2]["args"][:4] == ["--size", "1.6", "--width", "4096"]
    assert full[4]["args"][:6] == ["--size", "0.4", "--nodes", "4", "--parity", "1"]
    quick = suite.plan(p.parse_args(["--quick"]))
    assert [(c["kind"], c["size_gb"]) for c in quick] == [("single", 0.1), ("group", 0.1)]
    assert all("--quick" in c["args"] for c in quick)
    none = suite.plan(p.parse_args(["--group-sizes", "none", "--sizes", "0.2", "--single-args=--steps 3"]))
    assert [c["name"] for c in none] == ["single-0.2GB"] and none[0]["args"][-2:] == ["--steps", "3"]


def test_cli_lists_bench_and_explains_a_missing_matplotlib(tmp_path):
    r = subprocess.run(shardkeep_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "bench" in r.stdout
    r = subprocess.run(shardkeep_cmd("bench", "--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--group-sizes" in r.stdout and "--record" in r.stdout
    blocked = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'matplotlib':\n"
        "            raise ImportError('matplotlib is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from shardkeep.daemon.cli import main\n"
        f"sys.exit(main(['bench', '--quick', '--out-dir', {str(tmp_path)!r}]))\n"
    )
    r = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "pip install 'shardkeep[bench]'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_end_to_end_tiny(tmp_path):
    """The CLI with the smallest settings: one single-node and one group case, about a minute."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "res"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run(
        shardkeep_cmd("bench", "--sizes", "0.02", "--group-sizes", "0.01", "--out-dir", str(out), "--tmp-dir",
                      str(tmp), "--record",
                      "--single-args=--width 1024 --steps 2 --rounds 1 --reps 1 --disk-reps 1",
                      "--group-args=--quick --width 1024 --modes curve --steps 2 --short-steps 2 --base-steps 2 "
                      "--dcp-steps 1"),
        capture_output=True, text=True, timeout=400, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[1/2] single node, 0.02 GB" in r.stdout and "[2/2] group n=4 m=1, 0.01 GB/node: done" in r.stdout
    (js,) = (out / "out").glob("bench-????????-??????.json")
    S = json.loads(js.read_text())
    assert {"date", "command", "machine", "cases", "rows", "summary_text", "chart", "load_start"} <= set(S)
    single, group = S["cases"]
    assert single["result"]["ok"] and group["result"]["ok"]
    assert {"summary", "loops", "restore", "torch_file", "dcp", "shm", "cold"} <= set(single["result"])
    assert {"analysis", "baselines", "modes", "shm_peaks"} <= set(group["result"])
    rs, rg = S["rows"]
    for key in ("blocked_median_s", "blocked_p99_s", "local_commit_s", "restore_s", "torch_save_s",
                "torch_load_evicted_s", "dcp_save_s", "dcp_async_call_s", "dcp_loop_blocked_s", "shm_per_node_bytes"):
        assert rs[key] is not None and rg[key] is not None, key
    assert rg["group_commit_s"] and rg["rebuild_s"] and rg["rebuild_verified"] is True
    assert Path(S["chart"]).stat().st_size > 10_000 and (out / "bench.png").stat().st_size > 10_000
    results_md = (out / "RESULTS.md").read_text()
    assert "## `shardkeep bench`" in results_md and "| single 0.02 GB |" in results_md
    # nothing left behind: the cases' shared memory and temp dirs
    for case in S["cases"]:
        prefix = case["result"]["shm_prefix"]
        assert prefix.startswith(("skbench", "skbg")) and not list(SHM.glob(prefix + "*"))
    assert list(tmp.iterdir()) == []
