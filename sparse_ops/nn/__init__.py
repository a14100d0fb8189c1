"""Inference modules the converter emits (eval only).

Each conv unit computes one conv layer with BatchNorm folded in and its epilogue fused:

    y = relu?( conv(x, W) + bias [+ bias_map] [+ residual] )

``ChannelPrunedConv2d`` (:mod:`.channel`) runs a ChannelPlan, ``GroupSparseConv2d``
(:mod:`.group`) a GroupPack and an optional leftover pack, ``TorchConv2d`` a plain
(masked) conv, ``Relayout`` moves a tensor between channel layouts
(:mod:`.torch_units`).

On CUDA tensors the conv units run the Triton kernels, on CPU tensors the torch paths
of :mod:`sparse_ops.ops`. Both sit behind the custom ops ``sparse_ops::channel_conv`` and
``sparse_ops::group_conv``, so ``torch.compile`` and CUDA-graph capture see one opaque
op per layer instead of breaking the graph.
"""

from .channel import ChannelPrunedConv2d
from .group import GroupSparseConv2d
from .registry import UNITS
from .torch_units import Relayout, TorchConv2d

__all__ = ["UNITS", "ChannelPrunedConv2d", "GroupSparseConv2d", "Relayout", "TorchConv2d"]
