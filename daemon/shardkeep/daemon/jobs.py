"""Per-job bookkeeping on one node: ranks, slots, versions, histories, skips.

The invariant: a step is recorded (restorable) only when every rank of the job
on this node committed it in the current history; a step that one rank must
skip is aborted for every rank.  The slot holding the newest recorded version
is never reused until a newer version is recorded.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from shardkeep.proto.errors import NotFoundError, ProtocolError, StaleSessionError
from shardkeep.proto.slotfile import STATE_COMMITTED, STATE_FREE, STATE_WRITING

from .arena import STATE_NAMES, Slot

log = logging.getLogger("shardkeep.daemon")

MAX_ABORTED = 4096


@dataclass
class RankState:
    rank: int
    slots: list[Slot] = field(default_factory=list)
    session: str = ""
    need_data: int = 0          # capacity the current registration asked for
    need_manifest: int = 0
    pid: int = 0

    def committed(self) -> dict[int, Slot]:
        return {s.step: s for s in self.slots if s.state == STATE_COMMITTED}

    def usable(self, s: Slot) -> bool:
        return s.data_capacity >= self.need_data and s.manifest_capacity >= self.need_manifest


@dataclass
class JobState:
    job: str
    world_size: int
    local_world_size: int
    ranks: dict[int, RankState] = field(default_factory=dict)
    history: int = 1
    recorded: list[int] = field(default_factory=list)   # steps, ascending, current history
    group_recorded: list[int] = field(default_factory=list)  # steps whose parity the whole group holds
    aborted: OrderedDict = field(default_factory=OrderedDict)
    commits: int = 0
    skips: int = 0
    last_active: float = field(default_factory=time.time)

    # --- registration ------------------------------------------------------------

    def rank_state(self, rank: int) -> RankState:
        rs = self.ranks.get(rank)
        if rs is None:
            rs = self.ranks[rank] = RankState(rank)
        return rs

    def new_session(self, rank: int) -> str:
        """A new writer for this rank: slots the old writer left half-written become free."""
        rs = self.rank_state(rank)
        for s in rs.slots:
            if s.state == STATE_WRITING:
                s.mark_free()
        rs.session = secrets.token_hex(8)
        return rs.session

    def prune(self, rank: int) -> list[Slot]:
        """Slots too small for the rank's current layout that nobody needs any more.

        The newest recorded version stays until a version of the new layout is
        recorded; pinned slots stay until their reader releases them.
        """
        rs = self.rank_state(rank)
        protected = self.protected_step()
        gone = [
            s for s in rs.slots
            if not rs.usable(s) and not s.pinned and s.state != STATE_WRITING
            and not (s.state == STATE_COMMITTED and s.step == protected)
        ]
        rs.slots = [s for s in rs.slots if s not in gone]
        return gone

    def check_session(self, rank: int, session: str) -> RankState:
        rs = self.ranks.get(rank)
        if rs is None or not rs.session:
            raise StaleSessionError(f"job {self.job!r} rank {rank} is not registered with this daemon")
        if rs.session != session:
            raise StaleSessionError(
                f"job {self.job!r} rank {rank}: another process registered this rank, "
                "or the daemon restarted; register again"
            )
        return rs

    # --- versions ----------------------------------------------------------------

    def protected_step(self) -> int | None:
        """The version whose slot is never reused: the newest group-level one, else the newest local one."""
        if self.group_recorded:
            return self.group_recorded[-1]
        return self.recorded[-1] if self.recorded else None

    def _trimmed(self, steps: list[int]) -> list[int]:
        """The newest 16 recorded steps, and the protected group-level one however old (while degraded,
        local versions go on and would push it out of the record though its slot still holds it)."""
        tail = steps[-16:]
        keep = self.group_recorded[-1] if self.group_recorded else None
        if keep is not None and keep in steps and keep not in tail:
            tail = [keep] + tail
        return tail

    def newest_held(self, rank: int | None = None) -> int:
        """The newest step recorded for the job or committed by ``rank`` (None: by any rank); -1 if none."""
        steps = list(self.recorded)
        for r, rs in self.ranks.items():
            if rank is None or r == rank:
                steps.extend(rs.committed())
        return max(steps, default=-1)

    def drop_versions(self, keep=lambda step: False) -> int:
        """Free every committed slot whose step ``keep`` rejects.

        A pinned slot is marked free at once (its reader holds the manifest and
        verifies the data itself) but is not reused until it is unpinned.
        """
        n = 0
        for rs in self.ranks.values():
            for s in rs.slots:
                if s.state == STATE_COMMITTED and not keep(s.step):
                    s.mark_free()
                    n += 1
        self.recorded = [v for v in self.recorded if keep(v)]
        self.group_recorded = [v for v in self.group_recorded if keep(v)]
        return n

    def start_history(self, reason: str, keep=lambda step: False) -> None:
        self.history += 1
        n = self.drop_versions(keep)
        self.aborted.clear()
        log.info("job %s: new history %d (%s); %d slot versions dropped", self.job, self.history, reason, n)

    def abort_step(self, step: int, why: str) -> None:
        if step in self.aborted:
            return
        self.aborted[step] = why
        while len(self.aborted) > MAX_ABORTED:
            self.aborted.popitem(last=False)
        self.skips += 1
        self.recorded = [v for v in self.recorded if v != step]
        self.group_recorded = [v for v in self.group_recorded if v != step]
        for rs in self.ranks.values():
            for s in rs.slots:
                if s.step == step and s.state == STATE_COMMITTED:
                    s.mark_free()
        log.info("job %s: step %d aborted on every rank (%s)", self.job, step, why)

    def choose_slot(self, rs: RankState) -> Slot | None:
        protected = self.protected_step()
        candidates = [
            s for s in rs.slots
            if rs.usable(s) and not s.pinned and s.state != STATE_WRITING
            and not (s.state == STATE_COMMITTED and s.step == protected)
        ]
        if not candidates:
            return None
        # a free slot first, else the oldest committed version
        return min(candidates, key=lambda s: (s.state != STATE_FREE, s.header.commit_seq))

    def begin(self, rank: int, session: str, step: int, epoch: int = 0) -> tuple[Slot | None, str]:
        rs = self.check_session(rank, session)
        self.last_active = time.time()
        if step <= self.newest_held(rank):
            # the job went back (a restart that restored step - 1 or older, or started over): the versions
            # below the step are its past, those at or above it belong to the abandoned run
            self.start_history(f"rank {rank} snapshots step {step}, not above the newest held version",
                               keep=lambda v: v < step)
        if step in self.aborted:
            return None, f"step {step} was aborted: {self.aborted[step]}"
        slot = self.choose_slot(rs)
        if slot is None:
            why = f"no free slot for rank {rank} (previous version still committing, pinned or protected)"
            self.abort_step(step, why)
            return None, why
        slot.mark_writing(step)
        slot.epoch = epoch
        return slot, ""

    def commit(self, rank: int, step: int, slot: Slot) -> bool:
        """Record the rank's commit; return True when the step became a recorded version."""
        self.commits += 1
        self.last_active = time.time()
        if step in self.aborted:
            slot.mark_free()
            return False
        if all(r in self.ranks and step in self.ranks[r].committed() for r in self.local_ranks()):
            if not self.recorded or step > self.recorded[-1]:
                self.recorded.append(step)
                self.recorded = self._trimmed(self.recorded)
            return True
        return False

    def local_ranks(self) -> list[int]:
        """This node's ranks; ranks that never registered count as missing (negative placeholders)."""
        ranks = sorted(self.ranks)
        if len(ranks) < self.local_world_size:
            return ranks + [-1 - i for i in range(self.local_world_size - len(ranks))]
        return ranks

    def restorable(self) -> list[int]:
        """Recorded steps that every local rank still holds whole, newest first."""
        out = []
        ranks = self.local_ranks()
        for step in reversed(self.recorded):
            if all(
                r in self.ranks and step in self.ranks[r].committed() for r in ranks
            ):
                out.append(step)
        return out

    def find(self, rank: int, step: int) -> Slot:
        rs = self.ranks.get(rank)
        if rs is not None:
            for s in rs.slots:
                if s.state == STATE_COMMITTED and s.step == step:
                    return s
        raise NotFoundError(f"job {self.job!r} rank {rank} holds no committed version of step {step}")

    def slot_by_id(self, rank: int, slot_id: int) -> Slot:
        rs = self.ranks.get(rank)
        for s in rs.slots if rs else ():
            if s.id == slot_id:
                return s
        raise ProtocolError(f"job {self.job!r} rank {rank} has no slot {slot_id}")

    def all_slots(self) -> list[Slot]:
        return [s for rs in self.ranks.values() for s in rs.slots]

    def bytes(self) -> int:
        return sum(s.size for s in self.all_slots())

    def describe(self) -> dict:
        return {
            "job": self.job,
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
            "history": self.history,
            "restorable": self.restorable(),
            "group_committed": list(reversed(self.group_recorded)),
            "newest": (self.restorable() or [None])[0],
            "commits": self.commits,
            "skips": self.skips,
            "bytes": self.bytes(),
            "idle_s": round(time.time() - self.last_active, 1),
            "ranks": {
                str(r): {
                    "registered": bool(rs.session),
                    "slots": [
                        {"id": s.id, "state": STATE_NAMES.get(s.state, "?"), "step": s.step,
                         "bytes": s.size, "pinned": s.pinned}
                        for s in rs.slots
                    ],
                }
                for r, rs in sorted(self.ranks.items())
            },
        }
