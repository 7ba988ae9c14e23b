"""Client-side mappings of the daemon's slot segments.

Each segment is mapped once and pre-faulted (page tables filled at map time,
not by faults during the copy) and reused for every snapshot and restore.  The client never creates or unlinks segments: the daemon owns them.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import socket
import threading
import weakref
from dataclasses import dataclass

import torch

from shardkeep.proto.errors import NotFoundError, PermissionDeniedError, UnavailableError

log = logging.getLogger("shardkeep.client")

SHM_DIR = "/dev/shm"


@dataclass(eq=False)
class Mapping:
    name: str
    size: int
    mm: mmap.mmap
    u8: torch.Tensor  # the whole segment as uint8, over the mapping (no copy)
    address: int
    pinned: bool = False       # page-locking for CUDA was tried (never twice)
    page_locked: bool = False  # ... and cudaHostRegister succeeded

    def region(self, offset: int, nbytes: int) -> torch.Tensor:
        return self.u8[offset : offset + nbytes]


class SlotMaps:
    """name -> Mapping; thread-safe; drop() forgets segments the daemon no longer serves."""

    def __init__(self) -> None:
        self._maps: dict[str, Mapping] = {}
        self._lock = threading.Lock()
        self._fd_socket: tuple[str, str, str | None] | None = None

    def use_fd_socket(self, path: str, job: str, token: str | None) -> None:
        """Multi-user mode: open segments through the daemon's descriptor socket, not by name."""
        self._fd_socket = (path, job, token)

    def get(self, name: str, size: int) -> Mapping:
        with self._lock:
            m = self._maps.get(name)
            if m is not None and m.size == size:
                return m
        m = _map(name, size, self._fd_socket)
        with self._lock:
            self._maps[name] = m
        return m

    def pin(self, m: Mapping) -> None:
        """Page-lock ``m`` for CUDA once (GPU state copied for the first time into it)."""
        if not m.pinned:
            with self._lock:
                if not m.pinned:
                    _register_with_cuda(m, force=True)

    def keep_only(self, names: set[str]) -> None:
        with self._lock:
            for n in list(self._maps):
                if n not in names:
                    del self._maps[n]  # unmapped once no tensor views remain

    def clear(self) -> None:
        with self._lock:
            self._maps.clear()


def fetch_fd(fd_socket: str, job: str, token: str | None, name: str, timeout: float = 10.0) -> int:
    """A descriptor of segment ``name`` of ``job`` from the daemon's ``<socket>.fds`` (multi-user mode)."""
    import msgpack

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        try:
            s.connect(fd_socket)
            s.sendall(msgpack.packb({"job": job, "token": token or "", "names": [name]}))
            msg, fds, _flags, _addr = socket.recv_fds(s, 65536, 4)
        except PermissionError:
            raise PermissionDeniedError(f"cannot use {fd_socket}: this user is not in the daemon's trainer "
                                        "group") from None
        except OSError as exc:
            raise UnavailableError(f"descriptor socket {fd_socket}: {exc}") from None
    try:
        reply = msgpack.unpackb(msg, raw=False) if msg else {}
    except ValueError:
        reply = {}
    if not isinstance(reply, dict) or not reply.get("ok") or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        why = reply.get("error") if isinstance(reply, dict) else None
        raise PermissionDeniedError(f"segment {name} of job {job!r} refused: {why or 'no descriptor'}")
    return fds[0]


def _map(name: str, size: int, fd_socket: tuple[str, str, str | None] | None = None) -> Mapping:
    if "/" in name or name.startswith("."):
        raise PermissionDeniedError(f"refusing segment name {name!r}")
    path = os.path.join(SHM_DIR, name)
    try:
        if fd_socket is not None:
            fd = fetch_fd(*fd_socket, name)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise NotFoundError(f"segment {path} is gone (daemon restarted or job finished)") from None
    except PermissionError:
        raise PermissionDeniedError(f"cannot open {path}: run the trainer as the daemon's user, or use a "
                                    "daemon in multi-user mode (--trainer-group)") from None
    try:
        st = os.fstat(fd)
        if st.st_size != size:
            raise NotFoundError(f"segment {path} has {st.st_size} bytes, expected {size}")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    u8 = torch.frombuffer(mm, dtype=torch.uint8)
    m = Mapping(name, size, mm, u8, u8.data_ptr())
    _prefault(m)
    _register_with_cuda(m)
    return m


_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PREFAULT_PIECE = 16 << 20
_libc = None


def _prefault(m: Mapping) -> None:
    """Fill the page tables once, so copies never fault (DESIGN: MAP_POPULATE).

    ``mmap(MAP_POPULATE)`` does the same but CPython 3.11 holds the GIL through
    it (seconds per GB here), freezing the training thread; ``madvise`` through
    ctypes releases the GIL.  It goes in pieces: populating holds the process's
    mmap lock, and the training thread's own allocations (``mmap``/``munmap`` of
    large tensors) wait for it; one call per GB stalled an Adam step for seconds.
    Kernels without MADV_POPULATE_WRITE fault lazily.
    """
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        for off in range(0, m.size, _PREFAULT_PIECE):
            n = min(_PREFAULT_PIECE, m.size - off)
            if _libc.madvise(m.address + off, n, _MADV_POPULATE_WRITE) != 0:
                log.debug("madvise(MADV_POPULATE_WRITE) failed: %s", os.strerror(ctypes.get_errno()))
                return
    except (OSError, AttributeError) as exc:
        log.debug("cannot pre-fault %s: %s", m.name, exc)


def _register_with_cuda(m: Mapping, force: bool = False) -> None:
    """Page-lock the mapping for the CUDA driver, so device-to-host copies run async at full speed.

    At map time only where the process already uses CUDA (``force``: it holds GPU
    state now); a CPU-only trainer never initializes CUDA because of shardkeep.
    A mapping that cannot be registered still works: copies into it are then
    synchronous (staged by the driver), and that is logged once.
    """
    if not torch.cuda.is_available() or not (force or torch.cuda.is_initialized()):
        return
    m.pinned = True  # tried: never again for this mapping, whatever the outcome
    try:
        err = torch.cuda.cudart().cudaHostRegister(m.address, m.size, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister of %s failed (%s); copies from the GPU will be synchronous", m.name, err)
            return
        m.page_locked = True
        weakref.finalize(m, _unregister, m.address)
    except Exception as exc:  # an old driver or a build without cudart bindings
        log.warning("cannot page-lock %s for CUDA: %s", m.name, exc)


def _unregister(address: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception:
        pass
