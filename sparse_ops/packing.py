"""Packing: a conv weight under a structured mask → the packed formats the kernels read
(:class:`~sparse_ops_kernels.formats.ChannelPlan`, :class:`~sparse_ops_kernels.formats.GroupPack`).

The formats themselves (fields, checks, saved state, version) belong to the kernels
package; this module decides what goes into them. Every packed entry equals the masked
weight, so a layer run from a pack equals the masked dense conv (:mod:`sparse_ops.reference`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch

from sparse_ops_kernels import launch
from sparse_ops_kernels.formats import (
    COL_RUN,
    ChannelPlan,
    FormatError,
    GroupPack,
    check_code_range,
    column_codes,
    has_column_runs,
    ranks,
)

from .errors import PackingError, listing
from .layouts import Group, GroupLayout
from .masks import gemm_view


def _packing_errors(pack: Callable) -> Callable:
    """The kernels' own format checks (column-code range, the built type's index checks)
    reported as a PackingError too: every packing error is a SparseOpsError."""

    @functools.wraps(pack)
    def checked(*args, **kwargs):
        try:
            return pack(*args, **kwargs)
        except PackingError:
            raise
        except FormatError as exc:
            raise PackingError(str(exc)) from None

    return checked


def _geometry(weight: torch.Tensor, stride, padding, dilation, name: str) -> dict[str, Any]:
    if weight.dim() != 4:
        raise PackingError(
            f"{name}: expected a conv weight [Cout, Cin, kh, kw], got {tuple(weight.shape)}"
        )
    geometry = {
        "stride": launch.pair(stride),
        "padding": launch.pair(padding),
        "dilation": launch.pair(dilation),
    }
    if min(geometry["stride"]) < 1 or min(geometry["dilation"]) < 1 or min(geometry["padding"]) < 0:
        raise PackingError(
            f"{name}: stride and dilation must be ≥ 1 and padding ≥ 0, got {geometry}"
        )
    return geometry


def _check_mask(weight: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(weight.shape, dtype=torch.bool)
    if tuple(mask.shape) != tuple(weight.shape):
        raise PackingError(
            f"{name}: mask shape {tuple(mask.shape)} ≠ weight shape {tuple(weight.shape)}"
        )
    return mask.detach().to("cpu").bool()


def _check_bias(bias: torch.Tensor | None, cout: int, name: str) -> torch.Tensor | None:
    if bias is None:
        return None
    if tuple(bias.shape) != (cout,):
        raise PackingError(f"{name}: bias shape {tuple(bias.shape)} ≠ ({cout},)")
    return bias.detach().to(torch.float32).contiguous()


def _index(values) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values, dtype=np.int32)).contiguous()


@_packing_errors
def pack_channels(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    name: str = "<layer>",
) -> ChannelPlan:
    """Compact ``weight`` under a channel-structured ``mask`` (None: dense)."""
    geometry = _geometry(weight, stride, padding, dilation, name)
    m = _check_mask(weight, mask, name)
    cout, cin = int(weight.shape[0]), int(weight.shape[1])
    keep_out = m.flatten(1).any(1)
    keep_in = m.any(dim=(0, 2, 3))
    product = keep_out[:, None, None, None] & keep_in[None, :, None, None]
    if not torch.equal(product.expand_as(m), m):
        partial = (product.expand_as(m) & ~m).flatten(1).any(1).nonzero().flatten().tolist()
        raise PackingError(
            f"{name}: mask is not channel-structured (kept output channels × kept input "
            f"channels): output channels {listing(partial, 6)} keep only part of the "
            "kept input channels' weights"
        )
    out_rows = keep_out.nonzero().flatten()
    in_cols = keep_in.nonzero().flatten()
    compact = weight.detach()[out_rows][:, in_cols]  # [Cout', Cin', kh, kw]
    fill = (~keep_out).nonzero().flatten()
    return ChannelPlan(
        weight=compact.permute(0, 2, 3, 1).contiguous(),
        bias=_check_bias(bias, cout, name),
        in_idx=None if bool(keep_in.all()) else _index(in_cols),
        out_idx=None if bool(keep_out.all()) else _index(out_rows),
        fill_idx=None if fill.numel() == 0 else _index(fill),
        in_channels=cin,
        out_channels=cout,
        **geometry,
    )


@_packing_errors
def pack_groups(
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    layout: GroupLayout | Iterable[Group | Mapping] | None = None,
    bias: torch.Tensor | None = None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    block_n: int = 32,
    k_pad: int = 32,
    col_run: int | None = None,
    name: str = "<layer>",
) -> GroupPack:
    """Pack ``weight`` as dense groups.

    ``col_run``: ``8`` declares (and checks) that every group's columns are runs of 8
    consecutive channels of one tap starting at multiples of 8, so the kernel reads
    them as 16-byte vectors; ``1`` declares nothing; ``None`` detects it.

    ``layout`` is a :class:`~sparse_ops.layouts.GroupLayout` or anything
    :meth:`GroupLayout.of` takes, e.g. ``ticket.meta["groups"][name]``. Without it, the
    groups are read off ``mask`` (:meth:`GroupLayout.from_mask`). With both, every
    nonzero of ``mask`` must lie inside a group. Entries inside a group that the mask
    prunes become zero weights. With a layout and no mask, the layout is the mask.
    """
    geometry = _geometry(weight, stride, padding, dilation, name)
    if block_n < 1 or k_pad < 1:
        raise PackingError(f"{name}: block_n and k_pad must be ≥ 1")
    cout, cin, kh, kw = (int(s) for s in weight.shape)
    k_total = kh * kw * cin
    if layout is None and mask is None:
        layout = GroupLayout((Group(tuple(range(cout)), tuple(range(k_total))),))
    elif layout is None:
        layout = GroupLayout.from_mask(_check_mask(weight, mask, name))
    else:
        layout = GroupLayout.of(layout)
    rows_cat, cols_cat, n_rows, n_cols = layout.checked_arrays(cout, k_total, name)
    n_groups = n_rows.size
    # Every (row, column) entry of every group, vectorised: entry k of group g is
    # (rows_g[k // cols_g], cols_g[k % cols_g]).
    sizes = n_rows * n_cols
    group_of = np.repeat(np.arange(n_groups), sizes)
    first = np.repeat(np.cumsum(sizes) - sizes, sizes)
    local = np.arange(int(sizes.sum())) - first
    width = np.repeat(n_cols, sizes)
    i_local, j_local = local // np.maximum(width, 1), local % np.maximum(width, 1)
    row_start = np.cumsum(n_rows) - n_rows
    col_start = np.cumsum(n_cols) - n_cols
    entry_rows = rows_cat[row_start[group_of] + i_local]
    entry_cols = cols_cat[col_start[group_of] + j_local]
    covered = layout.covered((cout, k_total)).numpy()
    if mask is None:  # the layout defines the mask
        m = torch.from_numpy(covered).view(cout, kh, kw, cin).permute(0, 3, 1, 2)
    else:
        m = _check_mask(weight, mask, name)
        outside = gemm_view(m).numpy() & ~covered
        if outside.any():
            r, c = np.nonzero(outside)
            raise PackingError(
                f"{name}: mask is not the claimed group structure: {int(outside.sum())} "
                f"nonzeros lie outside every group (e.g. row {int(r[0])}, column {int(c[0])}"
                f" = (ky={int(c[0]) // cin // kw}, kx={int(c[0]) // cin % kw}, "
                f"c={int(c[0]) % cin}))"
            )

    w_view = gemm_view(weight.detach() * m.to(weight.dtype))
    r_pad = -(-n_rows // block_n) * block_n
    c_pad = -(-n_cols // k_pad) * k_pad
    row_ptr = np.concatenate([[0], np.cumsum(r_pad)]).astype(np.int64)
    col_ptr = np.concatenate([[0], np.cumsum(c_pad)]).astype(np.int64)
    val_ptr = np.concatenate([[0], np.cumsum(r_pad * c_pad)]).astype(np.int64)
    row_idx = np.full(int(row_ptr[-1]), -1, dtype=np.int64)
    row_idx[row_ptr[np.repeat(np.arange(n_groups), n_rows)] + ranks(n_rows)] = rows_cat
    col_idx = np.full(int(col_ptr[-1]), -1, dtype=np.int64)
    col_idx[col_ptr[np.repeat(np.arange(n_groups), n_cols)] + ranks(n_cols)] = cols_cat
    check_code_range(cin, (kh, kw), name)
    col_code = column_codes(_index(col_idx), cin, (kh, kw))
    runs = has_column_runs(col_code, cin)
    if col_run is None:
        col_run = COL_RUN if runs else 1
    elif col_run == COL_RUN and not runs:
        raise PackingError(
            f"{name}: col_run={COL_RUN} asked for, but a group's columns are not runs of "
            f"{COL_RUN} consecutive channels of one tap starting at multiples of {COL_RUN}"
        )
    values = torch.zeros(int(val_ptr[-1]), dtype=weight.dtype)
    if entry_rows.size:
        flat = val_ptr[group_of] + i_local * np.repeat(c_pad, sizes) + j_local
        values[torch.from_numpy(flat)] = w_view[
            torch.from_numpy(entry_rows), torch.from_numpy(entry_cols)
        ]
    in_group = np.zeros(cout, dtype=bool)
    in_group[rows_cat] = True
    fill = np.flatnonzero(~in_group)

    # Schedule: (group, row tile), most columns first; then epilogue-only tiles.
    order = np.lexsort((np.arange(n_groups), -c_pad))
    tiles_per = r_pad // block_n
    tile_group = np.repeat(order, tiles_per[order])
    tile_row = row_ptr[tile_group] + ranks(tiles_per[order]) * block_n
    fill_tiles = np.arange(0, fill.size, block_n)
    tile_group = np.concatenate([tile_group, np.full(fill_tiles.size, -1)])
    tile_row = np.concatenate([tile_row, fill_tiles])
    return GroupPack(
        values=values,
        val_ptr=torch.from_numpy(val_ptr),
        row_idx=_index(row_idx),
        row_ptr=_index(row_ptr),
        col_idx=_index(col_idx),
        col_code=col_code,
        col_ptr=_index(col_ptr),
        tile_group=_index(tile_group),
        tile_row=_index(tile_row),
        fill_idx=_index(fill),
        bias=_check_bias(bias, cout, name),
        in_channels=cin,
        out_channels=cout,
        kernel_size=(kh, kw),
        block_n=int(block_n),
        k_pad=int(k_pad),
        col_run=int(col_run),
        groups_meta={
            "sizes": np.stack([n_rows, n_cols], 1).tolist(),
            "max_cols": int(np.diff(col_ptr).max()) if col_ptr.size > 1 else 0,
        },
        **geometry,
    )
