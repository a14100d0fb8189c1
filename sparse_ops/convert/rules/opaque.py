"""Rules for ops that keep every channel: reads of a tensor's shape (``ShapeAccess``,
which forces full only when code reads the channel count), and ops known to mix or
move channels (``Passthrough``), named so that a saved graph may call them.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import Rule, _arg, frozen
from .channel_maps import Cat
from .spatial import Flatten, Spatial, ZeroPad


class ShapeAccess(Rule):
    """``x.shape`` / ``x.size(d)``: the tensor keeps every channel only if code reads its
    channel count."""

    kind = "shape"
    functions = frozen({"builtins.getattr": (getattr, ())})
    methods = frozen({"size": ("dim",)})

    def understands(self, node, ctx):
        if node.op == "call_function":
            return len(node.args) == 2 and node.args[1] in ("shape", "ndim", "dtype", "device")
        return True

    def constants(self, node, ctx):
        return None

    def tie(self, node, ctx):
        source = node.args[0]
        if ctx.is_channel(source) and self._reads_channels(node, len(ctx.shape(source))):
            ctx.uf.force_full(source)

    @staticmethod
    def _reads_channels(node: fx.Node, rank: int) -> bool:
        if node.op == "call_method":
            dim = _arg(node, 1, "dim")
            return not isinstance(dim, int) or dim % rank == 1
        if node.args[1] != "shape":
            return False
        for user in node.users:
            index = user.args[1] if len(user.args) > 1 else None
            if not (
                user.op == "call_function"
                and user.target is operator.getitem
                and isinstance(index, int)
                and index % rank != 1
            ):
                return True
        return False


class Passthrough(Rule):
    """Ops known to mix channels or move the channel axis (permutes, reshapes, channel
    LayerNorm, splits, matmuls): opaque, and saved like any other."""

    kind = "opaque (known)"
    functions = frozen(
        {
            "torch.permute": (torch.permute, ("input", "dims")),
            "torch.transpose": (torch.transpose, ("input", "dim0", "dim1")),
            "torch.reshape": (torch.reshape, ("input", "shape")),
            "torch.chunk": (torch.chunk, ("input", "chunks", "dim")),
            "torch.split": (torch.split, ("tensor", "split_size_or_sections", "dim")),
            "torch.matmul": (torch.matmul, ("input", "other")),
            "torch.sum": (torch.sum, ("input", "dim", "keepdim", "dtype")),
            "torch.softmax": (torch.softmax, ("input", "dim", "dtype")),
            "F.softmax": (F.softmax, ("input", "dim", "dtype")),
            "F.layer_norm": (F.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps")),
            "F.group_norm": (F.group_norm, ("input", "num_groups", "weight", "bias", "eps")),
            "torch.cat": Cat.functions["torch.cat"],
            "torch.flatten": Flatten.functions["torch.flatten"],
            "operator.getitem": (operator.getitem, ()),
            "torch.mean": Spatial.functions["torch.mean"],
            "F.pad": ZeroPad.functions["F.pad"],
            "F.avg_pool2d": Spatial.functions["F.avg_pool2d"],
            "operator.floordiv": (operator.floordiv, ()),  # channels // groups in a shuffle
            "torch.stack": (torch.stack, ("tensors", "dim")),
            "F.linear": (F.linear, ("input", "weight", "bias")),
        }
    )
    methods = frozen(
        {
            "permute": ("dims",),
            "transpose": ("dim0", "dim1"),
            "view": ("dtype",),
            "reshape": ("shape",),
            "chunk": ("chunks", "dim"),
            "split": ("split_size", "dim"),
            "flatten": ("start_dim", "end_dim"),
            "mean": ("dim", "keepdim", "dtype"),
            "sum": ("dim", "keepdim", "dtype"),
            "squeeze": ("dim",),
            "unsqueeze": ("dim",),
            "expand_as": ("other",),
            "softmax": ("dim", "dtype"),
        }
    )
    modules = frozen(
        {
            "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
            "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
            "ChannelShuffle": (nn.ChannelShuffle, ("groups",)),
            "Softmax": (nn.Softmax, ("dim",)),
            "Flatten": Flatten.modules["Flatten"],
            "Conv2d": (
                nn.Conv2d,
                (
                    "in_channels",
                    "out_channels",
                    "kernel_size",
                    "stride",
                    "padding",
                    "dilation",
                    "groups",
                    "padding_mode",
                ),
            ),
            "AvgPool2d": Spatial.modules["AvgPool2d"],
            "InstanceNorm2d": (
                nn.InstanceNorm2d,
                ("num_features", "eps", "momentum", "affine", "track_running_stats"),
            ),
            "LocalResponseNorm": (nn.LocalResponseNorm, ("size", "alpha", "beta", "k")),
            "PixelShuffle": (nn.PixelShuffle, ("upscale_factor",)),
        }
    )
