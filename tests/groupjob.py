"""A multi-node gloo training job over a group of real daemons, for the tests that break it.

Each "node" is a daemon (own port, shm prefix, state dir) and one trainer
(``group_trainer.py``); the trainers form one torch.distributed gloo job and
snapshot every step.  Trainers are forked from a forkserver that imported
torch and shardkeep once, so a launch of the job costs a fork and gloo's
rendezvous, not four imports of torch on two cores.  A lost node loses its
trainer, its daemon, its shared memory and its state dir; the rest of the job
is killed too (it restarts as a whole, as under torchelastic).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import time
from pathlib import Path

import torch

import group_trainer
from conftest import shardkeep_cmd
from test_group_membership import free_ports, peers_arg, wait_until
from trainerproc import assert_bitwise_equal

STEPS = 36
GROUP_FLAGS = ["--insecure", "--heartbeat", "0.5", "--peer-timeout", "2", "--group-commit-timeout", "5"]

_CTX = None


def _context():
    """The forkserver, started once per test session with torch and shardkeep imported."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.parallel", "blake3",
                                     "shardkeep.client", "group_trainer"])
    return _CTX


class _Rank:
    """One trainer process, with the little of ``subprocess.Popen`` the tests use."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.p = _context().Process(target=group_trainer.forked, args=(argv, env, str(log)), daemon=True)
        self.p.start()

    def poll(self) -> int | None:
        return self.p.exitcode

    @property
    def returncode(self) -> int | None:
        return self.p.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.p.join(timeout)
        if self.p.exitcode is None:
            raise subprocess.TimeoutExpired("trainer", timeout or 0)
        return self.p.exitcode

    def kill(self) -> None:
        if self.p.exitcode is None:
            self.p.kill()


class Job:
    """One launch of the job: a trainer per node, all ranks of one gloo world."""

    def __init__(self, sockets: list[str], job: str, out: Path, *, mode: str = "dp", seed: int = 0,
                 sleep: float = 0.0, steps: int = STEPS, extra: list[str] | None = None,
                 env: dict | None = None, rank_env: dict[int, dict] | None = None) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.n, self.steps = out, len(sockets), steps
        port = free_ports(1)[0]
        self.procs: list[_Rank] = []
        for r, sock in enumerate(sockets):
            e = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), WORLD_SIZE=str(self.n),
                     LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", SHARDKEEP_SOCKET=sock, SHARDKEEP_JOB=job,
                     OMP_NUM_THREADS="1", **(env or {}), **((rank_env or {}).get(r, {})))
            argv = ["--steps", str(steps), "--out", str(out / f"rank{r}.pt"), "--events", str(out / f"rank{r}.jsonl"),
                    "--mode", mode, "--seed", str(seed), "--sleep", str(sleep), *(extra or [])]
            self.procs.append(_Rank(argv, e, out / f"rank{r}.log"))

    def events(self, r: int) -> list[dict]:
        p = self.out / f"rank{r}.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by a SIGKILL
                pass
        return out

    def logs(self) -> str:
        return "\n".join(f"--- rank {r}\n" + _tail(self.out / f"rank{r}.log") for r in range(self.n))

    def group_steps(self, r: int) -> list[int]:
        return [e["step"] for e in self.events(r) if e.get("event") == "result" and e.get("level") == "group"]

    def committed_steps(self, r: int, level: str | None = None) -> list[int]:
        return [e["step"] for e in self.events(r) if e.get("event") == "result" and e.get("status") == "committed"
                and (level is None or e.get("level") == level)]

    def kill(self, ranks=None) -> None:
        for r in ranks if ranks is not None else range(self.n):
            self.procs[r].kill()
        for r in ranks if ranks is not None else range(self.n):
            self.procs[r].wait(timeout=30)

    def wait_all(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("the job did not end in time:\n" + self.logs()) from None
        return [p.returncode for p in self.procs]

    def finish(self, timeout: float = 240) -> list[dict]:
        codes = self.wait_all(timeout)
        assert codes == [0] * self.n, f"exit codes {codes}\n" + self.logs()
        return [next(e for e in self.events(r) if e["event"] == "done") for r in range(self.n)]

    def restored(self) -> list[int | None]:
        return [next(e for e in self.events(r) if e["event"] == "restored")["step"] for r in range(self.n)]

    def states(self) -> list[dict]:
        return [torch.load(self.out / f"rank{r}.pt", weights_only=True) for r in range(self.n)]


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"


_REFERENCES: dict[tuple, list[dict]] = {}


def reference(n: int, mode: str, tmp: Path, steps: int = STEPS, extra: list[str] | None = None) -> list[dict]:
    """The uninterrupted run (no shardkeep at all), once per world size, mode, length and model."""
    key = (n, mode, steps, *(extra or []))
    if key not in _REFERENCES:
        job = Job(["/nonexistent.sock"] * n, "ref", tmp / f"ref-{n}-{mode}-{steps}", mode=mode, steps=steps,
                  extra=["--no-snapshot", *(extra or [])])
        job.finish()
        _REFERENCES[key] = job.states()
    return _REFERENCES[key]


def group_args(ports: list[int], i: int, m: int) -> list[str]:
    return ["--peers", peers_arg(ports), "--node", str(i), "--parity", str(m), *GROUP_FLAGS]


def start_group(make_daemon, n: int, m: int, env: dict | None = None,
                node_env: dict[int, dict] | None = None) -> tuple[list, list[int]]:
    ports = free_ports(n)
    ds = [make_daemon(group_args(ports, i, m), env={**(env or {}), **((node_env or {}).get(i, {}))} or None)
          for i in range(n)]
    wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds), what="group up")
    return ds, ports


def settled(daemons, job_id: str, timeout: float = 60) -> None:
    """Until no daemon waits on a group decision for the job."""
    def done() -> bool:
        return all(v["decision"] != "pending" for d in daemons for v in d.status()["group"]["versions"]
                   if v["job"] == job_id)
    wait_until(done, timeout=timeout, what="every daemon decided every version")


def settled_group_step(survivors, job_id: str) -> int:
    """Once no survivor waits on a decision: the newest group-level step, the same on every survivor."""
    settled(survivors, job_id)

    def tops() -> dict:
        return {d.prefix: (d.job_status(job_id)["group_committed"] or [None])[0] for d in survivors}

    try:  # a decision reaches the job's record a moment after the group commit's state
        wait_until(lambda: len(set(tops().values())) == 1, timeout=10, what="one newest group-level step")
    except AssertionError:
        raise AssertionError(f"survivors disagree on the newest group-level step: {tops()}") from None
    top = next(iter(tops().values()))
    assert top is not None, "no version reached group level before the loss"
    for d in survivors:  # that version is whole on every survivor
        assert top in d.job_status(job_id)["restorable"], d.job_status(job_id)
    return top


def common_restorable(daemons, job_id: str) -> int | None:
    """The newest step every daemon's record lists as restorable for the job (one rank per daemon)."""
    sets = []
    for d in daemons:
        st = d.job_status(job_id)
        sets.append(set(st["restorable"]) if st else set())
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def lose_nodes(ds, lost: list[int]) -> None:
    for i in lost:
        ds[i].kill()
        ds[i].wipe_shm()
        shutil.rmtree(ds[i].state_dir, ignore_errors=True)


def replace_nodes(make_daemon, ds, ports, lost: list[int], m: int,
                  node_env: dict[int, dict] | None = None) -> list[int]:
    """Start a replacement for each lost node (at a new port, as a new machine may come) and wait until it
    sees every other node that is up; returns the group's new ports."""
    new_ports = list(ports)
    for i in lost:
        new_ports[i] = free_ports(1)[0]
    for i in lost:
        ds[i] = make_daemon(group_args(new_ports, i, m), env=(node_env or {}).get(i))
    for i in lost:
        wait_until(lambda d=ds[i]: all(p["up"] for p in d.status()["group"]["peers"] if p["node"] not in lost),
                   what=f"replacement {i} joined")
    return new_ports


def recover(d, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(shardkeep_cmd("recover", "--socket", d.socket), capture_output=True, text=True,
                          timeout=timeout)


def replace_and_recover(make_daemon, ds, ports, lost: list[int], m: int, job_id: str, expected: int) -> list[int]:
    new_ports = replace_nodes(make_daemon, ds, ports, lost, m)
    for i in lost:
        r = recover(ds[i])
        assert r.returncode == 0, r.stdout + r.stderr + ds[i].log()
        assert f"job {job_id} step {expected}" in r.stdout, r.stdout
    return new_ports


def check_resumed(job: Job, ref: list[dict], expected: int | None, mode: str = "dp") -> None:
    """The relaunched job restored ``expected`` on every rank, ran exactly the steps after it, kept every
    version at group level on all ranks or none, and ended equal to the uninterrupted run."""
    done = job.finish()
    assert job.restored() == [expected] * job.n, f"ranks restored {job.restored()}, expected {expected}"
    first = 0 if expected is None else expected + 1
    assert all(d["first"] == first and d["ran"] == job.steps - first for d in done), done
    # the steps after the restored one ran before the crash too, maybe half group-committed: the new run's
    # versions of them are new versions for the group (another launch). A version reaches group level on
    # every node or on none, and the resumed run's versions do reach it.
    levels: dict[int, set] = {}
    for r in range(job.n):
        for e in job.events(r):
            if e.get("event") == "result":
                levels.setdefault(e["step"], set()).add(e["level"] if e["status"] == "committed" else "skipped")
    split = {s: lv for s, lv in levels.items() if "group" in lv and len(lv) > 1}
    assert not split, f"versions at group level on some ranks only: {split}"
    assert any(lv == {"group"} for lv in levels.values()), levels
    for r, (a, b) in enumerate(zip(ref, job.states())):
        if mode == "dp":
            assert_bitwise_equal(a, b, f"rank{r}")
        else:  # DDP's rebuilt gradient buckets change the reduction order: equal only to rounding
            for k in a["model"]:
                torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5)
            assert a["progress"] == b["progress"]
