"""A request/reply channel to a daemon: one DEALER socket, a deadline on every wait."""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any

import zmq

from . import wire
from .errors import PermissionDeniedError, ProtocolError, ShardkeepTimeoutError, UnavailableError


def ipc_endpoint(path: str) -> str:
    return path if "://" in path else f"ipc://{os.path.abspath(path)}"


class Channel:
    """Thread-safe (one request at a time) synchronous client of a daemon socket."""

    def __init__(self, endpoint: str, timeout: float = 10.0) -> None:
        self.endpoint = ipc_endpoint(endpoint)
        self.timeout = timeout
        self._ctx = zmq.Context.instance()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None
        self._pid = os.getpid()

    def _socket(self) -> zmq.Socket:
        if self._sock is None or self._pid != os.getpid():
            # a forked child must not share its parent's socket
            self._pid = os.getpid()
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 64)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close(linger=0)
        self._sock = None

    def request(
        self,
        mtype: str,
        fields: dict[str, Any] | None = None,
        payload: list | None = None,
        timeout: float | None = None,
    ) -> wire.Message:
        timeout = self.timeout if timeout is None else timeout
        if self.endpoint.startswith("ipc://") and not os.path.exists(self.endpoint[6:]):
            path = self.endpoint[6:]
            try:
                os.stat(path)
            except PermissionError:
                raise PermissionDeniedError(
                    f"cannot reach the shardkeep daemon socket {path}: permission denied (run as the daemon's "
                    "user, or, for a daemon in multi-user mode, as a member of its --trainer-group)") from None
            except OSError:
                pass
            raise UnavailableError(
                f"no shardkeep daemon socket at {self.endpoint[6:]} (is shardkeepd running? "
                "set SHARDKEEP_SOCKET or pass socket=)"
            )
        with self._lock:
            mid = next(self._ids)
            sock = self._socket()
            deadline = time.monotonic() + timeout
            try:
                sock.send_multipart(wire.encode(mtype, mid, fields, payload), copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                self._reset()
                raise UnavailableError(f"{mtype}: daemon at {self.endpoint} is not accepting requests") from None
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    self._reset()  # drop a reply that may still arrive late
                    raise ShardkeepTimeoutError(
                        f"{mtype} request to the daemon at {self.endpoint} got no reply "
                        f"after {timeout:.1f}s",
                        what=mtype, where=self.endpoint, after=timeout,
                    )
                frames = sock.recv_multipart(copy=False)
                try:
                    reply = wire.decode_reply(frames)
                except Exception as exc:
                    if getattr(exc, "request_id", mid) not in (mid, 0, -1):
                        continue  # a late error reply to an earlier request
                    raise
                if reply.id != mid:
                    continue  # a late reply to an earlier, timed-out request
                return reply

    def close(self) -> None:
        with self._lock:
            self._reset()


def check_fields(reply: wire.Message, *names: str) -> None:
    missing = [n for n in names if n not in reply.fields]
    if missing:
        raise ProtocolError(f"reply lacks fields {missing}")
