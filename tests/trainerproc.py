"""Drive tests/trainer.py as a subprocess and watch its JSON events."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

TRAINER = Path(__file__).with_name("trainer.py")


class Trainer:
    def __init__(self, socket: str, job: str, steps: int, out: Path, *, seed: int = 0, sleep: float = 0.0,
                 env: dict | None = None, extra: list[str] | None = None) -> None:
        cmd = [sys.executable, str(TRAINER), "--socket", socket, "--job", job, "--steps", str(steps),
               "--out", str(out), "--seed", str(seed), "--sleep", str(sleep), *(extra or [])]
        self.events: list[dict] = []
        self._q: queue.Queue = queue.Queue()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.events.append(ev)
            self._q.put(ev)

    def wait_for(self, pred, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ev = self._q.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self._q.empty():
                    self._reader.join(timeout=5)
                    if self._q.empty():
                        raise AssertionError(f"trainer exited ({self.proc.returncode}) first: {self.proc.stderr.read()[-3000:]}")
                continue
            if pred(ev):
                return ev
        raise AssertionError(f"no matching trainer event within {timeout}s; last events {self.events[-5:]}")

    def finish(self, timeout: float = 300.0) -> dict:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=10)
        self.stderr = self.proc.stderr.read()
        assert rc == 0, f"trainer failed ({rc}): {self.stderr[-4000:]}"
        return next(e for e in self.events if e.get("event") == "done")

    def kill(self) -> int:
        self.proc.kill()
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        return rc

    def committed(self) -> list[int]:
        return [e["step"] for e in self.events if e.get("event") == "committed"]

    def restored(self):
        return next(e for e in self.events if e.get("event") == "restored")["step"]


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_bitwise_equal(a, b, path: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {a.keys()} != {b.keys()}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
