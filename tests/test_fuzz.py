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
    slot = ch.request("begin", {"job": job_id, "rank": 0, "step": 1, "session": session}).fields["slot"]
    base = dict(job=job_id, rank=0, world_size=1, local_world_size=1, step=1, history=0, data_bytes=4096,
                checksums=[0], skeleton=pack_skeleton({}), tensors=[])
    bad = [
        b"not msgpack",
        Manifest(**{**base, "data_bytes": 1 << 40}).encode(),                    # beyond the slot
        Manifest(**{**base, "checksums": [0, 0, 0]}).encode(),                   # wrong count
        Manifest(**{**base, "step": 2}).encode(),                                # another step
        Manifest(**{**base, "job": "otherjob"}).encode(),                        # another job
        msgpack.packb({"format": 1, "algo": "xxh3_64", "job": job_id, "tensors": [["t", "float32", [10**6], 0, 4 * 10**6]],
                       "data_bytes": 4096, "chunk": 1 << 20, "checksums": b"\0" * 8}),
        Manifest(**{**base, "skeleton": b"x" * 20000}).encode(),                 # exceeds manifest capacity
    ]
    for raw_manifest in bad:
        with pytest.raises((ProtocolError, CapacityError)):
            ch.request("commit", {"job": job_id, "rank": 0, "step": 1, "session": session, "slot": slot},
                       [raw_manifest])
    with pytest.raises(StaleSessionError):
        ch.request("begin", {"job": job_id, "rank": 0, "step": 5, "session": "0" * 16})
    with pytest.raises(NotFoundError):
        ch.request("open", {"job": job_id, "rank": 0, "step": 1})
    # nothing was committed, and a real client still works afterwards
    assert daemon.job_status(job_id)["restorable"] == []
    with Snapshotter(socket=daemon.socket, job=job_id, rank=0, world_size=1) as snap:
        assert snap.snapshot({"t": torch.ones(3)}, 3).result(timeout=30).status == "committed"
        out = {"t": torch.zeros(3)}
        assert snap.restore(out) == 3 and torch.equal(out["t"], torch.ones(3))


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
