"""The one exception tree of shardkeep.

Every failure a user can see from a public call is a ``ShardkeepError``.
Errors cross the wire as ``{"code": <class name>, "message": ..., "details": {...}}``
and are rebuilt on the other side with :func:`from_wire`.
"""

from __future__ import annotations

from typing import Any


class ShardkeepError(Exception):
    """Base class of every shardkeep error."""

    code = "ShardkeepError"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": _plain(self.details)}


class ProtocolError(ShardkeepError):
    """A malformed, oversized, unknown or out-of-order message."""

    code = "ProtocolError"


class IntegrityError(ShardkeepError):
    """Stored bytes do not match their checksums or manifest."""

    code = "IntegrityError"


class CapacityError(ShardkeepError):
    """Not enough memory (limit, /dev/shm, MemAvailable, cgroup) for a request."""

    code = "CapacityError"


class UnavailableError(ShardkeepError):
    """The daemon (or a peer) cannot serve the request now."""

    code = "UnavailableError"


class NotFoundError(ShardkeepError):
    """A job, rank, version or slot does not exist."""

    code = "NotFoundError"


class PermissionDeniedError(ShardkeepError):
    """The caller may not do this (wrong user, token or key)."""

    code = "PermissionDeniedError"


class StaleSessionError(UnavailableError):
    """The daemon restarted or another process re-registered this rank; register again."""

    code = "StaleSessionError"


class ShardkeepTimeoutError(ShardkeepError, TimeoutError):
    """A wait ran past its deadline; the message names what, where and how long."""

    code = "ShardkeepTimeoutError"


_BY_CODE: dict[str, type[ShardkeepError]] = {
    cls.code: cls
    for cls in (
        ShardkeepError,
        ProtocolError,
        IntegrityError,
        CapacityError,
        UnavailableError,
        NotFoundError,
        PermissionDeniedError,
        StaleSessionError,
        ShardkeepTimeoutError,
    )
}


def from_wire(code: Any, message: Any, details: Any = None) -> ShardkeepError:
    """Rebuild an error received in an error reply; unknown codes become the base class."""
    cls = _BY_CODE.get(code if isinstance(code, str) else "", ShardkeepError)
    msg = message if isinstance(message, str) else repr(message)
    err = cls(msg)
    if isinstance(details, dict):
        err.details = details
    return err


def _plain(value: Any, depth: int = 0) -> Any:
    """Details must be msgpack-encodable; anything else becomes its repr."""
    if depth > 4:
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    return repr(value)
