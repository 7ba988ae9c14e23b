"""The copy's checksums: inline, or split across hashing threads, they are the manifest's chunk sums."""

from __future__ import annotations

import concurrent.futures
import random

import pytest

from shardkeep.client.copier import JOB, ChunkHasher, default_hash_threads
from shardkeep.proto.manifest import checksum


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_chunk_sums_do_not_depend_on_threads_or_on_how_far_each_advance_goes(threads):
    rnd = random.Random(threads)
    nbytes = 2 * JOB + 12345  # several jobs per advance, a short last chunk
    data = memoryview(bytearray(rnd.randbytes(nbytes)))
    chunk = 1 << 20
    want = [checksum(data[a : min(a + chunk, nbytes)]) for a in range(0, nbytes, chunk)]
    pool = concurrent.futures.ThreadPoolExecutor(threads) if threads else None
    try:
        h = ChunkHasher(data, nbytes, chunk, pool)
        pos = 0
        while pos < nbytes:  # uneven advances, some inside a chunk, some over many chunks
            pos = min(nbytes, pos + rnd.choice([1, 777, chunk - 1, 3 * chunk + 5, JOB + chunk]))
            h.advance(pos)
        assert h.finish() == want
    finally:
        if pool:
            pool.shutdown()


def test_hash_threads_follow_the_cores_each_rank_has(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert default_hash_threads(1) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert default_hash_threads(1) == 4
    assert default_hash_threads(4) == 1
    assert default_hash_threads(8) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 224)
    assert default_hash_threads(8) == 4
