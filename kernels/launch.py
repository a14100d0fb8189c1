"""Helpers shared by the kernel launchers: input checks, layout, geometry.

Layout convention: kernels take activations in PyTorch's *logical* NCHW shape and
read them through explicit strides. Channels-last memory (physical NHWC, what
``x.contiguous(memory_format=torch.channels_last)`` gives) is read as is. A contiguous
NCHW tensor is converted to channels-last once, in the launcher, because gathering
input channels is only coalesced when channels are innermost. Outputs are allocated
channels-last.
"""

from __future__ import annotations

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


def check_activation(x: torch.Tensor, what: str, interpreted: bool) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelInputError(f"{what} must be a 4-D tensor [N, C, H, W], got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{what} dtype {x.dtype} not supported (fp16, bf16, fp32)")
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
    want = x.dtype if dtype is None else dtype
    if t.dtype != want:
        raise KernelInputError(f"{what} dtype {t.dtype} ≠ {want}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels innermost (no copy if it already is)."""
    return x.contiguous(memory_format=torch.channels_last)


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a logical NCHW tensor in (n, h, w, c) order."""
    return (t.stride(0), t.stride(2), t.stride(3), t.stride(1))


def output_hw(
    h: int, w: int, kernel: tuple[int, int], stride, padding, dilation, what: str
) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
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
    return out


def prepare_residual(
    residual: torch.Tensor | None, shape: tuple[int, int, int, int], x: torch.Tensor, what: str
) -> torch.Tensor | None:
    if residual is None:
        return None
    if tuple(residual.shape) != shape:
        raise KernelInputError(
            f"{what}: residual has shape {tuple(residual.shape)}, expected the output's {shape}"
        )
    check_same(residual, x, f"{what}: residual")
    return residual
