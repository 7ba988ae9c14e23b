"""Daemon settings: defaults < --config FILE (TOML) < SHARDKEEP_* < flags, checked in one place."""

from __future__ import annotations

import subprocess

import pytest

from conftest import shardkeep_cmd
from shardkeep.daemon.cli import build_parser
from shardkeep.daemon.config import load_config, render_config
from test_group_membership import all_up, free_ports, wait_until


def parse(*argv: str):
    from shardkeep.daemon.cli import daemon_config

    return daemon_config(build_parser().parse_args(["daemon", *argv]), env={})


def test_each_layer_overrides_the_one_below_and_says_so(tmp_path):
    f = tmp_path / "sk.toml"
    p1, p2 = free_ports(2)  # never bound here, but no test names a fixed port
    f.write_text('slots = 3\nshm_prefix = "fromfile"\nmemory_limit = "2GiB"\n'
                 f'peers = ["tcp://127.0.0.1:{p1}", "tcp://127.0.0.1:{p2}"]\n[timeouts]\nheartbeat = 0.5\npeer_down = 4\n')
    env = {"SHARDKEEP_SLOTS": "4", "SHARDKEEP_TIMEOUTS_PEER_DOWN": "6", "SHARDKEEP_JOB": "ignored: a client variable"}
    cfg, src = load_config({"slots": 5}, env, str(f))
    assert cfg.slots == 5 and src["slots"] == "flag"
    assert cfg.timeouts.peer_down == 6.0 and src["timeouts.peer_down"] == "env SHARDKEEP_TIMEOUTS_PEER_DOWN"
    assert cfg.timeouts.heartbeat == 0.5 and src["timeouts.heartbeat"] == f"file {f}"
    assert cfg.memory_limit == 2 << 30 and cfg.shm_prefix == "fromfile"
    assert cfg.peers == [f"tcp://127.0.0.1:{p1}", f"tcp://127.0.0.1:{p2}"]
    assert cfg.parity == 1 and src["parity"] == "default"


@pytest.mark.parametrize("text,needle", [
    ("bogus = 1\n", "unknown setting(s) bogus"),
    ("[timeouts]\nheartbeet = 1\n", "unknown setting(s) timeouts.heartbeet"),
    ('slots = "three"\n', "slots = 'three'"),
    ("insecure = 1\n", "insecure = 1"),
    ('memory_limit = "lots"\n', "memory_limit = 'lots'"),
    ("slots = \n", "not valid TOML"),
])
def test_bad_files_fail_naming_the_key_and_value(tmp_path, text, needle):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config({}, {}, str(f))
    assert needle in str(e.value)


def test_bad_environment_names_the_variable():
    with pytest.raises(ValueError, match="SHARDKEEP_INSECURE = 'maybe'"):
        load_config({}, {"SHARDKEEP_INSECURE": "maybe"})


def test_print_config_is_a_config_file_that_gives_the_same_config(tmp_path):
    p1, p2 = free_ports(2)
    cfg, src = parse("--slots", "3", "--peer-timeout", "7", "--peers", f"tcp://127.0.0.1:{p1},tcp://127.0.0.1:{p2}",
                     "--insecure", "--memory-limit", "1GB", "--shm-prefix", "abc")
    text = render_config(cfg, src)
    assert "slots = 3  # flag" in text and "peer_down = 7.0  # flag" in text and "parity = 1  # default" in text
    f = tmp_path / "printed.toml"
    f.write_text(text)
    again, src2 = load_config({}, {}, str(f))
    assert again == cfg
    assert set(src2.values()) <= {f"file {f}", "default"}


def test_the_cli_prints_config_and_refuses_bad_values(tmp_path):
    r = subprocess.run(shardkeep_cmd("daemon", "--print-config", "--slots", "4"), capture_output=True, text=True,
                       timeout=60, env={"SHARDKEEP_PARITY": "2", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "slots = 4  # flag" in r.stdout and "parity = 2  # env SHARDKEEP_PARITY" in r.stdout
    r = subprocess.run(shardkeep_cmd("daemon", "--slots", "9"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "slots must be 2..8" in r.stderr


def test_a_group_configured_from_files(make_daemon, tmp_path):
    """The group keys (peers, node, parity, security, timeouts) in a config file, as in a deployment."""
    ports = free_ports(3)
    ds = []
    for i in range(3):
        f = tmp_path / f"node{i}.toml"
        f.write_text("peers = [" + ", ".join(f'"tcp://127.0.0.1:{p}"' for p in ports) + "]\n"
                     f"node = {i}\nparity = 1\ninsecure = true\n[timeouts]\nheartbeat = 0.5\npeer_down = 3\n")
        ds.append(make_daemon(["--config", str(f)]))
    wait_until(lambda: all_up(ds), what="group from config files up")
    g = ds[2].status()["group"]
    assert g["node"] == 2 and g["n"] == 3 and g["parity"] == 1 and g["security"] == "insecure"


def test_node_auto_is_the_peers_entry_of_the_advertised_host():
    peers = ["tcp://10.0.0.1:7400", "tcp://10.0.0.2:7400", "tcp://10.0.0.3:7400"]
    env = {"SHARDKEEP_NODE": "auto", "SHARDKEEP_ADVERTISE": "10.0.0.2", "SHARDKEEP_PEERS": ",".join(peers),
           "SHARDKEEP_INSECURE": "1"}
    cfg, source = load_config({}, env)
    assert cfg.node == -1 and source["node"] == "env SHARDKEEP_NODE"
    assert cfg.validate().node == 1
    for advertise, needle in [("", "needs advertise"), ("10.0.0.9", "matches 0 of the peers")]:
        cfg, _ = load_config({}, {**env, "SHARDKEEP_ADVERTISE": advertise})
        with pytest.raises(ValueError, match=needle):
            cfg.validate()
    with pytest.raises(ValueError, match="SHARDKEEP_NODE"):
        load_config({}, {**env, "SHARDKEEP_NODE": "-3"})
