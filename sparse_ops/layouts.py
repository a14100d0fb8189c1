"""Group layouts: one conv's GEMM view (``Cout × K``, columns in (ky, kx, c) order) as
dense blocks with pairwise disjoint rows.

A layout is what regroup finds, what a ticket keeps in ``meta["groups"][layer]`` (a list
of ``{"rows": [...], "cols": [...]}``, JSON), what the converter decides to run and what
the packer turns into a :class:`~sparse_ops_kernels.formats.GroupPack`. All of them go
through :class:`GroupLayout`, so mask → layout and layout → mask have one definition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import PackingError, listing
from .masks import from_gemm_view, gemm_view, row_groups


@dataclass(frozen=True)
class Group:
    """One dense block: output rows × GEMM columns (flat (ky, kx, c) indices)."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]

    def as_dict(self) -> dict:
        return {"rows": list(self.rows), "cols": list(self.cols)}


@dataclass(frozen=True)
class GroupLayout:
    """The groups of one layer, in order (the order only affects packing, not results)."""

    groups: tuple[Group, ...]

    @classmethod
    def of(cls, layout: GroupLayout | Iterable[Group | Mapping]) -> GroupLayout:
        """A layout from itself, ``Group`` objects, or ticket-meta dicts."""
        if isinstance(layout, GroupLayout):
            return layout
        groups = []
        for g in layout:
            rows, cols = (g["rows"], g["cols"]) if isinstance(g, Mapping) else (g.rows, g.cols)
            groups.append(Group(_ints(rows), _ints(cols)))
        return cls(tuple(groups))

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> GroupLayout:
        """Rows with identical column sets form one group; empty rows are in none."""
        view = gemm_view(mask.detach().to("cpu").bool()).numpy()
        rows, group_of_row = row_groups(view)
        groups = []
        for g in range(int(group_of_row.max()) + 1 if rows.size else 0):
            members = rows[group_of_row == g]
            groups.append(Group(_ints(members), _ints(np.flatnonzero(view[members[0]]))))
        return cls(tuple(groups))

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __getitem__(self, i: int) -> Group:
        return self.groups[i]

    def as_meta(self) -> list[dict]:
        """The JSON form a ticket stores."""
        return [g.as_dict() for g in self.groups]

    def covered(self, view_shape: tuple[int, int]) -> torch.Tensor:
        """The bool GEMM view ``[Cout, K]`` the groups cover (rows × cols of each)."""
        n_groups = len(self.groups)
        columns = torch.zeros(n_groups + 1, view_shape[1], dtype=torch.bool)  # last: none
        group_of_row = torch.full((view_shape[0],), n_groups, dtype=torch.long)
        claimed = 0
        for i, g in enumerate(self.groups):
            columns[i, torch.as_tensor(g.cols, dtype=torch.long)] = True
            group_of_row[torch.as_tensor(g.rows, dtype=torch.long)] = i
            claimed += len(g.rows)
        if claimed == int((group_of_row < n_groups).sum()):
            # Rows disjoint (the normal case): one gather instead of a scatter per group.
            return columns[group_of_row]
        covered = torch.zeros(view_shape, dtype=torch.bool)
        for g in self.groups:  # a row in several groups covers the union of their columns
            rows = torch.as_tensor(g.rows, dtype=torch.long)
            covered[rows[:, None], torch.as_tensor(g.cols, dtype=torch.long)[None, :]] = True
        return covered

    def to_mask(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The mask of a weight of ``shape`` that is 1 inside every group."""
        return from_gemm_view(self.covered((shape[0], int(np.prod(shape[1:])))), shape)

    def covers(self, mask: torch.Tensor) -> bool:
        """Whether every nonzero of ``mask`` lies inside a group."""
        view = gemm_view(mask.detach().to("cpu").bool())
        return not bool((view & ~self.covered(tuple(view.shape))).any())

    def padded_size(self, block_n: int, k_pad: int) -> int:
        """Stored weights once each group is padded to ``block_n`` rows, ``k_pad`` columns."""
        return sum(
            -(-len(g.rows) // block_n) * block_n * (-(-len(g.cols) // k_pad) * k_pad)
            for g in self.groups
        )

    def checked_arrays(self, cout: int, k_total: int, name: str):
        """``(rows, cols, n_rows, n_cols)``: every group's rows and (sorted) columns
        concatenated, with per-group counts, after checking what a pack relies on:
        indices in range, no column listed twice in a group, no row in two groups."""
        n_rows = np.array([len(g.rows) for g in self.groups], dtype=np.int64)
        n_cols = np.array([len(g.cols) for g in self.groups], dtype=np.int64)
        rows = np.fromiter((r for g in self.groups for r in g.rows), np.int64, int(n_rows.sum()))
        cols = np.fromiter((c for g in self.groups for c in g.cols), np.int64, int(n_cols.sum()))
        group_of_row = np.repeat(np.arange(n_rows.size), n_rows)
        group_of_col = np.repeat(np.arange(n_cols.size), n_cols)
        bad_r = (rows < 0) | (rows >= cout)
        bad_c = (cols < 0) | (cols >= k_total)
        if bad_r.any() or bad_c.any():
            g = int(group_of_row[bad_r][0]) if bad_r.any() else int(group_of_col[bad_c][0])
            raise PackingError(
                f"{name}: group {g} has indices out of range (rows must be in [0, {cout}), "
                f"columns in [0, {k_total})): rows "
                f"{listing(rows[bad_r & (group_of_row == g)], 4)}, "
                f"columns {listing(cols[bad_c & (group_of_col == g)], 4)}"
            )
        order = np.lexsort((cols, group_of_col))  # sort columns within each group
        cols, group_of_col = cols[order], group_of_col[order]
        repeated = (cols[1:] == cols[:-1]) & (group_of_col[1:] == group_of_col[:-1])
        if repeated.any():
            raise PackingError(
                f"{name}: group {int(group_of_col[1:][repeated][0])} lists a column twice"
            )
        if rows.size:
            by_row = np.lexsort((group_of_row, rows))
            same = rows[by_row][1:] == rows[by_row][:-1]
            if same.any():
                k = int(np.flatnonzero(same)[0])
                row, first, second = (
                    int(rows[by_row][k]),
                    int(group_of_row[by_row][k]),
                    int(group_of_row[by_row][k + 1]),
                )
                raise PackingError(
                    f"{name}: rows shared by two groups: row {row} is in groups {first} and "
                    f"{second}"
                )
        return rows, cols, n_rows, n_cols


def _ints(values) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(values, dtype=np.int64).reshape(-1))
