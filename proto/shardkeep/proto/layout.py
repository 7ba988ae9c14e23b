"""Where each tensor of a version lives inside a slot's data region (pure logic).

The client declares the tensors it will write (name, dtype, shape); both sides
compute the same offsets with :func:`plan_layout`, and the manifest of every
version records them.  Dtypes travel by name; the table below is the only
place that knows their sizes, so ``shardkeep.proto`` needs no torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import ProtocolError

#: bytes per element of every dtype a slot can hold (torch names, no "torch.").
DTYPE_ITEMSIZE: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
}

#: tensors start at multiples of this (cache line and AVX-512 friendly; CUDA copies like 256).
ALIGN = 256
#: checksums cover the data region in chunks of this many bytes (see manifest).
DEFAULT_CHUNK = 1 << 20

MAX_TENSORS = 1 << 20
MAX_NAME = 1024
MAX_NDIM = 16

_JOB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_job_id(job: object) -> str:
    """Job ids end up in shm segment names and paths: a strict alphabet, no path tricks."""
    if not isinstance(job, str) or not _JOB_RE.fullmatch(job) or ".." in job:
        raise ProtocolError(
            f"invalid job id {job!r}: 1-128 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, no '..'"
        )
    return job


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> list:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    try:
        size = DTYPE_ITEMSIZE[dtype]
    except KeyError:
        raise ProtocolError(f"unsupported dtype {dtype!r}") from None
    return size * math.prod(shape)


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def plan_layout(
    specs: list[tuple[str, str, tuple[int, ...]]], order: list[int] | None = None
) -> tuple[list[TensorEntry], int]:
    """Give each (name, dtype, shape) an aligned offset, placing them in ``order``.

    Returns the entries in the order of ``specs`` and the data size.
    """
    if len(specs) > MAX_TENSORS:
        raise ProtocolError(f"too many tensors: {len(specs)} > {MAX_TENSORS}")
    entries: list[TensorEntry | None] = [None] * len(specs)
    off = 0
    for i in range(len(specs)) if order is None else order:
        name, dtype, shape = specs[i]
        nbytes = tensor_nbytes(dtype, tuple(shape))
        entries[i] = TensorEntry(name, dtype, tuple(shape), off, nbytes)
        off = align_up(off + nbytes)
    if any(e is None for e in entries):
        raise ValueError("order must be a permutation of the specs")
    return entries, off  # type: ignore[return-value]


def validate_entries(raw: object, data_capacity: int) -> list[TensorEntry]:
    """Check a manifest's tensor table from outside: types, bounds, no overlaps."""
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ProtocolError("tensor table must be a list of at most %d entries" % MAX_TENSORS)
    out: list[TensorEntry] = []
    for i, item in enumerate(raw):
        if not (isinstance(item, (list, tuple)) and len(item) == 5):
            raise ProtocolError(f"tensor entry {i}: expected [name, dtype, shape, offset, nbytes]")
        name, dtype, shape, offset, nbytes = item
        if not isinstance(name, str) or len(name) > MAX_NAME:
            raise ProtocolError(f"tensor entry {i}: bad name")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            raise ProtocolError(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if (
            not isinstance(shape, (list, tuple))
            or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape)
        ):
            raise ProtocolError(f"tensor {name!r}: bad shape {shape!r}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (offset, nbytes)):
            raise ProtocolError(f"tensor {name!r}: offset and nbytes must be integers")
        if nbytes != tensor_nbytes(dtype, tuple(shape)):
            raise ProtocolError(f"tensor {name!r}: nbytes {nbytes} does not match {dtype}{list(shape)}")
        if offset < 0 or offset % ALIGN or offset + nbytes > data_capacity:
            raise ProtocolError(
                f"tensor {name!r}: offset {offset} (+{nbytes}) is unaligned or "
                f"exceeds the slot's {data_capacity} bytes"
            )
        out.append(TensorEntry(name, dtype, tuple(shape), offset, nbytes))
    end = 0
    for e in sorted(out, key=lambda e: e.offset):  # entries are in tensor order, not offset order
        if e.nbytes and e.offset < end:
            raise ProtocolError(f"tensor {e.name!r} overlaps the tensor before it")
        end = max(end, e.offset + e.nbytes)
    return out
