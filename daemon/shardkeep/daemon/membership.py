"""Group membership records: who is node i, at which addresses, in which generation (pure + a file).

A group is an ordered list of ``n`` daemons.  Its id hashes ``n``, ``m`` and the
codec name, not the addresses, so a replacement may come at a new address.  A
node's generation starts at 1; a replacement (empty state dir) is given
``g + 1`` by the survivors, where ``g`` is the highest they recorded for its
index; a node presenting a lower generation than recorded is told to stand
down.  Records live in ``<state-dir>/membership.msgpack`` (written atomically).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import msgpack
import xxhash

from shardkeep.proto.errors import PermissionDeniedError, ProtocolError

STATE_FILE = "membership.msgpack"


def group_id(n: int, m: int, codec: str) -> str:
    return xxhash.xxh3_64_hexdigest(f"shardkeep-group:{n}:{m}:{codec}".encode())


@dataclass
class PeerRecord:
    node: int
    control: str
    data: str = ""
    gen: int = 0
    instance: str = ""


@dataclass
class Membership:
    group: str
    n: int
    m: int
    codec: str
    node: int
    gen: int = 0                       # 0 until learned (fresh or replacement node)
    peers: dict[int, PeerRecord] = field(default_factory=dict)

    # --- persistence ---------------------------------------------------------------

    @classmethod
    def load_or_new(cls, state_dir: str, n: int, m: int, codec: str, node: int, addresses: list[str]) -> "Membership":
        gid = group_id(n, m, codec)
        mem = cls(gid, n, m, codec, node)
        for i, a in enumerate(addresses):
            if i != node:
                mem.peers[i] = PeerRecord(i, a)
        path = os.path.join(state_dir, STATE_FILE)
        try:
            with open(path, "rb") as f:
                raw = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
        except FileNotFoundError:
            return mem
        if not isinstance(raw, dict) or raw.get("group") != gid or raw.get("node") != node:
            raise ValueError(
                f"{path} belongs to another group or node (group {raw.get('group') if isinstance(raw, dict) else '?'}, "
                f"node {raw.get('node') if isinstance(raw, dict) else '?'}; this daemon: group {gid}, node {node}); "
                "use an empty --state-dir for a new member"
            )
        mem.gen = int(raw.get("gen", 0))
        for i, rec in (raw.get("peers") or {}).items():
            i = int(i)
            if i in mem.peers and isinstance(rec, dict):
                # the command line's address wins; a replacement may have moved, HELLO corrects it
                mem.peers[i].gen = int(rec.get("gen", 0))
                mem.peers[i].data = str(rec.get("data", ""))
        return mem

    def save(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        data = msgpack.packb({
            "group": self.group, "node": self.node, "gen": self.gen,
            "peers": {i: {"control": p.control, "data": p.data, "gen": p.gen} for i, p in self.peers.items()},
        }, use_bin_type=True)
        fd, tmp = tempfile.mkstemp(dir=state_dir, prefix=".membership-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(state_dir, STATE_FILE))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    # --- HELLO rules (pure) ------------------------------------------------------------

    def check_group(self, fields: dict) -> None:
        theirs = (fields.get("group"), fields.get("n"), fields.get("m"), fields.get("codec"))
        mine = (self.group, self.n, self.m, self.codec)
        if theirs[0] != mine[0]:
            raise ProtocolError(
                f"group mismatch: peer has n={theirs[1]} m={theirs[2]} codec={theirs[3]} (group {theirs[0]}), "
                f"this node has n={mine[1]} m={mine[2]} codec={mine[3]} (group {mine[0]})",
                peer=list(theirs), mine=list(mine),
            )

    def accept_hello(self, src: int, gen: int) -> tuple[bool, int]:
        """(accepted, generation to tell the sender) for a HELLO from node ``src`` at ``gen``.

        ``gen == 0`` asks for a generation: the answer is one above the highest
        recorded (or 1).  A lower generation than recorded must stand down.
        """
        if src == self.node or src not in self.peers:
            raise ProtocolError(f"node {src} is not a peer of node {self.node} in a group of {self.n}")
        rec = self.peers[src]
        if gen == 0:
            return False, rec.gen + 1
        if gen < rec.gen:
            raise PermissionDeniedError(
                f"node {src} presents generation {gen} but generation {rec.gen} replaced it: stand down",
                stand_down=True, recorded=rec.gen, presented=gen,
            )
        return True, gen
