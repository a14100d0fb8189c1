"""Mask geometry: the GEMM view of a conv/linear mask and the structure it has.

A conv weight ``W[Cout, Cin, kh, kw]`` is seen as a GEMM matrix ``Cout × K`` with
``K = kh·kw·Cin`` and columns ordered **(ky, kx, c)**: column ``(ky·kw + kx)·Cin + c``.
That order makes consecutive columns consecutive channels of an NHWC activation,
which is what the kernels gather. A Linear weight ``[out, in]`` is its own GEMM
view. Every structure statement below is about rows (output channels) and
columns of that view.

Structure classes, tested in this order:

``empty``
    no nonzero at all.
``dense``
    every entry kept.
``channel``
    ``mask[o, i, ky, kx] = keep_out[o] ∧ keep_in[i]``: whole output channels and
    whole input channels removed, nothing else. Runs as a smaller dense conv.
``group``
    a union of dense blocks with pairwise disjoint rows (rows sharing one column
    set form one block), with blocks at least ``min_block_rows`` rows high on
    average. Every mask is trivially a union of one-row blocks; blocks thinner
    than a tensor-core tile edge buy nothing, so such masks are ``unstructured``.
``unstructured``
    anything else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import TicketMismatchError

STRUCTURES = ("empty", "dense", "channel", "group", "unstructured")

# Mean block height below which a row-grouped mask is called unstructured. Four rows
# is the smallest height at which a block still fills a quarter of a 16-wide MMA
# operand; below that, packing costs more than it saves.
DEFAULT_MIN_BLOCK_ROWS = 4.0


def check_mask_shape(name: str, mask: torch.Tensor) -> None:
    """Raise unless ``mask`` has a conv (4-D) or linear (2-D) weight shape."""
    if mask.dim() not in (2, 4):
        raise TicketMismatchError(
            f"mask {name!r} has shape {tuple(mask.shape)}; expected a conv weight "
            "[Cout, Cin, kh, kw] or a linear weight [out, in]"
        )


def gemm_view(weight: torch.Tensor) -> torch.Tensor:
    """``[Cout, Cin, kh, kw] → [Cout, kh·kw·Cin]`` with (ky, kx, c) column order.

    Linear weights (2-D) are returned unchanged. Works for masks and weights alike.
    """
    if weight.dim() == 2:
        return weight
    if weight.dim() != 4:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {tuple(weight.shape)}")
    cout = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(cout, -1)


def from_gemm_view(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`gemm_view` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    cout, cin, kh, kw = shape
    return matrix.reshape(cout, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


def column_index(ky: int, kx: int, c: int, *, kw: int, cin: int) -> int:
    """Flat GEMM column of tap (ky, kx) and input channel c."""
    return (ky * kw + kx) * cin + c


def row_groups(view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group the non-empty rows of a bool matrix by identical column pattern.

    Returns ``(row_ids, group_of_row)`` for the non-empty rows. Rows are bit-packed
    first so the comparison costs ``K/8`` bytes per row.
    """
    row_ids = np.flatnonzero(view.any(axis=1))
    if row_ids.size == 0:
        return row_ids, row_ids
    packed = np.packbits(view[row_ids], axis=1)
    _, group_of_row = np.unique(packed, axis=0, return_inverse=True)
    return row_ids, group_of_row.reshape(-1)


@dataclass(frozen=True)
class MaskStats:
    """What a mask looks like, in the terms a structured-sparsity user cares about."""

    shape: tuple[int, ...]
    numel: int
    nnz: int
    density: float
    empty_out: int  # output channels (GEMM rows) with no nonzero
    empty_in: int  # input channels (every tap) with no nonzero; per group for grouped convs
    structure: str  # one of STRUCTURES
    blocks: int  # distinct non-empty row patterns (dense blocks with disjoint rows)
    mean_block_rows: float  # non-empty rows / blocks (0 when empty)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def mask_stats(mask: torch.Tensor, *, min_block_rows: float = DEFAULT_MIN_BLOCK_ROWS) -> MaskStats:
    """Statistics and structure class of one conv or linear mask (bool tensor)."""
    shape = tuple(mask.shape)
    m = mask.detach().to("cpu", torch.bool)
    numel = m.numel()
    nnz = int(torch.count_nonzero(m))
    in_any = m.any(dim=(0, 2, 3)) if m.dim() == 4 else m.any(dim=0)
    view = gemm_view(m).numpy()
    row_any = view.any(axis=1)
    empty_out = int((~row_any).sum())
    empty_in = int((~in_any).sum())
    row_ids, group_of_row = row_groups(view)
    blocks = int(group_of_row.max()) + 1 if row_ids.size else 0
    mean_rows = row_ids.size / blocks if blocks else 0.0

    if nnz == 0:
        structure = "empty"
    elif nnz == numel:
        structure = "dense"
    elif blocks == 1 and _is_channel_product(m, row_any, in_any):
        structure = "channel"
    elif mean_rows >= min_block_rows:
        structure = "group"
    else:
        structure = "unstructured"
    return MaskStats(
        shape=shape,
        numel=numel,
        nnz=nnz,
        density=nnz / numel if numel else 0.0,
        empty_out=empty_out,
        empty_in=empty_in,
        structure=structure,
        blocks=blocks,
        mean_block_rows=float(mean_rows),
    )


def _is_channel_product(m: torch.Tensor, row_any: np.ndarray, in_any: torch.Tensor) -> bool:
    """True when the mask equals keep_out ⊗ keep_in (over every kernel tap)."""
    keep_out = torch.from_numpy(row_any)
    if m.dim() == 4:
        product = keep_out[:, None, None, None] & in_any[None, :, None, None]
        product = product.expand_as(m)
    else:
        product = keep_out[:, None] & in_any[None, :]
    return bool(torch.equal(product, m))


def is_binary(t: torch.Tensor) -> bool:
    """True when every element of ``t`` is exactly 0 or 1 (any dtype)."""
    if t.dtype == torch.bool:
        return True
    return bool(((t == 0) | (t == 1)).all())
