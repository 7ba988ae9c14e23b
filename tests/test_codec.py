"""Erasure coding in worker processes over /dev/shm (shardkeep.daemon.codec).

Round trips on odd sizes for several (k, m), every loss pattern of up to m chunks, chunks spread over
two shm files, an independent pyeclib encode in this process as the reference for parity and headers,
and the pool's behaviour on bad input: bad extents, corrupt headers, a worker SIGKILLed mid-call, a
deadline. Every test makes its files in /dev/shm under its own prefix and removes them.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import secrets
import subprocess
import sys
import time

import pytest

from shardkeep.daemon.codec import (
    FRAGMENT_HEADER,
    CodecPool,
    CodecSpec,
    make_spec,
    pick_ec_type,
    substripes,
)
from shardkeep.proto.errors import IntegrityError, ShardkeepTimeoutError, UnavailableError

SHM = "/dev/shm"
SENTINEL = 0xA5


class ShmFiles:
    """Files in /dev/shm under a unique prefix; removed by the fixture."""

    def __init__(self) -> None:
        self.prefix = f"sktcodec{secrets.token_hex(4)}-"
        self.count = 0
        self.names: list[str] = []

    def create(self, size: int, fill: int = 0) -> str:
        name = f"{self.prefix}{self.count}"
        self.count += 1
        fd = os.open(os.path.join(SHM, name), os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self.names.append(name)
        try:
            if size:
                os.write(fd, bytes([fill]) * size)
        finally:
            os.close(fd)
        return name

    def write(self, name: str, off: int, data: bytes) -> None:
        fd = os.open(os.path.join(SHM, name), os.O_RDWR)
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)

    def read(self, name: str, off: int = 0, n: int | None = None) -> bytes:
        with open(os.path.join(SHM, name), "rb") as f:
            f.seek(off)
            return f.read() if n is None else f.read(n)

    def remove(self, name: str) -> None:
        try:
            os.unlink(os.path.join(SHM, name))
        except FileNotFoundError:
            pass

    def cleanup(self) -> None:
        for name in self.names:
            self.remove(name)
        self.names.clear()


@pytest.fixture
def shm():
    files = ShmFiles()
    try:
        yield files
    finally:
        files.cleanup()
        assert not [n for n in os.listdir(SHM) if n.startswith(files.prefix)]


@pytest.fixture(scope="module")
def pool():
    p = CodecPool(workers=2)
    try:
        yield p
    finally:
        p.close()


_SPECS: dict[tuple[int, int], CodecSpec] = {}


def spec_for(k: int, m: int) -> CodecSpec:
    if (k, m) not in _SPECS:
        _SPECS[k, m] = make_spec(k, m)
    return _SPECS[k, m]


def run(coro):
    return asyncio.run(coro)


def place(shm: ShmFiles, data: bytes, rng: random.Random, split: bool = True, fill: int = SENTINEL):
    """Put ``data`` into shm, across two files when ``split`` (each with slack before and after);
    return (extents, [(name, offset, length)] of the same) so a test can read it back."""
    if not data:
        return []
    cuts = [0, rng.randint(1, len(data) - 1), len(data)] if split and len(data) >= 2 else [0, len(data)]
    exts = []
    for a, b in zip(cuts, cuts[1:]):
        lead, tail = rng.randint(0, 300), rng.randint(0, 300)
        name = shm.create(lead + (b - a) + tail, fill)
        shm.write(name, lead, data[a:b])
        exts.append((name, lead, b - a))
    return exts


def blank(shm: ShmFiles, length: int, rng: random.Random, split: bool = True):
    """Extents of ``length`` bytes over fresh files filled with SENTINEL (two files when ``split``)."""
    return place(shm, bytes([SENTINEL]) * length, rng, split)


def gather(shm: ShmFiles, exts) -> bytes:
    return b"".join(shm.read(name, off, n) for name, off, n in exts)


def whole(shm: ShmFiles, exts) -> list[bytes]:
    return [shm.read(name) for name in dict.fromkeys(name for name, _, _ in exts)]


def reference_encode(spec: CodecSpec, datas: list[bytes], chunk_len: int):
    """pyeclib in this process (bytes only, encode only): parity payloads and headers to compare with."""
    from pyeclib.ec_iface import ECDriver

    drv = ECDriver(k=spec.k, m=spec.m, ec_type=spec.ec_type)
    piece = spec.piece
    nsub = substripes(chunk_len, piece)
    parity = [bytearray() for _ in range(spec.m)]
    headers = bytearray()
    for t in range(nsub):
        inp = b"".join(d[t * piece:(t + 1) * piece].ljust(piece, b"\0") for d in datas)
        frags = drv.encode(inp)
        assert [len(f) for f in frags] == [piece + FRAGMENT_HEADER] * (spec.k + spec.m)
        for j in range(spec.k):
            assert frags[j][FRAGMENT_HEADER:] == inp[j * piece:(j + 1) * piece]
        for f in frags:
            headers += f[:FRAGMENT_HEADER]
        for p in range(spec.m):
            parity[p] += frags[spec.k + p][FRAGMENT_HEADER:]
    return [bytes(p) for p in parity], bytes(headers)


# --- specs ---------------------------------------------------------------------------------------------


def test_spec_rules():
    assert pick_ec_type() in ("isa_l_rs_vand", "liberasurecode_rs_vand")
    assert pick_ec_type() == pick_ec_type()
    for k in (1, 2, 3, 4, 7, 8, 10):
        s = spec_for(k, 1)
        assert s.piece == (1 << 20) // k // 64 * 64
        assert s.piece % 64 == 0 and k * s.piece <= 1 << 20
    s = make_spec(3, 1, "liberasurecode_rs_vand")
    assert s.ec_type == "liberasurecode_rs_vand" and s.piece == 349504
    assert substripes(0, 100) == 0 and substripes(1, 100) == 1 and substripes(100, 100) == 1
    assert substripes(101, 100) == 2
    for bad in ((0, 1), (3, 0), (-1, 1), (3.0, 1), (True, 1)):
        with pytest.raises(ValueError):
            make_spec(*bad)
    with pytest.raises(ValueError):
        make_spec(3, 1, "no_such_code")


# --- round trips ---------------------------------------------------------------------------------------


def _lengths(chunk_len: int, k: int, rng: random.Random) -> list[int]:
    """Stored data lengths: full, short, empty, mixed; not multiples of anything."""
    out = []
    for j in range(k):
        r = j % 4
        if r == 0:
            out.append(chunk_len)
        elif r == 1:
            out.append(rng.randint(0, chunk_len))
        elif r == 2:
            out.append(0 if j == 2 else chunk_len - rng.randint(0, min(chunk_len, 70)))
        else:
            out.append(rng.randint(chunk_len // 2, chunk_len))
    return out


@pytest.mark.parametrize("km", [(3, 1), (4, 2), (2, 1), (8, 3)], ids=lambda km: f"k{km[0]}m{km[1]}")
def test_round_trip_every_loss(pool, shm, km):
    k, m = km
    spec = spec_for(k, m)
    piece = spec.piece
    n = k + m
    rng = random.Random(1000 * k + m)
    for chunk_len in (1, piece - 1, piece + 1, 3 * piece + 17):
        nsub = substripes(chunk_len, piece)
        datas = [rng.randbytes(L) for L in _lengths(chunk_len, k, rng)]
        data_exts = [place(shm, d, rng) for d in datas]
        # parity extents cross files too; give one of them more room than needed
        parity_exts = [blank(shm, nsub * piece + (99 if p == 0 else 0), rng) for p in range(m)]
        headers = run(pool.encode(spec, data_exts, chunk_len, parity_exts))
        assert len(headers) == nsub * n * FRAGMENT_HEADER
        ref_parity, ref_headers = reference_encode(spec, datas, chunk_len)
        assert headers == ref_headers
        parities = []
        for p in range(m):
            got = gather(shm, parity_exts[p])
            assert got[:nsub * piece] == ref_parity[p]
            assert got[nsub * piece:] == bytes([SENTINEL]) * (len(got) - nsub * piece)  # nothing past the payload
            parities.append(ref_parity[p])
        for j in range(k):  # the inputs are untouched
            assert gather(shm, data_exts[j]) == datas[j]

        stored = {j: data_exts[j] for j in range(k)}
        stored.update({k + p: parity_exts[p] for p in range(m)})
        expect = {j: datas[j] for j in range(k)}
        expect.update({k + p: parities[p] for p in range(m)})
        for lost_n in range(1, m + 1):
            for lost in itertools.combinations(range(n), lost_n):
                mark = len(shm.names)
                have = {i: stored[i] for i in range(n) if i not in lost}
                want = {i: blank(shm, len(expect[i]), rng) for i in lost}
                run(pool.reconstruct(spec, have, headers, chunk_len, want))
                for i in lost:
                    assert gather(shm, want[i]) == expect[i], f"chunk {i} of lost {lost}, chunk_len {chunk_len}"
                    for name, off, ln in want[i]:  # slack around the extents untouched
                        raw = shm.read(name)
                        assert raw[:off] == bytes([SENTINEL]) * off
                        assert raw[off + ln:] == bytes([SENTINEL]) * (len(raw) - off - ln)
                for name in shm.names[mark:]:
                    shm.remove(name)
                del shm.names[mark:]


def test_reconstruct_lengths_of_wanted_data(pool, shm):
    """A wanted data chunk gets min(extent total, chunk_len) bytes: zeros past the stored data, nothing
    written past chunk_len; a short want gets a prefix."""
    spec = spec_for(3, 1)
    piece = spec.piece
    rng = random.Random(7)
    chunk_len = 2 * piece + 5
    datas = [rng.randbytes(chunk_len), rng.randbytes(piece + 3), rng.randbytes(chunk_len - 1)]
    data_exts = [place(shm, d, rng) for d in datas]
    nsub = substripes(chunk_len, piece)
    par = [blank(shm, nsub * piece, rng)]
    headers = run(pool.encode(spec, data_exts, chunk_len, par))
    have = {0: data_exts[0], 2: data_exts[2], 3: par[0]}
    for total in (chunk_len, chunk_len + 1000, 10, piece + 3, piece + 1):
        want = blank(shm, total, rng)
        run(pool.reconstruct(spec, have, headers, chunk_len, {1: want}))
        logical = datas[1].ljust(chunk_len, b"\0")
        got = gather(shm, want)
        w = min(total, chunk_len)
        assert got[:w] == logical[:w]
        assert got[w:] == bytes([SENTINEL]) * (total - w)
    # from a short stored data chunk and the parity
    want = blank(shm, chunk_len, rng)
    run(pool.reconstruct(spec, {1: data_exts[1], 2: data_exts[2], 3: par[0]}, headers, chunk_len, {0: want}))
    assert gather(shm, want) == datas[0]


def test_zero_length_and_empty_chunks(pool, shm):
    spec = spec_for(2, 1)
    assert run(pool.encode(spec, [[], []], 0, [[]])) == b""
    rng = random.Random(3)
    chunk_len = spec.piece + 11
    nsub = substripes(chunk_len, spec.piece)
    par = [blank(shm, nsub * spec.piece, rng)]
    headers = run(pool.encode(spec, [[], []], chunk_len, par))
    assert gather(shm, par[0]) == bytes(nsub * spec.piece)  # parity of zeros is zeros
    want = blank(shm, chunk_len, rng)
    run(pool.reconstruct(spec, {1: [], 2: par[0]}, headers, chunk_len, {0: want}))
    assert gather(shm, want) == bytes(chunk_len)


def test_large_split_and_concurrent_calls(shm):
    """Calls cut into several parts across workers, several calls at once, the event loop kept free."""
    spec = spec_for(3, 1)
    piece = spec.piece
    rng = random.Random(11)
    chunk_len = 13 * piece + 999  # 14 sub-stripes: several parts
    nsub = substripes(chunk_len, piece)
    stripes = []
    for s in range(3):
        datas = [rng.randbytes(chunk_len - 77 * j) for j in range(3)]
        stripes.append((datas, [place(shm, d, rng) for d in datas], [blank(shm, nsub * piece, rng)]))

    async def main(p: CodecPool):
        gaps = []
        stop = False

        async def ticker():
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        out = await asyncio.gather(*(p.encode(spec, de, chunk_len, pe) for _, de, pe in stripes))
        # rebuild data chunk s % 3 of stripe s, all at once, each call in several parts
        await asyncio.gather(*(
            p.reconstruct(spec, {i: (de + pe)[i] for i in range(4) if i != s % 3}, h, chunk_len, {s % 3: w})
            for s, ((_, de, pe), h, w) in enumerate(zip(stripes, out, wants))))
        stop = True
        await tick
        return out, max(gaps)

    wants = [blank(shm, chunk_len - 77 * (s % 3), rng) for s in range(3)]
    with CodecPool(workers=2) as p:
        assert len(p._ranges(nsub)) > 1
        headers, worst_gap = run(main(p))
        assert p.worker_starts() == 2
    assert worst_gap < 0.5
    for s, ((datas, _, par), h) in enumerate(zip(stripes, headers)):
        ref_par, ref_h = reference_encode(spec, datas, chunk_len)
        assert h == ref_h
        assert gather(shm, par[0]) == ref_par[0]
        assert gather(shm, wants[s]) == datas[s % 3]


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_extents_raise_value_error(pool, shm):
    spec = spec_for(3, 1)
    piece = spec.piece
    rng = random.Random(5)
    chunk_len = piece + 1
    datas = [rng.randbytes(chunk_len) for _ in range(3)]
    good = [place(shm, d, rng, split=False) for d in datas]
    par = [blank(shm, 2 * piece, rng, split=False)]
    name, off, ln = good[1][0]
    size = len(shm.read(name))
    bad_data = [
        [("../" + name, off, ln)],  # a path, not a name
        [(f"x/{name}", off, ln)],
        [("", 0, 1)],
        [(name, size - ln + 1, ln)],  # ends past the end of the file
        [(name, size + 10, 0)],  # an empty extent that starts past the end
        [(name, -1, ln)],
        [(name, off, -5)],
        [(name, off)],
        [(shm.prefix + "missing", 0, 10)],
        [(name, off, ln), (name, off, 1)],  # more than chunk_len
    ]
    for bad in bad_data:
        with pytest.raises(ValueError):
            run(pool.encode(spec, [good[0], bad, good[2]], chunk_len, par))
    par_name = par[0][0][0]
    par_size = len(shm.read(par_name))
    for bad_par in ([(par_name, 0, 2 * piece - 1)], [(par_name, par_size - 2 * piece + 1, 2 * piece)],
                    [("a/b", 0, 2 * piece)]):
        with pytest.raises(ValueError):
            run(pool.encode(spec, good, chunk_len, [bad_par]))
    with pytest.raises(ValueError):
        run(pool.encode(spec, good[:2], chunk_len, par))  # k lists needed
    headers = run(pool.encode(spec, good, chunk_len, par))  # the pool keeps working
    want = blank(shm, chunk_len, rng)
    for have, wanted in (
        ({0: good[0], 2: good[2]}, {1: want}),  # fewer than k
        ({0: good[0], 1: good[1], 2: good[2]}, {2: want}),  # both have and want
        ({0: good[0], 2: good[2], 3: par}, {7: want}),  # no such index
        ({0: good[0], 2: good[2], 3: par[0]}, {1: [(name, size, 1)]}),  # want past the end
        ({0: good[0], 2: good[2], 3: [(par_name, 0, piece)]}, {1: want}),  # parity too short
    ):
        with pytest.raises(ValueError):
            run(pool.reconstruct(spec, have, headers, chunk_len, wanted))
    with pytest.raises(ValueError):
        run(pool.reconstruct(spec, {0: good[0], 2: good[2], 3: par[0]}, headers[:-1], chunk_len, {1: want}))
    with pytest.raises(ValueError):
        run(pool.encode(spec, good, chunk_len, par, deadline=-1))
    run(pool.reconstruct(spec, {0: good[0], 2: good[2], 3: par[0]}, headers, chunk_len, {1: want}))
    assert gather(shm, want) == datas[1]


def test_corrupt_headers_raise_integrity_error(pool, shm):
    spec = spec_for(4, 2)
    piece = spec.piece
    rng = random.Random(9)
    chunk_len = 2 * piece + 3
    nsub = substripes(chunk_len, piece)
    datas = [rng.randbytes(chunk_len) for _ in range(4)]
    de = [place(shm, d, rng) for d in datas]
    pe = [blank(shm, nsub * piece, rng) for _ in range(2)]
    headers = run(pool.encode(spec, de, chunk_len, pe))
    have = {0: de[0], 2: de[2], 4: pe[0], 5: pe[1]}
    n = spec.n

    def corrupt(pos_in_header: int, frag: int, sub: int = 0) -> bytes:
        h = bytearray(headers)
        h[sub * n * FRAGMENT_HEADER + frag * FRAGMENT_HEADER + pos_in_header] ^= 0x5A
        return bytes(h)

    cases = [
        corrupt(0, 4),  # fragment index field: caught by shardkeep's own check
        corrupt(4, 0),  # size field
        corrupt(40, 2),  # inside liberasurecode's metadata: its checksum fails
        corrupt(67, 5, sub=1),  # the metadata checksum itself, second sub-stripe
        corrupt(59, 0),  # magic
        rng.randbytes(len(headers)),  # garbage
    ]
    swapped = bytearray(headers)  # fragments 0 and 2 swapped: valid headers at the wrong index
    a, b = 0, 2 * FRAGMENT_HEADER
    swapped[a:a + FRAGMENT_HEADER] = headers[b:b + FRAGMENT_HEADER]
    swapped[b:b + FRAGMENT_HEADER] = headers[a:a + FRAGMENT_HEADER]
    cases.append(bytes(swapped))
    pids = pool.worker_pids()
    for bad in cases:
        want = {1: blank(shm, chunk_len, rng), 3: blank(shm, chunk_len, rng)}
        with pytest.raises(IntegrityError):
            run(pool.reconstruct(spec, have, bad, chunk_len, want))
    assert pool.worker_pids() == pids  # no worker died on the way
    want = {1: blank(shm, chunk_len, rng), 3: blank(shm, chunk_len, rng)}
    run(pool.reconstruct(spec, have, headers, chunk_len, want))
    assert gather(shm, want[1]) == datas[1] and gather(shm, want[3]) == datas[3]


# --- worker faults and deadlines ------------------------------------------------------------------------


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still alive")


def test_worker_killed_mid_call_and_deadline(shm, monkeypatch):
    spec = spec_for(3, 1)
    piece = spec.piece
    rng = random.Random(13)
    datas = [rng.randbytes(4 * piece - 9) for _ in range(3)]
    de = [place(shm, d, rng) for d in datas]
    par = [blank(shm, 4 * piece, rng)]
    small = [[(n_, o, min(ln, 100))] for ((n_, o, ln), *_) in de]
    small_par = [blank(shm, piece, rng)]
    monkeypatch.setenv("SHARDKEEP_CODEC_TEST_SLEEP", "0.4")  # the test fault hook: a slow worker
    p = CodecPool(workers=1)
    monkeypatch.delenv("SHARDKEEP_CODEC_TEST_SLEEP")
    try:
        run(p.encode(spec, small, 100, small_par))  # warm: the worker is up
        (pid,) = p.worker_pids()
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"MALLOC_MMAP_THRESHOLD_=1073741824" in env and b"MALLOC_TRIM_THRESHOLD_=1073741824" in env

        async def kill_mid_call():
            task = asyncio.ensure_future(p.encode(spec, de, 4 * piece - 9, par))
            await asyncio.sleep(0.5)  # 4 sub-stripes x 0.4 s: well inside the call
            assert not task.done()
            os.kill(pid, 9)
            t0 = time.monotonic()
            with pytest.raises(UnavailableError) as ei:
                await task
            return ei.value, time.monotonic() - t0

        err, took = run(kill_mid_call())
        assert "SIGKILL" in str(err) and str(pid) in str(err) and "encode" in str(err)
        assert took < 2.0
        run(p.encode(spec, small, 100, small_par))  # the next call succeeds on a fresh worker
        (pid2,) = p.worker_pids()
        assert pid2 != pid

        # a worker killed while idle: the next call still succeeds
        os.kill(pid2, 9)
        _wait_dead(pid2)
        run(p.encode(spec, small, 100, small_par))
        (pid3,) = p.worker_pids()
        assert pid3 != pid2

        # a cancelled call: its worker is stopped and replaced, the next call succeeds
        async def cancel_mid_call():
            task = asyncio.ensure_future(p.encode(spec, de, 4 * piece - 9, par))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        run(cancel_mid_call())
        _wait_dead(pid3)
        run(p.encode(spec, small, 100, small_par))
        (pid4,) = p.worker_pids()
        assert pid4 != pid3

        # deadline: the call raises in time, names what and how long; its worker is replaced
        t0 = time.monotonic()
        with pytest.raises(ShardkeepTimeoutError) as ei:
            run(p.encode(spec, de, 4 * piece - 9, par, deadline=0.6))
        assert time.monotonic() - t0 < 2.0
        assert isinstance(ei.value, TimeoutError)
        assert "encode" in str(ei.value) and "0.6" in str(ei.value)
        headers = run(p.encode(spec, small, 100, small_par))
        assert len(headers) == 4 * FRAGMENT_HEADER
    finally:
        p.close()
    assert not p.worker_pids()
    with pytest.raises(UnavailableError):
        run(p.encode(spec, small, 100, small_par))


def test_no_pyeclib_in_the_calling_process(shm):
    """The daemon's process never loads pyeclib: probes and codec work happen in children."""
    rng = random.Random(17)
    exts = place(shm, rng.randbytes(1000), rng, split=False)
    par = blank(shm, (1 << 20) // 2 // 64 * 64, rng, split=False)
    code = f"""
import asyncio, sys
from shardkeep.daemon.codec import CodecPool, make_spec
spec = make_spec(2, 1)
with CodecPool(workers=1) as p:
    h = asyncio.run(p.encode(spec, [{exts!r}, []], 1000, [{par!r}]))
assert len(h) == 3 * 80, len(h)
assert "pyeclib" not in sys.modules and "pyeclib_c" not in sys.modules, sorted(sys.modules)
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr


def test_worker_mapping_cache_lets_go_of_unlinked_segments(tmp_path):
    """The daemon removes staging and old parity every version: a worker that kept them mapped would
    hold their memory for ever (/dev/shm no longer lists them, but the pages stay)."""
    import secrets

    from shardkeep.daemon.codec_worker import SHM_DIR, SegmentCache

    names = [f"sktcache{secrets.token_hex(4)}-{i}" for i in range(3)]
    for nm in names:
        with open(os.path.join(SHM_DIR, nm), "wb") as f:
            f.write(b"x" * 8192)
    cache = SegmentCache()
    try:
        for nm in names:
            cache.release(cache.acquire(nm))
        assert set(cache.maps) == set(names)
        os.unlink(os.path.join(SHM_DIR, names[0]))
        m = cache.acquire(names[1])  # any later use sweeps
        assert names[0] not in cache.maps and set(cache.maps) == set(names[1:])
        os.unlink(os.path.join(SHM_DIR, names[2]))
        cache.release(m)  # and so does the end of a request
        assert set(cache.maps) == {names[1]}
    finally:
        cache.close()
        for nm in names:
            try:
                os.unlink(os.path.join(SHM_DIR, nm))
            except FileNotFoundError:
                pass


def test_workers_run_below_the_daemon():
    """Codec workers are niced below the daemon (its event loop answers trainers first)."""
    from shardkeep.daemon.codec import BACKGROUND_NICE

    with CodecPool(workers=1) as p:
        deadline = time.monotonic() + 30
        while not p.worker_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        (pid,) = p.worker_pids()
        want = min(19, os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE)
        while os.getpriority(os.PRIO_PROCESS, pid) != want and time.monotonic() < deadline:
            time.sleep(0.05)  # it lowers itself once started
        assert os.getpriority(os.PRIO_PROCESS, pid) == want
