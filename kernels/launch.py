"""Helpers shared by the kernel launchers: input checks, layout, geometry, the launch.

Layout convention: kernels take activations in PyTorch's *logical* NCHW shape and
read them through explicit strides. Channels-last memory (physical NHWC, what
``x.contiguous(memory_format=torch.channels_last)`` gives) is read as is. A contiguous
NCHW tensor is converted to channels-last once, in the launcher, because gathering
input channels is only coalesced when channels are innermost. Outputs are allocated
channels-last.

A launcher is split in two: ``*_launch`` checks a call and builds a :class:`KernelLaunch`
(the kernel, its arguments, its grid) without running anything, and :func:`run` launches
it. The split is what lets ``sparse_ops_bench.static_cases`` compile exactly what a real call would
launch, for a GPU this machine does not have.

The checks run on every call, so they are written to cost little: messages are only
formatted when a check fails (an f-string per argument per call was a measurable part
of the launch overhead).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .errors import KernelInputError
from .formats import ChannelPlan, GroupPack

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ELEMENT_BYTES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
_CHANNELS_LAST = torch.channels_last


def pair(v) -> tuple[int, int]:
    """``(v, v)`` for an int, else the two values of ``v`` (a wrong count raises)."""
    if isinstance(v, int):
        return (int(v), int(v))
    first, second = v
    return (int(first), int(second))


def cdiv(a: int, b: int) -> int:
    # Not triton.cdiv: that is a @jit function, and calling one from Python costs
    # microseconds per call.
    return -(-a // b)


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was defined under ``TRITON_INTERPRET=1`` (runs on the CPU)."""
    while type(kernel).__name__ == "Autotuner":  # unwrap autotuned kernels
        kernel = kernel.fn
    return type(kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------------- the launch


class KernelLaunch(NamedTuple):
    """Everything one kernel launch needs, built by a launcher's ``*_launch`` function.

    ``constexprs`` holds the feature flags and geometry the launcher decides; tile sizes
    come from a ``triton.Config`` (explicit, autotuned, or ``interpreter_meta``).
    """

    kernel: Any  # the @triton.jit function
    tuned: Any  # the same kernel behind triton.autotune
    args: tuple  # positional arguments, in the kernel's order
    constexprs: dict[str, Any]
    grid: Callable[[dict], tuple[int, ...]]
    interpreter_meta: dict[str, int]
    output: torch.Tensor
    empty: bool  # nothing to compute (no output pixel, or no tile): run() skips it


def run(spec: KernelLaunch, config=None, interpreted: bool = False) -> torch.Tensor:
    """Launch ``spec`` with ``config`` (a ``triton.Config``), the interpreter's tiles, or
    the autotuner; returns the output tensor."""
    if spec.empty:
        return spec.output
    if config is not None:
        spec.kernel[spec.grid(config.kwargs)](*spec.args, **spec.constexprs, **config.all_kwargs())
    elif interpreted:
        meta = spec.interpreter_meta
        spec.kernel[spec.grid(meta)](*spec.args, **spec.constexprs, **meta)
    else:
        spec.tuned[spec.grid](*spec.args, **spec.constexprs)
    return spec.output


_placeholders: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small tensor standing in for a disabled feature's pointer (never read)."""
    key = (device, dtype)
    t = _placeholders.get(key)
    if t is None:
        t = _placeholders[key] = torch.zeros(16, device=device, dtype=dtype)
    return t


MAX_VECTOR_ELEMENTS = 8  # 16 bytes of fp16/bf16; 8 fp32 elements are two 16-byte vectors


def alignment(*values: int) -> int:
    """The largest power of two ≤ 8 dividing every value (zeros and absent strides
    divide by anything): what a kernel may claim with ``epilogue.multiple_of``."""
    align = MAX_VECTOR_ELEMENTS
    for v in values:
        while align > 1 and v % align:
            align //= 2
    return align


WIDE_OFFSETS_AT = 1 << 30  # elements; half of int32's range leaves room for masked taps


def element_span(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` addresses from its first element: its
    numel when contiguous, more for a strided view (a slice of a wider tensor)."""
    span = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1:
            span += (size - 1) * (stride if stride >= 0 else -stride)
    return span


def needs_wide_offsets(dense=(), views=()) -> bool:
    """True if an element offset into any tensor may not fit in int32. ``dense`` tensors
    are known contiguous in some memory format (their span is their numel); ``views``
    may be strided slices of larger tensors (a residual, a bias map), so their span
    counts, not their size. Offsets of masked-off taps (padding) may overshoot a tensor
    by a few rows, hence the margin."""
    if any(t is not None and t.numel() >= WIDE_OFFSETS_AT for t in dense):
        return True
    return any(t is not None and element_span(t) >= WIDE_OFFSETS_AT for t in views)


# ---------------------------------------------------------------------- checks


def check_activation(x: torch.Tensor, what: str, interpreted: bool | None) -> None:
    """A 4-D float tensor; where a Triton kernel can read it, unless ``interpreted`` is
    None (the torch path: any device). Errors read ``"{what}: input ..."``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelInputError(f"{what}: input must be a 4-D tensor [N, C, H, W], got {shape}")
    if x.dtype not in FLOAT_DTYPES:
        raise KernelInputError(f"{what}: input dtype {x.dtype} not supported (fp16, bf16, fp32)")
    if interpreted is None:
        return
    device = x.device.type
    if interpreted:
        if device != "cpu":
            raise KernelInputError(
                f"{what}: input is on {x.device}, but kernels run in the CPU interpreter"
            )
    elif device != "cuda":
        raise KernelInputError(
            f"{what}: input is on {x.device}: Triton kernels need CUDA tensors (set "
            "TRITON_INTERPRET=1 before importing kernels to run them on the CPU)"
        )


def check_same(t: torch.Tensor | None, x: torch.Tensor, what: str, label: str, dtype=None):
    """``t`` lives where ``x`` does (and has ``dtype``, default x's) — or is None.
    Errors read ``"{what}: {label} ..."``."""
    if t is None:
        return
    if t.device != x.device:
        raise KernelInputError(f"{what}: {label} is on {t.device}, input on {x.device}")
    if dtype is None:
        if t.dtype != x.dtype:
            raise KernelInputError(
                f"{what}: {label} dtype {t.dtype} ≠ input dtype {x.dtype} (cast the input or "
                "the module)"
            )
    elif t.dtype != dtype:
        raise KernelInputError(f"{what}: {label} dtype {t.dtype} ≠ {dtype}")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with channels innermost (no copy if it already is)."""
    return x.contiguous(memory_format=_CHANNELS_LAST)


def nhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a logical NCHW tensor in (n, h, w, c) order."""
    s = t.stride()
    return (s[0], s[2], s[3], s[1])


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


def check_format(packed, kind: type, what: str) -> None:
    """``packed`` is a ``kind`` (a ChannelPlan or GroupPack) of the version these kernels
    read. Instances are built at that version only (older ones are migrated), so a
    version check here can fail only for a field changed after building."""
    if not isinstance(packed, kind):
        raise KernelInputError(
            f"{what}: expected a {kind.__name__}, got {type(packed).__name__} "
            "(build one with sparse_ops.packing)"
        )
    if packed.format_version != kind.VERSION:
        raise KernelInputError(
            f"{what}: {kind.__name__} format_version {packed.format_version}; these kernels "
            f"read version {kind.VERSION}"
        )


def prepare_output(
    out: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    x: torch.Tensor,
    what: str,
    inputs: dict[str, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """The output tensor: a new one, or ``out`` checked (shape, device, layout, and no
    overlap with ``x`` or any of ``inputs``, since the kernel reads those while tiles of
    ``out`` are already written)."""
    if out is None:
        # Allocated channels-last directly: empty(...).contiguous(channels_last) would
        # allocate twice and launch a copy kernel on every call.
        return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=_CHANNELS_LAST)
    if tuple(out.shape) != shape:
        raise KernelInputError(f"{what}: out has shape {tuple(out.shape)}, expected {shape}")
    check_same(out, x, what, "out")
    if not (out.is_contiguous(memory_format=_CHANNELS_LAST) or out.is_contiguous()):
        # an expanded or overlapping view would have tiles write over each other
        raise KernelInputError(f"{what}: out must be contiguous or channels-last contiguous")
    check_no_overlap(out, {"x": x, **(inputs or {})}, what)
    return out


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes any element of ``t`` occupies (negative strides too)."""
    low = high = 0
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if size > 1:
            if stride >= 0:
                high += (size - 1) * stride
            else:
                low += (size - 1) * stride
    base, item = t.data_ptr(), t.element_size()
    return base + low * item, base + (high + 1) * item


def check_no_overlap(out: torch.Tensor, inputs: dict[str, torch.Tensor | None], what: str):
    """Refuse an ``out`` sharing memory with an input: the kernel would read values it
    has already overwritten (a residual, the activation, an index map), silently."""
    if out.numel() == 0:
        return
    o_low, o_high = _byte_range(out)
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or t.device != out.device:
            continue
        low, high = _byte_range(t)
        if low < o_high and o_low < high:
            raise KernelInputError(
                f"{what}: out overlaps the memory of {name}; pass a separate output tensor"
            )


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
    x, plan, residual, bias_map, what: str, interpreted: bool | None
) -> CallShape:
    """Every check a ChannelPlan call needs before touching memory (one set of rules and
    messages for the Triton launcher and the torch path). Index *values* are checked
    when a plan is built (formats.ChannelPlan.check_indices): reading them here would
    sync the GPU."""
    check_format(plan, ChannelPlan, what)
    check_activation(x, what, interpreted)
    weight = plan.weight
    if weight.dim() != 4:
        raise KernelInputError(
            f"{what}: plan weight must be [Cout', kh, kw, Cin'], got {tuple(weight.shape)}"
        )
    if not weight.is_contiguous():
        raise KernelInputError(f"{what}: plan weight must be contiguous [Cout', kh, kw, Cin']")
    check_same(weight, x, what, "plan weight")
    c_out, kh, kw, c_in = weight.shape
    c = x.shape[1]
    if c != plan.in_channels:
        raise KernelInputError(f"{what}: input has {c} channels, plan expects {plan.in_channels}")
    in_idx, out_idx, fill_idx = plan.in_idx, plan.out_idx, plan.fill_idx
    if in_idx is None:
        if c_in != c:
            raise KernelInputError(f"{what}: plan weight has {c_in} input channels, input {c}")
    else:
        _check_index(in_idx, c_in, x, what, "plan in_idx")
    if out_idx is None:
        if c_out != plan.out_channels:
            raise KernelInputError(
                f"{what}: plan weight has {c_out} rows, out_channels {plan.out_channels}"
            )
    else:
        _check_index(out_idx, c_out, x, what, "plan out_idx")
    n_fill = 0
    if fill_idx is not None:
        check_same(fill_idx, x, what, "plan fill_idx", dtype=torch.int32)
        n_fill = fill_idx.numel()
    if c_out + n_fill != plan.out_channels:
        raise KernelInputError(
            f"{what}: {c_out} computed + {n_fill} filled ≠ {plan.out_channels} channels"
        )
    check_bias(plan.bias, plan.out_channels, x, what, "plan bias")
    call = _call_shape(x, plan.out_channels, (kh, kw), plan, what)
    check_residual(residual, call.out_shape, x, what)
    if bias_map is not None:
        if tuple(bias_map.shape) != call.out_shape[1:]:
            raise KernelInputError(
                f"{what}: bias_map has shape {tuple(bias_map.shape)}, expected {call.out_shape[1:]}"
            )
        check_same(bias_map, x, what, "bias_map", dtype=torch.float32)
    return call


def _check_index(t: torch.Tensor, length: int, x: torch.Tensor, what: str, label: str) -> None:
    if t.dtype != torch.int32 or t.numel() != length:
        raise KernelInputError(f"{what}: {label} must be int32 of length {length}")
    check_same(t, x, what, label, dtype=torch.int32)


def check_group_call(x, pack, residual, what: str, interpreted: bool | None) -> CallShape:
    """Every check a GroupPack call needs before touching memory (see
    :func:`check_channel_call`)."""
    check_format(pack, GroupPack, what)
    check_activation(x, what, interpreted)
    check_same(pack.values, x, what, "pack values")
    for name in GroupPack.INDEX_FIELDS:
        check_same(getattr(pack, name), x, what, f"pack {name}", dtype=torch.int32)
    check_same(pack.val_ptr, x, what, "pack val_ptr", dtype=torch.int64)
    check_bias(pack.bias, pack.out_channels, x, what, "pack bias")
    c = x.shape[1]
    if c != pack.in_channels:
        raise KernelInputError(f"{what}: input has {c} channels, pack expects {pack.in_channels}")
    groups = pack.row_ptr.numel() - 1
    if groups < 0 or pack.col_ptr.numel() != groups + 1 or pack.val_ptr.numel() != groups + 1:
        raise KernelInputError(
            f"{what}: pack row_ptr, col_ptr and val_ptr must all have groups + 1 entries, got "
            f"{pack.row_ptr.numel()}, {pack.col_ptr.numel()}, {pack.val_ptr.numel()}"
        )
    if pack.tile_group.numel() != pack.tile_row.numel():
        raise KernelInputError(f"{what}: pack tile_group and tile_row differ in length")
    if pack.col_code.numel() != pack.col_idx.numel():
        raise KernelInputError(f"{what}: pack col_code and col_idx differ in length")
    call = _call_shape(x, pack.out_channels, pair(pack.kernel_size), pack, what)
    check_residual(residual, call.out_shape, x, what)
    return call


def check_bias(bias, channels: int, x: torch.Tensor, what: str, label: str) -> None:
    if bias is None:
        return
    if bias.dim() != 1 or bias.numel() != channels:
        raise KernelInputError(
            f"{what}: {label} must have shape ({channels},), got {tuple(bias.shape)}"
        )
    check_same(bias, x, what, label, dtype=torch.float32)


def check_residual(residual, shape: tuple[int, int, int, int], x: torch.Tensor, what: str):
    if residual is None:
        return
    if tuple(residual.shape) != shape:
        raise KernelInputError(
            f"{what}: residual has shape {tuple(residual.shape)}, expected the output's {shape}"
        )
    check_same(residual, x, what, "residual")


def _call_shape(x, out_channels: int, kernel, geometry, what: str) -> CallShape:
    n, _, h, w = x.shape
    stride, padding, dilation = (
        pair(v) for v in (geometry.stride, geometry.padding, geometry.dilation)
    )
    oh, ow = output_hw(h, w, kernel, stride, padding, dilation, what)
    return CallShape(
        n, h, w, oh, ow, tuple(kernel), stride, padding, dilation, (n, out_channels, oh, ow)
    )
