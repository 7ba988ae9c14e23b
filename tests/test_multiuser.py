"""Multi-user mode (--trainer-group): real users, real permissions, slots passed by descriptor.

The test creates a group and two users (one in the group, one not), starts a
daemon as root with ``--trainer-group``, and runs trainers as those users
(each imports torch as root, then drops to the user's uid, gid and groups: the
interpreter lives under /root): a member with
the job's token snapshots and restores bitwise; with a wrong token it is
refused; it never opens a segment by name, nor gets another job's
descriptors; an outsider reaches neither the sockets nor the segments.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import _PREFIXES, SHM, DaemonProc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="needs root and useradd to create the users and group of the test"),
]

CLIENT = r"""
import json, os, sys, torch
from shardkeep.client import Snapshotter
from shardkeep.client.shm import fetch_fd
# imported as root (the interpreter lives under /root); from here on, the test's user
uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
assert os.getuid() == os.geteuid() == uid and os.getgroups() == groups
sock, job, token, what = sys.argv[4:8]
out = {}
def attempt(key, fn):
    try:
        out[key] = fn()
    except Exception as exc:
        out[key] = f"{type(exc).__name__}: {exc}"
state = {"w": torch.arange(4096, dtype=torch.float32) * 3, "meta": {"step": 1}}
if what == "train":
    def train():
        s = Snapshotter(socket=sock, job=job, rank=0, world_size=1, token=token)
        r = s.snapshot(state, 1).result(timeout=60)
        s.close()
        return [r.status, r.reason]
    attempt("snapshot", train)
def restore():
    s = Snapshotter(socket=sock, job=job, rank=0, world_size=1, token=token)
    back = {"w": torch.zeros(4096), "meta": {"step": -1}}
    step = s.restore(back)
    s.close()
    return [step, bool(torch.equal(back["w"], state["w"])), back["meta"]]
if what == "finish":
    attempt("finish", lambda: Snapshotter(socket=sock, job=job, rank=0, world_size=1, token=token).finish()
            or "finished")
else:
    attempt("restore", restore)
for name in sys.argv[8:]:
    attempt("open " + name, lambda: os.open("/dev/shm/" + name, os.O_RDWR) and "opened")
    attempt("fd " + name, lambda: fetch_fd(sock + ".fds", job, token, name) and "got a descriptor")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def users():
    tag = secrets.token_hex(3)
    group, member, outsider = f"sktg{tag}", f"sktm{tag}", f"skto{tag}"

    def run(*cmd):
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    run("groupadd", group)
    try:
        run("useradd", "-M", "-N", "-g", "users", "-G", group, "-s", "/usr/sbin/nologin", member)
        run("useradd", "-M", "-N", "-g", "users", "-s", "/usr/sbin/nologin", outsider)
        import grp
        import pwd

        gid = grp.getgrnam(group).gr_gid
        yield {"group": group, "gid": gid, "member": pwd.getpwnam(member), "outsider": pwd.getpwnam(outsider)}
    finally:
        for u in (member, outsider):
            subprocess.run(["userdel", u], capture_output=True, timeout=60)
        subprocess.run(["groupdel", group], capture_output=True, timeout=60)


@pytest.fixture
def mu_daemon(users):
    root = Path(tempfile.mkdtemp(prefix="skmu", dir="/tmp"))
    os.chmod(root, 0o755)  # the users must reach the socket directory inside (the daemon makes it 0750, group G)
    prefix = f"skt{secrets.token_hex(4)}"
    _PREFIXES.append(prefix)
    d = DaemonProc(root, prefix, ["--trainer-group", users["group"]]).start()
    yield d
    d.stop()
    d.wipe_shm()
    shutil.rmtree(root, ignore_errors=True)


def as_user(users, who: str, d: DaemonProc, job: str, token: str, what: str, *names: str) -> dict:
    pw = users[who]
    extra = str(users["gid"]) if who == "member" else ""
    r = subprocess.run([sys.executable, "-c", CLIENT, str(pw.pw_uid), str(pw.pw_gid), extra, d.socket, job, token,
                        what, *names], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "HOME": "/tmp", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_jobs_of_several_users_share_a_daemon_and_stay_apart(users, mu_daemon, job_id):
    d = mu_daemon
    run_dir, sock = Path(d.socket).parent, Path(d.socket)
    assert run_dir.stat().st_mode & 0o777 == 0o750 and run_dir.stat().st_gid == users["gid"]
    for p in (sock, Path(d.socket + ".fds")):
        assert p.stat().st_mode & 0o777 == 0o660 and p.stat().st_gid == users["gid"], p
    token = secrets.token_urlsafe(16)
    ok = as_user(users, "member", d, job_id, token, "train")
    assert ok["snapshot"] == ["committed", ""] or ok["snapshot"][0] == "committed", ok
    assert ok["restore"] == [1, True, {"step": 1}], ok
    segs = sorted(p.name for p in SHM.glob(f"{d.prefix}-{job_id}-r0-*"))
    assert segs and all((SHM / s).stat().st_mode & 0o777 == 0o600 and (SHM / s).stat().st_uid == 0 for s in segs)

    # the same user with a wrong token: refused, and nothing of the job comes back
    wrong = as_user(users, "member", d, job_id, "not-the-token", "peek", *segs)
    assert "wrong job token" in wrong["restore"], wrong
    for s in segs:
        assert wrong["open " + s].startswith("PermissionError"), wrong   # never by name
        assert "wrong job token" in wrong["fd " + s], wrong

    # another job of the same user: its own token opens only its own segments
    other = f"{job_id}-b"
    token_b = secrets.token_urlsafe(16)
    b = as_user(users, "member", d, other, token_b, "train", *segs)
    assert b["restore"][:2] == [1, True], b
    for s in segs:
        assert f"holds no segments ['{s}']" in b["fd " + s], b

    # a user outside the group: no socket, no descriptors, no segments
    out = as_user(users, "outsider", d, job_id, token, "peek", *segs)
    assert "PermissionDeniedError: cannot reach the shardkeep daemon socket" in out["restore"], out
    for s in segs:
        assert out["open " + s].startswith("PermissionError"), out
        assert "this user is not in the daemon's trainer group" in out["fd " + s], out

    # the token survives a daemon restart: re-adopted, and still guarded
    d.stop()
    d.start()
    again = as_user(users, "member", d, job_id, "not-the-token", "peek")
    assert "wrong job token" in again["restore"], again
    back = as_user(users, "member", d, job_id, token, "peek")
    assert back["restore"] == [1, True, {"step": 1}], back
    # the other job ends with snap.finish(), which carries its token: its segments go
    done = as_user(users, "member", d, other, token_b, "finish")
    assert done["finish"] == "finished" and not list(SHM.glob(f"{d.prefix}-{other}-r0-*")), done
    # releasing a job takes its token too
    from conftest import shardkeep_cmd

    r = subprocess.run(shardkeep_cmd("release", "--socket", d.socket, "--job", job_id), capture_output=True,
                       text=True, timeout=60, env={k: v for k, v in os.environ.items() if k != "SHARDKEEP_JOB_TOKEN"})
    assert r.returncode == 1 and "needs its token" in r.stderr, r.stderr
    r = subprocess.run(shardkeep_cmd("release", "--socket", d.socket, "--job", job_id, "--token", token),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "released job" in r.stdout, r.stderr
    assert not list(SHM.glob(f"{d.prefix}-{job_id}-r0-*"))


def test_a_daemon_with_an_unknown_trainer_group_fails_fast(tmp_path):
    from conftest import shardkeep_cmd

    r = subprocess.run(shardkeep_cmd("daemon", "--socket", str(tmp_path / "s.sock"), "--trainer-group",
                                     "no-such-group-sk"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "trainer_group 'no-such-group-sk': no such group" in r.stderr, r.stderr


@pytest.mark.parametrize("job", ["../../etc/passwd", "a/b", ".hidden", "x" * 200, "job\x00nul", "a..b"])
def test_hostile_job_names_are_rejected(daemon, job):
    from shardkeep.client import Snapshotter
    from shardkeep.proto.errors import ProtocolError

    with pytest.raises(ProtocolError, match="invalid job id"):
        Snapshotter(socket=daemon.socket, job=job, rank=0, world_size=1)
    # and the daemon refuses them from any client, whatever it sends
    for mtype, fields in [("register", {"job": job, "rank": 0, "world_size": 1, "local_world_size": 1,
                                        "data_bytes": 64, "manifest_bytes": 64}), ("finish", {"job": job})]:
        with pytest.raises(ProtocolError, match="invalid job id"):
            daemon.request(mtype, fields)
    assert daemon.segments() == []


def test_the_persist_tier_reads_a_users_job_with_the_daemons_own_token(users, job_id, tmp_path):
    """The daemon's persist worker reads a job it holds no token of (it has its own, made at start)."""
    import time

    import torch
    import torch.distributed.checkpoint as dcp

    root = Path(tempfile.mkdtemp(prefix="skmu", dir="/tmp"))
    os.chmod(root, 0o755)
    prefix = f"skt{secrets.token_hex(4)}"
    _PREFIXES.append(prefix)
    persist = tmp_path / "shared"
    d = DaemonProc(root, prefix, ["--trainer-group", users["group"], "--persist-dir", str(persist)]).start()
    try:
        out = as_user(users, "member", d, job_id, "tok-" + secrets.token_hex(8), "train")
        assert out["snapshot"] == ["committed", ""], out
        deadline = time.monotonic() + 60
        while not (persist / job_id / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert os.readlink(persist / job_id / "latest") == "step-1", d.log()
        got = {"w": torch.zeros(4096), "meta": {"step": -1}}
        dcp.load(got, storage_reader=dcp.FileSystemReader(persist / job_id / "latest"))
        assert torch.equal(got["w"], torch.arange(4096, dtype=torch.float32) * 3) and got["meta"] == {"step": 1}
    finally:
        d.stop()
        d.wipe_shm()
        shutil.rmtree(root, ignore_errors=True)


GROUP_CLIENT = r"""
import json, os, sys, torch
from shardkeep.client import Snapshotter
from shardkeep.client.remote import Version
from shardkeep.client.shm import fetch_fd
uid, gid, groups = int(sys.argv[1]), int(sys.argv[2]), [int(g) for g in sys.argv[3].split(",") if g]
os.setgroups(groups)
os.setgid(gid)
os.setuid(uid)
sock, job, token, what, rank = sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7], int(sys.argv[8])
out = {}
state = {"w": torch.arange(1 << 20, dtype=torch.float32) + 1000 * rank}
if what == "train":
    s = Snapshotter(socket=sock, job=job, rank=rank, world_size=2, local_world_size=1, token=token)
    r = s.snapshot(state, 3).result(timeout=120)
    s.close()
    out["snapshot"] = [r.status, r.level]
else:  # read rank ``rank``'s tensor through this node's daemon: the other node's bytes come via staging
    v = Version(job, socket=sock, token=token).locate()
    with v.open(rank, {0}) as views:
        out["equal"] = bool(torch.equal(views[0], state["w"]))
    out["remote"] = v.bytes_remote
    v.close()
    from shardkeep.proto.transport import Channel
    ch = Channel(sock, timeout=60)
    r = ch.request("read", {"job": job, "step": 3, "node": rank, "offset": 0, "length": 4096, "token": token})
    name = r.fields["segment"]
    def attempt(key, fn):
        try:
            fn()
            out[key] = "got it"
        except Exception as exc:
            out[key] = type(exc).__name__
    # a job's staging segment is its own: by name never, by descriptor while its read is open
    attempt("open", lambda: os.open("/dev/shm/" + name, os.O_RDONLY))
    attempt("fd", lambda: fetch_fd(sock + ".fds", job, token, name))
    ch.request("read-done", {"job": job, "read": r.fields["read"], "token": token})
    attempt("fd after read-done", lambda: fetch_fd(sock + ".fds", job, token, name))
print(json.dumps(out))
"""


def test_a_remote_read_in_multi_user_mode_hands_over_its_staging_segment_by_descriptor(users, job_id):
    """Two multi-user daemons in a group: a member's rank 0 lives on node 0; reading it through node 1 brings
    the bytes over the peer data plane into a staging segment that the member gets by descriptor only."""
    import time

    from test_group_membership import free_ports, peers_arg

    ports = free_ports(2)
    roots, ds = [], []
    try:
        for i in range(2):
            root = Path(tempfile.mkdtemp(prefix="skmu", dir="/tmp"))
            os.chmod(root, 0o755)
            roots.append(root)
            prefix = f"skt{secrets.token_hex(4)}"
            _PREFIXES.append(prefix)
            ds.append(DaemonProc(root, prefix, ["--trainer-group", users["group"], "--peers", peers_arg(ports),
                                                "--node", str(i), "--parity", "1", "--insecure"]).start())
        deadline = time.monotonic() + 60
        while not all(all(p["up"] for p in d.status()["group"]["peers"]) for d in ds):
            assert time.monotonic() < deadline, "group not up"
            time.sleep(0.2)
        token = "tok-" + secrets.token_hex(8)
        pw = users["member"]

        def run(d: DaemonProc, what: str, rank: int) -> subprocess.Popen:
            return subprocess.Popen([sys.executable, "-c", GROUP_CLIENT, str(pw.pw_uid), str(pw.pw_gid),
                                     str(users["gid"]), d.socket, job_id, token, what, str(rank)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env={**os.environ, "HOME": "/tmp", "OMP_NUM_THREADS": "1"})

        trainers = [run(ds[i], "train", i) for i in range(2)]
        for p in trainers:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, out + err
            assert json.loads(out.strip().splitlines()[-1])["snapshot"] == ["committed", "group"]
        p = run(ds[0], "read", 1)  # rank 1 lives on node 1: read through node 0
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, out + err
        got = json.loads(out.strip().splitlines()[-1])
        assert got["equal"] and got["remote"] == 4 << 20, got
        assert got["open"] == "PermissionError" and got["fd"] == "got it", got
        assert got["fd after read-done"] == "PermissionDeniedError", got
        assert ds[0].status()["reads"]["served"] >= 2 and ds[0].status()["reads"]["in_flight"] == 0
    finally:
        for d in ds:
            d.stop()
            d.wipe_shm()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
