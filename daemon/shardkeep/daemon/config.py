"""The daemon's configuration: one dataclass; CLI flags map onto it in cli.py."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
    log_format: str = "text"           # "text", or "json": one JSON object per line
    metrics_port: int = 0              # Prometheus endpoint; 0 = none
    metrics_host: str = "127.0.0.1"
    trainer_group: str = ""            # multi-user mode: trainers of this group, slots by descriptor
    max_request_rate: float = 10000.0  # requests/s per trainer connection (bursts of twice that); 0: no limit
    # persist tier (off without persist_dir): every Nth group-level version to shared storage, DCP's layout
    persist_dir: str = ""
    persist_every: int = 10            # persist a version when its step crosses a multiple of this
    persist_rate: int = 256 << 20      # bytes/s each node's worker writes at most; 0: no limit
    persist_keep: int = 3              # step directories kept per job
    timeouts: Timeouts = field(default_factory=Timeouts)
    # group (no peers: a group of one, the single-node mode)
    node: int = 0                      # -1 ("auto"): the --peers entry whose host is --advertise
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
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0 (off) or a port 1..65535, got {self.metrics_port}")
        if self.trainer_group:
            from .multiuser import resolve_group

            resolve_group(self.trainer_group)  # ValueError naming it
        if self.max_request_rate < 0:
            raise ValueError(f"max_request_rate must be >= 0 (0: no limit), got {self.max_request_rate}")
        if self.persist_every < 1:
            raise ValueError(f"persist_every must be >= 1, got {self.persist_every}")
        if self.persist_keep < 1:
            raise ValueError(f"persist_keep must be >= 1, got {self.persist_keep}")
        if self.persist_rate < 0:
            raise ValueError(f"persist_rate must be >= 0 bytes/s (0: no limit), got {self.persist_rate}")
        if self.persist_dir and not os.path.isabs(self.persist_dir):
            raise ValueError(f"persist_dir must be an absolute path, got {self.persist_dir!r}")
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
            if self.node == -1:
                self.node = _node_of(self.peers, self.advertise)
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


# --- where each setting comes from: defaults < --config FILE (TOML) < SHARDKEEP_* < flags -------------

_BOOL = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _p_str(v):
    if not isinstance(v, str):
        raise ValueError("expected a string")
    return v


def _p_int(v):
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, str):
        v = v.strip()
        if not v.lstrip("-").isdigit():
            raise ValueError("expected an integer")
        return int(v)
    if not isinstance(v, int):
        raise ValueError("expected an integer")
    return v


def _p_float(v):
    if isinstance(v, bool):
        raise ValueError("expected a number of seconds")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if not f == f or f in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return f


def _p_bool(v):
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in _BOOL:
        return _BOOL[v.strip().lower()]
    raise ValueError("expected true or false")


def _p_size(v):
    from shardkeep.proto.sizes import parse_size

    if isinstance(v, bool):
        raise ValueError("expected a size such as 8GB")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return parse_size(v)
    raise ValueError("expected a size such as 8GB")


def _p_log_format(v):
    v = _p_str(v).lower()
    if v not in ("text", "json"):
        raise ValueError("expected text or json")
    return v


def _p_node(v):
    if isinstance(v, str) and v.strip().lower() == "auto":
        return -1
    n = _p_int(v)
    if n < 0:
        raise ValueError("expected a node index >= 0, or auto")
    return n


def _node_of(peers: list[str], advertise: str) -> int:
    """node = auto: the index of the one peers entry whose host is ``advertise`` (a DaemonSet's host IP)."""
    from .peerlink import split_address

    if not advertise:
        raise ValueError("node = auto needs advertise (this node's host as written in peers), e.g. "
                         "SHARDKEEP_ADVERTISE from the pod's status.hostIP")
    hits = [i for i, a in enumerate(peers) if split_address(a)[1] == advertise]
    if len(hits) != 1:
        raise ValueError(f"node = auto: advertise {advertise!r} matches {len(hits)} of the peers "
                         f"{peers} (need exactly one)")
    return hits[0]


def _p_peers(v):
    if isinstance(v, str):
        return [a.strip() for a in v.split(",") if a.strip()]
    if isinstance(v, list) and all(isinstance(a, str) for a in v):
        return [a.strip() for a in v]
    raise ValueError("expected a list of tcp://HOST:PORT addresses (or one comma-separated string)")


def _p_level(v):
    v = _p_str(v).upper()
    if v not in _LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(_LOG_LEVELS)}")
    return v


#: every setting: key (as in the TOML file; "timeouts.x" in its [timeouts] table) -> parser
SETTINGS: dict[str, Any] = {
    "socket": _p_str, "shm_prefix": _p_str, "memory_limit": _p_size, "state_dir": _p_str, "slots": _p_int,
    "job_ttl": _p_float, "log_level": _p_level, "log_format": _p_log_format, "metrics_port": _p_int,
    "metrics_host": _p_str, "trainer_group": _p_str, "max_request_rate": _p_float,
    "persist_dir": _p_str, "persist_every": _p_int, "persist_rate": _p_size, "persist_keep": _p_int,
    "node": _p_node, "peers": _p_peers, "parity": _p_int, "data_port": _p_int, "advertise": _p_str,
    "curve_secret": _p_str, "curve_public_dir": _p_str, "insecure": _p_bool, "encrypt_data": _p_bool,
    **{f"timeouts.{f.name}": _p_float for f in dataclasses.fields(Timeouts)},
}


def env_name(key: str) -> str:
    """SHARDKEEP_<KEY>: ``timeouts.peer_down`` -> SHARDKEEP_TIMEOUTS_PEER_DOWN."""
    return "SHARDKEEP_" + key.replace(".", "_").upper()


def _flatten_toml(data: dict, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k == "timeouts" and isinstance(v, dict):
            for tk, tv in v.items():
                out[f"timeouts.{tk}"] = tv
        else:
            out[k] = v
    unknown = sorted(set(out) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    return out


def load_config(flags: dict[str, Any], env: Mapping[str, str] | None = None,
                config_file: str | None = None) -> tuple["DaemonConfig", dict[str, str]]:
    """The effective config and, per key, where its value came from.

    ``flags``: settings given on the command line (only those given), by key.
    Values are parsed and checked here; the error names the key, the source and the value.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        import tomllib

        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ValueError(f"--config {config_file}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"--config {config_file}: not valid TOML: {exc}") from None
        layers.append((f"file {config_file}", _flatten_toml(data, config_file)))
    layers.append(("env", {k: env[env_name(k)] for k in SETTINGS if env_name(k) in env}))
    layers.append(("flag", {k: v for k, v in flags.items() if v is not None}))
    values: dict[str, Any] = {}
    source: dict[str, str] = {k: "default" for k in SETTINGS}
    for where, layer in layers:
        for k, raw in layer.items():
            try:
                values[k] = SETTINGS[k](raw)
            except ValueError as exc:
                shown = env_name(k) if where == "env" else k
                raise ValueError(f"{shown} = {raw!r} ({where}): {exc}") from None
            source[k] = f"env {env_name(k)}" if where == "env" else where
    tkw = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("timeouts.")}
    kw = {k: v for k, v in values.items() if not k.startswith("timeouts.")}
    if kw.get("persist_dir") and "slots" not in kw:  # a version pinned while it is persisted holds a slot
        kw["slots"], source["slots"] = 3, "default with persist_dir"
    cfg = DaemonConfig(**kw, timeouts=Timeouts(**tkw))
    return cfg, source


def render_config(cfg: "DaemonConfig", source: dict[str, str]) -> str:
    """The effective config as TOML (usable as a --config file), each value with where it came from."""
    import json

    def line(k: str, v: Any) -> str:
        if v is None:
            return f"# {k} is not set  # {source[k]}"
        text = ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) \
            else json.dumps(v)
        return f"{k} = {text}  # {source[k]}"

    top = [line(k, getattr(cfg, k)) for k in SETTINGS if not k.startswith("timeouts.")]
    tim = [line(k, getattr(cfg.timeouts, k.split(".", 1)[1])).replace("timeouts.", "", 1)
           for k in SETTINGS if k.startswith("timeouts.")]
    return "\n".join(top + ["", "[timeouts]"] + tim) + "\n"
