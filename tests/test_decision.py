"""Who decides a group commit, and what the survivors agree on when nodes die in the middle of it.

The data path is left out (no shm, no codec): each node's GroupCommit is driven
through its control messages over an in-memory network that can drop messages
and kill nodes, so every interleaving here is deterministic.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from shardkeep.daemon.groupcommit import GroupCommit, GroupCommitAborted
from shardkeep.daemon.stripes import Placement
from shardkeep.proto.errors import ShardkeepError, ShardkeepTimeoutError


class Net:
    def __init__(self, n: int, m: int) -> None:
        self.n = n
        self.dead: set[int] = set()
        self.suspect: set[tuple[int, int]] = set()   # (observer, j): observer wrongly thinks j is down
        self.drop = lambda src, dst, mtype: False   # tests replace it
        p = Placement(n, m)
        spec = SimpleNamespace(k=p.k, m=m, piece=4096)
        self.gcs = [GroupCommit(i, p, spec, None, f"x{i}", self._no_data, self._broadcaster(i),
                                coordinator=self._coordinator(i), ask=self._asker(i), live=self._live(i),
                                resolve_timeout=3.0, commit_timeout=0.3) for i in range(n)]

    async def _no_data(self, *a, **k) -> None:
        raise AssertionError("no data path in these tests")

    def _live(self, i):
        return lambda: [j for j in range(self.n) if j != i and j not in self.dead and (i, j) not in self.suspect]

    def _coordinator(self, i):
        return lambda: min([i, *self._live(i)()])

    def _broadcaster(self, i):
        async def broadcast(mtype: str, fields: dict, payload=None) -> None:
            if i in self.dead:
                return
            for j in range(self.n):
                if j != i and j not in self.dead and not self.drop(i, j, mtype):
                    self.gcs[j].on_control(i, mtype, fields, payload)
        return broadcast

    def _asker(self, i):
        async def ask(j: int, mtype: str, fields: dict) -> dict:
            if j in self.dead:
                raise ShardkeepError(f"node {j} is down")
            assert mtype == "outcome"
            return {"outcome": self.gcs[j].outcome(fields["job"], fields["step"])}
        return ask

    def acked(self, i: int, step: int = 5) -> None:
        """Node i holds all its parity of the step: it acks (as _stored does)."""
        v = self.gcs[i]._v("job", step)
        v.acked = True
        v.acks.add(i)
        asyncio.get_running_loop().create_task(self.gcs[i].broadcast("ack", {"job": "job", "step": step}))
        self.gcs[i]._check_committed(v)

    async def outcomes(self, nodes, timeout: float = 1.0, step: int = 5) -> dict[int, str]:
        async def one(i):
            try:
                await self.gcs[i].wait("job", step, timeout)
                return "commit"
            except GroupCommitAborted:
                return "abort"
            except ShardkeepTimeoutError:
                return "abort"
        return dict(zip(nodes, await asyncio.gather(*(one(i) for i in nodes))))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_every_node_acks_and_the_coordinator_decides_commit_for_all():
    async def main():
        net = Net(4, 1)
        for i in range(4):
            net.acked(i)
        await asyncio.sleep(0.01)
        out = await net.outcomes(range(4))
        assert out == {i: "commit" for i in range(4)}
        assert all(g.inventory() == [["job", 5, 0]] for g in net.gcs)
    run(main())


def test_acks_alone_do_not_commit_on_a_node_that_is_not_the_coordinator():
    async def main():
        net = Net(3, 1)
        net.drop = lambda src, dst, mtype: mtype == "committed"  # the coordinator's decision is lost
        for i in range(3):
            net.acked(i)
        await asyncio.sleep(0.01)
        assert net.gcs[0].outcome("job", 5) == "commit"
        # nodes 1 and 2 hold every ack but wait for the decision; asked, node 0 tells them
        assert net.gcs[1].outcome("job", 5) == net.gcs[2].outcome("job", 5) == "pending"
        assert (await net.outcomes([1, 2], timeout=0.2)) == {1: "commit", 2: "commit"}
    run(main())


def test_coordinator_dies_after_telling_only_one_node_and_the_survivors_all_commit():
    """The race that would lose data if each node decided alone: some release v-1, others abort v."""
    async def main():
        net = Net(4, 1)
        net.drop = lambda src, dst, mtype: mtype == "committed" and dst != 1
        for i in range(4):
            net.acked(i)
        await asyncio.sleep(0.01)
        net.dead.add(0)  # the coordinator is gone; only node 1 heard "committed"
        assert [net.gcs[i].outcome("job", 5) for i in (1, 2, 3)] == ["commit", "pending", "pending"]
        out = await net.outcomes([1, 2, 3], timeout=0.2)
        assert out == {1: "commit", 2: "commit", 3: "commit"}
    run(main())


def test_coordinator_dies_before_deciding_and_the_new_one_commits_with_every_ack():
    async def main():
        net = Net(4, 1)
        net.drop = lambda src, dst, mtype: src == 0 and mtype == "committed"
        for i in range(4):
            net.acked(i)
        await asyncio.sleep(0.01)
        net.dead.add(0)
        # node 1 is the coordinator now; it holds all four acks, so the version commits
        assert (await net.outcomes([1, 2, 3], timeout=0.2)) == {1: "commit", 2: "commit", 3: "commit"}
    run(main())


def test_a_node_that_dies_before_acking_aborts_the_version_everywhere():
    async def main():
        net = Net(5, 2)
        for i in (0, 1, 2, 4):
            net.acked(i)
        net.dead.add(3)  # died mid-encode: never acked
        await asyncio.sleep(0.01)
        t0 = asyncio.get_running_loop().time()
        out = await net.outcomes([0, 1, 2, 4], timeout=0.3)
        assert out == {i: "abort" for i in (0, 1, 2, 4)}
        assert asyncio.get_running_loop().time() - t0 < 2  # the coordinator's abort reaches everyone
        assert all(net.gcs[i].outcome("job", 5) == "abort" for i in (0, 1, 2, 4))
    run(main())


def test_the_coordinator_and_the_last_acker_die_and_the_survivors_agree_on_abort():
    async def main():
        net = Net(5, 2)
        for i in (0, 1, 2):
            net.acked(i)
        await asyncio.sleep(0.01)
        net.dead |= {0, 4}  # node 4 never acked; the coordinator died undecided
        out = await net.outcomes([1, 2, 3], timeout=0.2)
        assert out == {1: "abort", 2: "abort", 3: "abort"}
    run(main())


def test_a_commit_from_a_node_that_never_saw_our_ack_is_refused():
    async def main():
        net = Net(3, 1)
        v = net.gcs[1]._v("job", 5)
        with pytest.raises(ShardkeepError, match="never acked"):
            net.gcs[1].on_control(0, "committed", {"job": "job", "step": 5})
        assert v.decided == ""
    run(main())


def test_a_version_some_nodes_never_join_is_closed_everywhere():
    """Node 2's trainers died before committing step 5 locally: the others heard of step 5 (and may
    even have acked), node 2 only through their messages. Nobody may keep it open for ever."""
    async def main():
        net = Net(3, 1)
        net.drop = lambda src, dst, mtype: mtype == "abort" and dst == 2  # the coordinator's word is lost
        for i in (0, 1):
            net.acked(i)
        await asyncio.sleep(0.01)
        assert net.gcs[2].outcome("job", 5) == "pending"  # known at node 2 only from the others
        out = await net.outcomes([0, 1], timeout=0.2)
        assert out == {0: "abort", 1: "abort"}
        assert net.gcs[2].outcome("job", 5) == "pending"
        await asyncio.sleep(1.5)  # node 2's watchdog: commit_timeout + 1
        assert all(g.outcome("job", 5) == "abort" for g in net.gcs)
        assert ("job", 5, 0) not in net.gcs[2].versions
        with pytest.raises(GroupCommitAborted):  # joining late is refused at once
            await net.gcs[2].start("job", 5, [])
    run(main())


def test_a_falsely_suspected_coordinator_keeps_deciding_and_nobody_disagrees():
    """Under load node 1 misses node 0's heartbeats and thinks it is the coordinator. Node 0 is alive
    and will commit; node 1 must not abort on its own (which would split the survivors)."""
    async def main():
        net = Net(3, 1)
        net.suspect = {(1, 0), (2, 0)}
        net.drop = lambda src, dst, mtype: mtype == "ack" and src == 2 and dst == 0  # node 0 lacks one ack
        for i in range(3):
            net.acked(i)
        await asyncio.sleep(0.01)
        net.gcs[1].peers_down({0})  # node 1 acts on the suspicion: it asks node 0 first
        await asyncio.sleep(0.05)
        assert [g.outcome("job", 5) for g in net.gcs] == ["pending"] * 3
        net.drop = lambda src, dst, mtype: False
        net.gcs[0].on_control(2, "ack", {"job": "job", "step": 5})  # the late ack: node 0 commits
        await asyncio.sleep(0.01)
        assert [g.outcome("job", 5) for g in net.gcs] == ["commit"] * 3
    run(main())
