"""Write a version of a job in DCP's file layout (``shardkeep export``; the persist tier's format).

Layout (DESIGN.md, "Persist tier"): ``<root>/<job>/step-<step>/`` holds the
version as ``torch.distributed.checkpoint`` writes one (``__<rank>_0.distcp``
files and the global ``.metadata``) plus ``shardkeep.manifest``, shardkeep's own
msgpack record of every rank (its skeleton and where each of its tensors lies);
``<root>/<job>/latest`` is a symlink to the newest complete step directory,
replaced by rename(2). Keys are the names DCP gives the same nested state
(``model.0.weight``, ``optim.state.0.exp_avg``, ``optim.param_groups``), so a
plain ``dcp.load({"model": model.state_dict(), ...},
storage_reader=FileSystemReader(".../latest"))`` reads it without shardkeep.

What DCP sees: every key once. DTensor shards become DCP chunks at their global
offsets (Shard and Replicate placements); ``dp_shard`` slices are put back
together into whole tensors; a value several ranks hold with the same bytes is
written once (the lowest rank's), while per-rank state under the same key (RNG,
data-loader positions) is written by every rank into its own file but DCP's
metadata names the lowest rank's. shardkeep's manifest points each rank at its
own bytes. Files and directories are fsynced, written under temporary names and
renamed; ``.metadata`` comes last, then the directory's rename, then ``latest``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import msgpack
import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from shardkeep.proto.errors import IntegrityError
from shardkeep.proto.leaves import NDArrayLeaf, TensorRef
from shardkeep.proto.layout import check_job_id
from shardkeep.proto.manifest import Manifest, checksum

from .flatten import TAG, canonical_key
from .remote import Version

FORMAT = 1
MANIFEST_NAME = "shardkeep.manifest"
LATEST = "latest"


@dataclasses.dataclass
class ExportResult:
    job: str
    step: int
    path: Path
    ranks: int
    bytes: int
    files: int
    seconds: float

    def __str__(self) -> str:
        return (f"exported job {self.job} step {self.step} ({self.ranks} ranks, {self.bytes / 1e6:.1f} MB in "
                f"{self.files} files) to {self.path} in {self.seconds:.2f} s")


def step_dir(root: Path, job: str, step: int) -> Path:
    return Path(root) / check_job_id(job) / f"step-{step}"


def export(job: str, to: str | os.PathLike, *, step: int | None = None, socket: str | None = None,
           token: str | None = None, keep: int | None = None, timeout: float | None = None) -> ExportResult:
    """Write ``job``'s version ``step`` (default: the newest) to ``to/<job>/step-<step>`` and point
    ``to/<job>/latest`` at it (if it is the newest there); ``keep``: step directories to keep."""
    t0 = time.perf_counter()
    v = Version(job, socket=socket, token=token, **({"timeout": timeout} if timeout else {})).locate(step)
    try:
        with contextlib.ExitStack() as stack:
            views = {r: stack.enter_context(v.open(r, set(range(len(at.manifest.tensors)))))
                     for r, at in sorted(v.ranks.items())}
            assert v.step is not None
            path, nbytes, files = write_version(Path(to), job, v.step,
                                                {r: (at.manifest, at.skeleton) for r, at in v.ranks.items()}, views,
                                                keep=keep)
    finally:
        v.close()
    return ExportResult(job, v.step, path, len(v.ranks), nbytes, files, time.perf_counter() - t0)


# --- the state DCP sees -------------------------------------------------------------------------


def _coordinate(rank: int, mesh_shape: list[int], mesh_ranks: list[int]) -> list[int]:
    if rank not in mesh_ranks:
        raise IntegrityError(f"rank {rank} holds a DTensor of a mesh without it ({mesh_ranks})")
    i, coord = mesh_ranks.index(rank), []
    for n in reversed(mesh_shape):
        coord.append(i % n)
        i //= n
    return list(reversed(coord))


def shard_offsets(node: dict, rank: int, local: torch.Tensor, path: str) -> list[int]:
    """The global offsets of ``rank``'s shard of a saved DTensor (torch's chunking for Shard(d))."""
    shape = list(node["shape"])
    mesh_shape, mesh_ranks = list(node["mesh"][0]), list(node["mesh"][1])
    coord = _coordinate(rank, mesh_shape, mesh_ranks)
    size, offsets = list(shape), [0] * len(shape)
    for i, p in enumerate(node["placements"]):
        if p[0] == "S":
            d, n, c = int(p[1]), mesh_shape[i], coord[i]
            full = (size[d] + n - 1) // n
            off = min(size[d], full * c)
            size[d] = max(0, min(size[d], off + full) - off)
            offsets[d] += off
        elif p[0] == "P":
            raise TypeError(f"{path}: a DTensor with a Partial placement holds unreduced values; it cannot be "
                            "exported (reduce it before snapshotting)")
    if size != list(local.shape):
        raise IntegrityError(f"{path}: rank {rank}'s shard has shape {list(local.shape)}, its placements give {size}")
    return offsets


def _whole_tensors(ranks: dict[int, tuple[Manifest, Any]], views: dict[int, dict[int, torch.Tensor]]) -> dict:
    """dp_shard: each replicated tensor put back together from the replicas' slices, by global offset."""
    from .dpshard import _nodes
    from .snapshotter import _torch_dtype

    bufs: dict[int, torch.Tensor] = {}
    got: dict[int, int] = {}
    kinds: dict[int, dict] = {}
    for r, (_m, skeleton) in sorted(ranks.items()):
        for n in _nodes(skeleton, []):
            g = n["goff"]
            if g not in bufs:
                bufs[g], got[g], kinds[g] = torch.empty(n["nbytes"], dtype=torch.uint8), 0, n
            if n["part"] is not None:
                bufs[g][n["lo"] : n["hi"]].copy_(views[r][n["part"].index])
                got[g] += n["hi"] - n["lo"]
    out = {}
    for g, buf in bufs.items():
        n = kinds[g]
        if got[g] != n["nbytes"]:
            raise IntegrityError(f"a dp_shard tensor at byte {g} has {got[g]} of its {n['nbytes']} bytes in the "
                                 "version's ranks (a replica is missing)")
        dt = _torch_dtype(n["dtype"])
        out[g] = buf.view(dt).view(n["shape"]) if n["nbytes"] else torch.empty(n["shape"], dtype=dt)
    return out


def materialize(skeleton: Any, views: dict[int, torch.Tensor], rank: int, shards: dict[int, list[int]],
                sizes: dict[int, list[int]], whole: dict | None, path: str = "") -> Any:
    """The rank's nested state as DCP would see it: Stateful objects as their state dicts, tensors as views;
    a DTensor as its local shard (its global offsets and size recorded by id)."""
    def rec(obj: Any, p: str) -> Any:
        if isinstance(obj, TensorRef):
            return views[obj.index]
        if isinstance(obj, NDArrayLeaf):
            import numpy as np

            return np.frombuffer(obj.data, dtype=np.dtype(obj.dtype)).reshape(obj.shape).copy()
        if isinstance(obj, dict):
            tag = obj.get(TAG)
            if tag == "stateful":
                return canonical_state(obj, rec(obj["state"], p))
            if tag == "generator":
                return rec(obj["state"], p)
            if tag == "dtensor":
                local = views[obj["local"].index]
                shards[id(local)] = shard_offsets(obj, rank, local, p)
                sizes[id(local)] = list(obj["shape"])
                return local
            if tag == "dpshard":
                return whole[obj["goff"]] if whole is not None else _SKIP
            return {k: rec(v, f"{p}.{k}" if p else str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [rec(v, f"{p}.{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(rec(v, f"{p}.{i}") for i, v in enumerate(obj))
        return obj

    return rec(skeleton, path)


def canonical_state(node: dict, sd: Any) -> Any:
    """A Stateful's state dict under the names ``get_state_dict`` gives it (DESIGN.md: the persist layout): an
    optimizer's parameter indices become the parameters' fully qualified names, in ``state`` and in each
    param group's ``params``; a module's keys lose DDP's and torch.compile's wrapper segments.  A skeleton
    saved without the names (a parameter in no module of the state) keeps the indices."""
    if not isinstance(sd, dict):
        return sd
    fqns, wrappers = node.get("fqns"), node.get("wrappers")
    if isinstance(fqns, list) and isinstance(sd.get("state"), dict):
        def name(i: Any) -> Any:
            return fqns[i] if type(i) is int and 0 <= i < len(fqns) else i

        sd = dict(sd)
        sd["state"] = {name(i): v for i, v in sd["state"].items()}
        if isinstance(sd.get("param_groups"), list):
            sd["param_groups"] = [{**g, "params": [name(i) for i in g["params"]]}
                                  if isinstance(g, dict) and isinstance(g.get("params"), list) else g
                                  for g in sd["param_groups"]]
    if isinstance(wrappers, list) and wrappers:
        sd = {canonical_key(k, wrappers) if isinstance(k, str) else k: v for k, v in sd.items()}
    return sd


class _Planner:
    """What FileSystemWriter asks of a planner while it writes: the data of each item (paced by ``throttle``)."""

    def __init__(self, throttle: "_Throttle | None" = None) -> None:
        self.data: dict[MetadataIndex, Any] = {}
        self.throttle = throttle

    def resolve_data(self, item: WriteItem) -> Any:
        d = self.data[item.index]
        if self.throttle is not None:
            self.throttle.take(len(d) if isinstance(d, bytes) else d.numel() * d.element_size())
        return io.BytesIO(d) if isinstance(d, bytes) else d


def _digest(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        t = value.detach().contiguous().reshape(-1)
        return checksum(memoryview(t.view(torch.uint8).numpy())) if t.numel() else 0
    return checksum(value)


# --- writing -------------------------------------------------------------------------------------


def write_version(root: Path, job: str, step: int, ranks: dict[int, tuple[Manifest, Any]],
                  views: dict[int, dict[int, torch.Tensor]], keep: int | None = None) -> tuple[Path, int, int]:
    """Write one version (every rank given) as a complete step directory; returns (path, bytes, files)."""
    part = partial_dir(root, job, step, f"export-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    try:
        written = write_part(part, ranks, views, mine=sorted(ranks))
        path = commit_version(root, job, step, part, [written], keep=keep)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return path, sum(i["size"] for r in written["ranks"].values() for i in r["items"]), written["files"]


def partial_dir(root: Path, job: str, step: int, tag: str) -> Path:
    """Where the ranks' files of a version being written go (every node of a group the same one)."""
    return Path(root) / check_job_id(job) / f".step-{step}.{tag}"


class _Throttle:
    def __init__(self, rate: float) -> None:
        self.rate, self.t0, self.n = rate, time.monotonic(), 0

    def take(self, nbytes: int) -> None:
        """Sleep until ``nbytes`` more keep the average under ``rate`` bytes/s (0: no limit)."""
        self.n += nbytes
        if self.rate > 0:
            ahead = self.n / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)


def write_part(part: Path, ranks: dict[int, tuple[Manifest, Any]], views: dict[int, dict[int, torch.Tensor]],
               mine: list[int], rate: float = 0.0) -> dict:
    """Write the files of the ranks ``mine`` (every rank's manifest and skeleton given; ``views`` of mine, and
    of the others only what dp_shard needs) into ``part``; returns what ``commit_version`` needs, plain data.

    Within the ranks written here, an item with the same key and bytes as a lower rank's is written once. The
    rank holding the lowest rank of a dp_shard group's slices writes the whole tensors."""
    part.mkdir(parents=True, exist_ok=True)
    whole = _whole_tensors(ranks, views) if 0 in mine and any(_has_dpshard(sk) for _, sk in ranks.values()) else {}
    throttle = _Throttle(rate)
    out: dict[str, Any] = {"ranks": {}, "files": 0}
    seen: dict[tuple, tuple[int, int]] = {}      # key -> (rank, digest) written here first
    writer = FileSystemWriter(part, sync_files=True)
    writer.set_up_storage_writer(True)
    writer.reset()
    for r in mine:
        m, skeleton = ranks[r]
        shards: dict[int, list[int]] = {}
        sizes: dict[int, list[int]] = {}
        sd = materialize(skeleton, views[r], r, shards, sizes, whole if r == 0 else None)
        if not isinstance(sd, dict):
            raise IntegrityError(f"rank {r}: the saved state is not a map")
        flat, mappings = flatten_state_dict(sd)
        planner, items, ids, rec = _Planner(throttle), [], {}, []
        for fqn, value in flat.items():
            if value is _SKIP:  # a dp_shard slice of another rank than 0: rank 0 writes the whole tensor
                continue
            if isinstance(value, torch.Tensor):
                offs = shards.get(id(value), [0] * value.dim())
                key = (fqn, tuple(offs))
                ids[id(value)] = key
                gsize = torch.Size(sizes.get(id(value), list(value.shape)))
                props = TensorProperties.create_from_tensor(value)
                kind = WriteItemType.SHARD if id(value) in shards else WriteItemType.TENSOR
                item = WriteItem(index=MetadataIndex(fqn, offs), type=kind, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offs), sizes=value.shape),
                    properties=props, size=gsize))
                data: Any = value
            else:
                buf = io.BytesIO()
                torch.save(value, buf)
                data = buf.getvalue()
                key = (fqn, ())
                item = WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
            digest = _digest(data)
            if key in seen and seen[key][1] == digest:
                rec.append(_item_record(item, digest, seen[key][0]))  # the same bytes, written already
                continue
            seen.setdefault(key, (r, digest))
            planner.data[item.index] = data
            items.append(item)
            rec.append(_item_record(item, digest, r))
        results = {}
        if items:
            for wr in writer.write_data(SavePlan(items, storage_data=_StoragePrefix(f"__{r}_")), planner).wait():
                results[(wr.index.fqn, tuple(wr.index.offset or ()))] = wr
            out["files"] += 1
        for it in rec:
            if it["writer"] == r:  # written by this rank: its place in the file
                wr = results[(it["fqn"], tuple(it["offsets"]))]
                si = wr.storage_data
                it.update(file=si.relative_path, offset=si.offset, length=si.length,
                          transforms=list(si.transform_descriptors or []), size=wr.size_in_bytes)
        out["ranks"][r] = {
            "items": rec, "skeleton": m.skeleton, "world_size": m.world_size, "mappings": {k: list(v) for k, v in
                                                                                          mappings.items()},
            "tensors": [list(ids[id(t)]) if id(t) in ids else None
                        for t in (views[r][i] for i in range(len(m.tensors)))],
            "dtypes": [e.dtype for e in m.tensors], "shapes": [list(e.shape) for e in m.tensors],
            "dpshard": {g: list(ids[id(t)]) for g, t in whole.items() if id(t) in ids} if r == 0 else {},
        }
    return out


_SKIP = object()


def _has_dpshard(skeleton: Any) -> bool:
    from .dpshard import has_shards

    return has_shards(skeleton)


def _item_record(item: WriteItem, digest: int, writer_rank: int) -> dict:
    """One item of a rank, as plain data: key, kind, what DCP's metadata needs, and (once written) its place;
    ``writer``: the rank whose file holds its bytes (a lower rank here with the same bytes, or itself)."""
    td = item.tensor_data
    return {"fqn": item.index.fqn, "offsets": list(item.index.offset or ()), "kind": item.type.name,
            "dtype": None if td is None else str(td.properties.dtype).removeprefix("torch."),
            "requires_grad": False if td is None else bool(td.properties.requires_grad),
            "size": 0, "global": None if td is None else list(td.size),
            "chunk": None if td is None else list(td.chunk.sizes),
            "digest": digest, "writer": writer_rank, "file": None, "offset": 0, "length": 0, "transforms": []}


def commit_version(root: Path, job: str, step: int, part: Path, parts: list[dict], keep: int | None = None) -> Path:
    """Every rank's files are in ``part``: write DCP's ``.metadata`` and shardkeep's manifest, rename the
    directory to ``step-<step>``, point ``latest`` at it. ``parts``: what each ``write_part`` returned."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    ranks: dict[int, dict] = {}
    for p in parts:
        for r, entry in p["ranks"].items():
            ranks[int(r)] = entry
    world = {e["world_size"] for e in ranks.values()}
    if len(world) != 1 or sorted(ranks) != list(range(next(iter(world)))):
        raise IntegrityError(f"job {job!r} step {step}: the parts hold ranks {sorted(ranks)} of a world of {world}")
    placed: dict[tuple, dict[int, dict]] = {}  # key -> {writer rank: record}
    for r in sorted(ranks):
        for it in ranks[r]["items"]:
            if it["writer"] == r:
                placed.setdefault((it["fqn"], tuple(it["offsets"])), {})[r] = it
    state_md: dict[str, Any] = {}
    planner_data: dict = {}
    results = []
    for r in sorted(ranks):
        for k, pth in ranks[r]["mappings"].items():
            planner_data.setdefault(k, tuple(pth))
    for key, by_rank in placed.items():  # DCP names the lowest rank's item of each key
        it = by_rank[min(by_rank)]
        fqn, offs = it["fqn"], it["offsets"]
        if it["kind"] == "BYTE_IO":
            state_md[fqn] = BytesStorageMetadata()
        else:
            props = TensorProperties(dtype=getattr(torch, it["dtype"]), requires_grad=it["requires_grad"])
            tmd = state_md.setdefault(fqn, TensorStorageMetadata(properties=props, size=torch.Size(it["global"]),
                                                                 chunks=[]))
            if not isinstance(tmd, TensorStorageMetadata) or list(tmd.size) != it["global"]:
                raise IntegrityError(f"{fqn}: ranks disagree on what it is")
            tmd.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offs), sizes=torch.Size(it["chunk"])))
        results.append(WriteResult(index=MetadataIndex(fqn, offs if it["kind"] != "BYTE_IO" else None),
                                   size_in_bytes=it["size"],
                                   storage_data=_StorageInfo(it["file"], it["offset"], it["length"],
                                                             it["transforms"] or None)))

    def loc(r: int, key: list | None) -> list | None:
        """[file, offset, length, transforms, xxh3] of rank r's item: its own, or the lowest rank's copy."""
        if key is None:
            return None
        by_rank = placed.get((key[0], tuple(key[1])), {})
        mine = next((it for it in ranks[r]["items"] if it["fqn"] == key[0] and tuple(it["offsets"]) == tuple(key[1])),
                    None)
        if mine is None:
            raise IntegrityError(f"rank {r}: no item {key}")
        it = by_rank.get(mine["writer"])
        if it is None:
            raise IntegrityError(f"rank {r}'s item {key} was written by rank {mine['writer']}, whose files are missing")
        return [it["file"], it["offset"], it["length"], it["transforms"], mine["digest"]]

    manifest: dict[str, Any] = {"format": FORMAT, "job": job, "step": step, "ranks": {}}
    for r, e in sorted(ranks.items()):
        manifest["ranks"][r] = {"world_size": e["world_size"], "skeleton": e["skeleton"],
                                "tensors": [loc(r, k) for k in e["tensors"]], "dtypes": e["dtypes"],
                                "shapes": e["shapes"]}
    wholes = {int(g): loc(0, k) for g, k in ranks[0].get("dpshard", {}).items()}
    for r in manifest["ranks"]:
        if wholes:
            manifest["ranks"][r]["dpshard"] = wholes
    meta = Metadata(state_dict_metadata=state_md, planner_data=planner_data)
    _write_file(part / MANIFEST_NAME, msgpack.packb(manifest, use_bin_type=True))
    writer = FileSystemWriter(part, sync_files=True)
    writer.set_up_storage_writer(True)
    writer.reset()
    writer.finish(meta, [results])  # .metadata (DCP's pickle: written here, never read by shardkeep), fsynced
    _fsync_dir(part)
    final = step_dir(root, job, step)
    if final.exists():
        old = final.parent / f".step-{step}.old-{os.getpid()}"
        os.rename(final, old)
        os.rename(part, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(part, final)
    _fsync_dir(final.parent)
    point_latest(final.parent, step)
    if keep is not None:
        prune(final.parent, keep)
    return final


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def steps_in(job_dir: Path) -> list[int]:
    """The complete step directories of a job, oldest first."""
    out = []
    for p in job_dir.glob("step-*"):
        tail = p.name[5:]
        if tail.isdigit() and (p / ".metadata").exists() and (p / MANIFEST_NAME).exists():
            out.append(int(tail))
    return sorted(out)


def latest_step(job_dir: Path) -> int | None:
    try:
        target = os.readlink(job_dir / LATEST)
    except OSError:
        return None
    tail = Path(target).name[5:]
    return int(tail) if Path(target).name.startswith("step-") and tail.isdigit() else None


def point_latest(job_dir: Path, step: int) -> None:
    """``latest`` -> step-<step>, unless it already names a newer step (rename(2) of a new symlink)."""
    cur = latest_step(job_dir)
    if cur is not None and cur > step and (job_dir / f"step-{cur}").exists():
        return
    tmp = job_dir / f".latest.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(f"step-{step}", tmp)
    os.rename(tmp, job_dir / LATEST)
    _fsync_dir(job_dir)


def prune(job_dir: Path, keep: int) -> list[int]:
    """Remove all but the newest ``keep`` step directories (never the one ``latest`` names)."""
    steps = steps_in(job_dir)
    cur = latest_step(job_dir)
    gone = [s for s in steps[: max(0, len(steps) - max(1, keep))] if s != cur]
    for s in gone:
        shutil.rmtree(job_dir / f"step-{s}", ignore_errors=True)
    return gone
