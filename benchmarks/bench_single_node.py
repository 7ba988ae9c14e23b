#!/usr/bin/env python
"""Single-node benchmark: shardkeep against torch.save/torch.load and torch.distributed.checkpoint.

The program lives in the package (``shardkeep.bench.single_node``, also run by ``shardkeep bench``);
this wrapper keeps the documented command and writes to benchmarks/out/ as before.
See benchmarks/README.md.
"""

import sys
from pathlib import Path

from shardkeep.bench.single_node import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], out_dir=Path(__file__).resolve().parent))
