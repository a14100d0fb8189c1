"""Regroup (Structure-LTH): turn a sparse mask into dense blocks with disjoint rows.

Per conv layer, on the ``Cout × K`` GEMM view of the mask (columns in (ky, kx, c)
order, see :mod:`sparse_ops.masks`):

1. **Partition** the non-empty rows into ``parts`` with Mt-KaHyPar, so that rows using
   the same columns land together (imbalance ``epsilon``, tightened where it would let
   a part fall below ``min_rows``: :meth:`.partition.RowPartitioner.split`). The
   default model is the column hypergraph's sparsified, weighted clique expansion. The
   original's column-net hypergraph is ``model="hypergraph"``. :mod:`.partition`
   explains the choice.
2. **Grow columns**, per part, largest part first. Sort the columns by their nonzero
   count inside the part, descending (ties: lower column first), and take them one at
   a time until every row ``r`` of the part satisfies ``width > t1 × uncovered_r``,
   where ``width`` is the number of columns taken and ``uncovered_r`` counts row
   ``r``'s nonzeros outside them. With ``t2`` set, every column at least ``t2`` full
   within the part (a *dense column*) also joins. Since the columns are sorted, the
   block is simply the longer of the two prefixes.

   The ``t1`` rule trades block width against nonzeros left out. At t1 = 1.5 it stops
   a perfectly dense block of ``W`` columns near ``0.6 W``, and it cuts a layer of
   density 0.8 to about half its columns. Inside IMP this is what moves sparsity
   forward, so it is the default. ``t2`` (off by default) keeps dense structure whole:
   with ``t2 = 0.5`` a planted block survives intact, because a column at least half
   full never refills more entries than it keeps. At high density, though, ``t2``
   keeps nearly every column, and IMP + regroup stops making progress.
3. **Keep or drop the block.** A part with fewer than ``min_rows`` rows, or a block
   with fewer than ``b2`` columns, is dropped (its nonzeros are pruned). A kept block
   is cut into groups of at most ``b1`` rows (kernel tiles; the mask does not change).
4. The new mask is 1 inside every block and 0 elsewhere: pruned entries inside a block
   are refilled, and nonzeros outside every block are dropped.

**The part count.** ``parts="auto"`` (the default) chooses it per layer by what the
blocks are for: nonzeros kept per unit of block area. It tries ``round(rows /
group_rows)`` parts, half and twice that (bounded so that a part can reach
``min_rows``), runs steps 2–3 on each, and keeps the count whose blocks hold the most
kept nonzeros per unit of area. A block is charged at least ``b1`` rows high: the
kernel computes a group in row tiles that high, so a shorter block costs a whole tile
(the GroupPack pads it). Counts that drop a part rank last; ties go to fewer parts.
Only the largest count is partitioned; each smaller one merges the parts of the next
larger (:meth:`.partition.RowPartitioner.coarsen`), so the search costs one
partitioner call per layer. The report's ``part_scores`` lists ``[parts, score]`` for
every count tried. Why: a fixed count merges planted blocks that are smaller than
``group_rows`` (a 128-row layer with four 32-row blocks got 2 parts, each block's
columns shared by two row groups: 0.49 of the planted nonzeros kept, where the column
rule on the true partition keeps 0.665; the search picks 4 parts and keeps 0.665).
``parts="rows"`` is the fixed ``round(rows / group_rows)`` (bounded the same way); an
int is that many parts everywhere. A layer with fewer non-empty rows than
``min_rows`` becomes one group under ``"auto"`` and ``"rows"``, so narrow layers are
regrouped too.

Differences from the original code, all deliberate (see the project's REFERENCE notes):

* the column loop tests the column it just added (theirs tested column ``i``, not the
  ``i``-th sorted one);
* every row's uncovered count is updated for every added column (theirs stopped
  updating the remaining rows at the first row that failed the test);
* the loop may take every non-empty column (theirs stopped one short and then dropped
  the part);
* parts of exactly ``min_rows`` rows are kept (theirs drops parts of ≤ 16 rows);
* a missing or failing partitioner is an error (theirs returned the mask unchanged);
* the part count can adapt to the layer (theirs was 8 everywhere, so layers of ≤ 64
  channels were never regrouped).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from sparse_ops_kernels.formats import COL_RUN

from ..errors import SparseOpsError
from ..layouts import Group, GroupLayout
from ..masks import gemm_view
from ..tickets.ticket import Ticket
from .layers import CONV, layer_kinds, select
from .partition import MODELS, OBJECTIVES, RowPartitioner
from .report import LayerChange

PART_RULES = ("auto", "rows")


class RegroupError(SparseOpsError):
    """Regroup parameters that cannot be satisfied for a layer."""


@dataclass(frozen=True)
class RegroupConfig:
    # An int; "auto": the count around rows / group_rows whose blocks cover the most
    # nonzeros per unit of area; "rows": round(rows / group_rows).
    parts: int | str = "auto"
    group_rows: int = 64  # auto / rows: target rows per part
    t1: float = 1.5  # column growth: stop when width > t1 × every row's uncovered nonzeros
    t2: float | None = None  # columns this full within the part always join (None: off)
    b1: int = 32  # rows per group (blocks are cut into groups this high)
    min_rows: int = 16  # parts with fewer rows are dropped
    b2: int = 1  # blocks with fewer columns are dropped
    epsilon: float = 0.1  # partition imbalance (tightened where a part could miss min_rows)
    model: str = "graph"  # partition model: "graph" (row similarity) or "hypergraph"
    neighbors: int = 32  # graph model: strongest links kept per row
    objective: str = "cut"  # hypergraph model objective: cut, km1 or soed
    seed: int = 0
    # Columns chosen in runs of COL_RUN consecutive channels of one tap (8: the group
    # kernel then reads both operands as 16-byte vectors); "auto": per layer, runs where
    # they keep at least run_keep of the nonzeros single columns keep. Layers whose
    # input channels are not a multiple of 8 always use single columns.
    col_run: int | str = 1
    run_keep: float = 0.95

    def __post_init__(self) -> None:
        problems = []
        if not (self.parts in PART_RULES or (isinstance(self.parts, int) and self.parts >= 1)):
            problems.append(f"parts must be a positive int, 'auto' or 'rows', got {self.parts!r}")
        for name in ("group_rows", "b1", "min_rows", "b2", "neighbors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not self.t1 > 0:
            problems.append(f"t1 must be > 0, got {self.t1!r}")
        if self.t2 is not None and not 0 < self.t2 <= 1:
            problems.append(f"t2 must be in (0, 1] or None, got {self.t2!r}")
        if not 0 < self.epsilon <= 1:
            problems.append(f"epsilon must be in (0, 1], got {self.epsilon!r}")
        if self.model not in MODELS:
            problems.append(f"model must be one of {MODELS}, got {self.model!r}")
        if self.col_run not in (1, COL_RUN, "auto"):
            problems.append(f"col_run must be 1, {COL_RUN} or 'auto', got {self.col_run!r}")
        if not 0 < self.run_keep <= 1:
            problems.append(f"run_keep must be in (0, 1], got {self.run_keep!r}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if problems:
            raise RegroupError("invalid regroup parameters: " + "; ".join(problems))

    def as_dict(self) -> dict:
        return asdict(self)


def _part_counts(n_rows: int, config: RegroupConfig) -> tuple[list[int], int]:
    """(part counts to try, effective min_rows) for a layer with ``n_rows`` non-empty rows.

    ``"rows"``: ``round(n_rows / group_rows)``. ``"auto"``: that count halved, as is and
    doubled. All are bounded so that a part can reach ``min_rows``; a layer narrower
    than ``min_rows`` is one part."""
    if n_rows < config.min_rows:
        return [1], n_rows
    most = n_rows // config.min_rows
    base = max(1, min(round(n_rows / config.group_rows), most))
    if config.parts == "rows":
        return [base], config.min_rows
    return sorted({max(1, base // 2), base, min(2 * base, most)}), config.min_rows


@dataclass
class _Layout:
    """The blocks one partition of a layer gives, and how well they cover its nonzeros."""

    parts: int
    blocks: list[tuple[np.ndarray, np.ndarray, int]]  # (rows, cols, col run), largest first
    dropped: list[str]  # why each dropped part was dropped
    kept: int  # nonzeros inside the blocks
    area: int  # block area, rows counted at least b1 high (one kernel row tile)

    @property
    def score(self) -> float:
        return self.kept / self.area if self.area else 0.0

    def rank(self) -> tuple:
        # Partitions that keep every part first; then nonzeros per unit of area; ties go
        # to fewer parts (fewer, taller blocks).
        return (not self.dropped, self.score, -self.parts)


def _layout(view, rows, block_of_row, parts, config, min_rows, runs_fit) -> _Layout:
    members = [rows[block_of_row == b] for b in range(parts)]
    # Largest part first (ties: the part holding the lowest row), as the kernel schedules.
    members = sorted((m for m in members if m.size), key=lambda m: (-m.size, int(m[0])))
    blocks, dropped, kept, area = [], [], 0, 0
    for part_rows in members:
        if part_rows.size < min_rows:
            dropped.append(f"{part_rows.size} rows < min_rows={min_rows}")
            continue
        sub = view[part_rows]
        cols, run = _choose_columns(sub, config, runs_fit)
        if cols.size < config.b2:
            dropped.append(f"{cols.size} columns < b2={config.b2}")
            continue
        blocks.append((part_rows, cols, run))
        kept += int(sub[:, cols].sum())
        area += max(int(part_rows.size), config.b1) * int(cols.size)
    return _Layout(parts, blocks, dropped, kept, area)


def _grow_columns(sub: np.ndarray, t1: float, t2: float | None, run: int = 1) -> np.ndarray:
    """Columns of the block for one part (``sub``: its rows of the GEMM view), sorted.

    With ``run`` > 1 the units taken are runs of ``run`` consecutive columns (``sub``'s
    width is a multiple of ``run``): the same rule, with a unit's count the nonzeros of
    its columns and the width counted in columns."""
    counts = sub.reshape(sub.shape[0], -1, run).sum(axis=2, dtype=np.int32) if run > 1 else sub
    unit_count = counts.sum(axis=0)
    order = np.argsort(-unit_count, kind="stable")
    order = order[unit_count[order] > 0]
    if order.size == 0:
        return order
    covered = np.cumsum(counts[:, order], axis=1, dtype=np.int32)
    uncovered = counts.sum(axis=1, dtype=np.int32)[:, None] - covered
    width = run * np.arange(1, order.size + 1)
    satisfied = (width[None, :] > t1 * uncovered).all(axis=0)
    take = int(np.argmax(satisfied)) + 1  # the last unit always satisfies (uncovered = 0)
    if t2 is not None:
        take = max(take, int((unit_count[order] >= t2 * run * sub.shape[0]).sum()))
    units = np.sort(order[:take])
    if run == 1:
        return units
    return (units[:, None] * run + np.arange(run)).reshape(-1)


def _choose_columns(sub: np.ndarray, config: RegroupConfig, runs_fit: bool):
    """(columns, run) for one part under ``config.col_run``."""
    if config.col_run == 1 or not runs_fit:
        return _grow_columns(sub, config.t1, config.t2), 1
    in_runs = _grow_columns(sub, config.t1, config.t2, COL_RUN)
    if config.col_run == COL_RUN:
        return in_runs, COL_RUN
    single = _grow_columns(sub, config.t1, config.t2)
    kept_runs, kept_single = int(sub[:, in_runs].sum()), int(sub[:, single].sum())
    if kept_runs >= config.run_keep * kept_single:
        return in_runs, COL_RUN
    return single, 1


def regroup_mask(
    mask: torch.Tensor, config: RegroupConfig | None = None, *, name: str = "<mask>"
) -> tuple[torch.Tensor, GroupLayout, LayerChange]:
    """Regroup one conv (4-D) or linear (2-D) mask: new mask, its layout, report."""
    config = config or RegroupConfig()
    mask = mask.detach().to("cpu", torch.bool)
    view = gemm_view(mask).numpy()
    if not view.any():
        return mask.clone(), GroupLayout(()), LayerChange.compare(name, mask, mask, "empty")
    if view.all():
        rows = np.arange(view.shape[0])
        groups = GroupLayout(tuple(_cut(rows, np.arange(view.shape[1]), config.b1)))
        return (
            mask.clone(),
            groups,
            LayerChange.compare(
                name, mask, mask, "dense", groups=len(groups), blocks=[list(view.shape)]
            ),
        )

    partitioner = RowPartitioner(
        view,
        model=config.model,
        neighbors=config.neighbors,
        epsilon=config.epsilon,
        objective=config.objective,
        seed=config.seed,
        layer=name,
    )
    n_rows = partitioner.rows.size
    if isinstance(config.parts, int):
        counts, min_rows = [config.parts], config.min_rows
    else:
        counts, min_rows = _part_counts(n_rows, config)
    # Runs stay inside one tap only if they tile the channels: Cin a multiple of 8.
    runs_fit = mask.dim() == 4 and mask.shape[1] % COL_RUN == 0
    # One partitioner call, for the most parts; each smaller count merges the parts of
    # the next larger one (RowPartitioner.coarsen), so the search costs about one
    # partition and a column growth per count.
    tried = []
    for i, parts in enumerate(sorted(counts, reverse=True)):
        if i == 0:
            labels = partitioner.split(parts, min_part=min_rows)
        else:
            labels = partitioner.coarsen(labels, tried[-1].parts, parts)
        tried.append(_layout(view, partitioner.rows, labels, parts, config, min_rows, runs_fit))
    tried.reverse()  # reported in ascending part counts
    best = max(tried, key=_Layout.rank)
    if not best.blocks:
        raise RegroupError(
            f"{name}: regroup would empty this layer ({n_rows} non-empty rows in "
            f"{best.parts} parts; dropped: {'; '.join(best.dropped)}). Lower min_rows / b2 "
            "or use parts='auto'"
        )
    cut = (g for rows, cols, _ in best.blocks for g in _cut(rows, cols, config.b1))
    groups = GroupLayout(tuple(cut))
    detail = {}
    if len(tried) > 1:  # what the search saw: [parts, score] per count tried
        detail["part_scores"] = [[t.parts, round(t.score, 4)] for t in tried]
    new_mask = groups.to_mask(tuple(mask.shape))
    report = LayerChange.compare(
        name,
        mask,
        new_mask,
        "regrouped",
        parts=best.parts,
        groups=len(groups),
        blocks=[[int(r.size), int(c.size)] for r, c, _ in best.blocks],
        dropped_parts=best.dropped,
        col_runs=[run for _, _, run in best.blocks],
        **detail,
    )
    return new_mask, groups, report


def _cut(rows: np.ndarray, cols: np.ndarray, b1: int) -> list[Group]:
    rows = np.sort(rows)
    col_tuple = tuple(int(c) for c in cols)
    return [
        Group(tuple(int(r) for r in rows[i : i + b1]), col_tuple) for i in range(0, rows.size, b1)
    ]


def regroup(
    ticket: Ticket,
    config: RegroupConfig | None = None,
    *,
    layers: list[str] | None = None,
    model: nn.Module | None = None,
    progress: Callable[[str], None] | None = None,
    **params,
) -> Ticket:
    """Regroup every conv mask of ``ticket`` (or ``layers``); returns a new Ticket.

    Linear and grouped (depthwise) convs are left as they are and reported as skipped.
    The result's meta carries ``method = "regroup"``, ``groups[layer]`` (the layout:
    ``rows`` and ``cols`` per group, columns in (ky, kx, c) order) and
    ``structure_report`` (per-layer changes). Parameters go in ``config`` or as
    keywords (``parts``, ``t1``, ...), not both.
    """
    if config is not None and params:
        raise TypeError("pass a RegroupConfig or keyword parameters, not both")
    if isinstance(model, str):  # the partitioner's model, passed where the network goes
        raise RegroupError(
            f"model= is the network (an nn.Module) whose layers the ticket masks; the "
            f"partitioning model goes in RegroupConfig(model={model!r})"
        )
    config = config or RegroupConfig(**params)
    kinds = layer_kinds(ticket, model)
    masks = dict(ticket.masks)
    layouts = dict(ticket.meta.get("groups", {}))
    changes = []
    names = select(ticket, layers)
    for i, name in enumerate(names):
        if progress is not None:
            progress(f"regroup {i + 1}/{len(names)} {name}")
        if kinds[name] != CONV:
            change = LayerChange.compare(name, masks[name], masks[name], f"skipped: {kinds[name]}")
        else:
            masks[name], groups, change = regroup_mask(masks[name], config, name=name)
            layouts[name] = groups.as_meta()
        changes.append(change)
    meta = dict(ticket.meta, method="regroup", groups=layouts)
    meta["structure_report"] = {
        "method": "regroup",
        "params": config.as_dict(),
        "layers": [c.as_dict() for c in changes],
    }
    return Ticket(masks, ticket.weights, ticket.arch, meta, rewind=ticket.rewind)
