"""Capture and restore every random number generator a training step draws from."""

from __future__ import annotations

import random
from typing import Any

import torch

from shardkeep.proto.leaves import NDArrayLeaf

try:
    import numpy as np
except ImportError:  # numpy is optional for the client
    np = None  # type: ignore[assignment]


def capture() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    if np is not None:
        st = np.random.get_state(legacy=False)
        key = st["state"]["key"]
        out["numpy"] = {
            "bit_generator": st["bit_generator"],
            "key": NDArrayLeaf(key.dtype.str, tuple(key.shape), key.tobytes()),
            "pos": int(st["state"]["pos"]),
            "has_gauss": int(st["has_gauss"]),
            "gauss": float(st["gauss"]),
        }
    return out


def restore(saved: dict[str, Any]) -> None:
    if not isinstance(saved, dict):
        raise ValueError("saved RNG state is not a map")
    if "torch" in saved:
        torch.set_rng_state(saved["torch"].contiguous().clone())
    if "python" in saved:
        random.setstate(_tuples(saved["python"]))
    if "cuda" in saved and torch.cuda.is_available():
        states = saved["cuda"]
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.contiguous().clone(), i)
    if "numpy" in saved and np is not None:
        n = saved["numpy"]
        key = n["key"]
        arr = np.frombuffer(key.data, dtype=np.dtype(key.dtype)).reshape(key.shape).copy()
        np.random.set_state(
            {"bit_generator": n["bit_generator"], "state": {"key": arr, "pos": n["pos"]},
             "has_gauss": n["has_gauss"], "gauss": n["gauss"]}
        )


def _tuples(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    return x
