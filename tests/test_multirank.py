"""Several ranks of one job under torchrun: every rank restores the same version, never a mix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_worker.py")


def torchrun(daemon, job, *args, nproc=2) -> list[dict]:
    env = dict(os.environ, SHARDKEEP_SOCKET=daemon.socket, SHARDKEEP_JOB=job, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as out_dir:
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
             str(WORKER), "--out-dir", out_dir, *args],
            capture_output=True, text=True, timeout=300, env=env,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        out = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    assert len(out) == nproc, r.stdout
    return sorted(out, key=lambda e: e["rank"])


def test_ranks_agree_on_the_newest_version_all_of_them_hold(daemon, job_id):
    out = torchrun(daemon, job_id, "--steps", "4", "--extra-on-rank0", "1")
    # rank 0 alone committed step 4: it is not a version of the job
    assert [e["restored"] for e in out] == [3, 3]
    assert all(e["values_ok"] for e in out)
    assert [e["local_world_size"] for e in out] == [2, 2]
    st = daemon.job_status(job_id)
    assert st["restorable"][0] == 3 and st["local_world_size"] == 2


def test_a_relaunch_restores_in_every_rank(daemon, job_id):
    torchrun(daemon, job_id, "--steps", "3")
    out = torchrun(daemon, job_id, "--restore-only")
    assert [e["restored"] for e in out] == [2, 2] and all(e["values_ok"] for e in out)


def test_a_step_one_rank_skips_is_aborted_for_every_rank(daemon, job_id):
    """The invariant: a step is written by every rank or by none."""
    import torch

    from shardkeep.client import Snapshotter

    a = Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=2, local_world_size=2)
    b = Snapshotter(socket=daemon.socket, job=job_id, rank=1, world_size=2, local_world_size=2)
    t = torch.zeros(10)
    for step in (0, 1):
        assert a.snapshot({"t": t}, step).result(timeout=30).status == "committed"
        assert b.snapshot({"t": t}, step).result(timeout=30).status == "committed"
    assert daemon.job_status(job_id)["restorable"] == [1, 0]
    # rank 0 commits step 2; rank 1 has no free slot for it (a reader pins step 0, step 1 is protected)
    assert a.snapshot({"t": t}, 2).result(timeout=30).status == "committed"
    daemon.request("open", {"job": job_id, "rank": 1, "step": 0})
    r = b.snapshot({"t": t}, 2).result(timeout=30)
    assert r.status == "skipped"
    st = daemon.job_status(job_id)
    assert st["restorable"][0] == 1 and st["skips"] == 1
    assert all(s["step"] != 2 for s in st["ranks"]["0"]["slots"]), "rank 0's step 2 must be dropped"
    a.close()
    b.close()
