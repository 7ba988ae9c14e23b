"""The parity record a node keeps in /dev/shm: round trip, and every damaged record refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from shardkeep.daemon.groupmeta import ParityRecord
from shardkeep.proto.errors import IntegrityError


def record(**kw) -> ParityRecord:
    base = dict(job="job-1", step=7, node=1, n=4, m=2, parity="skx-g-parity-job-1-7-abc",
                layout={1: (0, 8192), 2: (8192, 4096)}, headers={1: b"h" * 160, 2: b"k" * 80},
                sizes={0: 10, 1: 0, 2: 12345, 3: 1}, manifests={0: b"a", 1: b"", 2: b"c", 3: b"d" * 1000})
    base.update(kw)
    return ParityRecord(**base)


def test_round_trip():
    r = record()
    assert ParityRecord.decode(r.encode()) == r
    assert r.parity_bytes() == 12288


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_any_flipped_or_truncated_byte_is_refused(data):
    buf = bytearray(record().encode())
    if data.draw(st.booleans()):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    else:
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    with pytest.raises(IntegrityError):
        ParityRecord.decode(bytes(buf))


@pytest.mark.parametrize("bad", [
    dict(parity="../../etc/passwd"), dict(parity=".hidden"), dict(node=4), dict(job="a/b"),
    dict(sizes={0: 1, 1: 2}), dict(headers={1: b"x"}), dict(layout={1: (0, 8192), 2: (4096, 4096)}),
    dict(step=-1),
])
def test_inconsistent_or_hostile_records_are_refused(bad):
    with pytest.raises(IntegrityError):
        ParityRecord.decode(record(**bad).encode())
