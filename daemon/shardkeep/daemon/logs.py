"""The daemon's logs: text for a person, or one JSON object per line (``--log-format json``) for a collector.

A JSON line carries ``time`` (ISO 8601, UTC), ``level``, ``logger``,
``message`` and, where the event names them, ``job``, ``rank``, ``step``,
``epoch`` and ``peer`` (another node of the group).  Fields passed with
``extra=`` win; otherwise they are read from the message, whose wording the
daemon keeps regular ("job J rank R step S", "node N"), so every existing
event gets its fields without a second way of logging.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

_FIELDS = ("job", "rank", "step", "epoch", "peer")
_JOB = re.compile(r"\bjob '?([A-Za-z0-9_.:+-]+)'?")
_RANK = re.compile(r"\branks? (\d+)\b")
_STEP = re.compile(r"\bstep (\d+)\b")
_EPOCH = re.compile(r"\bepoch (\d+)\b")
_NODE = re.compile(r"\bnode(?:\(s\))? \[?(\d+)")


class JsonFormatter(logging.Formatter):
    def __init__(self, node: int | None = None) -> None:
        super().__init__()
        self.node = node  # this daemon's node in its group: "node N:" prefixes name it, not a peer

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "message": msg,
        }
        for key, rx in (("job", _JOB), ("rank", _RANK), ("step", _STEP), ("epoch", _EPOCH)):
            if (v := getattr(record, key, None)) is not None:
                out[key] = v
            elif (mt := rx.search(msg)) is not None:
                out[key] = mt.group(1) if key == "job" else int(mt.group(1))
        peer = getattr(record, "peer", None)
        if peer is None:
            peers = [int(x) for x in _NODE.findall(msg) if int(x) != self.node]
            peer = peers[0] if peers else None
        if peer is not None:
            out["peer"] = peer
        if self.node is not None:
            out["node"] = self.node
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text", node: int | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(node))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
