"""The manifest of one version of one rank: what is in a slot and how to check it.

Written by the daemon into the slot's manifest region at local commit, read
back at restore and at re-adoption.  msgpack, validated field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from .errors import IntegrityError, ProtocolError
from .layout import DEFAULT_CHUNK, TensorEntry, check_job_id, validate_entries

MANIFEST_FORMAT = 1
CHECKSUM_ALGO = "xxh3_64"
MAX_MANIFEST_BYTES = 512 << 20


def chunk_count(nbytes: int, chunk: int) -> int:
    return (nbytes + chunk - 1) // chunk


def checksum(buf: Any) -> int:
    """xxh3_64 of a buffer; releases the GIL on large inputs."""
    return xxhash.xxh3_64_intdigest(buf)


def pack_checksums(values: list[int]) -> bytes:
    return struct.pack(f"<{len(values)}Q", *values)


def unpack_checksums(raw: bytes) -> list[int]:
    if len(raw) % 8:
        raise ProtocolError("checksum table is not a whole number of u64")
    return list(struct.unpack(f"<{len(raw) // 8}Q", raw))


@dataclass(slots=True)
class Manifest:
    job: str
    rank: int
    world_size: int
    local_world_size: int
    step: int
    history: int
    tensors: list[TensorEntry]
    data_bytes: int
    checksums: list[int]
    skeleton: bytes
    chunk: int = DEFAULT_CHUNK
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "format": MANIFEST_FORMAT,
                "job": self.job,
                "rank": self.rank,
                "world_size": self.world_size,
                "local_world_size": self.local_world_size,
                "step": self.step,
                "history": self.history,
                "tensors": [t.to_wire() for t in self.tensors],
                "data_bytes": self.data_bytes,
                "chunk": self.chunk,
                "algo": CHECKSUM_ALGO,
                "checksums": pack_checksums(self.checksums),
                "skeleton": self.skeleton,
                "created": self.created,
                "extra": self.extra,
            },
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, raw: bytes | memoryview, data_capacity: int) -> "Manifest":
        """Parse and validate a manifest; any inconsistency raises ``ProtocolError``."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ProtocolError("manifest too large")
        try:
            d = msgpack.unpackb(raw, raw=False, strict_map_key=True)
        except Exception as exc:
            raise ProtocolError(f"manifest is not valid msgpack: {type(exc).__name__}") from None
        if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
            raise ProtocolError(f"unknown manifest format {d.get('format') if isinstance(d, dict) else d!r}")
        if d.get("algo") != CHECKSUM_ALGO:
            raise ProtocolError(f"unknown checksum algorithm {d.get('algo')!r}")

        def need(key: str, typ: type | tuple[type, ...], lo: int | None = None) -> Any:
            v = d.get(key)
            if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
                raise ProtocolError(f"manifest field {key!r} missing or of the wrong type")
            if lo is not None and v < lo:
                raise ProtocolError(f"manifest field {key!r} out of range: {v}")
            return v

        job = check_job_id(need("job", str))
        chunk = need("chunk", int, 4096)
        data_bytes = need("data_bytes", int, 0)
        if data_bytes > data_capacity:
            raise ProtocolError(f"manifest data_bytes {data_bytes} exceeds slot capacity {data_capacity}")
        tensors = validate_entries(d.get("tensors"), data_bytes)
        sums = unpack_checksums(need("checksums", bytes))
        if len(sums) != chunk_count(data_bytes, chunk):
            raise ProtocolError(
                f"manifest has {len(sums)} checksums for {data_bytes} bytes in {chunk}-byte chunks"
            )
        extra = d.get("extra", {})
        if not isinstance(extra, dict):
            raise ProtocolError("manifest field 'extra' must be a map")
        return cls(
            job=job,
            rank=need("rank", int, 0),
            world_size=need("world_size", int, 1),
            local_world_size=need("local_world_size", int, 1),
            step=need("step", int, 0),
            history=need("history", int, 0),
            tensors=tensors,
            data_bytes=data_bytes,
            checksums=sums,
            skeleton=need("skeleton", bytes),
            chunk=chunk,
            created=float(need("created", (int, float))),
            extra=extra,
        )


def chunk_ranges(nbytes: int, chunk: int):
    """(index, start, end) of each checksum chunk of ``nbytes`` bytes."""
    for i, start in enumerate(range(0, nbytes, chunk)):
        yield i, start, min(start + chunk, nbytes)


def verify_data(manifest: Manifest, data: memoryview, where: str) -> None:
    """Check every chunk; raise ``IntegrityError`` naming the first bad chunk."""
    for i, start, end in chunk_ranges(manifest.data_bytes, manifest.chunk):
        if checksum(data[start:end]) != manifest.checksums[i]:
            raise IntegrityError(
                f"{where}: checksum mismatch in chunk {i} (bytes {start}..{end}) of "
                f"job {manifest.job!r} rank {manifest.rank} step {manifest.step}",
                chunk=i, step=manifest.step,
            )
