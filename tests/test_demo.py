"""The README's first command: `shardkeep demo` must pass and leave nothing behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import shardkeep_cmd

pytestmark = pytest.mark.slow


def test_demo_passes_and_cleans_up(tmp_path):
    before_shm = set(Path("/dev/shm").iterdir())
    before_tmp = set(Path("/tmp").glob("shardkeep-demo-*"))
    r = subprocess.run(shardkeep_cmd("demo", "--steps", "16", "--seed", "3", "--size", "16MB"),
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "bitwise identical" in r.stdout
    assert "restored step" in r.stdout
    assert set(Path("/dev/shm").iterdir()) <= before_shm
    assert set(Path("/tmp").glob("shardkeep-demo-*")) <= before_tmp
    ps = subprocess.run(["pgrep", "-f", "shardkeep.daemon.demo_train"], capture_output=True, text=True)
    assert ps.stdout.strip() == ""
