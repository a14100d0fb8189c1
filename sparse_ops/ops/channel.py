"""``channel_conv``: a ChannelPlan's conv, on the Triton kernel or on torch (oneDNN on the
CPU, with the epilogue fused into the conv primitive where it can be)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from sparse_ops_kernels import launch
from sparse_ops_kernels.formats import ChannelPlan

from .common import epilogue_inplace, resolve_backend, scatter_channels_, select_channels

# The CPU channel path fuses the epilogue into oneDNN's conv where it can (tests turn it
# off to check both paths compute the same).
_FUSE_ON_CPU = True


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
    if resolve_backend(x, backend) == "triton":
        from sparse_ops_kernels import channel_conv as kernel

        return kernel.channel_conv(
            x, plan, residual=residual, relu=relu, allow_tf32=allow_tf32, bias_map=bias_map
        )
    # The launcher's checks, so both backends refuse the same inputs with the same words.
    call = launch.check_channel_call(x, plan, residual, bias_map, "channel_conv", None)
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
        return epilogue_inplace(y, None, residual, relu, bias_map)
    else:
        compact = F.conv2d(inputs, weight, None, plan.stride, plan.padding, plan.dilation)
    if plan.out_idx is None:  # no weight, every output channel kept: the epilogue alone
        y = compact.clone()
        if plan.bias is not None:
            y.add_(plan.bias.to(x.dtype).view(1, -1, 1, 1))
        return epilogue_inplace(y, None, residual, relu, bias_map)
    n, _, oh, ow = compact.shape
    # Start from what every channel gets (bias, residual), then add the computed rows.
    if residual is not None:
        y = residual.to(x.dtype).contiguous(memory_format=torch.channels_last).clone()
        if plan.bias is not None:
            y.add_(plan.bias.to(x.dtype).view(1, -1, 1, 1))
    elif plan.bias is not None:
        # A fresh tensor, never a view of the bias: y is updated in place below (an
        # expanded [1, C, 1, 1] view already counts as channels-last contiguous).
        y = torch.empty(
            n,
            plan.out_channels,
            oh,
            ow,
            dtype=compact.dtype,
            device=compact.device,
            memory_format=torch.channels_last,
        )
        y.copy_(plan.bias.to(x.dtype).view(1, -1, 1, 1).expand_as(y))
    else:
        y = compact.new_zeros(n, plan.out_channels, oh, ow).contiguous(
            memory_format=torch.channels_last
        )
    scatter_channels_(y, plan.out_idx.long(), compact, add=True)
    return epilogue_inplace(y, None, None, relu, bias_map)


@functools.cache
def _has_onednn_pointwise() -> bool:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_convolution_pointwise")


def _onednn_fusion(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether oneDNN's fused conv (the op torch.compile's CPU backend emits) can run this
    layer: CPU fp32 tensors, channels-last input and residual of the output's shape."""
    if not (
        _FUSE_ON_CPU
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and _has_onednn_pointwise()
    ):
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
