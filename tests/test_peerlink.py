"""Peer transport: keys, CURVE control channel, tagged data plane (all on 127.0.0.1).

Every test drives its own event loop with asyncio.run and a global deadline;
every node gets its own PeerContext (ZAP is per ZeroMQ context).
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import socket
import stat
import time

import msgpack
import pytest
import zmq

from shardkeep.daemon import keys as keysmod
from shardkeep.daemon import peerlink
from shardkeep.daemon.keys import keygen, load_public_dir, load_secret
from shardkeep.daemon.peerlink import (
    DATA_KINDS,
    RECV_KEYS,
    PEER_SCHEMAS,
    ControlClient,
    ControlServer,
    DataPlane,
    PeerContext,
    PeerSecurity,
    _data_header,
    data_tag,
    key_id,
    new_session_key,
    seal,
    split_address,
    wait_released,
)
from shardkeep.proto.errors import (
    PermissionDeniedError,
    ProtocolError,
    ShardkeepError,
    ShardkeepTimeoutError,
    UnavailableError,
)

LOCAL = "tcp://127.0.0.1:0"


def run(coro, timeout: float = 40.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def keydir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("peerkeys") / "keys")
    keygen(4, d)
    return d


def security(keydir: str, node: int, mode: str = "curve") -> PeerSecurity:
    return PeerSecurity.from_files(mode, node, os.path.join(keydir, f"node-{node}.key_secret"), keydir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(cond, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


class Node:
    """A PeerContext + ControlServer whose handler records messages and echoes the sender."""

    def __init__(self, sec: PeerSecurity, handler=None) -> None:
        self.sec = sec
        self.seen: list = []
        self.handler = handler
        self.clients: list[ControlClient] = []

    async def start(self) -> "Node":
        self.pctx = await PeerContext(self.sec).start()
        self.server = ControlServer(self.pctx, LOCAL, self.handler or self._echo)
        await self.server.start()
        return self

    def _echo(self, msg):
        self.seen.append(msg)
        return {"src": msg.src, "mtype": msg.type}

    def client(self, peer: int, address: str, **kw) -> ControlClient:
        c = ControlClient(self.pctx, peer, address, **kw).connect()
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await self.server.close()
        await self.pctx.close()


def raw_dealer(pctx: PeerContext, sec: PeerSecurity | None, server_key: bytes | None, endpoint: str,
               identity: bytes | None = None) -> zmq.asyncio.Socket:
    s = pctx.ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if identity:
        s.setsockopt(zmq.ROUTING_ID, identity)
    if sec is not None:
        s.curve_secretkey = sec.secret_key
        s.curve_publickey = sec.public_key
        s.curve_serverkey = server_key
    s.connect(endpoint)
    return s


async def raw_reply(sock, frames, timeout: float = 3.0) -> dict:
    await asyncio.wait_for(sock.send_multipart(frames), timeout)
    reply = await asyncio.wait_for(sock.recv_multipart(), timeout)
    return msgpack.unpackb(reply[0], raw=False)


# --- keys ----------------------------------------------------------------------------


def test_keygen_files_modes_and_no_overwrite(tmp_path, capsys):
    d = tmp_path / "keys"
    paths = keygen(3, str(d))
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        f"node-{i}.key{s}" for i in range(3) for s in ("", "_secret"))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    for i in range(3):
        assert stat.S_IMODE(os.stat(d / f"node-{i}.key_secret").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d / f"node-{i}.key").st_mode) == 0o644
    assert sorted(os.listdir(d)) == sorted(os.path.basename(p) for p in paths)  # no scratch left behind

    pub = load_public_dir(str(d))
    assert sorted(pub) == [0, 1, 2]
    for i in range(3):
        p, s = load_secret(str(d / f"node-{i}.key_secret"))
        assert p == pub[i] and len(s) == 40
        assert zmq.curve_public(s) == p
    assert len(set(pub.values())) == 3

    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        keygen(3, str(d))
    with pytest.raises(FileExistsError):
        keygen(5, str(d))  # overlaps node-0..2: nothing at all is written
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before

    # other files are ignored; indices come from the names
    (d / "README").write_text("not a key")
    (d / "node-x.key").write_text("junk")
    os.rename(d / "node-2.key", d / "node-7.key")
    assert sorted(load_public_dir(str(d))) == [0, 1, 7]

    with pytest.raises(FileNotFoundError):
        load_secret(str(d / "node-9.key_secret"))
    with pytest.raises(ValueError, match="no secret key"):
        load_secret(str(d / "node-0.key"))
    (tmp_path / "bad.key_secret").write_text("garbage\n")
    with pytest.raises(ValueError):
        load_secret(str(tmp_path / "bad.key_secret"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no node-<i>.key"):
        load_public_dir(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        load_public_dir(str(tmp_path / "missing"))
    with pytest.raises(ValueError):
        keygen(0, str(tmp_path / "zero"))

    # the CLI entry point
    parser = argparse.ArgumentParser()
    keysmod.add_keygen_args(parser)
    assert keysmod.cmd_keygen(parser.parse_args(["--nodes", "2", str(tmp_path / "cli")])) == 0
    out = capsys.readouterr().out
    assert "node-1.key_secret" in out and "secret store" in out
    assert keysmod.cmd_keygen(parser.parse_args(["--nodes", "2", str(tmp_path / "cli")])) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_security_validation(keydir):
    sec = security(keydir, 1)
    assert sec.node_of_key(sec.public_key) == 1
    with pytest.raises(ValueError, match="not node 2's key.*node 1's"):
        PeerSecurity.from_files("curve", 2, os.path.join(keydir, "node-1.key_secret"), keydir)
    with pytest.raises(ValueError, match="--curve-secret"):
        PeerSecurity.from_files("curve", 0)
    with pytest.raises(ValueError, match="mode"):
        PeerSecurity("plain", 0).validate()


# --- control channel -------------------------------------------------------------------


def test_curve_request_reply_sees_sender_index(keydir):
    async def main():
        n0 = await Node(security(keydir, 0)).start()
        n1 = await Node(security(keydir, 1)).start()
        n2 = await Node(security(keydir, 2)).start()
        try:
            c1 = n1.client(0, n0.server.endpoint, timeout=5)
            c2 = n2.client(0, n0.server.endpoint, timeout=5)
            r = await c1.request("heartbeat", {"gen": 3})
            assert r.type == "ok" and r.fields == {"src": 1, "mtype": "heartbeat"}
            r = await c2.request("local-commit", {"job": "j1", "step": 5, "ranks": [0, 1]})
            assert r.fields["src"] == 2
            await c1.send("committed", {"job": "j1", "step": 5, "level": "group"})
            await until(lambda: len(n0.seen) == 3, what="one-way message")
            assert [(m.src, m.type, m.id > 0) for m in n0.seen] == [
                (1, "heartbeat", True), (2, "local-commit", True), (1, "committed", False)]
            assert n0.seen[1].fields == {"job": "j1", "step": 5, "ranks": [0, 1]}
            assert c1.state == "connected"
            # a reverse channel works the same way
            r = await n0.client(1, n1.server.endpoint, timeout=5).request("heartbeat", {"gen": 1})
            assert r.fields["src"] == 0
            # our own bad fields fail locally, before anything is sent
            with pytest.raises(ProtocolError):
                await c1.request("heartbeat", {"gen": "three"})
            with pytest.raises(ProtocolError):
                await c1.request("nonsense", {})
        finally:
            for n in (n0, n1, n2):
                await n.close()

    run(main())


def test_unknown_key_is_refused(keydir):
    async def main():
        n0 = await Node(security(keydir, 0)).start()
        pub, sec = zmq.curve_keypair()
        # an intruder that knows the group's public keys but holds a key of its own
        intruder = PeerSecurity("curve", 3, pub, sec, {**load_public_dir(keydir), 3: pub})
        pctx = await PeerContext(intruder).start()
        c = ControlClient(pctx, 0, n0.server.endpoint, timeout=1.0).connect()
        try:
            with pytest.raises(ShardkeepTimeoutError) as ei:
                await c.request("heartbeat", {"gen": 1})
            msg = str(ei.value)
            assert "node 0" in msg and "heartbeat" in msg and "1.0s" in msg
            assert "refused" in msg, msg
            assert isinstance(ei.value, TimeoutError)
            await asyncio.sleep(0.3)
            assert n0.seen == []
            assert n0.pctx.refused_connections >= 1
            assert c.state == "refused"
        finally:
            await c.close()
            await pctx.close()
            await n0.close()

    run(main())


def test_claimed_identity_is_ignored_key_decides(keydir):
    async def main():
        n0 = await Node(security(keydir, 0)).start()
        n1 = await Node(security(keydir, 1)).start()
        s1 = security(keydir, 1)
        # node 1's key, node 2's routing id
        raw = raw_dealer(n1.pctx, s1, n0.sec.public_key, n0.server.endpoint, identity=b"node-2/0123456789abcdef")
        try:
            hdr = msgpack.packb({"v": 1, "type": "heartbeat", "id": 11, "gen": 1})
            rep = await raw_reply(raw, [hdr])
            assert rep["type"] == "ok" and rep["id"] == 11 and rep["src"] == 1
            assert n0.seen[-1].src == 1
            # a header field that claims node 2 is refused, naming both
            hello = {"group": "g", "node": 2, "gen": 0, "control": "tcp://127.0.0.1:1", "data": "tcp://127.0.0.1:2"}
            with pytest.raises(PermissionDeniedError, match="node 2.*authenticated as node 1"):
                await n1.client(0, n0.server.endpoint, timeout=5).request("hello", hello)
            key = new_session_key()
            ok = await n1.clients[0].request("hello", {**hello, "node": 1, "key": key})
            assert ok.fields["src"] == 1 and n0.seen[-1].fields["key"] == key
            assert set(n0.server.last_seen) == {1}
            assert [m.src for m in n0.seen] == [1, 1]
        finally:
            raw.close(0)
            await n1.close()
            await n0.close()

    run(main())


def test_replacement_with_same_key_at_new_address(keydir):
    async def main():
        n0 = await Node(security(keydir, 0)).start()
        old = await Node(security(keydir, 1)).start()
        new = await Node(security(keydir, 1)).start()   # the replacement: same key, own new port
        try:
            assert old.server.port != new.server.port
            r = await old.client(0, n0.server.endpoint, timeout=5).request("heartbeat", {"gen": 1})
            assert r.fields["src"] == 1
            # the replacement connects while the old node's connection is still up
            r = await new.client(0, n0.server.endpoint, timeout=5).request("heartbeat", {"gen": 2})
            assert r.fields["src"] == 1
            # node 0 talks to node 1 at its old, then at its new address
            c = n0.client(1, old.server.endpoint, timeout=5)
            assert (await c.request("heartbeat", {"gen": 1})).fields["src"] == 0
            await old.close()
            await c.close()
            c = n0.client(1, new.server.endpoint, timeout=5)
            assert (await c.request("heartbeat", {"gen": 2})).fields["src"] == 0
            assert (await new.clients[0].request("heartbeat", {"gen": 2})).fields["src"] == 1
            assert [m.fields["gen"] for m in new.seen] == [2]
        finally:
            await new.close()
            await n0.close()

    run(main())


def test_insecure_only_on_loopback():
    sec = PeerSecurity("insecure", 0)
    sec.check_insecure_addresses(["tcp://127.0.0.1:500", "tcp://localhost:1", "tcp://[::1]:2",
                                  "127.0.0.2:3", "ipc:///tmp/x.sock"])
    for bad in ("tcp://10.0.0.1:5000", "tcp://0.0.0.0:5000", "tcp://*:5000", "tcp://node7:5000"):
        with pytest.raises(ValueError, match="loopback"):
            sec.check_insecure_addresses(["tcp://127.0.0.1:1", bad])
    PeerSecurity("curve", 0).check_insecure_addresses(["tcp://10.0.0.1:5000"])  # no-op with CURVE
    assert split_address("tcp://[::1]:7") == ("tcp", "::1", 7)
    with pytest.raises(ValueError):
        split_address("udp://x:1")

    async def main():
        pctx = await PeerContext(sec).start()
        try:
            with pytest.raises(ValueError, match="loopback"):
                await ControlServer(pctx, "tcp://0.0.0.0:0", lambda m: None).start()
            with pytest.raises(ValueError, match="loopback"):
                ControlClient(pctx, 1, "tcp://192.0.2.1:5000").connect()
        finally:
            await pctx.close()
        # an insecure pair on loopback: the sender index comes from the routing id
        n0 = await Node(PeerSecurity("insecure", 0)).start()
        n3 = await Node(PeerSecurity("insecure", 3)).start()
        raw = raw_dealer(n3.pctx, None, None, n0.server.endpoint, identity=b"stranger")
        try:
            r = await n3.client(0, n0.server.endpoint, timeout=5).request("heartbeat", {"gen": 1})
            assert r.fields["src"] == 3
            rep = await raw_reply(raw, [msgpack.packb({"v": 1, "type": "heartbeat", "id": 4, "gen": 1})])
            assert rep["type"] == "error" and rep["code"] == "PermissionDeniedError" and rep["id"] == 4
        finally:
            raw.close(0)
            await n3.close()
            await n0.close()

    run(main())


def test_malformed_control_frames_get_error_replies(keydir):
    async def handler(msg):
        if msg.type == "abort":
            raise ValueError("handler bug")
        if msg.type == "finish":
            raise PermissionDeniedError("not yours")
        if msg.type == "fetch":
            await asyncio.sleep(0.01)
            return {"n": len(msg.payload)}, [b"payload-bytes"]
        return {"ok": True}

    async def main():
        n0 = await Node(security(keydir, 0), handler=handler).start()
        n1 = await Node(security(keydir, 1)).start()
        raw = raw_dealer(n1.pctx, n1.sec, n0.sec.public_key, n0.server.endpoint)
        try:
            def h(**kw):
                return msgpack.packb({"v": 1, **kw}, use_bin_type=True)

            cases = [
                ([b"\xc1\xc1garbage"], 0, "msgpack"),
                ([msgpack.packb([1, 2, 3])], 0, "map"),
                ([h(type="nope", id=7)], 7, "unknown peer message type"),
                ([h(type="heartbeat", id=8, gen="x")], 8, "'gen'"),
                ([h(type="heartbeat", id=9)], 9, "missing field 'gen'"),
                ([h(type="heartbeat", id=10, gen=1, extra=1)], 10, "unknown fields"),
                ([h(type="heartbeat", id=12, gen=1), b"payload"], 12, "payload frames"),
                ([h(type="heartbeat", id=13, gen=1, pad="x" * 100_000)], 0, "exceeds"),
                ([msgpack.packb({"v": 2, "type": "heartbeat", "id": 14, "gen": 1})], 14, "version"),
                ([h(type="ok", id=15)], 15, "is a reply"),
                ([h(type="abort", id=16, job="../etc", step=1)], 16, "invalid job id"),
                ([h(type="heartbeat", id=17, gen=1)] + [b"x"] * 4, 17, "frames"),
                ([h(type="hello", id=18, group="g", node=1, gen=0, control="http://x", data="tcp://h:1")],
                 18, "'control'"),
                ([h(type="heartbeat", id=-1, gen=1)], 0, "'id'"),
            ]
            for frames, mid, needle in cases:
                rep = await raw_reply(raw, frames)
                assert rep["type"] == "error" and rep["code"] == "ProtocolError", (frames[:1], rep)
                assert rep["id"] == mid and needle in rep["message"], (needle, rep)
            assert n0.server.rejected == len(cases)
            # handler errors: a ShardkeepError travels as itself, anything else as an internal error
            c = n1.client(0, n0.server.endpoint, timeout=5)
            with pytest.raises(PermissionDeniedError, match="not yours") as ei:
                await c.request("finish", {"job": "j"})
            assert ei.value.peer == 0
            with pytest.raises(ShardkeepError, match="internal error.*handler bug"):
                await c.request("abort", {"job": "j", "step": 1})
            # and the server still serves, also async handlers with payload replies
            r = await c.request("fetch", {"job": "j", "step": 1, "what": "data"})
            assert r.fields == {"n": 0} and bytes(r.payload[0]) == b"payload-bytes"
            assert (await c.request("heartbeat", {"gen": 1})).fields == {"ok": True}
        finally:
            raw.close(0)
            await n1.close()
            await n0.close()

    run(main())


def test_timeouts_and_late_replies(keydir):
    async def handler(msg):
        await asyncio.sleep(msg.fields.get("time", 0))
        return {"gen": msg.fields["gen"]}

    async def main():
        n0 = await Node(security(keydir, 0), handler=handler).start()
        n1 = await Node(security(keydir, 1)).start()
        try:
            c = n1.client(0, n0.server.endpoint, timeout=5)
            t = time.monotonic()
            with pytest.raises(ShardkeepTimeoutError, match=r"heartbeat request to node 0 at .* after 0\.3s"):
                await c.request("heartbeat", {"gen": 1, "time": 0.6}, timeout=0.3)
            assert time.monotonic() - t < 1.0
            assert (await c.request("heartbeat", {"gen": 2})).fields == {"gen": 2}
            await until(lambda: c.late_replies == 1, what="late reply dropped")
            # nothing listening: the send itself cannot complete
            dead = n1.client(2, f"tcp://127.0.0.1:{free_port()}", timeout=0.3)
            with pytest.raises(ShardkeepTimeoutError, match="could not be sent within 0.3s"):
                await dead.request("heartbeat", {"gen": 1})
            with pytest.raises(ShardkeepTimeoutError):
                await dead.send("heartbeat", {"gen": 1})
        finally:
            await n1.close()
            await n0.close()

    run(main())


# --- data plane ---------------------------------------------------------------------


async def data_pair(keydir, mode="curve", **kw):
    p0 = await PeerContext(security(keydir, 0, mode)).start()
    p1 = await PeerContext(security(keydir, 1, mode)).start()
    d0 = DataPlane(p0, "127.0.0.1", **kw)
    d1 = DataPlane(p1, "127.0.0.1", **kw)
    await d0.start()
    await d1.start()
    k01 = new_session_key()
    d1.set_recv_key(0, k01)      # the receiver installs first (HELLO reply carries the key)
    d0.set_send_key(1, k01)
    d0.connect(1, d1.endpoint)
    return p0, p1, d0, d1, k01


async def close_all(*things):
    for t in things:
        await t.close()


def _forge_with_kid(key: bytes, src: int, dst: int, seq: int, payload: bytes) -> list:
    """A frame naming ``key``'s id but tagged with another key."""
    header = _data_header(src, dst, seq, "chunk", {}, len(payload), key_id(key))
    return [header, payload, data_tag(new_session_key(), header, memoryview(payload))]


def test_data_plane_verifies_and_drops_forgeries(keydir):
    async def main():
        p0, p1, d0, d1, k01 = await data_pair(keydir)
        k21 = new_session_key()
        d1.set_recv_key(2, k21)
        raw = raw_dealer(p0, None, None, d1.endpoint)
        try:
            payload = os.urandom(1 << 20)
            await d0.send(1, "chunk", {"job": "j", "step": 3, "stripe": 2}, memoryview(payload))
            m = await d1.recv(timeout=5)
            assert (m.src, m.seq, m.kind, m.meta) == (0, 1, "chunk", {"job": "j", "step": 3, "stripe": 2})
            assert bytes(m.payload) == payload

            good = seal(k21, 2, 1, 1, "parity", {"i": 1}, b"hello parity")
            await raw.send_multipart(good)
            m = await d1.recv(timeout=5)
            assert (m.src, m.seq, bytes(m.payload)) == (2, 1, b"hello parity")

            def flipped():
                f = seal(k21, 2, 1, 2, "chunk", {}, bytearray(b"x" * 4096))
                f[1][100] ^= 0x04
                return f

            forgeries = [
                ("bad-tag", flipped()),                                            # one payload bit flipped
                ("bad-tag", seal(k21, 2, 1, 2, "chunk", {}, b"y" * 64)[:2] + [bytes(32)]),  # wrong tag
                ("no-key", seal(new_session_key(), 2, 1, 2, "chunk", {}, b"z")),   # a key node 1 never chose
                ("bad-tag", _forge_with_kid(k21, 2, 1, 2, b"zz")),                   # its key id, another key
                ("replay", good),                                                  # replayed seq
                ("replay", seal(k21, 2, 1, 1, "chunk", {}, b"other")),             # reused seq, valid tag
                ("wrong-dst", seal(k01, 0, 2, 99, "chunk", {}, b"for node 2")),    # wrong dst
                ("no-key", seal(k21, 3, 1, 1, "chunk", {}, b"from 3")),            # sender without key
                ("malformed", [b"\x00", b"junk"]),
                ("malformed", [msgpack.packb({"v": 1}), b"", bytes(32)]),
                ("malformed", seal(k21, 2, 1, 2, "bogus-kind", {}, b"k")),
            ]
            for i, (_, frames) in enumerate(forgeries):
                await raw.send_multipart(frames)
                await until(lambda: d1.forged_dropped == i + 1, what=f"drop of forgery {i}")
            assert d1.received == 2 and d1._queue.empty()
            want: dict[str, int] = {}
            for reason, _ in forgeries:
                want[reason] = want.get(reason, 0) + 1
            assert dict(d1.drop_reasons) == want

            # later valid messages still arrive, in both streams
            await raw.send_multipart(seal(k21, 2, 1, 2, "chunk", {}, b"next"))
            await d0.send(1, "fetch-reply", {"n": 2}, b"small")
            got = sorted([(m.src, m.seq) for m in [await d1.recv(timeout=5), await d1.recv(timeout=5)]])
            assert got == [(0, 2), (2, 2)]
            assert d1.forged_dropped == len(forgeries)

            # a rekey restarts the sequence; HELLOs that cross may leave the sender on the previous key, so
            # the last few keys still verify; a key RECV_KEYS rekeys old does not
            k01b = new_session_key()
            d1.set_recv_key(0, k01b)
            await d0.send(1, "chunk", {}, b"previous key")
            m = await d1.recv(timeout=5)
            assert (m.seq, bytes(m.payload)) == (3, b"previous key")
            d0.set_send_key(1, k01b)
            await d0.send(1, "chunk", {}, b"new key")
            m = await d1.recv(timeout=5)
            assert (m.seq, bytes(m.payload)) == (1, b"new key")
            for _ in range(RECV_KEYS):
                d1.set_recv_key(0, new_session_key())
            no_key = d1.drop_reasons.get("no-key", 0)
            await d0.send(1, "chunk", {}, b"stale key")
            await until(lambda: d1.drop_reasons.get("no-key", 0) == no_key + 1, what="stale-key drop")
            d1.forget_peer_keys(0)  # a replaced node: none of its keys verifies any more

            # sender-side errors
            with pytest.raises(ValueError, match="kind"):
                await d0.send(1, "gossip", {}, b"")
            with pytest.raises(UnavailableError, match="no data connection"):
                await d0.send(3, "chunk", {}, b"")
            d0.connect(2, d1.endpoint)
            with pytest.raises(UnavailableError, match="no data key"):
                await d0.send(2, "chunk", {}, b"")
            with pytest.raises(ValueError):
                d0.install_key(2, 3, new_session_key())
            with pytest.raises(ValueError):
                d0.set_send_key(1, b"short")
        finally:
            raw.close(0)
            await close_all(d0, d1, p0, p1)

    run(main())


def test_data_plane_back_pressure_and_deadlines(keydir):
    async def main():
        p0, p1, d0, d1, _ = await data_pair(keydir, sndhwm=2, rcvhwm=2, queue_size=1)
        try:
            # nobody reads d1: after HWMs, queue and socket buffers fill, send waits, then times out
            buf = memoryview(bytearray(4 << 20))
            sent = 0
            with pytest.raises(ShardkeepTimeoutError, match=r"data chunk to node 1 .* within 0\.3s"):
                for _ in range(64):
                    await d0.send(1, "chunk", {"i": sent}, buf, timeout=0.3)
                    sent += 1
            print(f"\n{sent} x 4 MiB queued before back-pressure stopped the sender")
            assert 1 <= sent < 64
            # draining the receiver frees the sender again, in order and nothing forged
            seqs = [(await d1.recv(timeout=5)).seq for _ in range(sent)]
            assert seqs == list(range(1, sent + 1))
            await d0.send(1, "chunk", {}, b"after", timeout=5)
            while (await d1.recv(timeout=5)).payload.nbytes != 5:
                pass  # the timed-out message may or may not have gone out
            assert d1.forged_dropped == 0
            # a peer that is not there
            d0.connect(2, f"tcp://127.0.0.1:{free_port()}")
            d0.set_send_key(2, new_session_key())
            with pytest.raises(ShardkeepTimeoutError, match="node 2"):
                await d0.send(2, "parity", {}, b"x", timeout=0.2)
            assert d0.peer_state(1) == "connected" and d0.peer_state(2) != "connected"
        finally:
            await close_all(d0, d1, p0, p1)

    run(main())


def test_data_plane_encrypt_data_mode(keydir):
    async def main():
        p0, p1, d0, d1, k01 = await data_pair(keydir, mode="encrypt-data")
        p2 = await PeerContext(security(keydir, 2, "encrypt-data")).start()
        plain = raw_dealer(p2, None, None, d1.endpoint)
        as2 = raw_dealer(p2, p2.security, p1.security.public_key, d1.endpoint)
        try:
            payload = os.urandom(3 << 20)
            await d0.send(1, "parity", {"s": 1}, payload, timeout=5)
            m = await d1.recv(timeout=5)
            assert m.src == 0 and bytes(m.payload) == payload
            # plain TCP cannot talk to the CURVE data endpoint at all
            try:  # queued, or refused at once when no connection exists: either way never delivered
                await plain.send_multipart(seal(k01, 0, 1, 50, "chunk", {}, b"plain"), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            # node 2's key with a message that claims node 0 (and even has node 0's data key)
            await as2.send_multipart(seal(k01, 0, 1, 51, "chunk", {}, b"spoofed"))
            await until(lambda: d1.drop_reasons["src-mismatch"] == 1, what="src-mismatch drop")
            await asyncio.sleep(0.2)
            assert d1.received == 1 and d1.forged_dropped == 1
            await d0.send(1, "chunk", {}, b"still fine", timeout=5)
            assert bytes((await d1.recv(timeout=5)).payload) == b"still fine"
        finally:
            plain.close(0)
            as2.close(0)
            await close_all(d0, d1, p0, p1, p2)

    run(main())


def test_peer_schema_table_is_complete():
    want = {"hello", "heartbeat", "local-commit", "skip", "chunk", "parity", "ack", "committed",
            "abort", "finish", "persist-done", "fetch", "inventory", "outcome", "pull"}
    assert set(PEER_SCHEMAS) == want
    assert DATA_KINDS == {"chunk", "parity", "fetch-reply"}


def test_throughput_plain_vs_curve(keydir):
    """Not asserted: prints MB/s of 4 MiB data messages (run with -s)."""

    async def measure(mode: str, count: int) -> float:
        p0, p1, d0, d1, _ = await data_pair(keydir, mode=mode)
        region = mmap.mmap(-1, 4 << 20)   # stands in for a shm slot
        region.write(os.urandom(4 << 20))
        view = memoryview(region)
        try:
            await d0.send(1, "chunk", {}, view, timeout=10)        # warm up the connection
            await d1.recv(timeout=10)

            async def consume():
                for _ in range(count):
                    await d1.recv(timeout=20)

            t = time.perf_counter()
            reader = asyncio.create_task(consume())
            tracker = None
            for _ in range(count):
                tracker = await d0.send(1, "chunk", {}, view, timeout=20, track=True)
            await reader
            elapsed = time.perf_counter() - t
            await wait_released(tracker, 10)
            assert d1.forged_dropped == 0
            return count * (4 << 20) / elapsed / 1e6
        finally:
            await close_all(d0, d1, p0, p1)
            view.release()
            region.close()

    plain = run(measure("curve", 48))           # mode "curve": data plane is plain TCP + BLAKE3 tags
    curve = run(measure("encrypt-data", 12))
    print(f"\ndata plane, 4 MiB messages on loopback: plain+BLAKE3 {plain:.0f} MB/s, "
          f"CURVE+BLAKE3 {curve:.0f} MB/s (ratio {plain / curve:.1f}x)")


def test_closing_a_client_fails_its_pending_send_without_cancelling_the_caller():
    """pyzmq cancels a pending send when the socket closes; callers must see an error, not a cancellation."""
    from shardkeep.daemon.peerlink import ControlClient, PeerContext, PeerSecurity
    from shardkeep.proto.errors import UnavailableError

    async def main():
        pctx = await PeerContext(PeerSecurity("insecure", 0)).start()
        try:
            c = ControlClient(pctx, 1, "tcp://127.0.0.1:1").connect()  # nobody listens there
            t = asyncio.create_task(c.send("heartbeat", {"gen": 1}, timeout=5.0))
            await asyncio.sleep(0.2)
            await c.close()
            with pytest.raises(UnavailableError, match="closed"):
                await asyncio.wait_for(t, 5)
        finally:
            await pctx.close()

    asyncio.run(main())


def test_bulk_work_runs_below_the_event_loop():
    """ZeroMQ's I/O threads of the peer context and the data plane's BLAKE3 threads run at a lower priority
    than the event loop's thread (which answers trainers); a trainer-facing context is left alone."""
    from shardkeep.daemon.codec import BACKGROUND_NICE
    from shardkeep.daemon.peerlink import _threads, _zmq_io_threads

    async def main():
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        before = _threads()  # (earlier tests' contexts may still be going away)
        other = zmq.Context()
        other.socket(zmq.DEALER).close()

        def named(exclude: set[int]) -> set[int]:  # a new thread names itself ZMQbg/IO/n once it runs
            deadline = time.monotonic() + 10
            while not (_zmq_io_threads() - exclude) and time.monotonic() < deadline:
                time.sleep(0.02)
            return _zmq_io_threads() - exclude

        others = named(before)
        p = await PeerContext(PeerSecurity("insecure", 0)).start()
        dp = DataPlane(p, "127.0.0.1", 0)
        await dp.start()
        try:
            io = named(others | before)
            assert io and all(os.getpriority(os.PRIO_PROCESS, t) == min(19, mine + BACKGROUND_NICE) for t in io)
            assert others and all(os.getpriority(os.PRIO_PROCESS, t) == mine for t in others)
            tids = dp._pool.submit(lambda: __import__("threading").get_native_id()).result()
            assert os.getpriority(os.PRIO_PROCESS, tids) == min(19, mine + BACKGROUND_NICE)
            assert os.getpriority(os.PRIO_PROCESS, 0) == mine
        finally:
            await dp.close()
            await p.close()
            other.destroy(linger=0)

    asyncio.run(main())


def test_a_flooding_peer_is_rate_limited_and_others_are_served(keydir, monkeypatch):
    monkeypatch.setattr(peerlink, "PEER_MAX_RATE", 100.0)

    async def main():
        n0 = await Node(security(keydir, 0)).start()
        n1 = await Node(security(keydir, 1)).start()
        n2 = await Node(security(keydir, 2)).start()
        try:
            c1 = n1.client(0, n0.server.endpoint, timeout=5)
            c2 = n2.client(0, n0.server.endpoint, timeout=5)
            results = await asyncio.gather(*(c1.request("heartbeat", {"gen": 1}) for _ in range(600)),
                                           return_exceptions=True)
            limited = [r for r in results if isinstance(r, UnavailableError)]
            assert limited and all("rate limit" in str(e) and "node 1" in str(e) for e in limited)
            assert len(results) - len(limited) >= 200  # the burst, at least
            assert (await c2.request("heartbeat", {"gen": 1})).fields["src"] == 2  # node 2 is not held back
        finally:
            for n in (n0, n1, n2):
                await n.close()

    run(main())
