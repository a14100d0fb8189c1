"""Rules for ops working on each channel over its pixels: pooling, resampling, spatial
slices and means (``Spatial``), zero padding of the image (``ZeroPad``), and the
``[N, C, 1, 1] → [N, C]`` flatten after a global pool (``Flatten``). Channels stay where
they are; what changes is which constant channels stay constant.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import _arg, _KeepsChannels, frozen


class Spatial(_KeepsChannels):
    """Pooling, resampling, spatial slicing and spatial means: each channel on its own,
    and a constant channel stays that constant (a window of equal values averages,
    maxes and interpolates to the value)."""

    kind = "spatial"
    _pool_max = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    _pool_avg = (
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    )
    _resample = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")
    functions = frozen(
        {
            "F.max_pool2d": (F.max_pool2d, ("input", *_pool_max)),
            "F.avg_pool2d": (F.avg_pool2d, ("input", *_pool_avg)),
            "F.adaptive_avg_pool2d": (F.adaptive_avg_pool2d, ("input", "output_size")),
            "F.adaptive_max_pool2d": (
                F.adaptive_max_pool2d,
                ("input", "output_size", "return_indices"),
            ),
            "F.interpolate": (F.interpolate, ("input", *_resample, "antialias")),
            "torch.mean": (torch.mean, ("input", "dim", "keepdim", "dtype")),
            "torch.amax": (torch.amax, ("input", "dim", "keepdim")),
            "operator.getitem": (operator.getitem, ()),
        }
    )
    methods = frozen({"mean": ("dim", "keepdim", "dtype"), "amax": ("dim", "keepdim")})
    modules = frozen(
        {
            "MaxPool2d": (nn.MaxPool2d, _pool_max),
            "AvgPool2d": (nn.AvgPool2d, _pool_avg),
            "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
            "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
            "Upsample": (nn.Upsample, _resample),
        }
    )

    def understands(self, node, ctx):
        if not super().understands(node, ctx) or len(ctx.shape(node.args[0])) != 4:
            return False
        if node.op == "call_function" and node.target is operator.getitem:
            index = node.args[1]
            return (
                isinstance(index, tuple)
                and len(index) >= 2
                and index[1] == slice(None)
                and all(isinstance(i, slice) for i in index)
            )
        reductions = {
            ("call_function", torch.mean),
            ("call_function", torch.amax),
            ("call_method", "mean"),
            ("call_method", "amax"),
        }
        if (node.op, node.target) in reductions:
            dims = _arg(node, 1, "dim")
            dims = [dims] if isinstance(dims, int) else dims
            return (
                isinstance(dims, list | tuple)
                and len(dims) > 0
                and all(isinstance(d, int) and d % 4 in (2, 3) for d in dims)
            )
        return True

    def constants(self, node, ctx):
        const = ctx.const[node.args[0]].clone()
        if self._pads_with_zeros(node, ctx):
            # Zero padding counted in the average: near the border a nonzero constant
            # channel varies; a zero one stays zero.
            const = torch.where(const == 0, const, torch.full_like(const, float("nan")))
        return const

    @staticmethod
    def _pads_with_zeros(node, ctx) -> bool:
        if node.op == "call_module" and type(ctx.modules[node.target]) is nn.AvgPool2d:
            pool = ctx.modules[node.target]
            padding, include, divisor = pool.padding, pool.count_include_pad, pool.divisor_override
        elif node.target is F.avg_pool2d:
            padding = _arg(node, 3, "padding", 0)
            include = _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override")
        else:
            return False
        padded = padding not in (0, (0, 0), [0, 0])
        return divisor is not None or (padded and include)


class ZeroPad(_KeepsChannels):
    """``F.pad`` with zeros on the spatial sides only: zero channels stay zero."""

    kind = "zero-pad"
    functions = frozen({"F.pad": (F.pad, ("input", "pad", "mode", "value"))})

    def understands(self, node, ctx):
        pads = _constant_pads(node)
        spatial_only = pads is not None and (len(pads) == 4 or list(pads[4:6]) == [0, 0])
        return spatial_only and super().understands(node, ctx) and len(ctx.shape(node)) == 4

    def constants(self, node, ctx):
        const = ctx.const[node.args[0]].clone()
        return torch.where(const == 0, const, torch.full_like(const, float("nan")))


def _constant_pads(node: fx.Node) -> tuple[int, ...] | None:
    """The pad amounts of an ``F.pad`` with zeros of 4 or 6 ints, else None."""
    pads = _arg(node, 1, "pad")
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", 0.0)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pads, list | tuple):
        return None
    if len(pads) not in (4, 6) or not all(type(p) is int for p in pads):
        return None
    return tuple(pads)


class Flatten(_KeepsChannels):
    """``[N, C, 1, 1] → [N, C]`` (flatten from dim 1, or view/reshape to ``(N, -1)``):
    channels stay channels."""

    kind = "flatten"
    functions = frozen({"torch.flatten": (torch.flatten, ("input", "start_dim", "end_dim"))})
    methods = frozen(
        {"flatten": ("start_dim", "end_dim"), "view": ("dtype",), "reshape": ("shape",)}
    )
    modules = frozen({"Flatten": (nn.Flatten, ("start_dim", "end_dim"))})

    def understands(self, node, ctx):
        source = node.args[0] if node.args else None
        shape, src = ctx.shape(node), ctx.shape(source)
        if not ctx.is_channel(source) or shape is None or src is None:
            return False
        if len(src) != 4 or tuple(src[2:]) != (1, 1) or tuple(shape) != tuple(src[:2]):
            return False
        if node.op == "call_method" and node.target in ("view", "reshape"):
            # The new shape must leave the channel count to torch (-1): a literal C
            # would not survive narrowing. Its batch size may come from x.size(0).
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
                sizes = tuple(sizes[0])
            return len(sizes) == 2 and sizes[1] == -1 and not node.kwargs
        if node.op == "call_module":
            flatten = ctx.modules[node.target]
            return flatten.start_dim in (1, -3) and flatten.end_dim in (-1, 3)
        start = _arg(node, 1, "start_dim", 0)
        end = _arg(node, 2, "end_dim", -1)
        return start in (1, -3) and end in (-1, 3)

    def constants(self, node, ctx):
        return ctx.const[node.args[0]].clone()

    def tie(self, node, ctx):
        ctx.uf.union(node, node.args[0])  # a batch size read by x.size(0) is its own node
