"""Timeouts and defaults shared by the client and the daemon (seconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timeouts:
    client_request: float = 10.0
    heartbeat: float = 1.0
    peer_down: float = 5.0
    group_commit: float = 30.0
    rebuild_chunk: float = 30.0
    #: a restore pin whose reader vanished is dropped after this long
    pin_lease: float = 600.0


DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_SLOTS = 2
DEFAULT_SOCKET = "/run/shardkeep/shardkeep.sock"


def default_socket() -> str:
    """``SHARDKEEP_SOCKET``, else /run/shardkeep for root, else the user's runtime dir."""
    import os

    env = os.environ.get("SHARDKEEP_SOCKET")
    if env:
        return env
    if os.geteuid() == 0:
        return DEFAULT_SOCKET
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/shardkeep-{os.geteuid()}"
    return os.path.join(base, "shardkeep", "shardkeep.sock")
