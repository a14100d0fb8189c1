"""Partitioning the rows of a mask with Mt-KaHyPar, so that rows sharing columns group.

The rows (output channels) of a ``Cout × K`` mask are the vertices; the columns define
how strongly rows belong together. Two models:

``"graph"`` (default)
    The weighted clique expansion of the column hypergraph, sparsified: rows ``i, j``
    are joined with weight ``S_ij − d_i d_j / K``, their shared nonzero columns in
    excess of what two independent rows of those densities would share, keeping
    each row's ``neighbors`` strongest positive links. Minimising the cut keeps rows
    that share many columns in one part. Partitioned in Mt-KaHyPar's graph mode.
``"hypergraph"``
    The original code's column-net model: one hyperedge per column (with ≥ 2 pins)
    over the rows using it; objective ``cut`` (what hMETIS's ``shmetis`` minimises),
    ``km1`` or ``soed``.

Why the graph model is the default: when IMP masks carry noise, nearly every column
touches every part, so every hyperedge is cut whatever the partition. The hypergraph
objective is then flat, and the partitioner cannot see the blocks. On planted block
structure plus 3–15% noise, the hypergraph model put 19–60% of rows with their block,
and the graph model 100% (docs/STRUCTURE.md has the measurements).

Both run under Mt-KaHyPar's ``DETERMINISTIC`` preset: for a given seed the partition
is identical whatever the thread count. If the partitioner is missing or fails, that
is an error, never a silent fallback.

:class:`RowPartitioner` also merges the parts of a partition into fewer without calling
the partitioner again (:meth:`RowPartitioner.coarsen`): regroup's search over part
counts partitions each layer once.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import torch

from ..errors import SparseOpsError

MODELS = ("graph", "hypergraph")
OBJECTIVES = ("cut", "km1", "soed")


class PartitionerError(SparseOpsError):
    """Mt-KaHyPar is unavailable or failed, or the request cannot be met."""


_lock = threading.Lock()
_initializer = None


def _mtkahypar():
    """Import and initialise Mt-KaHyPar once per process (it keeps a global thread pool)."""
    global _initializer
    try:
        import mtkahypar
    except ImportError as exc:  # pragma: no cover - it is an install requirement
        raise PartitionerError(
            f"regroup needs the Mt-KaHyPar partitioner (pip install mtkahypar): {exc}"
        ) from None
    with _lock:
        if _initializer is None:
            threads = int(os.environ.get("SPARSE_OPS_PARTITION_THREADS", os.cpu_count() or 1))
            _initializer = mtkahypar.initialize(max(1, threads), False)
    return mtkahypar, _initializer


def column_hyperedges(view: np.ndarray) -> list[np.ndarray]:
    """Per column with ≥ 2 nonzeros, its pins (row indices of ``view``).

    One-pin hyperedges are left out: they can never be cut, so they cannot change the
    objective.
    """
    counts = view.sum(axis=0)
    cols = np.flatnonzero(counts >= 2)
    if cols.size == 0:
        return []
    # Column-major nonzeros: positions grouped by column, rows ascending within one.
    _, row_pos = np.nonzero(view[:, cols].T)
    return np.split(row_pos.astype(np.int64), np.cumsum(counts[cols])[:-1])


def excess_similarity_edges(view: np.ndarray, neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Sparsified, weighted clique expansion: ``(edges [E, 2], integer weights [E])``."""
    rows = torch.from_numpy(view).to(torch.float32)
    n, k = rows.shape
    shared = rows @ rows.T  # exact: counts stay far below 2**24
    density = rows.sum(dim=1)
    excess = shared - density[:, None] * density[None, :] / k
    excess.fill_diagonal_(-float("inf"))
    top, idx = excess.topk(min(neighbors, n - 1), dim=1)
    keep = top > 0
    a = torch.arange(n)[:, None].expand_as(idx)[keep]
    b, w = idx[keep], top[keep]
    key = torch.minimum(a, b) * n + torch.maximum(a, b)  # undirected: one edge per pair
    unique, inverse = torch.unique(key, return_inverse=True)
    weight = torch.zeros(unique.numel()).scatter_reduce(0, inverse, w, reduce="amax")
    edges = torch.stack([unique // n, unique % n], dim=1)
    return edges.numpy(), torch.clamp(torch.round(weight), min=1).to(torch.int64).numpy()


class RowPartitioner:
    """The non-empty rows of bool matrix ``view``, to split into parts and merge again.

    :meth:`split` runs Mt-KaHyPar; :meth:`coarsen` merges the parts of a split into fewer
    without partitioning again, so that regroup's search over part counts costs one
    partitioner call per layer.
    """

    def __init__(
        self,
        view: np.ndarray,
        *,
        model: str = "graph",
        neighbors: int = 32,
        epsilon: float = 0.1,
        objective: str = "cut",
        seed: int = 0,
        layer: str = "<mask>",
    ) -> None:
        if model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {model!r}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        self.view, self.model, self.neighbors = view, model, neighbors
        self.epsilon, self.objective, self.seed, self.layer = epsilon, objective, seed, layer
        self.rows = np.flatnonzero(view.any(axis=1))

    def split(self, parts: int, min_part: int = 1) -> np.ndarray:
        """Each of :attr:`rows`' part in ``0..parts-1``. One part, or nothing to cut (no
        shared columns), needs no partitioner: rows are then assigned in contiguous,
        balanced runs.

        ``epsilon`` only bounds parts from above, and Mt-KaHyPar tends to fill all but
        one part to that bound: 256 rows in 8 parts at ε = 0.1 came out as seven parts
        of 35 or 34 rows and one of 12. The bound is therefore tightened to what leaves
        ``min_part`` rows for the last part (down to perfect balance, ε = 0), so that a
        caller dropping parts below ``min_part`` does not lose one to the balance rule
        alone. Perfect balance cannot always guarantee it (66 rows, 4 parts of at most
        17: the last may get 15)."""
        if parts < 1:
            raise ValueError(f"parts must be ≥ 1, got {parts}")
        n = self.rows.size
        if n and parts > n:
            raise PartitionerError(
                f"{self.layer}: cannot split {n} non-empty rows into {parts} parts; use "
                "fewer parts or parts='auto'"
            )
        if n == 0 or parts == 1:
            return np.zeros(n, dtype=np.int64)
        sub = self.view[self.rows]
        if self.model == "graph":
            edges, weights = excess_similarity_edges(sub, self.neighbors)
            if edges.size == 0:
                return (np.arange(n) * parts // n).astype(np.int64)
        else:
            hyperedges = column_hyperedges(sub)
            if not hyperedges:
                return (np.arange(n) * parts // n).astype(np.int64)

        mtkahypar, init = _mtkahypar()
        try:
            context = init.context_from_preset(mtkahypar.PresetType.DETERMINISTIC)
            chosen = "CUT" if self.model == "graph" else self.objective.upper()  # km1 = cut
            context.set_partitioning_parameters(
                parts, self._epsilon(parts, min_part), getattr(mtkahypar.Objective, chosen)
            )
            context.logging = False
            mtkahypar.set_seed(int(self.seed))
            if self.model == "graph":
                problem = init.create_graph(
                    context, n, len(edges), edges.tolist(), [1] * n, weights.tolist()
                )
            else:
                problem = init.create_hypergraph(
                    context, n, len(hyperedges), [e.tolist() for e in hyperedges]
                )
            result = np.asarray(problem.partition(context).get_partition(), dtype=np.int64)
        except Exception as exc:  # the binding raises its own exception types
            raise PartitionerError(
                f"{self.layer}: Mt-KaHyPar failed partitioning {n} rows into {parts} parts "
                f"({self.model} model): {exc}"
            ) from None
        if result.shape != (n,) or result.min() < 0 or result.max() >= parts:
            raise PartitionerError(f"{self.layer}: Mt-KaHyPar returned an invalid partition")
        return result

    def _epsilon(self, parts: int, min_part: int) -> float:
        n = self.rows.size
        mean = -(-n // parts)  # Mt-KaHyPar's bound: floor((1 + ε) · ceil(n / parts))
        cap = (n - min_part) // (parts - 1)  # the largest part leaving min_part for the last
        # 1e-9: (1 + ε) · mean must not round to just below cap (the floor would lose a row)
        return float(min(self.epsilon, max(0.0, cap / mean - 1 + 1e-9)))

    def coarsen(self, block_of_row: np.ndarray, parts: int, target: int) -> np.ndarray:
        """Merge the ``parts`` parts of ``block_of_row`` into ``target`` (``0..target-1``).

        Rounds of greedy matching: each round merges disjoint pairs of parts, the pair
        whose rows share the most columns in excess of chance first (the clique-expansion
        weight between the two parts: what the graph model's cut counts, unsparsified),
        until ``target`` parts remain. Pairs of similar size merge, so the parts stay
        about as balanced as the split made them."""
        if not 1 <= target <= parts:
            raise ValueError(f"cannot coarsen {parts} parts into {target}")
        # Float64 holds these integer counts exactly (≪ 2**53), so ties compare exactly.
        sub = self.view[self.rows].astype(np.float64)
        labels = block_of_row
        while parts > target:
            counts = np.zeros((parts, sub.shape[0]))
            counts[labels, np.arange(labels.size)] = 1.0
            counts = counts @ sub  # nonzeros per (part, column)
            total = counts.sum(axis=1)
            link = counts @ counts.T - np.outer(total, total) / sub.shape[1]
            a, b = np.triu_indices(parts, 1)
            merged = np.full(parts, -1)
            merges = 0
            for i in np.argsort(-link[a, b], kind="stable"):
                if merges == parts - target:
                    break
                if merged[a[i]] < 0 and merged[b[i]] < 0:
                    merged[a[i]] = merged[b[i]] = merges
                    merges += 1
            alone = merged < 0
            merged[alone] = merges + np.arange(int(alone.sum()))
            labels, parts = merged[labels], parts - merges
        return labels


def partition_rows(view: np.ndarray, parts: int, **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """Partition the non-empty rows of bool matrix ``view`` into ``parts`` blocks, once.

    ``options`` are :class:`RowPartitioner`'s (``model``, ``neighbors``, ``epsilon``,
    ``objective``, ``seed``, ``layer``). Returns ``(rows, block_of_row)``: the non-empty
    row ids and each one's block in ``0..parts-1`` (:meth:`RowPartitioner.split`).
    """
    partitioner = RowPartitioner(view, **options)
    return partitioner.rows, partitioner.split(parts)
