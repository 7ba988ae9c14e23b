"""Admission control: refuse a registration that memory cannot hold, naming the numbers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

from shardkeep.proto.errors import CapacityError
from shardkeep.proto.sizes import format_size

from .arena import SHM_DIR


@dataclass(frozen=True)
class Headroom:
    name: str
    free: int


def cgroup_headroom() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), if limited."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((l.split("::", 1)[1].strip() for l in f if l.startswith("0::")), None)
        if rel is None:
            return None
        base = os.path.join("/sys/fs/cgroup", rel.lstrip("/"))
        with open(os.path.join(base, "memory.max")) as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open(os.path.join(base, "memory.current")) as f:
            current = int(f.read())
        return int(limit) - current
    except (OSError, ValueError):
        return None


def headrooms(memory_limit: int | None, used: int) -> list[Headroom]:
    out = []
    if memory_limit:
        out.append(Headroom(f"--memory-limit {format_size(memory_limit)} minus {format_size(used)} in use",
                            memory_limit - used))
    st = os.statvfs(SHM_DIR)
    out.append(Headroom(f"free space in {SHM_DIR}", st.f_bavail * st.f_frsize))
    out.append(Headroom("MemAvailable", psutil.virtual_memory().available))
    cg = cgroup_headroom()
    if cg is not None:
        out.append(Headroom("cgroup memory.max - memory.current", cg))
    return out


def admit(needed: int, memory_limit: int | None, used: int, what: str) -> None:
    """Raise ``CapacityError`` if ``needed`` more bytes do not fit every limit."""
    if needed <= 0:
        return
    for h in headrooms(memory_limit, used):
        if needed > h.free:
            raise CapacityError(
                f"{what} needs {format_size(needed)} ({needed} bytes) of shared memory, "
                f"but {h.name} leaves {format_size(max(h.free, 0))} ({max(h.free, 0)} bytes)",
                needed=needed, available=max(h.free, 0), limit=h.name,
            )
