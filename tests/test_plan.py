"""shardkeep plan: Young/Daly intervals, lost work, data-loss probabilities, the command line, status advice."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction

import pytest

from shardkeep.daemon import plan as P

M512 = 1000 * 3600 / 512  # system MTBF of 512 nodes at 1000 h each: 7031.25 s

CLI_ARGS = ["--mtbf", "1000", "--nodes", "512", "--snapshot-cost", "0.001", "--restore", "0.2", "--rebuild", "6",
            "--step-time", "1", "--disk-save", "60", "--disk-load", "120"]


def _exact_tail(n: int, p: float, at_least: int) -> float:
    q = Fraction(p)
    return float(sum(math.comb(n, j) * q**j * (1 - q) ** (n - j) for j in range(at_least, n + 1)))


# --- intervals and waste ------------------------------------------------------------------

def test_young_by_hand():
    assert P.young_interval(0.001, M512) == pytest.approx(3.75, rel=1e-15)  # sqrt(2 * 0.001 * 7031.25) = sqrt(14.0625)
    assert P.young_interval(60, M512) == pytest.approx(918.5586535, rel=1e-9)  # sqrt(843750)
    assert P.young_interval(2, 100) == pytest.approx(20.0)


def test_daly_by_hand():
    # sqrt(2CM) = 3.75, C/(2M) = 1e-6 / 14.0625: 3.75 + 0.001/3 + 1e-6 / (9 * 3.75) - 0.001
    assert P.daly_interval(0.001, M512) == pytest.approx(3.749333363, rel=1e-9)
    # sqrt(2CM) = 918.5586535, C/(2M) = 0.0042667: 918.5586535 * (1 + 0.0217732 + 0.000474074) - 60
    assert P.daly_interval(60, M512) == pytest.approx(878.99412, rel=1e-7)
    # C = 2 M and beyond: M
    assert P.daly_interval(200, 100) == 100 and P.daly_interval(500, 100) == 100
    # just below: sqrt(2CM) * (1 + 1/3 + 1/9) - C with C = 2M (continuous up to the edge, not M)
    assert P.daly_interval(199.999, 100) == pytest.approx(200 * (13 / 9) - 200, rel=1e-4, abs=0)


def test_daly_approaches_young_for_cheap_checkpoints():
    for cost in (1e-4, 1e-2, 1.0):
        y, d = P.young_interval(cost, 1e6), P.daly_interval(cost, 1e6)
        assert d < y and y - d == pytest.approx(2 * cost / 3, rel=1e-2)


def test_durable_spacing_and_lost_work():
    assert P.durable_spacing(1.0, 2.37) == 3.0  # two snapshots skipped while one group-commits
    assert P.durable_spacing(4.0, 2.37) == 4.0
    assert P.durable_spacing(1.0, 3.0) == 3.0
    assert P.durable_spacing(1.0, 0.0) == 1.0
    assert P.lost_work(878.99412, 60, 120) == pytest.approx(589.49706)  # half a period + restart
    assert P.lost_work(4, 0.001, 6.2, 2.37) == pytest.approx(2.0005 + 2.37 + 6.2)


def test_waste_by_hand_and_minimal_at_young():
    w = P.waste_fraction(4, 0.001, 6.2, M512, latency=2.37, spacing=4)
    assert w == pytest.approx(0.001 / 4 + (2.0005 + 2.37 + 6.2) / 7031.25, rel=1e-12, abs=0)
    assert w == pytest.approx(0.0017533, rel=1e-4, abs=0)
    assert P.waste_fraction(878.99412, 60, 120, M512) == pytest.approx(60 / 878.99412 + 589.49706 / 7031.25)
    tau = P.young_interval(5.0, 1e5)
    best = P.waste_fraction(tau, 5.0, 10.0, 1e5)
    assert best < P.waste_fraction(tau * 0.8, 5.0, 10.0, 1e5) and best < P.waste_fraction(tau * 1.25, 5.0, 10.0, 1e5)


# --- binomial tail and data loss ------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 1e-3, 0.1, 0.37, 0.9, 1.0])
def test_binomial_tail_matches_brute_force(p):
    for n in range(0, 9):
        for k in range(0, n + 2):
            brute = math.fsum(p ** sum(bits) * (1 - p) ** (n - sum(bits))
                              for bits in itertools.product((0, 1), repeat=n) if sum(bits) >= k)
            assert P.binomial_tail(n, p, k) == pytest.approx(brute, rel=1e-12, abs=1e-300), (n, k, p)


@pytest.mark.parametrize("n,k,p", [(16, 2, 1e-12), (16, 4, 1e-12), (4, 2, 3.0555e-6), (1000, 3, 1e-9),
                                   (12, 3, 1e-30)])
def test_binomial_tail_tiny_p_is_accurate(n, k, p):
    exact = _exact_tail(n, p, k)
    got = P.binomial_tail(n, p, k)
    assert exact > 0 and got == pytest.approx(exact, rel=1e-12, abs=0)
    naive = 1 - math.fsum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(k))
    if exact < 1e-16:
        assert naive == 0 or abs(naive - exact) / exact > 1e-3  # the complement would have been useless


def test_binomial_tail_rejects_bad_arguments():
    with pytest.raises(ValueError):
        P.binomial_tail(4, 1.5, 1)
    with pytest.raises(ValueError):
        P.binomial_tail(4, -0.1, 1)


def test_loss_rate_is_the_textbook_mttdl_for_small_p():
    mtbf, w, yr = 1e6, 3.0, P.SECONDS_PER_YEAR  # p = 3e-6: first order holds to ~1e-4
    for n in (4, 8, 16):
        # one group (N = n): m = 1 is RAID-5's n (n-1) W / mtbf^2; m = 2 is n (n-1) (n-2) W^2 / (2 mtbf^3)
        assert P.loss_events_per_year(n, n, 1, w, mtbf) == pytest.approx(n * (n - 1) * w / mtbf**2 * yr, rel=2e-4, abs=0)
        assert P.loss_events_per_year(n, n, 2, w, mtbf) == pytest.approx(
            n * (n - 1) * (n - 2) * w**2 / (2 * mtbf**3) * yr, rel=2e-4, abs=0)
    # N nodes in N/n groups: N times the per-node rate
    assert P.loss_events_per_year(512, 4, 1, w, mtbf) == pytest.approx(128 * P.loss_events_per_year(4, 4, 1, w, mtbf))


def test_loss_is_monotone_in_m_n_and_window():
    mtbf = 1000 * 3600.0
    for n in (4, 6, 8, 12, 16):
        ps = [P.loss_in_window(n, m, 11, mtbf) for m in range(1, 4)]
        rs = [P.loss_events_per_year(512, n, m, 11, mtbf) for m in range(1, 4)]
        assert ps == sorted(ps, reverse=True) and rs == sorted(rs, reverse=True) and ps[-1] > 0
    for m in (1, 2, 3):
        ps = [P.loss_in_window(n, m, 11, mtbf) for n in (4, 6, 8, 12, 16)]
        rs = [P.loss_events_per_year(512, n, m, 11, mtbf) for n in (4, 6, 8, 12, 16)]
        assert ps == sorted(ps) and rs == sorted(rs)
    assert P.loss_in_window(8, 2, 10, mtbf) < P.loss_in_window(8, 2, 100, mtbf) < P.loss_in_window(8, 2, 1000, mtbf)


# --- the plan ---------------------------------------------------------------------------

def _flags(**kw):
    base = dict(snapshot_cost=0.001, restore=0.2, rebuild=6.0, step_time=1.0, disk_save=60.0, disk_load=120.0)
    base.update(kw)
    return base


def test_plan_numbers():
    r = P.plan(P.resolve_inputs(1000, 512, _flags(commit_latency=2.37)))
    assert r["system_mtbf_s"] == 7031.25
    assert r["interval"]["young_s"] == pytest.approx(3.75) and r["interval"]["steps"] == 4
    adv, every, disk = r["shardkeep_advised"], r["shardkeep_every_step"], r["disk"]
    assert adv["interval_s"] == 4 and adv["durable_spacing_s"] == 4
    assert adv["lost_work_node_loss_s"] == pytest.approx(2.0005 + 2.37 + 6.2)
    assert adv["waste_fraction"] == pytest.approx(0.0017533, rel=1e-4, abs=0)
    assert every["interval_s"] == 1 and every["durable_spacing_s"] == 3  # skips while a group commit runs
    assert every["lost_work_node_loss_s"] == pytest.approx((3 + 0.001) / 2 + 2.37 + 6.2)
    assert every["waste_fraction"] == pytest.approx(0.001 + 10.0705 / 7031.25)
    assert disk["interval_s"] == pytest.approx(878.99412) and disk["lost_work_node_loss_s"] == pytest.approx(589.49706)
    assert disk["waste_fraction"] == pytest.approx(0.15210, rel=1e-4, abs=0)
    g = r["group"]
    assert (g["n"], g["m"], g["window_s"]) == (4, 1, 11.0)  # peer-down 5 s + rebuild 6 s
    # the table: n in {4,6,8,12,16} x m in {1,2,3}; the rebuild (n x S fetched) and window grow with n
    assert [(t["n"], t["m"]) for t in r["table"]] == [(n, m) for n in (4, 6, 8, 12, 16) for m in (1, 2, 3)]
    assert next(t for t in r["table"] if (t["n"], t["m"]) == (8, 2))["window_s"] == pytest.approx(5 + 12)
    assert next(t for t in r["table"] if (t["n"], t["m"]) == (6, 2))["memory_factor"] == pytest.approx(1.5)
    json.dumps(r, allow_nan=False)


def test_plan_table_adds_the_chosen_pair_and_respects_nodes():
    r = P.plan(P.resolve_inputs(1000, 10, _flags(group_size=10, parity=4)))
    pairs = [(t["n"], t["m"]) for t in r["table"]]
    assert (10, 4) in pairs and all(n <= 10 for n, _ in pairs) and r["group"]["chosen"]
    assert P.resolve_inputs(1000, 3, {}).group_size == 3  # fewer nodes than the default group of 4


def test_defaults_and_sources():
    inp = P.resolve_inputs(1000, 64, {"restore": 0.5})
    assert inp.sources["restore"] == ("flag", "")
    assert inp.sources["snapshot_cost"][0] == "default" and inp.snapshot_cost == P.DEFAULT_SNAPSHOT_COST
    # defaults scale RESULTS.md's measurements to the state per node (1.6 GB by default)
    assert inp.disk_save == pytest.approx(1.24) and inp.disk_load == pytest.approx(1.01)
    assert inp.rebuild == pytest.approx(4 * 1.6 / 1.612 * 6.60)  # n x S fetched at the recover run's rate
    assert inp.window == pytest.approx(5 + inp.rebuild)
    big = P.resolve_inputs(1000, 64, {"state_bytes": 16e9})
    assert big.restore == pytest.approx(10 * 1.6e9 / P.RESTORE_RATE) and big.sources["restore"][0] == "default"


def _status(commits=((2.0, "commit"), (3.0, "commit"), (30.0, "abort")), slot_bytes=400_000_000, n=6, m=2):
    return {
        "group": {"group": "g1", "node": 0, "n": n, "parity": m, "codec": "isa_l_rs_vand", "generation": 1,
                  "security": "curve", "peers": [], "versions": [], "degraded": False,
                  "recent_commits": [{"decision": d, "since_start_s": s} for s, d in commits]},
        "jobs": [{"job": "small", "ranks": {"0": {"slots": [{"bytes": 1000}]}}},
                 {"job": "big", "ranks": {str(r): {"slots": [{"bytes": slot_bytes}, {"bytes": slot_bytes}]}
                                          for r in range(2)}}],
    }


def test_inputs_from_a_daemon_status():
    st = _status()
    got = P.from_status(st)
    assert got["group_size"][0] == 6 and got["parity"][0] == 2
    assert got["commit_latency"][0] == 2.5  # median of the committed versions; the aborted one left out
    assert got["state_bytes"][0] == 800_000_000  # largest job: one slot per local rank
    inp = P.resolve_inputs(1000, 64, {"parity": 1}, st)
    assert (inp.group_size, inp.parity, inp.commit_latency) == (6, 1, 2.5)
    assert inp.sources["commit_latency"][0] == "daemon" and inp.sources["parity"] == ("flag", "")
    assert inp.restore == pytest.approx(0.8e9 / P.RESTORE_RATE) and inp.sources["restore"][0] == "daemon"
    assert P.from_status(None) == {} and P.from_status({"group": None, "jobs": []}) == {}
    assert "rebuild" not in got
    st["recover"] = {"state": "done", "seconds": 4.25, "bytes_fetched": 1.6e9}
    inp = P.resolve_inputs(1000, 64, {}, st)
    assert inp.rebuild == 4.25 and inp.sources["rebuild"][0] == "daemon"
    st["recover"] = {"state": "running", "bytes_fetched": 1e9}
    assert "rebuild" not in P.from_status(st)


@pytest.mark.parametrize("mtbf,nodes,kw,words", [
    (0, 512, {}, "--mtbf must be > 0"),
    (-3, 512, {}, "--mtbf must be > 0"),
    (float("nan"), 512, {}, "--mtbf must be a finite number"),
    (1000, 1, {}, "--nodes must be >= 2"),
    (1000, 512, {"parity": 0}, "--parity must be between 1 and"),
    (1000, 512, {"group_size": 4, "parity": 4}, "--parity must be between 1 and"),
    (1000, 512, {"group_size": 1}, "--group-size must be >= 2"),
    (1000, 8, {"group_size": 12}, "more than --nodes 8"),
    (1000, 512, {"snapshot_cost": 0.0}, "--snapshot-cost must be > 0"),
    (1000, 512, {"step_time": -1.0}, "--step-time must be > 0"),
    (1000, 512, {"restore": -1.0}, "--restore must be >= 0"),
    (1000, 512, {"disk_save": 0.0}, "--disk-save must be > 0"),
    (1000, 512, {"window": float("inf")}, "--window must be a finite number"),
])
def test_invalid_inputs_are_rejected(mtbf, nodes, kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        P.plan(P.resolve_inputs(mtbf, nodes, _flags(**kw)))


# --- the command line and status ------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardkeep.daemon.cli", "plan", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_json_without_a_daemon(tmp_path):
    r = _cli(*CLI_ARGS, "--socket", str(tmp_path / "none.sock"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["daemon"]["answered"] is False and "no shardkeep daemon" in out["daemon"]["error"]
    assert out["system_mtbf_s"] == 7031.25
    assert out["interval"]["young_s"] == pytest.approx(3.75)
    assert out["interval"]["daly_s"] == pytest.approx(3.749333363, rel=1e-9)
    assert out["interval"]["steps"] == 4 and out["interval"]["advised_s"] == 4
    assert out["disk"]["daly_s"] == pytest.approx(878.99412, rel=1e-7)
    assert out["disk"]["lost_work_node_loss_s"] == pytest.approx(589.49706, rel=1e-7)
    for name in ("snapshot_cost", "restore", "rebuild", "step_time", "disk_save", "disk_load"):
        assert out["sources"][name]["source"] == "flag", name
    for name in ("group_size", "parity", "commit_latency", "window"):
        assert out["sources"][name]["source"] == "default", name
    # no daemon, no --commit-latency: 1.6 GB at RESULTS.md's group-commit rate
    commit = 1.6e9 / P.GROUP_COMMIT_RATE
    adv = out["shardkeep_advised"]
    assert adv["durable_spacing_s"] == 12  # 4 s snapshots, a group commit of 9.4 s: every third one
    assert adv["lost_work_node_loss_s"] == pytest.approx(6.0005 + commit + 6.2)
    g = out["group"]
    assert (g["n"], g["m"], g["window_s"], g["chosen"]) == (4, 1, 11.0, True)
    p = -math.expm1(-11 / 3.6e6)
    assert g["p_node_in_window"] == pytest.approx(p, rel=1e-12, abs=0)
    assert g["p_loss_in_window"] == pytest.approx(_exact_tail(4, p, 2), rel=1e-12, abs=0)
    assert g["p_loss_in_window"] == pytest.approx(5.6018e-11, rel=1e-4, abs=0)
    # 512 nodes x lam x P(at least 1 of the other 3 in the window) per year
    assert g["loss_events_per_year"] == pytest.approx(512 / 3.6e6 * _exact_tail(3, p, 1) * 31557600, rel=1e-12, abs=0)
    assert g["loss_events_per_year"] == pytest.approx(0.041142, rel=1e-4, abs=0)
    assert len(out["table"]) == 15


def test_cli_text_report(tmp_path):
    r = _cli(*CLI_ARGS, "--commit-latency", "2.37", "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 0, r.stderr
    assert "advice: snapshot every 4 step(s) = 4 s (Daly 3.75 s, Young 3.75 s)" in r.stdout
    assert "disk checkpoint (Daly)" in r.stdout and "589 s" in r.stdout
    assert "<- this plan" in r.stdout and "none (no shardkeep daemon" in r.stdout


@pytest.mark.parametrize("args,words", [
    (["--mtbf", "0", "--nodes", "512"], "--mtbf must be > 0"),
    (["--mtbf", "1000", "--nodes", "512", "--group-size", "4", "--parity", "4"], "--parity must be between"),
    (["--mtbf", "1000", "--nodes", "2", "--group-size", "4"], "more than --nodes 2"),
])
def test_cli_rejects_bad_input(tmp_path, args, words):
    r = _cli(*args, "--socket", str(tmp_path / "none.sock"))
    assert r.returncode == 2 and words in r.stderr and r.stdout == ""


def test_status_advice(monkeypatch, capsys):
    from shardkeep.daemon.status import plan_advice, render_status

    st = {**_status(n=4, m=1), "memory": {"used": 0, "headroom": {}}}
    monkeypatch.delenv("SHARDKEEP_MTBF_HOURS", raising=False)
    line, result = plan_advice(st)
    assert result is None and "shardkeep plan --mtbf" in line
    monkeypatch.setenv("SHARDKEEP_MTBF_HOURS", "1000")
    line, result = plan_advice(st)
    assert result["inputs"]["nodes"] == 4 and result["sources"]["commit_latency"]["source"] == "daemon"
    assert result["interval"]["daly_s"] == pytest.approx(P.daly_interval(P.DEFAULT_SNAPSHOT_COST, 900_000))
    assert line.startswith("advice ($SHARDKEEP_MTBF_HOURS=1000 h per node, 4 nodes): snapshot every 92.9 s;")
    render_status(st)
    assert "snapshot every 92.9 s" in capsys.readouterr().out
    monkeypatch.setenv("SHARDKEEP_MTBF_HOURS", "-5")
    line, result = plan_advice(st)
    assert result is None and "--mtbf must be > 0" in line
    assert plan_advice({"group": None})[1] is None
