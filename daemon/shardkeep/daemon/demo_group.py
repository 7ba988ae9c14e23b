"""``shardkeep demo`` on a local group: lose a whole node mid-run, rebuild it from its peers, resume bitwise.

Starts ``--nodes`` daemons on loopback (``--insecure``: every address is
127.0.0.1), one trainer rank per "node" in one gloo job, a snapshot every
step.  At a random step one node is lost for good: its trainer and daemon are
SIGKILLed and its shared memory and state dir wiped; the rest of the job is
stopped too (as torchelastic restarts a job as a whole).  A replacement
daemon starts at a new port, ``recover`` rebuilds it from the survivors, the
job restarts, every rank ``restore()``s the last group-committed step, and the
final state is compared byte for byte with an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shardkeep.proto.errors import ShardkeepError
from shardkeep.proto.sizes import format_size
from shardkeep.proto.transport import Channel

from .demo import _first_difference, _fmt_s, _load_dump, _wait_daemon, console

FLAGS = ["--insecure", "--heartbeat", "0.5", "--peer-timeout", "3", "--group-commit-timeout", "10",
         "--log-level", "WARNING"]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Node:
    """One node's daemon: its socket, shm prefix, state dir and log under the demo's temp dir."""

    def __init__(self, tmp: Path, i: int, run: str) -> None:
        self.i = i
        self.prefix = f"skdemo{run}n{i}"
        self.dir = tmp / f"node{i}"
        self.socket = str(self.dir / "run" / "shardkeep.sock")
        self.state = self.dir / "state"
        self.proc: subprocess.Popen | None = None

    def start(self, peers: str, parity: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "daemon.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardkeep.daemon.cli", "daemon", "--socket", self.socket, "--shm-prefix",
             self.prefix, "--state-dir", str(self.state), "--peers", peers, "--node", str(self.i),
             "--parity", str(parity), *FLAGS],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait_daemon(self.socket, self.proc, log)

    def request(self, mtype: str, fields: dict | None = None, timeout: float = 10.0) -> dict:
        return Channel(self.socket, timeout=timeout).request(mtype, fields).fields

    def shm_bytes(self) -> int:
        return sum(p.stat().st_size for p in Path("/dev/shm").glob(f"{self.prefix}-*"))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)

    def wipe(self) -> None:
        for p in Path("/dev/shm").glob(f"{self.prefix}[-.]*"):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.state, ignore_errors=True)


class Job:
    """One launch of the training job: a rank per node, events in a file per rank."""

    def __init__(self, tmp: Path, name: str, sockets: list[str], common: list[str], extra: list[str]) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        self.n = len(sockets)
        port = _free_ports(1)[0]
        self.procs = []
        import os

        for r, sock in enumerate(sockets):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE=str(self.n), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", OMP_NUM_THREADS="1")
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", "shardkeep.daemon.demo_train", *common, "--socket", sock,
                 "--out", str(self.dir / f"rank{r}.state"), "--events", str(self.dir / f"rank{r}.jsonl"), *extra],
                stdout=subprocess.DEVNULL, stderr=open(self.dir / f"rank{r}.log", "ab"), stdin=subprocess.DEVNULL,
                env=env))

    def events(self, r: int = 0) -> list[dict]:
        p = self.dir / f"rank{r}.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line being written
        return out

    def event(self, name: str, r: int = 0) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events(r)) if e.get("event") == name), None)

    def failed(self) -> str | None:
        for r, p in enumerate(self.procs):
            if p.poll() not in (None, 0):
                return f"rank {r} exited with {p.returncode}: " + \
                    (self.dir / f"rank{r}.log").read_text(errors="replace")[-1500:]
        return None

    def done(self) -> bool:
        return all(p.poll() == 0 for p in self.procs)

    def kill(self, ranks=None) -> None:
        for r in range(self.n) if ranks is None else ranks:
            p = self.procs[r]
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def _follow(job: Job, progress: Progress, label: str, steps: int, timeout: float, until=None) -> None:
    """Show rank 0's progress until the job ends (or ``until(events)`` holds)."""
    task = progress.add_task(label, total=steps, info="")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        evs = job.events(0)
        last = next((e for e in reversed(evs) if e.get("event") in ("step", "restored")), None)
        if last is not None and last.get("step") is not None:
            info = f"loss {last['loss']:.3f}" if last["event"] == "step" else f"restored step {last['step']}"
            progress.update(task, completed=last["step"] + 1, info=info)
        if until is not None and until(evs):
            return
        why = job.failed()
        if why:
            raise RuntimeError(why)
        if job.done():
            return
        time.sleep(0.1)
    job.kill()
    raise TimeoutError(f"{label}: still running after {timeout:.0f} s")


def run_group_demo(args: argparse.Namespace) -> int:
    n, m, steps = args.nodes, args.parity, args.steps
    if not 1 <= m < n:
        console.print(f"[red]--parity must be in [1, {n - 1}] for {n} nodes[/red]")
        return 2
    if steps < 8:
        console.print("[red]--steps must be at least 8[/red]")
        return 2
    rnd = random.Random(args.seed)
    kill_at = args.kill_at if args.kill_at is not None else rnd.randrange(steps // 4, steps // 2 + 1)
    if not 2 <= kill_at < steps - 2:
        console.print(f"[red]--kill-at must be in [2, {steps - 3}][/red]")
        return 2
    lost = rnd.randrange(n)
    run = secrets.token_hex(3)
    tmp = Path(tempfile.mkdtemp(prefix="shardkeep-demo-"))
    nodes = [Node(tmp, i, run) for i in range(n)]
    jobs: list[Job] = []
    ok = False
    job_id = f"demo-{run}"
    common = ["--steps", str(steps), "--size", str(args.size), "--job", job_id]
    try:
        console.print(f"[bold]shardkeep demo[/bold]: a {n}-node group (parity m={m}) on loopback, one trainer "
                      f"rank per node in a gloo job, a snapshot every step; node {lost} is lost for good at step "
                      f"{kill_at} (trainer and daemon killed, shared memory wiped), replaced, rebuilt from its peers; "
                      "the job resumes and is compared bitwise with an uninterrupted run.")
        ports = _free_ports(n)
        peers = ",".join(f"tcp://127.0.0.1:{p}" for p in ports)
        for nd in nodes:
            nd.start(peers, m)
        deadline = time.monotonic() + 30
        while not all(all(p["up"] for p in nd.request("status")["group"]["peers"]) for nd in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the group did not form within 30 s")
            time.sleep(0.2)
        console.print(f"group up: {n} daemons, prefixes {nodes[0].prefix[:-2]}n*, sockets under {tmp}")
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as progress:
            ref = Job(tmp, "reference", [nd.socket for nd in nodes], common, ["--reference"])
            jobs.append(ref)
            _follow(ref, progress, "1. uninterrupted run (no shardkeep)", steps, 600)
            model = ref.event("model")

            first = Job(tmp, "first", [nd.socket for nd in nodes], common, [])
            jobs.append(first)

            def reached(evs: list[dict]) -> bool:  # at the kill step, and some version reached group level
                return any(e.get("event") == "step" and e["step"] >= kill_at for e in evs) and \
                    any(e.get("event") == "committed" and e.get("level") == "group" for e in evs)

            _follow(first, progress, f"2. with shardkeep; node {lost} lost at step {kill_at}", steps, 600, reached)
            t_loss = time.monotonic()
            first.kill([lost])
            nodes[lost].kill()
            nodes[lost].wipe()
            first.kill()  # the job restarts as a whole
            survivors = [nd for nd in nodes if nd.i != lost]
            group_step = _settled(survivors, job_id)
            shm_peak = max(nd.shm_bytes() for nd in survivors)
            progress.console.print(f"node {lost} lost; the survivors hold step {group_step} at group level")

            new_ports = list(ports)
            new_ports[lost] = _free_ports(1)[0]
            rep = nodes[lost] = Node(tmp, lost, run + "r")
            rep.start(",".join(f"tcp://127.0.0.1:{p}" for p in new_ports), m)
            deadline = time.monotonic() + 30
            while not all(p["up"] for p in rep.request("status")["group"]["peers"]):
                if time.monotonic() > deadline:
                    raise RuntimeError("the replacement did not join within 30 s")
                time.sleep(0.2)
            t0 = time.monotonic()
            rec = rep.request("recover", timeout=300)
            rebuild_s = time.monotonic() - t0
            fetched = (rep.request("status").get("recover") or {}).get("bytes_fetched", 0)
            progress.console.print(f"3. replacement for node {lost} rebuilt from {n - 1} peers in "
                                   f"{_fmt_s(rebuild_s)}: {[(v['job'], v['step']) for v in rec['versions']]}, "
                                   f"{format_size(fetched)} fetched")

            second = Job(tmp, "second", [nd.socket for nd in nodes], common,
                         ["--seed", "777", "--baselines", "--baseline-dir", str(tmp / "second")])
            jobs.append(second)
            _follow(second, progress, "4. the whole job restarted: restore() and go on", steps, 600)
            resume_s = time.monotonic() - t_loss

        restored = [second.event("restored", r) for r in range(n)]
        diffs = [_first_difference(_load_dump(ref.dir / f"rank{r}.state"), _load_dump(second.dir / f"rank{r}.state"))
                 for r in range(n)]
        s2 = second.event("stats", 0) or {}
        base = second.event("baselines", 0) or {}
        table = Table(title=f"shardkeep demo: {n} nodes, m={m}")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("model (per rank)", f"d_model {model['d_model']}, {model['layers']} layers, "
                                          f"{model['params'] / 1e6:.1f} M params, state {format_size(model['state_bytes'])}")
        table.add_row("snapshot stall per step, median / max (rank 0, resumed run)",
                      f"{_fmt_s(s2.get('stall_median'))} / {_fmt_s(s2.get('stall_max'))}")
        table.add_row("snapshot() to group commit (parity on every holder), median",
                      _fmt_s(s2.get("group_commit_median")))
        table.add_row("snapshots at group level / committed / skipped (resumed run)",
                      f"{s2.get('group_committed')} / {s2.get('committed')} / {s2.get('skipped')}")
        table.add_row("node rebuild (shardkeep recover)", f"{_fmt_s(rebuild_s)}, {format_size(fetched)} fetched")
        table.add_row("restore() on every rank after the restart (rank 0)", _fmt_s(restored[0].get("seconds")))
        table.add_row("node loss to training again (detect, replace, rebuild, restart)", _fmt_s(resume_s))
        table.add_row("torch.save + fsync of one rank's state", _fmt_s(base.get("torch_save_fsync")))
        table.add_row("dcp.async_save: blocked / total", f"{_fmt_s(base.get('dcp_async_blocked'))} / "
                                                         f"{_fmt_s(base.get('dcp_async_total'))}")
        table.add_row("shared memory per node (largest, after the loss)", format_size(shm_peak))
        table.add_row("steps before the loss / restored / run after the restart",
                      f"{kill_at} / step {group_step} / {second.event('done')['ran']}")
        console.print(table)
        steps_ok = all(e is not None and e["step"] == group_step for e in restored)
        if steps_ok and all(d is None for d in diffs):
            console.print(f"[bold green]every rank restored step {group_step} and finished bitwise identical to the "
                          "uninterrupted run[/bold green] (parameters, AdamW state, RNG, data position)")
            ok = True
        else:
            console.print(f"[bold red]MISMATCH[/bold red]: restored {[e and e['step'] for e in restored]} "
                          f"(expected {group_step}); first differences {diffs}")
        if args.keep:
            console.print(f"daemons left running (--keep): shardkeep status --socket {nodes[0].socket}; "
                          f"stop them with: kill {' '.join(str(nd.proc.pid) for nd in nodes if nd.proc)}; files in {tmp}")
        return 0 if ok else 1
    except (ShardkeepError, RuntimeError, TimeoutError, OSError) as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        return 1
    finally:
        for j in jobs:
            j.kill()
        if not (args.keep and ok):
            for nd in nodes:
                nd.kill(signal.SIGTERM)
            for p in Path("/dev/shm").glob(f"skdemo{run}*"):
                p.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)


def _settled(survivors: list[Node], job: str, timeout: float = 60.0) -> int:
    """Wait until no survivor waits on a decision; the newest group-level step they all hold."""
    deadline = time.monotonic() + timeout
    tops: set = set()
    pending: list = []
    while time.monotonic() < deadline:
        sts = [nd.request("status") for nd in survivors]
        pending = [v for st in sts for v in st["group"]["versions"] if v["job"] == job and v["decision"] == "pending"]
        tops = {next((j["group_committed"][0] for j in st["jobs"] if j["job"] == job and j["group_committed"]), None)
                for st in sts}
        if not pending and len(tops) == 1 and None not in tops:
            return tops.pop()
        time.sleep(0.2)
    raise RuntimeError(f"the survivors did not settle on one group-level step within {timeout:.0f} s: "
                       f"newest group-level steps {tops}, undecided versions {pending}")
