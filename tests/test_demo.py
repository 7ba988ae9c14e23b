"""The README's first command: `shardkeep demo` must pass and leave nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import shardkeep_cmd

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("args,expect", [
    # the default: a 4-node group, one node lost for good, rebuilt, the job resumed
    (["--steps", "14", "--seed", "3", "--size", "4MB"], "finished bitwise identical"),
    (["--nodes", "3", "--parity", "1", "--steps", "12", "--seed", "5", "--size", "2MB", "--kill-at", "4"],
     "finished bitwise identical"),
    # one node: the trainer is SIGKILLed and restored from local memory
    (["--nodes", "1", "--steps", "16", "--seed", "3", "--size", "16MB"], "bitwise identical"),
], ids=["group-default", "group-3", "single-node"])
def test_demo_passes_and_cleans_up(tmp_path, args, expect):
    before_tmp = set(Path("/tmp").glob("shardkeep-demo-*"))
    r = subprocess.run(shardkeep_cmd("demo", *args), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    assert expect in r.stdout and "restored step" in r.stdout, r.stdout[-3000:]
    assert list(Path("/dev/shm").glob("skdemo*")) == []
    assert set(Path("/tmp").glob("shardkeep-demo-*")) <= before_tmp
    for pattern in ("shardkeep.daemon.demo_train", "--shm-prefix skdemo"):
        ps = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
        assert ps.stdout.strip() == "", f"left running: {pattern}"
