"""Turn a training state tree into tensors + a skeleton, and put it back.

``state`` may hold tensors, ``Stateful`` objects (``nn.Module``, ``Optimizer``,
schedulers, loaders, anything with ``state_dict``/``load_state_dict``), leaves
(None, bool, int, float, str, bytes, numpy arrays) and dicts, lists and tuples
of these.  The skeleton is the same tree with each tensor replaced by a
``TensorRef`` and each Stateful by a tagged map holding its ``state_dict()``.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from shardkeep.proto.layout import DTYPE_ITEMSIZE
from shardkeep.proto.leaves import NDArrayLeaf, TensorRef, UnsupportedLeaf

try:
    import numpy as np
except ImportError:
    np = None  # type: ignore[assignment]

TAG = "__shardkeep__"
RNG_KEY = "__shardkeep_rng__"


def _dtensor_type() -> Any:
    """DTensor's class if the program has imported it (a state can hold DTensors only then), else None."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes are this rank's: a DTensor's local shard, else ``t`` itself."""
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def _placements_to_wire(t: Any, path: str) -> list:
    from torch.distributed.tensor import Partial, Replicate, Shard

    out = []
    for p in t.placements:
        if type(p) is Shard:
            out.append(["S", p.dim])
        elif type(p) is Replicate:
            out.append(["R"])
        elif type(p) is Partial:
            out.append(["P", str(p.reduce_op)])
        else:
            raise TypeError(f"state[{path}]: a DTensor placement {p!r} is not supported (Shard, Replicate, Partial)")
    return out


def _placements_from_wire(w: list) -> list:
    from torch.distributed.tensor import Partial, Replicate, Shard

    return [Shard(int(p[1])) if p[0] == "S" else Replicate() if p[0] == "R" else Partial(str(p[1])) for p in w]


def mesh_key(mesh: Any) -> tuple:
    """What identifies a device mesh across a restart: its device type and its ranks in shape."""
    return (mesh.device_type, tuple(mesh.mesh.shape), tuple(mesh.mesh.flatten().tolist()))


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


DTYPE_NAMES: dict[torch.dtype, str] = {
    getattr(torch, n): n for n in DTYPE_ITEMSIZE if isinstance(getattr(torch, n, None), torch.dtype)
}


def dtype_name(t: torch.Tensor, path: str) -> str:
    name = DTYPE_NAMES.get(t.dtype)
    if name is None:
        raise TypeError(f"state[{path}]: dtype {t.dtype} is not supported")
    return name


@dataclass
class Flat:
    tensors: list[torch.Tensor] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    late: list[bool] = field(default_factory=list)     # changed by optimizer.step (params, optim state)
    private: list[bool] = field(default_factory=list)  # our own copies (RNG state): nobody waits for them
    skeleton: Any = None
    modules: list[torch.nn.Module] = field(default_factory=list)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)
    _seen: dict[tuple, int] = field(default_factory=dict)
    _late_ptrs: set[int] = field(default_factory=set)

    shard: tuple[int, int] | None = None   # (rank, size) in the data-parallel group with dp_shard=True
    replicated: list = field(default_factory=list)  # (skeleton node, tensor, path) awaiting their slice
    _in_replica: bool = False              # walking a Module's or Optimizer's state (replicated under DP)

    def add_tensor(self, t: torch.Tensor, path: str, late_ptr: int | None = None) -> TensorRef:
        # this runs on the training thread for every tensor of every snapshot: keep it lean
        if t.layout is not torch.strided:
            raise TypeError(f"state[{path}]: {t.layout} tensors are not supported; densify them first")
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"state[{path}]: dtype {t.dtype} is not supported")
        if t.is_meta:
            raise TypeError(f"state[{path}]: meta tensors hold no data")
        ptr = t.data_ptr()
        key = (ptr, t.get_device(), t.dtype, t.shape, t.stride())
        idx = self._seen.get(key) if ptr else None
        if idx is None:  # tied weights and repeated views are stored once
            idx = len(self.tensors)
            self._seen[key] = idx
            self.tensors.append(t)
            self.names.append(path)
            self.late.append((ptr if late_ptr is None else late_ptr) in self._late_ptrs)
            self.private.append(self._private)
        return TensorRef(idx)

    _private: bool = False

    def param_names(self, opt: torch.optim.Optimizer) -> list[str] | None:
        """The canonical name of each of ``opt``'s parameters, in ``opt.state_dict()``'s index order, from
        the modules in the same state; None if one is in none of them."""
        sig = (tuple(len(g["params"]) for g in opt.param_groups), tuple(id(m) for m in self.modules))
        hit = _PARAM_NAMES.get(opt)
        if hit is not None and hit[0] == sig:
            return hit[1]
        names: dict[int, str] = {}
        for m in self.modules:
            wr = wrapper_paths(m)
            for n, p in m.named_parameters():
                names.setdefault(id(p), canonical_key(n, wr))
        out: list[str] | None = []
        for g in opt.param_groups:
            for p in g["params"]:
                n = names.get(id(p))
                if n is None:
                    out = None
                    break
                out.append(n)
            if out is None:
                break
        _PARAM_NAMES[opt] = (sig, out)
        return out


# --- canonical names: what torch.distributed.checkpoint.state_dict.get_state_dict calls things ---------------

_PARAM_NAMES: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()
_WRAPPERS: "weakref.WeakKeyDictionary[torch.nn.Module, list[str]]" = weakref.WeakKeyDictionary()


def wrapper_paths(root: torch.nn.Module) -> list[str]:
    """Dotted paths, in ``root.state_dict()`` keys, of the wrapper segments that ``get_state_dict`` leaves
    out of its names: DDP's ``module``, torch.compile's ``_orig_mod``, activation checkpointing's
    ``_checkpoint_wrapped_module``; deepest first.  Cached per module."""
    hit = _WRAPPERS.get(root)
    if hit is not None:
        return hit
    from torch.nn.parallel import DistributedDataParallel

    out: list[str] = []
    todo: list[tuple[torch.nn.Module, str]] = [(root, "")]
    while todo:
        m, prefix = todo.pop()
        for name, child in m.named_children():
            path = f"{prefix}{name}"
            if ((name == "module" and isinstance(m, DistributedDataParallel))
                    or (name == "_orig_mod" and type(m).__name__ == "OptimizedModule")
                    or name == "_checkpoint_wrapped_module"):
                out.append(path)
            todo.append((child, path + "."))
    out.sort(key=lambda w: -w.count("."))
    _WRAPPERS[root] = out
    return out


def canonical_key(key: str, wrappers: list[str]) -> str:
    """``key`` without the wrapper segments ``wrappers`` (deepest first) names."""
    for w in wrappers:
        if key.startswith(w + "."):
            head, _, _ = w.rpartition(".")
            key = (head + "." if head else "") + key[len(w) + 1:]
    return key


def flatten(state: dict, rng_state: dict | None, shard: tuple[int, int] | None = None) -> Flat:
    """``shard`` = (rank, size) of a data-parallel group: each rank keeps only its 1/size slice of the
    tensors of modules and optimizers (identical on every replica), REFT-style; the rest whole."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of named objects, got {type(state).__name__}")
    flat = Flat(shard=shard)
    _collect_hooks(state, flat, set())
    # optimizer.step() changes the parameters it owns and its own state; forward changes the rest
    for o in flat.optimizers:
        for g in o.param_groups:
            flat._late_ptrs.update(local_tensor(p).data_ptr() for p in g["params"])
        for st in o.state.values():
            if isinstance(st, dict):
                flat._late_ptrs.update(local_tensor(v).data_ptr() for v in st.values() if isinstance(v, torch.Tensor))
    root = {k: _walk(v, flat, _key(k)) for k, v in state.items()}
    if rng_state is not None:
        flat._private = True
        root[RNG_KEY] = _walk(rng_state, flat, RNG_KEY)
        flat._private = False
    flat.skeleton = root
    if flat.replicated:
        _assign_slices(flat)
    return flat


def _assign_slices(flat: Flat) -> None:
    """Cut the concatenated bytes of the replicated tensors into ``size`` equal ranges; keep ours."""
    assert flat.shard is not None
    rank, size = flat.shard
    total = sum(node["nbytes"] for node, _, _ in flat.replicated)
    per = -(-total // size)
    lo_r, hi_r = rank * per, min(total, (rank + 1) * per)
    g = 0
    for node, t, path in flat.replicated:
        n = node["nbytes"]
        lo, hi = max(lo_r, g) - g, min(hi_r, g + n) - g
        node["goff"] = g
        node["dp"] = [rank, size]
        if hi > lo:
            src = t.detach()
            base = src.data_ptr()
            if not src.is_contiguous():
                src = src.contiguous()  # a copy, now: the slice must be one range of bytes
            part = src.reshape(-1).view(torch.uint8)[lo:hi]
            node["lo"], node["hi"], node["part"] = lo, hi, flat.add_tensor(part, path, late_ptr=base)
        else:
            node["lo"] = node["hi"] = 0
            node["part"] = None
        g += n


def _key(k: Any) -> str:
    return k if isinstance(k, str) else repr(k)


def _collect_hooks(obj: Any, flat: Flat, seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        flat.modules.append(obj)
    elif isinstance(obj, torch.optim.Optimizer):
        flat.optimizers.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_hooks(v, flat, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_hooks(v, flat, seen)


_PLAIN = frozenset({type(None), bool, int, float, str, bytes})


def _walk(obj: Any, flat: Flat, path: str) -> Any:
    tp = type(obj)
    if tp in _PLAIN:
        return obj
    if isinstance(obj, torch.Tensor):
        if flat._in_replica and flat.shard is not None and obj.layout is torch.strided and not obj.is_meta:
            dt = _dtensor_type()
            if dt is None or not isinstance(obj, dt):  # a DTensor is sharded already
                node = {TAG: "dpshard", "dtype": dtype_name(obj, path), "shape": list(obj.shape),
                        "nbytes": obj.numel() * obj.element_size()}
                flat.replicated.append((node, obj, path))
                return node
        dt = _dtensor_type()
        if dt is not None and isinstance(obj, dt):  # this rank's shard; mesh and placements to rebuild it
            return {TAG: "dtensor", "local": flat.add_tensor(obj.to_local(), path), "shape": list(obj.shape),
                    "stride": list(obj.stride()), "placements": _placements_to_wire(obj, path),
                    "mesh": list(mesh_key(obj.device_mesh)[1:])}
        return flat.add_tensor(obj, path)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, NDArrayLeaf)):
        return obj
    if isinstance(obj, dict):
        return {k: _walk(v, flat, f"{path}.{_key(k)}") for k, v in obj.items()}
    if tp is tuple or tp is list:
        # fast path (e.g. random.getstate(): 625 ints): a copy now, since lists may change later
        if all(type(v) in _PLAIN for v in obj):
            return obj if tp is tuple else list(obj)
    if isinstance(obj, list):
        return [_walk(v, flat, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(_walk(v, flat, f"{path}.{i}") for i, v in enumerate(obj))
    if is_stateful(obj):
        outer = flat._in_replica
        flat._in_replica = outer or isinstance(obj, (torch.nn.Module, torch.optim.Optimizer))
        try:
            node = {TAG: "stateful", "type": type(obj).__qualname__, "state": _walk(obj.state_dict(), flat, path)}
        finally:
            flat._in_replica = outer
        # the names get_state_dict would give (the persist tier and export write them; restore ignores them)
        if isinstance(obj, torch.optim.Optimizer):
            names = flat.param_names(obj)
            if names:
                node["fqns"] = names
        elif isinstance(obj, torch.nn.Module):
            wr = wrapper_paths(obj)
            if wr:
                node["wrappers"] = wr
        return node
    if isinstance(obj, torch.Generator):  # e.g. a DataLoader's own generator=
        if obj.device.type != "cpu":
            raise TypeError(f"state[{path}]: only CPU torch.Generator objects are supported")
        return {TAG: "generator", "state": flat.add_tensor(obj.get_state(), path)}
    if np is not None:
        if isinstance(obj, np.ndarray):  # by value, now: the array may change after snapshot() returns
            if obj.dtype.kind not in "biufc" or obj.dtype.hasobject:
                raise TypeError(f"state[{path}]: numpy arrays of dtype {obj.dtype} are not supported")
            a = np.ascontiguousarray(obj)
            return NDArrayLeaf(a.dtype.str, tuple(a.shape), a.tobytes())
        if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
            return obj.item()
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    raise UnsupportedLeaf(path, obj)


# --- restore --------------------------------------------------------------------


class Restorer:
    """Put a saved skeleton back into the user's objects, in place where shapes allow."""

    def __init__(self, views: list[torch.Tensor], meshes: dict | None = None) -> None:
        self.views = views  # shm views, valid only until the version is released
        self.meshes = meshes or {}  # mesh_key -> DeviceMesh of the DTensors in the state restored into

    def _dtensor(self, saved: dict, local: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor

        want = tuple(saved["mesh"][0]), tuple(saved["mesh"][1])
        mesh = next((m for k, m in self.meshes.items() if k[1:] == want), None)
        if mesh is None:
            raise ValueError(f"a DTensor was saved on a device mesh of shape {list(want[0])} over ranks "
                             f"{list(want[1])}, and the state restored into has no DTensor on such a mesh")
        return DTensor.from_local(local, mesh, _placements_from_wire(saved["placements"]), run_check=False,
                                  shape=torch.Size(saved["shape"]), stride=tuple(saved["stride"]))

    def owned(self, saved: Any, like: Any = None) -> Any:
        """A value the user may keep: tensors are copied out of shm."""
        if isinstance(saved, dict) and saved.get(TAG) == "dtensor":
            dt = _dtensor_type()
            if dt is not None and isinstance(like, dt):  # in place into the rank's shard
                loc = like.to_local()
                v = self.views[saved["local"].index]
                if loc.shape == v.shape and loc.dtype == v.dtype and list(like.shape) == list(saved["shape"]):
                    with torch.no_grad():
                        loc.copy_(v)
                    return like
            return self._dtensor(saved, self.owned(saved["local"]))
        if isinstance(saved, TensorRef):
            v = self.views[saved.index]
            if isinstance(like, torch.Tensor) and like.shape == v.shape and like.dtype == v.dtype and not _overlapping(like):
                with torch.no_grad():
                    like.copy_(v)
                return like
            out = v.clone()
            if isinstance(like, torch.Tensor) and like.device != out.device:
                out = out.to(like.device)
            return out
        if isinstance(saved, NDArrayLeaf):
            if np is None:
                raise RuntimeError("numpy is needed to restore a numpy array")
            return np.frombuffer(saved.data, dtype=np.dtype(saved.dtype)).reshape(saved.shape).copy()
        if isinstance(saved, dict):
            if saved.get(TAG) == "stateful":
                return self.owned(saved["state"], like)
            likes = like if isinstance(like, dict) else {}
            return {k: self.owned(v, likes.get(k)) for k, v in saved.items()}
        if isinstance(saved, (list, tuple)):
            likes = like if isinstance(like, (list, tuple)) and len(like) == len(saved) else [None] * len(saved)
            out = [self.owned(v, l) for v, l in zip(saved, likes)]
            return tuple(out) if isinstance(saved, tuple) else out
        return saved

    def borrowed(self, saved: Any) -> Any:
        """A value only read during a call (module.load_state_dict copies): shm views."""
        if isinstance(saved, TensorRef):
            return self.views[saved.index]
        if isinstance(saved, dict) and saved.get(TAG) == "dtensor":
            return self._dtensor(saved, self.views[saved["local"].index])
        if isinstance(saved, dict):
            return {k: self.borrowed(v) for k, v in saved.items()}
        if isinstance(saved, (list, tuple)):
            out = [self.borrowed(v) for v in saved]
            return tuple(out) if isinstance(saved, tuple) else out
        return self.owned(saved)

    def into(self, container: Any, key: Any, saved: Any, path: str) -> None:
        present = key in container if isinstance(container, dict) else key < len(container)
        cur = container[key] if present else None
        if present and is_stateful(cur) and not isinstance(cur, (dict, list, tuple, torch.Tensor)):
            if not (isinstance(saved, dict) and saved.get(TAG) == "stateful"):
                raise ValueError(f"state[{path}] is a {type(cur).__name__} but the snapshot holds a plain value there")
            if isinstance(cur, torch.nn.Module):
                cur.load_state_dict(self.borrowed(saved["state"]))
            else:
                cur.load_state_dict(self.owned(saved["state"], like=_current_state(cur)))
            return
        if isinstance(saved, dict) and saved.get(TAG) == "generator":
            if not isinstance(cur, torch.Generator):
                raise ValueError(f"state[{path}] was saved from a torch.Generator but is now {type(cur).__name__}")
            cur.set_state(self.owned(saved["state"]))
            return
        if isinstance(saved, dict) and saved.get(TAG) == "stateful":
            raise ValueError(
                f"state[{path}] was saved from a {saved.get('type')} (state_dict/load_state_dict) "
                f"but is now {type(cur).__name__}; pass the same kind of object to restore()"
            )
        if isinstance(saved, dict) and saved.get(TAG) == "dtensor":
            container[key] = self.owned(saved, cur)
            return
        if isinstance(cur, torch.Tensor) and isinstance(saved, TensorRef):
            v = self.views[saved.index]
            if cur.shape == v.shape and cur.dtype == v.dtype and not _overlapping(cur):
                with torch.no_grad():
                    cur.copy_(v)
                return
        elif isinstance(cur, dict) and isinstance(saved, dict):
            for k, v in saved.items():
                self.into(cur, k, v, f"{path}.{_key(k)}")
            return
        elif isinstance(cur, list) and isinstance(saved, list) and len(cur) == len(saved):
            for i, v in enumerate(saved):
                self.into(cur, i, v, f"{path}.{i}")
            return
        elif isinstance(cur, tuple) and isinstance(saved, tuple) and len(cur) == len(saved):
            tmp = list(cur)
            for i, v in enumerate(saved):
                self.into(tmp, i, v, f"{path}.{i}")
            container[key] = tuple(tmp)
            return
        if isinstance(container, tuple):
            raise ValueError(f"cannot assign into a tuple at state[{path}]")
        if present or isinstance(container, dict):
            container[key] = self.owned(saved, cur)
        else:
            raise ValueError(f"state[{path}]: the list is shorter than the snapshot's")


def meshes_in(state: Any) -> dict:
    """The device meshes of the DTensors in ``state`` (module parameters and buffers, optimizer parameters and
    state, tensors in dicts and lists), by ``mesh_key``; empty when the program uses no DTensor."""
    dt = _dtensor_type()
    out: dict = {}
    if dt is None:
        return out
    seen: set[int] = set()

    def visit(obj: Any) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, dt):
            out.setdefault(mesh_key(obj.device_mesh), obj.device_mesh)
        elif isinstance(obj, torch.nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                visit(t)
        elif isinstance(obj, torch.optim.Optimizer):
            for g in obj.param_groups:
                for p in g["params"]:
                    visit(p)
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    visit(state)
    return out


def _current_state(obj: Any) -> Any:
    try:
        return obj.state_dict()
    except Exception:
        return None


def _overlapping(t: torch.Tensor) -> bool:
    """Expanded tensors (a stride of 0) cannot be written element by element."""
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape))
