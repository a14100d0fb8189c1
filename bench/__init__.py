"""Timing harness, baselines, reports and plots (imports ``sparse_ops``, never the reverse)."""
