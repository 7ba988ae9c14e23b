"""The persist tier: every Nth group-level version to shared storage, in DCP's layout, in the background.

When a version of a job reaches group level on this node and its step crosses
a multiple of ``--persist-every``, the daemon pins its slots and runs the worker
process (``python -m shardkeep.client.persist_worker node``, the daemon's only
torch import) that writes this node's ranks' files into the shared partial
directory ``<persist-dir>/<job>/.step-<step>.p<epoch>``, paced at
``--persist-rate``. Then it sends the coordinator (the group's lowest live node)
``persist-done`` with what the worker wrote. Once every node's part is in, the
coordinator runs the worker's ``commit``: DCP's ``.metadata`` and
``shardkeep.manifest``, the rename to ``step-<step>``, ``latest``, pruning to
``--persist-keep``. Nothing waits on this: a snapshot never does, and a version
whose persist fails (a node down, a worker error) is logged, its partial
directory removed, and the next one is tried. Phases ``persist`` (before a
node's worker) and ``persist-commit`` (before the commit) have fault hooks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import msgpack

from shardkeep.proto.errors import ShardkeepError
from shardkeep.proto.faults import Phase

log = logging.getLogger("shardkeep.persist")

WORKER_LIMIT_S = 3600.0      # one node's worker, or the commit, may take this long
PARTS_WAIT_S = 3600.0        # the coordinator waits this long for every node's part of a version


def latest_step(job_dir: Path) -> int | None:
    try:
        name = os.path.basename(os.readlink(job_dir / "latest"))
    except OSError:
        return None
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def _skipped(part: bytes) -> bool:
    """A node's part that says it skipped the version (small: a real part is a map with "ranks")."""
    if len(part) > 4096:
        return False
    try:
        d = msgpack.unpackb(part, raw=False)
    except (ValueError, msgpack.UnpackException):
        return False
    return isinstance(d, dict) and "skipped" in d


class Persister:
    def __init__(self, daemon: Any) -> None:
        self.d = daemon
        cfg = daemon.cfg
        self.root = Path(cfg.persist_dir)
        self.every, self.rate, self.keep = cfg.persist_every, cfg.persist_rate, cfg.persist_keep
        self.work = Path(cfg.state_dir) / "persist"
        self.work.mkdir(parents=True, exist_ok=True)
        for p in self.work.iterdir():  # leftovers of a previous run
            p.unlink(missing_ok=True)
        self.last: dict[str, int] = {}                      # job -> the last step this node started to persist
        self.parts: dict[tuple[str, int, int], dict[int, bytes]] = {}  # coordinator: (job, step, epoch) -> parts
        self.tasks: set[asyncio.Task] = set()
        self.busy: set[str] = set()                         # jobs whose part this node is writing now
        # group-level versions kept while this node's part is written (rank 0's node reads other nodes'
        # dp_shard slices of the version over the peer plane): released after, if a newer one replaced them
        self.holding: set[tuple[str, int, int]] = set()
        self.stats: dict[str, Any] = {"started": 0, "written": 0, "committed": 0, "failed": 0, "skipped_busy": 0,
                                      "last_error": "", "newest": {}}

    # --- status ---------------------------------------------------------------------------------------------

    def status(self) -> dict:
        return {"dir": str(self.root), "every": self.every, "rate": self.rate, "keep": self.keep,
                "running": len(self.tasks), **self.stats}

    # --- this node's part -----------------------------------------------------------------------------------

    def due(self, job: Any, step: int) -> bool:
        """Whether (job, step) crosses a multiple of ``every`` since the job's previous group-level version:
        the same answer on every node, which all see the same group-level versions (a single node: since
        the last step it persisted, or the step ``latest`` names)."""
        if self.d.group is not None:
            prev = [s for s in job.group_recorded if s < step]
            last = max(prev) if prev else None
        else:
            last = self.last.get(job.job, latest_step(self.root / job.job))
        return last is None or step // self.every > last // self.every

    def version_committed(self, job: Any, step: int, epoch: int, slots: list) -> None:
        """(job, step) reached group level here (or local level, single node): persist it if it is due."""
        if not self.due(job, step):
            return
        group = self.d.group
        if job.job in self.busy:
            # still writing an older version: not this one (each pins a slot, snapshots would skip); the other
            # nodes may have started it, so the coordinator is told, and drops the version's partial directory
            log.warning("job %s: persist of step %d is due while an older version is still being written here: "
                        "skipped (make --persist-every larger or --persist-rate higher)", job.job, step)
            self.stats["skipped_busy"] += 1
            self._spawn(self._send_skip(job.job, step, epoch, group.node if group is not None else 0))
            return
        self.busy.add(job.job)
        self.last[job.job] = step
        token = f"persist-{step}-{epoch}"
        for s in slots:  # the version must stay whole until the worker has read it
            s.pins[token] = time.monotonic() + WORKER_LIMIT_S
        if group is not None and group.gc is not None:
            node = group.node
            by_node = {n: msgpack.unpackb(raw, raw=False, strict_map_key=False)
                       for n, raw in group.gc.manifests_of(job.job, step, epoch).items()}
        else:
            node = 0
            by_node = {0: {s.header.rank: bytes(s.mm[s.header.manifest_offset:
                                                      s.header.manifest_offset + s.header.manifest_len])
                           for s in slots}}
        if group is not None:
            self.holding.add((job.job, step, epoch))
        self._spawn(self._node(job.job, step, epoch, node, by_node, slots, token))

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def _node(self, job: str, step: int, epoch: int, node: int, by_node: dict, slots: list, token: str) -> None:
        tag = f"p{epoch}"
        base = self.work / f"{job}-{step}-{epoch}"
        task_file, out_file = base.with_suffix(".task"), base.with_suffix(".out")
        self.stats["started"] += 1
        try:
            await self.d.faults.ahit(Phase.PERSIST)
            task_file.write_bytes(msgpack.packb({"node": node, "epoch": epoch, "manifests": by_node},
                                                use_bin_type=True))
            await self._run("node", job, step, ["--socket", self.d.cfg.socket, "--manifests", str(task_file),
                                                "--dir", str(self.root), "--tag", tag, "--out", str(out_file),
                                                "--rate", str(self.rate)])
            part = out_file.read_bytes()
            self.stats["written"] += 1
            await self._send_part(job, step, epoch, node, part)
        except (ShardkeepError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
            self._failed(job, step, f"node {node}'s part: {exc}")
        finally:
            self.busy.discard(job)
            self._unhold((job, step, epoch))
            for s in slots:
                s.pins.pop(token, None)
            task_file.unlink(missing_ok=True)
            out_file.unlink(missing_ok=True)

    def _unhold(self, key: tuple[str, int, int]) -> None:
        if key not in self.holding:
            return
        self.holding.discard(key)
        gc = self.d.group.gc
        if key in gc.versions and any(k[0] == key[0] and k[1] > key[1] and v.decided == "commit"
                                      for k, v in gc.versions.items()):
            gc.release(*key)  # a newer group-level version replaced it meanwhile

    async def _send_skip(self, job: str, step: int, epoch: int, node: int) -> None:
        try:
            await self._send_part(job, step, epoch, node, msgpack.packb({"skipped": "busy with an older version"}))
        except ShardkeepError as exc:
            log.warning("job %s step %d: telling the coordinator this node skipped it failed: %s", job, step, exc)

    async def _send_part(self, job: str, step: int, epoch: int, node: int, part: bytes) -> None:
        group = self.d.group
        coord = group.coordinator() if group is not None else 0
        if coord == node:
            self.part_in(node, {"job": job, "step": step, "epoch": epoch}, part)
            return
        await group.clients[coord].request(
            "persist-done", {"job": job, "step": step, "epoch": epoch, "files": [], "bytes": len(part)},
            payload=[part], timeout=self.d.cfg.timeouts.client_request * 10)

    async def _run(self, what: str, job: str, step: int, args: list[str]) -> None:
        env = dict(os.environ)
        env.pop("SHARDKEEP_FAULTS", None)  # the daemon's fault rules are its own
        if self.d.tokens is not None:  # multi-user mode: the worker reads any job with the daemon's own token
            env["SHARDKEEP_JOB_TOKEN"] = self.d.tokens.internal
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shardkeep.client.persist_worker", what, "--job", job, "--step", str(step), *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), WORKER_LIMIT_S)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the persist worker ({what}) ran past {WORKER_LIMIT_S:.0f} s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the persist worker ({what}) exited {proc.returncode}: "
                               f"{err.decode(errors='replace').strip()[-2000:]}")

    def _failed(self, job: str, step: int, why: str) -> None:
        self.stats["failed"] += 1
        self.stats["last_error"] = f"job {job} step {step}: {why}"[:2000]
        log.error("persist of job %s step %d failed: %s", job, step, why)

    # --- the coordinator ------------------------------------------------------------------------------------

    def part_in(self, src: int, f: dict, payload: bytes) -> None:
        """Node ``src``'s part of a version is written (``persist-done``); commit once every node's is."""
        key = (f["job"], f["step"], f.get("epoch", 0))
        parts = self.parts.get(key)
        if parts is None:
            parts = self.parts[key] = {}
            asyncio.get_running_loop().call_later(PARTS_WAIT_S, self._give_up, key)
        parts[src] = payload
        n = self.d.group.placement.n if self.d.group is not None else 1
        if len(parts) == n:
            del self.parts[key]
            busy = [j for j, p in sorted(parts.items()) if _skipped(p)]
            if busy:
                log.info("job %s step %d not persisted: nodes %s were still writing an older version", key[0],
                         key[1], busy)
                self._drop_partial(*key)
                return
            self._spawn(self._commit(*key, parts))

    def _give_up(self, key: tuple[str, int, int]) -> None:
        parts = self.parts.pop(key, None)
        if parts is not None:
            self._failed(key[0], key[1], f"only nodes {sorted(parts)} sent their part within {PARTS_WAIT_S:.0f} s")
            self._drop_partial(*key)

    def _drop_partial(self, job: str, step: int, epoch: int) -> None:
        """Remove a version's partial directory, off the event loop (shared storage can be slow)."""
        path = self.root / job / f".step-{step}.p{epoch}"

        async def drop() -> None:
            await asyncio.get_running_loop().run_in_executor(None, shutil.rmtree, path, True)

        self._spawn(drop())

    async def _commit(self, job: str, step: int, epoch: int, parts: dict[int, bytes]) -> None:
        files = []
        try:
            await self.d.faults.ahit(Phase.PERSIST_COMMIT)
            for node, data in sorted(parts.items()):
                f = self.work / f"{job}-{step}-{epoch}.part{node}"
                f.write_bytes(data)
                files.append(f)
            await self._run("commit", job, step, ["--dir", str(self.root), "--tag", f"p{epoch}",
                                                  "--keep", str(self.keep), *map(str, files)])
            self.stats["committed"] += 1
            self.stats["newest"][job] = step
            log.info("job %s step %d persisted to %s", job, step, self.root / job / f"step-{step}")
        except (ShardkeepError, OSError, RuntimeError, asyncio.TimeoutError) as exc:
            self._failed(job, step, f"commit: {exc}")
            self._drop_partial(job, step, epoch)
        finally:
            for f in files:
                f.unlink(missing_ok=True)
