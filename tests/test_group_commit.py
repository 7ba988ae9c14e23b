"""A group of real daemons erasure-codes every snapshot; futures resolve at group level."""

from __future__ import annotations

import os
import subprocess
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
    finally:
        for s in snaps:
            s.close()
