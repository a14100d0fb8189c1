"""What both torch paths share: the backend choice, the unfused epilogue, and channel
gathers / scatters on channels-last tensors."""

from __future__ import annotations

import contextlib

import torch

from ..errors import SparseOpsError

BACKENDS = ("auto", "triton", "torch")


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


def resolve_backend(x: torch.Tensor, backend: str) -> str:
    if backend not in BACKENDS:
        raise SparseOpsError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto" and _forced and _forced[-1] != "auto":
        return _forced[-1]
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


def epilogue(
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


def epilogue_inplace(
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


def select_channels(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` that stays channels-last for a channels-last 4-D ``x``.

    ``index_select`` on dim 1 returns NCHW, which would make the next conv transpose it
    back (or a kernel read it with a strided channel axis)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        n, _, h, w = x.shape
        picked = pixel_rows(x).index_select(1, index)
        return picked.view(n, h, w, index.numel()).permute(0, 3, 1, 2)
    return x.index_select(1, index)


def scatter_channels_(y: torch.Tensor, index: torch.Tensor, src: torch.Tensor, add: bool):
    """``y[:, index] (+)= src`` in place, for a channels-last ``y``."""
    rows = pixel_rows(y)
    values = pixel_rows(src.contiguous(memory_format=torch.channels_last)).to(y.dtype)
    if add:
        rows.index_add_(1, index, values)
    else:
        rows.index_copy_(1, index, values)
    return y


def pixel_rows(x: torch.Tensor) -> torch.Tensor:
    """The ``[N·H·W, C]`` view of a channels-last ``x`` (writes land in ``x``).

    Channel gathers and scatters run on this 2-D view: on the CPU several times faster
    than the same ``index_*`` op on dim 1 (or dim 3 of the NHWC permute) of the 4-D tensor
    (measured 0.4 vs 3.7 ms gather and 0.5 vs 3.0 ms scatter-add at 64×32..64×16×16)."""
    n, c, h, w = x.shape
    if not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"pixel_rows needs a channels-last tensor, got strides {x.stride()}")
    return x.permute(0, 2, 3, 1).view(n * h * w, c)
