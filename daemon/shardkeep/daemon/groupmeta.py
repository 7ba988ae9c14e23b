"""The record a node keeps beside its parity of a group-level version, so a restarted daemon re-adopts it.

Pure encode/decode (no I/O).  Layout: 8-byte magic, xxh3_64 of the body
(little-endian u64), then a msgpack map::

    {"job", "step", "epoch", "node", "n", "m", "parity": segment name,
     "layout": {stripe: [offset, padded length]}, "headers": {stripe: bytes},
     "sizes": {node: payload bytes}, "manifests": {node: bytes}}

Everything is validated on decode: a record from shared memory is input from
outside like any other.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import msgpack
import xxhash

from shardkeep.proto.errors import IntegrityError, ProtocolError
from shardkeep.proto.layout import check_job_id

MAGIC = b"SKGMETA1"
_HEAD = struct.Struct("<8sQ")
MAX_RECORD = 256 << 20


@dataclass
class ParityRecord:
    job: str
    step: int
    node: int
    n: int
    m: int
    parity: str
    layout: dict[int, tuple[int, int]]
    headers: dict[int, bytes]
    sizes: dict[int, int]
    manifests: dict[int, bytes]
    epoch: int = 0

    def encode(self) -> bytes:
        body = msgpack.packb({
            "job": self.job, "step": self.step, "node": self.node, "n": self.n, "m": self.m,
            "parity": self.parity, "layout": {s: list(v) for s, v in self.layout.items()},
            "headers": self.headers, "sizes": self.sizes, "manifests": self.manifests, "epoch": self.epoch,
        }, use_bin_type=True)
        return _HEAD.pack(MAGIC, xxhash.xxh3_64_intdigest(body)) + body

    @classmethod
    def decode(cls, buf: bytes) -> "ParityRecord":
        if len(buf) < _HEAD.size or len(buf) > MAX_RECORD:
            raise IntegrityError(f"parity record of {len(buf)} bytes")
        magic, digest = _HEAD.unpack_from(buf)
        body = buf[_HEAD.size:]
        if magic != MAGIC:
            raise IntegrityError("not a parity record (bad magic)")
        if xxhash.xxh3_64_intdigest(body) != digest:
            raise IntegrityError("parity record fails its checksum")
        try:
            d = msgpack.unpackb(body, raw=False, strict_map_key=False, max_bin_len=MAX_RECORD,
                                max_str_len=1 << 16, max_array_len=1 << 16, max_map_len=1 << 16)
            rec = cls(
                job=check_job_id(d["job"]), step=_int(d["step"], 0, 1 << 62), node=_int(d["node"], 0, 4095),
                n=_int(d["n"], 1, 4096), m=_int(d["m"], 0, 4095), parity=_name(d["parity"]),
                layout={_int(s, 0, 4095): (_int(v[0], 0, 1 << 62), _int(v[1], 0, 1 << 62))
                        for s, v in d["layout"].items()},
                headers={_int(s, 0, 4095): _bytes(h) for s, h in d["headers"].items()},
                sizes={_int(j, 0, 4095): _int(x, 0, 1 << 62) for j, x in d["sizes"].items()},
                manifests={_int(j, 0, 4095): _bytes(x) for j, x in d["manifests"].items()},
                epoch=_int(d.get("epoch", 0), 0, (1 << 63) - 1),
            )
        except (KeyError, TypeError, ValueError, IndexError, ProtocolError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"malformed parity record: {exc!r}") from None
        if rec.node >= rec.n or set(rec.sizes) != set(range(rec.n)) or set(rec.headers) != set(rec.layout):
            raise IntegrityError("parity record is inconsistent (nodes, sizes or headers)")
        ends = sorted(rec.layout.values())
        if any(a[0] + a[1] > b[0] for a, b in zip(ends, ends[1:])):
            raise IntegrityError("parity record's stripes overlap")
        return rec

    def parity_bytes(self) -> int:
        return max((off + n for off, n in self.layout.values()), default=0)


def _int(x, lo: int, hi: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
        raise ValueError(f"{x!r} is not an integer in [{lo}, {hi}]")
    return x


def _bytes(x) -> bytes:
    if not isinstance(x, bytes):
        raise TypeError(f"expected bytes, got {type(x).__name__}")
    return x


def _name(x) -> str:
    if not isinstance(x, str) or not x or "/" in x or x.startswith(".") or len(x) > 255:
        raise ValueError(f"bad segment name {x!r}")
    return x
