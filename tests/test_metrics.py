"""The Prometheus endpoint (--metrics-port) and JSON logs (--log-format json), scraped and read during real runs."""

from __future__ import annotations

import json
import subprocess
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from conftest import shardkeep_cmd
from shardkeep.client import Snapshotter
from test_group_membership import free_ports, peers_arg, wait_until


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(256, 256, generator=g), "b": torch.randn(256, generator=g), "step": {"n": seed}}


def test_counters_move_during_a_snapshot_run(make_daemon, job_id):
    port = free_ports(1)[0]
    d = make_daemon(["--metrics-port", str(port)])
    assert d.status()["metrics"] == f"http://127.0.0.1:{port}/metrics"
    before = scrape(port)
    assert before[("shardkeep_status_ok", ())] == 1
    job = (("job", job_id),)
    assert ("shardkeep_snapshots_committed_total", job) not in before
    snap = Snapshotter(socket=d.socket, job=job_id, rank=0, world_size=1)
    n = 12
    for step in range(n):
        assert snap.snapshot(_state(step), step).result(timeout=30).status == "committed"
    snap.restore(_state(99))
    snap.close()
    after = scrape(port)
    assert after[("shardkeep_snapshots_committed_total", job)] == n
    assert after[("shardkeep_snapshots_skipped_total", job)] == 0
    data = 256 * 256 * 4 + 256 * 4
    assert after[("shardkeep_snapshot_bytes_total", job)] >= n * data
    assert after[("shardkeep_commit_seconds_count", ())] - before[("shardkeep_commit_seconds_count", ())] == n
    assert after[("shardkeep_restore_seconds_count", ())] - before[("shardkeep_restore_seconds_count", ())] == 1
    assert after[("shardkeep_job_newest_step", job)] == n - 1
    assert after[("shardkeep_job_bytes", job)] >= 2 * data
    assert after[("shardkeep_memory_used_bytes", ())] >= 2 * data
    assert ("shardkeep_group_degraded", ()) not in after  # a single node has no group


def test_a_group_reports_group_commits_encode_work_and_a_lost_peer(make_daemon, job_id):
    ports, mports = free_ports(3), free_ports(3)
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--insecure",
                       "--heartbeat", "0.5", "--peer-timeout", "2", "--metrics-port", str(mports[i])])
          for i in range(3)]
    wait_until(lambda: all(scrape(mports[0]).get(("shardkeep_peer_up", (("node", str(j)),))) == 1 for j in (1, 2)),
               what="node 0 sees its peers up")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=3, local_world_size=1)
             for i, d in enumerate(ds)]
    for step in range(3):  # one rank per node: each version is three nodes' parts
        futs = [s.snapshot(_state(10 * step + i), step) for i, s in enumerate(snaps)]
        assert all(f.result(timeout=60).status == "committed" for f in futs)

    def group_level() -> bool:
        m = scrape(mports[0])
        return m.get(("shardkeep_group_commit_seconds_count", (("outcome", "group"),)), 0) >= 1
    wait_until(group_level, timeout=60, what="a version group-committed, in the metrics")
    m = scrape(mports[0])
    assert m[("shardkeep_codec_bytes_total", (("op", "encode"),))] > 0
    assert m[("shardkeep_codec_seconds_total", (("op", "encode"),))] > 0
    assert m[("shardkeep_group_degraded", ())] == 0
    assert m[("shardkeep_job_group_step", (("job", job_id),))] >= 0
    for s in snaps:
        s.close()
    ds[2].kill()
    wait_until(lambda: scrape(mports[0]).get(("shardkeep_group_degraded", ())) == 1, timeout=20,
               what="degraded, in the metrics")
    assert scrape(mports[0])[("shardkeep_peer_up", (("node", "2"),))] == 0


def test_json_logs_carry_the_event_fields(make_daemon, job_id):
    d = make_daemon(["--log-format", "json"])
    snap = Snapshotter(socket=d.socket, job=job_id, rank=0, world_size=1)
    snap.snapshot(_state(1), 7).result(timeout=30)
    snap.close()
    r = subprocess.run(shardkeep_cmd("release", "--socket", d.socket, "--job", job_id), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    d.stop()
    lines = [json.loads(line) for line in d.log_path.read_text().splitlines() if line.strip()]  # every line
    assert all({"time", "level", "logger", "message"} <= set(e) for e in lines)
    reg = [e for e in lines if e["message"].startswith(f"registered job {job_id}")]
    assert reg and reg[0]["job"] == job_id and reg[0]["rank"] == 0, lines
    rel = [e for e in lines if e["message"].startswith(f"job {job_id} finished")]
    assert rel and rel[0]["job"] == job_id, lines


def test_a_bad_metrics_port_fails_fast_naming_it(tmp_path):
    r = subprocess.run(shardkeep_cmd("daemon", "--socket", str(tmp_path / "s.sock"), "--metrics-port", "70000"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "metrics_port" in r.stderr and "70000" in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["xml", "3"])
def test_a_bad_log_format_fails_fast_naming_it(tmp_path, value):
    r = subprocess.run(shardkeep_cmd("daemon", "--socket", str(tmp_path / "s.sock")),
                       capture_output=True, text=True, timeout=60, env={**__import__("os").environ,
                                                                       "SHARDKEEP_LOG_FORMAT": value})
    assert r.returncode == 2 and "SHARDKEEP_LOG_FORMAT" in r.stderr and value in r.stderr, r.stderr


def test_json_log_fields_are_read_from_the_daemons_wording():
    import logging

    from shardkeep.daemon.logs import JsonFormatter

    def fields(msg: str, node: int | None = 0, **extra) -> dict:
        rec = logging.LogRecord("shardkeep.groupcommit", logging.WARNING, __file__, 1, msg, None, None)
        rec.__dict__.update(extra)
        return json.loads(JsonFormatter(node).format(rec))

    e = fields("node 0: job 'j1' step 213 aborted at group level: node 3 never joined it within 5s")
    assert (e["job"], e["step"], e["peer"], e["node"]) == ("j1", 213, 3, 0) and "rank" not in e
    e = fields("node 0: node(s) [2] down")
    assert e["peer"] == 2 and "job" not in e
    e = fields("job j2 rank 5 step 7 skipped: no free slot", node=None)
    assert (e["job"], e["rank"], e["step"]) == ("j2", 5, 7) and "peer" not in e and "node" not in e
    assert fields("job j3 step 1", step=99, peer=4)["step"] == 99  # extra= wins
