"""Read a rank's state back from a persisted (or exported) version: ``restore()``'s last resort.

A step directory (see ``export.py``) holds DCP's files and ``shardkeep.manifest``.
This reads only the latter and the tensors it points at: each tensor's bytes with
``torch.load(weights_only=True)`` (DCP writes each tensor item as a ``torch.save``
of that tensor), checked against the xxh3 the manifest recorded; non-tensor state
from the manifest's msgpack skeleton. DCP's pickled ``.metadata`` is never read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import msgpack
import torch

from shardkeep.proto.errors import IntegrityError, NotFoundError, ProtocolError
from shardkeep.proto.leaves import unpack_skeleton
from shardkeep.proto.manifest import checksum

from .dpshard import _nodes, replace

MANIFEST_NAME = "shardkeep.manifest"
MAX_MANIFEST = 1 << 30


def newest(persist_dir: str | os.PathLike, job: str) -> Path | None:
    """The newest complete step directory of ``job``: what ``latest`` names, else the highest complete one."""
    job_dir = Path(persist_dir) / job
    target = job_dir / "latest"
    if (target / MANIFEST_NAME).is_file() and (target / ".metadata").is_file():
        return target.resolve()
    steps = sorted((int(p.name[5:]), p) for p in job_dir.glob("step-*")
                   if p.name[5:].isdigit() and (p / MANIFEST_NAME).is_file() and (p / ".metadata").is_file())
    return steps[-1][1] if steps else None


def step_of(path: Path) -> int:
    return int(path.name[5:])


def load_rank(path: Path, job: str, rank: int, world_size: int, dtype_of) -> tuple[Any, list[torch.Tensor], int]:
    """(skeleton with TensorRefs, tensors, bytes read) of ``rank`` in the step directory ``path``."""
    raw = (path / MANIFEST_NAME).read_bytes()
    try:
        man = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_bin_len=MAX_MANIFEST)
        if man.get("format") != 1 or man.get("job") != job:
            raise IntegrityError(f"{path}: a manifest of format {man.get('format')!r} for job {man.get('job')!r}")
        entry = man["ranks"].get(rank)
        if entry is None or len(man["ranks"]) != world_size:
            raise NotFoundError(f"{path} holds ranks {sorted(man['ranks'])}; this is rank {rank} of {world_size}")
        skeleton = unpack_skeleton(entry["skeleton"])
        locs, dtypes, shapes = entry["tensors"], entry["dtypes"], entry["shapes"]
        wholes = entry.get("dpshard", {})
    except (KeyError, TypeError, ValueError, AttributeError, ProtocolError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"{path / MANIFEST_NAME} is unreadable: {exc!r}") from None
    files: dict[str, Any] = {}
    nbytes = 0

    def read(loc: list, dtype: str | None, shape: list | None, what: str) -> torch.Tensor:
        nonlocal nbytes
        rel, off, length, transforms, digest = loc
        if transforms:
            raise IntegrityError(f"{what}: written with stream transforms {transforms}, which this reader lacks")
        if "/" in rel or rel.startswith("."):
            raise IntegrityError(f"{what}: file name {rel!r} outside the step directory")
        f = files.get(rel)
        if f is None:
            f = files[rel] = open(path / rel, "rb")
        f.seek(off)
        data = f.read(length)
        if len(data) != length:
            raise IntegrityError(f"{what}: {path / rel} ends before byte {off + length}")
        try:
            t = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as exc:  # a torn or foreign file: weights_only refuses anything but tensors
            raise IntegrityError(f"{what}: not a tensor at {rel}+{off}: {exc}") from None
        if not isinstance(t, torch.Tensor):
            raise IntegrityError(f"{what}: not a tensor at {rel}+{off}")
        t = t.contiguous()
        if dtype is not None and (t.dtype != dtype_of(dtype) or list(t.shape) != list(shape)):
            raise IntegrityError(f"{what}: {t.dtype} {list(t.shape)} where the manifest says {dtype} {shape}")
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else None
        if (checksum(memoryview(flat.numpy())) if flat is not None else 0) != digest:
            raise IntegrityError(f"{what}: checksum mismatch at {rel}+{off}")
        nbytes += t.numel() * t.element_size()
        return t

    try:
        tensors: list[torch.Tensor] = [
            read(loc, dtypes[i], shapes[i], f"rank {rank} tensor {i}") if loc is not None else torch.empty(0)
            for i, loc in enumerate(locs)]
        whole = {int(g): read(loc, None, None, f"rank {rank} replicated tensor at byte {g}") for g, loc in wholes.items()}
    finally:
        for f in files.values():
            f.close()
    index: dict[int, int] = {}
    for n in _nodes(skeleton, []):
        t = whole.get(n["goff"])
        if t is None:
            raise IntegrityError(f"{path}: no whole tensor for rank {rank}'s dp_shard slice at byte {n['goff']}")
        index[id(n)] = len(tensors)
        tensors.append(t)

    return (replace(skeleton, index) if index else skeleton), tensors, nbytes
