"""Packed formats of structured convolution weights: the contract between the packer
(``sparse_ops.packing``) and the kernels. Fields, the checks every kernel relies on, the
saved state and the version all live here, so a launcher accepts exactly these types.

Both formats describe one conv layer ``W[Cout, Cin, kh, kw]`` (under a mask) of the
full input and output channel spaces. Channels a format does not compute still get the
epilogue (bias, residual, ReLU), so a layer run from a format equals the masked dense
conv in every output channel (:mod:`sparse_ops.reference`).

**ChannelPlan** — a channel-structured mask ``M = keep_out ⊗ keep_in``:

=============  ===================================================================
``weight``     ``[Cout', kh, kw, Cin']`` compacted weight (kept rows, kept inputs)
``in_idx``     ``[Cin']`` int32 sorted input channels read, or ``None`` = all
``out_idx``    ``[Cout']`` int32 sorted output channels written, or ``None`` = all
``fill_idx``   ``[Cout − Cout']`` int32 output channels with no kept weight
``bias``       ``[Cout]`` float32, or ``None``
=============  ===================================================================

**GroupPack** — a union of dense blocks with disjoint rows on the GEMM view ``Cout × K``
(``K = kh·kw·Cin``, columns in (ky, kx, c) order). Group ``g`` has output rows
``rows[g]`` and columns ``cols[g]``:

=============  ===================================================================
``row_idx``    int32, each group's rows padded with −1 to a multiple of ``block_n``
``row_ptr``    int32 ``[G+1]``: group ``g``'s rows are ``row_idx[row_ptr[g]:row_ptr[g+1]]``
``col_idx``    int32, each group's columns padded with −1 to a multiple of ``k_pad``
``col_code``   int32 per ``col_idx`` entry, the column decoded on the host for the
               kernel: ``c | kx << 16 | ky << 24``; a padding column at position
               ``i`` names channel ``i mod min(8, Cin)`` of a tap no pixel has
``col_ptr``    int32 ``[G+1]``
``values``     flat; group ``g``'s dense tile ``[rows_pad_g, cols_pad_g]`` (row-major)
               starts at ``val_ptr[g]``; padded entries are zero weights
``val_ptr``    int64 ``[G+1]``
``tile_group`` int32 ``[T]``: group of each schedule tile, −1 for an epilogue-only tile
``tile_row``   int32 ``[T]``: first entry of the tile in ``row_idx`` (or ``fill_idx``)
``fill_idx``   int32 output rows in no group (bias, residual and ReLU only)
``bias``       ``[Cout]`` float32, or ``None``
=============  ===================================================================

One launch covers every group: tiles are ``(group, block_n rows)``, the groups with
the most columns first (longest K loops start first), then the epilogue-only tiles.

``col_run`` is 8 when every group's columns are runs of 8 consecutive channels of one
tap starting at multiples of 8 (the kernel then reads them as 16-byte vectors), else 1.

Both formats carry ``format_version``, because converted modules are saved and loaded:
``ChannelPlan.VERSION`` is 1, ``GroupPack.VERSION`` 2 (``col_code`` and ``col_run``
added). A version-1 GroupPack is migrated when built: its codes follow from ``col_idx``,
its runs from the codes. Any other version is refused when an instance is built, so a
plan or pack that exists is one the kernels read.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import KernelInputError

COL_RUN = 8  # channels per run in a col_run pack: one 16-byte vector of fp16/bf16
CODE_CHANNELS = 1 << 16  # col_code = c | kx << 16 | ky << 24
CODE_TAPS = 1 << 7


class FormatError(KernelInputError):
    """A packed format whose fields contradict each other, a version these kernels do not
    read, or a weight / mask / layout that cannot be packed as asked."""


class _Packed:
    """Shared behaviour: device/dtype moves and a flat state for saving."""

    VERSION: ClassVar[int]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device`` with weights in ``dtype`` (indices stay int, bias fp32)."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if f.name in ("weight", "values") and dtype is not None:
                    value = value.to(device=device, dtype=dtype)
                else:
                    value = value.to(device=device) if device is not None else value
            changes[f.name] = value
        return type(self)(**changes)

    @property
    def device(self) -> torch.device:
        return self._weights().device

    @property
    def dtype(self) -> torch.dtype:
        return self._weights().dtype

    def _weights(self) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``(tensors, json_meta)`` for saving; :meth:`from_state` inverts it."""
        tensors, meta = {}, {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value
            elif value is not None:
                meta[f.name] = list(value) if isinstance(value, tuple) else value
        meta["format"] = type(self).__name__
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
        version = int(meta.get("format_version", -1))
        if version > cls.VERSION or version < 1:
            raise FormatError(
                f"{cls.__name__} format_version {version} is not readable by these kernels "
                f"(they read 1..{cls.VERSION}); upgrade sparse-ops"
            )
        if meta.get("format") != cls.__name__:
            raise FormatError(f"state is a {meta.get('format')}, not a {cls.__name__}")
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in tensors:
                kwargs[f.name] = tensors[f.name]
            elif f.name in meta:
                v = meta[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
            else:
                kwargs[f.name] = None
        return cls(**kwargs)


def _check_version(packed: _Packed) -> None:
    """Only the current version is ever built (older ones are migrated first), so the
    launchers' one check, ``isinstance``, also settles the version."""
    if packed.format_version != packed.VERSION:
        raise FormatError(
            f"{type(packed).__name__} format_version {packed.format_version}: these kernels "
            f"read version {packed.VERSION}"
        )


def check_code_range(in_channels: int, kernel_size: tuple[int, int], what: str) -> None:
    """A column code holds the channel in 16 bits and each tap coordinate in 7."""
    if in_channels >= CODE_CHANNELS or max(kernel_size) >= CODE_TAPS:
        raise FormatError(
            f"{what}: {in_channels} input channels or a {kernel_size[0]}×{kernel_size[1]} "
            f"kernel exceed what a column code holds ({CODE_CHANNELS - 1} channels, "
            f"{CODE_TAPS - 1} taps per axis)"
        )


def _check_range(t: torch.Tensor | None, low: int, high: int, what: str) -> None:
    """Every value of ``t`` in [low, high) (None and empty pass)."""
    if t is None or t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise FormatError(f"{what}: values must lie in [{low}, {high}), found {lo}..{hi}")


# ---------------------------------------------------------------------- ChannelPlan


@dataclass
class ChannelPlan(_Packed):
    weight: torch.Tensor  # [Cout', kh, kw, Cin']
    bias: torch.Tensor | None  # [Cout] float32
    in_idx: torch.Tensor | None  # [Cin'] int32
    out_idx: torch.Tensor | None  # [Cout'] int32
    fill_idx: torch.Tensor | None  # [Cout - Cout'] int32
    in_channels: int
    out_channels: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    format_version: int = 1
    validate: InitVar[bool] = True

    VERSION: ClassVar[int] = 1

    def __post_init__(self, validate: bool) -> None:
        _check_version(self)
        if validate:
            self.check_indices()

    def check_indices(self) -> None:
        """Index values in range and each output channel written once: what the kernels
        trust. Checked for CPU tensors only (plans are built and loaded there; reading
        GPU tensors back here would sync the device)."""
        tensors = (self.in_idx, self.out_idx, self.fill_idx)
        if any(t is not None and t.device.type != "cpu" for t in tensors):
            return
        _check_range(self.in_idx, 0, self.in_channels, "ChannelPlan in_idx")
        _check_range(self.out_idx, 0, self.out_channels, "ChannelPlan out_idx")
        _check_range(self.fill_idx, 0, self.out_channels, "ChannelPlan fill_idx")
        written = [t.long() for t in (self.out_idx, self.fill_idx) if t is not None]
        if written and self.out_idx is not None:
            every = torch.cat(written)
            if every.numel() != self.out_channels or every.unique().numel() != every.numel():
                raise FormatError(
                    f"ChannelPlan: out_idx and fill_idx must together name each of the "
                    f"{self.out_channels} output channels once"
                )

    def _weights(self) -> torch.Tensor:
        return self.weight

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (int(self.weight.shape[1]), int(self.weight.shape[2]))

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight ``[Cout, Cin, kh, kw]`` this plan computes with."""
        kh, kw = self.kernel_size
        w = torch.zeros(self.out_channels, self.in_channels, kh, kw, dtype=self.weight.dtype)
        rows = (
            torch.arange(self.out_channels) if self.out_idx is None else self.out_idx.long().cpu()
        )
        cols = torch.arange(self.in_channels) if self.in_idx is None else self.in_idx.long().cpu()
        w[rows[:, None], cols[None, :]] = self.weight.detach().cpu().permute(0, 3, 1, 2)
        return w


# ---------------------------------------------------------------------- GroupPack


@dataclass
class GroupPack(_Packed):
    values: torch.Tensor  # flat, group tiles [rows_pad, cols_pad] row-major
    val_ptr: torch.Tensor  # int64 [G+1]
    row_idx: torch.Tensor  # int32, −1 padded
    row_ptr: torch.Tensor  # int32 [G+1]
    col_idx: torch.Tensor  # int32, −1 padded
    col_code: torch.Tensor | None  # int32 per col_idx entry: c | kx << 16 | ky << 24
    col_ptr: torch.Tensor  # int32 [G+1]
    tile_group: torch.Tensor  # int32 [T], −1 = epilogue-only tile
    tile_row: torch.Tensor  # int32 [T]
    fill_idx: torch.Tensor  # int32
    bias: torch.Tensor | None  # [Cout] float32
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    block_n: int
    k_pad: int
    col_run: int = 1  # COL_RUN: columns come in aligned runs of 8 channels of one tap
    format_version: int = 2
    groups_meta: dict = field(default_factory=dict)  # sizes, for reports and tuning keys
    validate: InitVar[bool] = True

    VERSION: ClassVar[int] = 2
    # The int32 index arrays the kernel reads (val_ptr is int64), and every tensor field
    # in field order: what the launchers check and what a converted unit stores.
    INDEX_FIELDS: ClassVar[tuple[str, ...]] = (
        "row_idx",
        "row_ptr",
        "col_idx",
        "col_code",
        "col_ptr",
        "tile_group",
        "tile_row",
        "fill_idx",
    )
    TENSOR_FIELDS: ClassVar[tuple[str, ...]] = ("values", "val_ptr", *INDEX_FIELDS, "bias")

    def __post_init__(self, validate: bool) -> None:
        if self.col_code is None:  # a version-1 pack: derive what version 2 stores
            self.col_code = column_codes(self.col_idx, self.in_channels, self.kernel_size)
            self.format_version = self.VERSION
        if self.col_run is None:  # not recorded (version 1): runs if the columns are
            on_cpu = self.col_code.device.type == "cpu"
            runs = on_cpu and has_column_runs(self.col_code, self.in_channels)
            self.col_run = COL_RUN if runs else 1
        self.col_run = int(self.col_run)
        _check_version(self)
        if validate:
            self.check_indices()

    def check_indices(self) -> None:
        """Pointers, indices and tile sizes consistent with each other and in range: what
        the kernel trusts. CPU tensors only (see :meth:`ChannelPlan.check_indices`)."""
        index = (
            self.val_ptr,
            self.row_idx,
            self.row_ptr,
            self.col_idx,
            self.col_code,
            self.col_ptr,
            self.tile_group,
            self.tile_row,
            self.fill_idx,
        )
        if any(t.device.type != "cpu" for t in index):
            return
        if self.block_n < 1 or self.k_pad < 1:
            raise FormatError(
                f"GroupPack: block_n={self.block_n} and k_pad={self.k_pad} must be ≥ 1"
            )
        check_code_range(self.in_channels, self.kernel_size, "GroupPack")
        groups = int(self.row_ptr.numel()) - 1
        ptrs = {"row_ptr": self.row_ptr, "col_ptr": self.col_ptr, "val_ptr": self.val_ptr}
        for name, ptr in ptrs.items():
            # Starting at 0 (with every step a whole block) keeps each group's offsets the
            # multiples of k_pad the kernel tells the compiler they are.
            if (
                int(ptr.numel()) != groups + 1
                or int(ptr[0]) != 0
                or bool((ptr[1:] < ptr[:-1]).any())
            ):
                raise FormatError(
                    f"GroupPack {name}: must be {groups + 1} non-decreasing offsets from 0"
                )
        rows = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        cols = (self.col_ptr[1:] - self.col_ptr[:-1]).long()
        tiles = self.val_ptr[1:] - self.val_ptr[:-1]
        if groups and (
            not torch.equal(tiles, rows * cols) or int(self.val_ptr[-1]) > self.values.numel()
        ):
            raise FormatError(
                f"GroupPack values: {self.values.numel()} values do not hold the "
                "rows × columns tiles val_ptr points to"
            )
        if int(self.row_ptr[-1]) > self.row_idx.numel() or (
            int(self.col_ptr[-1]) > self.col_idx.numel()
        ):
            raise FormatError("GroupPack: row_ptr/col_ptr point past row_idx/col_idx")
        if groups and (
            bool((rows % self.block_n != 0).any()) or bool((cols % self.k_pad != 0).any())
        ):
            # The kernel walks every group in whole BLOCK_N × K_PAD blocks.
            raise FormatError(
                f"GroupPack: every group's rows and columns must be padded to multiples of "
                f"block_n={self.block_n} and k_pad={self.k_pad}"
            )
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        _check_range(self.row_idx, -1, self.out_channels, "GroupPack row_idx")
        _check_range(self.col_idx, -1, k, "GroupPack col_idx")
        self._check_codes()
        _check_range(self.fill_idx, 0, self.out_channels, "GroupPack fill_idx")
        named = torch.cat([self.row_idx[self.row_idx >= 0].long(), self.fill_idx.long()])
        if not torch.equal(
            torch.bincount(named, minlength=self.out_channels),
            torch.ones(self.out_channels, dtype=torch.long),
        ):
            # An output channel in no row and no fill tile would never be written.
            raise FormatError(
                f"GroupPack: row_idx and fill_idx must name each of the {self.out_channels} "
                "output channels exactly once"
            )
        _check_range(self.tile_group, -1, max(groups, 0), "GroupPack tile_group")
        if self.tile_row.numel() != self.tile_group.numel():
            raise FormatError("GroupPack: tile_group and tile_row differ in length")
        self._check_schedule(rows)

    def _check_schedule(self, rows: torch.Tensor) -> None:
        """The tiles are exactly each group's row blocks and the fill blocks, once each:
        a missing tile leaves output channels unwritten, a stray one reads past the
        index arrays (the kernel masks padding, not a tile that starts elsewhere)."""
        blocks = (rows // self.block_n).numpy()
        group_of = np.repeat(np.arange(blocks.size), blocks)
        first = self.row_ptr[:-1].long().numpy()[group_of] + ranks(blocks) * self.block_n
        fill = np.arange(0, int(self.fill_idx.numel()), self.block_n)
        expected = np.concatenate([group_of, np.full(fill.size, -1)]), np.concatenate([first, fill])
        actual = self.tile_group.long().numpy(), self.tile_row.long().numpy()
        if actual[0].size != expected[0].size or not all(
            np.array_equal(a, e)
            for a, e in zip(_sorted_pairs(*actual), _sorted_pairs(*expected), strict=True)
        ):
            raise FormatError(
                f"GroupPack tile_group/tile_row: the schedule must hold each group's "
                f"{self.block_n}-row blocks and the fill blocks exactly once"
            )

    def _check_codes(self) -> None:
        """``col_code`` is what ``col_idx`` decodes to, and a ``col_run`` pack's columns
        really are runs: the kernel addresses memory by the codes and, with runs, reads
        16-byte vectors on that promise."""
        expected = column_codes(self.col_idx, self.in_channels, self.kernel_size)
        code = self.col_code
        if code.dtype != torch.int32 or not torch.equal(code, expected):
            raise FormatError(
                "GroupPack col_code: must be the int32 decoding of col_idx "
                "(c | kx << 16 | ky << 24; see column_codes for padding columns)"
            )
        if self.col_run not in (1, COL_RUN):
            raise FormatError(f"GroupPack col_run must be 1 or {COL_RUN}, got {self.col_run}")
        if self.col_run == COL_RUN and not has_column_runs(code, self.in_channels):
            raise FormatError(
                f"GroupPack col_run={COL_RUN}: columns are not runs of {COL_RUN} consecutive "
                f"channels of one tap starting at multiples of {COL_RUN}"
            )

    def _weights(self) -> torch.Tensor:
        return self.values

    @property
    def num_groups(self) -> int:
        return int(self.row_ptr.numel()) - 1

    @property
    def num_tiles(self) -> int:
        return int(self.tile_group.numel())

    @property
    def max_cols(self) -> int:
        """Widest group (padded columns). Read from ``groups_meta`` when recorded there,
        because computing it reads ``col_ptr`` back from the device: a sync per launch,
        which CUDA-graph capture forbids."""
        if "max_cols" in self.groups_meta:
            return int(self.groups_meta["max_cols"])
        ptr = self.col_ptr.cpu()
        return int((ptr[1:] - ptr[:-1]).max()) if self.num_groups else 0

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, gemm_columns, values)`` of every stored (non-padding) weight."""
        val_ptr = self.val_ptr.cpu()
        row_ptr, col_ptr = self.row_ptr.cpu().long(), self.col_ptr.cpu().long()
        sizes = val_ptr[1:] - val_ptr[:-1]
        group_of = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
        local = torch.arange(int(val_ptr[-1])) - val_ptr[:-1][group_of]
        width = (col_ptr[1:] - col_ptr[:-1])[group_of]
        i, j = local // width.clamp(min=1), local % width.clamp(min=1)
        rows = self.row_idx.cpu().long()[row_ptr[:-1][group_of] + i]
        cols = self.col_idx.cpu().long()[col_ptr[:-1][group_of] + j]
        keep = (rows >= 0) & (cols >= 0)
        return rows[keep], cols[keep], self.values.detach().cpu()[keep]

    def dense_weight(self) -> torch.Tensor:
        """The dense weight ``[Cout, Cin, kh, kw]`` this pack computes with."""
        kh, kw = self.kernel_size
        view = torch.zeros(self.out_channels, kh * kw * self.in_channels, dtype=self.values.dtype)
        rows, cols, values = self.entries()
        view[rows, cols] = values
        return (
            view.view(self.out_channels, kh, kw, self.in_channels).permute(0, 3, 1, 2).contiguous()
        )


def column_codes(
    col_idx: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]
) -> torch.Tensor:
    """The kernel's decoded columns: ``c | kx << 16 | ky << 24`` for each GEMM column
    ``j = (ky·kw + kx)·Cin + c`` of ``col_idx``. A padding column (−1) at position ``i``
    gets channel ``i mod min(8, Cin)`` of a tap no pixel has (``kx = 15`` for kernels
    narrower than 16; the tap bit test then masks it, so an Inf in the input never meets
    its zero weight), and in a col_run pack it is a run like the others."""
    kernel_h, kernel_w = kernel_size
    j = col_idx.long()
    tap, c = j // in_channels, j % in_channels
    code = c | (tap % kernel_w) << 16 | (tap // kernel_w) << 24
    position = torch.arange(j.numel(), device=j.device)
    if kernel_w < 16:
        nowhere = 15 << 16
    elif kernel_h < 16:
        nowhere = 15 << 24
    else:  # a 16×16 kernel has every tap: tap (0, 0), masked by its zero weight only
        nowhere = 0
    code = torch.where(j >= 0, code, position % min(COL_RUN, in_channels) | nowhere)
    return code.to(torch.int32)


def has_column_runs(col_code: torch.Tensor, in_channels: int) -> bool:
    """Whether ``col_code`` is a sequence of runs of 8 consecutive channels of one tap,
    each starting at a channel that is a multiple of 8."""
    if in_channels % COL_RUN or col_code.numel() % COL_RUN:
        return False
    runs = col_code.long().view(-1, COL_RUN)
    step = torch.arange(COL_RUN, device=runs.device)
    return bool(((runs - runs[:, :1] == step).all() & (runs[:, 0] % COL_RUN == 0).all()).item())


def _sorted_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((b, a))
    return a[order], b[order]


def ranks(counts: np.ndarray) -> np.ndarray:
    """``[0..c0), [0..c1), ...`` concatenated."""
    counts = np.asarray(counts, dtype=np.int64)
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
