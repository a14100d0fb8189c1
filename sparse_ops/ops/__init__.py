"""Run a packed conv layer: Triton kernels on CUDA tensors, plain torch on CPU tensors.

``channel_conv(x, plan)`` and ``group_conv(x, pack)`` compute exactly
:func:`sparse_ops.reference.conv2d` with the plan's or pack's masked dense weight
(bias, optional residual, optional ReLU), on every output channel.

``backend``:
    ``"auto"``    Triton for CUDA tensors, torch for CPU tensors;
    ``"triton"``  the Triton kernel (CPU tensors need ``TRITON_INTERPRET=1``);
    ``"torch"``   the torch path: a smaller dense conv for a ChannelPlan; for a
                  GroupPack, one dense GEMM per distinct column set on the unfolded
                  input (one dense conv when there are very many sets).

One slice per op, with the same name in every layer: ``sparse_ops_kernels.channel_conv``
(the Triton kernel and its launcher ``channel_conv``) → :mod:`.channel` (this dispatch,
``channel_conv``) → ``sparse_ops.nn.channel`` (the custom op ``sparse_ops::channel_conv``
and the module ``ChannelPrunedConv2d``); likewise for ``group_conv``.
"""

from .channel import channel_conv
from .common import BACKENDS, backend, scatter_channels_, select_channels
from .group import group_conv

__all__ = [
    "BACKENDS",
    "backend",
    "channel_conv",
    "group_conv",
    "scatter_channels_",
    "select_channels",
]
