"""``shardkeep demo``: train, SIGKILL the trainer, restore, and prove the resumed run bitwise identical."""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shardkeep.proto.errors import ShardkeepError
from shardkeep.proto.sizes import format_size
from shardkeep.proto.transport import Channel

console = Console(highlight=False)


class Child:
    """A trainer subprocess whose JSON events we follow."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardkeep.daemon.demo_train", *args],
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL,
        )
        self.events: list[dict] = []

    def follow(self, on_event: Callable[[dict], bool], timeout: float) -> int | None:
        """Feed events to ``on_event`` until it returns True or the child ends."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.events.append(ev)
            if on_event(ev):
                return None
            if time.monotonic() > deadline:
                self.proc.kill()
                raise TimeoutError(f"trainer ran past {timeout:.0f} s")
        return self.proc.wait(timeout=60)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("event") == name), None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Where two dumped states differ (tensors are compared as raw bytes: bitwise), or None."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return path
        return next((r for k in a if (r := _first_difference(a[k], b[k], f"{path}.{k}")) is not None), None)
    if isinstance(a, (list, tuple)) and not (isinstance(a, tuple) and a[:1] == ("tensor",)):
        if type(a) is not type(b) or len(a) != len(b):
            return path
        return next((r for i, (x, y) in enumerate(zip(a, b)) if (r := _first_difference(x, y, f"{path}[{i}]"))), None)
    return None if a == b else path


def _load_dump(path: Path) -> Any:
    from shardkeep.proto.leaves import unpack_skeleton

    return unpack_skeleton(path.read_bytes())


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.2f} ms" if x < 1 else f"{x:.2f} s"


def run_demo(args: argparse.Namespace) -> int:
    steps = args.steps
    if steps < 8:
        console.print("[red]--steps must be at least 8[/red]")
        return 2
    rnd = random.Random(args.seed)
    kill_at = args.kill_at if args.kill_at is not None else rnd.randrange(steps // 4, 3 * steps // 4)
    if not 1 <= kill_at < steps - 1:
        console.print(f"[red]--kill-at must be in [1, {steps - 2}][/red]")
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="shardkeep-demo-"))
    prefix = f"skdemo{secrets.token_hex(3)}"
    job = f"demo-{secrets.token_hex(3)}"
    sock = str(tmp / "run" / "shardkeep.sock")
    daemon: subprocess.Popen | None = None
    children: list[Child] = []
    ok = False
    try:
        console.print(f"[bold]shardkeep demo[/bold]: {steps} steps of a small GPT-style model, a snapshot every "
                      f"step, the trainer SIGKILLed at step {kill_at}, restarted, restored, compared bitwise.")
        daemon_log = tmp / "daemon.log"
        daemon = subprocess.Popen(
            [sys.executable, "-m", "shardkeep.daemon.cli", "daemon", "--socket", sock, "--shm-prefix", prefix,
             "--state-dir", str(tmp / "state"), "--log-level", "WARNING"],
            stdout=open(daemon_log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        _wait_daemon(sock, daemon, daemon_log)
        console.print(f"daemon up: pid {daemon.pid}, socket {sock}, shm prefix {prefix}")
        common = ["--steps", str(steps), "--size", str(args.size)]

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            def tracker(label: str, stop_at: int | None = None):
                task = progress.add_task(label, total=steps, info="")

                def on(ev: dict) -> bool:
                    if ev.get("event") == "restored" and ev.get("step") is not None:
                        progress.update(task, completed=ev["step"] + 1, info=f"restored step {ev['step']}")
                    if ev.get("event") == "step":
                        progress.update(task, completed=ev["step"] + 1, info=f"loss {ev['loss']:.3f}")
                        return stop_at is not None and ev["step"] >= stop_at
                    return False
                return on

            ref = Child([*common, "--out", str(tmp / "reference.state"), "--reference"], tmp / "reference.log")
            children.append(ref)
            rc = ref.follow(tracker("1. uninterrupted run (no shardkeep)"), timeout=600)
            if rc != 0:
                raise RuntimeError(f"reference run failed ({rc}); see {tmp / 'reference.log'}")
            model = ref.event("model")

            first = Child([*common, "--job", job, "--socket", sock, "--out", str(tmp / "never.state")], tmp / "first.log")
            children.append(first)
            first.follow(tracker(f"2. run with shardkeep, SIGKILL at step {kill_at}", kill_at), timeout=600)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(timeout=30)
            committed = [e["step"] for e in first.events if e.get("event") == "committed"]
            record = Channel(sock).request("versions", {"job": job}).fields["restorable"]

            second = Child([*common, "--job", job, "--socket", sock, "--out", str(tmp / "resumed.state"),
                            "--seed", "777", "--baselines"], tmp / "second.log")
            children.append(second)
            rc = second.follow(tracker("3. restarted trainer: restore() and go on"), timeout=600)
            if rc != 0:
                raise RuntimeError(f"resumed run failed ({rc}); see {tmp / 'second.log'}")

        restored = second.event("restored")
        diff = _first_difference(_load_dump(tmp / "reference.state"), _load_dump(tmp / "resumed.state"))
        stats2 = second.event("stats") or {}
        base = second.event("baselines") or {}
        st = Channel(sock).request("status").fields
        mem = st["memory"]["used"]

        console.print(f"killed at step {kill_at}: last commit the trainer saw was step "
                      f"{max(committed) if committed else None}; the daemon's record: {record[:3]}")
        console.print(f"restore(): {restored['info']}")
        table = Table(title="shardkeep demo")
        table.add_column("what")
        table.add_column("value", justify="right")
        table.add_row("model", f"d_model {model['d_model']}, {model['layers']} layers, "
                               f"{model['params'] / 1e6:.1f} M params")
        table.add_row("state (params + AdamW)", format_size(model["state_bytes"]))
        table.add_row("snapshot stall per step, median / max", f"{_fmt_s(stats2.get('stall_median'))} / "
                                                               f"{_fmt_s(stats2.get('stall_max'))}")
        table.add_row("first snapshot after restore (registers, maps the slots)", _fmt_s(stats2.get("first_snapshot")))
        table.add_row("snapshot() to local commit, median", _fmt_s(stats2.get("commit_median")))
        table.add_row("snapshots committed / skipped (resumed run)",
                      f"{stats2.get('committed')} / {stats2.get('skipped')}")
        warm = second.event("warm-restore") or {}
        table.add_row("restore() in the restarted process (allocates optimizer state)",
                      _fmt_s(restored.get("seconds")))
        table.add_row("restore() into live model and optimizer", _fmt_s(warm.get("seconds")))
        table.add_row("torch.load + load_state_dict into the same (page cache)", _fmt_s(base.get("torch_load")))
        table.add_row("torch.save + fsync of the same state", _fmt_s(base.get("torch_save_fsync")))
        table.add_row("daemon shared memory in use", format_size(mem))
        table.add_row("steps run after restart", f"{second.event('done')['ran']} (from step {restored['step'] + 1})")
        console.print(table)
        if diff is None and restored["step"] == record[0]:
            console.print("[bold green]resumed run is bitwise identical to the uninterrupted run[/bold green] "
                          "(parameters, AdamW state, RNG, data position)")
            ok = True
        else:
            console.print(f"[bold red]MISMATCH[/bold red] at {diff!r}; restored {restored['step']}, record {record}")
        if args.keep:
            console.print(f"daemon left running (--keep): shardkeep status --socket {sock}; "
                          f"stop it with: kill {daemon.pid}; files in {tmp}")
        return 0 if ok else 1
    except (ShardkeepError, RuntimeError, TimeoutError, OSError) as exc:
        console.print(f"[bold red]demo failed:[/bold red] {exc}")
        return 1
    finally:
        for c in children:
            c.close()
        if not (args.keep and ok):
            if daemon is not None and daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
                try:
                    daemon.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=30)
            for p in Path("/dev/shm").glob(f"{prefix}[-.]*"):
                p.unlink(missing_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)


def _wait_daemon(sock: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited: {log.read_text(errors='replace')[-2000:]}")
        if os.path.exists(sock):
            try:
                Channel(sock, timeout=1.0).request("ping")
                return
            except ShardkeepError:
                pass
        time.sleep(0.05)
    raise RuntimeError("daemon did not start in time")
