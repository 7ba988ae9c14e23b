"""Flipped bytes in shared memory: never served silently."""

from __future__ import annotations

import mmap
import os

import pytest
import torch

from shardkeep.client import IntegrityError, Snapshotter
from shardkeep.proto.slotfile import HEADER_SIZE, STATE_COMMITTED, SlotHeader


def _snap(daemon, job):
    return Snapshotter(socket=daemon.socket, job=job, rank=0, world_size=1)


def _committed_slot(daemon, job, step) -> tuple[str, SlotHeader]:
    for p in daemon.segments():
        if f"-{job}-" not in p.name:
            continue
        with open(p, "rb") as f:
            h = SlotHeader.unpack(f.read(HEADER_SIZE), str(p))
        if h.state == STATE_COMMITTED and h.step == step:
            return str(p), h
    raise AssertionError(f"no committed slot of step {step}")


def _flip(path: str, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 0)
        mm[offset] ^= 0x01
        mm.close()
    finally:
        os.close(fd)


def _two_versions(daemon, job):
    """Step 1 (all 1.0) and step 2 (all 2.0), both whole in their slots."""
    snap = _snap(daemon, job)
    t = torch.zeros(300_000)  # > 1 MiB: several checksum chunks
    for step in (1, 2):
        t.fill_(float(step))
        assert snap.snapshot({"t": t}, step).result(timeout=30).status == "committed"
    return snap


@pytest.mark.parametrize("where", ["data-first-chunk", "data-last-byte", "manifest"])
def test_flipped_byte_falls_back_to_the_previous_version(daemon, job_id, where):
    snap = _two_versions(daemon, job_id)
    path, h = _committed_slot(daemon, job_id, 2)
    off = {
        "data-first-chunk": h.data_offset + 17,
        "data-last-byte": h.data_offset + 300_000 * 4 - 1,
        "manifest": h.manifest_offset + h.manifest_len // 2,
    }[where]
    _flip(path, off)
    out = {"t": torch.zeros(300_000)}
    assert snap.restore(out) == 1
    assert torch.equal(out["t"], torch.ones(300_000))
    info = snap.last_restore
    assert info.step == 1 and [s for s, _ in info.fell_back_from] == [2], info
    assert "checksum" in info.fell_back_from[0][1]
    # the bad version is dropped, never offered again
    assert 2 not in snap.versions()
    assert daemon.status()["dropped_bad_slots"] == 1
    snap.close()


def test_every_version_corrupt_raises_and_restores_nothing_silently(daemon, job_id):
    snap = _two_versions(daemon, job_id)
    for step in (1, 2):
        path, h = _committed_slot(daemon, job_id, step)
        _flip(path, h.data_offset + 5)
    out = {"t": torch.full((300_000,), 7.0)}
    with pytest.raises(IntegrityError, match="no intact version"):
        snap.restore(out)
    snap.close()


def test_corruption_while_the_daemon_is_down_is_dropped_at_adoption(daemon, job_id):
    snap = _two_versions(daemon, job_id)
    snap.close()
    daemon.kill()
    path, h = _committed_slot(daemon, job_id, 2)
    _flip(path, h.data_offset + 1_100_000)
    daemon.start()
    st = daemon.status()
    assert st["dropped_bad_slots"] == 1
    assert daemon.job_status(job_id)["restorable"] == [1]
    assert not os.path.exists(path)
    with _snap(daemon, job_id) as snap:
        out = {"t": torch.zeros(300_000)}
        assert snap.restore(out) == 1 and torch.equal(out["t"], torch.ones(300_000))


def test_scribbled_header_is_dropped_at_adoption(daemon, job_id):
    snap = _two_versions(daemon, job_id)
    snap.close()
    daemon.kill()
    path, _ = _committed_slot(daemon, job_id, 2)
    _flip(path, 40)  # inside the header
    daemon.start()
    assert daemon.status()["dropped_bad_slots"] == 1
    assert daemon.job_status(job_id)["restorable"] == [1]


def test_versions_kept_by_a_resume_survive_a_daemon_restart(daemon, job_id):
    t = torch.zeros(10)
    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1, slots=4) as snap:
        for step in range(4):
            t.fill_(step)
            snap.snapshot({"t": t}, step).result(timeout=30)
        daemon.request("resume", {"job": job_id, "rank": 0, "step": 2})  # drops 3, keeps 2, 1, 0
        assert snap.versions() == [2, 1, 0]
        t.fill_(10)
        snap.snapshot({"t": t}, 3).result(timeout=30)  # the new history's step 3
    daemon.kill()
    daemon.start()
    assert daemon.job_status(job_id)["restorable"] == [3, 2, 1, 0]
    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1) as snap:
        out = {"t": torch.zeros(10)}
        assert snap.restore(out) == 3 and torch.equal(out["t"], torch.full((10,), 10.0))


def test_a_wiped_segment_falls_back_and_is_dropped(daemon, job_id):
    _two_versions(daemon, job_id).close()
    path, _ = _committed_slot(daemon, job_id, 2)
    os.unlink(path)  # /dev/shm lost a file while the daemon runs
    snap = _snap(daemon, job_id)  # a restarted trainer: no mapping of the old file
    out = {"t": torch.zeros(300_000)}
    assert snap.restore(out) == 1 and torch.equal(out["t"], torch.ones(300_000))
    assert [s for s, _ in snap.last_restore.fell_back_from] == [2]
    assert 2 not in snap.versions()
    snap.close()
