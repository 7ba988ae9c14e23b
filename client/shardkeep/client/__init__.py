"""shardkeep thin client: snapshot training state into the local daemon, restore it after a crash."""

from shardkeep.proto.errors import (
    CapacityError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ShardkeepError,
    ShardkeepTimeoutError,
    UnavailableError,
)

from .snapshotter import RestoreInfo, SnapshotResult, Snapshotter, Stats

__all__ = [
    "Snapshotter",
    "SnapshotResult",
    "RestoreInfo",
    "Stats",
    "ShardkeepError",
    "ProtocolError",
    "IntegrityError",
    "CapacityError",
    "UnavailableError",
    "NotFoundError",
    "PermissionDeniedError",
    "ShardkeepTimeoutError",
]
