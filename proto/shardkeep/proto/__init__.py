"""shardkeep wire protocol, on-shm formats, errors and shared config (no torch, no pyeclib)."""

from .errors import (
    CapacityError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ShardkeepError,
    ShardkeepTimeoutError,
    StaleSessionError,
    UnavailableError,
)
from .wire import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "CapacityError",
    "IntegrityError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "ShardkeepError",
    "ShardkeepTimeoutError",
    "StaleSessionError",
    "UnavailableError",
]
