"""Hostile and malformed input against a live daemon: error replies, and it keeps serving."""

from __future__ import annotations

import os
import random

import msgpack
import psutil
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from shardkeep.client import Snapshotter
from shardkeep.proto import wire
from shardkeep.proto.errors import CapacityError, NotFoundError, ProtocolError, StaleSessionError
from shardkeep.proto.leaves import pack_skeleton
from shardkeep.proto.manifest import Manifest
from shardkeep.proto.transport import Channel


class Raw:
    """A bare DEALER socket, to send frames no well-behaved client would."""

    def __init__(self, path: str) -> None:
        self.ctx = zmq.Context.instance()
        self.s = self.ctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.connect(f"ipc://{path}")

    def ask(self, frames: list[bytes], timeout_ms: int = 5000) -> dict | None:
        self.s.send_multipart(frames)
        if not self.s.poll(timeout_ms):
            return None
        reply = self.s.recv_multipart()
        while len(reply) > 1 and reply[0] == b"":  # the envelope of a REQ-style request
            reply = reply[1:]
        return msgpack.unpackb(reply[0], strict_map_key=False)

    def close(self) -> None:
        self.s.close(0)


def _hdr(**h) -> bytes:
    return msgpack.packb({"v": 1, "id": 7, **h})


HOSTILE = [
    [b""],
    [b"\xff" * 10],
    [msgpack.packb({"v": 1, "id": 7})],
    [msgpack.packb({"v": 99, "id": 7, "type": "ping"})],
    [msgpack.packb({"v": "1", "id": 7, "type": "ping"})],
    [_hdr(type="ping")[:-1]],
    [_hdr(type="no-such-type")],
    [_hdr(type="register", job="j", rank=0, world_size=1, local_world_size=1, data_bytes=1 << 60,
          manifest_bytes=0)],
    [_hdr(type="register", job="j" * 5000, rank=0, world_size=1, local_world_size=1, data_bytes=1,
          manifest_bytes=0)],
    [_hdr(type="register", job="../../etc/passwd", rank=0, world_size=1, local_world_size=1, data_bytes=1,
          manifest_bytes=0)],
    [_hdr(type="register", job="j", rank=5, world_size=2, local_world_size=1, data_bytes=1, manifest_bytes=0)],
    [_hdr(type="begin", job="j", rank=0, step=1, session="forged")],
    [_hdr(type="commit", job="j", rank=0, step=1, session="x", slot=1)],
    [_hdr(type="open", job="nojob", rank=0, step=1)],
    [_hdr(type="release", job="nojob", rank=0, pin="x")],
    [_hdr(type="status", job=["list"])],
    [_hdr(type="ping", id=-1)],
    [_hdr(type="ping"), b"unexpected payload"],
    [_hdr(type="ping")] * 6,
    [msgpack.packb([[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]])],
    [b"\x91" * 200_000],  # 200k nested arrays
    [msgpack.packb({"v": 1, "id": 7, "type": "ping", "x": "y" * 2_000_000})],
    [msgpack.packb({"v": 1, "id": 7, "type": ["ping"]})],            # unhashable type
    [msgpack.packb({"v": 1, "id": 7, "type": {"a": 1}})],
    [msgpack.packb({"v": True, "id": 7, "type": "ping"})],           # True == 1 in Python
    [msgpack.packb({"v": 1.0, "id": 7, "type": "ping"})],
    [msgpack.packb({"v": 1, "id": 7, "type": "ping", ("k",): 1})],
    [_hdr(type="open", job="abc\n", rank=0, step=1)],               # a newline in a job id
    [_hdr(type="status", job="ok", extra=[1, 2])],
]


@pytest.fixture
def raw(daemon):
    r = Raw(daemon.socket)
    yield r
    r.close()


def _alive(daemon) -> None:
    assert daemon.proc.poll() is None, daemon.log()
    assert "pid" in daemon.request("ping", timeout=10).fields


def test_hostile_frames_get_error_replies(daemon, raw):
    proc = psutil.Process(daemon.proc.pid)
    fds = proc.num_fds()
    for frames in HOSTILE:
        reply = raw.ask(frames)
        assert reply is not None, f"no reply to {frames[0][:40]!r}"
        assert reply["type"] == "error", (frames[0][:40], reply)
        assert reply["code"] in ("ProtocolError", "NotFoundError", "StaleSessionError", "CapacityError")
        assert reply["message"]
    _alive(daemon)
    assert proc.num_fds() <= fds + 2
    assert daemon.segments() == []


def test_error_reply_names_the_supported_version(raw):
    reply = raw.ask([msgpack.packb({"v": 2, "id": 9, "type": "ping"})])
    assert reply["code"] == "ProtocolError" and reply["id"] == 9
    assert "version 1" in reply["message"] and reply["details"]["supported"] == [1]


def test_oversized_message_is_dropped_and_the_daemon_goes_on(daemon, raw):
    raw.s.send_multipart([_hdr(type="ping"), b"\0" * (wire.MAX_PAYLOAD_BYTES + wire.MAX_HEADER_BYTES + 1)])
    _alive(daemon)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_random_frames(daemon, raw, frames):
    reply = raw.ask(frames)
    assert reply is not None and reply["type"] == "error"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["v", "id", "type", "job", "rank", "step", "session", "slot", "pin",
                                        "world_size", "data_bytes", "local_world_size", "manifest_bytes"]),
                       st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=30)
                       | st.sampled_from(["register", "begin", "commit", "open", "status", "release", "finish"]),
                       max_size=10))
def test_random_headers(daemon, raw, header):
    reply = raw.ask([msgpack.packb(header)])
    assert reply is not None and reply["type"] in ("ok", "error")


def test_forged_manifests_are_refused(daemon, job_id):
    ch = Channel(daemon.socket)
    reg = ch.request("register", {"job": job_id, "rank": 0, "world_size": 1, "local_world_size": 1,
                                  "data_bytes": 4096, "manifest_bytes": 4096})
    session = reg.fields["session"]

    def manifest(step, **change):
        base = dict(job=job_id, rank=0, world_size=1, local_world_size=1, step=step, history=0,
                    data_bytes=4096, checksums=[0], skeleton=pack_skeleton({}), tensors=[])
        return Manifest(**{**base, **change}).encode()

    def raw_manifest(step, tensors):
        return msgpack.packb({"format": 1, "algo": "xxh3_64", "job": job_id, "rank": 0, "world_size": 1,
                              "local_world_size": 1, "step": step, "history": 0, "tensors": tensors,
                              "data_bytes": 4096, "chunk": 1 << 20, "checksums": b"\0" * 8, "skeleton": b"\x80",
                              "created": 0.0, "extra": {}})

    bad = [
        lambda step: b"not msgpack",
        lambda step: manifest(step, data_bytes=1 << 40),                   # beyond the slot
        lambda step: manifest(step, checksums=[0, 0, 0]),                  # wrong count
        lambda step: manifest(step + 1),                                   # another step
        lambda step: manifest(step, job="otherjob"),                       # another job
        lambda step: manifest(step, skeleton=b"x" * 20000),                # exceeds the manifest region
        lambda step: raw_manifest(step, [["t", "float32", [10**6], 0, 4 * 10**6]]),  # beyond data_bytes
        lambda step: raw_manifest(step, [["t", ["float32"], [1], 0, 4]]),  # unhashable dtype
        lambda step: raw_manifest(step, [["t", "float32", [1], 0, 4], ["u", "float32", [1], 0, 4]]),  # overlap
    ]
    assert raw_manifest(1, []) and Manifest.decode(raw_manifest(1, []), 4096)  # the forger's base is valid
    for i, make in enumerate(bad):
        step = 10 + i
        slot = ch.request("begin", {"job": job_id, "rank": 0, "step": step, "session": session}).fields["slot"]
        with pytest.raises((ProtocolError, CapacityError)) as ei:
            ch.request("commit", {"job": job_id, "rank": 0, "step": step, "session": session, "slot": slot},
                       [make(step)])
        assert "internal error" not in str(ei.value)
        # a failed commit frees its slot: the same writer goes on without registering again
        states = [s["state"] for s in daemon.job_status(job_id)["ranks"]["0"]["slots"]]
        assert "writing" not in states, states
    with pytest.raises(StaleSessionError):
        ch.request("begin", {"job": job_id, "rank": 0, "step": 50, "session": "0" * 16})
    with pytest.raises(NotFoundError):
        ch.request("open", {"job": job_id, "rank": 0, "step": 10})
    # nothing was committed, and a real client still works afterwards
    assert daemon.job_status(job_id)["restorable"] == []
    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1) as snap:
        assert snap.snapshot({"t": torch.ones(3)}, 60).result(timeout=30).status == "committed"
        out = {"t": torch.zeros(3)}
        assert snap.restore(out) == 60 and torch.equal(out["t"], torch.ones(3))
    assert daemon.status()["errors"] >= len(bad)


def test_many_clients_that_vanish_leak_nothing(daemon, job_id):
    proc = psutil.Process(daemon.proc.pid)
    fds0 = proc.num_fds()
    rnd = random.Random(3)
    for i in range(30):
        r = Raw(daemon.socket)
        frames = [_hdr(type="status")] if rnd.random() < 0.5 else [os.urandom(rnd.randrange(1, 64))]
        r.s.send_multipart(frames)
        r.close()  # gone before the reply
    _alive(daemon)
    assert proc.num_fds() <= fds0 + 2
