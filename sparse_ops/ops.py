"""Run a packed conv layer: Triton kernels on CUDA tensors, plain torch on CPU tensors.

``channel_conv(x, plan)`` and ``group_conv(x, pack)`` compute exactly
:func:`sparse_ops.reference.conv2d` with the plan's or pack's masked dense weight
(bias, optional residual, optional ReLU), on every output channel.

``backend``:
    ``"auto"``    Triton for CUDA tensors, torch for CPU tensors;
    ``"triton"``  the Triton kernel (CPU tensors need ``TRITON_INTERPRET=1``);
    ``"torch"``   the torch path: a smaller dense conv for a ChannelPlan; for a
                  GroupPack, one dense GEMM per distinct column set on the unfolded
                  input (one dense conv when there are very many sets).
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import torch.nn.functional as F
from sparse_ops_kernels import launch

from .errors import SparseOpsError
from .formats import FORMAT_VERSION, GROUP_FORMAT_VERSION, ChannelPlan, GroupPack

BACKENDS = ("auto", "triton", "torch")
_MANY_SETS = 512  # beyond this many distinct column sets the CPU path runs one dense conv
_GEMM_PENALTY = 2  # column gather + GEMM vs a dense conv, per useful multiply-add
# The CPU channel path fuses the epilogue into oneDNN's conv where it can (tests turn it
# off to check both paths compute the same).
_FUSE_ON_CPU = True
_PAD_BUFFER_BYTES = 256 << 20  # padded input buffers kept per thread (see _padded_nhwc)
_forced: list[str] = []


@contextlib.contextmanager
def backend(name: str):
    """Run every ``backend="auto"`` call inside the block on ``name``.

    E.g. ``with ops.backend("triton"): converted(x)`` drives a whole converted model
    through the Triton kernels (on CPU tensors: under ``TRITON_INTERPRET=1``).
    """
    if name not in BACKENDS:
        raise SparseOpsError(f"backend must be one of {BACKENDS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def _backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise SparseOpsError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _forced and _forced[-1] != "auto":
        return _forced[-1]
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def _epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    relu: bool,
    bias_map: torch.Tensor | None = None,
) -> torch.Tensor:
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if bias_map is not None:
        y = y + bias_map.to(y.dtype)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return torch.relu(y) if relu else y


def channel_conv(
    x: torch.Tensor,
    plan: ChannelPlan,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    backend: str = "auto",
    allow_tf32: bool | None = None,
    bias_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """``bias_map`` ([Cout, OH, OW], optional) is added per position before the residual."""
    if _backend(x, backend) == "triton":
        from sparse_ops_kernels.channel_conv import channel_conv2d

        return channel_conv2d(
            x, plan, residual=residual, relu=relu, allow_tf32=allow_tf32, bias_map=bias_map
        )
    # The launcher's checks, so both backends refuse the same inputs with the same words.
    call = launch.check_channel_call(x, plan, residual, bias_map, "channel_conv",
                                     FORMAT_VERSION, None)  # fmt: skip
    # Channels-last on the CPU too: the plan's [Cout', kh, kw, Cin'] weight permuted to
    # [Cout', Cin', kh, kw] is a channels-last tensor, which oneDNN then uses without a
    # per-call reorder.
    x = x.contiguous(memory_format=torch.channels_last)
    inputs = x if plan.in_idx is None else select_channels(x, plan.in_idx.long())
    weight = plan.weight.permute(0, 3, 1, 2).to(x.dtype)
    if weight.numel() == 0:  # every weight pruned: oneDNN refuses empty convs
        compact = x.new_zeros(call.n, weight.shape[0], call.oh, call.ow)
        compact = compact.contiguous(memory_format=torch.channels_last)
    elif plan.out_idx is None:  # every output channel computed: bias fused into the conv
        bias = None if plan.bias is None else plan.bias.to(x.dtype)
        if bias_map is None and _onednn_fusion(inputs, weight, residual):
            return _fused_conv(inputs, weight, bias, plan, residual, relu)
        y = F.conv2d(inputs, weight, bias, plan.stride, plan.padding, plan.dilation)
        return _epilogue_inplace(y, None, residual, relu, bias_map)
    else:
        compact = F.conv2d(inputs, weight, None, plan.stride, plan.padding, plan.dilation)
    if plan.out_idx is None:  # no weight, every output channel kept: the epilogue alone
        y = compact.clone()
        if plan.bias is not None:
            y.add_(plan.bias.to(x.dtype).view(1, -1, 1, 1))
        return _epilogue_inplace(y, None, residual, relu, bias_map)
    n, _, oh, ow = compact.shape
    # Start from what every channel gets (bias, residual), then add the computed rows.
    if residual is not None:
        y = residual.to(x.dtype).contiguous(memory_format=torch.channels_last).clone()
        if plan.bias is not None:
            y.add_(plan.bias.to(x.dtype).view(1, -1, 1, 1))
    elif plan.bias is not None:
        # A fresh tensor, never a view of the bias: y is updated in place below (an
        # expanded [1, C, 1, 1] view already counts as channels-last contiguous).
        y = torch.empty(n, plan.out_channels, oh, ow, dtype=compact.dtype,
                        device=compact.device, memory_format=torch.channels_last)  # fmt: skip
        y.copy_(plan.bias.to(x.dtype).view(1, -1, 1, 1).expand_as(y))
    else:
        y = compact.new_zeros(n, plan.out_channels, oh, ow).contiguous(
            memory_format=torch.channels_last
        )
    scatter_channels_(y, plan.out_idx.long(), compact, add=True)
    return _epilogue_inplace(y, None, None, relu, bias_map)


@functools.cache
def _has_onednn_pointwise() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise")


def _onednn_fusion(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether oneDNN's fused conv (the op torch.compile's CPU backend emits) can run this
    layer: CPU fp32 tensors, channels-last input and residual of the output's shape."""
    if not (_FUSE_ON_CPU and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and _has_onednn_pointwise()):  # fmt: skip
        return False
    if not x.is_contiguous(memory_format=torch.channels_last) or x.numel() == 0:
        return False
    return residual is None or (
        residual.dtype == torch.float32
        and residual.is_contiguous(memory_format=torch.channels_last)
    )


def _fused_conv(x, weight, bias, plan: ChannelPlan, residual, relu: bool) -> torch.Tensor:
    """conv + bias (+ residual) (+ ReLU) in one oneDNN primitive: the epilogue is applied
    to each output tile while it is in cache, not in passes of its own over the output."""
    geometry = (list(plan.padding), list(plan.stride), list(plan.dilation), 1)
    if residual is None:
        unary = "relu" if relu else "none"
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, unary, [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, *geometry, "add", None, "relu" if relu else None, [], ""
    )


def _epilogue_inplace(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    relu: bool,
    bias_map: torch.Tensor | None,
) -> torch.Tensor:
    """The epilogue on a freshly made ``y`` (not aliased: safe to update in place)."""
    if bias is not None:
        y.add_(bias.to(y.dtype).view(1, -1, 1, 1))
    if bias_map is not None:
        y.add_(bias_map.to(y.dtype))
    if residual is not None:
        y.add_(residual.to(y.dtype))
    return y.relu_() if relu else y


def group_conv(
    x: torch.Tensor,
    pack: GroupPack,
    *,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    backend: str = "auto",
    allow_tf32: bool | None = None,
) -> torch.Tensor:
    if _backend(x, backend) == "triton":
        from sparse_ops_kernels.group_conv import group_conv2d

        return group_conv2d(x, pack, residual=residual, relu=relu, allow_tf32=allow_tf32)
    call = launch.check_group_call(x, pack, residual, "group_conv", GROUP_FORMAT_VERSION, None)
    n, cin = x.shape[:2]
    column_sets = _torch_column_sets(pack, x.device, x.dtype)
    if column_sets is None:  # very many distinct column sets: one conv on the dense weight
        kh, kw = pack.kernel_size
        rows, cols, values = pack.entries()
        weight = torch.zeros(pack.out_channels, kh * kw * cin, dtype=x.dtype, device=x.device)
        weight[rows.to(x.device), cols.to(x.device)] = values.to(x.device, x.dtype)
        weight = weight.view(pack.out_channels, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
        y = F.conv2d(x, weight, None, pack.stride, pack.padding, pack.dilation)
        return _epilogue(y, pack.bias, residual, relu)
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
    return _epilogue_inplace(y, bias, residual, relu, None)


def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` that stays channels-last for a channels-last 4-D ``x``.

    ``index_select`` on dim 1 returns NCHW, which would make the next conv transpose it
    back (or a kernel read it with a strided channel axis)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = x.shape
        picked = _pixel_rows(x).index_select(1, index)
        return picked.view(n, h, w, index.numel()).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def scatter_channels_(y: torch.Tensor, index: torch.Tensor, src: torch.Tensor, add: bool):
    """``y[:, index] (+)= src`` in place, for a channels-last ``y``."""
    rows = _pixel_rows(y)
    values = _pixel_rows(src.contiguous(memory_format=torch.channels_last)).to(y.dtype)
    if add:
        rows.index_add_(1, index, values)
    else:
        rows.index_copy_(1, index, values)
    return y


def _pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """The ``[N·H·W, C]`` view of a channels-last ``x`` (writes land in ``x``).

    Channel gathers and scatters run on this 2-D view: on the CPU several times faster
    than the same ``index_*`` op on dim 1 (or dim 3 of the NHWC permute) of the 4-D tensor
    (measured 0.4 vs 3.7 ms gather and 0.5 vs 3.0 ms scatter-add at 64×32..64×16×16)."""
    n, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"_pixel_rows needs a channels-last tensor, got strides {x.stride()}")
    return x.permute(0, 2, 3, 1).view(n * h * w, c)


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
            return _epilogue_inplace(y, None, residual, relu, None)
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
            rows = _pixel_rows(
                residual.to(flat.dtype).contiguous(memory_format=torch.channels_last)
            )
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
    return [_ColumnSet(rows, cols, torch.cat(tiles).float(), pack, device, dtype)
            for rows, cols, tiles in sets]  # fmt: skip


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
