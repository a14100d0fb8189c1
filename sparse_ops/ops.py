"""Run a packed conv layer: Triton kernels on CUDA tensors, plain torch on CPU tensors.

``channel_conv(x, plan)`` and ``group_conv(x, pack)`` compute exactly
:func:`sparse_ops.reference.conv2d` with the plan's or pack's masked dense weight
(bias, optional residual, optional ReLU), on every output channel.

``backend``:
    ``"auto"``    Triton for CUDA tensors, torch for CPU tensors;
    ``"triton"``  the Triton kernel (CPU tensors need ``TRITON_INTERPRET=1``);
    ``"torch"``   the torch path: a smaller dense conv for a ChannelPlan, one GEMM
                  per group on the unfolded input for a GroupPack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SparseOpsError
from .formats import ChannelPlan, GroupPack

BACKENDS = ("auto", "triton", "torch")


def _backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise SparseOpsError(f"backend must be one of {BACKENDS}, got {backend!r}")
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
        from kernels.channel_conv import channel_conv2d

        return channel_conv2d(
            x, plan, residual=residual, relu=relu, allow_tf32=allow_tf32, bias_map=bias_map
        )
    inputs = x if plan.in_idx is None else x.index_select(1, plan.in_idx.long())
    weight = plan.weight.permute(0, 3, 1, 2).to(x.dtype)
    compact = F.conv2d(inputs, weight, None, plan.stride, plan.padding, plan.dilation)
    if plan.out_idx is None:
        y = compact
    else:
        n, _, oh, ow = compact.shape
        y = compact.new_zeros(n, plan.out_channels, oh, ow)
        y[:, plan.out_idx.long()] = compact
    return _epilogue(y, plan.bias, residual, relu, bias_map)


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
        from kernels.group_conv import group_conv2d

        return group_conv2d(x, pack, residual=residual, relu=relu, allow_tf32=allow_tf32)
    n, cin, h, w = x.shape
    kh, kw = pack.kernel_size
    # unfold orders columns (c, ky, kx); the pack uses (ky, kx, c).
    columns = F.unfold(
        x, (kh, kw), dilation=pack.dilation, padding=pack.padding, stride=pack.stride
    )
    oh = (h + 2 * pack.padding[0] - pack.dilation[0] * (kh - 1) - 1) // pack.stride[0] + 1
    ow = (w + 2 * pack.padding[1] - pack.dilation[1] * (kw - 1) - 1) // pack.stride[1] + 1
    y = x.new_zeros(n, pack.out_channels, oh * ow)
    row_idx, col_idx = pack.row_idx.long(), pack.col_idx.long()
    for g in range(pack.num_groups):
        r0, r1 = int(pack.row_ptr[g]), int(pack.row_ptr[g + 1])
        c0, c1 = int(pack.col_ptr[g]), int(pack.col_ptr[g + 1])
        rows, cols = row_idx[r0:r1], col_idx[c0:c1]
        keep_r, keep_c = rows >= 0, cols >= 0
        if not bool(keep_c.any()):
            continue
        flat = cols[keep_c]
        unfold_index = (flat % cin) * (kh * kw) + flat // cin
        v0 = int(pack.val_ptr[g])
        tile = pack.values[v0 : v0 + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        weight = tile[keep_r][:, keep_c].to(x.dtype)
        y[:, rows[keep_r]] = weight @ columns[:, unfold_index]
    return _epilogue(y.view(n, pack.out_channels, oh, ow), pack.bias, residual, relu)
