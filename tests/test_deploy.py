"""Deployment: the systemd unit verifies, and the daemon speaks sd_notify (READY, WATCHDOG, STOPPING)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "systemd" / "shardkeepd.service"


def _rendered_unit(tmp_path: Path) -> Path:
    """The unit as an installer writes it: ExecStart= pointing at the installed shardkeepd."""
    exe = BIN / "shardkeepd"
    assert exe.exists(), f"{exe}: the console script is not installed"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/shardkeepd " in text
    out = tmp_path / "shardkeepd.service"
    out.write_text(text.replace("/usr/local/bin/shardkeepd", str(exe)))
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_unit_verifies(tmp_path):
    unit = _rendered_unit(tmp_path)
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    # verify exits 0 on mere warnings (an unknown Type=, say): any output is a failure here
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    keys = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and line[0] != "#")
    assert keys["Type"] == "notify" and keys["RemoveIPC"] == "no" and "DynamicUser" not in keys
    assert keys["KillSignal"] == "SIGTERM" and keys["Restart"] and float(keys["WatchdogSec"]) > 0
    assert keys["RuntimeDirectoryPreserve"] == "yes"


def test_systemd_verify_catches_a_broken_unit(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    bad = tmp_path / "bad.service"
    bad.write_text(_rendered_unit(tmp_path).read_text().replace("Type=notify", "Type=notifyx"))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert "notifyx" in r.stdout + r.stderr  # the check above would see it


class _NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path if path[0] != "@" else "\0" + path[1:])
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def read_until(self, pred, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.messages):
                return self.messages
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"not received within {timeout}s; got {self.messages}")

    def drain(self, seconds: float) -> list[str]:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        return self.messages


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_the_daemon_notifies_ready_watchdog_and_stopping(make_daemon, tmp_path, abstract):
    name = f"@sk-notify-{tmp_path.name}" if abstract else str(tmp_path / "notify.sock")
    ns = _NotifySocket(name)
    try:
        d = make_daemon(env={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "400000"})
        # READY=1 before the daemon answered its first request (make_daemon waited for a ping)
        msgs = ns.read_until(lambda m: any("READY=1" in x for x in m), timeout=5)
        ready = next(x for x in msgs if "READY=1" in x)
        assert f"MAINPID={d.proc.pid}" in ready and "STATUS=serving" in ready, ready
        # WATCHDOG=1 every 0.2 s (half of WATCHDOG_USEC), from the running loop
        t0 = time.monotonic()
        ns.read_until(lambda m: sum(x == "WATCHDOG=1" for x in m) >= 6, timeout=10)
        assert time.monotonic() - t0 < 3.0
        d.proc.send_signal(signal.SIGTERM)
        ns.read_until(lambda m: any(x.startswith("STOPPING=1") for x in m), timeout=20)
        assert d.proc.wait(timeout=30) == 0
    finally:
        ns.sock.close()


def test_watchdog_pings_only_for_the_process_systemd_names(make_daemon, tmp_path):
    ns = _NotifySocket(str(tmp_path / "notify.sock"))
    try:
        make_daemon(env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        ns.read_until(lambda m: any("READY=1" in x for x in m), timeout=5)
        assert "WATCHDOG=1" not in ns.drain(1.5), ns.messages
    finally:
        ns.sock.close()


K8S = DEPLOY / "kubernetes"


def _docs(name: str) -> list[dict]:
    import yaml

    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("name", ["daemonset.yaml", "sidecar-pod.yaml"])
def test_the_kubernetes_manifests_match_the_kubernetes_schemas(name):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    for doc in _docs(name):
        kv.validate(doc, version, strict=True)  # raises naming the bad field


def _container(spec: dict, name: str) -> dict:
    return next(c for c in spec.get("containers", []) + spec.get("initContainers", []) if c["name"] == name)


def _mounts(c: dict) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def test_the_daemonset_shares_the_hosts_shm_and_socket_directory_with_training_pods():
    docs = {d["kind"]: d for d in _docs("daemonset.yaml")}
    pod = docs["DaemonSet"]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert pod["hostIPC"] is True and pod["hostNetwork"] is True
    d = _container(pod, "shardkeepd")
    m = _mounts(d)
    assert vols[m["/dev/shm"]]["hostPath"]["path"] == "/dev/shm"
    assert vols[m["/run/shardkeep"]]["hostPath"]["path"] == "/run/shardkeep"
    assert vols[m["/var/lib/shardkeep"]]["hostPath"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert d[probe]["exec"]["command"][:2] == ["shardkeep", "status"], probe
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in d["ports"]
    # the config in the ConfigMap is one the daemon accepts, with node = auto resolved from the host IP
    import tomllib

    from shardkeep.daemon.config import load_config

    toml = tomllib.loads(docs["ConfigMap"]["data"]["shardkeepd.toml"])
    assert toml["metrics_port"] == 9464 and toml["metrics_host"] == "0.0.0.0"
    env = {e["name"]: e for e in d["env"]}
    assert env["SHARDKEEP_ADVERTISE"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    cfg_file = Path(__import__("tempfile").mkdtemp()) / "shardkeepd.toml"
    cfg_file.write_text(docs["ConfigMap"]["data"]["shardkeepd.toml"])
    cfg, _ = load_config({}, {"SHARDKEEP_ADVERTISE": "10.0.0.3"}, str(cfg_file))
    assert cfg.validate().node == 2
    # a training pod on the node mounts the same host paths
    trainer = docs["Pod"]["spec"]
    tvols = {v["name"]: v for v in trainer["volumes"]}
    tm = _mounts(_container(trainer, "trainer"))
    assert tvols[tm["/dev/shm"]]["hostPath"]["path"] == "/dev/shm"
    assert tvols[tm["/run/shardkeep"]]["hostPath"]["path"] == "/run/shardkeep"


def test_the_sidecar_pods_shm_is_a_memory_emptydir_sized_from_the_slots():
    from shardkeep.proto.sizes import parse_size

    (pod,) = _docs("sidecar-pod.yaml")
    ann, spec = pod["metadata"]["annotations"], pod["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    d, t = _container(spec, "shardkeepd"), _container(spec, "trainer")
    assert d.get("restartPolicy") == "Always"  # a native sidecar
    assert _mounts(d)["/dev/shm"] == _mounts(t)["/dev/shm"] and _mounts(d)["/run/shardkeep"] == _mounts(t)["/run/shardkeep"]
    shm = vols[_mounts(d)["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    size = parse_size(shm["sizeLimit"].replace("Gi", "GiB"))
    slots, state = int(ann["shardkeep.io/slots"]), parse_size(ann["shardkeep.io/state-bytes"].replace("Gi", "GiB"))
    assert slots * state * 1.05 <= size < slots * state * 1.15
    args = d["args"]
    assert args[args.index("--slots") + 1] == str(slots)
    assert parse_size(args[args.index("--memory-limit") + 1]) == size
    # tmpfs pages count against the limit of the container that populates them: the daemon's
    assert parse_size(d["resources"]["limits"]["memory"].replace("Gi", "GiB")) >= size
    for probe in ("readinessProbe", "livenessProbe"):
        assert d[probe]["exec"]["command"][:2] == ["shardkeep", "status"], probe


def test_the_example_daemon_config_loads(tmp_path):
    r = subprocess.run([str(BIN / "shardkeepd"), "--config", str(DEPLOY / "systemd" / "shardkeepd.toml"),
                        "--print-config"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and 'socket = "/run/shardkeep/shardkeep.sock"' in r.stdout, r.stderr


def test_a_restart_for_an_upgrade_with_a_new_config_keeps_committed_snapshots(make_daemon, job_id):
    import torch

    from shardkeep.client import Snapshotter
    from test_group_membership import free_ports

    d = make_daemon(["--slots", "2"])
    g = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(4096, generator=g), "meta": {"step": s}} for s in range(4)]
    snap = Snapshotter(socket=d.socket, job=job_id, rank=0, world_size=1)
    for s, st in enumerate(states):
        assert snap.snapshot(st, s).result(timeout=30).status == "committed"
    snap.close()
    assert d.stop() == 0  # SIGTERM, as `systemctl restart` sends
    port = free_ports(1)[0]
    d.extra = ["--slots", "3", "--log-format", "json", "--metrics-port", str(port)]  # the new config
    d.start()
    st = d.status()
    assert st["adopted_slots"] == 2 and st["metrics"].endswith(f":{port}/metrics")
    assert d.job_status(job_id)["restorable"] == [3, 2]
    back = {"w": torch.zeros(4096), "meta": {"step": -1}}
    snap = Snapshotter(socket=d.socket, job=job_id, rank=0, world_size=1)
    assert snap.restore(back) == 3
    assert torch.equal(back["w"], states[3]["w"]) and back["meta"] == {"step": 3}
    assert snap.snapshot(states[0], 4).result(timeout=30).status == "committed"  # and it goes on
    snap.close()
    assert d.job_status(job_id)["restorable"][0] == 4
