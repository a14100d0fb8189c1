"""The semantics every fast path is tested against, in plain torch.

One fused conv layer:

    y = epilogue( conv2d(x, W ⊙ M, stride, padding, dilation) )
    epilogue(a) = relu?( a + bias + residual? )          (then cast to the output dtype)

``W`` is the dense weight ``[Cout, Cin, kh, kw]``, ``M`` its mask (all ones if absent),
``bias`` has one entry per output channel (BatchNorm folded in by the converter), and
``residual`` has the output's shape. ReLU comes after the residual add, as in a ResNet
block. Output channels whose mask row is empty still get ``bias`` (+ residual, ReLU).
This is what a masked dense network computes, and what the kernels must match.

Computed in float64 on the CPU unless asked otherwise, so that it is a reference for
fp32, tf32, fp16 and bf16 paths alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    mask: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    residual: torch.Tensor | None = None,
    relu: bool = False,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``relu?(conv2d(x, W ⊙ M) + bias + residual)`` in ``compute_dtype`` on the CPU."""
    device = torch.device("cpu")
    w = weight.detach().to(device, compute_dtype)
    if mask is not None:
        w = w * mask.detach().to(device, compute_dtype)
    b = None if bias is None else bias.detach().to(device, compute_dtype)
    y = F.conv2d(
        x.detach().to(device, compute_dtype),
        w,
        b,
        stride=_pair(stride),
        padding=_pair(padding),
        dilation=_pair(dilation),
    )
    if residual is not None:
        y = y + residual.detach().to(device, compute_dtype)
    if relu:
        y = torch.relu(y)
    return y


def output_size(
    size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Spatial output size of a convolution (PyTorch's formula)."""
    return tuple(
        (size[i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1) // stride[i] + 1
        for i in range(2)
    )  # type: ignore[return-value]
