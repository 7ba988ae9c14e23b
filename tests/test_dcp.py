"""torch.distributed.checkpoint through shardkeep: ShardkeepWriter / ShardkeepReader.

Ranks run as real processes (gloo), spread over two daemons of a group; loads run at other world
sizes with ranks on other daemons than the ones that saved them, so a rank's data comes over the
peer data plane.  Every load is compared with a plain DCP filesystem round trip of the same state
and with the values every rank can compute itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from groupjob import lose_nodes, replace_and_recover, start_group
from test_group_membership import free_ports, wait_until
from shardkeep.client import IntegrityError, NotFoundError, Snapshotter
from shardkeep.proto.errors import ProtocolError
from shardkeep.proto.transport import Channel
from shardkeep.client.dcp import ShardkeepReader, ShardkeepWriter, decode_metadata, encode_metadata, parse_step

HERE = Path(__file__).parent
WORKER = HERE / "dcp_worker.py"


def run_ranks(placement: list, job: str, mode: str, tmp: Path, tag: str, extra: tuple = ()) -> list[dict]:
    """One process per rank; ``placement[r]`` is the daemon rank r talks to."""
    world = len(placement)
    port = free_ports(1)[0]
    procs, outs = [], []
    for r, d in enumerate(placement):
        local = [i for i, x in enumerate(placement) if x is d]
        out = tmp / f"{tag}-{r}.json"
        outs.append(out)
        env = dict(os.environ, SHARDKEEP_SOCKET=d.socket, SHARDKEEP_JOB=job, RANK=str(r), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(local.index(r)), LOCAL_WORLD_SIZE=str(len(local)), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=str(HERE))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "--mode", mode, "--fs-dir", str(tmp / "fs"),
                                       "--out", str(out), *extra], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{tag} rank {r} exited {p.returncode}:\n{log[-4000:]}"
    return [json.loads(o.read_text()) for o in outs]


@contextlib.contextmanager
def dcp_raises(exc: type, match: str):
    """DCP wraps a rank's error in a CheckpointException that carries its text (the type may be lost)."""
    with pytest.raises((exc, CheckpointException)) as info:
        yield
    assert re.search(match, str(info.value), re.S), str(info.value)


def check_loaded(results: list[dict], step: int) -> None:
    for res in results:
        assert res["step"] == step, res
        assert res["filesystem_vs_expected"] == [], res  # the reference itself is right
        assert res["vs_expected"] == [], res
        assert res["vs_filesystem"] == [], res


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True], ids=["save", "async_save"])
def test_save_at_4_load_at_2_and_1_on_other_daemons(make_daemon, job_id, tmp_path, async_save):
    (a, b), _ = start_group(make_daemon, 2, 1)
    saved = run_ranks([a, a, b, b], job_id, "save", tmp_path, "save", ("--async-save",) if async_save else ())
    assert all(r["saved"] for r in saved)
    dcp_job = job_id  # ShardkeepWriter(job=None) takes $SHARDKEEP_JOB + "-dcp"
    for d in (a, b):
        js = d.job_status(dcp_job + "-dcp")
        assert js is not None and js["newest"] == 7 and 7 in js["group_committed"], js
    # world size 2, each rank on the daemon that did NOT save its old ranks' rows
    two = run_ranks([b, a], job_id, "load", tmp_path, "load2")
    check_loaded(two, 7)
    assert all(r["bytes_remote"] > 0 for r in two), two   # rows of the other node's ranks came over the peer plane
    # world size 1 on node 1: half of the data is local, half comes from node 0
    one = run_ranks([b], job_id, "load", tmp_path, "load1")
    check_loaded(one, 7)
    assert one[0]["bytes_remote"] > 0 and one[0]["bytes_local"] > 0, one
    # remote bytes came over the data plane into staging segments, and every read was ended
    for d in (a, b):
        st = d.status()["reads"]
        assert st["in_flight"] == 0 and st["served"] > 0 and st["bytes"] > 0, st
        assert len(list(Path("/dev/shm").glob(f"{d.prefix}-r-*"))) <= 4  # kept for the job's next reads
    check_read_refusals(b, dcp_job + "-dcp", 7)
    for d in (a, b):  # finishing the job removes its staging segments
        Channel(d.socket, timeout=30).request("finish", {"job": dcp_job + "-dcp"})
        assert list(Path("/dev/shm").glob(f"{d.prefix}-r-*")) == []


def check_read_refusals(d, job: str, step: int) -> None:
    """What the daemon answers to reads it must not serve; it keeps serving after each."""
    ch = Channel(d.socket, timeout=30)
    me = d.status()["group"]["node"]
    with pytest.raises(ProtocolError, match="is this node"):
        ch.request("read", {"job": job, "step": step, "node": me, "offset": 0, "length": 16})
    with pytest.raises(ProtocolError, match="no payload bytes"):  # beyond the other node's payload
        ch.request("read", {"job": job, "step": step, "node": 1 - me, "offset": 1 << 40, "length": 16})
    with pytest.raises(NotFoundError, match="no read"):
        ch.request("read-done", {"job": job, "read": "0123456789abcdef"})
    r = ch.request("read", {"job": job, "step": step, "node": 1 - me, "offset": 0, "length": 4096})
    assert r.fields["size"] >= 4096 and not r.payload  # the bytes are in the segment, not the reply
    with pytest.raises(NotFoundError):  # a read is ended by its own job only
        ch.request("read-done", {"job": job + "x", "read": r.fields["read"]})
    ch.request("read-done", {"job": job, "read": r.fields["read"]})
    assert d.status()["reads"]["in_flight"] == 0


@pytest.mark.slow
def test_a_lost_node_is_named_and_serves_again_once_recovered(make_daemon, job_id, tmp_path):
    ds, ports = start_group(make_daemon, 2, 1)
    run_ranks([ds[0], ds[1]], job_id, "save", tmp_path, "save")
    lose_nodes(ds, [0])  # SIGKILL, /dev/shm and state dir wiped
    wait_until(lambda: not next(p for p in ds[1].status()["group"]["peers"] if p["node"] == 0)["up"], what="node 1 sees node 0 down")
    with pytest.raises(AssertionError) as e:  # rank 0's rows are on node 0 alone (node 1 holds its parity)
        run_ranks([ds[1]], job_id, "load", tmp_path, "lost")
    assert "node 0 is down" in str(e.value) and "shardkeep recover" in str(e.value), str(e.value)[-3000:]
    replace_and_recover(make_daemon, ds, ports, [0], 1, job_id + "-dcp", 7)
    # rebuilt from node 1's parity: both layouts load again, one rank per node or all on node 1
    check_loaded(run_ranks([ds[1], ds[0]], job_id, "load", tmp_path, "again2"), 7)
    check_loaded(run_ranks([ds[1]], job_id, "load", tmp_path, "again1"), 7)


def test_single_daemon_round_trip_and_refusals(daemon, job_id, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDKEEP_SOCKET", daemon.socket)
    monkeypatch.setenv("SHARDKEEP_JOB", job_id)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    sys.path.insert(0, str(HERE))
    import dcp_worker

    full = dcp_worker.full_tensors(5)
    state = dcp_worker.build(full, 1, blank=False)
    with ShardkeepWriter() as w:
        dcp.save(state, storage_writer=w, checkpoint_id="step-11")
        state["epoch"] = 4
        dcp.save(state, storage_writer=w, checkpoint_id=12)
    blank = dcp_worker.build(full, 1, blank=True)
    with ShardkeepReader() as r:  # newest by default
        dcp.load(blank, storage_reader=r)
    assert r.step == 12 and blank["epoch"] == 4 and r.bytes_remote == 0
    assert dcp_worker.compare(state, blank) == []
    older = dcp_worker.build(full, 1, blank=True)
    with ShardkeepReader() as r:
        dcp.load(older, storage_reader=r, checkpoint_id="step-11")
    assert r.step == 11 and older["epoch"] == 3

    # a value that is neither a tensor nor plain data is refused by name: shardkeep never pickles
    with ShardkeepWriter() as w, dcp_raises(TypeError, "'extra'.*never pickle"):
        dcp.save({"w": torch.ones(3), "extra": object()}, storage_writer=w, checkpoint_id=13)
    with ShardkeepWriter() as w, dcp_raises(ValueError, "names no step"):
        dcp.save({"w": torch.ones(3)}, storage_writer=w, checkpoint_id="latest")
    # a step that does not exist, and a job of Snapshotter versions, are clear errors
    with ShardkeepReader() as r, dcp_raises(NotFoundError, "step 99"):
        dcp.load(dcp_worker.build(full, 1, blank=True), storage_reader=r, checkpoint_id=99)
    with Snapshotter(daemon.socket, job_id + "-plain", rank=0, world_size=1) as snap:
        assert snap.snapshot({"t": torch.ones(4)}, 1).result(timeout=30).status == "committed"
    with ShardkeepReader(job_id + "-plain") as r, dcp_raises(IntegrityError, "no DCP checkpoint"):
        dcp.load({"t": torch.zeros(4)}, storage_reader=r)
    # non-tensor values never go through a planner's load_bytes (which unpickles): another planner is refused
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Unpickling(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise AssertionError("load_bytes must never be called")

    with ShardkeepReader() as r, dcp_raises(TypeError, "Unpickling loads non-tensor values its own way"):
        dcp.load(dcp_worker.build(full, 1, blank=True), storage_reader=r, planner=Unpickling())


def test_corrupted_shm_is_refused(daemon, job_id, monkeypatch):
    """A flipped byte in the slot fails the load with IntegrityError, never loads wrong values."""
    monkeypatch.setenv("SHARDKEEP_SOCKET", daemon.socket)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    state = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    with ShardkeepWriter(job_id) as w:
        dcp.save(state, storage_writer=w, checkpoint_id=1)
    r = daemon.request("open", {"job": job_id, "rank": 0, "step": 1})
    desc = r.fields["slot"]
    daemon.request("release", {"job": job_id, "rank": 0, "pin": r.fields["pin"]})
    with open(Path("/dev/shm") / desc["name"], "r+b") as f:  # a byte inside the tensor's data
        f.seek(desc["data_offset"] + 4096)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with ShardkeepReader(job_id) as r, dcp_raises(IntegrityError, "checksum mismatch"):
        dcp.load({"w": torch.zeros(1 << 16)}, storage_reader=r)


def test_metadata_codec_round_trip():
    from torch.distributed.checkpoint.default_planner import create_default_local_save_plan, \
        create_default_global_save_plan
    sd = {"a": torch.ones(3, 4, dtype=torch.bfloat16), "b": 5, "c": {"d": torch.zeros(2, dtype=torch.int64)}}
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    flat, mappings = flatten_state_dict(sd)
    plan = create_default_local_save_plan(flat, True)
    plan = type(plan)(plan.items, planner_data=mappings)
    _, md = create_default_global_save_plan([plan])
    md.planner_data = mappings
    back = decode_metadata(encode_metadata(md))
    assert back.state_dict_metadata == md.state_dict_metadata
    assert back.planner_data == {k: tuple(v) for k, v in mappings.items()}
    assert parse_step(5) == 5 and parse_step("run/step-00120") == 120 and parse_step("12/") == 12
    with pytest.raises(IntegrityError):
        decode_metadata(b"\x93garbage")
