"""Code that runs inside codec worker processes (and the one-off spec probe).

The daemon never runs pyeclib itself: :class:`shardkeep.daemon.codec.CodecPool` starts this module in
separate processes (``python -I -c <bootstrap> worker FD``) with glibc's malloc tuned through the
environment, and talks to it over a socketpair: msgpack messages in the length-prefixed frames of
:mod:`multiprocessing.connection` (`send_bytes`; never pickled objects). A worker
serves one request at a time: encode or reconstruct a range of sub-stripes of one stripe, reading and
writing the stripe's chunks directly in ``/dev/shm`` segments that it maps by name (and keeps mapped,
LRU-bounded, because the daemon reuses the same segments every snapshot). It never creates, resizes
or unlinks a file.

Only ``bytes`` objects are handed to pyeclib (a ``bytearray`` or ``memoryview`` given to
decode/reconstruct aborts the process inside liberasurecode).

Replies are ``("ok", result)`` or ``("err", kind, message)`` with kind ``"value"`` (bad arguments,
:class:`ValueError` in the caller), ``"integrity"`` (pyeclib or header errors about fragments) or
``"internal"`` (a bug; the message carries the traceback). This module imports nothing from shardkeep so
that a worker starts fast and depends only on the standard library and pyeclib.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import stat
import struct
import sys
import time
import traceback
from collections import OrderedDict
from typing import Any

import msgpack


def _send(conn: Any, obj: Any) -> None:
    """msgpack over the worker's socketpair: nothing in shardkeep is ever unpickled."""
    conn.send_bytes(msgpack.packb(obj, use_bin_type=True))


def _recv(conn: Any) -> Any:
    return msgpack.unpackb(conn.recv_bytes(), raw=False, strict_map_key=False)

FRAGMENT_HEADER = 80
SHM_DIR = "/dev/shm"
MAX_MAPPINGS = 64

# liberasurecode's fragment header (little endian, packed): idx u32 @0, size u32 @4,
# frag_backend_metadata_size u32 @8, orig_data_size u64 @12, ..., magic u32 @59.
_HDR = struct.Struct("<IIIQ")
_MAGIC_OFF = 59
_MAGIC = 0x0B0C5ECC

# Test-only fault hook, read from SHARDKEEP_CODEC_TEST_SLEEP at worker start: seconds to sleep before
# each sub-stripe, so that tests can kill a worker or pass a deadline in the middle of a call.
_TEST_SLEEP = 0.0


class FragmentError(Exception):
    """A fragment (header or payload) is unusable; the caller raises IntegrityError."""


# --- shm mappings ------------------------------------------------------------------------------------


class _Mapping:
    __slots__ = ("name", "key", "size", "mm", "mv", "writable", "pins")

    def __init__(self, name: str, key: tuple, size: int, mm: mmap.mmap | None, writable: bool) -> None:
        self.name = name
        self.key = key
        self.size = size
        self.mm = mm
        self.mv = memoryview(mm) if mm is not None else memoryview(b"")
        self.writable = writable
        self.pins = 0

    def close(self) -> bool:
        try:
            self.mv.release()
            if self.mm is not None:
                self.mm.close()
            return True
        except BufferError:  # a view is still exported; try again at the next eviction
            return False


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid shm segment name {name!r} (a file name in {SHM_DIR}, without '/')")
    return name


class SegmentCache:
    """Open mappings of /dev/shm files by name, LRU-bounded; re-mapped when the file was replaced."""

    def __init__(self, max_open: int = MAX_MAPPINGS) -> None:
        self.max_open = max_open
        self.maps: OrderedDict[str, _Mapping] = OrderedDict()
        self._zombies: list[_Mapping] = []

    def acquire(self, name: str) -> _Mapping:
        name = check_name(name)
        path = os.path.join(SHM_DIR, name)
        try:
            st = os.lstat(path)  # a symlink is not a segment
        except FileNotFoundError:
            raise ValueError(f"shm segment {name!r} does not exist") from None
        except OSError as e:
            raise ValueError(f"shm segment {name!r}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"shm segment {name!r} is not a regular file")
        key = (st.st_dev, st.st_ino, st.st_size)
        m = self.maps.get(name)
        if m is not None and m.key == key:
            self._evict()
            self.maps.move_to_end(name)
            m.pins += 1
            return m
        if m is not None:  # replaced or resized by the daemon: drop the stale mapping
            del self.maps[name]
            if m.pins or not m.close():
                self._zombies.append(m)
        m = self._map(name, path)
        self.maps[name] = m
        m.pins += 1
        self._evict()
        return m

    def release(self, m: _Mapping) -> None:
        m.pins -= 1
        if m.pins == 0:
            self._evict()

    def _gone(self, name: str, m: _Mapping) -> bool:
        """The daemon unlinked (or replaced) the file: keeping it mapped would keep its memory alive."""
        try:
            st = os.lstat(os.path.join(SHM_DIR, name))
        except OSError:
            return True
        return (st.st_dev, st.st_ino, st.st_size) != m.key

    def _map(self, name: str, path: str) -> _Mapping:
        writable = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except PermissionError:
            writable = False
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except OSError as e:
                raise ValueError(f"shm segment {name!r}: {e.strerror}") from None
        except OSError as e:
            raise ValueError(f"shm segment {name!r}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"shm segment {name!r} is not a regular file")
            size = st.st_size
            key = (st.st_dev, st.st_ino, size)
            if size == 0:
                return _Mapping(name, key, 0, None, writable)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
            return _Mapping(name, key, size, mm, writable)
        finally:
            os.close(fd)

    def _evict(self) -> None:
        self._zombies = [z for z in self._zombies if z.pins or not z.close()]
        for name, m in list(self.maps.items()):  # segments the daemon removed (staging, old parity)
            if not m.pins and self._gone(name, m):
                del self.maps[name]
                if not m.close():
                    self._zombies.append(m)
        if len(self.maps) <= self.max_open:
            return
        for name in list(self.maps):
            if len(self.maps) <= self.max_open:
                break
            m = self.maps[name]
            if m.pins:
                continue
            del self.maps[name]
            if not m.close():
                self._zombies.append(m)

    def close(self) -> None:
        for m in list(self.maps.values()) + self._zombies:
            m.close()
        self.maps.clear()
        self._zombies.clear()


class Chunk:
    """One logical chunk laid out over a list of extents; ``limit`` = bytes that exist (read or written)."""

    __slots__ = ("parts", "total", "limit")

    def __init__(self, parts: list[tuple[memoryview, int]], total: int) -> None:
        self.parts = parts  # (view of the extent, logical start offset)
        self.total = total
        self.limit = total

    def gather(self, a: int, b: int, out: list) -> int:
        """Append views of logical bytes [a, b) clipped to ``limit``; return how many bytes were appended."""
        b = min(b, self.limit)
        got = 0
        if a >= b:
            return 0
        for view, start in self.parts:
            end = start + len(view)
            if end <= a:
                continue
            if start >= b:
                break
            lo = max(a, start) - start
            hi = min(b, end) - start
            out.append(view[lo:hi])
            got += hi - lo
        return got

    def scatter(self, a: int, src: memoryview) -> None:
        """Write ``src`` at logical offset ``a``, clipped to ``limit``."""
        b = min(a + len(src), self.limit)
        if a >= b:
            return
        for view, start in self.parts:
            end = start + len(view)
            if end <= a:
                continue
            if start >= b:
                break
            lo = max(a, start)
            hi = min(b, end)
            view[lo - start:hi - start] = src[lo - a:hi - a]


class _Resolver:
    """Resolves extent lists against the cache for one request and unpins everything afterwards."""

    def __init__(self, cache: SegmentCache) -> None:
        self.cache = cache
        self.held: list[_Mapping] = []
        self.by_name: dict[str, _Mapping] = {}

    def chunk(self, extents: Any, what: str, write: bool) -> Chunk:
        if not isinstance(extents, (list, tuple)):
            raise ValueError(f"{what}: extents must be a list of (name, offset, length)")
        parts: list[tuple[memoryview, int]] = []
        pos = 0
        for ext in extents:
            if not isinstance(ext, (list, tuple)) or len(ext) != 3:
                raise ValueError(f"{what}: extent {ext!r} is not (name, offset, length)")
            name, off, length = ext
            check_name(name)
            if type(off) is not int or type(length) is not int or off < 0 or length < 0:
                raise ValueError(f"{what}: extent {ext!r}: offset and length must be non-negative ints")
            m = self.by_name.get(name)
            if m is None:
                m = self.cache.acquire(name)
                self.held.append(m)
                self.by_name[name] = m
            if off + length > m.size:
                raise ValueError(f"{what}: extent {ext!r} ends at {off + length}, past the end of "
                                 f"segment {name!r} ({m.size} bytes)")
            if write and not m.writable:
                raise ValueError(f"{what}: shm segment {name!r} is not writable by the codec worker")
            if length:
                parts.append((m.mv[off:off + length], pos))
                pos += length
        return Chunk(parts, pos)

    def close(self) -> None:
        for m in self.held:
            self.cache.release(m)
        self.held.clear()
        self.by_name.clear()


# --- codec ---------------------------------------------------------------------------------------------


_DRIVERS: dict[tuple, Any] = {}
_ZEROS: dict[int, bytes] = {}


def _driver(k: int, m: int, ec_type: str):
    key = (k, m, ec_type)
    d = _DRIVERS.get(key)
    if d is None:
        from pyeclib.ec_iface import ECDriver, ECDriverError

        try:
            d = ECDriver(k=k, m=m, ec_type=ec_type)
        except ECDriverError as e:
            raise ValueError(f"pyeclib cannot create {ec_type} with k={k} m={m}: {e}") from None
        _DRIVERS[key] = d
    return d


def _zeros(n: int) -> memoryview:
    z = _ZEROS.get(n)
    if z is None:
        _ZEROS.clear()
        z = _ZEROS[n] = bytes(n)
    return memoryview(z)


def substripes(chunk_len: int, piece: int) -> int:
    return -(-chunk_len // piece) if chunk_len > 0 else 0


def check_header(h: bytes | memoryview, idx: int, k: int, piece: int, where: str) -> None:
    got_idx, size, _bms, orig = _HDR.unpack_from(h, 0)
    (magic,) = struct.unpack_from("<I", h, _MAGIC_OFF)
    if magic != _MAGIC:
        raise FragmentError(f"{where}: fragment header {idx} has a bad magic number ({magic:#x})")
    if got_idx != idx:
        raise FragmentError(f"{where}: fragment header {idx} carries index {got_idx}")
    if size != piece or orig != k * piece:
        raise FragmentError(f"{where}: fragment header {idx} says size {size}, original size {orig}; "
                            f"expected {piece} and {k * piece}")


def _check_spec(k: Any, m: Any, ec_type: Any, piece: Any) -> None:
    for v, what in ((k, "k"), (m, "m"), (piece, "piece")):
        if type(v) is not int or v < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if not isinstance(ec_type, str):
        raise ValueError(f"ec_type must be a str, got {ec_type!r}")


def _check_extent_lists(lists: Any, n: int, what: str) -> None:
    if not isinstance(lists, (list, tuple)) or len(lists) != n:
        raise ValueError(f"{what}: expected {n} extent lists")


def encode(k: int, m: int, ec_type: str, piece: int, data: list, chunk_len: int, parity_out: list,
           t0: int, t1: int) -> bytes:
    """Encode sub-stripes [t0, t1); write parity payloads; return their k+m headers per sub-stripe."""
    _check_spec(k, m, ec_type, piece)
    _check_extent_lists(data, k, "data")
    _check_extent_lists(parity_out, m, "parity_out")
    nsub = substripes(chunk_len, piece)
    if not (0 <= t0 <= t1 <= nsub):
        raise ValueError(f"sub-stripe range [{t0}, {t1}) outside [0, {nsub})")
    drv = _driver(k, m, ec_type)
    from pyeclib.ec_iface import ECDriverError

    res = _Resolver(_CACHE)
    try:
        dchunks = []
        for j, exts in enumerate(data):
            c = res.chunk(exts, f"data chunk {j}", write=False)
            if c.total > chunk_len:
                raise ValueError(f"data chunk {j}: extents hold {c.total} bytes, more than chunk_len {chunk_len}")
            dchunks.append(c)
        pchunks = []
        for p, exts in enumerate(parity_out):
            c = res.chunk(exts, f"parity chunk {k + p}", write=True)
            if c.total < nsub * piece:
                raise ValueError(f"parity chunk {k + p}: extents hold {c.total} bytes, "
                                 f"need {nsub * piece} ({nsub} sub-stripes of {piece})")
            c.limit = nsub * piece
            pchunks.append(c)
        headers: list = []
        flen = piece + FRAGMENT_HEADER
        for t in range(t0, t1):
            if _TEST_SLEEP:
                time.sleep(_TEST_SLEEP)
            a, b = t * piece, (t + 1) * piece
            pieces: list = []
            for c in dchunks:
                got = c.gather(a, b, pieces)
                if got < piece:
                    pieces.append(_zeros(piece - got))
            inp = b"".join(pieces)  # the one copy out of shm; pyeclib takes only bytes
            del pieces
            try:
                frags = drv.encode(inp)
            except ECDriverError as e:
                raise FragmentError(f"pyeclib encode of sub-stripe {t} failed: {e}") from None
            if len(frags) != k + m or any(len(f) != flen for f in frags):
                raise ValueError(f"{ec_type} k={k} m={m}: fragments of {[len(f) for f in frags]} bytes, "
                                 f"not piece {piece} + {FRAGMENT_HEADER}: piece size does not fit this code")
            for i, f in enumerate(frags):
                h = f[:FRAGMENT_HEADER]  # a small copy: never keep the whole fragment alive
                if t == t0:
                    try:
                        check_header(h, i, k, piece, "encode")
                    except FragmentError as e:
                        raise ValueError(f"unexpected pyeclib header layout: {e}") from None
                headers.append(h)
            for p, c in enumerate(pchunks):
                c.scatter(a, memoryview(frags[k + p])[FRAGMENT_HEADER:])
            del frags, inp
        return b"".join(headers)
    finally:
        res.close()


def reconstruct(k: int, m: int, ec_type: str, piece: int, have: dict, headers: bytes, chunk_len: int,
                want: dict, t0: int, t1: int) -> None:
    """Rebuild the chunks in ``want`` for sub-stripes [t0, t1); ``headers`` covers exactly that range."""
    _check_spec(k, m, ec_type, piece)
    n = k + m
    nsub = substripes(chunk_len, piece)
    if not (0 <= t0 <= t1 <= nsub):
        raise ValueError(f"sub-stripe range [{t0}, {t1}) outside [0, {nsub})")
    if not isinstance(headers, bytes) or len(headers) != (t1 - t0) * n * FRAGMENT_HEADER:
        raise ValueError(f"headers: need {(t1 - t0) * n * FRAGMENT_HEADER} bytes for sub-stripes [{t0}, {t1})")
    if not isinstance(have, dict) or not isinstance(want, dict):
        raise ValueError("have and want must be dicts {chunk index: extents}")
    for i in list(have) + list(want):
        if type(i) is not int or not 0 <= i < n:
            raise ValueError(f"chunk index {i!r} outside [0, {n})")
    if set(have) & set(want):
        raise ValueError(f"chunks {sorted(set(have) & set(want))} are both in have and want")
    if len(have) < k:
        raise ValueError(f"need at least k={k} available chunks, got {len(have)}")
    drv = _driver(k, m, ec_type)
    from pyeclib.ec_iface import ECDriverError

    res = _Resolver(_CACHE)
    try:
        use = sorted(have)[:k]  # data chunks first: no decoding needed for what is present
        src: dict[int, Chunk] = {}
        for i in use:
            c = res.chunk(have[i], f"chunk {i}", write=False)
            if i < k:
                if c.total > chunk_len:
                    raise ValueError(f"data chunk {i}: extents hold {c.total} bytes, more than chunk_len {chunk_len}")
            else:
                if c.total < nsub * piece:
                    raise ValueError(f"parity chunk {i}: extents hold {c.total} bytes, need {nsub * piece}")
                c.limit = nsub * piece
            src[i] = c
        dst: dict[int, Chunk] = {}
        for i in sorted(want):
            c = res.chunk(want[i], f"chunk {i}", write=True)
            if i < k:
                c.limit = min(c.total, chunk_len)
            else:
                if c.total < nsub * piece:
                    raise ValueError(f"parity chunk {i}: extents hold {c.total} bytes, need {nsub * piece}")
                c.limit = nsub * piece
            dst[i] = c
        hv = memoryview(headers)
        flen = piece + FRAGMENT_HEADER
        for t in range(t0, t1):
            if _TEST_SLEEP:
                time.sleep(_TEST_SLEEP)
            a, b = t * piece, (t + 1) * piece
            targets = [i for i, c in dst.items() if c.limit > a]
            if not targets:
                continue
            base = (t - t0) * n * FRAGMENT_HEADER
            frags = []
            for i in use:
                h = hv[base + i * FRAGMENT_HEADER: base + (i + 1) * FRAGMENT_HEADER]
                check_header(h, i, k, piece, f"sub-stripe {t}")
                parts: list = [h]
                got = src[i].gather(a, b, parts)
                if got < piece:
                    parts.append(_zeros(piece - got))
                frags.append(b"".join(parts))  # bytes only: anything else aborts liberasurecode
                del parts
            try:
                out = drv.reconstruct(frags, list(targets))
            except ECDriverError as e:
                raise FragmentError(f"pyeclib reconstruct of sub-stripe {t} (chunks {targets} from {use}) "
                                    f"failed: {type(e).__name__}: {e}") from None
            if len(out) != len(targets):
                raise FragmentError(f"pyeclib reconstruct of sub-stripe {t} returned {len(out)} fragments "
                                    f"for {len(targets)} wanted")
            for i, f in zip(targets, out):
                if len(f) != flen:
                    raise FragmentError(f"sub-stripe {t}: reconstructed fragment {i} has {len(f)} bytes, "
                                        f"expected {flen}")
                dst[i].scatter(a, memoryview(f)[FRAGMENT_HEADER:])
            del frags, out
        return None
    finally:
        res.close()


# --- process entry points ------------------------------------------------------------------------------


_CACHE = SegmentCache()


def _serve(fd: int) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        import pyeclib.ec_iface  # noqa: F401  (fail at start, not at the first request)
    except Exception as e:  # pragma: no cover - broken installation
        _send(conn, ("fatal", f"cannot import pyeclib: {type(e).__name__}: {e}"))
        return
    _send(conn, ("ready", os.getpid()))
    ops = {"encode": encode, "reconstruct": reconstruct}
    while True:
        try:
            msg = _recv(conn)
        except (EOFError, OSError):
            return  # the daemon went away
        op = msg[0]
        if op == "exit":
            return
        try:
            if op == "ping":
                reply: tuple = ("ok", os.getpid())
            else:
                fn = ops.get(op)
                if fn is None:
                    raise ValueError(f"unknown codec operation {op!r}")
                reply = ("ok", fn(*msg[1:]))
        except ValueError as e:
            reply = ("err", "value", str(e))
        except FragmentError as e:
            reply = ("err", "integrity", str(e))
        except Exception as e:
            reply = ("err", "internal", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            _send(conn, reply)
        except (OSError, EOFError):
            return


def _probe(req: dict) -> dict:
    """One-off checks run in a throwaway process: which EC type exists, and whether a spec's piece fits."""
    from pyeclib.ec_iface import ECDriver

    out: dict = {}
    if req.get("pick"):
        try:
            d = ECDriver(k=3, m=1, ec_type="isa_l_rs_vand")
            d.encode(bytes(3 * 64))
            out["ec_type"] = "isa_l_rs_vand"
        except Exception as e:
            out["ec_type"] = "liberasurecode_rs_vand"
            out["pick_note"] = f"isa_l_rs_vand unavailable: {type(e).__name__}: {e}"
    spec = req.get("spec")
    if spec:
        k, m, ec_type, piece = spec["k"], spec["m"], spec.get("ec_type") or out.get("ec_type"), spec["piece"]
        out["ec_type"] = ec_type
        try:
            d = ECDriver(k=k, m=m, ec_type=ec_type)
            data = os.urandom(k * piece)
            frags = d.encode(data)
            sizes = [len(f) for f in frags]
            if len(frags) != k + m or any(s != piece + FRAGMENT_HEADER for s in sizes):
                out["error"] = (f"{ec_type} k={k} m={m}: input of {k * piece} bytes gives fragments of {sizes} "
                                f"bytes, not piece {piece} + {FRAGMENT_HEADER}")
            elif any(frags[j][FRAGMENT_HEADER:] != data[j * piece:(j + 1) * piece] for j in range(k)):
                out["error"] = f"{ec_type}: data fragments are not the input pieces"
            else:
                for i, f in enumerate(frags):
                    check_header(f[:FRAGMENT_HEADER], i, k, piece, "probe")
                out["ok"] = True
        except Exception as e:
            out["error"] = f"{ec_type} k={k} m={m}: {type(e).__name__}: {e}"
    return out


def _entry(argv: list[str]) -> None:
    global _TEST_SLEEP
    mode = argv[0]
    if mode == "worker":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the daemon's terminal is the daemon's business
        _TEST_SLEEP = float(os.environ.get("SHARDKEEP_CODEC_TEST_SLEEP", "0") or 0)
        try:  # below the daemon's event loop (and the trainers): encoding fills the idle CPU
            os.nice(max(0, min(19, int(os.environ.get("SHARDKEEP_CODEC_NICE", "0") or 0))))
        except (OSError, ValueError):
            pass
        try:
            _serve(int(argv[1]))
        finally:
            _CACHE.close()
    elif mode == "probe":
        try:
            res = _probe(json.loads(argv[1]))
        except Exception as e:
            res = {"fatal": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    else:
        raise SystemExit(f"codec_worker: unknown mode {mode!r}")
