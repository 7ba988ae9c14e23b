"""A small virtual network for fault tests: one network namespace per node, one private ``/dev/shm`` each.

Layout (all names carry a random token, so parallel sessions never clash)::

    netns sk<tok>sw:  bridge "br0"  <-- veth "n<i>" --- "peer0" in netns sk<tok>n<i>, 10.A.B.(i+1)/24

* every node namespace has ``lo`` up and exactly one link, ``peer0``, for peer
  traffic (the test's own queries go over unix sockets, filesystem objects that
  work across network namespaces);
* a process of node i runs in its network namespace **and** in a mount
  namespace of its own with a private tmpfs on ``/dev/shm`` (``unshare -m``), so
  no node can see another's shared memory; the node's trainers join that mount
  namespace with ``nsenter --target <daemon pid> --mount --net``;
* ``cut(i)`` sets node i's switch-side veth down: its packets are dropped
  silently in both directions (as a pulled cable or a dead switch port; the
  node's own ``peer0`` keeps its address and route), ``heal(i)`` brings it back.

``NetLab.available()`` says why the lab cannot be built here (not root, no
``ip netns``, no ``unshare -m``), so tests skip with that reason.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
from pathlib import Path

SHM_SIZE = "1g"


def _run(*cmd: str, check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class NetLab:
    def __init__(self, n: int) -> None:
        self.n = n
        self.token = secrets.token_hex(3)
        # a random private /24, so two sessions' labs (each in its own namespaces anyway) never look alike
        self.subnet = (random.randint(64, 250), random.randint(1, 250))
        self.switch = f"sk{self.token}sw"
        self.nodes = [f"sk{self.token}n{i}" for i in range(n)]
        self._made_ns: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # --- can it run here? ------------------------------------------------------------------

    @staticmethod
    def available() -> str | None:
        """None if namespaces can be built here, else why not (a skip reason)."""
        if os.geteuid() != 0:
            return "needs root (ip netns, veth, unshare -m)"
        for tool in ("ip", "unshare", "nsenter"):
            if shutil.which(tool) is None:
                return f"{tool} not installed"
        probe = f"skprobe{secrets.token_hex(3)}"
        try:
            r = _run("ip", "netns", "add", probe, check=False)
            if r.returncode != 0:
                return f"ip netns add is not permitted here: {r.stderr.strip()}"
            r = _run("ip", "link", "add", f"{probe}a", "type", "veth", "peer", "name", f"{probe}b", check=False)
            if r.returncode != 0:
                return f"veth pairs are not permitted here: {r.stderr.strip()}"
            _run("ip", "link", "del", f"{probe}a", check=False)
            r = _run("unshare", "-m", "--propagation", "private", "sh", "-c",
                     "mount -t tmpfs -o size=1m tmpfs /dev/shm && nsenter --net=/run/netns/" + probe + " true",
                     check=False)
            if r.returncode != 0:
                return f"unshare -m with a private /dev/shm is not permitted here: {r.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"namespaces unavailable: {exc}"
        finally:
            _run("ip", "netns", "del", probe, check=False)
        return None

    # --- build and tear down ---------------------------------------------------------------

    def addr(self, i: int) -> str:
        return f"10.{self.subnet[0]}.{self.subnet[1]}.{i + 1}"

    def _veth(self, i: int) -> str:
        return f"n{i}"  # the switch side of node i's link, inside the switch namespace

    def setup(self) -> "NetLab":
        try:
            for ns in [self.switch, *self.nodes]:
                _run("ip", "netns", "add", ns)
                self._made_ns.append(ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.nodes):
                # made inside the switch namespace (no name in the root namespace, none to clash)
                _run("ip", "-n", self.switch, "link", "add", self._veth(i), "type", "veth", "peer", "name", "peer0",
                     "netns", ns)
                _run("ip", "-n", self.switch, "link", "set", self._veth(i), "master", "br0")
                _run("ip", "-n", self.switch, "link", "set", self._veth(i), "up")
                _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "peer0")
                _run("ip", "-n", ns, "link", "set", "peer0", "up")
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> None:
        for p in self.procs:
            self._kill(p)
        self.procs.clear()
        for ns in reversed(self._made_ns):
            _run("ip", "netns", "del", ns, check=False)  # its veths go with it
        self._made_ns.clear()

    def __enter__(self) -> "NetLab":
        return self.setup()

    def __exit__(self, *exc) -> None:
        self.teardown()

    # --- faults ----------------------------------------------------------------------------

    def cut(self, i: int) -> None:
        """Node i's peer link goes dark: every packet to or from it is dropped, nobody is told."""
        _run("ip", "-n", self.switch, "link", "set", self._veth(i), "down")

    def heal(self, i: int) -> None:
        _run("ip", "-n", self.switch, "link", "set", self._veth(i), "up")

    # --- processes -------------------------------------------------------------------------

    def spawn_node(self, i: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start node i's first process (its daemon) in its netns with a private tmpfs ``/dev/shm``.

        The returned process's pid is the command's own (``sh`` and ``nsenter`` exec it), so
        ``spawn_in(pid, ...)`` joins the same mount and network namespaces.
        """
        script = (f"mount -t tmpfs -o size={SHM_SIZE},mode=1777 tmpfs /dev/shm && "
                  f'exec nsenter --net=/run/netns/{self.nodes[i]} "$@"')
        return self._popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *cmd], log, env)

    def spawn_in(self, pid: int, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        """Start a process in the mount and network namespaces of ``pid`` (a node's daemon)."""
        return self._popen(["nsenter", "--target", str(pid), "--mount", "--net", *cmd], log, env)

    def run_in(self, pid: int, cmd: list[str], timeout: float = 60.0, env: dict | None = None
               ) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "--target", str(pid), "--mount", "--net", *cmd], capture_output=True,
                              text=True, timeout=timeout, env=dict(os.environ, **(env or {})),
                              stdin=subprocess.DEVNULL)

    def _popen(self, cmd: list[str], log: Path, env: dict | None) -> subprocess.Popen:
        out = open(log, "ab")
        try:
            p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=dict(os.environ, **(env or {})), start_new_session=True)
        finally:
            out.close()
        self.procs.append(p)
        return p

    @staticmethod
    def _kill(p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        if p.poll() is not None:
            return
        try:
            os.killpg(p.pid, sig)  # its own session: the process and anything it started
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10.0) -> int | None:
        self._kill(p, sig, grace)
        return p.returncode
