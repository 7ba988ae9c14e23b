"""Real training, real SIGKILLs: a resumed run must end bitwise equal to an uninterrupted one."""

from __future__ import annotations

import random

import pytest

from trainerproc import Trainer, assert_bitwise_equal, load

STEPS = 30

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.pt"
    t = Trainer("/nonexistent.sock", "ref", STEPS, out, extra=["--no-snapshot"])
    done = t.finish()
    assert done["ran"] == STEPS
    return load(out)


def _resume_and_check(daemon, job, tmp_path, reference, expected: int) -> None:
    out = tmp_path / "resumed.pt"
    t = Trainer(daemon.socket, job, STEPS, out, seed=4242)
    done = t.finish()
    assert t.restored() == expected, f"restored {t.restored()}, daemon's record said {expected}"
    assert done["first"] == expected + 1 and done["ran"] == STEPS - expected - 1
    assert_bitwise_equal(reference, load(out))


def _newest(daemon, job) -> int:
    st = daemon.job_status(job)
    assert st is not None and st["restorable"], f"daemon holds nothing for {job}: {st}"
    return st["restorable"][0]


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_trainer_at_a_random_moment(daemon, job_id, tmp_path, reference, seed):
    rnd = random.Random(seed)
    t = Trainer(daemon.socket, job_id, STEPS, tmp_path / "killed.pt", sleep=0.05)
    k = rnd.randrange(3, STEPS - 8)
    t.wait_for(lambda e: e.get("event") == "step" and e["step"] >= k)
    import time
    time.sleep(rnd.uniform(0, 0.1))  # anywhere inside a step: copy, commit, compute
    t.kill()
    expected = _newest(daemon, job_id)
    committed = t.committed()
    assert committed and expected >= max(committed), (expected, committed)
    assert expected < STEPS - 1
    _resume_and_check(daemon, job_id, tmp_path, reference, expected)


def test_sigkill_trainer_in_the_middle_of_a_copy(daemon, job_id, tmp_path, reference):
    # the fault hook kills the trainer halfway through the 13th copy into shared memory
    env = {"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": "copy:crash:13"}
    t = Trainer(daemon.socket, job_id, STEPS, tmp_path / "killed.pt", env=env)
    rc = t.proc.wait(timeout=300)
    t._reader.join(timeout=10)
    assert rc == -9, f"trainer was not killed mid-copy (rc {rc})"
    # the 12 copies before it committed; the 13th is half-written in its slot, never committed
    committed = t.committed()
    assert len(committed) == 12, committed
    slots = daemon.job_status(job_id)["ranks"]["0"]["slots"]
    torn = [s["step"] for s in slots if s["state"] == "writing"]
    assert len(torn) == 1 and torn[0] not in committed, slots
    expected = _newest(daemon, job_id)
    assert expected == max(committed) < torn[0]
    _resume_and_check(daemon, job_id, tmp_path, reference, expected)


def test_sigkill_daemon_then_restart_re_adopts(make_daemon, job_id, tmp_path, reference):
    d = make_daemon()
    t = Trainer(d.socket, job_id, 12, tmp_path / "first.pt")
    t.finish()
    before = d.job_status(job_id)["restorable"]
    assert before[0] == 11
    d.kill()  # SIGKILL: no clean shutdown
    d.start()
    st = d.status()
    assert st["adopted_slots"] >= 2 and st["dropped_bad_slots"] == 0
    assert d.job_status(job_id)["restorable"] == before
    # a run of 30 steps resumes at 12 from the re-adopted slots
    _resume_and_check(d, job_id, tmp_path, reference, 11)


def test_daemon_killed_while_training_runs(make_daemon, job_id, tmp_path, reference):
    """The trainer is never held by a dead daemon: it trains on, and commits again once one is back."""
    d = make_daemon()
    t = Trainer(d.socket, job_id, STEPS, tmp_path / "survivor.pt", sleep=0.15)
    t.wait_for(lambda e: e.get("event") == "committed" and e["step"] >= 5)
    d.kill()
    t.wait_for(lambda e: e.get("event") == "not-committed")
    d.start()
    t.wait_for(lambda e: e.get("event") == "committed" and e["step"] > 8, timeout=120)
    done = t.finish()
    assert done["ran"] == STEPS
    assert_bitwise_equal(reference, load(tmp_path / "survivor.pt"))  # snapshotting never changed training
    assert _newest(d, job_id) == STEPS - 1
