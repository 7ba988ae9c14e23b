#!/usr/bin/env python
"""Encode throughput of shardkeep's codec pool against raw pyeclib plus one memcpy.

The program lives in the package (``shardkeep.bench.codec``, also run by ``shardkeep bench``);
this wrapper keeps the documented command and writes to benchmarks/out/ as before.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

from shardkeep.bench.codec import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], out_dir=Path(__file__).resolve().parent))
