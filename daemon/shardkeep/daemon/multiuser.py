"""Multi-user mode (``--trainer-group G``): trainers of several users share one daemon, jobs stay apart.

The ipc socket and its directory are group G's (0660, 0750); segments stay
0600 and the daemon's, so nobody opens a slot by name.  Trainers get slot
file descriptors from a plain unix stream socket beside the ipc one
(``<socket>.fds``, 0660, group G; ZeroMQ cannot carry descriptors): the
daemon reads the peer's credentials (SO_PEERCRED), requires a member of G
(or the daemon's user, or root) and the job's token, and sends descriptors
(SCM_RIGHTS) of that job's slots only.

A job's token (``SHARDKEEP_JOB_TOKEN``, the same for every rank: the launcher
makes one per job) is recorded, as a SHA-256, at the job's first
registration and required from then on by every request that reads, pins or
changes the job; the record survives daemon restarts (``job-tokens.json`` in
the state directory, 0600).
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import hmac
import json
import logging
import os
import secrets
import pwd
import socket
import struct
from collections.abc import Callable

import msgpack

from shardkeep.proto.errors import PermissionDeniedError, ProtocolError

log = logging.getLogger("shardkeep.daemon")

MAX_FD_REQUEST = 64 << 10
MAX_FDS = 64
FD_REQUEST_TIMEOUT = 5.0


def resolve_group(name: str) -> int:
    """gid of ``name`` (a group name or a number); ValueError naming it if there is none."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        if name.isdigit():
            return int(name)
        raise ValueError(f"trainer_group {name!r}: no such group") from None


def fd_socket_path(socket_path: str) -> str:
    return os.path.abspath(socket_path) + ".fds"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """job -> SHA-256 of its token, kept in the state directory."""

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, "job-tokens.json")
        # the daemon's own helpers (the persist tier's worker) read every job with this one, never written down
        self.internal = secrets.token_hex(32)
        try:
            with open(self.path) as f:
                raw = json.load(f)
            self._h = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        except FileNotFoundError:
            self._h = {}
        except (OSError, ValueError) as exc:  # unreadable: every job must present its token afresh
            log.error("%s unreadable (%s): job tokens start empty", self.path, exc)
            self._h = {}

    def _save(self) -> None:
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self._h, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def check(self, job: str, token: str | None, *, record: bool = False) -> None:
        """The job's token, or PermissionDeniedError; ``record``: a job without one takes this one."""
        if not token:
            raise PermissionDeniedError(f"job {job!r}: this daemon runs in multi-user mode; every request about a "
                                        "job needs its token (set SHARDKEEP_JOB_TOKEN, the same on every rank)")
        if not record and hmac.compare_digest(token, self.internal):
            return
        want = self._h.get(job)
        if want is None:
            if not record:
                raise PermissionDeniedError(f"job {job!r} has no token here yet: register it first")
            self._h[job] = _digest(token)
            self._save()
            return
        if not hmac.compare_digest(want, _digest(token)):
            raise PermissionDeniedError(f"job {job!r}: wrong job token")

    def forget(self, job: str) -> None:
        if self._h.pop(job, None) is not None:
            self._save()


def _peer_cred(conn: socket.socket) -> tuple[int, int, int]:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", raw)  # pid, uid, gid


def _in_group(uid: int, gid: int, group: int) -> bool:
    if uid in (0, os.geteuid()) or gid == group:
        return True
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    return group in os.getgrouplist(user, gid)


class FdServer:
    """The ``<socket>.fds`` server: one request per connection, msgpack ``{job, token, names}``; the reply
    ``{ok, error}`` carries the descriptors of ``names``, in order, as SCM_RIGHTS."""

    def __init__(self, path: str, gid: int, tokens: Tokens, slot_names: Callable[[str], set[str]],
                 open_segment: Callable[[str], int]) -> None:
        self.path, self.gid, self.tokens = path, gid, tokens
        self.slot_names, self.open_segment = slot_names, open_segment
        self.refused = 0
        self._srv: socket.socket | None = None

    def bind(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        os.chown(self.path, -1, self.gid)
        os.chmod(self.path, 0o660)
        s.listen(64)
        s.setblocking(False)
        self._srv = s

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._srv is not None
        try:
            while True:
                conn, _ = await loop.sock_accept(self._srv)
                loop.create_task(self._one(conn))
        finally:
            self._srv.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def _one(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        fds: list[int] = []
        try:
            pid, uid, gid = _peer_cred(conn)
            if not _in_group(uid, gid, self.gid):
                self.refused += 1
                log.warning("fd request from pid %d uid %d refused: not in the trainer group", pid, uid)
                raise PermissionDeniedError(f"uid {uid} is not in the daemon's trainer group")
            raw = await asyncio.wait_for(loop.sock_recv(conn, MAX_FD_REQUEST), FD_REQUEST_TIMEOUT)
            req = msgpack.unpackb(raw, raw=False) if raw else None
            if not (isinstance(req, dict) and isinstance(req.get("job"), str) and isinstance(req.get("names"), list)
                    and all(isinstance(n, str) for n in req["names"]) and len(req["names"]) <= MAX_FDS):
                raise ProtocolError("fd request: expected {job, token, names: [<= 64 segment names]}")
            job = req["job"]
            self.tokens.check(job, req.get("token") if isinstance(req.get("token"), str) else None)
            mine = self.slot_names(job)
            other = [n for n in req["names"] if n not in mine]
            if other:
                self.refused += 1
                raise PermissionDeniedError(f"job {job!r} holds no segments {other}")
            fds = [self.open_segment(n) for n in req["names"]]
            socket.send_fds(conn, [msgpack.packb({"ok": True})], fds)
        except Exception as exc:  # noqa: BLE001 - every failure is the requester's answer
            err = exc if isinstance(exc, (PermissionDeniedError, ProtocolError)) else ProtocolError(str(exc))
            try:
                conn.send(msgpack.packb({"ok": False, "error": str(err), "code": type(err).__name__}))
            except OSError:
                pass
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()
