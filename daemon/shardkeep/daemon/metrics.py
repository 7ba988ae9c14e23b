"""Prometheus metrics of the daemon (``--metrics-port``), with prometheus-client.

Events (a commit, a group decision, a reader's restore, a rebuild, encode and
decode work) are counted where they happen, on the event loop, into this
process's registry.  Everything the daemon already keeps (jobs' commits and
skips, memory against its limit, peers, degraded state, dropped frames,
errors, loop lag) is read at scrape time from the same dict ``shardkeep
status --json`` prints, computed on the event loop (the HTTP server runs in a
thread of its own), so the two never disagree.  One daemon per process: the
registry is module-level.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("shardkeep.daemon")

REGISTRY = CollectorRegistry(auto_describe=True)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)

COMMIT = Histogram("shardkeep_commit_seconds", "A rank's snapshot: slot handed out (begin) to local commit.",
                   buckets=_FAST, registry=REGISTRY)
SNAPSHOT_BYTES = Counter("shardkeep_snapshot_bytes", "Bytes of tensor data committed at local level.",
                         ["job"], registry=REGISTRY)
GROUP_COMMIT = Histogram("shardkeep_group_commit_seconds",
                         "A version: local commit on this node to the group's decision.", ["outcome"],
                         buckets=_SLOW, registry=REGISTRY)
RESTORE = Histogram("shardkeep_restore_seconds", "A reader's restore: version opened (pinned) to released.",
                    buckets=_FAST + (10.0, 30.0), registry=REGISTRY)
REBUILD = Histogram("shardkeep_rebuild_seconds", "`shardkeep recover` on this node, start to end.",
                    buckets=_SLOW, registry=REGISTRY)
RECOVERIES = Counter("shardkeep_recoveries", "`shardkeep recover` runs on this node, by result.", ["result"],
                     registry=REGISTRY)
CODEC_BYTES = Counter("shardkeep_codec_bytes", "Bytes through the erasure codec (encode: data in; "
                      "decode: fragments rebuilt).", ["op"], registry=REGISTRY)
CODEC_SECONDS = Counter("shardkeep_codec_seconds", "Wall seconds of the erasure codec's work; "
                        "rate(bytes) / rate(seconds) is its throughput.", ["op"], registry=REGISTRY)
INTEGRITY = Counter("shardkeep_integrity_failures", "Versions dropped because their bytes failed "
                    "verification, by where it was found.", ["where"], registry=REGISTRY)

_opened: OrderedDict[str, float] = OrderedDict()  # restore pin -> when it was opened (bounded)


def restore_opened(pin: str) -> None:
    _opened[pin] = time.monotonic()
    while len(_opened) > 4096:  # readers that died without releasing: their pins expire by lease
        _opened.popitem(last=False)


def restore_released(pin: str) -> None:
    t0 = _opened.pop(pin, None)
    if t0 is not None:
        RESTORE.observe(time.monotonic() - t0)


class _StatusCollector:
    """The daemon's status, as metrics, read on its event loop at scrape time."""

    def __init__(self, status: Callable[[], dict], loop: asyncio.AbstractEventLoop) -> None:
        self._status, self._loop = status, loop

    def describe(self):
        return []  # collected only on scrape

    def collect(self):
        async def read() -> dict:
            return self._status()

        ok = GaugeMetricFamily("shardkeep_status_ok", "1 if the event loop answered this scrape within 5 s.")
        try:
            st = asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - a stuck or stopped loop is itself the news
            log.warning("metrics: no status from the event loop: %r", exc)
            ok.add_metric([], 0)
            yield ok
            return
        ok.add_metric([], 1)
        yield ok
        yield from _families(st)


def _families(st: dict) -> list:
    out: list[Any] = []

    def gauge(name: str, doc: str, value: float | None, labels: dict | None = None) -> None:
        if value is None:
            return
        g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
        g.add_metric(list((labels or {}).values()), float(value))
        out.append(g)

    info = GaugeMetricFamily("shardkeep_info", "The daemon: protocol version and shm prefix.",
                             labels=["protocol", "shm_prefix"])
    info.add_metric([str(st["protocol"]), st["shm_prefix"]], 1)
    out.append(info)
    gauge("shardkeep_uptime_seconds", "Seconds since the daemon started.", st["uptime_s"])
    mem = st["memory"]
    gauge("shardkeep_memory_used_bytes", "Shared memory the daemon holds (slots, group segments).", mem["used"])
    grp_mem = GaugeMetricFamily("shardkeep_memory_group_bytes", "Of which the group commit's segments: parity "
                                "held, staging rings, spares kept for reuse.", labels=["kind"])
    for kind, n in (mem["group"] or {}).items():
        grp_mem.add_metric([kind], float(n))
    out.append(grp_mem)
    gauge("shardkeep_memory_limit_bytes", "The configured memory limit (absent: none).", mem["limit"])
    head = GaugeMetricFamily("shardkeep_memory_headroom_bytes", "What is left under each limit admission "
                             "control reads (the cgroup's, /dev/shm's, the configured one).", labels=["limit"])
    for name, free in mem["headroom"].items():
        head.add_metric([name], float(free))
    out.append(head)
    err = CounterMetricFamily("shardkeep_request_errors", "Requests answered with an error.")
    err.add_metric([], st["errors"])
    out.append(err)
    limited = CounterMetricFamily("shardkeep_requests_rate_limited", "Trainer requests refused by the per-"
                                  "connection rate limit (--max-request-rate).")
    limited.add_metric([], st.get("rate_limited", 0))
    out.append(limited)
    loop = st["loop"]
    if loop.get("samples"):
        gauge("shardkeep_loop_lag_p99_seconds", "The event loop's 99th percentile wake-up lag.",
              loop["lag_ms_p99"] / 1000)
    gauge("shardkeep_adopted_slots", "Committed slots re-adopted when the daemon started.", st["adopted_slots"])
    bad = CounterMetricFamily("shardkeep_bad_versions_dropped", "Versions dropped as damaged (at adoption, "
                              "or reported by a reader).")
    bad.add_metric([], st["dropped_bad_slots"])
    out.append(bad)
    commits = CounterMetricFamily("shardkeep_snapshots_committed", "Snapshots committed, per job (rank commits).",
                                  labels=["job"])
    skips = CounterMetricFamily("shardkeep_snapshots_skipped", "Snapshots skipped (no free slot, aborted), per job.",
                                labels=["job"])
    held = GaugeMetricFamily("shardkeep_job_bytes", "Shared memory held by a job's slots.", labels=["job"])
    newest = GaugeMetricFamily("shardkeep_job_newest_step", "A job's newest restorable step.", labels=["job"])
    grp = GaugeMetricFamily("shardkeep_job_group_step", "A job's newest group-level step.", labels=["job"])
    for j in st["jobs"]:
        commits.add_metric([j["job"]], j["commits"])
        skips.add_metric([j["job"]], j["skips"])
        held.add_metric([j["job"]], j["bytes"])
        if j["newest"] is not None:
            newest.add_metric([j["job"]], j["newest"])
        if j["group_committed"]:
            grp.add_metric([j["job"]], j["group_committed"][0])
    out += [commits, skips, held, newest, grp]
    g = st.get("group")
    if g:
        gauge("shardkeep_group_degraded", "1 while a peer is down: snapshots go on at local level only.",
              1 if g["degraded"] else 0)
        gauge("shardkeep_group_generation", "This node's generation in its group.", g["generation"])
        up = GaugeMetricFamily("shardkeep_peer_up", "1 if the peer was heard within the peer timeout.",
                               labels=["node"])
        for p in g["peers"]:
            up.add_metric([str(p["node"])], 1 if p["up"] else 0)
        out.append(up)
        forged = CounterMetricFamily("shardkeep_forged_frames_dropped", "Peer data frames that failed their "
                                     "keyed BLAKE3 tag (forged, altered, replayed) and were dropped.")
        forged.add_metric([], g["forged_data_frames_dropped"])
        refused = CounterMetricFamily("shardkeep_refused_connections", "Peer connections refused (unknown key).")
        refused.add_metric([], g["refused_connections"])
        out += [forged, refused]
    return out


def serve(port: int, host: str, status: Callable[[], dict], loop: asyncio.AbstractEventLoop) -> int:
    """Start the HTTP endpoint (a thread of prometheus-client's); returns the bound port."""
    from prometheus_client import start_http_server

    REGISTRY.register(_StatusCollector(status, loop))
    server, _thread = start_http_server(port, addr=host, registry=REGISTRY)
    return server.server_port
