"""Wire protocol v1: framing and validation of every message (spec: docs/PROTOCOL.md).

A message is a multipart ZeroMQ message: one msgpack header frame
``{"v": 1, "type": T, "id": N, ...fields}`` followed by zero or more raw payload
frames.  Replies reuse the request's ``id`` and are either
``{"type": "ok", ...}`` or ``{"type": "error", "code", "message", "details"}``.
Nothing else in shardkeep builds or parses frames by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from .errors import ProtocolError, ShardkeepError
from .fields import boolean, int_range, job_id, str_max

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 1 << 20          # a header frame
MAX_PAYLOAD_BYTES = 512 << 20       # one payload frame (manifests)
MAX_FRAMES = 4                      # header + payload frames
MAX_STEP = (1 << 63) - 1
MAX_RANK = 1 << 20
MAX_READ = 16 << 20                 # bytes of one ``read`` reply


_int, _str, _bool, _job = int_range, str_max, boolean, job_id


STEP = _int(0, MAX_STEP)
EPOCH = _int(0, MAX_STEP)  # a launch of a job, agreed by its ranks at restore()
RANK = _int(0, MAX_RANK)
SIZE = _int(0, 1 << 50)
TOKEN = _str(64)
JOB_TOKEN = _str(256)  # multi-user mode: the job's secret (SHARDKEEP_JOB_TOKEN)

# type -> (required fields, optional fields, payload frames allowed)
SCHEMAS: dict[str, tuple[dict, dict, int]] = {
    "register": (
        {"job": _job, "rank": RANK, "world_size": _int(1, MAX_RANK + 1),
         "local_world_size": _int(1, 4096), "data_bytes": SIZE, "manifest_bytes": _int(0, MAX_PAYLOAD_BYTES)},
        {"slots": _int(2, 8), "pid": _int(0, 1 << 32), "token": JOB_TOKEN},
        0,
    ),
    "begin": ({"job": _job, "rank": RANK, "step": STEP, "session": TOKEN}, {"epoch": EPOCH}, 0),
    "commit": ({"job": _job, "rank": RANK, "step": STEP, "session": TOKEN, "slot": _int(0, 1 << 32)}, {}, 1),
    "abort": ({"job": _job, "rank": RANK, "step": STEP, "session": TOKEN, "slot": _int(0, 1 << 32)},
              {"reason": _str(4096)}, 0),
    "versions": ({"job": _job}, {"rank": RANK, "token": JOB_TOKEN}, 0),
    "open": ({"job": _job, "rank": RANK, "step": STEP}, {"token": JOB_TOKEN}, 0),
    "release": ({"job": _job, "rank": RANK, "pin": TOKEN}, {"bad": _bool, "reason": _str(4096), "token": JOB_TOKEN},
                0),
    "resume": ({"job": _job, "rank": RANK, "step": STEP}, {"token": JOB_TOKEN}, 0),
    "finish": ({"job": _job}, {"token": JOB_TOKEN}, 0),
    "status": ({}, {"job": _job}, 0),
    "wait": ({"job": _job, "step": STEP}, {"timeout": _int(1, 3_600_000)}, 0),
    "recover": ({}, {}, 0),
    "ping": ({}, {}, 0),
    # remote reads (the DCP StorageReader): where a version's ranks are, and bytes of another node's payload
    "locate": ({"job": _job}, {"step": STEP, "token": JOB_TOKEN}, 0),
    "read": ({"job": _job, "step": STEP, "node": _int(0, 4095), "offset": SIZE, "length": _int(1, MAX_READ)},
             {"epoch": EPOCH, "token": JOB_TOKEN}, 0),
    "read-done": ({"job": _job, "read": _str(64)}, {"token": JOB_TOKEN}, 0),
}

REPLY_OK = "ok"
REPLY_ERROR = "error"


@dataclass(slots=True)
class Message:
    type: str
    id: int
    fields: dict[str, Any]
    payload: list[Any] = field(default_factory=list)


def encode(mtype: str, mid: int, fields: dict[str, Any] | None = None, payload: list | None = None) -> list:
    """Frames for one message; payload frames are passed through untouched (zero-copy)."""
    header = {"v": PROTOCOL_VERSION, "type": mtype, "id": mid}
    if fields:
        header.update(fields)
    return [msgpack.packb(header, use_bin_type=True), *(payload or [])]


def encode_error(mid: int, err: ShardkeepError, instance: str = "") -> list:
    return encode(REPLY_ERROR, mid, {**err.to_wire(), "instance": instance})


def _unpack_header(frame: Any) -> dict[str, Any]:
    raw = frame.bytes if hasattr(frame, "bytes") else frame
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    return header


def peek_id(frames: list) -> int:
    """Best-effort request id of a message that failed validation (0 if unknown)."""
    try:
        mid = _unpack_header(frames[0]).get("id", 0)
        return mid if isinstance(mid, int) and not isinstance(mid, bool) and 0 <= mid < 1 << 63 else 0
    except Exception:
        return 0


def decode_request(frames: list) -> Message:
    """Validate a request from outside; every problem is a ``ProtocolError``."""
    if not frames:
        raise ProtocolError("empty message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames; at most {MAX_FRAMES}")
    header = _unpack_header(frames[0])
    v = header.get("v")
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {v!r} is not supported; this daemon speaks version {PROTOCOL_VERSION}",
            supported=[PROTOCOL_VERSION],
        )
    mid = header.get("id")
    if not isinstance(mid, int) or isinstance(mid, bool) or not 0 <= mid < 1 << 63:
        raise ProtocolError("field 'id' must be a non-negative integer")
    mtype = header.get("type")
    if not isinstance(mtype, str) or mtype not in SCHEMAS:
        raise ProtocolError(f"unknown message type {mtype!r}")
    required, optional, max_payload = SCHEMAS[mtype]
    out: dict[str, Any] = {}
    for name, check in required.items():
        if name not in header:
            raise ProtocolError(f"{mtype}: missing field {name!r}")
        out[name] = check(name, header[name])
    for name, check in optional.items():
        if name in header and header[name] is not None:
            out[name] = check(name, header[name])
    unknown = set(map(repr, header)) - {repr(k) for k in (*required, *optional, "v", "type", "id")}
    if unknown:
        raise ProtocolError(f"{mtype}: unknown fields {sorted(unknown)}")
    payload = frames[1:]
    if len(payload) > max_payload:
        raise ProtocolError(f"{mtype}: {len(payload)} payload frames; at most {max_payload}")
    for p in payload:
        if len(p) > MAX_PAYLOAD_BYTES:
            raise ProtocolError(f"{mtype}: payload frame exceeds {MAX_PAYLOAD_BYTES} bytes")
    return Message(mtype, mid, out, list(payload))


def decode_reply(frames: list) -> Message:
    """Parse a daemon reply; error replies raise the matching ``ShardkeepError``."""
    from .errors import from_wire

    if not frames:
        raise ProtocolError("empty reply")
    header = _unpack_header(frames[0])
    if type(header.get("v")) is not int or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"daemon replied with protocol version {header.get('v')!r}; this client speaks "
                            f"version {PROTOCOL_VERSION} (upgrade the older of the two)")
    mid = header.get("id", -1)
    if header.get("type") == REPLY_ERROR:
        err = from_wire(header.get("code"), header.get("message"), header.get("details"))
        err.request_id = mid  # type: ignore[attr-defined]
        raise err
    if header.get("type") != REPLY_OK:
        raise ProtocolError(f"unexpected reply type {header.get('type')!r}")
    fields = {k: v for k, v in header.items() if k not in ("v", "type", "id")}
    return Message(REPLY_OK, mid if isinstance(mid, int) else -1, fields, list(frames[1:]))
