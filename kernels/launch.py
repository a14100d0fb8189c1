"""Helpers shared by the kernel launchers: input checks, layout, geometry.

Layout convention: kernels take activations in PyTorch's *logical* NCHW shape and
read them through explicit strides. Channels-last memory (physical NHWC, what
``x.contiguous(memory_format=torch.channels_last)`` gives) is read as is. A contiguous
NCHW tensor is converted to channels-last once, in the launcher, because gathering
input channels is only coalesced when channels are innermost. Outputs are allocated
channels-last.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import KernelInputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under ``TRITON_INTERPRET=1`` (runs on the CPU)."""
    while type(kernel).__name__ == "Autotuner":  # unwrap autotuned kernels
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


def check_activation(x: torch.Tensor, what: str, interpreted: bool | None) -> None:
    """A 4-D float tensor; where a Triton kernel can read it, unless ``interpreted`` is
    None (the torch path: any device)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelInputError(f"{what} must be a 4-D tensor [N, C, H, W], got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{what} dtype {x.dtype} not supported (fp16, bf16, fp32)")
    if interpreted is None:
        return
    if interpreted:
        if x.device.type != "cpu":
            raise KernelInputError(
                f"{what} is on {x.device}, but kernels run in the CPU interpreter"
            )
    elif x.device.type != "cuda":
        raise KernelInputError(
            f"{what} is on {x.device}: Triton kernels need CUDA tensors (set TRITON_INTERPRET=1 "
            "before importing kernels to run them on the CPU)"
        )


def check_same(t: torch.Tensor | None, x: torch.Tensor, what: str, dtype=None) -> None:
    """``t`` lives where ``x`` does (and has ``dtype``, default x's) — or is None."""
    if t is None:
        return
    if t.device != x.device:
        raise KernelInputError(f"{what} is on {t.device}, input on {x.device}")
    if dtype is None and t.dtype != x.dtype:
        raise KernelInputError(
            f"{what} dtype {t.dtype} ≠ input dtype {x.dtype} (cast the input or the module)"
        )
    if dtype is not None and t.dtype != dtype:
        raise KernelInputError(f"{what} dtype {t.dtype} ≠ {dtype}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels innermost (no copy if it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a logical NCHW tensor in (n, h, w, c) order."""
    return (t.stride(0), t.stride(2), t.stride(3), t.stride(1))


def conv_output_size(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """``(OH, OW)`` of a zero-padded conv (no check)."""
    return (
        (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1,
        (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1,
    )


def output_hw(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation, what: str
) -> tuple[int, int]:
    oh, ow = conv_output_size(h, w, kernel, stride, padding, dilation)
    if oh < 1 or ow < 1:
        raise KernelInputError(
            f"{what}: input {h}×{w} is too small for kernel {kernel}, stride {stride}, "
            f"padding {padding}, dilation {dilation} (output {oh}×{ow})"
        )
    return oh, ow


def input_precision(dtype: torch.dtype, allow_tf32: bool | None) -> str:
    """tl.dot precision: tf32 for fp32 inputs when allowed (cuDNN's default for convs)."""
    if dtype != torch.float32:
        return "ieee"
    if allow_tf32 is None:
        allow_tf32 = torch.backends.cudnn.allow_tf32
    return "tf32" if allow_tf32 else "ieee"


def check_format_version(obj, supported: int, what: str) -> None:
    version = getattr(obj, "format_version", None)
    if version != supported:
        raise KernelInputError(
            f"{what} has format_version {version}; these kernels read version {supported}"
        )


def prepare_output(
    out: torch.Tensor | None, shape: tuple[int, int, int, int], x: torch.Tensor, what: str
) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=x.device, dtype=x.dtype).contiguous(
            memory_format=torch.channels_last
        )
    if tuple(out.shape) != shape:
        raise KernelInputError(f"{what}: out has shape {tuple(out.shape)}, expected {shape}")
    check_same(out, x, f"{what}: out")
    if not (out.is_contiguous(memory_format=torch.channels_last) or out.is_contiguous()):
        # an expanded or overlapping view would have tiles write over each other
        raise KernelInputError(f"{what}: out must be contiguous or channels-last contiguous")
    return out


class CallShape(NamedTuple):
    """A checked call: input and output sizes and the conv geometry."""

    n: int
    h: int
    w: int
    oh: int
    ow: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_shape: tuple[int, int, int, int]


def check_channel_call(
    x, plan, residual, bias_map, what: str, version: int, interpreted: bool | None
) -> CallShape:
    """Every check a ChannelPlan call needs before touching memory (one set of rules and
    messages for the Triton launcher and the torch path). Index *values* are checked
    where plans are built (sparse_ops.formats): reading them here would sync the GPU."""
    check_format_version(plan, version, f"{what}: plan")
    check_activation(x, f"{what}: input", interpreted)
    weight = plan.weight
    if weight.dim() != 4:
        raise KernelInputError(
            f"{what}: plan weight must be [Cout', kh, kw, Cin'], got {tuple(weight.shape)}"
        )
    if not weight.is_contiguous():
        raise KernelInputError(f"{what}: plan weight must be contiguous [Cout', kh, kw, Cin']")
    check_same(weight, x, f"{what}: plan weight")
    c_out, kh, kw, c_in = (int(s) for s in weight.shape)
    c = int(x.shape[1])
    if c != plan.in_channels:
        raise KernelInputError(f"{what}: input has {c} channels, plan expects {plan.in_channels}")
    in_idx, out_idx, fill_idx = plan.in_idx, plan.out_idx, plan.fill_idx
    if in_idx is None and c_in != c:
        raise KernelInputError(f"{what}: plan weight has {c_in} input channels, input {c}")
    if out_idx is None and c_out != plan.out_channels:
        raise KernelInputError(
            f"{what}: plan weight has {c_out} rows, out_channels {plan.out_channels}"
        )
    for t, name, length in ((in_idx, "in_idx", c_in), (out_idx, "out_idx", c_out)):
        if t is not None and (t.dtype != torch.int32 or t.numel() != length):
            raise KernelInputError(f"{what}: plan {name} must be int32 of length {length}")
        check_same(t, x, f"{what}: plan {name}", dtype=torch.int32)
    n_fill = 0 if fill_idx is None else int(fill_idx.numel())
    check_same(fill_idx, x, f"{what}: plan fill_idx", dtype=torch.int32)
    if c_out + n_fill != plan.out_channels:
        raise KernelInputError(
            f"{what}: {c_out} computed + {n_fill} filled ≠ {plan.out_channels} channels"
        )
    check_bias(plan.bias, plan.out_channels, x, f"{what}: plan bias")
    call = _call_shape(x, plan.out_channels, (kh, kw), plan, what)
    check_residual(residual, call.out_shape, x, what)
    if bias_map is not None:
        if tuple(bias_map.shape) != call.out_shape[1:]:
            raise KernelInputError(
                f"{what}: bias_map has shape {tuple(bias_map.shape)}, expected {call.out_shape[1:]}"
            )
        check_same(bias_map, x, f"{what}: bias_map", dtype=torch.float32)
    return call


GROUP_PACK_INDEX = ("row_idx", "row_ptr", "col_idx", "col_ptr", "tile_group", "tile_row",
                    "fill_idx")  # fmt: skip


def check_group_call(
    x, pack, residual, what: str, version: int, interpreted: bool | None
) -> CallShape:
    """Every check a GroupPack call needs before touching memory (see
    :func:`check_channel_call`)."""
    check_format_version(pack, version, f"{what}: pack")
    check_activation(x, f"{what}: input", interpreted)
    check_same(pack.values, x, f"{what}: pack values")
    for name in GROUP_PACK_INDEX:
        check_same(getattr(pack, name), x, f"{what}: pack {name}", dtype=torch.int32)
    check_same(pack.val_ptr, x, f"{what}: pack val_ptr", dtype=torch.int64)
    check_bias(pack.bias, pack.out_channels, x, f"{what}: pack bias")
    c = int(x.shape[1])
    if c != pack.in_channels:
        raise KernelInputError(f"{what}: input has {c} channels, pack expects {pack.in_channels}")
    groups = int(pack.row_ptr.numel()) - 1
    if (
        groups < 0
        or int(pack.col_ptr.numel()) != groups + 1
        or int(pack.val_ptr.numel()) != (groups + 1)
    ):
        raise KernelInputError(
            f"{what}: pack row_ptr, col_ptr and val_ptr must all have groups + 1 entries, got "
            f"{pack.row_ptr.numel()}, {pack.col_ptr.numel()}, {pack.val_ptr.numel()}"
        )
    if int(pack.tile_group.numel()) != int(pack.tile_row.numel()):
        raise KernelInputError(f"{what}: pack tile_group and tile_row differ in length")
    call = _call_shape(x, pack.out_channels, pair(pack.kernel_size), pack, what)
    check_residual(residual, call.out_shape, x, what)
    return call


def check_bias(bias: torch.Tensor | None, channels: int, x: torch.Tensor, what: str) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or int(bias.numel()) != channels:
        raise KernelInputError(f"{what} must have shape ({channels},), got {tuple(bias.shape)}")
    check_same(bias, x, what, dtype=torch.float32)


def check_residual(residual, shape: tuple[int, int, int, int], x: torch.Tensor, what: str):
    if residual is None:
        return
    if tuple(residual.shape) != shape:
        raise KernelInputError(
            f"{what}: residual has shape {tuple(residual.shape)}, expected the output's {shape}"
        )
    check_same(residual, x, f"{what}: residual")


def _call_shape(x, out_channels: int, kernel, geometry, what: str) -> CallShape:
    n, _, h, w = (int(s) for s in x.shape)
    stride, padding, dilation = (pair(v) for v in (geometry.stride, geometry.padding,
                                                   geometry.dilation))  # fmt: skip
    oh, ow = output_hw(h, w, kernel, stride, padding, dilation, what)
    return CallShape(n, h, w, oh, ow, tuple(kernel), stride, padding, dilation,
                     (n, int(out_channels), oh, ow))  # fmt: skip
