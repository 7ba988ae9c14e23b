"""Sharding of replicated state across data-parallel replicas (REFT's sharded caching).

With ``Snapshotter(dp_shard=True)``, ``flatten`` keeps on each rank only its
1/DP byte range of the concatenated tensors of modules and optimizers (the same
on every replica under data parallelism) and leaves a ``dpshard`` node in the
skeleton for each such tensor. ``gather`` puts them back at restore: every rank
copies its ranges out of shared memory into one buffer, one ``all_gather`` over
the data-parallel group fills the rest, and each node becomes an ordinary
tensor view for the restorer.
"""

from __future__ import annotations

from typing import Any

import torch

from shardkeep.proto.errors import IntegrityError
from shardkeep.proto.leaves import TensorRef

from .flatten import TAG


def _nodes(obj: Any, out: list) -> list:
    if isinstance(obj, dict):
        if obj.get(TAG) == "dpshard":
            out.append(obj)
            return out
        for v in obj.values():
            _nodes(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _nodes(v, out)
    return out


def has_shards(skeleton: Any) -> bool:
    return bool(_nodes(skeleton, []))


def gather(skeleton: Any, views: list[torch.Tensor], group: Any, device: torch.device, dtype_of) -> Any:
    """The skeleton with every ``dpshard`` node replaced by a TensorRef to a whole tensor (appended to
    ``views``). Collective over ``group``: every rank of it calls this with the same version."""
    import torch.distributed as dist

    nodes = sorted(_nodes(skeleton, []), key=lambda n: n["goff"])
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    saved = {tuple(n.get("dp", ())) for n in nodes}
    if saved != {(rank, size)}:
        raise IntegrityError(f"the version was saved with dp_shard as replica/replicas {sorted(saved)}; this rank "
                             f"is replica {rank} of {size}: restore with the same data-parallel layout")
    total = sum(n["nbytes"] for n in nodes)
    per = -(-total // size)
    buf = torch.zeros(per * size, dtype=torch.uint8)
    for n in nodes:
        if n["part"] is not None:
            a, b = n["goff"] + n["lo"], n["goff"] + n["hi"]
            if not rank * per <= a <= b <= (rank + 1) * per:
                raise IntegrityError(f"a slice of bytes {a}..{b} is outside replica {rank}'s range")
            buf[a:b].copy_(views[n["part"].index])
    mine = buf[rank * per : (rank + 1) * per].to(device)
    outs = [torch.empty(per, dtype=torch.uint8, device=device) for _ in range(size)]
    dist.all_gather(outs, mine, group=group)
    for r, o in enumerate(outs):
        if r != rank:
            buf[r * per : (r + 1) * per].copy_(o)
    index: dict[int, int] = {}
    for n in nodes:
        whole = buf[n["goff"] : n["goff"] + n["nbytes"]]
        index[id(n)] = len(views)
        dt = dtype_of(n["dtype"])
        views.append(whole.view(dt).view(n["shape"]) if n["nbytes"] else torch.empty(n["shape"], dtype=dt))

    return replace(skeleton, index)


def replace(skeleton: Any, index: dict[int, int]) -> Any:
    """The skeleton with each ``dpshard`` node (by id) replaced by ``TensorRef(index[id(node)])``."""
    def swap(obj: Any) -> Any:
        if isinstance(obj, dict):
            if obj.get(TAG) == "dpshard":
                return TensorRef(index[id(obj)])
            return {k: swap(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [swap(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(swap(v) for v in obj)
        return obj

    return swap(skeleton)
