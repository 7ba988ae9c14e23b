#!/usr/bin/env python
"""Group benchmark: n daemons erasure-coding n trainers' state on loopback, a node lost and rebuilt.

The program lives in the package (``shardkeep.bench.group``, also run by ``shardkeep bench``);
this wrapper keeps the documented command and writes to benchmarks/out/ as before.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

from shardkeep.bench.group import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], out_dir=Path(__file__).resolve().parent, prog="python benchmarks/bench_group.py"))
