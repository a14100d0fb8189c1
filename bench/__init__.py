"""Timing harness, baselines, reports, plots and the demo (imports ``sparse_ops``, never the
reverse: ``sparse-ops bench`` and ``sparse-ops demo`` are registered as entry points).

The modules here are the library; the runnable one-offs over it live in
:mod:`sparse_ops_bench.scripts` (``python -m sparse_ops_bench.scripts.NAME``)."""

from sparse_ops.errors import SparseOpsError


class BenchError(SparseOpsError, ValueError):
    """A benchmark asked for something that does not exist or cannot run here."""
