"""``group_conv``: a GroupPack's conv, on the Triton kernel or on torch (per column set:
a gather + GEMM or a dense conv over the set's channels, whichever multiplies less)."""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from sparse_ops_kernels import launch
from sparse_ops_kernels.formats import GroupPack

from .common import (
    epilogue,
    epilogue_inplace,
    pixel_rows,
    resolve_backend,
    scatter_channels_,
    select_channels,
)

_MANY_SETS = 512  # beyond this many distinct column sets the CPU path runs one dense conv


_GEMM_PENALTY = 2  # column gather + GEMM vs a dense conv, per useful multiply-add


_PAD_BUFFER_BYTES = 256 << 20  # padded input buffers kept per thread (see _padded_nhwc)


def group_conv(
    x: torch.Tensor,
    pack: GroupPack,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    if resolve_backend(x, backend) == "triton":
        from sparse_ops_kernels import group_conv as kernel

        return kernel.group_conv(x, pack, residual=residual, relu=relu, allow_tf32=allow_tf32)
    call = launch.check_group_call(x, pack, residual, "group_conv", None)
    n, cin = x.shape[:2]
    column_sets = _torch_column_sets(pack, x.device, x.dtype)
    if column_sets is None:  # very many distinct column sets: one conv on the dense weight
        kh, kw = pack.kernel_size
        rows, cols, values = pack.entries()
        weight = torch.zeros(pack.out_channels, kh * kw * cin, dtype=x.dtype, device=x.device)
        weight[rows.to(x.device), cols.to(x.device)] = values.to(x.device, x.dtype)
        weight = weight.view(pack.out_channels, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
        y = F.conv2d(x, weight, None, pack.stride, pack.padding, pack.dilation)
        return epilogue(y, pack.bias, residual, relu)
    oh, ow = call.oh, call.ow
    x_cl = x.contiguous(memory_format=torch.channels_last)  # once, not per column set
    bias = None if pack.bias is None else pack.bias.to(x.dtype)
    if len(column_sets) == 1 and column_sets[0].every_row:
        # One column set over every row, in order (a regrouped block cut into b1-row
        # groups): the GEMM's [N·OH·OW, Cout] result is already the channels-last
        # output, and the epilogue rides on it (see _ColumnSet.run).
        return column_sets[0].run(x_cl, pack, (oh, ow), bias, residual, relu)
    y = x.new_zeros(n, pack.out_channels, oh, ow).contiguous(memory_format=torch.channels_last)
    for column_set in column_sets:
        part = column_set.run(x_cl, pack, (oh, ow), None)
        scatter_channels_(y, column_set.rows, part, add=False)
    return epilogue_inplace(y, bias, residual, relu, None)


class _ColumnSet:
    """Rows of a GroupPack sharing one column set, prepared once for the torch path.

    Two ways to run it, whichever multiplies less: gathering exactly the set's columns
    (one ``torch.gather`` from an overlapping strided view of the zero-padded NHWC input:
    the implicit-GEMM operand without an im2col of every column) and one GEMM; or a dense
    conv over the set's input channels, zeros at unused taps (oneDNN/cuDNN speed, but it
    multiplies the zeros too)."""

    def __init__(self, rows, cols, block, pack: GroupPack, device, dtype):
        kh, kw = pack.kernel_size
        cin = pack.in_channels
        self.rows = rows.to(device)
        self.every_row = torch.equal(rows, torch.arange(pack.out_channels))
        channels = torch.unique(cols % cin)
        self.gather = _GEMM_PENALTY * cols.numel() < channels.numel() * kh * kw
        if self.gather:
            order = torch.argsort(cols)
            self.cols = cols[order]
            self.weight_t = block[:, order].t().contiguous().to(device, dtype)  # [cols, rows]
            self._offsets: dict[int, tuple[torch.Tensor, int]] = {}
        else:
            position = torch.full((cin,), -1, dtype=torch.long)
            position[channels] = torch.arange(channels.numel())
            weight = block.new_zeros(rows.numel(), kh * kw, channels.numel())
            weight[:, cols // cin, position[cols % cin]] = block
            weight = weight.view(rows.numel(), kh, kw, -1).permute(0, 3, 1, 2)
            self.weight = weight.contiguous().to(device, dtype)
            self.channels = channels.to(device)

    def run(self, x_cl, pack: GroupPack, out_hw, bias, residual=None, relu=False) -> torch.Tensor:
        """This set's output rows, ``[N, rows, OH, OW]`` channels-last: ``relu?(rows + bias
        + residual)`` (``residual``: ``[N, rows, OH, OW]``)."""
        if not self.gather:
            inputs = select_channels(x_cl, self.channels)
            y = F.conv2d(inputs, self.weight, bias, pack.stride, pack.padding, pack.dilation)
            return epilogue_inplace(y, None, residual, relu, None)
        n, c = x_cl.shape[:2]
        (oh, ow), (ph, pw) = out_hw, pack.padding
        nhwc = _padded_nhwc(x_cl, ph, pw)
        hp, wp = nhwc.shape[1:3]
        offsets, span = self._offsets_for(wp, c, pack)
        (sh, sw) = pack.stride
        # Row (n, oy, ox) of this view starts at the input pixel under the window's corner;
        # a column's offset from there reaches its (ky, kx, c) element. The rows overlap
        # (read-only), and the last one ends inside the tensor (see _offsets_for).
        windows = nhwc.as_strided((n, oh, ow, span), (hp * wp * c, sh * wp * c, sw * c, 1))
        columns = torch.gather(windows, 3, offsets.expand(n, oh, ow, -1))
        flat = columns.view(n * oh * ow, -1)
        weight_t = self.weight_t.to(flat.dtype)
        # Two passes over the output at most: the GEMM accumulates onto the residual (its
        # copy is addmm's), then bias and ReLU in one fused op.
        if residual is None:
            out = flat @ weight_t
        else:
            rows = pixel_rows(residual.to(flat.dtype).contiguous(memory_format=torch.channels_last))
            out = torch.addmm(rows, flat, weight_t)
        if bias is not None and relu:
            torch.ops.aten._add_relu_(out, bias)
        elif bias is not None:
            out.add_(bias)
        elif relu:
            out.relu_()
        return out.view(n, oh, ow, -1).permute(0, 3, 1, 2)

    def _offsets_for(self, wp: int, c: int, pack: GroupPack) -> tuple[torch.Tensor, int]:
        """Element offsets of the columns from a window's corner in an NHWC input of
        padded width ``wp``, and the span the view needs (``max offset + 1`` ≤ what is
        left of the tensor after the last window's corner, since the last window fits)."""
        cached = self._offsets.get(wp)
        if cached is None:
            cached = self._offsets[wp] = self._compute_offsets(wp, c, pack)
        return cached

    @torch.inference_mode(False)  # kept for later calls, which may track gradients
    def _compute_offsets(self, wp: int, c: int, pack: GroupPack) -> tuple[torch.Tensor, int]:
        kw = pack.kernel_size[1]
        dh, dw = pack.dilation
        taps = self.cols // c
        ky, kx = taps // kw, taps % kw
        offsets = ((ky * dh * wp + kx * dw) * c + self.cols % c).to(self.weight_t.device)
        return offsets.view(1, 1, 1, -1), int(offsets.max()) + 1


_PAD_BUFFERS = threading.local()


def _padded_nhwc(x_cl: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """``x`` zero-padded, NHWC-contiguous. Inference calls reuse one buffer per shape,
    dtype and device per thread, whose zero border stays: each call copies the interior
    only (F.pad also zero-fills the whole tensor, a pass as long as the copy). The buffer
    is only read before the call returns; calls that track gradients get a fresh tensor."""
    if not (ph or pw):
        return x_cl.permute(0, 2, 3, 1).contiguous()
    if torch.is_grad_enabled() and x_cl.requires_grad:
        return F.pad(x_cl, (pw, pw, ph, ph)).permute(0, 2, 3, 1).contiguous()
    n, c, h, w = x_cl.shape
    shape = (n, h + 2 * ph, w + 2 * pw, c)
    buffers = _PAD_BUFFERS.__dict__.setdefault("by_key", {})
    key = (shape, x_cl.dtype, x_cl.device)
    buffer = buffers.get(key)
    if buffer is None:
        held = sum(b.numel() * b.element_size() for b in buffers.values())
        if held + math.prod(shape) * x_cl.element_size() > _PAD_BUFFER_BYTES:
            buffers.clear()  # many or large shapes (a sweep, a big network): memory bounded
        with torch.inference_mode(False):  # usable inside and outside inference mode
            buffer = buffers[key] = x_cl.new_zeros(shape)
    buffer[:, ph : ph + h, pw : pw + w].copy_(x_cl.permute(0, 2, 3, 1))
    return buffer


def _torch_column_sets(pack: GroupPack, device, dtype) -> list[_ColumnSet] | None:
    """The pack's column sets prepared for the torch path, kept on the pack (a converted
    unit keeps its pack between calls, and rebuilds it when a buffer is replaced or its
    bias updated) per device and dtype: a pack's tensors must not change once it ran."""
    memo = pack.__dict__.setdefault("_torch_sets", {})
    key = (str(device), dtype)
    if key not in memo:
        with torch.inference_mode(False):  # prepared once, used in and outside inference
            memo[key] = _prepare_column_sets(pack, device, dtype)
    return memo[key]


def _prepare_column_sets(pack: GroupPack, device, dtype) -> list[_ColumnSet] | None:
    sets = _column_sets(pack)
    if sets is None:
        return None
    return [
        _ColumnSet(rows, cols, torch.cat(tiles).float(), pack, device, dtype)
        for rows, cols, tiles in sets
    ]


def _column_sets(pack: GroupPack):
    """Groups merged by identical column set (regroup cuts a block into b1-row groups):
    ``[(rows, columns, weight tiles)]``, one dense GEMM each; None if there are more than
    ``_MANY_SETS`` sets."""
    row_idx, col_idx = pack.row_idx.cpu().long(), pack.col_idx.cpu().long()
    row_ptr, col_ptr = pack.row_ptr.cpu().tolist(), pack.col_ptr.cpu().tolist()
    val_ptr = pack.val_ptr.cpu().tolist()
    values = pack.values
    merged: dict[bytes, list] = {}
    for g in range(pack.num_groups):
        cols, rows = col_idx[col_ptr[g] : col_ptr[g + 1]], row_idx[row_ptr[g] : row_ptr[g + 1]]
        keep_c, keep_r = cols >= 0, rows >= 0
        if not bool(keep_c.any()) or not bool(keep_r.any()):
            continue
        tile = values[val_ptr[g] : val_ptr[g + 1]].view(rows.numel(), cols.numel())
        tile = tile[keep_r.to(values.device)][:, keep_c.to(values.device)]
        key = cols[keep_c].numpy().tobytes()
        if key not in merged:
            if len(merged) == _MANY_SETS:
                return None
            merged[key] = [[], cols[keep_c], []]
        merged[key][0].append(rows[keep_r])
        merged[key][2].append(tile)
    return [(torch.cat(rs), cols, tiles) for rs, cols, tiles in merged.values()]
