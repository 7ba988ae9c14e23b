"""The fault matrix: every kind of fault at every protocol phase, one test id per cell.

A cell is (victim, phase).  Victims: ``trainer`` (one rank's trainer is
SIGKILLed), ``daemon`` (one daemon is SIGKILLed and restarted: re-adoption),
``node`` (``m`` whole nodes lost: trainer and daemon killed, shm and state dir
wiped, replaced, ``shardkeep recover``), ``beyond`` (``m + 1`` whole nodes
lost).  The phase is reached through the fault hook (``shardkeep.proto.faults``)
in the process that owns it, never through a timer: when the victim owns the
phase it crashes there itself; otherwise the owner holds the phase open
(``delay``), announces it in a log file, and the test kills the victim at that
moment.  After every fault the job is killed as a whole and relaunched, as
torchelastic would, by a launch that seeds its RNG and perturbs its
parameters differently before ``restore()``.

Expected outcome, per victim (DESIGN.md: local level serves a trainer or a
daemon crash, group level a node loss):

* trainer, daemon: every rank restores the newest step that every daemon's
  record (``status --json``) lists as restorable, which is no older than any
  step every rank was told was committed; it runs exactly the steps after it
  and ends bitwise equal to the uninterrupted run.
* node: the same with the newest group-level step, after replacement and
  ``shardkeep recover``; no older than any step every rank was told reached
  group level.
* beyond: ``shardkeep recover`` fails naming the nodes that lost the version,
  every rank of the relaunched job fails with that error, none restores.

``restore`` and ``register`` are reached in a second launch (one that
restores); ``rebuild`` in ``shardkeep recover`` after a node loss.  CI runs
trainer and daemon cells on 4 nodes with m=1, node cells on 5 nodes with m=2
(two nodes lost), beyond cells on 4 nodes with m=1; ``pytest --full`` runs
every cell on both groups with a 14x larger state.  With
``SHARDKEEP_MATRIX_REPORT=FILE`` each passing cell appends what it observed;
``python tests/test_fault_matrix.py FILE`` prints the table of
docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import shardkeep_cmd
from groupjob import (Job, common_restorable, lose_nodes, recover, reference, replace_and_recover, replace_nodes,
                      settled, settled_group_step, check_resumed, start_group, wait_until)

pytestmark = pytest.mark.slow

PHASES = ("register", "copy", "local-commit", "chunk-send", "encode", "parity-store", "ack", "group-commit",
          "release", "restore", "rebuild")
VICTIMS = ("trainer", "daemon", "node", "beyond")
CLIENT_ONLY = {"copy", "restore"}
SECOND_LAUNCH = {"register", "restore"}  # reached in a launch that restores
# the hit of each phase that fires: about the 10th version (one hit per version and node, two for chunk-send;
# release #k frees version k-1; the daemon's register #1 was the first launch's)
OCCURRENCE = {"register": 2, "copy": 10, "local-commit": 10, "chunk-send": 20, "encode": 10, "parity-store": 10,
              "ack": 10, "group-commit": 10, "release": 9, "restore": 1, "rebuild": 2}
STEPS = 30
SLEEP = 0.05
HOLD_S = 1.0  # a phase held open by `delay`: under the peer timeout (2 s), so the holder is not declared down
CI_GROUP = {"trainer": (4, 1), "daemon": (4, 1), "node": (5, 2), "beyond": (4, 1)}


def _cells(full: bool):
    for victim in VICTIMS:
        groups = [(4, 1), (5, 2)] if full else [CI_GROUP[victim]]
        for n, m in groups:
            for phase in PHASES:
                yield pytest.param(victim, phase, n, m, id=f"{victim}-{phase}-n{n}m{m}")


def pytest_generate_tests(metafunc):
    if {"victim", "phase", "n", "m"} <= set(metafunc.fixturenames):
        metafunc.parametrize("victim,phase,n,m", list(_cells(metafunc.config.getoption("--full"))))


class Hook:
    """Where the cell's phase is reached and what happens there."""

    def __init__(self, victim: str, phase: str, n: int, m: int, log: Path) -> None:
        self.node = 0 if phase == "group-commit" else 1  # the coordinator decides; node 1 does everything else
        if phase in CLIENT_ONLY or (phase == "register" and victim == "trainer"):
            self.where = "client"
        else:
            self.where = "daemon"
        if phase == "rebuild":  # on the replacement of node 1, during `shardkeep recover`
            self.action = "crash" if victim in ("daemon", "node") else "delay"
        elif self.where == "client":
            self.action = "delay" if victim == "daemon" else "crash"
        else:
            self.action = "delay" if victim == "trainer" else "crash"
        occurrence = 1 if (phase == "register" and self.where == "client") else OCCURRENCE[phase]
        hold = 6.0 if phase == "rebuild" else HOLD_S  # long enough for a relaunch to ask while it rebuilds
        arg = f":{hold}" if self.action == "delay" else ""
        self.rule = f"{phase}:{self.action}:{occurrence}{arg}"
        self.log = log
        self.env = {"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": self.rule, "SHARDKEEP_FAULTS_LOG": str(log)}
        # the nodes a node or beyond cell loses: the hook's node first
        others = [i for i in (3, 2, 4, 0) if i != self.node and i < n]
        self.lost = [self.node] + others[: (m if victim == "beyond" else m - 1)]

    def fired(self) -> bool:
        return self.log.exists() and bool(self.log.read_text().strip())

    def wait(self, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # polled tightly: the victim dies while the phase is held open
            if self.fired():
                return
            time.sleep(0.02)
        raise AssertionError(f"{self.rule} did not fire within {timeout}s ({what})")


def _wait_dead(proc, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() == -9, f"{what}: exit status {proc.poll()} (expected SIGKILL by the fault hook)"


def _common_committed(job: Job, level: str | None) -> int | None:
    """The newest step every rank of this launch was told was committed (at ``level``)."""
    sets = [set(job.committed_steps(r, level)) for r in range(job.n)]
    common = set.intersection(*sets)
    return max(common) if common else None


def _newest(*steps: int | None) -> int | None:
    return max((s for s in steps if s is not None), default=None)


def _assert_fails_clearly(job: Job, lost: list[int]) -> None:
    codes = job.wait_all(180)
    assert codes == [1] * job.n, f"exit codes {codes}\n" + job.logs()
    logs = job.logs()
    assert logs.count("UnavailableError") >= job.n, logs
    assert f"nodes {sorted(lost)} do not hold it" in logs or "lost this job's versions" in logs, logs
    assert all(not any(e["event"] == "restored" and e["step"] is not None for e in job.events(r))
               for r in range(job.n)), "a rank restored something"


@pytest.fixture
def report(request):
    """Appends what a passing cell observed to $SHARDKEEP_MATRIX_REPORT (for docs/RELIABILITY.md)."""
    seen: dict = {}
    t0 = time.monotonic()
    yield seen
    path = os.environ.get("SHARDKEEP_MATRIX_REPORT")
    rep = getattr(request.node, "rep_call", None)
    if path and rep is not None and rep.passed:
        seen.update(cell=request.node.callspec.id, seconds=round(time.monotonic() - t0, 1))
        with open(path, "a") as f:
            f.write(json.dumps(seen) + "\n")


def test_cell(make_daemon, job_id, tmp_path, report, victim, phase, n, m, request):
    full = request.config.getoption("--full")
    extra = ["--hidden", str(1536 if full else 384)]
    steps = 2 * STEPS if full else STEPS  # larger states skip more snapshots: room for the 10th version
    ref = reference(n, "dp", tmp_path, steps=steps, extra=extra)
    hook = Hook(victim, phase, n, m, tmp_path / "faults.jsonl")
    report.update(victim=victim, phase=phase, n=n, m=m, rule=hook.rule, where=f"{hook.where} of node {hook.node}")
    node_env = {hook.node: hook.env} if hook.where == "daemon" and phase != "rebuild" else None
    ds, ports = start_group(make_daemon, n, m, node_env=node_env)
    sockets = lambda: [d.socket for d in ds]  # noqa: E731 - replacements change them
    launch = iter(range(1, 10))

    def job_(rank_env=None, seed=0) -> Job:
        return Job(sockets(), job_id, tmp_path / f"run{next(launch)}", seed=seed, sleep=SLEEP, steps=steps,
                   extra=extra, rank_env=rank_env)

    first = job_({hook.node: hook.env} if hook.where == "client" and phase not in SECOND_LAUNCH else None)
    if phase in SECOND_LAUNCH or phase == "rebuild":
        # a first launch reaches group level a few steps in, then the job restarts
        wait_until(lambda: all(any(s >= 6 for s in first.group_steps(r)) for r in range(n)), timeout=120,
                   what="group level at step 6")
        first.kill()
        settled(ds, job_id)
    before = common_restorable(ds, job_id) if phase == "restore" else None

    if phase == "rebuild":
        _rebuild_cell(make_daemon, ds, ports, hook, victim, m, job_id, job_, ref, report)
        return

    job = job_({hook.node: hook.env}) if (phase in SECOND_LAUNCH and hook.where == "client") else \
        (job_() if phase in SECOND_LAUNCH else first)
    # the fault
    if hook.action == "crash":
        proc = job.procs[hook.node] if hook.where == "client" else ds[hook.node].proc
        _wait_dead(proc, f"{hook.where} of node {hook.node} at {phase}")
    else:
        hook.wait(f"{phase} held open on node {hook.node}")
    if victim == "trainer":
        job.kill([hook.node])
    elif victim == "daemon":
        ds[hook.node].kill()
    else:
        job.kill(hook.lost)
        lose_nodes(ds, hook.lost)
    job.kill()  # the rest of the job goes down with it and is restarted as a whole
    # nothing lost: what every rank was told was committed (at local, at group level) stays restorable
    lower_local = _newest(*(_common_committed(j, None) for j in {first, job}))
    lower_group = _newest(*(_common_committed(j, "group") for j in {first, job}))

    if victim in ("trainer", "daemon"):
        if victim == "daemon":
            ds[hook.node].env = None  # restarted as systemd would: same prefix and state dir, no fault
            ds[hook.node].start()
            wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds),
                       what="group up after the restart")
        settled(ds, job_id)
        expected = common_restorable(ds, job_id)
        assert expected is not None or lower_local is None, "committed versions were lost"
        if lower_local is not None:
            assert expected >= lower_local, f"step {lower_local} was committed on every rank; now {expected}"
    elif victim == "node":
        survivors = [d for i, d in enumerate(ds) if i not in hook.lost]
        expected = settled_group_step(survivors, job_id)
        if lower_group is not None:
            assert expected >= lower_group, f"step {lower_group} reached group level on every rank; now {expected}"
        replace_and_recover(make_daemon, ds, ports, hook.lost, m, job_id, expected)
    else:
        replace_nodes(make_daemon, ds, ports, hook.lost, m)
        r = recover(ds[hook.lost[0]], timeout=120)
        assert r.returncode == 1 and f"nodes {sorted(hook.lost)} do not hold it" in r.stderr, r.stdout + r.stderr
        again = job_(seed=5)
        _assert_fails_clearly(again, hook.lost)
        report.update(expected="clear error", restored="none", lower_bound=lower_group)
        return
    if before is not None:
        assert expected == before, f"a crash in restore changed what is restorable: {before} -> {expected}"
    resumed = job_(seed=4242 + n)
    check_resumed(resumed, ref, expected)
    report.update(expected=expected, restored=resumed.restored()[0], ran=resumed.steps - expected - 1,
                  lower_bound=lower_local if victim in ("trainer", "daemon") else lower_group)


def _rebuild_cell(make_daemon, ds, ports, hook, victim, m, job_id, job_, ref, report) -> None:
    """Node 1 (and for m=2 another) is lost; its replacement meets the fault while `shardkeep recover` rebuilds it."""
    lost = [1] + ([3] if m == 2 else [])
    survivors = [d for i, d in enumerate(ds) if i not in lost]
    lose_nodes(ds, lost)
    expected = settled_group_step(survivors, job_id)
    ports = replace_nodes(make_daemon, ds, ports, lost, m, node_env={1: hook.env})  # node 1's meets the fault
    for i in lost[1:]:  # the other replacement first, without a fault
        r = recover(ds[i])
        assert r.returncode == 0, r.stdout + r.stderr + ds[i].log()
    rec = subprocess.Popen(shardkeep_cmd("recover", "--socket", ds[1].socket), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if victim in ("daemon", "node"):
            _wait_dead(ds[1].proc, "the replacement at rebuild")
            out, err = rec.communicate(timeout=120)
            assert rec.returncode != 0, out + err
            if victim == "daemon":  # restarted on its half-rebuilt state dir and shm
                ds[1].env = None
                ds[1].start()
            else:  # the replacement is lost as well: another one
                lose_nodes(ds, [1])
                ds[1].env = None
                ds[1].start()
            wait_until(lambda: all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds), what="group up")
            r = recover(ds[1])
            assert r.returncode == 0 and f"job {job_id} step {expected}" in r.stdout, r.stdout + r.stderr
        elif victim == "trainer":  # the job is relaunched while its node is being rebuilt: refused, not served
            hook.wait("rebuild held open")
            early = job_(seed=11)
            codes = early.wait_all(120)
            assert codes == [1] * early.n, f"exit codes {codes}\n" + early.logs()
            assert "run `shardkeep recover` on it before restoring" in early.logs(), early.logs()
            out, err = rec.communicate(timeout=120)
            assert rec.returncode == 0 and f"job {job_id} step {expected}" in out, out + err
        else:  # beyond: while node 1 is rebuilt, m more nodes are lost
            hook.wait("rebuild held open")
            more = [i for i in (2, 0, 4) if i not in lost][: m + 1 - len(lost)]  # m + 1 lost in all
            lose_nodes(ds, more)
            out, err = rec.communicate(timeout=120)
            assert rec.returncode == 1, out + err
            gone = sorted(set(lost) | set(more))
            replace_nodes(make_daemon, ds, ports, more, m)
            again = job_(seed=5)
            _assert_fails_clearly(again, gone)
            report.update(expected="clear error", restored="none", recover_error=err.strip().splitlines()[-1])
            return
    finally:
        if rec.poll() is None:
            rec.kill()
    resumed = job_(seed=4242)
    check_resumed(resumed, ref, expected)
    report.update(expected=expected, restored=resumed.restored()[0], ran=resumed.steps - expected - 1)


def _table(path: str) -> str:
    """The matrix table of docs/RELIABILITY.md from a report file."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = ["| victim | phase | group | fault (where) | expected | observed | s |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (VICTIMS.index(r["victim"]), r["n"], PHASES.index(r["phase"]))):
        if r["expected"] == "clear error":
            exp, obs = "clear error, nothing restored", "clear error on every rank, none restored"
        else:
            exp = f"step {r['expected']}" + (f" (>= {r['lower_bound']})" if r.get("lower_bound") is not None else "")
            obs = f"restored {r['restored']}, ran {r['ran']} steps, bitwise equal"
        out.append(f"| {r['victim']} | {r['phase']} | n={r['n']} m={r['m']} | `{r['rule']}` ({r['where']}) | "
                   f"{exp} | {obs} | {r['seconds']} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(_table(sys.argv[1]))
