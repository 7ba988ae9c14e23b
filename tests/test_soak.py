"""Soak with random faults: a gloo job on a group of real daemons is broken at random moments, over and over.

Each round launches the job (restoring what the last round left), lets it
train for a random time, then breaks one thing chosen at random: a trainer
(SIGKILL), a daemon (SIGKILL and restart on the same shm and state dir), a
whole node (trainer and daemon killed, shm and state dir wiped, replaced,
``shardkeep recover``), or nothing but the job itself.  The next round must
restore exactly the step the daemons' records promise, on every rank, and
that state must be bitwise the state the job had at that step when it was
first computed (BLAKE3 of every tensor, reported by the trainer each step);
every step computed in more than one launch must have the same digest in each
(a resumed run is the uninterrupted run).  The test bounds rounds and time
(``--soak-seconds``, 150 s by default) and reports faults injected,
recoveries, bytes verified and losses (which must be zero).
"""

from __future__ import annotations

import random
import secrets
import time

import pytest

from conftest import SUMMARY
from groupjob import (Job, common_restorable, lose_nodes, replace_and_recover, settled, settled_group_step,
                      start_group, wait_until)

pytestmark = pytest.mark.slow

N, M = 4, 1
STEPS = 100_000  # never reached: every round ends in a fault
MAX_ROUNDS = 200
KINDS = ("trainer", "daemon", "node", "job")


def test_random_faults_soak(make_daemon, tmp_path, request):
    budget = request.config.getoption("--soak-seconds")
    seed = int(request.config.getoption("--soak-seed") or secrets.randbits(32))
    rnd = random.Random(seed)
    job_id = f"soak-{seed:08x}"
    ds, ports = start_group(make_daemon, N, M)
    digests: dict[tuple[int, int], str] = {}  # (rank, step) -> digest, from every launch
    counts = {k: 0 for k in KINDS} | {"rounds": 0, "recovers": 0, "restores": 0, "bytes_verified": 0,
                                       "steps_cross_checked": 0, "losses": 0}
    expected: int | None = None
    history: list[str] = []  # what each round did, for the failure message
    t0 = time.monotonic()
    for rnd_i in range(MAX_ROUNDS):
        if time.monotonic() - t0 > budget:
            break
        counts["rounds"] += 1
        job = Job([d.socket for d in ds], job_id, tmp_path / f"round{rnd_i}", seed=1000 + rnd_i, sleep=0.02,
                  steps=STEPS, extra=["--digest"])
        where = f"round {rnd_i} (seed {seed}; " + " | ".join(history[-4:]) + ")"
        # restored what the last round promised, on every rank, bitwise the state first computed at that step
        wait_until(lambda: all(any(e["event"] == "restored" for e in job.events(r)) for r in range(N)) or
                   any(p.poll() is not None for p in job.procs), timeout=120, what=f"{where}: restore")
        assert all(p.poll() is None for p in job.procs), f"{where}: a rank exited\n" + job.logs()
        got = job.restored()
        if got != [expected] * N:
            counts["losses"] += 1
            pytest.fail(f"{where}: ranks restored {got}, the daemons promised {expected}\n{job.logs()}")
        if expected is not None:
            counts["restores"] += 1
            for r in range(N):
                ev = next(e for e in job.events(r) if e["event"] == "restored")
                assert ev["digest"] == digests[(r, expected)], f"{where}: rank {r} step {expected} is not bitwise"
                counts["bytes_verified"] += ev["bytes"]
        # train for a random while (at least a step past the restored one), then break something
        start = -1 if expected is None else expected
        wait_until(lambda: all(any(e["event"] == "step" and e["step"] > start for e in job.events(r))
                               for r in range(N)), timeout=60, what=f"{where}: a step")
        time.sleep(rnd.uniform(0, 2.5))
        kind = rnd.choice(KINDS)
        victim = rnd.randrange(N)
        counts[kind] += 1
        if kind == "trainer":
            job.kill([victim])
        elif kind == "daemon":
            ds[victim].kill()
        elif kind == "node":
            job.kill([victim])
            lose_nodes(ds, [victim])
        job.kill()
        # every step of this launch: the same digest as in any other launch
        for r in range(N):
            for e in job.events(r):
                if e["event"] == "step":
                    d = digests.setdefault((r, e["step"]), e["digest"])
                    assert d == e["digest"], f"{where}: rank {r} step {e['step']} differs from an earlier launch"
                    counts["steps_cross_checked"] += 1
        if kind == "daemon":
            ds[victim].start()
            wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds),
                       what=f"{where}: group up after the restart")
        if kind == "node":
            survivors = [d for i, d in enumerate(ds) if i != victim]
            expected = settled_group_step(survivors, job_id)
            ports = replace_and_recover(make_daemon, ds, ports, [victim], M, job_id, expected)
            counts["recovers"] += 1
        else:
            settled(ds, job_id)
            expected = common_restorable(ds, job_id)
        history.append(f"round {rnd_i}: {kind} {victim} killed -> daemons offer {expected}")
        committed = [set(job.committed_steps(r, "group" if kind == "node" else None)) for r in range(N)]
        promised = max(set.intersection(*committed), default=None)
        if promised is not None and (expected is None or expected < promised):
            counts["losses"] += 1
            pytest.fail(f"{where}: step {promised} was committed on every rank; the daemons now offer {expected}")
    faults = sum(counts[k] for k in KINDS)
    line = (f"soak ({time.monotonic() - t0:.0f} s, seed {seed}): {counts['rounds']} rounds, {faults} faults "
            f"injected ({', '.join(f'{counts[k]} {k}' for k in KINDS)}), {counts['recovers']} node recoveries, "
            f"{counts['restores']} restores, {counts['bytes_verified'] / 1e6:.1f} MB verified bitwise, "
            f"{counts['steps_cross_checked']} step digests cross-checked, {counts['losses']} losses")
    SUMMARY.append(line)
    print("\n" + line)
    assert counts["losses"] == 0
    assert counts["restores"] >= 3 and faults >= 3, f"too few rounds to mean anything: {counts}"
