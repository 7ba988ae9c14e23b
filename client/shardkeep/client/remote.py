"""Read any version of a job from any node of its group: where its ranks are, and their bytes.

``Version(job).locate(step)`` asks the local daemon (``locate``) for every
rank's manifest; ``open(rank, need)`` gives tensor views of that rank's data:
mapped from this node's shared memory (``open``/``release``, pinned while used)
or fetched from the node that holds it (``read``, over the peer data plane),
every manifest chunk used checked against its xxh3 checksum either way. The
DCP reader and ``shardkeep export`` sit on top of it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import Any

import msgpack
import torch

from shardkeep.proto import wire
from shardkeep.proto.config import DEFAULT_TIMEOUTS, default_socket
from shardkeep.proto.errors import IntegrityError, NotFoundError, ProtocolError, ShardkeepError
from shardkeep.proto.leaves import unpack_skeleton
from shardkeep.proto.manifest import Manifest, checksum
from shardkeep.proto.transport import Channel

from .copier import dst_view
from .shm import SlotMaps
from .snapshotter import _torch_dtype, open_manifest

log = logging.getLogger("shardkeep.remote")

READS_IN_FLIGHT = 4   # remote read requests of one reader at a time


@dataclasses.dataclass
class RankAt:
    node: int
    offset: int         # of this rank's data in its node's payload
    manifest: Manifest
    skeleton: Any       # its non-tensor state, TensorRefs for the tensors


class Version:
    """One version of a job, located across the group."""

    def __init__(self, job: str, *, socket: str | None = None, token: str | None = None,
                 timeout: float = DEFAULT_TIMEOUTS.client_request) -> None:
        self.job = job
        self.socket = socket or default_socket()
        self.token = token if token is not None else os.environ.get("SHARDKEEP_JOB_TOKEN") or None
        self.timeout = timeout
        self.step: int | None = None
        self.epoch = 0
        self.node = 0
        self.level = ""
        self.ranks: dict[int, RankAt] = {}
        self.bytes_local = 0
        self.bytes_remote = 0
        self._chan: Channel | None = None
        self._maps = SlotMaps()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._chans: list[Channel] = []
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _request(self, mtype: str, fields: dict) -> wire.Message:
        if self._chan is None:
            self._chan = Channel(self.socket, timeout=self.timeout)
        if self.token:
            fields = {**fields, "token": self.token}
        reply = self._chan.request(mtype, fields)
        if "fd_socket" in reply.fields:
            self._maps.use_fd_socket(str(reply.fields["fd_socket"]), self.job, self.token)
        return reply

    def _channel(self) -> Channel:
        """A channel of this thread's own (remote reads run on several threads)."""
        ch = getattr(self._local, "chan", None)
        if ch is None:
            ch = self._local.chan = Channel(self.socket, timeout=self.timeout)
            with self._lock:
                self._chans.append(ch)
        return ch

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(READS_IN_FLIGHT, thread_name_prefix="shardkeep-read")
        return self._executor

    def locate(self, step: int | None = None) -> "Version":
        """Find ``step`` (default: the newest; at group level where there is one) and every rank of it."""
        fields: dict[str, Any] = {"job": self.job}
        if step is not None:
            fields["step"] = step
        r = self._request("locate", fields)
        self.step, self.epoch, self.node = int(r.fields["step"]), int(r.fields.get("epoch", 0)), int(r.fields["node"])
        self.level = str(r.fields.get("level", ""))
        if len(r.payload) != 1:
            raise ProtocolError("locate reply without its manifests")
        try:
            by_node = msgpack.unpackb(r.payload[0].bytes if hasattr(r.payload[0], "bytes") else r.payload[0],
                                      raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise IntegrityError(f"locate: manifests unreadable: {exc!r}") from None
        ranks = self._ranks(by_node)
        world = {m.manifest.world_size for m in ranks.values()}
        whole = len(world) == 1 and sorted(ranks) == list(range(next(iter(world))))
        if self.level == "local" and not whole:
            raise NotFoundError(
                f"job {self.job!r} step {self.step} is not at group level (the group keeps each job's newest "
                f"group-level version); only the ranks on this node, {sorted(ranks)}, can be read, of a "
                f"world of {sorted(world)}: read the newest version, or from a node that holds every rank")
        if not whole:
            raise NotFoundError(f"job {self.job!r} step {self.step}: the group holds ranks {sorted(ranks)} of a "
                                f"world of {sorted(world)}; a rank's node is missing (recover it first)")
        self.ranks = ranks
        return self

    def _ranks(self, by_node: dict) -> dict[int, RankAt]:
        ranks: dict[int, RankAt] = {}
        for node, mine in sorted(by_node.items()):
            if isinstance(mine, (bytes, bytearray)):  # a node's manifests as it sent them with its local-commit
                mine = msgpack.unpackb(mine, raw=False, strict_map_key=False)
            offset = 0
            for rank in sorted(mine):
                try:
                    m = Manifest.decode(mine[rank], 1 << 62)
                    sk = unpack_skeleton(m.skeleton)
                except ProtocolError as exc:
                    raise IntegrityError(f"rank {rank} step {self.step}: manifest unreadable: {exc}") from None
                if (m.job, m.rank, m.step) != (self.job, int(rank), self.step):
                    raise IntegrityError(f"locate: node {node} sent the manifest of {m.job!r} rank {m.rank} step "
                                         f"{m.step} for rank {rank} of {self.job!r} step {self.step}")
                ranks[int(rank)] = RankAt(int(node), offset, m, sk)
                offset += m.data_bytes
        return ranks

    def use(self, step: int, node: int, by_node: dict, epoch: int = 0, level: str = "group") -> "Version":
        """Take the version's manifests as given (``{node: {rank: manifest}}``, what ``locate`` returns) rather
        than ask: the persist tier's worker gets them from its daemon, which pinned the version."""
        self.step, self.node, self.epoch, self.level = step, node, epoch, level
        self.ranks = self._ranks(by_node)
        return self

    def open(self, rank: int, need: set[int]):
        """A context manager: {tensor index: view} of ``rank``'s tensors ``need``, verified."""
        info = self.ranks[rank]
        return _LocalRank(self, rank, info, need) if info.node == self.node else _RemoteRank(self, rank, info, need)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for ch in self._chans:
            ch.close()
        self._chans.clear()
        self._local = threading.local()
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        self._maps.clear()


def _chunks_of(m: Manifest, need: set[int]) -> list[int]:
    """The manifest chunks (checksummed units) that hold the needed tensors."""
    out: set[int] = set()
    for i in need:
        e = m.tensors[i]
        if e.nbytes:
            out.update(range(e.offset // m.chunk, (e.offset + e.nbytes - 1) // m.chunk + 1))
    return sorted(out)


def _verify(m: Manifest, data: torch.Tensor, chunks: list[int], where: str) -> None:
    mv = memoryview(data.numpy())
    try:
        for c in chunks:
            a, b = c * m.chunk, min((c + 1) * m.chunk, m.data_bytes)
            if checksum(mv[a:b]) != m.checksums[c]:
                raise IntegrityError(f"{where}: checksum mismatch in chunk {c} (bytes {a}..{b})", chunk=c)
    finally:
        mv.release()


def _views(m: Manifest, region: torch.Tensor, need: set[int]) -> dict[int, torch.Tensor]:
    return {i: dst_view(region, m.tensors[i], _torch_dtype(m.tensors[i].dtype)) for i in need}


class _LocalRank:
    """A rank this node holds: pin its slot, map it, verify the chunks read, unpin."""

    def __init__(self, reader: "Version", rank: int, info: RankAt, need: set[int]) -> None:
        self.r, self.rank, self.info, self.need = reader, rank, info, need
        self.pin: str | None = None

    def __enter__(self) -> dict[int, torch.Tensor]:
        r = self.r
        reply = r._request("open", {"job": r.job, "rank": self.rank, "step": r.step})
        self.pin = reply.fields["pin"]
        try:
            return self._views(reply)
        except IntegrityError as exc:  # reported, as restore() does: the daemon drops the damaged version
            self._release(str(exc))
            raise
        except BaseException:
            self._release(None)
            raise

    def _views(self, reply: wire.Message) -> dict[int, torch.Tensor]:
        r, m = self.r, self.info.manifest
        desc = reply.fields["slot"]
        mapping, local, _ = open_manifest(r._maps, reply, f"rank {self.rank} step {r.step}")
        if local.checksums != m.checksums or local.data_bytes != m.data_bytes:
            raise IntegrityError(f"rank {self.rank} step {r.step}: the local slot does not hold the located version")
        doff = desc["data_offset"]
        region = mapping.u8[doff : doff + max(m.data_bytes, 1)]
        _verify(m, region, _chunks_of(m, self.need), f"rank {self.rank} step {r.step}")
        r.bytes_local += sum(m.tensors[i].nbytes for i in self.need)
        return _views(m, region, self.need)

    def __exit__(self, *exc: Any) -> None:
        self._release(None)

    def _release(self, bad: str | None) -> None:
        if self.pin is None:
            return
        fields = {"job": self.r.job, "rank": self.rank, "pin": self.pin}
        if bad:
            fields.update(bad=True, reason=bad[:4000])
        self.pin = None
        try:
            self.r._request("release", fields)
        except ShardkeepError as e:
            log.warning("release of rank %d step %s failed: %s", self.rank, self.r.step, e)


class _RemoteRank:
    """A rank another node holds: its daemon brings the chunks of the needed tensors over the peer data plane
    into staging segments; copy them out, verify them."""

    def __init__(self, reader: "Version", rank: int, info: RankAt, need: set[int]) -> None:
        self.r, self.rank, self.info, self.need = reader, rank, info, need

    def __enter__(self) -> dict[int, torch.Tensor]:
        r, m = self.r, self.info.manifest
        buf = torch.empty(max(m.data_bytes, 1), dtype=torch.uint8)  # pages appear only where chunks land
        chunks = _chunks_of(m, self.need)
        runs: list[list[int]] = []
        for c in chunks:
            if runs and runs[-1][1] == c * m.chunk:
                runs[-1][1] = min((c + 1) * m.chunk, m.data_bytes)
            else:
                runs.append([c * m.chunk, min((c + 1) * m.chunk, m.data_bytes)])
        pieces = [(off, min(wire.MAX_READ, b - off)) for a, b in runs for off in range(a, b, wire.MAX_READ)]

        def fetch(piece: tuple[int, int]) -> None:
            off, n = piece
            fields = {"job": r.job, "step": r.step, "epoch": r.epoch, "node": self.info.node,
                      "offset": self.info.offset + off, "length": n, **({"token": r.token} if r.token else {})}
            ch = r._channel()
            reply = ch.request("read", fields)
            # the daemon brought the bytes over the peer data plane into a staging segment: map, copy, done
            if "fd_socket" in reply.fields:
                r._maps.use_fd_socket(str(reply.fields["fd_socket"]), r.job, r.token)
            rid = str(reply.fields.get("read", ""))
            try:
                name, size = str(reply.fields["segment"]), int(reply.fields["size"])
                if size < n:
                    raise IntegrityError(f"read of {n} bytes of rank {self.rank}: a staging segment of {size}")
                buf[off : off + n].copy_(r._maps.get(name, size).u8[:n])
            except KeyError as exc:
                raise ProtocolError(f"read reply without {exc}") from None
            finally:
                try:
                    if rid:
                        ch.request("read-done", {"job": r.job, "read": rid,
                                                 **({"token": r.token} if r.token else {})})
                except ShardkeepError as exc:  # the daemon drops it at its lease anyway
                    log.debug("read-done %s: %s", rid, exc)

        # a few requests in flight: the peer copies the next piece out of shm while one travels
        list(r._pool().map(fetch, pieces))
        r.bytes_remote += sum(n for _, n in pieces)
        _verify(m, buf, chunks, f"rank {self.rank} step {r.step} (from node {self.info.node})")
        return _views(m, buf, self.need)

    def __exit__(self, *exc: Any) -> None:
        pass
