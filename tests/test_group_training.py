"""A multi-node gloo training job over a group of real daemons; whole nodes die, are replaced and rebuilt.

Each "node" is a daemon (own port, shm prefix, state dir) and one trainer
process; the trainers form one torch.distributed gloo job and snapshot every
step.  A lost node loses its trainer, its daemon, its shared memory and its
state dir; every other trainer is killed too (the job restarts as a whole, as
under torchelastic).  A replacement daemon is started, ``shardkeep recover``
rebuilds it, the job restarts from ``restore()`` and trains to the end.
"""

from __future__ import annotations

import random
import time

import pytest

from groupjob import (STEPS, Job, check_resumed, free_ports, group_args, lose_nodes, recover, reference,
                      replace_and_recover, settled_group_step, start_group, wait_until)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("n,m,lost,mode,seed", [
    (4, 1, [2], "dp", 1),
    (5, 2, [0, 3], "dp", 2),   # the coordinator among the lost
    (4, 1, [1], "ddp", 3),
], ids=["n4m1-dp", "n5m2-two-lost-dp", "n4m1-ddp"])
def test_whole_nodes_lost_at_a_random_moment_then_replaced_recovered_and_resumed(
        make_daemon, job_id, tmp_path, n, m, lost, mode, seed):
    ref = reference(n, mode, tmp_path)
    ds, ports = start_group(make_daemon, n, m)
    rnd = random.Random(seed)
    job = Job([d.socket for d in ds], job_id, tmp_path / "run1", mode=mode, sleep=0.05)
    k = rnd.randrange(6, STEPS - 12)
    # at least one version reached group level on every rank before the loss, then a random moment
    wait_until(lambda: all(any(s >= k for s in job.group_steps(r)) for r in range(n)), timeout=180,
               what=f"group level at step {k}")
    time.sleep(rnd.uniform(0, 0.3))
    job.kill(lost)
    lose_nodes(ds, lost)
    job.kill()  # the rest of the job goes down with it and is restarted as a whole
    survivors = [d for i, d in enumerate(ds) if i not in lost]
    expected = settled_group_step(survivors, job_id)
    assert expected >= k
    replace_and_recover(make_daemon, ds, ports, lost, m, job_id, expected)
    check_resumed(Job([d.socket for d in ds], job_id, tmp_path / "run2", mode=mode, seed=777), ref, expected, mode)


@pytest.mark.parametrize("phase", ["chunk-send", "encode", "parity-store", "ack", "group-commit"])
def test_a_node_dies_in_the_middle_of_a_group_commit(make_daemon, job_id, tmp_path, phase):
    """Node 0 (the coordinator) crashes at a named phase of its 4th group commit: nothing is lost,
    and every rank restores the same, last group-committed step."""
    n, m = 4, 1
    ref = reference(n, "dp", tmp_path)
    ports = free_ports(n)
    ds = []
    for i in range(n):
        env = {"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": f"{phase}:crash:4"} if i == 0 else None
        ds.append(make_daemon(group_args(ports, i, m), env=env))
    wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds), what="group up")
    job = Job([d.socket for d in ds], job_id, tmp_path / "run1", sleep=0.05)
    wait_until(lambda: ds[0].proc.poll() is not None, timeout=180, what=f"node 0 crashed at {phase}")
    assert ds[0].proc.returncode == -9, ds[0].log()
    job.kill()
    lose_nodes(ds, [0])
    expected = settled_group_step(ds[1:], job_id)
    replace_and_recover(make_daemon, ds, ports, [0], m, job_id, expected)
    check_resumed(Job([d.socket for d in ds], job_id, tmp_path / "run2", seed=99), ref, expected, "dp")


def test_more_than_m_nodes_lost_every_rank_fails_clearly_and_none_restores(make_daemon, job_id, tmp_path):
    n, m, lost = 4, 1, [1, 2]
    ds, ports = start_group(make_daemon, n, m)
    job = Job([d.socket for d in ds], job_id, tmp_path / "run1", sleep=0.05)
    wait_until(lambda: all(job.group_steps(r) for r in range(n)), timeout=180, what="a group-level version")
    job.kill(lost)
    lose_nodes(ds, lost)
    job.kill()
    new_ports = list(ports)
    for i in lost:
        new_ports[i] = free_ports(1)[0]
        ds[i] = make_daemon(group_args(new_ports, i, m))
    wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds), what="replacements up")
    r = recover(ds[1], timeout=120)
    assert r.returncode == 1 and "nodes [1, 2] do not hold it" in r.stderr, r.stdout + r.stderr
    again = Job([d.socket for d in ds], job_id, tmp_path / "run2", seed=5)
    for p in again.procs:
        p.wait(timeout=180)
    assert [p.returncode for p in again.procs] == [1] * n, again.logs()
    logs = again.logs()
    assert logs.count("UnavailableError") >= n and "nodes [1, 2] do not hold it" in logs, logs
    assert all(not any(e["event"] == "restored" for e in again.events(r)) for r in range(n))
