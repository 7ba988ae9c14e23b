"""`shardkeep export`: a version written in DCP's layout that plain `dcp.load` reads without shardkeep.

Each job runs as real gloo processes, one rank on each of two daemons of a group; the export runs from one
node, so the other node's rank comes over the peer data plane.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

from conftest import shardkeep_cmd
from groupjob import lose_nodes, replace_nodes, start_group
from test_dcp import HERE
from test_group_membership import free_ports

pytestmark = pytest.mark.slow


def run_job(ds, job: str, kind: str, out: Path, *extra: str, check: bool = True) -> list:
    return finish_job(start_job(ds, job, kind, out, *extra), check)


def start_job(ds, job: str, kind: str, out: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_ports(1)[0]
    procs = []
    for r, d in enumerate(ds):
        env = dict(os.environ, SHARDKEEP_SOCKET=d.socket, SHARDKEEP_JOB=job, RANK=str(r), WORLD_SIZE=str(len(ds)),
                   LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=str(HERE))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "export_worker.py"), "--kind", kind, "--out",
                                       str(out), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish_job(procs: list[subprocess.Popen], check: bool = True, kill: bool = False) -> list:
    if kill:  # the test is done with them (a daemon they talk to was killed): don't wait for their timeouts
        for p in procs:
            p.kill()
    try:
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, log in zip(procs, logs):
        assert p.returncode == 0 or not check, log[-3000:]
    return logs if check else [(p.returncode, log) for p, log in zip(procs, logs)]


def plain_load(step_dir: Path, expected: Path) -> str:
    r = subprocess.run([sys.executable, str(HERE / "plain_dcp_load.py"), str(step_dir), str(expected)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(HERE)))
    return r.stdout.strip() if r.returncode == 0 else r.stdout + r.stderr[-3000:]


@pytest.mark.parametrize("kind", ["dp", "dp-shard", "fsdp2"])
def test_export_is_read_by_plain_dcp_load(make_daemon, job_id, tmp_path, kind):
    ds, _ = start_group(make_daemon, 2, 1)
    run_job(ds, job_id, kind, tmp_path)
    out = tmp_path / "ckpt"
    r = subprocess.run(shardkeep_cmd("export", "--job", job_id, "--to", str(out), "--socket", ds[1].socket),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + ds[1].log()
    assert f"exported job {job_id} step 3 (2 ranks" in r.stdout, r.stdout
    job_dir = out / job_id
    assert os.readlink(job_dir / "latest") == "step-3"
    names = sorted(p.name for p in (job_dir / "step-3").iterdir())
    assert ".metadata" in names and "shardkeep.manifest" in names and "__0_0.distcp" in names, names
    assert not [p for p in job_dir.iterdir() if p.name.startswith(".")], "temporary names left behind"
    # shardkeep's own record: every rank's tensors, each at its own bytes
    man = msgpack.unpackb((job_dir / "step-3" / "shardkeep.manifest").read_bytes(), raw=False, strict_map_key=False)
    assert man["step"] == 3 and sorted(man["ranks"]) == [0, 1]
    # plain DCP, shardkeep not importable, at world size 1 (FSDP2's shards and dp_shard's slices put together)
    assert plain_load(job_dir / "latest", tmp_path / "expected.pt") == "OK"
    # every daemon of the group loses its memory; the relaunched job restores from the exported step
    lose_nodes(ds, [0, 1])
    fresh, _ = start_group(make_daemon, 2, 1)
    logs = run_job(fresh, job_id, kind, tmp_path, "--restore-from", str(out))
    for log in logs:
        assert f"RESTORED restored step 3 from the persist tier ({job_dir / 'step-3'})" in log, log[-2000:]
        assert "memory could not serve: no version of this job in memory" in log, log[-2000:]
    if kind == "dp":  # the replicated model is written once (rank 0's file), rank 1 has only its own RNG
        sizes = {n: (job_dir / "step-3" / n).stat().st_size for n in names if n.endswith(".distcp")}
        assert sizes["__1_0.distcp"] < sizes["__0_0.distcp"] / 2, sizes


def test_export_keeps_the_newest_and_latest_never_goes_back(daemon, job_id, tmp_path):
    import torch

    from shardkeep.client import Snapshotter
    from shardkeep.client.export import export, steps_in

    out = tmp_path / "ckpt"
    with Snapshotter(daemon.socket, job_id, rank=0, world_size=1) as snap:
        for step in (1, 2, 3, 4):
            assert snap.snapshot({"w": torch.full((1000,), float(step))}, step).result(timeout=30).status == "committed"
            res = export(job_id, out, socket=daemon.socket, keep=2)
            assert res.step == step
    job_dir = out / job_id
    assert steps_in(job_dir) == [3, 4] and os.readlink(job_dir / "latest") == "step-4"
    export(job_id, out, step=3, socket=daemon.socket)  # an older step again: written, latest stays
    assert os.readlink(job_dir / "latest") == "step-4"
    import torch.distributed.checkpoint as dcp

    got = {"w": torch.zeros(1000)}
    dcp.load(got, storage_reader=dcp.FileSystemReader(job_dir / "latest"))
    assert torch.equal(got["w"], torch.full((1000,), 4.0))
    r = subprocess.run(shardkeep_cmd("export", "--job", "no-such-job", "--to", str(out), "--socket", daemon.socket),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no-such-job" in r.stderr, r.stderr


def test_restore_falls_back_to_the_persisted_step_only_when_memory_cannot_serve(make_daemon, job_id, tmp_path):
    ds, ports = start_group(make_daemon, 3, 1)
    run_job(ds, job_id, "dp", tmp_path)
    out = tmp_path / "ckpt"
    r = subprocess.run(shardkeep_cmd("export", "--job", job_id, "--to", str(out), "--socket", ds[2].socket),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # one node lost: `shardkeep recover` can rebuild it, so restore() says so and never goes back to the copy
    lose_nodes(ds, [0])
    ports = replace_nodes(make_daemon, ds, ports, [0], 1)
    res = run_job(ds, job_id, "dp", tmp_path, "--restore-from", str(out), check=False)
    assert all(rc != 0 for rc, _ in res), res
    assert "run `shardkeep recover` on it before restoring" in res[0][1], res[0][1][-2000:]
    # a second node lost: one node of three holds the version, a rebuild needs two: the persisted step serves
    lose_nodes(ds, [1])
    replace_nodes(make_daemon, ds, ports, [1], 1)
    logs = run_job(ds, job_id, "dp", tmp_path, "--restore-from", str(out))
    for log in logs:
        assert f"RESTORED restored step 3 from the persist tier ({out / job_id / 'step-3'})" in log, log[-2000:]
        assert "memory could not serve" in log, log[-2000:]
    assert "memory cannot serve it (a persisted copy can)" in logs[0], logs[0][-2000:]  # the lost nodes' ranks say why
