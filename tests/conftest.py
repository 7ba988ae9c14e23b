"""Shared fixtures: real daemons as subprocesses, each with its own socket, shm prefix and state dir."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardkeep.proto.errors import ShardkeepError
from shardkeep.proto.transport import Channel

SHM = Path("/dev/shm")
BIN = Path(sys.executable).parent


def shardkeep_cmd(*args: str) -> list[str]:
    """The console script a user runs, from this interpreter's environment."""
    exe = BIN / "shardkeep"
    if exe.exists():
        return [str(exe), *args]
    return [sys.executable, "-m", "shardkeep.daemon.cli", *args]


class DaemonProc:
    def __init__(self, root: Path, prefix: str, extra: list[str] | None = None, env: dict | None = None) -> None:
        self.root = root
        self.prefix = prefix
        self.socket = str(root / "run" / "sk.sock")
        self.state_dir = str(root / "state")
        self.extra = extra or []
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.log_path = root / f"daemon-{prefix}.log"

    def start(self, timeout: float = 30.0) -> "DaemonProc":
        (self.root / "run").mkdir(mode=0o700, exist_ok=True)
        env = dict(os.environ, **(self.env or {}))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            shardkeep_cmd("daemon", "--socket", self.socket, "--shm-prefix", self.prefix,
                          "--state-dir", self.state_dir, *self.extra),
            stdout=self._log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                Channel(self.socket, timeout=1.0).request("ping")
                return self
            except ShardkeepError:
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def request(self, mtype: str, fields: dict | None = None, timeout: float = 10.0):
        return Channel(self.socket, timeout=timeout).request(mtype, fields)

    def status(self) -> dict:
        out = subprocess.run(shardkeep_cmd("status", "--json", "--socket", self.socket),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def job_status(self, job: str) -> dict | None:
        return next((j for j in self.status()["jobs"] if j["job"] == job), None)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        self.kill(signal.SIGTERM)
        if self._log:
            self._log.close()
        return self.proc.returncode if self.proc else None

    def segments(self) -> list[Path]:
        return sorted(SHM.glob(f"{self.prefix}-*"))

    def wipe_shm(self) -> None:
        for p in SHM.glob(f"{self.prefix}[-.]*"):
            p.unlink(missing_ok=True)


@pytest.fixture
def make_daemon(tmp_path):
    made: list[DaemonProc] = []

    def make(extra: list[str] | None = None, env: dict | None = None, prefix: str | None = None) -> DaemonProc:
        prefix = prefix or f"skt{secrets.token_hex(4)}"
        _PREFIXES.append(prefix)
        root = tmp_path / prefix
        root.mkdir(exist_ok=True)
        d = DaemonProc(root, prefix, extra, env)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop()
        d.wipe_shm()


@pytest.fixture
def daemon(make_daemon) -> DaemonProc:
    return make_daemon()


@pytest.fixture
def job_id() -> str:
    return f"job-{secrets.token_hex(4)}"


_PREFIXES: list[str] = []  # every shm prefix this session's daemons used


SUMMARY: list[str] = []  # lines tests want in the terminal summary (counts of the soak and the matrix)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="fault matrix: every cell on both groups (4 nodes m=1, 5 nodes m=2) with 14x larger states")
    parser.addoption("--soak-seconds", type=float, default=150.0,
                     help="how long the random-fault soak breaks things (default: 150)")
    parser.addoption("--soak-seed", type=int, default=None, help="the random-fault soak's seed (default: random)")


def pytest_terminal_summary(terminalreporter):
    for line in SUMMARY:
        terminalreporter.write_line(line)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)  # fixtures can see whether the test itself passed


def pytest_sessionfinish(session, exitstatus):
    # belt and braces: nothing this session's daemons created may outlive it (and nothing of
    # another session running side by side is touched)
    for prefix in _PREFIXES:
        for p in SHM.glob(f"{prefix}[-.]*"):
            p.unlink(missing_ok=True)
