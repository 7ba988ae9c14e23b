"""A job's record of versions (pure logic of shardkeep.daemon.jobs)."""

from __future__ import annotations

from types import SimpleNamespace

from shardkeep.daemon.jobs import JobState
from shardkeep.proto.slotfile import STATE_COMMITTED, STATE_FREE, STATE_WRITING


def test_the_record_keeps_the_group_level_version_however_many_local_ones_follow():
    # degraded: local versions go on, the group-level one's slot is kept whole and must stay restorable
    j = JobState("job-a", 4, 1)
    j.group_recorded = [3]
    assert j._trimmed(list(range(3, 40))) == [3] + list(range(24, 40))
    assert j._trimmed(list(range(3, 10))) == list(range(3, 10))
    j.group_recorded = []
    assert j._trimmed(list(range(3, 40))) == list(range(24, 40))


class _Slot:
    """What JobState reads of a slot, without shared memory."""

    def __init__(self, sid: int, step: int = -1, state: int = STATE_FREE, seq: int = 0) -> None:
        self.id, self.pins, self.epoch = sid, {}, 0
        self.header = SimpleNamespace(state=state, step=step, commit_seq=seq)

    state = property(lambda self: self.header.state)
    step = property(lambda self: self.header.step)
    pinned = property(lambda self: bool(self.pins))
    data_capacity = manifest_capacity = 1

    def mark_free(self) -> None:
        self.header.state, self.header.step = STATE_FREE, -1

    def mark_writing(self, step: int) -> None:
        self.header.state, self.header.step = STATE_WRITING, step


def test_a_job_that_went_back_keeps_the_version_it_restored():
    # found by the random-fault soak: a relaunch restored step 212 (group level) while the node still had
    # steps of the abandoned run in its record; the first snapshot (213) began a new history that dropped
    # every version, 212 included, and the next crash found no version common to all ranks
    j = JobState("job-a", 4, 1)
    rs = j.rank_state(0)
    rs.slots = [_Slot(0, 212, STATE_COMMITTED, 1), _Slot(1)]
    rs.session = "s"
    j.recorded, j.group_recorded = [212, 213], [212]  # 213: the abandoned run's, its slot already reused
    slot, why = j.begin(0, "s", 213)
    assert slot is rs.slots[1] and why == ""
    assert j.history == 2 and j.recorded == [212] and j.group_recorded == [212]
    assert rs.slots[0].state == STATE_COMMITTED and j.restorable() == [212]
    # a job started over from step 0 keeps nothing of the old run
    rs.slots[1].mark_free()
    slot, _ = j.begin(0, "s", 0)
    assert j.recorded == [] and rs.slots[0].state == STATE_FREE
