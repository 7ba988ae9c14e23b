"""A ``torch.distributed.checkpoint`` storage backend over shardkeep's daemons.

``dcp.save(state, storage_writer=ShardkeepWriter(...), checkpoint_id=step)``
(or ``dcp.async_save``) puts each rank's items into its node's shared memory
as one version of a shardkeep job (erasure-coded across the group like any
snapshot); ``dcp.load(state, storage_reader=ShardkeepReader(...))`` reads them
back at any world size, on any node of the group: a rank's own node serves
its data from shm, the others' over the daemons' peer data plane. DCP's
planner does the resharding; this module only stores and finds chunks.

Nothing here pickles or unpickles. DCP's global metadata travels as msgpack
in the coordinator's version; non-tensor values (DCP's "bytes" items) are
stored as shardkeep leaves (None, bool, int, float, str, bytes and lists,
tuples and dicts of them), so a value of another type is refused at save time
with its key. At load time a value is put straight where DCP's default planner
puts it, never through ``planner.load_bytes`` (which would ``torch.load`` bytes
with ``weights_only=False``); a planner that overrides ``load_bytes`` is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import msgpack
import torch
from torch.futures import Future
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

from shardkeep.proto import wire
from shardkeep.proto.config import DEFAULT_TIMEOUTS, default_socket
from shardkeep.proto.errors import IntegrityError, NotFoundError, ShardkeepError

from .remote import Version
from .snapshotter import Snapshotter, resolve_job

log = logging.getLogger("shardkeep.dcp")

FORMAT = 1       # of the "dcp" map in each rank's version
KEY = "dcp"      # the top-level key of that map in the version's state
_PLAIN = (type(None), bool, int, float, str, bytes)


def parse_step(checkpoint_id: Any) -> int:
    """A DCP ``checkpoint_id`` as a shardkeep step: an int, or a string ending in one (``"step-120"``)."""
    if isinstance(checkpoint_id, int) and not isinstance(checkpoint_id, bool):
        step = checkpoint_id
    else:
        m = re.search(r"(\d+)/*$", os.fspath(checkpoint_id)) if isinstance(checkpoint_id, (str, os.PathLike)) else None
        if m is None:
            raise ValueError(f"checkpoint_id {checkpoint_id!r} names no step: shardkeep keeps DCP checkpoints as "
                             "versions of a job by step; pass checkpoint_id=<step> (an int, or a string that "
                             "ends in one, like 'step-120')")
        step = int(m.group(1))
    if not 0 <= step <= wire.MAX_STEP:
        raise ValueError(f"checkpoint_id {checkpoint_id!r}: step {step} out of range")
    return step


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _default_job(job: str | None) -> str:
    return resolve_job(job) if job is not None else resolve_job(None) + "-dcp"


# --- DCP metadata as msgpack --------------------------------------------------------------------


def _props_to_wire(p: TensorProperties) -> dict:
    return {"dtype": str(p.dtype).removeprefix("torch."), "layout": str(p.layout).removeprefix("torch."),
            "requires_grad": bool(p.requires_grad), "memory_format": str(p.memory_format).removeprefix("torch."),
            "pin_memory": bool(p.pin_memory)}


def _props_from_wire(d: dict) -> TensorProperties:
    def attr(name: str, kind: type) -> Any:
        v = getattr(torch, str(d[name]), None)
        if not isinstance(v, kind):
            raise IntegrityError(f"DCP metadata: unknown {name} {d[name]!r}")
        return v

    return TensorProperties(dtype=attr("dtype", torch.dtype), layout=attr("layout", torch.layout),
                            requires_grad=bool(d["requires_grad"]),
                            memory_format=attr("memory_format", torch.memory_format),
                            pin_memory=bool(d["pin_memory"]))


def encode_metadata(md: Metadata) -> bytes:
    sd: dict[str, Any] = {}
    for fqn, v in md.state_dict_metadata.items():
        if isinstance(v, BytesStorageMetadata):
            sd[fqn] = {"kind": "bytes"}
        elif isinstance(v, TensorStorageMetadata):
            sd[fqn] = {"kind": "tensor", "properties": _props_to_wire(v.properties), "size": list(v.size),
                       "chunks": [[list(c.offsets), list(c.sizes)] for c in v.chunks]}
        else:
            raise TypeError(f"DCP metadata of {fqn!r}: {type(v).__name__} is not supported by shardkeep")
    planner_data = None
    if isinstance(md.planner_data, dict):
        planner_data = {k: list(path) for k, path in md.planner_data.items()}
    return msgpack.packb({"format": FORMAT, "state_dict": sd, "planner_data": planner_data,
                          "version": md.version}, use_bin_type=True)


def decode_metadata(raw: bytes) -> Metadata:
    try:
        d = msgpack.unpackb(raw, raw=False)
        if d.get("format") != FORMAT:
            raise IntegrityError(f"DCP metadata format {d.get('format')!r}, this client reads {FORMAT}")
        sd: dict[str, Any] = {}
        for fqn, v in d["state_dict"].items():
            if v["kind"] == "bytes":
                sd[fqn] = BytesStorageMetadata()
            else:
                sd[fqn] = TensorStorageMetadata(
                    properties=_props_from_wire(v["properties"]), size=torch.Size(v["size"]),
                    chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in v["chunks"]])
        pd = d.get("planner_data")
        planner_data = {k: tuple(path) for k, path in pd.items()} if isinstance(pd, dict) else None
        return Metadata(state_dict_metadata=sd, planner_data=planner_data, version=d.get("version"))
    except (KeyError, TypeError, ValueError, AttributeError, msgpack.UnpackException) as exc:
        raise IntegrityError(f"DCP metadata is unreadable: {exc!r}") from None


def metadata_from_plans(plans: list[SavePlan]) -> Metadata:
    """What DCP's default planner builds from the ranks' plans (for planners that keep none)."""
    md: dict[str, Any] = {}
    planner_data: dict = {}
    for plan in plans:
        if isinstance(plan.planner_data, dict):
            planner_data.update(plan.planner_data)
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                md[item.index.fqn] = BytesStorageMetadata()
                continue
            td = item.tensor_data
            tmd = md.setdefault(item.index.fqn, TensorStorageMetadata(properties=td.properties, size=td.size,
                                                                      chunks=[]))
            tmd.chunks.append(td.chunk)
    return Metadata(state_dict_metadata=md, planner_data=planner_data or None)


def _check_leaf(obj: Any, fqn: str) -> None:
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            _check_leaf(v, fqn)
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_leaf(k, fqn)
            _check_leaf(v, fqn)
        return
    raise TypeError(
        f"DCP item {fqn!r}: a {type(obj).__module__}.{type(obj).__qualname__} is neither a tensor nor a plain "
        "value; shardkeep keeps non-tensor state as msgpack (None, bool, int, float, str, bytes, and lists, "
        "tuples and dicts of them), never pickle. Convert it (or make it a tensor) before saving")


# --- writer -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StoredAt:
    """Where a DCP chunk lives: the saving rank and its position in that rank's items."""

    rank: int
    item: int
    kind: str = "tensor"   # or "bytes"


class ShardkeepWriter(StorageWriter):
    """``dcp.save`` / ``dcp.async_save`` into the local shardkeep daemon (and its group).

    ``job``: the shardkeep job that holds the checkpoints (default: the job id
    from the environment, as for ``Snapshotter``, plus ``-dcp``, so it never
    mixes with a ``Snapshotter``'s versions). ``checkpoint_id`` of each save is
    its step. ``durability="group"`` (default) returns once the version is
    erasure-coded across the group (or says in the log why it stayed local).
    """

    def __init__(self, job: str | None = None, *, socket: str | None = None, token: str | None = None,
                 durability: str = "group", timeout: float = DEFAULT_TIMEOUTS.client_request,
                 local_world_size: int | None = None, slots: int | None = None) -> None:
        super().__init__()
        self.job = _default_job(job)
        self.socket = socket or default_socket()
        self.token = token if token is not None else os.environ.get("SHARDKEEP_JOB_TOKEN") or None
        self.durability = durability
        self.timeout = timeout
        self.local_world_size = local_world_size
        self.slots = slots
        self.step: int | None = None
        self.is_coordinator = False
        self._plans_md: Metadata | None = None
        self._snap: Snapshotter | None = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.step = parse_step(checkpoint_id)
        elif self.step is None:
            raise ValueError("ShardkeepWriter: pass checkpoint_id=<step> to dcp.save/async_save")
        self._plans_md = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        try:
            parse_step(checkpoint_id)
            return True
        except ValueError:
            return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if self._snap is None:
            dist = _dist()
            rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
            lws = self.local_world_size
            if lws is None:
                env = os.environ.get("LOCAL_WORLD_SIZE")
                lws = int(env) if env else world
            self._snap = Snapshotter(self.socket, self.job, rank=rank, world_size=world,
                                     local_rank=int(os.environ.get("LOCAL_RANK", rank % lws)),
                                     local_world_size=lws, durability=self.durability, rng=False,
                                     timeout=self.timeout, slots=self.slots, token=self.token)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self._plans_md = metadata_from_plans(plans)
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if self._snap is None or self.step is None:
            raise RuntimeError("ShardkeepWriter.write_data before set_up_storage_writer/reset")
        tensors: list = []
        leaves: list = []
        results: list[WriteResult] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                lookup = getattr(planner, "lookup_object", None)
                if lookup is None:
                    raise TypeError(f"DCP item {fqn!r}: the planner {type(planner).__name__} cannot hand over the "
                                    "value itself (lookup_object), and shardkeep never stores pickled bytes")
                obj = lookup(item.index)
                _check_leaf(obj, fqn)
                results.append(WriteResult(item.index, 0, StoredAt(self._snap.rank, len(leaves), "bytes")))
                leaves.append([fqn, obj])
                continue
            t = planner.resolve_data(item)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"DCP item {fqn!r}: the planner resolved a {type(t).__name__}, not a tensor")
            t = t.detach()
            offsets = list(item.index.offset) if item.index.offset is not None else []
            results.append(WriteResult(item.index, t.numel() * t.element_size(),
                                       StoredAt(self._snap.rank, len(tensors))))
            tensors.append([fqn, offsets, t])
        body: dict[str, Any] = {"format": FORMAT, "tensors": tensors, "bytes": leaves}
        if self.is_coordinator:
            md = getattr(planner, "metadata", None)
            if not isinstance(md, Metadata):
                md = self._plans_md
            if md is None:
                raise RuntimeError("ShardkeepWriter: the coordinator has no global metadata for this save")
            body["metadata"] = encode_metadata(md)
        res = self._snap.snapshot({KEY: body}, self.step).result(timeout=self.timeout * 10 + 120)
        if res.status != "committed":
            raise ShardkeepError(f"DCP save of job {self.job!r} step {self.step} on rank {self._snap.rank} "
                                 f"was not stored: {res.reason}")
        if self.durability == "group" and res.level != "group" and res.reason:
            log.warning("job %s step %d: DCP checkpoint kept at %s level only: %s", self.job, self.step, res.level,
                        res.reason)
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        pass

    def close(self) -> None:
        """Stop the background copier (the checkpoints stay in the daemons)."""
        if self._snap is not None:
            self._snap.close()
            self._snap = None

    def __enter__(self) -> "ShardkeepWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- reader -------------------------------------------------------------------------------------


def _set_value(planner: LoadPlanner, item: Any, value: Any) -> None:
    """Put a non-tensor value (decoded from msgpack) where DCP's default planner would put it. Never through
    ``planner.load_bytes``, which ``torch.load``s with ``weights_only=False``: another planner is refused."""
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    if type(planner).load_bytes is not DefaultLoadPlanner.load_bytes:
        raise TypeError(f"DCP item {item.dest_index.fqn!r}: {type(planner).__name__} loads non-tensor values its own "
                        "way (load_bytes unpickles them); ShardkeepReader hands non-tensor values only to DCP's "
                        "default load planner, never as bytes to unpickle")
    if planner.flatten_state_dict:
        set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn], value)
    else:
        planner.state_dict[item.dest_index.fqn] = value


class ShardkeepReader(StorageReader):
    """``dcp.load`` from shardkeep's daemons, at any world size and on any node of the group.

    ``checkpoint_id`` (or ``step=``) picks the step; without either, the newest
    version the group holds (at group level where there is one).
    """

    def __init__(self, job: str | None = None, *, socket: str | None = None, token: str | None = None,
                 step: int | None = None, timeout: float = DEFAULT_TIMEOUTS.client_request) -> None:
        super().__init__()
        self.version = Version(_default_job(job), socket=socket, token=token, timeout=timeout)
        self.job = self.version.job
        self.want = step
        self.metadata: Metadata | None = None

    @property
    def step(self) -> int | None:
        return self.version.step

    @property
    def bytes_local(self) -> int:
        return self.version.bytes_local

    @property
    def bytes_remote(self) -> int:
        return self.version.bytes_remote

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.want = parse_step(checkpoint_id)
        self.metadata = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return ShardkeepWriter.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        v = self.version
        v.locate(self.want)
        bodies: dict[int, dict] = {}
        for rank, at in v.ranks.items():
            body = at.skeleton.get(KEY) if isinstance(at.skeleton, dict) else None
            if not isinstance(body, dict) or body.get("format") != FORMAT:
                raise IntegrityError(f"job {self.job!r} step {v.step} rank {rank} holds no DCP checkpoint "
                                     "(was it written by a Snapshotter rather than ShardkeepWriter?)")
            bodies[rank] = body
        self.bodies = bodies
        metas = [b["metadata"] for b in bodies.values() if "metadata" in b]
        if len(metas) != 1:
            raise IntegrityError(f"job {self.job!r} step {v.step}: {len(metas)} ranks hold DCP's metadata")
        md = decode_metadata(metas[0])
        storage: dict[MetadataIndex, StoredAt] = {}
        for rank, body in bodies.items():
            for i, (fqn, offsets, _ref) in enumerate(body["tensors"]):
                storage[MetadataIndex(fqn, offsets or None)] = StoredAt(rank, i)
            for i, (fqn, _v) in enumerate(body["bytes"]):
                storage[MetadataIndex(fqn)] = StoredAt(rank, i, "bytes")
        md.storage_data = storage
        self.metadata = md
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.metadata is None:
            self.read_metadata()

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        assert self.metadata is not None
        by_rank: dict[int, list] = {}
        for item in plan.items:
            where = self.metadata.storage_data.get(item.storage_index)
            if where is None:
                raise NotFoundError(f"DCP item {item.storage_index.fqn!r} (offset {item.storage_index.offset}) is "
                                    f"in no rank of job {self.job!r} step {self.step}")
            by_rank.setdefault(where.rank, []).append((item, where))
        for rank, items in sorted(by_rank.items()):
            body = self.bodies[rank]
            need = {body["tensors"][w.item][2].index for _, w in items if w.kind == "tensor"}
            with self.version.open(rank, need) as views:
                for item, where in items:
                    if item.type == LoadItemType.BYTE_IO:
                        if where.kind != "bytes":
                            raise IntegrityError(f"DCP item {item.storage_index.fqn!r} is stored as a tensor")
                        _set_value(planner, item, body["bytes"][where.item][1])
                        continue
                    if where.kind != "tensor":
                        raise IntegrityError(f"DCP item {item.storage_index.fqn!r} is stored as a value")
                    src = views[body["tensors"][where.item][2].index]
                    for dim, (off, n) in enumerate(zip(item.storage_offsets, item.lengths)):
                        if off != 0 or n != src.size(dim):
                            src = src.narrow(dim, off, n)
                    target = planner.resolve_tensor(item).detach()
                    if target.size() != src.size():
                        raise IntegrityError(f"DCP item {item.storage_index.fqn!r}: stored chunk {tuple(src.size())} "
                                             f"for a target of {tuple(target.size())}")
                    target.copy_(src)
                    planner.commit_tensor(item, target)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def close(self) -> None:
        self.version.close()

    def __enter__(self) -> "ShardkeepReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


