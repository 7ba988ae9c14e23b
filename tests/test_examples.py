"""examples/ run under torchrun as a user runs them, are killed at a random moment, and resume exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from test_group_membership import free_ports
from trainerproc import assert_bitwise_equal

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _torchrun(script: str, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    port = free_ports(1)[0]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(port), str(EXAMPLES / script),
                             *args], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _trace(path: Path) -> dict[int, list[int]]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line cut by the SIGKILL
            out[e["step"]] = e["ids"]
    return out


@pytest.mark.parametrize("script,seed", [("train_dp.py", 1), ("train_ddp.py", 2)])
def test_example_killed_at_a_random_moment_resumes_with_the_same_batches(daemon, job_id, tmp_path, script, seed):
    pytest.importorskip("torchdata")
    steps = 150  # 64 batches per epoch and rank: the run crosses two epoch boundaries
    env = {**os.environ, "SHARDKEEP_SOCKET": daemon.socket, "OMP_NUM_THREADS": "1"}
    ref = _torchrun(script, ["--steps", str(steps), "--out", str(tmp_path / "ref"),
                                     "--trace", str(tmp_path / "reftrace")],
                    {**env, "SHARDKEEP_JOB": f"{job_id}-ref"}, tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    run = ["--steps", str(steps), "--out", str(tmp_path / "run")]
    first = _torchrun(script, [*run, "--trace", str(tmp_path / "trace")], {**env, "SHARDKEEP_JOB": job_id},
                      tmp_path / "run.log")
    k = random.Random(seed).randrange(40, 120)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(_trace(tmp_path / "trace.0")) < k and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
    # torchrun and both ranks at once (torchrun starts its workers in sessions of their own)
    procs = [psutil.Process(first.pid), *psutil.Process(first.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    first.wait(timeout=30)
    ran_before = max(_trace(tmp_path / "trace.0"))
    newest = daemon.job_status(job_id)["restorable"][0]
    assert ran_before - 8 <= newest <= ran_before, (newest, ran_before)  # the last copies may be in flight or skipped

    again = _torchrun(script, [*run, "--trace", str(tmp_path / "trace2")], {**env, "SHARDKEEP_JOB": job_id},
                      tmp_path / "run.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()[-3000:]
    for r in range(2):
        want = _trace(tmp_path / f"reftrace.{r}")
        resumed = [json.loads(x) for x in (tmp_path / f"trace2.{r}").read_text().splitlines()]
        # it ran exactly the steps after the newest one the daemon held, each with the batch of the uninterrupted run
        assert [e["step"] for e in resumed] == list(range(newest + 1, steps))
        for e in resumed:
            assert e["ids"] == want[e["step"]], f"rank {r} step {e['step']}: another batch than the uninterrupted run"
        a = torch.load(tmp_path / f"ref.{r}", weights_only=True)
        b = torch.load(tmp_path / f"run.{r}", weights_only=True)
        if script == "train_dp.py":  # one all-reduce per gradient: bitwise the uninterrupted run
            assert_bitwise_equal(a, b, f"rank{r}")
            continue
        assert a["sched"] == b["sched"] and a["scaler"] == b["scaler"] and a["progress"] == b["progress"]
        for name, t in a["model"].items():  # DDP's rebuilt buckets: equal to rounding, not bit for bit
            torch.testing.assert_close(b["model"][name], t, rtol=1e-4, atol=1e-5)
