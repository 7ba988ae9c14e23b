"""Stripe placement for a group of ``n`` nodes with ``m`` parity (pure logic, no I/O).

Stripe ``s`` (0..n-1) has parity holders ``P(s) = s, s+1, .., s+m-1 (mod n)`` and
the other ``k = n - m`` nodes as data holders, in the order ``s+m, .., s+n-1``
(mod n); a data holder's position in that order is its fragment index in the
stripe.  Each node is a data holder in exactly ``k`` stripes and cuts its
payload into ``k`` chunks, chunk ``c`` going to the ``c``-th of those stripes
(ascending).  Each node holds parity for exactly ``m`` stripes, so parity is
balanced, and any ``m`` lost nodes leave every stripe ``k`` fragments.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class Placement:
    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 1 <= self.m < self.n):
            raise ValueError(f"a group needs 1 <= parity < nodes; got nodes={self.n}, parity={self.m}")

    @property
    def k(self) -> int:
        return self.n - self.m

    def parity_holders(self, s: int) -> list[int]:
        return [(s + j) % self.n for j in range(self.m)]

    def data_holders(self, s: int) -> list[int]:
        return [(s + self.m + j) % self.n for j in range(self.k)]

    @cached_property
    def _data_stripes(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n)]
        for s in range(self.n):
            for node in self.data_holders(s):
                out[node].append(s)
        return out

    def data_stripes(self, node: int) -> list[int]:
        """The k stripes in which ``node`` is a data holder; chunk c of its payload goes to the c-th."""
        return self._data_stripes[node]

    def parity_stripes(self, node: int) -> list[tuple[int, int]]:
        """(stripe, parity index) pairs for which ``node`` holds parity."""
        return [(s, j) for s in range(self.n) for j, p in enumerate(self.parity_holders(s)) if p == node]

    def data_index(self, s: int, node: int) -> int:
        return self.data_holders(s).index(node)

    def chunk_of(self, node: int, s: int) -> int:
        return self.data_stripes(node).index(s)

    def holder_of(self, s: int, index: int) -> int:
        """The node holding fragment ``index`` of stripe ``s`` (0..k-1 data, k..k+m-1 parity)."""
        return self.data_holders(s)[index] if index < self.k else self.parity_holders(s)[index - self.k]

    def encoder(self, s: int) -> int:
        """The first parity holder gathers the stripe's data chunks and encodes."""
        return s % self.n

    def recoverable(self, lost: set[int]) -> bool:
        return all(
            sum(1 for i in range(self.n) if self.holder_of(s, i) not in lost) >= self.k for s in range(self.n)
        )


def chunk_bounds(size: int, k: int) -> list[tuple[int, int]]:
    """Cut ``size`` bytes into ``k`` consecutive chunks of at most ceil(size/k) bytes (some may be empty)."""
    if size < 0 or k < 1:
        raise ValueError("size must be >= 0 and k >= 1")
    step = -(-size // k) if size else 0
    return [(min(c * step, size), min((c + 1) * step, size)) for c in range(k)]


def stripe_chunk_len(p: Placement, s: int, sizes: dict[int, int]) -> int:
    """Length of stripe ``s``'s chunks: the largest data chunk any of its data holders sends."""
    longest = 0
    for node in p.data_holders(s):
        a, b = chunk_bounds(sizes.get(node, 0), p.k)[p.chunk_of(node, s)]
        longest = max(longest, b - a)
    return longest
