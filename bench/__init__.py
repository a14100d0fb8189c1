"""Timing harness, baselines, reports, plots and the demo (imports ``sparse_ops``, never the
reverse: ``sparse-ops bench`` and ``sparse-ops demo`` are registered as entry points)."""

from sparse_ops.errors import SparseOpsError


class BenchError(SparseOpsError, ValueError):
    """A benchmark asked for something that does not exist or cannot run here."""
