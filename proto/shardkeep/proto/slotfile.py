"""On-shm format of a slot segment: a 4 KiB header, the manifest region, the data region.

```
[0, 4096)                       header (struct below, then zero padding)
[4096, 4096 + manifest_cap)     manifest (msgpack, see manifest.py)
[data_offset, + data_capacity)  tensor bytes, offsets from the manifest
```

The header carries its own xxh3 so a torn or scribbled header is detected; the
manifest's xxh3 is in the header; the data's per-chunk xxh3 are in the manifest.
Only the daemon writes the header and the manifest; clients write the data region.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import xxhash

from .errors import IntegrityError

MAGIC = b"SKSLOT\x00\x01"
HEADER_SIZE = 4096
DATA_ALIGN = 4096

STATE_FREE = 0
STATE_WRITING = 1
STATE_COMMITTED = 2

# magic, state, pad, slot_size, data_offset, data_capacity, manifest_offset,
# manifest_capacity, manifest_len, manifest_xxh, step, history, commit_seq, rank, job
_FMT = "<8sII QQQQQ QQ qQQ I 128s"
_STRUCT = struct.Struct(_FMT)
_TAIL = struct.Struct("<Q")


@dataclass(slots=True)
class SlotHeader:
    state: int
    slot_size: int
    data_offset: int
    data_capacity: int
    manifest_offset: int
    manifest_capacity: int
    manifest_len: int = 0
    manifest_xxh: int = 0
    step: int = -1
    history: int = 0
    commit_seq: int = 0
    rank: int = 0
    job: str = ""

    def pack(self) -> bytes:
        body = _STRUCT.pack(
            MAGIC, self.state, 0, self.slot_size, self.data_offset, self.data_capacity,
            self.manifest_offset, self.manifest_capacity, self.manifest_len, self.manifest_xxh,
            self.step, self.history, self.commit_seq, self.rank, self.job.encode(),
        )
        return body + _TAIL.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def unpack(cls, raw: bytes | memoryview, where: str) -> "SlotHeader":
        n = _STRUCT.size
        if len(raw) < n + 8:
            raise IntegrityError(f"{where}: header truncated")
        body = bytes(raw[:n])
        (tag,) = _TAIL.unpack(bytes(raw[n : n + 8]))
        if body[:8] != MAGIC:
            raise IntegrityError(f"{where}: not a shardkeep slot (bad magic)")
        if xxhash.xxh3_64_intdigest(body) != tag:
            raise IntegrityError(f"{where}: header checksum mismatch")
        f = _STRUCT.unpack(body)
        h = cls(
            state=f[1], slot_size=f[3], data_offset=f[4], data_capacity=f[5],
            manifest_offset=f[6], manifest_capacity=f[7], manifest_len=f[8], manifest_xxh=f[9],
            step=f[10], history=f[11], commit_seq=f[12], rank=f[13],
            job=f[14].rstrip(b"\x00").decode("utf-8", "replace"),
        )
        if not (
            h.manifest_offset == HEADER_SIZE
            and h.manifest_offset + h.manifest_capacity <= h.data_offset
            and h.data_offset % DATA_ALIGN == 0
            and h.data_offset + h.data_capacity <= h.slot_size
            and h.manifest_len <= h.manifest_capacity
        ):
            raise IntegrityError(f"{where}: header geometry is inconsistent")
        return h


def geometry(data_capacity: int, manifest_capacity: int) -> tuple[int, int, int]:
    """(manifest_offset, data_offset, slot_size) for the requested capacities."""
    manifest_capacity = -(-manifest_capacity // DATA_ALIGN) * DATA_ALIGN
    data_offset = HEADER_SIZE + manifest_capacity
    data_capacity = -(-max(data_capacity, 1) // DATA_ALIGN) * DATA_ALIGN
    return HEADER_SIZE, data_offset, data_offset + data_capacity
