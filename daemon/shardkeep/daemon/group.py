"""The daemon's place in its group: peer sockets, HELLO and generations, heartbeats, health.

Every peer message arrives with its sender's index taken from the sender's
CURVE key (peerlink), never from a field the sender wrote.  On start a daemon
sends HELLO to every peer until each answered once; a HELLO carries the key
the sender wants on data frames addressed to it, and the reply carries the
receiver's, so one exchange keys both directions of the data plane.  A node
with no recorded generation (fresh, or a replacement with an empty state dir)
first asks its peers for one.  Heartbeats go out every ``heartbeat`` seconds;
a peer silent for ``peer_down`` seconds is down and the group is degraded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from shardkeep.proto.errors import PermissionDeniedError, ProtocolError, ShardkeepError

from .codec import CodecPool, make_spec
from .groupcommit import GroupCommit
from .membership import Membership
from .peerlink import (
    ControlClient,
    ControlServer,
    DataPlane,
    PeerContext,
    PeerMessage,
    PeerSecurity,
    new_session_key,
    split_address,
)
from .stripes import Placement

log = logging.getLogger("shardkeep.group")


def _with_host(endpoint: str, host: str) -> str:
    _, _, port = split_address(endpoint)
    return f"tcp://{host}:{port}"


class Group:
    def __init__(self, cfg: Any, instance: str, codec: str, on_fenced: Callable[[str], None],
                 on_skip: Callable[[int, dict], None] | None = None) -> None:
        self.cfg = cfg
        self.instance = instance
        self.codec = codec
        self.on_fenced = on_fenced
        self.on_skip = on_skip
        self.on_persist_done: Callable[[int, dict, bytes], None] | None = None  # the persist tier's coordinator
        self.on_fetch_reply: Callable[[int, dict, Any], Any] | None = None     # remote reads (reads.py)
        self.node: int = cfg.node
        self.n = len(cfg.peers)
        self.placement = Placement(self.n, cfg.parity)
        mode = "insecure" if cfg.insecure else "encrypt-data" if cfg.encrypt_data else "curve"
        self.security = PeerSecurity.from_files(mode, cfg.node, cfg.curve_secret or None,
                                                cfg.curve_public_dir or None)
        self.security.check_insecure_addresses(cfg.peers + ([cfg.advertise] if cfg.advertise else []))
        self.membership = Membership.load_or_new(cfg.state_dir, self.n, cfg.parity, codec, cfg.node, cfg.peers)
        self.pctx: PeerContext | None = None
        self.server: ControlServer | None = None
        self.data: DataPlane | None = None
        self.clients: dict[int, ControlClient] = {}
        self.greeted: set[int] = set()       # peers that answered our HELLO since we started
        self.control_endpoint = ""
        self.data_endpoint = ""
        self._tasks: list[asyncio.Task] = []
        self.started = time.monotonic()
        self.hello_errors: dict[int, str] = {}
        self.codec_pool: CodecPool | None = None
        self.gc: GroupCommit | None = None
        self._beats: dict[int, tuple[ControlClient, asyncio.Task]] = {}
        self._rekey: set[int] = set()           # peers whose data-plane keys went out of step: greet again
        self._rekeyed: dict[int, float] = {}    # when each was last rekeyed for that (one per heartbeat period)

    # --- lifecycle -------------------------------------------------------------------

    async def setup_codec(self, loop: asyncio.AbstractEventLoop, executor: Any) -> None:
        """Codec workers and the group-commit data path (the spec probe runs off the event loop)."""
        spec = await loop.run_in_executor(executor, make_spec, self.placement.k, self.placement.m, self.codec)
        self.codec_pool = CodecPool(workers=2)
        t = self.cfg.timeouts
        self.gc = GroupCommit(self.node, self.placement, spec, self.codec_pool, f"{self.cfg.shm_prefix}-g",
                              self._send_data, self._broadcast, executor, coordinator=self.coordinator,
                              ask=self._ask, tell=self._tell, live=self.live_peers,
                              resolve_timeout=t.peer_down * 2 + 5, commit_timeout=t.group_commit)

    def broadcast_soon(self, mtype: str, fields: dict) -> None:
        """A one-way message to every peer, sent from a task (for callers that cannot await)."""
        task = asyncio.get_running_loop().create_task(self._broadcast(mtype, fields))
        self._tasks.append(task)
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _tell(self, j: int, mtype: str, fields: dict) -> None:
        """A one-way control message to one peer."""
        await self.clients[j].send(mtype, {**fields, "gen": self.membership.gen},
                                   timeout=self.cfg.timeouts.heartbeat * 2)

    def live_peers(self) -> list[int]:
        return [j for j in self.membership.peers if self.peer_up(j)]

    def coordinator(self) -> int:
        """The node that decides group commits: the lowest-index live one (this node counts as live)."""
        return min([self.node, *self.live_peers()])

    async def _ask(self, j: int, mtype: str, fields: dict) -> dict:
        r = await self.clients[j].request(mtype, {**fields, "gen": self.membership.gen},
                                          timeout=self.cfg.timeouts.heartbeat * 2)
        return r.fields

    async def _send_data(self, dst: int, kind: str, meta: dict, payload: Any) -> None:
        assert self.data is not None
        await self.data.send(dst, kind, meta, payload, timeout=self.cfg.timeouts.rebuild_chunk)

    async def _broadcast(self, mtype: str, fields: dict, payload: list | None = None) -> None:
        async def one(j: int, c: ControlClient) -> None:
            try:
                await c.send(mtype, {**fields, "gen": self.membership.gen}, payload,
                             timeout=self.cfg.timeouts.heartbeat * 2)
            except ShardkeepError as exc:
                log.warning("node %d: %s to node %d not sent: %s", self.node, mtype, j, exc)

        await asyncio.gather(*(one(j, c) for j, c in list(self.clients.items())))

    def _on_data(self, msg: Any) -> Any:
        if msg.kind == "fetch-reply":
            try:
                if self.on_fetch_reply is None:
                    raise ProtocolError("this node reads nothing remotely")
                return self.on_fetch_reply(msg.src, msg.meta, msg.payload)
            except ShardkeepError as exc:
                log.warning("node %d: data from node %d refused: %s", self.node, msg.src, exc)
                return None
        if self.gc is not None:
            try:
                copy = self.gc.on_data(msg.src, msg.kind, msg.meta, msg.payload)
            except ShardkeepError as exc:
                log.warning("node %d: data from node %d refused: %s", self.node, msg.src, exc)
                return None
            return copy  # the data plane awaits the copy before it takes the next message
        return None

    async def start(self) -> None:
        cfg = self.cfg
        self.pctx = await PeerContext(self.security).start()
        self.server = ControlServer(self.pctx, cfg.peers[self.node], self._handle)
        bound = await self.server.start()
        _, bind_host, _ = split_address(bound)
        host = cfg.advertise or bind_host
        self.control_endpoint = _with_host(bound, host)
        self.data = DataPlane(self.pctx, bind_host, cfg.data_port, on_message=self._on_data)
        self.data.on_unkeyed = self._rekey_soon
        self.data_endpoint = _with_host(await self.data.start(), host)
        for j, rec in self.membership.peers.items():
            self.clients[j] = ControlClient(self.pctx, j, rec.control, timeout=cfg.timeouts.client_request).connect()
        self._tasks = [asyncio.create_task(self._hello_loop(), name="sk-hello"),
                       asyncio.create_task(self._heartbeat_loop(), name="sk-heartbeat")]
        log.info("group %s: node %d of %d (parity %d, %s), control %s, data %s",
                 self.membership.group, self.node, self.n, self.cfg.parity, self.security.mode,
                 self.control_endpoint, self.data_endpoint)

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every peer socket; each step bounded, so a stuck socket never keeps the daemon up."""
        tasks = self._tasks + [t for _, t in self._beats.values()]
        for t in tasks:
            t.cancel()
        closers = [("tasks", asyncio.gather(*tasks, return_exceptions=True))]
        closers += [(f"client {j}", c.close()) for j, c in self.clients.items()]
        closers += [("data plane", self.data.close())] if self.data else []
        closers += [("control server", self.server.close())] if self.server else []
        for what, aw in closers:
            try:
                await asyncio.wait_for(aw, timeout)
            except (asyncio.TimeoutError, Exception) as exc:
                log.warning("closing %s: %r", what, exc)
        if self.gc is not None:
            self.gc.close_kept()  # group-level parity stays for the next daemon; the rest goes
        if self.codec_pool is not None:
            self.codec_pool.close()
        if self.pctx:
            try:
                await asyncio.wait_for(self.pctx.close(), timeout)
            except (asyncio.TimeoutError, Exception) as exc:
                log.warning("closing the peer context: %r", exc)

    # --- HELLO -------------------------------------------------------------------------

    def _hello_fields(self, gen: int, key: bytes) -> dict:
        m = self.membership
        return {"group": m.group, "node": self.node, "gen": gen, "control": self.control_endpoint,
                "data": self.data_endpoint, "instance": self.instance, "key": key,
                "n": self.n, "m": m.m, "codec": m.codec}

    async def _ask_generation(self) -> int | None:
        """A node without a recorded generation asks the survivors for one (the highest answer wins)."""
        answers = []
        for j, c in self.clients.items():
            try:
                r = await c.request("hello", self._hello_fields(0, new_session_key()),
                                    timeout=self.cfg.timeouts.heartbeat * 2)
                answers.append(int(r.fields.get("assigned_gen", 1)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.hello_errors[j] = str(exc)
        return max(answers) if answers else None

    async def _greet(self, j: int) -> None:
        assert self.data is not None
        key = new_session_key()
        self.data.set_recv_key(j, key)
        try:
            r = await self.clients[j].request("hello", self._hello_fields(self.membership.gen, key),
                                             timeout=self.cfg.timeouts.heartbeat * 2)
        except PermissionDeniedError as exc:
            if exc.details.get("stand_down"):
                self.on_fenced(str(exc))
            raise
        f = r.fields
        if not isinstance(f.get("key"), bytes) or not isinstance(f.get("data"), str):
            raise ProtocolError(f"node {j} answered HELLO without a data key and address")
        rec = self.membership.peers[j]
        gen = int(f.get("gen", 0))
        if 0 < gen < rec.gen:
            raise PermissionDeniedError(f"node {j} at {rec.control} answers as generation {gen}, but generation "
                                        f"{rec.gen} replaced it; not using it")
        self.data.set_send_key(j, f["key"])
        rec.gen = max(rec.gen, gen)
        rec.instance = str(f.get("instance", ""))
        if rec.data != f["data"]:
            rec.data = f["data"]
        self.data.connect(j, rec.data)
        self.membership.save(self.cfg.state_dir)
        self.greeted.add(j)
        self.hello_errors.pop(j, None)
        log.info("node %d: HELLO answered by node %d (generation %d, data %s)", self.node, j, rec.gen, rec.data)

    async def _hello_loop(self) -> None:
        period = self.cfg.timeouts.heartbeat
        while self.membership.gen == 0:
            gen = await self._ask_generation()
            if gen is not None:
                self.membership.gen = gen
                self.membership.save(self.cfg.state_dir)
                log.info("node %d: joined group %s as generation %d", self.node, self.membership.group, gen)
                break
            await asyncio.sleep(period)
        async def greet(j: int) -> None:
            try:
                await self._greet(j)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.hello_errors[j] = str(exc)
                c = self.clients.get(j)
                # ZeroMQ never retries a connection whose CURVE handshake the peer refused: after a key
                # rotation (the peer learns our new key after we started) or a late key deployment the
                # socket would stay refused for good. A fresh socket handshakes again.
                if c is not None and c.state in ("refused", "handshake-failed") and \
                        time.monotonic() - c.state_since >= 2 * period:
                    log.info("node %d: connection to node %d %s; trying afresh", self.node, j, c.state)
                    self._replace_client(j, c.address)

        while True:
            # never greeted, or greeted but silent since: a peer that restarted may have lost our key and, if it
            # was started with a stale --peers, our address (a replacement moved); our HELLO gives it both
            # and a peer whose data we had to drop for an unknown key (the keys went out of step): one fresh
            # HELLO exchange rekeys both directions
            todo = [j for j in list(self.clients) if j not in self.greeted or not self.peer_up(j) or j in self._rekey]
            for j in todo:
                if j in self._rekey:
                    self._rekey.discard(j)
                    self._rekeyed[j] = time.monotonic()
                    log.info("node %d: data from node %d came under a key this node no longer holds: "
                             "greeting it again to rekey", self.node, j)
            if todo:
                await asyncio.gather(*(greet(j) for j in todo))  # a dead peer's timeout delays no other
            await asyncio.sleep(period)

    async def _heartbeat_loop(self) -> None:
        period = self.cfg.timeouts.heartbeat
        was_down: set[int] = set()
        while True:
            down = {j for j in self.membership.peers if not self.peer_up(j) and j in self.greeted}
            if down - was_down and self.gc is not None:
                log.warning("node %d: node(s) %s down", self.node, sorted(down - was_down))
                self.gc.peers_down(down)
            was_down = down
            if self.membership.gen:
                fields = {"gen": self.membership.gen, "degraded": self.degraded, "time": time.time()}
                # one task per peer, never awaited here: a dead peer's send timeout, or a client
                # replaced (closed) in the middle of a send, must not delay the others' heartbeats
                for j, c in list(self.clients.items()):
                    prev = self._beats.get(j)
                    if prev is not None and prev[0] is c and not prev[1].done():
                        continue
                    self._beats[j] = (c, asyncio.create_task(self._beat(j, c, fields, period)))
            await asyncio.sleep(period)

    async def _beat(self, j: int, c: ControlClient, fields: dict, period: float) -> None:
        try:
            # wait_for as well: a client replaced (closed) mid-send must not hang the loop
            await asyncio.wait_for(c.send("heartbeat", fields, timeout=period), period * 1.5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the loop must outlive any one peer's trouble
            log.debug("heartbeat to node %d: %r", j, exc)

    # --- incoming ------------------------------------------------------------------------

    async def _handle(self, msg: PeerMessage) -> Any:
        if msg.type == "hello":
            return await self._on_hello(msg)
        rec = self.membership.peers.get(msg.src)
        gen = msg.fields.get("gen")
        if rec is not None and isinstance(gen, int) and gen < rec.gen:
            raise PermissionDeniedError(f"node {msg.src} generation {gen} was replaced by {rec.gen}: stand down",
                                        stand_down=True)
        if msg.type == "heartbeat":
            return None
        if msg.type in ("local-commit", "ack", "committed", "abort") and self.gc is not None:
            self.gc.on_control(msg.src, msg.type, msg.fields, msg.payload)
            return None
        if msg.type == "skip":
            if self.on_skip is not None:
                self.on_skip(msg.src, msg.fields)
            return None
        if msg.type == "persist-done":
            if self.on_persist_done is None:
                raise ProtocolError(f"node {self.node} has no persist tier (--persist-dir)")
            frame = msg.payload[0]
            self.on_persist_done(msg.src, msg.fields, frame.bytes if hasattr(frame, "bytes") else bytes(frame))
            return {}
        if msg.type == "pull" and self.gc is not None:
            self.gc._spawn(self.gc.serve_pull(msg.src, msg.fields))
            return None
        if msg.type == "outcome" and self.gc is not None:
            return {"outcome": self.gc.outcome(msg.fields["job"], msg.fields["step"], msg.fields.get("epoch", 0))}
        if msg.type == "inventory" and self.gc is not None:
            return {"versions": self.gc.inventory()}
        if msg.type == "fetch" and self.gc is not None:
            return await self.gc.serve_fetch(msg.fields, msg.src)
        raise ProtocolError(f"peer message {msg.type!r} is not served by this version")

    def _rekey_soon(self, j: int) -> None:
        """The data plane dropped a message from ``j`` for an unknown key (HELLOs queued in both directions
        during a partition, delivered in a burst when it heals, can leave the two nodes on keys the other
        no longer holds): the hello loop greets ``j`` again, at most once per heartbeat period."""
        if j in self.clients and time.monotonic() - self._rekeyed.get(j, -1e9) >= self.cfg.timeouts.heartbeat:
            self._rekey.add(j)

    def _replace_client(self, j: int, address: str) -> None:
        old = self.clients.get(j)
        self.clients[j] = ControlClient(self.pctx, j, address, timeout=self.cfg.timeouts.client_request).connect()
        if old is not None:
            asyncio.create_task(old.close())

    async def _on_hello(self, msg: PeerMessage) -> dict:
        f, src = msg.fields, msg.src
        self.membership.check_group(f)
        accepted, gen = self.membership.accept_hello(src, f["gen"])
        if not accepted:
            return {"assigned_gen": gen}
        assert self.data is not None
        rec = self.membership.peers[src]
        before = (rec.gen, rec.instance, rec.control, rec.data)
        replaced = gen > rec.gen and rec.gen > 0
        rec.gen, rec.instance = gen, str(f.get("instance", ""))
        if f["control"] != rec.control:
            log.info("node %d: node %d now answers at %s (was %s)", self.node, src, f["control"], rec.control)
            rec.control = f["control"]
            self._replace_client(src, rec.control)
        rec.data = f["data"]
        if replaced:  # nothing the old node holds may verify any more (a fenced node stays unheard)
            self.data.forget_peer_keys(src)
        if isinstance(f.get("key"), bytes):
            self.data.set_send_key(src, f["key"])
        mine = new_session_key()
        self.data.set_recv_key(src, mine)
        self.data.connect(src, rec.data)
        if (rec.gen, rec.instance, rec.control, rec.data) != before:  # (a burst of HELLOs after a heal: no writes)
            self.membership.save(self.cfg.state_dir)
        if replaced:
            log.warning("node %d: node %d is a replacement, generation %d", self.node, src, gen)
        return {"key": mine, "gen": self.membership.gen, "data": self.data_endpoint, "instance": self.instance}

    # --- health --------------------------------------------------------------------------

    def peer_up(self, j: int) -> bool:
        seen = self.server.last_seen.get(j) if self.server else None
        return seen is not None and time.monotonic() - seen < self.cfg.timeouts.peer_down

    @property
    def degraded(self) -> bool:
        return any(not self.peer_up(j) for j in self.membership.peers)

    def status(self) -> dict:
        now = time.monotonic()
        m = self.membership
        peers = []
        for j, rec in sorted(m.peers.items()):
            seen = self.server.last_seen.get(j) if self.server else None
            peers.append({
                "node": j, "control": rec.control, "data": rec.data, "generation": rec.gen,
                "up": self.peer_up(j), "last_seen_s": None if seen is None else round(now - seen, 2),
                "greeted": j in self.greeted, "error": self.hello_errors.get(j, ""),
            })
        return {
            "group": m.group, "node": self.node, "n": self.n, "parity": m.m, "codec": m.codec,
            "generation": m.gen, "security": self.security.mode, "control": self.control_endpoint,
            "data": self.data_endpoint, "degraded": self.degraded, "coordinator": self.coordinator(), "peers": peers,
            "forged_data_frames_dropped": self.data.forged_dropped if self.data else 0,
            "refused_connections": self.pctx.refused_connections if self.pctx else 0,
            "control_messages": {"received": self.server.received if self.server else 0,
                                 "rejected": self.server.rejected if self.server else 0},
            "client_states": {str(j): c.state for j, c in self.clients.items()},
            "versions": [
                {"job": job, "step": step, "epoch": epoch, "sizes_from": sorted(v.sizes), "manifests_from": sorted(v.manifests),
                 "parity_stripes": sorted(v.stored), "acks_from": sorted(v.acks),
                 "decision": v.decided or "pending", "group_committed": v.decided == "commit",
                 "timing": self.gc.timing(v)}
                for (job, step, epoch), v in sorted(self.gc.versions.items())
            ] if self.gc is not None else [],
            "recent_commits": list(self.gc.recent) if self.gc is not None else [],
            "segments": {**self.gc.segment_bytes(), "created": dict(self.gc.segments_created),
                         "reused": dict(self.gc.segments_reused)} if self.gc is not None else {},
        }
