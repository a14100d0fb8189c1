"""Pieces shared by the built-in architectures."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# CIFAR-10 channel statistics as hard-coded by Structure-LTH's model constructors.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` with ``mean``/``std`` as persistent buffers.

    Structure-LTH carries this module in every model (keys ``normalize.mean``,
    ``normalize.std``) so a checkpoint remembers its dataset statistics; some of its
    architectures apply it in ``forward`` and some do not, and ours follow suit.
    """

    def __init__(self, mean=CIFAR10_MEAN, std=CIFAR10_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]


def conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> nn.Module:
    """He init for convs, unit BN, small Linear: a sound start for IMP from scratch."""
    if any(p.is_meta for p in model.parameters()):
        return model  # shape-only model: nothing to initialise
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """``avg_pool2d`` with a kernel as wide as the map, flattened (the origin repos' head).

    For the square maps these networks produce this is global average pooling.
    """
    return nn.functional.avg_pool2d(x, x.shape[-1]).flatten(1)


class PostActBasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + residual(x))`` with 3×3 convs.

    The block all the CIFAR/ImageNet ResNets here share; subclasses only add and name
    the residual path (option-A pad, 1×1 conv + BN as ``shortcut``/``downsample``, ...),
    because the origin repositories name it differently.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.residual(x))


def resnet_stages(
    make_block: Callable[[int, int, int], nn.Module],
    cin: int,
    widths: Sequence[int],
    blocks_per_stage: int,
) -> list[nn.Sequential]:
    """The stages of a CIFAR ResNet, one ``nn.Sequential`` of blocks per width, built by
    ``make_block(cin, cout, stride)``. Each stage after the first opens with a stride-2
    block: that is where the resolution halves."""
    stages = []
    for stage, width in enumerate(widths):
        blocks = []
        for j in range(blocks_per_stage):
            stride = 2 if stage > 0 and j == 0 else 1
            blocks.append(make_block(cin, width, stride))
            cin = width
        stages.append(nn.Sequential(*blocks))
    return stages
