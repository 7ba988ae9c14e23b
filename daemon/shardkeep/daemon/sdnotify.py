"""The sd_notify protocol, spoken directly (no libsystemd): readiness, watchdog pings, stopping.

systemd (``Type=notify``) passes ``NOTIFY_SOCKET``, a unix datagram socket
(a path, or an abstract name written with a leading ``@``); each message is
newline-separated ``KEY=value`` lines.  ``WATCHDOG_USEC`` (with
``WATCHDOG_PID`` naming this process, or unset) asks for ``WATCHDOG=1`` at
least that often; the daemon pings at half the interval from its event loop,
so a loop that stops turning stops the pings and systemd restarts it.
Without ``NOTIFY_SOCKET`` everything here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("shardkeep.daemon")


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return None
    if addr.startswith("@"):
        return "\0" + addr[1:]
    if addr.startswith("/"):
        return addr
    log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name: not notifying systemd", addr)
    return None


def notify(message: str) -> bool:
    """Send one notification; True if it was sent. Never raises: systemd's absence is no error."""
    addr = _address()
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], addr.lstrip("\0"), exc)
        return False


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None when not asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not a number of microseconds: no watchdog pings", usec)
        return None
    return value / 2e6 if value > 0 else None
