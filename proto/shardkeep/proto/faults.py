"""Fault injection at named protocol phases, for tests only.

Enabled only when ``SHARDKEEP_TEST_FAULTS_ENABLE=1`` is in the environment at
start (production never sets it).  ``SHARDKEEP_FAULTS`` then holds rules
``phase:action[:occurrence[:arg]]`` separated by commas, e.g. ``copy:crash:3``
(SIGKILL of this process the 3rd time it reaches the copy phase) or
``local-commit:delay:1:2.5``.

With ``SHARDKEEP_FAULTS_LOG=FILE`` every rule that fires first appends one JSON
line to FILE (pid, phase, occurrence, action, time), so a test can act on
another process at the exact moment this one reached the phase: a ``delay``
holds the phase open while the test kills a trainer, a daemon or a node.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import threading
import time
from dataclasses import dataclass


class Phase(str, enum.Enum):
    REGISTER = "register"
    COPY = "copy"
    LOCAL_COMMIT = "local-commit"
    CHUNK_SEND = "chunk-send"
    ENCODE = "encode"
    PARITY_STORE = "parity-store"
    ACK = "ack"
    GROUP_COMMIT = "group-commit"
    RELEASE = "release"
    RESTORE = "restore"
    REBUILD = "rebuild"
    PERSIST = "persist"
    PERSIST_COMMIT = "persist-commit"


ACTIONS = ("crash", "hang", "delay", "drop", "raise")


class FaultInjected(Exception):
    pass


@dataclass(slots=True)
class Rule:
    phase: Phase
    action: str
    occurrence: int = 1
    arg: float = 0.0


class FaultPlan:
    def __init__(self, rules: list[Rule], log: str | None = None) -> None:
        self.rules = rules
        self.log = log
        self._counts: dict[Phase, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "FaultPlan":
        env = os.environ if env is None else env
        text = env.get("SHARDKEEP_FAULTS", "")
        if not text:
            return cls([])
        if env.get("SHARDKEEP_TEST_FAULTS_ENABLE") != "1":
            raise RuntimeError("SHARDKEEP_FAULTS is set but fault injection is not enabled for tests")
        rules = []
        for part in text.split(","):
            bits = part.strip().split(":")
            if len(bits) < 2 or bits[1] not in ACTIONS:
                raise ValueError(f"bad fault rule {part!r}: phase:action[:occurrence[:arg]]")
            rules.append(
                Rule(Phase(bits[0]), bits[1], int(bits[2]) if len(bits) > 2 else 1,
                     float(bits[3]) if len(bits) > 3 else 0.0)
            )
        return cls(rules, env.get("SHARDKEEP_FAULTS_LOG") or None)

    def _due(self, phase: Phase) -> list[Rule]:
        """Count one arrival at ``phase``; the rules that fire on it."""
        if not self.rules:
            return []
        with self._lock:
            n = self._counts.get(phase, 0) + 1
            self._counts[phase] = n
        due = [r for r in self.rules if r.phase is phase and r.occurrence == n]
        for r in due:
            self._announce(r)
        return due

    def _announce(self, r: Rule) -> None:
        if not self.log:
            return
        line = json.dumps({"pid": os.getpid(), "phase": r.phase.value, "occurrence": r.occurrence,
                           "action": r.action, "arg": r.arg, "t": time.time()}) + "\n"
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())  # one write on O_APPEND: lines of several processes never interleave
        finally:
            os.close(fd)

    def hit(self, phase: Phase) -> str | None:
        """Count one arrival at ``phase``; act if a rule matches. Returns 'drop' to drop.

        ``delay`` and ``hang`` sleep the calling thread: on an event loop use :meth:`ahit`."""
        for r in self._due(phase):
            if r.action in ("delay", "hang"):
                time.sleep(_pause_s(r))
            elif (out := _act(r, phase)) is not None:
                return out
        return None

    async def ahit(self, phase: Phase) -> str | None:
        """:meth:`hit` for code on an event loop: ``delay`` and ``hang`` suspend the task, not the loop,
        so the daemon stays responsive (heartbeats, its trainers) and looks like a slow peer, not a frozen one."""
        for r in self._due(phase):
            if r.action in ("delay", "hang"):
                await asyncio.sleep(_pause_s(r))
            elif (out := _act(r, phase)) is not None:
                return out
        return None


def _pause_s(r: Rule) -> float:
    """Seconds a ``delay`` or ``hang`` rule pauses: its argument; a hang without one, an hour."""
    return (r.arg or 3600.0) if r.action == "hang" else r.arg


def _act(r: Rule, phase: Phase) -> str | None:
    if r.action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    elif r.action == "raise":
        raise FaultInjected(f"fault injected at {phase.value} #{r.occurrence}")
    elif r.action == "drop":
        return "drop"
    return None


_PLAN: FaultPlan | None = None


def plan() -> FaultPlan:
    global _PLAN
    if _PLAN is None:
        _PLAN = FaultPlan.from_env()
    return _PLAN
