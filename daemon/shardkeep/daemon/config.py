"""The daemon's configuration: one dataclass; CLI flags map onto it in cli.py."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from shardkeep.proto.config import DEFAULT_SLOTS, Timeouts, default_socket

_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,47}")


@dataclass
class DaemonConfig:
    socket: str = field(default_factory=default_socket)
    shm_prefix: str = "shardkeep"
    memory_limit: int | None = None
    state_dir: str = ""
    slots: int = DEFAULT_SLOTS
    job_ttl: float = 0.0               # seconds; 0 keeps idle jobs until finish/release
    log_level: str = "INFO"
    timeouts: Timeouts = field(default_factory=Timeouts)
    # group (no peers: a group of one, the single-node mode)
    node: int = 0
    peers: list[str] = field(default_factory=list)
    parity: int = 1
    data_port: int = 0
    advertise: str = ""
    curve_secret: str = ""
    curve_public_dir: str = ""
    insecure: bool = False
    encrypt_data: bool = False

    def validate(self) -> "DaemonConfig":
        if not _PREFIX_RE.fullmatch(self.shm_prefix):
            raise ValueError(
                f"shm_prefix {self.shm_prefix!r}: 1-48 characters of A-Z a-z 0-9 _, "
                "starting with a letter or digit"
            )
        if self.job_ttl < 0:
            raise ValueError(f"job_ttl must be >= 0 seconds, got {self.job_ttl}")
        if not 2 <= self.slots <= 8:
            raise ValueError(f"slots must be 2..8, got {self.slots}")
        if self.memory_limit is not None and self.memory_limit <= 0:
            raise ValueError(f"memory_limit must be positive, got {self.memory_limit}")
        if not (0 < self.timeouts.heartbeat < self.timeouts.peer_down):
            raise ValueError(f"need 0 < heartbeat ({self.timeouts.heartbeat}) < peer timeout "
                             f"({self.timeouts.peer_down})")
        if self.peers:
            n = len(self.peers)
            if n < 2:
                raise ValueError("--peers needs at least two addresses (this node's and a peer's)")
            if not 0 <= self.node < n:
                raise ValueError(f"--node {self.node} is not an index into the {n} --peers addresses")
            if not 1 <= self.parity < n:
                raise ValueError(f"--parity must be in [1, {n - 1}] for a group of {n}, got {self.parity}")
            if self.insecure and self.encrypt_data:
                raise ValueError("--insecure and --encrypt-data contradict each other")
            if not self.insecure and not (self.curve_secret and self.curve_public_dir):
                raise ValueError("a group needs --curve-secret FILE and --curve-public-dir DIR "
                                 "(shardkeep keygen writes them), or --insecure on loopback")
        if not self.state_dir:
            base = "/var/lib/shardkeep" if os.geteuid() == 0 else os.path.expanduser("~/.local/state/shardkeep")
            self.state_dir = os.path.join(base, self.shm_prefix)
        return self
