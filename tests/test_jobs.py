"""A job's record of versions (pure logic of shardkeep.daemon.jobs)."""

from __future__ import annotations

from shardkeep.daemon.jobs import JobState


def test_the_record_keeps_the_group_level_version_however_many_local_ones_follow():
    # degraded: local versions go on, the group-level one's slot is kept whole and must stay restorable
    j = JobState("job-a", 4, 1)
    j.group_recorded = [3]
    assert j._trimmed(list(range(3, 40))) == [3] + list(range(24, 40))
    assert j._trimmed(list(range(3, 10))) == list(range(3, 10))
    j.group_recorded = []
    assert j._trimmed(list(range(3, 40))) == list(range(24, 40))
