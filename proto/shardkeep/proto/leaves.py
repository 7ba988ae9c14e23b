"""Typed msgpack codec for the non-tensor part of a state tree.

The client flattens a state tree into its tensors and a *skeleton*: the same
tree with every tensor replaced by a :class:`TensorRef`.  The skeleton holds
only leaves (None, bool, int, float, str, bytes), dicts, lists, tuples,
tensor references and numpy arrays, and travels in this codec.  Tuples stay
tuples, dict keys keep their types, integers of any size survive.  Nothing is
ever pickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import ProtocolError

EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_BIGINT = 3
EXT_NDARRAY = 4

MAX_SKELETON_BYTES = 256 << 20


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Placeholder for the ``index``-th tensor of a version's tensor table."""

    index: int


@dataclass(frozen=True, slots=True)
class NDArrayLeaf:
    """A numpy array by value: ``dtype`` is numpy's ``dtype.str`` (e.g. ``<f4``)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


class UnsupportedLeaf(TypeError):
    def __init__(self, path: str, value: Any) -> None:
        super().__init__(
            f"state[{path}] is a {type(value).__module__}.{type(value).__qualname__}; "
            "shardkeep stores tensors, objects with state_dict()/load_state_dict(), "
            "None/bool/int/float/str/bytes, numpy arrays, and dicts/lists/tuples of these"
        )
        self.path = path


def _default(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return msgpack.ExtType(EXT_TUPLE, _packb(list(obj)))
    if isinstance(obj, TensorRef):
        return msgpack.ExtType(EXT_TENSOR, msgpack.packb(obj.index))
    if isinstance(obj, NDArrayLeaf):
        return msgpack.ExtType(EXT_NDARRAY, msgpack.packb([obj.dtype, list(obj.shape), obj.data]))
    if isinstance(obj, int) and not isinstance(obj, bool):
        if -(1 << 63) <= obj < (1 << 64):
            return int(obj)  # an int subclass (IntEnum): plain int
        return msgpack.ExtType(EXT_BIGINT, str(obj).encode())
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, dict):
        return dict(obj)  # OrderedDict, defaultdict: their items, as a dict
    if isinstance(obj, list):
        return list(obj)
    raise UnsupportedLeaf("?", obj)


def _packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_default, strict_types=True, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_TUPLE:
        items = unpack_skeleton(data)
        if not isinstance(items, list):
            raise ProtocolError("tuple payload is not a list")
        return tuple(items)
    if code == EXT_TENSOR:
        idx = msgpack.unpackb(data)
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ProtocolError("bad tensor reference")
        return TensorRef(idx)
    if code == EXT_BIGINT:
        text = data.decode("ascii", "strict")
        if not text.lstrip("-").isdigit() or len(text) > 4300:
            raise ProtocolError("bad big integer")
        return int(text)
    if code == EXT_NDARRAY:
        dtype, shape, buf = msgpack.unpackb(data)
        if not isinstance(dtype, str) or not isinstance(shape, list) or not isinstance(buf, bytes):
            raise ProtocolError("bad ndarray leaf")
        return NDArrayLeaf(dtype, tuple(shape), buf)
    raise ProtocolError(f"unknown leaf extension type {code}")


def pack_skeleton(tree: Any) -> bytes:
    """Encode a skeleton; raise ``UnsupportedLeaf`` for anything not listed above."""
    try:
        out = _packb(tree)
    except UnsupportedLeaf:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"cannot encode state: {exc}") from None
    if len(out) > MAX_SKELETON_BYTES:
        raise ValueError(f"non-tensor state is {len(out)} bytes; the limit is {MAX_SKELETON_BYTES}")
    return out


def unpack_skeleton(data: bytes | memoryview) -> Any:
    """Decode bytes from shm or the wire; every failure is a ``ProtocolError``."""
    if len(data) > MAX_SKELETON_BYTES:
        raise ProtocolError("skeleton too large")
    try:
        return msgpack.unpackb(
            data, ext_hook=_ext_hook, strict_map_key=False, raw=False, use_list=True
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises many types on garbage
        raise ProtocolError(f"cannot decode non-tensor state: {type(exc).__name__}: {exc}") from None


def find_unsupported(tree: Any, path: str = "") -> None:
    """Walk a skeleton and raise ``UnsupportedLeaf`` naming the key of the first bad value."""
    if tree is None or isinstance(tree, (bool, int, float, str, bytes, TensorRef, NDArrayLeaf)):
        return
    if isinstance(tree, dict):
        for k, v in tree.items():
            if not (k is None or isinstance(k, (bool, int, float, str, bytes, tuple))):
                raise UnsupportedLeaf(f"{path}[{k!r}] (key)", k)
            find_unsupported(v, f"{path}[{k!r}]" if path else repr(k))
        return
    if isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            find_unsupported(v, f"{path}[{i}]")
        return
    raise UnsupportedLeaf(path or "<root>", tree)
