"""pytest-benchmark microbenchmarks of the CPU-side structuring work.

    pytest bench/scripts/ --benchmark-only

Speed is reported, never asserted; ``python -m sparse_ops_bench.scripts.structure_speed``
writes a results JSON with the environment.
"""

from __future__ import annotations

import pytest

from .structure_speed import WORKLOADS, workloads


@pytest.fixture(scope="module")
def calls():
    return workloads()


@pytest.mark.parametrize("name", WORKLOADS)
def test_structure_speed(benchmark, calls, name):
    result = benchmark.pedantic(calls[name], rounds=3, iterations=1, warmup_rounds=0)
    assert result is not None  # each workload returns its product (mask, ticket, report)
