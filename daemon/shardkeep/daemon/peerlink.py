"""The transport between the daemons of a group: control over CURVE, bulk data tagged.

One :class:`PeerContext` per daemon owns the ZeroMQ context and, unless the
group runs ``insecure``, the ZAP authenticator that admits only the public keys
of the key directory.  On it live

- :class:`ControlServer`: a ROUTER at the node's control address.  Every
  received message is attributed to a node index taken from the *authenticated
  CURVE key* (the ZAP user id, ``Frame.get("User-Id")``), never from anything
  the sender wrote; ``insecure`` mode (loopback only) reads it from the DEALER
  routing id.
- :class:`ControlClient`: one DEALER per peer, CURVE client with the peer's
  public key from the key directory, request/reply matched by id with a
  deadline on every wait, plus one-way sends.
- :class:`DataPlane`: bulk transfer on its own ROUTER (plain TCP unless
  ``encrypt-data``).  Each message is ``[header, payload, tag]``; the tag is a
  32-byte keyed BLAKE3 of header + payload with a per-(src, dst) key agreed over
  the CURVE control channel; the receiver checks the tag, the destination and a
  strictly increasing sequence number, and drops (and counts) anything else.

Control messages follow :mod:`shardkeep.proto.wire`: a msgpack header frame
``{"v": 1, "type": T, "id": N, ...fields}`` and raw payload frames; replies are
wire's ``ok`` / ``error``.  Request ids start at 1; id 0 marks a one-way
message (no reply, except an error reply if it is malformed).  Every incoming
header is size-checked and validated against :data:`PEER_SCHEMAS`; a malformed
message gets an error reply and a log line, and the loop goes on.

Nothing here unpickles; every wait that a caller makes has a deadline.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hmac
import inspect
import ipaddress
import itertools
import logging
import math
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable

import blake3
import msgpack
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from shardkeep.proto import wire
from shardkeep.proto.fields import (
    boolean,
    bytes_of,
    int_range,
    job_id,
    list_of,
    non_negative,
    one_of,
    str_max,
)
from shardkeep.proto.errors import (
    PermissionDeniedError,
    ProtocolError,
    ShardkeepError,
    ShardkeepTimeoutError,
    UnavailableError,
    from_wire,
)

from .ratelimit import TokenBuckets

log = logging.getLogger("shardkeep.peer")

__all__ = [
    "MODES",
    "PEER_SCHEMAS",
    "PEER_MESSAGE_TYPES",
    "DATA_KINDS",
    "PeerSecurity",
    "PeerContext",
    "PeerMessage",
    "ControlServer",
    "ControlClient",
    "DataMessage",
    "DataPlane",
    "new_session_key",
    "seal",
    "data_tag",
    "wait_released",
    "split_address",
    "is_loopback_host",
    "check_peer_message",
]

MODES = ("curve", "encrypt-data", "insecure")
ZAP_DOMAIN = "shardkeep"
PROTOCOL_VERSION = wire.PROTOCOL_VERSION

MAX_NODES = 4096
MAX_PEER_HEADER_BYTES = 64 << 10          # a control header frame
MAX_CONTROL_PAYLOAD_BYTES = 64 << 20      # one control payload frame
PEER_MAX_RATE = 50_000.0                  # control messages/s from one peer (a group commit sends hundreds)
MAX_CONTROL_FRAMES = 4                    # header + payload frames
MAX_DATA_HEADER_BYTES = 16 << 10          # a data-plane header frame
MAX_DATA_PAYLOAD_BYTES = 64 << 20         # one data-plane payload: split larger transfers
TAG_BYTES = 32
KEY_BYTES = 32
MAX_SEQ = (1 << 63) - 1
HASH_IN_THREAD_BYTES = 256 << 10          # hash payloads at least this big off the event loop (BLAKE3 drops the GIL)

# ZeroMQ-level liveness: a dead TCP peer is noticed within seconds, so a replacement's
# connection is never shadowed by a half-open one.
_ZMQ_HEARTBEAT_IVL_MS = 1000
_ZMQ_HEARTBEAT_TIMEOUT_MS = 5000
_RECONNECT_IVL_MS = 100
_RECONNECT_IVL_MAX_MS = 2000
# a TCP connect not done within this is abandoned and tried afresh: the kernel's SYN retransmissions back
# off (1, 2, 4, 8 ... s), so after a partition heals a pending connect could otherwise wait many seconds
_CONNECT_TIMEOUT_MS = 1000

# --- field validators (shared with shardkeep.proto.wire) ------------------------------


_int, _str, _enum, _bytes, _list = int_range, str_max, one_of, bytes_of, list_of
_bool, _float, _job = boolean, non_negative, job_id


def _address(name: str, v: Any) -> Any:
    if not isinstance(v, str) or len(v) > 300:
        raise ProtocolError(f"field {name!r} must be an address string of at most 300 characters")
    try:
        scheme, _, port = split_address(v)
    except ValueError as exc:
        raise ProtocolError(f"field {name!r}: {exc}") from None
    if scheme != "tcp" or not 1 <= port <= 65535:
        raise ProtocolError(f"field {name!r} must be tcp://HOST:PORT with a port in 1..65535, got {v!r}")
    return v


NODE = _int(0, MAX_NODES - 1)
GEN = _int(0, MAX_SEQ)
STEP = wire.STEP
RANK = wire.RANK
SIZE = wire.SIZE
GROUP = _str(128)
HISTORY = _str(64)
REASON = _str(4096)

# Fields every peer message may carry: membership stamps messages with its group and
# generation so that a fenced node (lower generation) is refused.
# "epoch" names the job's launch in every message about a version (see groupcommit.py)
COMMON_OPTIONAL: dict[str, Callable[[str, Any], Any]] = {"group": GROUP, "gen": GEN, "epoch": _int(0, MAX_SEQ)}

# type -> (required fields, optional fields, payload frames allowed)
PEER_SCHEMAS: dict[str, tuple[dict, dict, int]] = {
    # membership
    "hello": (
        {"group": GROUP, "node": NODE, "gen": GEN, "control": _address, "data": _address},
        {"instance": _str(64), "key": _bytes(KEY_BYTES), "n": _int(1, MAX_NODES),
         "m": _int(0, MAX_NODES), "codec": _str(64)},
        0,
    ),
    "heartbeat": ({"gen": GEN}, {"degraded": _bool, "time": _float}, 0),
    # group commit
    # payload: the sender's manifests of the version (msgpack {rank: manifest bytes}), kept by every node
    "local-commit": ({"job": _job, "step": STEP},
                     {"history": HISTORY, "ranks": _list(RANK, 1 << 16), "bytes": SIZE}, 1),
    "skip": ({"job": _job, "step": STEP}, {"history": HISTORY, "ranks": _list(RANK, 1 << 16), "reason": REASON}, 0),
    # the encoder of a stripe asks a data holder for bytes of its chunk (they come back as data "chunk")
    "pull": ({"job": _job, "step": STEP, "stripe": NODE, "offset": SIZE, "length": SIZE}, {"history": HISTORY}, 0),
    "chunk": ({"job": _job, "step": STEP, "stripe": NODE},
              {"history": HISTORY, "offset": SIZE, "length": SIZE, "total": SIZE, "last": _bool}, 1),
    "parity": ({"job": _job, "step": STEP, "stripe": NODE},
               {"history": HISTORY, "offset": SIZE, "length": SIZE, "total": SIZE, "last": _bool}, 1),
    "ack": ({"job": _job, "step": STEP},
            {"history": HISTORY, "stripe": NODE, "kind": _enum("data", "parity", "persist")}, 0),
    "committed": ({"job": _job, "step": STEP}, {"history": HISTORY, "level": _enum("local", "group")}, 0),
    "abort": ({"job": _job, "step": STEP}, {"history": HISTORY, "reason": REASON}, 0),
    "finish": ({"job": _job}, {}, 0),
    # payload: what the node's persist worker wrote (msgpack, see client/export.py write_part)
    "persist-done": ({"job": _job, "step": STEP},
                     {"history": HISTORY, "files": _list(_str(4096), 1 << 16), "bytes": SIZE}, 1),
    # remote read and rebuild
    "fetch": ({"job": _job, "step": STEP},
              {"history": HISTORY, "rank": RANK, "stripe": NODE, "what": _enum("data", "parity", "manifest", "payload"),
               "offset": SIZE, "length": SIZE, "reply_via": _enum("control", "data"), "rid": _str(64)}, 0),
    # which versions this node holds at group level (a replacement asks before it rebuilds)
    "inventory": ({}, {}, 0),
    # what this node knows of the coordinator's decision on a version (reply {outcome})
    "outcome": ({"job": _job, "step": STEP}, {"history": HISTORY}, 0),
}
PEER_MESSAGE_TYPES: tuple[str, ...] = tuple(PEER_SCHEMAS)
REPLY_TYPES = (wire.REPLY_OK, wire.REPLY_ERROR)

# kinds of data-plane messages (header field "kind")
DATA_KINDS = frozenset({"chunk", "parity", "fetch-reply"})


# --- addresses ----------------------------------------------------------------------


def split_address(address: str) -> tuple[str, str, int]:
    """``tcp://host:port`` (or ``host:port``, ``[v6]:port``) -> (scheme, host, port).

    ``ipc://`` and ``inproc://`` addresses return (scheme, path, 0).  ``ValueError``
    for anything else.
    """
    if not isinstance(address, str) or not address:
        raise ValueError(f"invalid address {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "tcp", address
    if scheme in ("ipc", "inproc"):
        return scheme, rest, 0
    if scheme != "tcp":
        raise ValueError(f"address {address!r}: only tcp:// is supported between daemons")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"address {address!r} must be tcp://[v6-address]:port")
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"address {address!r} must be tcp://host:port (IPv6 in brackets)")
    if not host:
        raise ValueError(f"address {address!r} has no host")
    if port == "*":
        return scheme, host, 0
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"address {address!r} has an invalid port {port!r}")
    return scheme, host, int(port)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped) and ``localhost``; never a wildcard."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _join(scheme: str, host: str, port: int | str) -> str:
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def _node_key(key: bytes | str) -> bytes:
    """Normalise a CURVE public key to Z85 bytes (accepts 40-char Z85 or 32 raw bytes)."""
    if isinstance(key, str):
        key = key.encode("ascii")
    if isinstance(key, (bytes, bytearray)) and len(key) == 32:
        return z85.encode(bytes(key))
    if isinstance(key, (bytes, bytearray)) and len(key) == 40:
        try:
            if len(z85.decode(bytes(key))) == 32:
                return bytes(key)
        except Exception:
            pass
    raise ValueError("a CURVE key must be 40 Z85 characters or 32 raw bytes")


# --- security -----------------------------------------------------------------------


@dataclass
class PeerSecurity:
    """Who this node is and whom it accepts.

    ``mode``: ``curve`` (control over CURVE, data plain + tagged), ``encrypt-data``
    (data over CURVE too) or ``insecure`` (nothing encrypted, loopback only).
    Keys are Z85 bytes as in pyzmq certificates (32 raw bytes are accepted and
    converted).  ``peer_keys`` maps every node index of the group, this one
    included, to its public key; it is read live by the authenticator, so adding
    or replacing an entry takes effect on the next handshake.
    """

    mode: str
    node: int
    public_key: bytes | None = None
    secret_key: bytes | None = None
    peer_keys: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def from_files(cls, mode: str, node: int, secret_file: str | None = None,
                   public_dir: str | None = None) -> "PeerSecurity":
        """Load ``--curve-secret`` and ``--curve-public-dir``; both required unless insecure.

        Raises ``ValueError`` (bad mode, missing file argument, wrong key) and the
        ``OSError`` subclasses of :mod:`shardkeep.daemon.keys`.
        """
        from .keys import load_public_dir, load_secret

        if mode == "insecure":
            return cls(mode, node).validate()
        if not secret_file or not public_dir:
            raise ValueError(f"peer security mode {mode!r} needs --curve-secret FILE and --curve-public-dir DIR "
                             "(or --insecure with loopback addresses only)")
        public, secret = load_secret(secret_file)
        sec = cls(mode, node, public, secret, load_public_dir(public_dir))
        try:
            return sec.validate()
        except ValueError as exc:
            raise ValueError(f"{exc} (secret file {secret_file}, key directory {public_dir})") from None

    def validate(self) -> "PeerSecurity":
        """Check the mode and keys; ``ValueError`` naming the problem."""
        if self.mode not in MODES:
            raise ValueError(f"peer security mode must be one of {list(MODES)}, got {self.mode!r}")
        if isinstance(self.node, bool) or not isinstance(self.node, int) or not 0 <= self.node < MAX_NODES:
            raise ValueError(f"node index must be an integer in [0, {MAX_NODES}), got {self.node!r}")
        self.peer_keys = {int(i): _node_key(k) for i, k in self.peer_keys.items()}
        if self.mode == "insecure":
            return self
        if not self.public_key or not self.secret_key:
            raise ValueError(f"peer security mode {self.mode!r} needs this node's public and secret key")
        self.public_key = _node_key(self.public_key)
        self.secret_key = _node_key(self.secret_key)
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise ValueError("the public key does not belong to the secret key")
        mine = self.peer_keys.get(self.node)
        if mine is None:
            raise ValueError(f"the key directory has no node-{self.node}.key for this node (--node {self.node})")
        if mine != self.public_key:
            owner = self.node_of_key(self.public_key)
            raise ValueError(
                f"the secret key is not node {self.node}'s key"
                + (f" (it is node {owner}'s)" if owner is not None else " (it is in no node-<i>.key file)")
            )
        seen: dict[bytes, int] = {}
        for i, k in sorted(self.peer_keys.items()):
            if k in seen:
                raise ValueError(f"nodes {seen[k]} and {i} have the same public key")
            seen[k] = i
        return self

    @property
    def curve_control(self) -> bool:
        return self.mode != "insecure"

    @property
    def curve_data(self) -> bool:
        return self.mode == "encrypt-data"

    def node_of_key(self, key: bytes | str) -> int | None:
        """Node index of a public key (Z85 or raw), or None if it is not in the key directory."""
        try:
            key = _node_key(key)
        except ValueError:
            return None
        for i, k in self.peer_keys.items():
            if hmac.compare_digest(k, key):
                return i
        return None

    def public_key_of(self, node: int) -> bytes:
        """Node ``node``'s public key; ``PermissionDeniedError`` if the key directory lacks it."""
        try:
            return self.peer_keys[node]
        except KeyError:
            raise PermissionDeniedError(
                f"no public key for node {node} in the key directory (have nodes {sorted(self.peer_keys)})",
                node=node,
            ) from None

    def check_insecure_addresses(self, addresses: Iterable[str]) -> None:
        """With mode ``insecure``: ``ValueError`` unless every address is loopback.

        Accepts ``tcp://host:port``, ``host:port`` and ``ipc://`` (local) addresses.
        Does nothing in the CURVE modes.
        """
        if self.mode != "insecure":
            return
        bad = []
        for a in addresses:
            try:
                scheme, host, _ = split_address(a)
            except ValueError as exc:
                raise ValueError(f"--insecure: {exc}") from None
            if scheme == "tcp" and not is_loopback_host(host):
                bad.append(a)
        if bad:
            raise ValueError(
                f"--insecure sends everything in the clear and is allowed only when every address is "
                f"loopback (127.0.0.0/8, ::1, localhost); not loopback: {', '.join(bad)}. "
                "Use CURVE keys (shardkeep keygen, --curve-secret, --curve-public-dir) between machines."
            )


# --- context and authenticator -------------------------------------------------------


class _RateLimit:
    """At most one log line per key per ``every`` seconds, with a count of what was held back."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last: dict[Any, tuple[float, int]] = {}

    def __call__(self, key: Any, level: int, msg: str, *args: Any) -> None:
        now = time.monotonic()
        last, held = self._last.get(key, (-math.inf, 0))
        if now - last < self.every:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) > 4096:
            self._last.clear()
        self._last[key] = (now, 0)
        if held:
            msg += f" ({held} similar messages suppressed)"
        log.log(level, msg, *args, stacklevel=2)


class _KeyDirAuthenticator(AsyncioAuthenticator):
    """ZAP handler: admits CURVE clients whose key is in ``security.peer_keys``;
    the ZAP user id of an admitted connection is ``node-<i>``."""

    def __init__(self, ctx: zmq.asyncio.Context, security: PeerSecurity) -> None:
        super().__init__(ctx, log=logging.getLogger("shardkeep.peer.zap"))
        self.security = security
        self.refused = 0
        self._ratelimit = _RateLimit(10.0)
        self.configure_curve_callback(ZAP_DOMAIN, self)

    def callback(self, domain: str, z85_key: bytes) -> bool:  # credentials provider protocol
        if self.security.node_of_key(z85_key) is not None:
            return True
        self.refused += 1
        self._ratelimit(("refused", z85_key), logging.WARNING,
                        "refused a peer connection: its public key %s is not in the key directory",
                        z85_key.decode("ascii", "replace"))
        return False

    def curve_user_id(self, client_public_key: bytes) -> str:
        node = self.security.node_of_key(client_public_key)
        return "" if node is None else f"node-{node}"


_USER_ID_RE = re.compile(r"^node-(0|[1-9][0-9]{0,5})$")
_ROUTING_ID_RE = re.compile(rb"^node-(0|[1-9][0-9]{0,5})/[0-9a-f]{8,32}$")


def _routing_id(node: int) -> bytes:
    # Unique per connection: a replacement never collides with a half-open
    # connection of the node it replaces (a ROUTER refuses a duplicate id).
    return f"node-{node}/{secrets.token_hex(8)}".encode()


class PeerContext:
    """The ZeroMQ context of one daemon's peer sockets, with its ZAP authenticator.

    ZAP is per context, so every node (also several nodes in one test process)
    needs its own.  Use ``async with PeerContext(sec) as pctx:`` or ``await
    start()`` / ``await close()``.
    """

    def __init__(self, security: PeerSecurity) -> None:
        self.security = security.validate()
        self.ctx = zmq.asyncio.Context()
        self.auth: _KeyDirAuthenticator | None = None
        self._closed = False
        self._io_before: set[int] | None = _threads()  # its I/O threads start with the first socket

    def _io_started(self) -> None:
        """The context's I/O threads (TCP, CURVE of every peer transfer) exist now: they run below the event
        loop's thread, like the other bulk work, so that a trainer's request is answered first."""
        if self._io_before is not None:
            from .codec import BACKGROUND_NICE

            # every thread that appeared with the first socket is the context's (its I/O threads and reaper;
            # by id: a thread names itself "ZMQbg/..." only once it runs)
            for tid in _threads() - self._io_before:
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) +
                                                             BACKGROUND_NICE))
                except OSError:
                    pass
            self._io_before = None

    async def start(self) -> "PeerContext":
        if self.security.curve_control and self.auth is None:
            self.auth = _KeyDirAuthenticator(self.ctx, self.security)
            self.auth.start()
            self._io_started()
        return self

    @property
    def refused_connections(self) -> int:
        """Handshakes refused because the client key is not in the key directory."""
        return self.auth.refused if self.auth else 0

    def curve_server(self, sock: zmq.Socket) -> None:
        sec = self.security
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)   # no ZAP handler -> refuse, never admit all
        sock.curve_secretkey = sec.secret_key
        sock.curve_publickey = sec.public_key
        sock.curve_server = True

    def curve_client(self, sock: zmq.Socket, peer: int) -> None:
        sec = self.security
        sock.curve_secretkey = sec.secret_key
        sock.curve_publickey = sec.public_key
        sock.curve_serverkey = sec.public_key_of(peer)

    def socket(self, kind: int) -> zmq.asyncio.Socket:
        if self._closed:
            raise UnavailableError("the peer context is closed")
        s = self.ctx.socket(kind)
        self._io_started()
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, _RECONNECT_IVL_MS)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, _RECONNECT_IVL_MAX_MS)
        s.setsockopt(zmq.CONNECT_TIMEOUT, _CONNECT_TIMEOUT_MS)
        s.setsockopt(zmq.HEARTBEAT_IVL, _ZMQ_HEARTBEAT_IVL_MS)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMQ_HEARTBEAT_TIMEOUT_MS)
        return s

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.destroy(linger=0)

    async def __aenter__(self) -> "PeerContext":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _threads() -> set[int]:
    """Native ids of this process's threads (Linux; empty elsewhere)."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def _zmq_io_threads() -> set[int]:
    """Native ids of this process's ZeroMQ I/O threads (Linux; empty elsewhere)."""
    out = set()
    try:
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/comm") as fh:
                if fh.read().startswith("ZMQbg/IO"):
                    out.add(int(t))
    except OSError:
        pass
    return out


def _bind(sock: zmq.Socket, security: PeerSecurity, address: str, what: str) -> str:
    scheme, host, port = split_address(address)
    if scheme != "tcp":
        raise ValueError(f"{what} address {address!r} must be tcp://host:port")
    security.check_insecure_addresses([address])
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.bind(_join("tcp", host, port or "*"))
    except zmq.ZMQError as exc:
        raise UnavailableError(f"cannot bind the {what} endpoint at {address}: {exc}") from None
    return sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _check_connect(security: PeerSecurity, address: str, what: str) -> tuple[str, int]:
    scheme, host, port = split_address(address)
    if scheme != "tcp" or not 1 <= port <= 65535:
        raise ValueError(f"{what} address {address!r} must be tcp://host:port with a port in 1..65535")
    security.check_insecure_addresses([address])
    return host, port


def _connect(sock: zmq.Socket, host: str, port: int) -> None:
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    sock.connect(_join("tcp", host, port))


def _frame_len(f: Any) -> int:
    return len(f.buffer) if isinstance(f, zmq.Frame) else memoryview(f).nbytes


def _frame_bytes(f: Any) -> bytes:
    return f.bytes if isinstance(f, zmq.Frame) else bytes(f)


def _unpack(frame: Any, limit: int, what: str) -> dict[str, Any]:
    """A msgpack map from a frame of at most ``limit`` bytes; ``ProtocolError`` otherwise."""
    size = _frame_len(frame)
    if size > limit:
        raise ProtocolError(f"{what} of {size} bytes exceeds {limit}")
    raw = _frame_bytes(frame)
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=limit, max_str_len=limit,
                              max_array_len=limit, max_map_len=limit, max_ext_len=0)
    except Exception as exc:
        raise ProtocolError(f"{what} is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a msgpack map")
    return obj


# --- control messages ----------------------------------------------------------------


@dataclass(slots=True)
class PeerMessage:
    """A validated control message. ``src`` is the sender's node index from its
    authenticated key (insecure mode: its routing id); ``id`` 0 means one-way."""

    src: int
    type: str
    id: int
    fields: dict[str, Any]
    payload: list[Any] = field(default_factory=list)

    @property
    def expects_reply(self) -> bool:
        return self.id > 0


def check_peer_message(mtype: Any, header: dict[str, Any], payload: list) -> dict[str, Any]:
    """Validate one peer message's fields against :data:`PEER_SCHEMAS`; returns the
    fields (without v/type/id).  Every problem is a ``ProtocolError``."""
    if not isinstance(mtype, str) or mtype not in PEER_SCHEMAS:
        if mtype in REPLY_TYPES:
            raise ProtocolError(f"{mtype!r} is a reply, not a request")
        raise ProtocolError(f"unknown peer message type {mtype!r}")
    required, optional, max_payload = PEER_SCHEMAS[mtype]
    out: dict[str, Any] = {}
    for name, check in required.items():
        if name not in header:
            raise ProtocolError(f"{mtype}: missing field {name!r}")
        out[name] = check(name, header[name])
    for name, check in itertools.chain(optional.items(), COMMON_OPTIONAL.items()):
        if name not in out and name in header and header[name] is not None:
            out[name] = check(name, header[name])
    known = {*required, *optional, *COMMON_OPTIONAL, "v", "type", "id"}
    unknown = [repr(k) for k in header if k not in known]
    if unknown:
        raise ProtocolError(f"{mtype}: unknown fields {sorted(unknown)}")
    if len(payload) > max_payload:
        raise ProtocolError(f"{mtype}: {len(payload)} payload frames; at most {max_payload}")
    for p in payload:
        if _frame_len(p) > MAX_CONTROL_PAYLOAD_BYTES:
            raise ProtocolError(f"{mtype}: payload frame exceeds {MAX_CONTROL_PAYLOAD_BYTES} bytes")
    return out


def decode_peer_request(frames: list) -> tuple[str, int, dict[str, Any], list]:
    """(type, id, fields, payload frames) of a message received by a ControlServer."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_CONTROL_FRAMES:
        raise ProtocolError(f"{len(frames)} frames; at most {MAX_CONTROL_FRAMES}")
    header = _unpack(frames[0], MAX_PEER_HEADER_BYTES, "header frame")
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(f"peer protocol version {v!r} is not supported; this daemon speaks "
                            f"version {PROTOCOL_VERSION}", supported=[PROTOCOL_VERSION])
    mid = header.get("id")
    if type(mid) is not int or not 0 <= mid <= MAX_SEQ:
        raise ProtocolError("field 'id' must be a non-negative integer")
    mtype = header.get("type")
    fields = check_peer_message(mtype, header, frames[1:])
    return mtype, mid, fields, list(frames[1:])


def _peek_id(frames: list) -> int:
    try:
        mid = _unpack(frames[0], MAX_PEER_HEADER_BYTES, "header").get("id", 0)
        return mid if type(mid) is int and 0 <= mid <= MAX_SEQ else 0
    except Exception:
        return 0


Handler = Callable[[PeerMessage], Any]
_RESERVED = frozenset({"v", "type", "id"})


class ControlServer:
    """ROUTER at this node's control address, dispatching validated messages to ``handler``.

    ``handler(msg: PeerMessage)`` returns ``None``, a dict of reply fields, a
    ``(fields, payload_frames)`` tuple, or an awaitable of one of these; raising a
    ``ShardkeepError`` sends it as the error reply (anything else becomes a
    ``ShardkeepError`` "internal error" reply and a logged traceback).  Messages are
    dispatched in arrival order; an async handler runs as its own task, so its
    synchronous prefix runs in arrival order too (change state before the first
    ``await``).  One-way messages (id 0) get no reply.  At most ``max_inflight``
    handler tasks run at once; beyond that requests get ``UnavailableError``.
    """

    def __init__(self, pctx: PeerContext, bind: str, handler: Handler, *, max_inflight: int = 1024) -> None:
        self.pctx = pctx
        self.security = pctx.security
        self.bind_address = bind
        self.handler = handler
        self.max_inflight = max_inflight
        self.endpoint = ""
        self.port = 0
        self.instance = f"node-{self.security.node}"
        self.received = 0
        self.rejected = 0
        self._limiter = TokenBuckets(PEER_MAX_RATE)
        self.handler_errors = 0
        self.last_seen: dict[int, float] = {}   # node -> time.monotonic() of its last valid message
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._ratelimit = _RateLimit(1.0)

    async def start(self) -> str:
        """Bind and start serving; returns the bound endpoint (port 0 resolved).

        ``ValueError`` for a bad or (insecure mode) non-loopback address,
        ``UnavailableError`` if the address cannot be bound.
        """
        await self.pctx.start()
        s = self.pctx.socket(zmq.ROUTER)
        try:
            s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_PAYLOAD_BYTES)
            s.setsockopt(zmq.RCVHWM, 10000)
            s.setsockopt(zmq.SNDHWM, 10000)
            if self.security.curve_control:
                self.pctx.curve_server(s)
            self.endpoint = _bind(s, self.security, self.bind_address, "control")
        except BaseException:
            s.close(0)
            raise
        self.port = split_address(self.endpoint)[2]
        self._sock = s
        self._task = asyncio.create_task(self._serve(), name=f"sk-control-server-{self.security.node}")
        log.info("control endpoint of node %d at %s (%s)", self.security.node, self.endpoint, self.security.mode)
        return self.endpoint

    def _sender(self, rid: Any, body: list) -> int | None:
        if self.security.curve_control:
            try:
                uid = body[0].get("User-Id")
            except (zmq.ZMQError, AttributeError, IndexError):
                return None
            m = _USER_ID_RE.match(uid or "")
        else:
            m = _ROUTING_ID_RE.match(_frame_bytes(rid))
        return int(m.group(1)) if m else None

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, zmq.ENOTSOCK) or sock.closed:
                    return
                log.warning("control receive failed: %s", exc)
                continue
            try:
                self._dispatch(frames)
            except Exception:  # never let one message end the loop
                log.exception("control message dispatch failed")

    def _reply(self, rid: Any, frames: list) -> None:
        sock = self._sock
        if sock is None or sock.closed:
            return
        try:
            fut = sock.send_multipart([rid, *frames], copy=False)
        except zmq.ZMQError as exc:
            log.debug("reply not sent: %s", exc)
            return
        fut.add_done_callback(_log_send_failure)

    def _reject(self, rid: Any, mid: int, src: int | None, err: ShardkeepError) -> None:
        self.rejected += 1
        self._ratelimit(("reject", src, type(err)), logging.WARNING,
                        "rejected a control message from %s: %s",
                        f"node {src}" if src is not None else "an unidentified peer", err.message)
        self._reply(rid, wire.encode_error(mid, err, self.instance))

    def _dispatch(self, frames: list) -> None:
        if len(frames) < 2:
            return  # a ROUTER always prepends the routing id; nothing to answer
        rid, body = frames[0], frames[1:]
        src = self._sender(rid, body)
        if src is None:
            self._reject(rid, _peek_id(body), None, PermissionDeniedError(
                "the sender of this message is not an identified group member"))
            return
        if not self._limiter.allow(src):
            self._reject(rid, _peek_id(body), src, UnavailableError(
                f"rate limit: more than {PEER_MAX_RATE:g} control messages/s from node {src}"))
            return
        try:
            mtype, mid, fields, payload = decode_peer_request(body)
        except ProtocolError as err:
            self._reject(rid, _peek_id(body), src, err)
            return
        claimed = fields.get("node")
        if claimed is not None and claimed != src:
            self._reject(rid, mid, src, PermissionDeniedError(
                f"{mtype} claims to come from node {claimed}, but the connection authenticated as node {src}",
                claimed=claimed, authenticated=src))
            return
        self.received += 1
        self.last_seen[src] = time.monotonic()
        msg = PeerMessage(src, mtype, mid, fields, payload)
        if len(self._inflight) >= self.max_inflight:
            self._reject(rid, mid, src, UnavailableError(
                f"node {self.security.node} is busy ({len(self._inflight)} peer requests in flight)"))
            return
        try:
            result = self.handler(msg)
        except Exception as exc:
            self._finish(rid, msg, None, exc)
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._inflight.add(task)
            task.add_done_callback(lambda t: self._task_done(rid, msg, t))
        else:
            self._finish(rid, msg, result, None)

    def _task_done(self, rid: Any, msg: PeerMessage, task: asyncio.Future) -> None:
        self._inflight.discard(task)  # type: ignore[arg-type]
        if task.cancelled():
            self._finish(rid, msg, None, UnavailableError(f"{msg.type} handler was cancelled"))
            return
        exc = task.exception()
        self._finish(rid, msg, None if exc else task.result(), exc)

    def _finish(self, rid: Any, msg: PeerMessage, result: Any, exc: BaseException | None) -> None:
        if exc is not None:
            if isinstance(exc, ShardkeepError):
                err = exc
            else:
                self.handler_errors += 1
                log.error("handler for %s from node %d failed", msg.type, msg.src, exc_info=exc)
                err = ShardkeepError(f"internal error handling {msg.type} on node {self.security.node}: {exc!r}")
            if msg.id:
                self._reply(rid, wire.encode_error(msg.id, err, self.instance))
            elif isinstance(exc, ShardkeepError):
                log.warning("one-way %s from node %d failed: %s", msg.type, msg.src, err.message)
            return
        if not msg.id:
            return
        fields: dict[str, Any] = {}
        payload: list = []
        if isinstance(result, tuple) and len(result) == 2:
            fields, payload = result[0] or {}, list(result[1] or [])
        elif isinstance(result, dict):
            fields = result
        elif result is not None:
            log.error("handler for %s returned %r; replying without fields", msg.type, type(result))
        try:
            if not isinstance(fields, dict) or _RESERVED.intersection(fields):
                raise ValueError(f"reply fields must be a dict without {sorted(_RESERVED)}")
            frames = wire.encode(wire.REPLY_OK, msg.id, fields, payload)
        except Exception as e:
            log.error("reply to %s from node %d is not encodable: %r", msg.type, msg.src, e)
            frames = wire.encode_error(msg.id, ShardkeepError(f"reply to {msg.type} not encodable"), self.instance)
        self._reply(rid, frames)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for t in list(self._inflight):
            t.cancel()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def _log_send_failure(fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())


_EVENT_STATE = {
    zmq.EVENT_CONNECT_DELAYED: "connecting",
    zmq.EVENT_CONNECT_RETRIED: "connecting",
    zmq.EVENT_CONNECTED: "handshaking",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake-failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake-failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CLOSED: "closed",
}


class _Monitored:
    """Connection state of one connecting socket, from its ZeroMQ monitor."""

    state: str = "new"
    state_since: float = 0.0
    last_failure: str = ""

    def _start_monitor(self, sock: zmq.asyncio.Socket, name: str) -> None:
        self.state, self.state_since = "connecting", time.monotonic()
        self._mon = sock.get_monitor_socket()
        self._mon_task = asyncio.create_task(self._watch(), name=name)

    async def _watch(self) -> None:
        while True:
            try:
                ev = parse_monitor_message(await self._mon.recv_multipart())
            except asyncio.CancelledError:
                raise
            except Exception:
                return
            state = _EVENT_STATE.get(ev["event"])
            if state is None:
                continue
            if state in ("refused", "handshake-failed"):
                self.last_failure = state
            elif state == "connected":
                self.last_failure = ""
            if state == "disconnected" and self.state in ("refused", "handshake-failed"):
                continue  # keep the reason visible until the next attempt
            self.state, self.state_since = state, time.monotonic()

    async def _stop_monitor(self, sock: zmq.asyncio.Socket | None) -> None:
        task = getattr(self, "_mon_task", None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._mon_task = None
        if sock is not None and not sock.closed:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        mon = getattr(self, "_mon", None)
        if mon is not None:
            mon.close(0)
            self._mon = None
        self.state, self.state_since = "closed", time.monotonic()

    def _why(self) -> str:
        if self.state == "refused" or self.last_failure == "refused":
            return "; the peer refused this node's key (is it in the peer's key directory?)"
        if self.last_failure == "handshake-failed":
            return "; the CURVE handshake failed (does the peer hold the key in this node's key directory?)"
        if self.state != "connected":
            return f"; connection state: {self.state}"
        return ""


class ControlClient(_Monitored):
    """DEALER to one peer's control endpoint (CURVE client with the peer's public key).

    Create it inside the running loop and call :meth:`connect`.  ``request`` and
    ``send`` may be called concurrently; replies are matched by id and late
    replies are dropped.  ``state`` is the connection state from the socket
    monitor: connecting, handshaking, connected, refused, handshake-failed,
    disconnected, closed.  A replacement at a new address needs a new client
    (close this one).
    """

    def __init__(self, pctx: PeerContext, peer: int, address: str, *, timeout: float = 10.0,
                 sndhwm: int = 1000) -> None:
        self.pctx = pctx
        self.security = pctx.security
        self.peer = peer
        self.address = address
        self.timeout = timeout
        self.sndhwm = sndhwm
        self.late_replies = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task | None = None

    def connect(self) -> "ControlClient":
        """Create the socket and start connecting (returns at once; ZeroMQ retries).

        ``ValueError`` for a bad / non-loopback-in-insecure-mode address,
        ``PermissionDeniedError`` if the key directory has no key for the peer.
        """
        if self._sock is not None:
            return self
        host, port = _check_connect(self.security, self.address, "control")
        if self.security.curve_control:
            self.security.public_key_of(self.peer)
        s = self.pctx.socket(zmq.DEALER)
        try:
            s.setsockopt(zmq.ROUTING_ID, _routing_id(self.security.node))
            s.setsockopt(zmq.IMMEDIATE, 1)        # queue nothing for a peer that is not connected
            s.setsockopt(zmq.SNDHWM, self.sndhwm)
            s.setsockopt(zmq.RCVHWM, 10000)
            s.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_PAYLOAD_BYTES)
            if self.security.curve_control:
                self.pctx.curve_client(s, self.peer)
            self._start_monitor(s, f"sk-control-monitor-{self.peer}")
            _connect(s, host, port)
        except BaseException:
            s.close(0)
            raise
        self._sock = s
        self._reader = asyncio.create_task(self._read(), name=f"sk-control-client-{self.peer}")
        return self

    def _where(self) -> str:
        return f"node {self.peer} at {self.address}"

    async def _read(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, zmq.ENOTSOCK) or sock.closed:
                    return
                continue
            try:
                self._on_reply(frames)
            except Exception:
                log.exception("reply from %s could not be handled", self._where())

    def _on_reply(self, frames: list) -> None:
        try:
            if not frames or len(frames) > MAX_CONTROL_FRAMES:
                raise ProtocolError(f"reply of {len(frames)} frames")
            header = _unpack(frames[0], MAX_PEER_HEADER_BYTES, "reply header")
            mid = header.get("id")
            if type(header.get("v")) is not int or header.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(f"reply with peer protocol version {header.get('v')!r}; this daemon speaks "
                                    f"version {PROTOCOL_VERSION}")
            if type(mid) is not int or header.get("type") not in REPLY_TYPES:
                raise ProtocolError(f"unexpected reply type {header.get('type')!r}")
        except ProtocolError as exc:
            log.warning("dropped a malformed reply from %s: %s", self._where(), exc.message)
            return
        fut = self._pending.pop(mid, None)
        if header["type"] == wire.REPLY_ERROR:
            err = from_wire(header.get("code"), header.get("message"), header.get("details"))
            err.peer = self.peer  # type: ignore[attr-defined]
            if fut is None:
                self.late_replies += 1
                log.warning("%s answered %s: %s", self._where(),
                            "a one-way message with an error" if mid == 0 else f"late request {mid} with an error",
                            err.message)
            elif not fut.done():
                fut.set_exception(err)
            return
        if fut is None or fut.done():
            self.late_replies += 1
            log.debug("dropped a late reply %d from %s", mid, self._where())
            return
        fields = {k: v for k, v in header.items() if k not in ("v", "type", "id")}
        fut.set_result(wire.Message(wire.REPLY_OK, mid, fields, list(frames[1:])))

    async def _send(self, mtype: str, mid: int, fields: dict | None, payload: list | None,
                    timeout: float, deadline: float) -> None:
        if self._sock is None:
            raise UnavailableError(f"{mtype} to {self._where()}: the client is not connected (call connect())")
        if fields and _RESERVED.intersection(fields):
            raise ProtocolError(f"{mtype}: fields {sorted(_RESERVED.intersection(fields))} are reserved")
        header = {"v": PROTOCOL_VERSION, "type": mtype, "id": mid, **(fields or {})}
        check_peer_message(mtype, header, payload or [])   # our own bugs fail here, not on the peer
        frames = wire.encode(mtype, mid, fields, payload)
        if len(frames[0]) > MAX_PEER_HEADER_BYTES:
            raise ProtocolError(f"{mtype}: header of {len(frames[0])} bytes exceeds {MAX_PEER_HEADER_BYTES}")
        try:
            await asyncio.wait_for(self._sock.send_multipart(frames, copy=False),
                                   max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ShardkeepTimeoutError(
                f"{mtype} to {self._where()} could not be sent within {timeout:.1f}s "
                f"(not connected{self._why()})",
                what=mtype, where=self.address, peer=self.peer, after=timeout,
            ) from None
        except zmq.ZMQError as exc:
            raise UnavailableError(f"{mtype} to {self._where()} failed: {exc}", peer=self.peer) from None
        except asyncio.CancelledError:
            # pyzmq cancels a pending send when its socket is closed; only our own task's
            # cancellation may propagate as such, or a caller's loop would end with it
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise UnavailableError(f"{mtype} to {self._where()}: the client was closed", peer=self.peer) from None

    async def request(self, mtype: str, fields: dict[str, Any] | None = None, payload: list | None = None,
                      timeout: float | None = None) -> wire.Message:
        """Send a request and wait for its reply (``wire.Message``, type ``ok``).

        Raises ``ShardkeepTimeoutError`` (not sent or no reply by the deadline: the
        message names the peer, the type and the time), the peer's error reply as
        its ``ShardkeepError`` subclass (with ``.peer`` set), ``ProtocolError`` for
        fields that fail :data:`PEER_SCHEMAS`, ``UnavailableError`` if closed.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        mid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[mid] = fut
        try:
            await self._send(mtype, mid, fields, payload, timeout, deadline)
            try:
                return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise ShardkeepTimeoutError(
                    f"{mtype} request to {self._where()} got no reply after {timeout:.1f}s{self._why()}",
                    what=mtype, where=self.address, peer=self.peer, after=timeout,
                ) from None
        finally:
            self._pending.pop(mid, None)

    async def send(self, mtype: str, fields: dict[str, Any] | None = None, payload: list | None = None,
                   timeout: float | None = None) -> None:
        """One-way message (id 0): returns once ZeroMQ has queued it to a connected peer.

        ``ShardkeepTimeoutError`` if it cannot be queued by the deadline (peer not
        connected, or HWM full); ``ProtocolError`` for invalid fields.
        """
        timeout = self.timeout if timeout is None else timeout
        await self._send(mtype, 0, fields, payload, timeout, time.monotonic() + timeout)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        for mid, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(UnavailableError(f"the control client to {self._where()} was closed"))
        self._pending.clear()
        await self._stop_monitor(self._sock)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


# --- data plane ----------------------------------------------------------------------


def new_session_key() -> bytes:
    """A fresh 32-byte data-plane key (send it to the peer only over CURVE)."""
    return secrets.token_bytes(KEY_BYTES)


def data_tag(key: bytes, header: bytes, payload: Any) -> bytes:
    """Keyed BLAKE3 (32 bytes) of header bytes followed by payload bytes."""
    h = blake3.blake3(key=key)
    h.update(header)
    h.update(payload)
    return h.digest()


RECV_KEYS = 4  # receive keys remembered per sender


def key_id(key: bytes) -> int:
    """The id of a data key, the same on both ends: the first 8 bytes of its BLAKE3, as an int."""
    return int.from_bytes(blake3.blake3(key).digest(length=8), "little") >> 1


def _data_header(src: int, dst: int, seq: int, kind: str, meta: dict[str, Any], nbytes: int,
                 kid: int = 0) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "src": src, "dst": dst, "seq": seq, "kid": kid, "kind": kind,
                          "n": nbytes, "meta": meta}, use_bin_type=True)


def seal(key: bytes, src: int, dst: int, seq: int, kind: str, meta: dict[str, Any] | None,
         payload: Any) -> list:
    """The three frames ``[header, payload, tag]`` of one data message (payload passed through)."""
    mv = memoryview(payload)
    header = _data_header(src, dst, seq, kind, meta or {}, mv.nbytes, key_id(key))
    return [header, payload, data_tag(key, header, mv)]


async def wait_released(tracker: zmq.MessageTracker | None, timeout: float, what: str = "data message") -> None:
    """Wait until ZeroMQ no longer references a zero-copy payload (safe to overwrite
    or unmap); ``ShardkeepTimeoutError`` after ``timeout`` seconds."""
    if tracker is None:
        return
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not tracker.done:
        if time.monotonic() >= deadline:
            raise ShardkeepTimeoutError(f"{what}: ZeroMQ still held the payload after {timeout:.1f}s",
                                        what=what, after=timeout)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.02)


@dataclass(slots=True)
class DataMessage:
    """A verified data-plane message. ``payload`` is a read-only memoryview over the
    received ZeroMQ frame (no copy); ``meta`` is the sender's metadata dict."""

    src: int
    seq: int
    kind: str
    meta: dict[str, Any]
    payload: memoryview


class _Drop(Exception):
    def __init__(self, reason: str, detail: str = "", src: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.src = src  # the sender the header claims (for "no-key": whom to rekey with)


class _DataPeer(_Monitored):
    def __init__(self, peer: int, address: str, sock: zmq.asyncio.Socket) -> None:
        self.peer = peer
        self.address = address
        self.sock = sock
        self.lock = asyncio.Lock()


class DataPlane:
    """Bulk transfer between daemons, authenticated per message with keyed BLAKE3.

    A ROUTER bound at ``host:port`` (port 0: any free port, see ``port`` /
    ``endpoint``) receives; one DEALER per peer (:meth:`connect`) sends.  Plain TCP
    in modes ``curve`` and ``insecure``, CURVE (same key directory) in
    ``encrypt-data``.  Keys: :meth:`set_recv_key` for messages src -> this node,
    :meth:`set_send_key` for this node -> dst (or :meth:`install_key`).  Installing
    a key restarts that direction's sequence numbers.

    Verified messages go to ``on_message(msg)`` if given (awaited in order when
    it returns an awaitable), else into a bounded queue read with :meth:`recv` or
    ``async for``.  A slow consumer stops the receive loop, ZeroMQ's RCVHWM
    fills, and senders see back-pressure.  Dropped messages count in
    ``forged_dropped`` (by reason in ``drop_reasons``) and are logged (rate-limited).
    """

    def __init__(self, pctx: PeerContext, host: str, port: int = 0, *,
                 on_message: Callable[[DataMessage], Any] | None = None, queue_size: int = 64,
                 sndhwm: int = 8, rcvhwm: int = 8, timeout: float = 30.0,
                 max_payload: int = MAX_DATA_PAYLOAD_BYTES) -> None:
        self.pctx = pctx
        self.security = pctx.security
        self.node = self.security.node
        self.host = host
        self.bind_port = port
        self.on_message = on_message
        # called with the claimed sender of a message dropped for an unknown key: the two nodes' keys
        # went out of step (HELLOs queued during a partition arrive in a burst at the heal), rekey
        self.on_unkeyed: Callable[[int], None] | None = None
        self.sndhwm = sndhwm
        self.rcvhwm = rcvhwm
        self.timeout = timeout
        self.max_payload = max_payload
        self.endpoint = ""
        self.port = 0
        self.sent = 0
        self.sent_bytes = 0
        self.received = 0
        self.received_bytes = 0
        self.forged_dropped = 0
        self.drop_reasons: collections.Counter[str] = collections.Counter()
        self._queue: asyncio.Queue[DataMessage] = asyncio.Queue(maxsize=queue_size)
        self._send_keys: dict[int, bytes] = {}
        self._send_kid: dict[int, int] = {}
        self._send_seq: dict[int, int] = {}
        # the last RECV_KEYS keys this node chose for each sender, by key id: HELLOs that cross (each
        # side greets the other at once) may leave the sender on either of the two newest keys
        self._recv_keys: dict[int, collections.OrderedDict[int, bytes]] = {}
        self._last_seq: dict[tuple[int, int], int] = {}
        self._peers: dict[int, _DataPeer] = {}
        self._closing: set[asyncio.Future] = set()
        self._sock: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        from .codec import lower_thread_priority  # (codec imports no pyeclib in this process)

        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sk-tag",
                                                           initializer=lower_thread_priority)
        self._ratelimit = _RateLimit(1.0)

    # --- setup ---

    async def start(self) -> str:
        """Bind the receiving ROUTER and start the receive loop; returns the endpoint."""
        await self.pctx.start()
        s = self.pctx.socket(zmq.ROUTER)
        try:
            s.setsockopt(zmq.MAXMSGSIZE, max(self.max_payload, MAX_DATA_HEADER_BYTES))
            s.setsockopt(zmq.RCVHWM, self.rcvhwm)
            if self.security.curve_data:
                self.pctx.curve_server(s)
            self.endpoint = _bind(s, self.security, _join("tcp", self.host, self.bind_port), "data")
        except BaseException:
            s.close(0)
            raise
        self.port = split_address(self.endpoint)[2]
        self._sock = s
        self._task = asyncio.create_task(self._serve(), name=f"sk-data-{self.node}")
        log.info("data endpoint of node %d at %s (%s)", self.node, self.endpoint,
                 "CURVE" if self.security.curve_data else "plain TCP, BLAKE3-tagged")
        return self.endpoint

    def connect(self, peer: int, address: str) -> None:
        """(Re)connect the sending socket to ``peer``'s data endpoint (from its HELLO).

        A new address replaces the old connection; queued messages to the old one
        are dropped.  ``ValueError`` for a bad address (or non-loopback when
        insecure), ``PermissionDeniedError`` if ``encrypt-data`` and no key for peer.
        """
        if peer == self.node:
            raise ValueError("a node does not send data-plane messages to itself")
        old = self._peers.get(peer)
        if old is not None and old.address == address:
            return
        host, port = _check_connect(self.security, address, "data")
        if self.security.curve_data:
            self.security.public_key_of(peer)
        s = self.pctx.socket(zmq.DEALER)
        try:
            s.setsockopt(zmq.ROUTING_ID, _routing_id(self.node))
            s.setsockopt(zmq.IMMEDIATE, 1)
            s.setsockopt(zmq.SNDHWM, self.sndhwm)
            if self.security.curve_data:
                self.pctx.curve_client(s, peer)
            p = _DataPeer(peer, address, s)
            p._start_monitor(s, f"sk-data-monitor-{peer}")
            _connect(s, host, port)
        except BaseException:
            s.close(0)
            raise
        self._peers[peer] = p
        if old is not None:
            t = asyncio.ensure_future(self._close_peer(old))
            self._closing.add(t)
            t.add_done_callback(self._closing.discard)

    async def _close_peer(self, p: _DataPeer) -> None:
        await p._stop_monitor(p.sock)
        p.sock.close(0)

    async def disconnect(self, peer: int) -> None:
        p = self._peers.pop(peer, None)
        if p is not None:
            await self._close_peer(p)

    def peer_state(self, peer: int) -> str:
        """Connection state of the sending socket to ``peer`` ("none" if not connected)."""
        p = self._peers.get(peer)
        return p.state if p else "none"

    # --- keys ---

    def set_send_key(self, dst: int, key: bytes) -> None:
        """Key for messages this node -> ``dst``; restarts the sequence at 1."""
        self._send_keys[dst] = _check_key(key)
        self._send_kid[dst] = key_id(key)
        self._send_seq[dst] = 0

    def set_recv_key(self, src: int, key: bytes) -> None:
        """Key for messages ``src`` -> this node; resets its replay window."""
        keys = self._recv_keys.setdefault(src, collections.OrderedDict())
        kid = key_id(_check_key(key))
        keys[kid] = key
        keys.move_to_end(kid)
        self._last_seq[(src, kid)] = 0
        while len(keys) > RECV_KEYS:
            old, _ = keys.popitem(last=False)
            self._last_seq.pop((src, old), None)

    def install_key(self, src: int, dst: int, key: bytes) -> None:
        """Install the (src, dst) key on whichever side this node is."""
        if src == self.node and dst != self.node:
            self.set_send_key(dst, key)
        elif dst == self.node and src != self.node:
            self.set_recv_key(src, key)
        else:
            raise ValueError(f"node {self.node} is neither end of the pair ({src} -> {dst})")

    def forget_peer_keys(self, peer: int) -> None:
        """Drop both keys for ``peer`` (it left or was replaced): its messages are dropped until rekeyed."""
        self._send_keys.pop(peer, None)
        for kid in self._recv_keys.pop(peer, {}):
            self._last_seq.pop((peer, kid), None)

    # --- send ---

    async def send(self, dst: int, kind: str, meta: dict[str, Any] | None, payload: Any, *,
                   timeout: float | None = None, track: bool = False) -> zmq.MessageTracker | None:
        """Send one message; returns when ZeroMQ has queued it (to a connected peer).

        ``payload`` is any contiguous buffer (a memoryview over shm is sent without a
        copy); it must not change until the message is sent: pass ``track=True`` and
        :func:`wait_released` on the returned tracker before reusing the memory.
        Back-pressure: at most ``sndhwm`` messages queue per peer; beyond that (or
        while the peer is not connected) this waits, up to ``timeout``.

        Raises ``ShardkeepTimeoutError`` (names peer, kind, time), ``UnavailableError``
        (no connection or key for ``dst``: call :meth:`connect` and install a key),
        ``ValueError`` for a bad kind, meta or payload size.
        """
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if kind not in DATA_KINDS:
            raise ValueError(f"data kind must be one of {sorted(DATA_KINDS)}, got {kind!r}")
        mv = memoryview(payload)
        if not mv.c_contiguous:
            raise ValueError("data payload must be a C-contiguous buffer")
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        if mv.nbytes > self.max_payload:
            raise ValueError(f"data payload of {mv.nbytes} bytes exceeds {self.max_payload}: send it in pieces")
        p = self._peers.get(dst)
        if p is None:
            raise UnavailableError(f"no data connection to node {dst} (connect() it with the address from its HELLO)",
                                   peer=dst)
        where = f"data {kind} to node {dst} at {p.address}"
        async with p.lock:   # seq order == queue order on the socket
            key = self._send_keys.get(dst)
            if key is None:
                raise UnavailableError(f"{where}: no data key installed for this pair (HELLO installs one)",
                                       peer=dst)
            seq = self._send_seq[dst] + 1
            self._send_seq[dst] = seq
            header = _data_header(self.node, dst, seq, kind, meta or {}, mv.nbytes, self._send_kid[dst])
            if len(header) > MAX_DATA_HEADER_BYTES:
                raise ValueError(f"{where}: meta too large ({len(header)} byte header, at most {MAX_DATA_HEADER_BYTES})")
            if mv.nbytes >= HASH_IN_THREAD_BYTES:
                tag = await asyncio.get_running_loop().run_in_executor(self._pool, data_tag, key, header, mv)
            else:
                tag = data_tag(key, header, mv)
            try:
                fut = p.sock.send_multipart([header, mv, tag], copy=False, track=track)
            except zmq.ZMQError as exc:
                raise UnavailableError(f"{where} failed: {exc}", peer=dst) from None
        try:
            result = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ShardkeepTimeoutError(
                f"{where} was not accepted within {timeout:.1f}s ({self.sndhwm} messages queued, "
                f"peer not reading or not connected{p._why()})",
                what=f"data {kind}", where=p.address, peer=dst, after=timeout,
            ) from None
        except zmq.ZMQError as exc:
            raise UnavailableError(f"{where} failed: {exc}", peer=dst) from None
        self.sent += 1
        self.sent_bytes += mv.nbytes
        return result if track else None

    # --- receive ---

    async def recv(self, timeout: float | None = None) -> DataMessage:
        """Next verified message (only without ``on_message``); ``ShardkeepTimeoutError``."""
        timeout = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            raise ShardkeepTimeoutError(
                f"no data-plane message arrived at node {self.node} within {timeout:.1f}s",
                what="data receive", where=self.endpoint, after=timeout,
            ) from None

    def __aiter__(self) -> AsyncIterator[DataMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[DataMessage]:
        while True:
            yield await self._queue.get()

    async def _serve(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ETERM, zmq.ENOTSOCK) or sock.closed:
                    return
                log.warning("data receive failed: %s", exc)
                continue
            try:
                msg = await self._verify(frames)
            except asyncio.CancelledError:
                raise
            except _Drop as d:
                self._drop(d.reason, d.detail)
                if d.reason == "no-key" and d.src is not None and self.on_unkeyed is not None:
                    self.on_unkeyed(d.src)
                continue
            except Exception as exc:  # never let one message end the loop
                self._drop("error", repr(exc))
                continue
            self.received += 1
            self.received_bytes += msg.payload.nbytes
            try:
                if self.on_message is not None:
                    r = self.on_message(msg)
                    if inspect.isawaitable(r):
                        await r
                else:
                    await self._queue.put(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("data-plane handler failed for %s from node %d", msg.kind, msg.src)

    def _drop(self, reason: str, detail: str) -> None:
        self.forged_dropped += 1
        self.drop_reasons[reason] += 1
        self._ratelimit(("drop", reason), logging.WARNING,
                        "node %d dropped a data-plane message (%s%s); %d dropped so far",
                        self.node, reason, f": {detail}" if detail else "", self.forged_dropped)

    async def _verify(self, frames: list) -> DataMessage:
        if len(frames) != 4:
            raise _Drop("malformed", f"{len(frames) - 1} frames, expected 3")
        _, hframe, pframe, tframe = frames
        if _frame_len(tframe) != TAG_BYTES:
            raise _Drop("malformed", "tag is not 32 bytes")
        try:
            h = _unpack(hframe, MAX_DATA_HEADER_BYTES, "data header")
        except ProtocolError as exc:
            raise _Drop("malformed", exc.message) from None
        src, dst, seq, kind, meta, n, kid = (h.get(k) for k in ("src", "dst", "seq", "kind", "meta", "n", "kid"))
        hbytes = _frame_bytes(hframe)
        payload = pframe.buffer if isinstance(pframe, zmq.Frame) else memoryview(pframe)
        if (type(h.get("v")) is not int or h["v"] != PROTOCOL_VERSION or type(src) is not int or type(dst) is not int
                or type(seq) is not int or not 1 <= seq <= MAX_SEQ or not isinstance(kind, str)
                or not isinstance(meta, dict) or type(n) is not int or type(kid) is not int or len(h) != 8):
            raise _Drop("malformed", "bad header fields")
        if n != payload.nbytes:
            raise _Drop("malformed", f"payload is {payload.nbytes} bytes, header says {n}")
        if kind not in DATA_KINDS:
            raise _Drop("malformed", f"unknown kind {kind[:32]!r}")
        if dst != self.node:
            raise _Drop("wrong-dst", f"addressed to node {dst}")
        key = self._recv_keys.get(src, {}).get(kid)
        if key is None:
            raise _Drop("no-key", f"no key {kid:#x} for messages from node {src}", src)
        if payload.nbytes >= HASH_IN_THREAD_BYTES:
            tag = await asyncio.get_running_loop().run_in_executor(self._pool, data_tag, key, hbytes, payload)
        else:
            tag = data_tag(key, hbytes, payload)
        if not hmac.compare_digest(tag, _frame_bytes(tframe)):
            raise _Drop("bad-tag", f"claims node {src}, seq {seq}")
        if self._recv_keys.get(src, {}).get(kid) is not key:
            raise _Drop("rekeyed", f"key for node {src} changed while verifying")
        if self.security.curve_data:
            try:
                uid = hframe.get("User-Id")
            except (zmq.ZMQError, AttributeError):
                uid = ""
            if uid != f"node-{src}":
                raise _Drop("src-mismatch", f"header says node {src}, CURVE key is {uid or 'unknown'}")
        if seq <= self._last_seq.get((src, kid), 0):
            raise _Drop("replay", f"seq {seq} from node {src} not above {self._last_seq.get((src, kid), 0)}")
        self._last_seq[(src, kid)] = seq
        return DataMessage(src, seq, kind, meta, payload)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for peer in list(self._peers):
            await self.disconnect(peer)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._pool.shutdown(wait=False)


def _check_key(key: Any) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"a data-plane key must be {KEY_BYTES} bytes (use new_session_key())")
    return bytes(key)
