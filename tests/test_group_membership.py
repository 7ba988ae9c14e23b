"""Groups of real daemons on loopback: HELLO, generations, heartbeats, keys, refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from conftest import DaemonProc, shardkeep_cmd

pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def peers_arg(ports: list[int]) -> str:
    return ",".join(f"tcp://127.0.0.1:{p}" for p in ports)


def wait_until(pred, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


def group_of(d: DaemonProc) -> dict:
    return d.status()["group"]


def all_up(ds: list[DaemonProc]) -> bool:
    return all(all(p["up"] for p in group_of(d)["peers"]) for d in ds)


@pytest.fixture
def keys(tmp_path):
    kdir = tmp_path / "keys"
    r = subprocess.run(shardkeep_cmd("keygen", "--nodes", "4", str(kdir)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return kdir


def start_group(make_daemon, n: int, ports: list[int], security: list[str] | callable, parity: int = 1):
    ds = []
    for i in range(n):
        sec = security(i) if callable(security) else security
        ds.append(make_daemon(["--peers", peers_arg(ports), "--node", str(i), "--parity", str(parity),
                               "--peer-timeout", "3", *sec]))
    return ds


def test_insecure_group_forms_and_notices_a_lost_peer(make_daemon):
    ports = free_ports(3)
    ds = start_group(make_daemon, 3, ports, ["--insecure"])
    wait_until(lambda: all_up(ds), what="every peer up")
    g = group_of(ds[0])
    assert g["n"] == 3 and g["parity"] == 1 and g["generation"] == 1 and not g["degraded"]
    assert {p["node"] for p in g["peers"]} == {1, 2}
    ds[2].kill()
    wait_until(lambda: group_of(ds[0])["degraded"], what="degraded after a peer died")
    down = {p["node"]: p["up"] for p in group_of(ds[0])["peers"]}
    assert down == {1: True, 2: False}
    ds[2].start()  # same state dir: same generation, back in the group
    wait_until(lambda: all_up(ds), what="peer back")
    assert group_of(ds[2])["generation"] == 1


def test_a_daemon_restarted_with_stale_peers_finds_a_replacement_that_moved(make_daemon):
    # found by the random-fault soak: node 0 was replaced at a new address, then node 1's daemon restarted
    # with its old --peers; it could not reach node 0, node 0 never greeted it again, and the group stayed
    # split (every group commit aborted, skips piled up) until the next replacement
    ports = free_ports(3)
    ds = start_group(make_daemon, 3, ports, ["--insecure"])
    wait_until(lambda: all_up(ds), what="every peer up")
    ds[0].kill()
    ds[0].wipe_shm()
    moved = [free_ports(1)[0], *ports[1:]]
    ds[0] = make_daemon(["--peers", peers_arg(moved), "--node", "0", "--parity", "1", "--peer-timeout", "3",
                         "--insecure"])
    wait_until(lambda: all_up(ds), what="replacement at a new address up")
    ds[1].kill()
    ds[1].start()  # as systemd restarts it: the command line still names node 0's old address

    def in_touch() -> bool:
        p0 = next(p for p in group_of(ds[1])["peers"] if p["node"] == 0)
        return p0["greeted"] and p0["control"].endswith(f":{moved[0]}")

    wait_until(in_touch, timeout=30, what="the restarted daemon greeted the moved node at its new address")
    time.sleep(3.5)  # past the peer timeout: "up" below means heard since the restart, both ways
    wait_until(lambda: all_up(ds), timeout=10, what="every peer up")


def test_curve_group_refuses_an_unknown_key_and_accepts_a_replacement(make_daemon, keys, tmp_path):
    ports = free_ports(3)

    def sec(i):
        return ["--curve-secret", str(keys / f"node-{i}.key_secret"), "--curve-public-dir", str(keys)]

    ds = start_group(make_daemon, 3, ports, sec)
    wait_until(lambda: all_up(ds), what="every peer up over CURVE")
    assert group_of(ds[0])["security"] == "curve"

    # an impostor for node 2 with its own, unlisted key is refused by everyone
    other = tmp_path / "other"
    subprocess.run(shardkeep_cmd("keygen", "--nodes", "3", str(other)), check=True, capture_output=True, timeout=60)
    (tmp_path / "pub").mkdir()
    for i in range(3):
        src = other if i == 2 else keys
        (tmp_path / "pub" / f"node-{i}.key").write_bytes((src / f"node-{i}.key").read_bytes())
    ds[2].kill()
    imp_port = free_ports(1)[0]
    imp_ports = ports[:2] + [imp_port]
    impostor = make_daemon(["--peers", peers_arg(imp_ports), "--node", "2", "--peer-timeout", "3",
                            "--curve-secret", str(other / "node-2.key_secret"),
                            "--curve-public-dir", str(tmp_path / "pub")])
    time.sleep(4)
    assert not any(p["up"] for p in group_of(impostor)["peers"])
    assert group_of(ds[0])["refused_connections"] >= 1
    impostor.stop()

    # a replacement with node 2's real key, an empty state dir and a new address becomes generation 2
    rep_port = free_ports(1)[0]
    replacement = make_daemon(["--peers", peers_arg(ports[:2] + [rep_port]), "--node", "2", "--peer-timeout", "3",
                               *sec(2)])
    wait_until(lambda: all(p["up"] for p in group_of(replacement)["peers"]), what="replacement accepted")
    assert group_of(replacement)["generation"] == 2
    wait_until(lambda: next(p for p in group_of(ds[0])["peers"] if p["node"] == 2)["control"].endswith(f":{rep_port}"),
               what="survivors learn the new address")
    assert next(p for p in group_of(ds[1])["peers"] if p["node"] == 2)["generation"] == 2

    # the old node 2 (generation 1, its state dir intact) comes back: told to stand down, it exits
    old = ds[2]
    old.extra = old.extra  # same address and state dir as before
    old.proc = subprocess.Popen(
        shardkeep_cmd("daemon", "--socket", old.socket, "--shm-prefix", old.prefix, "--state-dir", old.state_dir,
                      *old.extra),
        stdout=open(old.log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    rc = old.proc.wait(timeout=60)
    assert rc != 0 and "stand" in old.log().lower()


def test_insecure_with_a_non_loopback_peer_refuses_to_start(tmp_path):
    r = subprocess.run(
        shardkeep_cmd("daemon", "--socket", str(tmp_path / "s.sock"), "--shm-prefix", "sktnolo",
                      "--state-dir", str(tmp_path / "st"), "--node", "0", "--insecure",
                      "--peers", "tcp://127.0.0.1:1,tcp://192.0.2.7:2"),
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 1 and "loopback" in r.stderr and "192.0.2.7" in r.stderr
    assert not (tmp_path / "st" / "daemon.lock").exists() and not os.path.exists("/dev/shm/sktnolo.lock")


def test_a_group_needs_keys_unless_insecure(tmp_path):
    r = subprocess.run(
        shardkeep_cmd("daemon", "--socket", str(tmp_path / "s.sock"), "--shm-prefix", "sktnokey",
                      "--state-dir", str(tmp_path / "st"), "--node", "0",
                      "--peers", "tcp://127.0.0.1:1,tcp://127.0.0.1:2"),
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and "--curve-secret" in r.stderr


def test_mismatched_parity_is_refused_naming_both_sides(make_daemon):
    ports = free_ports(3)
    a = make_daemon(["--peers", peers_arg(ports), "--node", "0", "--parity", "1", "--insecure"])
    b = make_daemon(["--peers", peers_arg(ports), "--node", "1", "--parity", "2", "--insecure"])
    wait_until(lambda: "group mismatch" in next(p for p in group_of(a)["peers"] if p["node"] == 1)["error"],
               what="mismatch reported")
    err = next(p for p in group_of(a)["peers"] if p["node"] == 1)["error"]
    assert "m=2" in err and "m=1" in err
    assert not next(p for p in group_of(b)["peers"] if p["node"] == 0)["greeted"]
