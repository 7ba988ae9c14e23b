"""``shardkeep bench``: the measured comparisons of benchmarks/, installed with the package.

``single_node`` (shardkeep against torch.save/torch.load and DCP on one node), ``group`` (an
erasure-coded group of daemons on loopback, a node lost and rebuilt), ``codec`` (encode throughput
against raw pyeclib), ``suite`` (the cases of ``shardkeep bench`` in one run, a summary table) and
``chart`` (its PNG). ``benchmarks/bench_*.py`` in the source tree are thin wrappers around these.
Nothing is imported here: ``python -m shardkeep.bench.<module>`` starts the benchmark children.
"""

from __future__ import annotations

from pathlib import Path


def default_out_dir() -> Path:
    """``benchmarks/`` under the current directory if there is one (a checkout), else ``./shardkeep-bench``."""
    here = Path.cwd() / "benchmarks"
    return here if here.is_dir() else Path.cwd() / "shardkeep-bench"
