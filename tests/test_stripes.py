"""Stripe placement: exhaustive over every group of up to 12 nodes and 3 parity."""

from __future__ import annotations

import itertools
import random

import pytest

from shardkeep.daemon.stripes import Placement, chunk_bounds, stripe_chunk_len

GROUPS = [(n, m) for n in range(2, 13) for m in range(1, 4) if m < n]


@pytest.mark.parametrize("n,m", GROUPS)
def test_every_stripe_uses_every_node_once(n, m):
    p = Placement(n, m)
    for s in range(n):
        holders = p.parity_holders(s) + p.data_holders(s)
        assert sorted(holders) == list(range(n))
        assert [p.holder_of(s, i) for i in range(n)] == p.data_holders(s) + p.parity_holders(s)
        assert p.encoder(s) == p.parity_holders(s)[0]


@pytest.mark.parametrize("n,m", GROUPS)
def test_parity_and_data_are_balanced(n, m):
    p = Placement(n, m)
    for node in range(n):
        assert len(p.parity_stripes(node)) == m
        assert len(p.data_stripes(node)) == p.k
        assert sorted(p.data_stripes(node)) == p.data_stripes(node)
        for c, s in enumerate(p.data_stripes(node)):
            assert p.chunk_of(node, s) == c and p.data_holders(s)[p.data_index(s, node)] == node
    # each parity index is held once per stripe, and every stripe's parity is somewhere
    held = sorted((s, j) for node in range(n) for s, j in p.parity_stripes(node))
    assert held == [(s, j) for s in range(n) for j in range(m)]


@pytest.mark.parametrize("n,m", GROUPS)
def test_any_m_lost_nodes_are_recoverable_and_m_plus_1_are_not(n, m):
    p = Placement(n, m)
    for lost in itertools.combinations(range(n), m):
        assert p.recoverable(set(lost))
        # and every lost node's chunks and parity have k surviving fragments in their stripes
        for node in lost:
            for s in p.data_stripes(node) + [s for s, _ in p.parity_stripes(node)]:
                alive = [p.holder_of(s, i) for i in range(n) if p.holder_of(s, i) not in lost]
                assert len(alive) >= p.k
    if m + 1 < n:
        assert not any(p.recoverable(set(lost)) for lost in itertools.combinations(range(n), m + 1))


@pytest.mark.parametrize("size", [0, 1, 2, 3, 7, 1000, 1 << 20, (1 << 20) + 1, 123_456_789])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 11])
def test_chunk_bounds_cover_every_byte_once(size, k):
    b = chunk_bounds(size, k)
    assert len(b) == k and b[0][0] == 0 and b[-1][1] == size
    assert all(x[1] == y[0] for x, y in zip(b, b[1:]))
    assert all(0 <= e - s <= -(-size // k) for s, e in b)


def test_stripe_chunk_len_is_the_longest_chunk():
    p = Placement(4, 1)
    rnd = random.Random(0)
    sizes = {i: rnd.randrange(0, 10_000) for i in range(4)}
    for s in range(4):
        longest = max(
            (lambda a_b: a_b[1] - a_b[0])(chunk_bounds(sizes[node], 3)[p.chunk_of(node, s)])
            for node in p.data_holders(s)
        )
        assert stripe_chunk_len(p, s, sizes) == longest


@pytest.mark.parametrize("n,m", [(1, 1), (3, 0), (3, 3), (2, 5)])
def test_bad_groups_are_refused(n, m):
    with pytest.raises(ValueError):
        Placement(n, m)
