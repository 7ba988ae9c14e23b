"""The persist tier: the daemons of a group write every Nth group-level version to shared storage in DCP's
layout, in the background; plain `dcp.load` reads it, a daemon killed in the middle leaves `latest` on a
complete version, and a job whose every daemon lost its memory restores from it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from groupjob import group_args, lose_nodes
from test_export import finish_job, plain_load, run_job, start_job
from test_group_membership import free_ports, wait_until

pytestmark = pytest.mark.slow


def persist_group(make_daemon, n: int, m: int, persist: Path, every: int = 1, node_env: dict | None = None):
    ports = free_ports(n)
    ds = [make_daemon([*group_args(ports, i, m), "--persist-dir", str(persist), "--persist-every", str(every)],
                      env=(node_env or {}).get(i)) for i in range(n)]
    wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds), what="group up")
    return ds


def latest(job_dir: Path) -> str | None:
    try:
        return os.readlink(job_dir / "latest")
    except OSError:
        return None


@pytest.mark.parametrize("kind", ["dp", "dp-shard", "fsdp2"])
def test_the_group_persists_and_plain_dcp_reads_it_and_restore_falls_back_to_it(make_daemon, job_id, tmp_path, kind):
    persist = tmp_path / "shared"
    ds = persist_group(make_daemon, 2, 1, persist)
    assert ds[0].status()["persist"]["every"] == 1
    run_job(ds, job_id, kind, tmp_path)
    job_dir = persist / job_id
    wait_until(lambda: latest(job_dir) == "step-3", timeout=120, what="step 3 persisted")
    wait_until(lambda: ds[0].status()["persist"]["running"] == 0, timeout=60, what="the commit worker done")
    st = ds[0].status()["persist"]
    assert st["committed"] == 1 and st["failed"] == 0 and st["newest"] == {job_id: 3}, st
    assert sorted(ds[1].status()["persist"][k] for k in ("written", "failed")) == [0, 1]
    names = sorted(p.name for p in (job_dir / "step-3").iterdir())
    assert {".metadata", "shardkeep.manifest", "__0_0.distcp", "__1_0.distcp"} <= set(names), names
    assert [p.name for p in job_dir.iterdir() if p.name.startswith(".")] == []  # no partial directory left
    assert plain_load(job_dir / "latest", tmp_path / "expected.pt") == "OK"
    # every daemon of the group loses its memory; the relaunched job restores the persisted step
    lose_nodes(ds, [0, 1])
    fresh = persist_group(make_daemon, 2, 1, tmp_path / "elsewhere")
    for log in run_job(fresh, job_id, kind, tmp_path, "--restore-from", str(persist)):
        assert f"RESTORED restored step 3 from the persist tier ({job_dir / 'step-3'})" in log, log[-2000:]


@pytest.mark.parametrize("phase,victim", [("persist-commit", 0), ("persist", 1)],
                         ids=["coordinator-at-commit", "node-at-its-part"])
def test_a_daemon_killed_in_the_middle_of_persisting_leaves_latest_on_a_complete_version(make_daemon, job_id,
                                                                                         tmp_path, phase, victim):
    persist = tmp_path / "shared"
    # SIGKILL of the coordinator (node 0) as it starts to commit the second persisted version (step 4), or of
    # node 1 as it starts to write its part of it
    crash = {victim: {"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": f"{phase}:crash:2"}}
    ds = persist_group(make_daemon, 2, 1, persist, node_env=crash)
    job_dir = persist / job_id
    procs = start_job(ds, job_id, "dp", tmp_path, "--repeat", "2", "--go-file", str(tmp_path / "go"))
    try:
        wait_until(lambda: latest(job_dir) == "step-3", timeout=120, what="step 3 persisted")
        (tmp_path / "go.4").touch()  # now step 4: its persist kills the victim
        wait_until(lambda: ds[victim].proc.poll() is not None, timeout=120, what=f"node {victim} crashed at {phase}")
    finally:
        finish_job(procs, check=False, kill=True)
    time.sleep(1)  # nothing may move latest now
    assert latest(job_dir) == "step-3"
    assert not (job_dir / "step-4").exists()
    assert {".metadata", "shardkeep.manifest"} <= {p.name for p in (job_dir / "step-3").iterdir()}
    assert plain_load(job_dir / "latest", tmp_path / "expected.pt") == "OK"


def test_a_single_node_persists_every_nth_version_and_keeps_k(make_daemon, job_id, tmp_path):
    import torch
    import torch.distributed.checkpoint as dcp

    from shardkeep.client import Snapshotter

    persist = tmp_path / "shared"
    d = make_daemon(["--persist-dir", str(persist), "--persist-every", "2", "--persist-keep", "2"])
    assert d.status()["jobs"] == [] and d.status()["persist"]["keep"] == 2
    job_dir = persist / job_id
    with Snapshotter(d.socket, job_id, rank=0, world_size=1) as snap:
        for step in range(7):
            assert snap.snapshot({"w": torch.full((4096,), float(step))}, step).result(timeout=30).status == "committed"
            if step % 2 == 0:  # one at a time, so that each is due when it commits
                wait_until(lambda: latest(job_dir) == f"step-{step}", timeout=60, what=f"step {step} persisted")
    assert sorted(p.name for p in job_dir.iterdir()) == ["latest", "step-4", "step-6"]
    assert d.job_status(job_id)["ranks"]["0"]["slots"].__len__() == 3  # --slots defaults to 3 with a persist dir
    got = {"w": torch.zeros(4096)}
    dcp.load(got, storage_reader=dcp.FileSystemReader(job_dir / "latest"))
    assert torch.equal(got["w"], torch.full((4096,), 6.0))


def test_a_version_due_while_the_previous_is_still_written_is_skipped_whole(make_daemon, job_id, tmp_path):
    """A slow disk makes persists rarer, never piles up pinned slots: the node skips a due version while it
    still writes an older one, the coordinator drops that version's partial directory, and a later one goes."""
    import torch

    from shardkeep.client import Snapshotter

    persist = tmp_path / "shared"
    d = make_daemon(["--persist-dir", str(persist), "--persist-every", "1", "--persist-rate", "2MB"])
    job_dir = persist / job_id
    with Snapshotter(d.socket, job_id, rank=0, world_size=1) as snap:
        state = {"w": torch.zeros(2 << 20)}  # 8 MB: 4 s at 2 MB/s
        for step in range(4):
            state["w"].fill_(step)
            res = snap.snapshot(state, step).result(timeout=30)
            assert res.status == "committed", res  # no slot stays pinned by a pile of persists
        wait_until(lambda: d.status()["persist"]["running"] == 0, timeout=60, what="the persists done")
        st = d.status()["persist"]
        assert st["committed"] == 1 and st["skipped_busy"] == 3 and st["failed"] == 0, st
        assert latest(job_dir) == "step-0" and sorted(p.name for p in job_dir.iterdir()) == ["latest", "step-0"]
        state["w"].fill_(4)
        assert snap.snapshot(state, 4).result(timeout=30).status == "committed"
        wait_until(lambda: latest(job_dir) == "step-4", timeout=60, what="step 4 persisted")
