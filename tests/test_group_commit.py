"""A group of real daemons erasure-codes every snapshot; futures resolve at group level."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import shardkeep_cmd
from shardkeep.client import Snapshotter
from test_group_membership import all_up, free_ports, peers_arg, wait_until

pytestmark = pytest.mark.slow


def test_snapshots_reach_group_level_and_fall_back_to_local_when_a_node_is_gone(make_daemon, job_id):
    n = 3
    ports = free_ports(n)
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--insecure",
                       "--peer-timeout", "3", "--group-commit-timeout", "4"]) for i in range(n)]
    wait_until(lambda: all_up(ds), what="group up")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(200_000 + 1000 * i, generator=g), "step": 0} for i in range(n)]
    try:
        for step in range(4):
            futs = []
            for i, (snap, st) in enumerate(zip(snaps, states)):
                st["w"].add_(1.0)
                st["step"] = step
                futs.append(snap.snapshot(st, step))
            results = [f.result(timeout=60) for f in futs]
            assert [(r.status, r.level) for r in results] == [("committed", "group")] * n, results
        for d in ds:
            job = d.job_status(job_id)
            assert job["group_committed"][0] == 3
            # parity of the newest version only: older versions' parity is released, and its segment kept
            # as a spare for the next version (with the staging ring), counted in the daemon's memory
            st = d.status()
            parity = sorted(Path("/dev/shm").glob(f"{d.prefix}-g-parity-*"))
            seg = st["group"]["segments"]
            assert len(parity) == 2 and seg["created"] == {"stage": 1, "parity": 2}, (parity, seg)
            assert seg["reused"] == {"stage": 3, "parity": 2}, seg
            assert st["memory"]["group"] == {k: seg[k] for k in ("parity", "staging", "spare")}
            assert seg["parity"] > 0 and seg["staging"] == 0 and seg["spare"] > seg["parity"]
            assert st["memory"]["used"] == sum(j["bytes"] for j in st["jobs"]) + sum(st["memory"]["group"].values())
            # how late the event loop ran, and where the daemon's CPU went (bulk work is off the loop)
            assert st["loop"]["samples"] > 0 and st["loop"]["lag_ms_max"] >= st["loop"]["lag_ms_p50"] >= 0
            assert st["cpu_s"]["loop"] > 0 and {"sk-tag", "sk-copy"} <= set(st["cpu_s"]), st["cpu_s"]
            (v,) = [v for v in st["group"]["versions"] if v["job"] == job_id]
            assert v["step"] == 3 and v["group_committed"] and v["acks_from"] == [0, 1, 2]
            assert v["manifests_from"] == [0, 1, 2]  # every node can recreate any node's slots
        # the human status shows the same
        r = subprocess.run(shardkeep_cmd("status", "--socket", ds[1].socket), capture_output=True, text=True,
                           timeout=60, env={**os.environ, "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert "coordinator node 0" in r.stdout and "healthy" in r.stdout and "group commits" in r.stdout
        assert job_id in r.stdout and "commit" in r.stdout and "group level" in r.stdout
        # a node goes away: snapshots go on, and settle at local level
        ds[2].kill()
        futs = []
        for snap, st in zip(snaps[:2], states[:2]):
            futs.append(snap.snapshot(st, 4))
        results = [f.result(timeout=60) for f in futs]
        assert [(r.status, r.level) for r in results] == [("committed", "local")] * 2, results
        assert all("went down before acknowledging" in r.reason or "did not finish" in r.reason for r in results), results
        assert ds[0].job_status(job_id)["group_committed"][0] == 3
        assert ds[0].job_status(job_id)["restorable"][0] == 4
        wait_until(lambda: ds[0].status()["group"]["degraded"], what="degraded")
        # the last group-level version's slot is kept while the group is degraded
        slots = ds[0].job_status(job_id)["ranks"]["0"]["slots"]
        assert {s["step"] for s in slots if s["state"] == "committed"} == {3, 4}, slots
        # the abandoned group commit of step 4 left nothing behind but spares; step 3's parity stays
        for d in ds[:2]:
            seg = d.status()["group"]["segments"]
            assert len(sorted(Path("/dev/shm").glob(f"{d.prefix}-g-stage-*"))) == 1
            assert len(sorted(Path("/dev/shm").glob(f"{d.prefix}-g-parity-*"))) == 2
            assert seg["created"] == {"stage": 1, "parity": 2} and seg["staging"] == 0, seg
        # degraded: no group commit is even tried, so a snapshot is at local level at once, and the next one
        # finds a slot (the newest local version's) instead of waiting out a group commit
        for step in (5, 6):
            futs = [snap.snapshot(st, step) for snap, st in zip(snaps[:2], states[:2])]
            results = [f.result(timeout=60) for f in futs]
            assert [(r.status, r.level) for r in results] == [("committed", "local")] * 2, results
            assert all("degraded" in r.reason and "2" in r.reason for r in results), results
        assert ds[0].job_status(job_id)["restorable"][0] == 6
        assert ds[0].job_status(job_id)["group_committed"][0] == 3
    finally:
        for s in snaps:
            s.close()


def test_no_free_slot_is_predicted_so_the_trainer_never_waits_for_the_answer(make_daemon, job_id):
    """While a version's group commit hangs (node 2 never acks it), every slot is taken: the daemon answers
    "skip".  After the first such answer a rank skips at once (its hooks and the next snapshot() wait for
    nothing) until the group commit resolves; the daemon still hears of every step, and once the version is
    aborted at the group-commit timeout the next snapshots commit at group level again."""
    n = 3
    ports = free_ports(n)
    faults = {"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": "ack:drop:2"}
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--insecure",
                       "--peer-timeout", "3", "--group-commit-timeout", "4"], env=faults if i == 2 else None)
          for i in range(n)]
    wait_until(lambda: all_up(ds), what="group up")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    states = [{"w": torch.full((100_000,), float(i))} for i in range(n)]
    try:
        first = [s.snapshot(st, 0) for s, st in zip(snaps, states)]
        assert [f.result(timeout=60).level for f in first] == ["group"] * n
        hung = [s.snapshot(st, 1) for s, st in zip(snaps, states)]  # node 2 drops its ack of this version
        for s in snaps:
            s.wait(30)  # copied; the futures resolve once the group commit does (here: its timeout)
        assert not any(f.done() for f in hung)
        predicted_done_at_once = 0
        later: list = []
        for step in range(2, 400):
            futs = []
            for s, st in zip(snaps, states):
                before = s.stats.predicted_skips
                futs.append(s.snapshot(st, step))
                if s.stats.predicted_skips > before:
                    assert s._pending.done.is_set() and s._pending.early.is_set()  # nothing to wait for
                    predicted_done_at_once += 1
            results = [f.result(timeout=60) for f in futs]
            if all(f.done() for f in hung) and all(r.level == "group" for r in results):
                later = results
                break
            time.sleep(0.05)
        assert predicted_done_at_once > 0, [s.stats for s in snaps]
        assert [f.result().level for f in hung] == ["local"] * n  # aborted at the group-commit timeout
        assert later, "no version reached group level after the hung one was aborted"
        for d in ds:
            assert d.job_status(job_id)["group_committed"][0] == later[0].step
    finally:
        for s in snaps:
            s.close()


def test_a_rank_that_aborts_after_begin_releases_the_other_nodes_at_once(make_daemon, job_id):
    """A rank whose copy fails aborts its step; the other nodes drop it at once (a peer "skip"), not when
    their group commit of it times out, which pinned their slots and skipped every snapshot meanwhile
    (found with examples/ at 100 steps/s on two nodes: one cancelled copy cost 5 s of skips)."""
    from shardkeep.proto.faults import FaultPlan, Phase, Rule

    ports = free_ports(2)
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--insecure",
                       "--group-commit-timeout", "30"]) for i in range(2)]
    wait_until(lambda: all_up(ds), what="group up")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=2, local_world_size=1)
             for i, d in enumerate(ds)]
    snaps[0]._faults = FaultPlan([Rule(Phase.COPY, "raise", 2)])  # rank 0's copy of step 1 fails
    states = [{"w": torch.full((50_000,), float(i))} for i in range(2)]
    try:
        futs = [s.snapshot(st, 0) for s, st in zip(snaps, states)]
        assert [f.result(timeout=60).level for f in futs] == ["group"] * 2
        t0 = time.monotonic()
        futs = [s.snapshot(st, 1) for s, st in zip(snaps, states)]
        with pytest.raises(Exception, match="injected|FaultInjected"):
            futs[0].result(timeout=60)
        r1 = futs[1].result(timeout=60)
        assert r1.level != "group" and "node 0" in r1.reason, r1
        assert time.monotonic() - t0 < 10, "rank 1 waited for its group commit of step 1 to time out"
        # node 1's slot of step 1 is free again: the next step reaches group level on both nodes
        futs = [s.snapshot(st, 2) for s, st in zip(snaps, states)]
        assert [f.result(timeout=60) for f in futs] == [type(r1)(2, "committed", "group")] * 2
    finally:
        for s in snaps:
            s.close()


def test_data_plane_keys_out_of_step_are_rekeyed(make_daemon, job_id):
    """HELLOs queued in both directions during a partition arrive in a burst when it heals, and can leave a
    node sending data under a key its peer no longer holds.  Heartbeats still flow, so nobody greeted again
    and every later group commit timed out (tests/test_partition.py, CI).  Here a stale HELLO "from node 1"
    gives node 0 a send key node 1 never had; node 1 drops node 0's data for it ("no-key"), greets node 0
    again, and versions reach group level again."""
    import asyncio

    from shardkeep.daemon.peerlink import ControlClient, PeerContext, PeerSecurity, new_session_key

    ports = free_ports(2)
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--insecure",
                       "--heartbeat", "0.5", "--group-commit-timeout", "3"]) for i in range(2)]
    wait_until(lambda: all_up(ds), what="group up")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=2, local_world_size=1)
             for i, d in enumerate(ds)]
    states = [{"w": torch.full((300_000,), float(i))} for i in range(2)]

    def step(s: int) -> list:
        futs = [sn.snapshot(st, s) for sn, st in zip(snaps, states)]
        return [f.result(timeout=60) for f in futs]

    async def stale_hello() -> None:
        g0, g1 = ds[0].status()["group"], ds[1].status()["group"]
        pctx = await PeerContext(PeerSecurity("insecure", 1)).start()
        c = ControlClient(pctx, 0, g0["control"]).connect()
        try:
            await c.request("hello", {"group": g1["group"], "node": 1, "gen": g1["generation"],
                                      "control": g1["control"], "data": g1["data"], "key": new_session_key()},
                            timeout=10)
        finally:
            await c.close()
            await pctx.close()

    try:
        assert [r.level for r in step(0)] == ["group"] * 2
        dropped0 = ds[1].status()["group"]["forged_data_frames_dropped"]
        asyncio.run(stale_hello())
        later = None
        for s in range(1, 16):  # bounded: 15 steps of at most the 3 s group-commit timeout each
            rs = step(s)
            if s > 1 and all(r.level == "group" for r in rs):
                later = s
                break
            time.sleep(0.2)
        assert ds[1].status()["group"]["forged_data_frames_dropped"] > dropped0, "the stale key was never used"
        assert later is not None, "no version reached group level after the keys went out of step"
        assert "greeting it again to rekey" in ds[1].log_path.read_text(errors="replace")
    finally:
        for s in snaps:
            s.close()
