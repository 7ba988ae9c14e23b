"""Package boundaries and the command lines a user runs."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import shardkeep_cmd


def _run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_proto_imports_neither_torch_nor_pyeclib():
    r = _run_py("import sys, shardkeep.proto, shardkeep.proto.wire, shardkeep.proto.manifest, "
                "shardkeep.proto.leaves, shardkeep.proto.transport, shardkeep.proto.faults; "
                "print(sorted(m for m in ('torch', 'pyeclib') if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_client_imports_without_pyeclib():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pyeclib':\n"
        "            raise ImportError('pyeclib is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import shardkeep.client\n"
        "from shardkeep.client import Snapshotter\n"
        "print('pyeclib' in sys.modules, any(m.startswith('shardkeep.daemon') for m in sys.modules))\n"
    )
    r = _run_py(blocker)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"


def test_namespace_package_has_no_top_level_init():
    import shardkeep

    assert getattr(shardkeep, "__file__", None) is None
    assert len(list(shardkeep.__path__)) >= 3 or "site-packages" in str(list(shardkeep.__path__))


def test_help_lists_the_commands():
    r = subprocess.run(shardkeep_cmd("--help"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for cmd in ("daemon", "status", "release", "demo"):
        assert cmd in r.stdout
    r = subprocess.run(shardkeep_cmd("daemon", "--help"), capture_output=True, text=True, timeout=60)
    assert "--memory-limit" in r.stdout and "--shm-prefix" in r.stdout and "--state-dir" in r.stdout


def test_status_without_a_daemon_fails_clearly(tmp_path):
    r = subprocess.run(shardkeep_cmd("status", "--socket", str(tmp_path / "x.sock")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no shardkeep daemon" in r.stderr


def test_bad_memory_limit_is_refused(tmp_path):
    r = subprocess.run(shardkeep_cmd("daemon", "--memory-limit", "lots", "--socket", str(tmp_path / "s")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a size" in r.stderr


def test_status_json_and_table(daemon):
    st = daemon.status()
    assert st["protocol"] == 1 and st["jobs"] == [] and st["memory"]["used"] == 0
    r = subprocess.run(shardkeep_cmd("status", "--socket", daemon.socket), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "no jobs" in r.stdout
    json.dumps(st)


def test_socket_and_segments_are_private(daemon, job_id):
    import os
    import stat

    import torch

    from shardkeep.client import Snapshotter

    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(daemon.socket)).st_mode) == 0o700
    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1) as snap:
        snap.snapshot({"t": torch.ones(4)}, 0).result(timeout=30)
    segs = daemon.segments()
    assert segs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in segs)


def test_second_daemon_on_the_same_prefix_is_refused(daemon, tmp_path):
    r = subprocess.run(
        shardkeep_cmd("daemon", "--socket", str(tmp_path / "other.sock"), "--shm-prefix", daemon.prefix,
                      "--state-dir", str(tmp_path / "st")),
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "another shardkeep daemon" in r.stderr


def test_sigterm_keeps_committed_slots_and_frees_the_rest(daemon, job_id):
    import torch

    from shardkeep.client import Snapshotter

    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1, slots=3) as snap:
        snap.snapshot({"t": torch.ones(4)}, 0).result(timeout=30)
    assert len(daemon.segments()) == 3
    assert daemon.stop() == 0
    import os

    assert not os.path.exists(daemon.socket)
    assert len(daemon.segments()) == 1  # the committed version stays for the next daemon
    assert not os.path.exists(f"/dev/shm/{daemon.prefix}.lock")  # no litter beside it


def test_release_frees_a_job(daemon, job_id):
    import torch

    from shardkeep.client import Snapshotter

    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1) as snap:
        snap.snapshot({"t": torch.ones(4)}, 0).result(timeout=30)
    r = subprocess.run(shardkeep_cmd("release", "--job", job_id, "--socket", daemon.socket),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "2 slots freed" in r.stdout, r.stdout + r.stderr
    assert daemon.segments() == [] and daemon.job_status(job_id) is None
    r = subprocess.run(shardkeep_cmd("release", "--job", job_id, "--socket", daemon.socket),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "no job" in r.stderr


def test_job_ttl_evicts_idle_jobs_and_logs_it(make_daemon, job_id):
    import time

    import torch

    from shardkeep.client import Snapshotter

    d = make_daemon(["--job-ttl", "1"])
    with Snapshotter(socket=d.socket, job=job_id, rank=0, world_size=1) as snap:
        snap.snapshot({"t": torch.ones(4)}, 0).result(timeout=30)
    deadline = time.monotonic() + 20
    while d.job_status(job_id) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert d.job_status(job_id) is None and d.segments() == []
    assert "longer than --job-ttl" in d.log()
