"""Pure protocol and format logic: no daemon, no torch."""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from shardkeep.proto import errors, wire
from shardkeep.proto.layout import ALIGN, DTYPE_ITEMSIZE, check_job_id, plan_layout, validate_entries
from shardkeep.proto.leaves import NDArrayLeaf, TensorRef, pack_skeleton, unpack_skeleton
from shardkeep.proto.manifest import Manifest, chunk_count
from shardkeep.proto.sizes import parse_size
from shardkeep.proto.slotfile import STATE_COMMITTED, SlotHeader, geometry


@pytest.mark.parametrize(
    "text,expected",
    [("4GB", 4 * 10**9), ("4GiB", 4 << 30), ("4G", 4 << 30), ("512MB", 512 * 10**6), ("1.5 GiB", 3 << 29),
     ("123", 123), (7, 7), ("64mb", 64 * 10**6)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "4XB", "-1", "GB", "1e3", True, -5])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("job", ["a", "job-1", "A.b_c-9", "x" * 128])
def test_job_ids_accepted(job):
    assert check_job_id(job) == job


@pytest.mark.parametrize("job", ["", "../etc", "a/b", "-x", ".hidden", "x" * 129, "a..b", "a b", 5, None])
def test_job_ids_refused(job):
    with pytest.raises(errors.ProtocolError):
        check_job_id(job)


def test_layout_is_aligned_ordered_and_covers_every_byte():
    specs = [("a", "float32", (3, 5)), ("b", "bfloat16", ()), ("c", "bool", (0,)), ("d", "complex64", (7,))]
    entries, size = plan_layout(specs, order=[3, 1, 0, 2])
    assert [e.name for e in entries] == ["a", "b", "c", "d"]
    assert entries[3].offset == 0  # placed first
    for e in entries:
        assert e.offset % ALIGN == 0
        assert e.nbytes == DTYPE_ITEMSIZE[e.dtype] * math.prod(e.shape)
    spans = sorted((e.offset, e.offset + e.nbytes) for e in entries if e.nbytes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert size >= spans[-1][1]
    assert validate_entries([e.to_wire() for e in entries], size) == entries


@pytest.mark.parametrize(
    "entry,why",
    [
        (["t", "float32", [4], 0, 15], "nbytes"),
        (["t", "object", [4], 0, 16], "dtype"),
        (["t", "float32", [4], 3, 16], "unaligned"),
        (["t", "float32", [4], 1 << 20, 16], "exceeds"),
        (["t", "float32", [-1], 0, 16], "shape"),
        (["t", "float32", "4", 0, 16], "shape"),
        ("nope", "entry"),
    ],
)
def test_validate_entries_refuses_bad_tables(entry, why):
    with pytest.raises(errors.ProtocolError):
        validate_entries([entry], 4096)


def test_validate_entries_refuses_overlap():
    with pytest.raises(errors.ProtocolError, match="overlaps"):
        validate_entries([["a", "float32", [128], 0, 512], ["b", "float32", [4], 256, 16]], 4096)


leaves = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(1 << 80), max_value=1 << 80)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
    | st.builds(TensorRef, st.integers(0, 1000)),
    lambda children: st.lists(children, max_size=4) | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(leaves)
def test_skeleton_round_trip_keeps_types(tree):
    back = unpack_skeleton(pack_skeleton(tree))
    assert back == tree
    assert _types(back) == _types(tree)


def _types(x):
    if isinstance(x, dict):
        return ("dict", sorted(((type(k).__name__, repr(k)), _types(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [_types(v) for v in x])
    return type(x).__name__


def test_ndarray_leaf_round_trip():
    leaf = NDArrayLeaf("<u4", (2, 3), bytes(range(24)))
    assert unpack_skeleton(pack_skeleton({"k": leaf})) == {"k": leaf}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_skeleton_garbage_is_a_protocol_error_or_a_value(data):
    try:
        unpack_skeleton(data)
    except errors.ProtocolError:
        pass


def test_skeleton_refuses_objects_naming_nothing_pickled():
    with pytest.raises(TypeError):
        pack_skeleton({"x": object()})
    with pytest.raises(errors.ProtocolError):
        unpack_skeleton(msgpack.packb(msgpack.ExtType(99, b"")))


def _manifest(**kw):
    base = dict(job="j", rank=0, world_size=1, local_world_size=1, step=3, history=1,
                tensors=plan_layout([("w", "float32", (1000,))])[0], data_bytes=4096,
                checksums=[1], skeleton=pack_skeleton({"w": TensorRef(0)}), chunk=1 << 20)
    base.update(kw)
    return Manifest(**base)


def test_manifest_round_trip():
    m = _manifest()
    back = Manifest.decode(m.encode(), 1 << 20)
    assert back.tensors == m.tensors and back.step == 3 and back.checksums == [1]


@pytest.mark.parametrize(
    "change",
    [dict(checksums=[1, 2]), dict(job="../x"), dict(data_bytes=1 << 30), dict(step=-1), dict(chunk=1)],
)
def test_manifest_validation(change):
    with pytest.raises(errors.ProtocolError):
        Manifest.decode(_manifest(**change).encode(), 1 << 20)


def test_manifest_garbage():
    for raw in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"format": 99})):
        with pytest.raises(errors.ProtocolError):
            Manifest.decode(raw, 1 << 20)


def test_chunk_count():
    assert chunk_count(0, 10) == 0 and chunk_count(10, 10) == 1 and chunk_count(11, 10) == 2


def test_slot_header_round_trip_and_corruption():
    moff, doff, size = geometry(10_000, 5000)
    h = SlotHeader(STATE_COMMITTED, size, doff, size - doff, moff, doff - moff, 10, 7, 42, 3, 9, 2, "job")
    raw = bytearray(h.pack())
    assert SlotHeader.unpack(raw, "x") == h
    raw[40] ^= 1
    with pytest.raises(errors.IntegrityError):
        SlotHeader.unpack(raw, "x")
    with pytest.raises(errors.IntegrityError):
        SlotHeader.unpack(b"garbage" * 100, "x")


def _req(**header):
    return [msgpack.packb({"v": 1, "id": 1, **header})]


def test_decode_request_accepts_valid():
    m = wire.decode_request(_req(type="begin", job="j", rank=0, step=4, session="s"))
    assert m.type == "begin" and m.fields["step"] == 4


@pytest.mark.parametrize(
    "frames,match",
    [
        ([], "empty"),
        ([b"\x93"], "msgpack"),
        ([msgpack.packb([1])], "map"),
        ([msgpack.packb({"v": 2, "id": 1, "type": "ping"})], "version"),
        (_req(type="nope"), "unknown message type"),
        (_req(type="begin", job="j", rank=0, step=4), "missing"),
        (_req(type="begin", job="j", rank=0, step=-4, session="s"), "step"),
        (_req(type="begin", job="j", rank=True, step=4, session="s"), "rank"),
        (_req(type="begin", job="../j", rank=0, step=4, session="s"), "job"),
        (_req(type="ping", extra=1), "unknown fields"),
        (_req(type="ping") + [b"x"], "payload"),
        ([b"x"] * 9, "frames"),
        ([b"\x00" * (wire.MAX_HEADER_BYTES + 1)], "exceeds"),
        ([msgpack.packb({"v": 1, "id": "x", "type": "ping"})], "id"),
    ],
)
def test_decode_request_refuses(frames, match):
    with pytest.raises(errors.ProtocolError, match=match):
        wire.decode_request(frames)


def test_error_replies_rebuild_the_tree():
    frames = wire.encode_error(5, errors.CapacityError("full", needed=3), "inst")
    with pytest.raises(errors.CapacityError, match="full") as ei:
        wire.decode_reply(frames)
    assert ei.value.details["needed"] == 3
    assert issubclass(errors.ShardkeepTimeoutError, TimeoutError)
    assert isinstance(errors.from_wire("Bogus", 3), errors.ShardkeepError)


def test_an_awaited_fault_delay_suspends_the_task_not_the_event_loop():
    import asyncio

    from shardkeep.proto.faults import FaultPlan, Phase

    plan = FaultPlan.from_env({"SHARDKEEP_TEST_FAULTS_ENABLE": "1", "SHARDKEEP_FAULTS": "chunk-send:delay:2:0.3"})
    ticks = []

    async def ticker():
        for _ in range(200):
            ticks.append(1)
            await asyncio.sleep(0.01)

    async def main():
        t = asyncio.ensure_future(ticker())
        assert await plan.ahit(Phase.CHUNK_SEND) is None  # the first arrival: no rule fires
        n0 = len(ticks)
        await plan.ahit(Phase.CHUNK_SEND)  # the second: 0.3 s, while the loop goes on ticking
        during = len(ticks) - n0
        t.cancel()
        return during

    assert asyncio.run(main()) >= 5


def test_a_reply_of_another_protocol_version_is_refused_naming_both():
    frames = [msgpack.packb({"v": wire.PROTOCOL_VERSION + 1, "id": 1, "type": "ok"})]
    with pytest.raises(errors.ProtocolError, match=rf"version {wire.PROTOCOL_VERSION + 1}.*"
                                                  rf"this client speaks version {wire.PROTOCOL_VERSION}"):
        wire.decode_reply(frames)
