"""A whole node is lost (trainer, daemon, shared memory, state dir); a replacement is rebuilt from its peers."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from conftest import SHM, shardkeep_cmd
from shardkeep.client import Snapshotter
from shardkeep.daemon.groupmeta import ParityRecord
from shardkeep.proto.errors import UnavailableError
from test_group_membership import all_up, free_ports, peers_arg, wait_until

pytestmark = pytest.mark.slow


def common_flags(m: int) -> list[str]:
    return ["--parity", str(m), "--insecure", "--peer-timeout", "3", "--group-commit-timeout", "20"]


def start_group(make_daemon, n: int, m: int) -> tuple[list, list[int]]:
    ports = free_ports(n)
    ds = [make_daemon(["--peers", peers_arg(ports), "--node", str(i), *common_flags(m)]) for i in range(n)]
    wait_until(lambda: all_up(ds), what="group up")
    return ds, ports


def lose(d) -> None:
    """A whole node gone: daemon SIGKILLed, its shared memory and state dir wiped."""
    d.kill()
    d.wipe_shm()
    shutil.rmtree(d.state_dir, ignore_errors=True)


@pytest.mark.parametrize("n,m", [(3, 1), (4, 2)])
def test_replacement_rebuilt_by_shardkeep_recover_restores_bitwise(make_daemon, job_id, n, m):
    ds, ports = start_group(make_daemon, n, m)
    common = common_flags(m)
    g = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(300_000 + 7_777 * i, generator=g), "b": torch.arange(i + 3), "step": 0}
              for i in range(n)]
    saved = {}
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    try:
        for step in range(3):
            futs = []
            for st, snap in zip(states, snaps):
                st["w"].mul_(1.5).add_(step)
                st["step"] = step
                futs.append(snap.snapshot(st, step))
            assert [f.result(timeout=60).level for f in futs] == ["group"] * n
        saved = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()} for st in states]
    finally:
        for s in snaps:
            s.close()
    lost = list(range(n - m, n))  # m whole nodes: trainer gone, daemon killed, shm and state dir wiped
    for i in lost:
        lose(ds[i])
    new_ports = ports[:]
    for i in lost:
        new_ports[i] = free_ports(1)[0]
    reps = {i: make_daemon(["--peers", peers_arg(new_ports), "--node", str(i), *common]) for i in lost}
    for i, rep in reps.items():
        wait_until(lambda rep=rep: all(p["up"] for p in rep.status()["group"]["peers"] if p["node"] not in lost),
                   what=f"replacement {i} joined")
        assert rep.status()["group"]["generation"] == 2
    for i, rep in reps.items():
        r = subprocess.run(shardkeep_cmd("recover", "--socket", rep.socket), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr + rep.log()
        assert f"job {job_id} step 2" in r.stdout and "verified" in r.stdout
        prog = rep.status()["recover"]
        assert prog["state"] == "done" and prog["stripes_done"] == prog["stripes_total"] == n
        assert prog["bytes_fetched"] > 0 and 0 < prog["seconds"] < 300
    for i, rep in reps.items():
        assert rep.job_status(job_id)["restorable"] == [2]
        fresh = {"w": torch.zeros_like(saved[i]["w"]), "b": torch.zeros_like(saved[i]["b"]), "step": -1}
        with Snapshotter(socket=rep.socket, job=job_id, rank=i, world_size=n, local_world_size=1) as snap:
            assert snap.restore(fresh) == 2
        assert torch.equal(fresh["w"], saved[i]["w"]) and torch.equal(fresh["b"], saved[i]["b"])
        assert fresh["step"] == 2


def test_recover_on_a_daemon_without_a_group_fails_clearly(daemon):
    r = subprocess.run(shardkeep_cmd("recover", "--socket", daemon.socket), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and "no group" in r.stderr


def test_more_than_m_lost_nodes_is_a_clear_error_and_nothing_is_restored(make_daemon, job_id):
    n, m = 3, 1
    ds, ports = start_group(make_daemon, n, m)
    common = common_flags(m)
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    try:
        futs = [s.snapshot({"w": torch.full((100_000,), float(i))}, 0) for i, s in enumerate(snaps)]
        assert [f.result(timeout=60).level for f in futs] == ["group"] * n
    finally:
        for s in snaps:
            s.close()
    for i in (1, 2):  # m + 1 whole nodes
        lose(ds[i])
    new_ports = [ports[0]] + free_ports(2)
    rep = make_daemon(["--peers", peers_arg(new_ports), "--node", "1", *common])
    wait_until(lambda: next(p for p in rep.status()["group"]["peers"] if p["node"] == 0)["up"], what="joined")
    r = subprocess.run(shardkeep_cmd("recover", "--socket", rep.socket), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"job {job_id!r} step 0" in r.stderr and "nodes [1, 2] do not hold it" in r.stderr, r.stderr
    assert "only nodes [0] hold it" in r.stderr
    assert rep.job_status(job_id) is None and rep.segments() == []
    with Snapshotter(socket=rep.socket, job=job_id, rank=1, world_size=n, local_world_size=1) as snap:
        out = {"w": torch.zeros(100_000)}
        with pytest.raises(UnavailableError, match=r"nodes \[1, 2\] do not hold it"):
            snap.restore(out)
        assert torch.equal(out["w"], torch.zeros(100_000))  # nothing was written


def test_a_replacement_not_yet_recovered_refuses_to_restore_nothing(make_daemon, job_id):
    """restore() on a node that lost its memory says so instead of starting the job from scratch."""
    n, m = 3, 1
    ds, ports = start_group(make_daemon, n, m)
    common = common_flags(m)
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    try:
        futs = [s.snapshot({"w": torch.full((1000,), float(i))}, 4) for i, s in enumerate(snaps)]
        assert [f.result(timeout=60).level for f in futs] == ["group"] * n
    finally:
        for s in snaps:
            s.close()
    lose(ds[2])
    rep = make_daemon(["--peers", peers_arg(ports[:2] + free_ports(1)), "--node", "2", *common])
    wait_until(lambda: all(p["up"] for p in rep.status()["group"]["peers"]), what="joined")
    with Snapshotter(socket=rep.socket, job=job_id, rank=2, world_size=n, local_world_size=1) as snap:
        with pytest.raises(UnavailableError, match=r"nodes \[0, 1\] hold step 4 at group level.*shardkeep recover"):
            snap.restore({"w": torch.zeros(1000)})
    # a job the group never saw is simply new
    with Snapshotter(socket=rep.socket, job=job_id + "-new", rank=2, world_size=n, local_world_size=1) as snap:
        assert snap.restore({"w": torch.zeros(1000)}) is None


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_a_restarted_daemon_re_adopts_its_parity_and_a_later_node_loss_is_still_recovered(
        make_daemon, job_id, how):
    """Node 1's daemon restarts (shm survives); then node 2 is lost: rebuilding it needs node 1's parity."""
    import signal

    n, m = 3, 1
    ds, ports = start_group(make_daemon, n, m)
    common = common_flags(m)
    g = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(250_000 + 999 * i, generator=g)} for i in range(n)]
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    try:
        for step in (3, 4):
            futs = [s.snapshot(st, step) for s, st in zip(snaps, states)]
            assert [f.result(timeout=60).level for f in futs] == ["group"] * n
    finally:
        for s in snaps:
            s.close()
    names = sorted(p.name for p in ds[1].segments() if "-g-" in p.name)
    (meta,) = [x for x in names if "-g-meta-" in x]
    rec = ParityRecord.decode((SHM / meta).read_bytes())
    before = sorted([meta, rec.parity])
    # beside the record and the parity it names: step 3's parity segment and the staging ring, kept as
    # spares for the next version
    assert rec.step == 4 and len(names) == 4 and sum("-g-parity-" in x for x in names) == 2, names
    ds[1].kill(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    after = sorted(p.name for p in ds[1].segments() if "-g-" in p.name)
    assert after == (names if how == "sigkill" else before)  # a clean stop removes the spares
    ds[1].start()
    wait_until(lambda: all_up(ds), what="group up again")
    assert sorted(p.name for p in ds[1].segments() if "-g-" in p.name) == before  # spares removed at start
    job = ds[1].job_status(job_id)
    assert job["group_committed"] == [4] and job["restorable"][0] == 4
    (v,) = [v for v in ds[1].status()["group"]["versions"] if v["job"] == job_id]
    assert v["group_committed"] and v["parity_stripes"] == [1]
    assert ds[1].status()["dropped_bad_slots"] == 0
    # now node 2 is lost for good
    lose(ds[2])
    rep = make_daemon(["--peers", peers_arg(ports[:2] + free_ports(1)), "--node", "2", *common])
    wait_until(lambda: all(p["up"] for p in rep.status()["group"]["peers"]), what="replacement joined")
    r = subprocess.run(shardkeep_cmd("recover", "--socket", rep.socket), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"job {job_id} step 4" in r.stdout, r.stdout + r.stderr + rep.log()
    out = {"w": torch.zeros_like(states[2]["w"])}
    with Snapshotter(socket=rep.socket, job=job_id, rank=2, world_size=n, local_world_size=1) as snap:
        assert snap.restore(out) == 4
    assert torch.equal(out["w"], states[2]["w"])


def test_group_leftovers_are_removed_when_a_daemon_starts_without_its_group(make_daemon, job_id):
    d = make_daemon()
    d.stop()
    for name in (f"{d.prefix}-g-parity-{job_id}-3-abc", f"{d.prefix}-g-meta-{job_id}-3-abc",
                 f"{d.prefix}-g-stage-{job_id}-4-abc"):
        (SHM / name).write_bytes(b"x" * 100)
    d.start()
    assert [p for p in d.segments() if "-g-" in p.name] == []
    assert d.status()["dropped_bad_slots"] == 0


@pytest.mark.parametrize("mode", ["curve", "encrypt-data"])
def test_group_commit_and_recover_over_curve(make_daemon, job_id, tmp_path, mode):
    """The default peer security (CURVE control, BLAKE3-tagged data) and full encryption carry the
    whole group commit and rebuild; the replacement holds the lost node's key at a new address."""
    kdir = tmp_path / "keys"
    r = subprocess.run(shardkeep_cmd("keygen", "--nodes", "3", str(kdir)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    n, m = 3, 1

    def flags(i: int) -> list[str]:
        extra = ["--encrypt-data"] if mode == "encrypt-data" else []
        return ["--node", str(i), "--parity", str(m), "--peer-timeout", "3", "--group-commit-timeout", "20",
                "--curve-secret", str(kdir / f"node-{i}.key_secret"), "--curve-public-dir", str(kdir), *extra]

    ports = free_ports(n)
    ds = [make_daemon(["--peers", peers_arg(ports), *flags(i)]) for i in range(n)]
    wait_until(lambda: all_up(ds), what="group up over CURVE")
    assert ds[0].status()["group"]["security"] == mode
    g = torch.Generator().manual_seed(9)
    states = [{"w": torch.randn(400_000 + 13 * i, generator=g)} for i in range(n)]
    snaps = [Snapshotter(socket=d.socket, job=job_id, rank=i, world_size=n, local_world_size=1)
             for i, d in enumerate(ds)]
    try:
        futs = [s.snapshot(st, 1) for s, st in zip(snaps, states)]
        assert [f.result(timeout=60).level for f in futs] == ["group"] * n
    finally:
        for s in snaps:
            s.close()
    assert all(d.status()["group"]["forged_data_frames_dropped"] == 0 for d in ds)
    lose(ds[0])  # the coordinator's node, for good
    rep = make_daemon(["--peers", peers_arg(free_ports(1) + ports[1:]), *flags(0)])
    wait_until(lambda: all(p["up"] for p in rep.status()["group"]["peers"]), what="replacement accepted")
    r = subprocess.run(shardkeep_cmd("recover", "--socket", rep.socket), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"job {job_id} step 1" in r.stdout, r.stdout + r.stderr + rep.log()
    out = {"w": torch.zeros_like(states[0]["w"])}
    with Snapshotter(socket=rep.socket, job=job_id, rank=0, world_size=n, local_world_size=1) as snap:
        assert snap.restore(out) == 1
    assert torch.equal(out["w"], states[0]["w"])
