"""Rotating a node's CURVE key with rolling restarts loses no snapshot (the procedure of docs/SECURITY.md)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from conftest import shardkeep_cmd
from shardkeep.client import Snapshotter
from test_group_membership import all_up, free_ports, group_of, peers_arg, wait_until

pytestmark = pytest.mark.slow


def _w(step: int, rank: int) -> torch.Tensor:
    return torch.randn(50_000, generator=torch.Generator().manual_seed(100 * step + rank))


def _snapshot_all(snaps, step: int) -> list:
    futs = [s.snapshot({"w": _w(step, i), "step": step}, step) for i, s in enumerate(snaps)]
    return [f.result(timeout=60) for f in futs]


def test_a_rotated_node_key_with_rolling_restarts_keeps_every_snapshot(make_daemon, tmp_path, job_id):
    n = 3
    old, new = tmp_path / "old", tmp_path / "new"
    for d in (old, new):
        r = subprocess.run(shardkeep_cmd("keygen", "--nodes", str(n), str(d)), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
    pubs = []
    for i in range(n):  # every node has its own copy of the public keys, as on separate machines
        p = tmp_path / f"pub{i}"
        p.mkdir()
        for j in range(n):
            shutil.copy(old / f"node-{j}.key", p / f"node-{j}.key")
        pubs.append(p)
    ports = free_ports(n)

    def args(i: int, secret_dir) -> list[str]:
        return ["--peers", peers_arg(ports), "--node", str(i), "--parity", "1", "--heartbeat", "0.5",
                "--peer-timeout", "2", "--curve-secret", str(secret_dir / f"node-{i}.key_secret"),
                "--curve-public-dir", str(pubs[i])]

    ds = [make_daemon(args(i, old)) for i in range(n)]
    wait_until(lambda: all_up(ds), what="group up over CURVE")
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    for step in range(3):
        assert [(r.status, r.level) for r in _snapshot_all(snaps, step)] == [("committed", "group")] * n
    for s in snaps:
        s.close()

    # 1. the new public key of node 1 goes to every node; 2. node 1 restarts with its new secret: the others,
    # still holding the old key, refuse it (degraded: snapshots would go on at local level)
    for p in pubs:
        shutil.copy(new / "node-1.key", p / "node-1.key")
    ds[1].stop()
    ds[1].extra = args(1, new)
    ds[1].start()
    wait_until(lambda: group_of(ds[0])["refused_connections"] >= 1, timeout=20, what="the new key refused")
    # 3. the others restart one at a time (SIGTERM, as systemctl restart): each re-adopts its slots and parity
    for i in (0, 2):
        ds[i].stop()
        ds[i].start()
    try:
        wait_until(lambda: all_up(ds), timeout=30, what="group up with node 1's new key")
    except AssertionError:
        raise AssertionError([(g["client_states"], [(p["node"], p["up"], p["error"]) for p in g["peers"]])
                              for g in map(group_of, ds)]) from None
    for d in ds:  # nothing was lost: the group-level version is whole everywhere
        st = d.job_status(job_id)
        assert st["group_committed"][0] == 2 and 2 in st["restorable"], st
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    for i, s in enumerate(snaps):  # every rank restores it bitwise
        back = {"w": torch.zeros(50_000), "step": -1}
        assert s.restore(back) == 2 and back["step"] == 2
        assert torch.equal(back["w"], _w(2, i))
    assert [(r.status, r.level) for r in _snapshot_all(snaps, 3)] == [("committed", "group")] * n
    for s in snaps:
        s.close()
    # the old key of node 1 is worthless now: an impostor holding it is refused by every node
    before = [group_of(d)["refused_connections"] for d in ds]
    imp = make_daemon(["--peers", peers_arg(ports[:1] + free_ports(1) + ports[2:]), "--node", "1", "--parity", "1",
                       "--peer-timeout", "2", "--curve-secret", str(old / "node-1.key_secret"),
                       "--curve-public-dir", str(old)])  # the old keys, as the thief has them
    wait_until(lambda: group_of(ds[0])["refused_connections"] > before[0], timeout=20, what="old key refused")
    assert not any(p["up"] for p in group_of(imp)["peers"])
    imp.stop()
