"""One rank of a job with no collectives, snapshotting on a shared clock (run as a subprocess by fault tests).

Every ``--interval`` seconds after ``--t0`` (wall clock, the same for every
rank) is one step: the rank sets its state to the step number, calls
``snap.snapshot()`` (durability "group") and goes on.  Ranks never talk to
each other, so a cut peer link can stall nothing but shardkeep itself.  Events
go to ``--events`` as JSON lines:

* ``ready``: the Snapshotter is up (after ``restore()`` with ``--restore``);
* ``step``: step, wall time, ``blocked`` (seconds the training thread spent in
  shardkeep for this step: ``snap.wait()`` before changing the state in place,
  then ``snapshot()``), ``iter`` (seconds the whole step took, sleep excluded);
* ``result``: a snapshot's future resolved: status, level, reason, latency;
* ``restored``: with ``--restore`` or ``--restore-only``: the step, where it
  came from, whether every element equals it, and the daemon's restorable list;
* ``done``: the loop ended (``--stop`` file appeared or ``--max-seconds`` passed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

from shardkeep.client import Snapshotter


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--events", required=True)
    ap.add_argument("--t0", type=float, default=0.0)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--mb", type=float, default=4.0)
    ap.add_argument("--stop", default="")
    ap.add_argument("--max-seconds", type=float, default=150.0)
    ap.add_argument("--restore", action="store_true", help="restore() before the loop")
    ap.add_argument("--restore-only", action="store_true", help="restore() and exit")
    args = ap.parse_args()
    lock = threading.Lock()
    events = open(args.events, "a", buffering=1)

    def emit(**ev) -> None:
        ev["t"] = time.time()
        line = json.dumps(ev) + "\n"
        with lock:
            events.write(line)

    state = {"w": torch.zeros(int(args.mb * (1 << 20)) // 4), "step": -1}
    snap = Snapshotter(socket=args.socket, job=args.job, rank=args.rank, world_size=args.world,
                       local_world_size=1, durability="group", rng=False)
    last = -1
    if args.restore or args.restore_only:
        versions = snap.versions()
        start = snap.restore(state)
        exact = start is not None and bool((state["w"] == float(start)).all()) and state["step"] == start
        emit(event="restored", step=start, exact=exact, versions=versions, info=str(snap.last_restore))
        last = -1 if start is None else start
        if args.restore_only:
            snap.close()
            events.close()
            return 0
    emit(event="ready")
    deadline = time.monotonic() + args.max_seconds
    while time.monotonic() < deadline and not (args.stop and os.path.exists(args.stop)):
        # the next tick of the shared clock
        now = time.time()
        tick = int((now - args.t0) / args.interval) + 1
        time.sleep(max(0.0, args.t0 + tick * args.interval - time.time()))
        step = tick
        if step <= last:
            continue
        last = step
        t_a = time.perf_counter()
        b0 = snap.stats.blocked_s
        snap.wait()  # the state changes in place outside optimizer.step(): DESIGN.md says wait first
        state["w"].fill_(float(step))
        state["step"] = step
        t_snap = time.time()
        fut = snap.snapshot(state, step)
        blocked = snap.stats.blocked_s - b0
        emit(event="step", step=step, blocked=round(blocked, 5), iter=round(time.perf_counter() - t_a, 5))

        def done(f, s=step, ts=t_snap) -> None:
            try:
                r = f.result()
                emit(event="result", step=s, status=r.status, level=r.level, reason=r.reason,
                     latency=round(time.time() - ts, 3))
            except Exception as exc:  # noqa: BLE001 - recorded for the test
                emit(event="result", step=s, status="error", level=None, reason=repr(exc),
                     latency=round(time.time() - ts, 3))

        fut.add_done_callback(done)
    emit(event="done", last=last, stats={"snapshots": snap.stats.snapshots, "committed": snap.stats.committed,
                                         "skipped": snap.stats.skipped, "failed": snap.stats.failed,
                                         "blocked_s": round(snap.stats.blocked_s, 4)})
    snap.close()
    emit(event="closed")
    events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
