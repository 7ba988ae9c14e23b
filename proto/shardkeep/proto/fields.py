"""Validators for fields of messages from outside (shared by the client and the peer protocols).

Each validator is ``check(name, value) -> value`` and raises ``ProtocolError``
naming the field; booleans never pass as integers.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from .errors import ProtocolError
from .layout import check_job_id

Check = Callable[[str, Any], Any]


def int_range(lo: int, hi: int) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ProtocolError(f"field {name!r} must be an integer in [{lo}, {hi}], got {v!r}")
        return v

    return check


def str_max(maxlen: int) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if not isinstance(v, str) or len(v) > maxlen:
            raise ProtocolError(f"field {name!r} must be a string of at most {maxlen} characters")
        return v

    return check


def one_of(*values: str) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if v not in values or not isinstance(v, str):
            raise ProtocolError(f"field {name!r} must be one of {list(values)}, got {v!r}")
        return v

    return check


def bytes_of(n: int) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if not isinstance(v, bytes) or len(v) != n:
            raise ProtocolError(f"field {name!r} must be {n} bytes")
        return v

    return check


def list_of(item: Callable[[str, Any], Any], maxlen: int) -> Callable[[str, Any], Any]:
    def check(name: str, v: Any) -> Any:
        if not isinstance(v, list) or len(v) > maxlen:
            raise ProtocolError(f"field {name!r} must be a list of at most {maxlen} items")
        return [item(f"{name}[{i}]", x) for i, x in enumerate(v)]

    return check


def boolean(name: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ProtocolError(f"field {name!r} must be a boolean, got {v!r}")
    return v


def non_negative(name: str, v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ProtocolError(f"field {name!r} must be a finite non-negative number, got {v!r}")
    return v


def job_id(name: str, v: Any) -> Any:
    return check_job_id(v)
