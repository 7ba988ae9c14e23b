"""Shared-memory slot segments: create, reserve, map, header and manifest I/O.

Segments are plain files in /dev/shm created with ``os.open(O_CREAT|O_EXCL)``
(never Python's ``shared_memory`` module, whose resource tracker unlinks a
segment when any process that attached it exits), mode 0600, reserved with
``posix_fallocate`` so that a full tmpfs is an error here and never a SIGBUS
in the middle of a trainer's copy.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from shardkeep.proto.errors import CapacityError, IntegrityError, PermissionDeniedError
from shardkeep.proto.manifest import Manifest, checksum
from shardkeep.proto.slotfile import (
    HEADER_SIZE,
    STATE_COMMITTED,
    STATE_FREE,
    STATE_WRITING,
    SlotHeader,
    geometry,
)

SHM_DIR = "/dev/shm"

STATE_NAMES = {STATE_FREE: "free", STATE_WRITING: "writing", STATE_COMMITTED: "committed"}


@dataclass(eq=False)
class Slot:
    id: int
    name: str
    header: SlotHeader
    fd: int
    mm: mmap.mmap
    pins: dict[str, float] = field(default_factory=dict)  # pin token -> lease expiry
    manifest: Manifest | None = None
    begun_at: float = 0.0
    epoch: int = 0               # the job's launch the writer named in begin (group-commit identity)

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    @property
    def state(self) -> int:
        return self.header.state

    @property
    def step(self) -> int:
        return self.header.step

    @property
    def size(self) -> int:
        return self.header.slot_size

    @property
    def data_capacity(self) -> int:
        return self.header.data_capacity

    @property
    def manifest_capacity(self) -> int:
        return self.header.manifest_capacity

    @property
    def pinned(self) -> bool:
        return bool(self.pins)

    def describe(self) -> dict:
        return {
            "id": self.id,
            "name": self.name,
            "size": self.size,
            "data_offset": self.header.data_offset,
            "data_capacity": self.data_capacity,
            "manifest_offset": self.header.manifest_offset,
            "manifest_capacity": self.manifest_capacity,
        }

    # --- header and manifest (daemon-owned regions) ---------------------------------

    def write_header(self) -> None:
        raw = self.header.pack()
        self.mm[: len(raw)] = raw

    def mark_writing(self, step: int) -> None:
        self.header.state = STATE_WRITING
        self.header.step = step
        self.header.manifest_len = 0
        self.manifest = None
        self.write_header()
        self.begun_at = time.monotonic()

    def mark_free(self) -> None:
        self.header.state = STATE_FREE
        self.header.step = -1
        self.header.manifest_len = 0
        self.manifest = None
        self.write_header()

    def commit(self, manifest: Manifest, encoded: bytes, commit_seq: int) -> None:
        """Manifest first, header last: a crash in between leaves a non-committed slot."""
        if len(encoded) > self.manifest_capacity:
            raise CapacityError(
                f"manifest of {len(encoded)} bytes exceeds the slot's {self.manifest_capacity}; "
                "register again with a larger manifest_bytes"
            )
        off = self.header.manifest_offset
        self.mm[off : off + len(encoded)] = encoded
        self.header.manifest_len = len(encoded)
        self.header.manifest_xxh = checksum(encoded)
        self.header.step = manifest.step
        self.header.history = manifest.history
        self.header.commit_seq = commit_seq
        self.header.state = STATE_COMMITTED
        self.write_header()
        self.manifest = manifest

    def read_manifest(self) -> Manifest:
        h = self.header
        raw = self.mm[h.manifest_offset : h.manifest_offset + h.manifest_len]
        if checksum(raw) != h.manifest_xxh:
            raise IntegrityError(f"slot {self.name}: manifest checksum mismatch")
        m = Manifest.decode(raw, h.data_capacity)
        if m.job != h.job or m.rank != h.rank or m.step != h.step:
            raise IntegrityError(f"slot {self.name}: manifest disagrees with its header")
        return m

    def data_view(self) -> memoryview:
        h = self.header
        return memoryview(self.mm)[h.data_offset : h.data_offset + h.data_capacity]

    def close(self) -> None:
        _unmap(self.mm, self.fd)

    def destroy(self) -> None:
        self.close()
        _remove(self.path)


def _unmap(mm: mmap.mmap, fd: int) -> None:
    try:
        mm.close()
    except BufferError:
        pass  # a view is still alive; the mapping goes with the process
    try:
        os.close(fd)
    except OSError:
        pass


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def segment_name(prefix: str, job: str, rank: int) -> str:
    return f"{prefix}-{job}-r{rank}-{secrets.token_hex(4)}"


def create_slot(
    slot_id: int, prefix: str, job: str, rank: int, data_capacity: int, manifest_capacity: int
) -> Slot:
    """Create and fully reserve a segment (blocking: run it off the event loop)."""
    moff, doff, size = geometry(data_capacity, manifest_capacity)
    seg = create_segment(segment_name(prefix, job, rank), size, f"job {job!r} rank {rank}")
    header = SlotHeader(
        state=STATE_FREE, slot_size=size, data_offset=doff, data_capacity=size - doff,
        manifest_offset=moff, manifest_capacity=doff - moff, rank=rank, job=job,
    )
    slot = Slot(slot_id, seg.name, header, seg.fd, seg.mm)
    slot.write_header()
    return slot


def open_existing(slot_id: int, name: str) -> Slot:
    """Open a segment found at start-up; raise ``IntegrityError`` if it is not a sane slot."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionDeniedError(f"{path} is owned by uid {st.st_uid}, not the daemon's")
        if st.st_size < HEADER_SIZE + 4096:
            raise IntegrityError(f"{path} is too small to be a slot")
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    try:
        header = SlotHeader.unpack(mm[:HEADER_SIZE], path)
        if header.slot_size != st.st_size:
            raise IntegrityError(f"{path}: header size {header.slot_size} != file size {st.st_size}")
    except BaseException:
        mm.close()
        os.close(fd)
        raise
    return Slot(slot_id, name, header, fd, mm)


def verify_slot(slot: Slot) -> Manifest:
    """Full check of a committed slot: manifest checksum and every data chunk (blocking)."""
    from shardkeep.proto.manifest import verify_data

    m = slot.read_manifest()
    view = slot.data_view()
    try:
        verify_data(m, view, f"slot {slot.name}")
    finally:
        view.release()
    return m


@dataclass(eq=False)
class Segment:
    """A plain reserved shm segment (staging and parity of the group commit): no slot header."""

    name: str
    size: int
    fd: int
    mm: mmap.mmap

    def view(self) -> memoryview:
        return memoryview(self.mm)

    def close(self) -> None:
        """Unmap and close; the segment stays in /dev/shm (for the next daemon to re-adopt)."""
        _unmap(self.mm, self.fd)

    def destroy(self) -> None:
        self.close()
        _remove(os.path.join(SHM_DIR, self.name))


def open_segment(name: str, min_size: int) -> Segment:
    """Map an existing plain segment found at start-up (ours, at least ``min_size`` bytes)."""
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise PermissionDeniedError(f"{path} is owned by uid {st.st_uid}, not the daemon's")
        if st.st_size < max(min_size, 1):
            raise IntegrityError(f"{path} has {st.st_size} bytes, expected at least {min_size}")
        mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Segment(name, st.st_size, fd, mm)


def create_segment(name: str, size: int, what: str | None = None) -> Segment:
    """Create, reserve (posix_fallocate) and map a 0600 segment (blocking: run it off the event loop).

    Every page is allocated now: a full tmpfs is a ``CapacityError`` here, never
    a SIGBUS in the middle of a copy later.
    """
    path = os.path.join(SHM_DIR, name)
    size = max(size, 4096)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                raise CapacityError(f"cannot reserve {size} bytes in {SHM_DIR} for {what or name}: "
                                    f"{os.strerror(exc.errno)}", needed=size) from None
            raise
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return Segment(name, size, fd, mm)


def pwrite_all(fd: int, data: Any, at: int) -> None:
    """Write ``data`` at offset ``at`` of a shm file (the kernel copies; the GIL is released)."""
    mv = memoryview(data).cast("B")
    while mv:
        n = os.pwrite(fd, mv, at)
        mv, at = mv[n:], at + n


def pread_exact(fd: int, n: int, at: int) -> bytes:
    """Read exactly ``n`` bytes at offset ``at`` of a shm file (the GIL is released)."""
    out = os.pread(fd, n, at)
    if len(out) != n:
        raise OSError(f"short read from shm: {len(out)} of {n} bytes at {at}")
    return out
