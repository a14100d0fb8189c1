"""CIFAR ResNets (3 stages of BasicBlocks) in the two naming schemes tickets come in.

``ResNetS`` — Structure-LTH's ``res20s``/``res56s`` (He et al. 2016, option-A shortcuts):
keys ``conv1, bn1, layer{1,2,3}.{j}.conv1/bn1/conv2/bn2, fc`` plus ``normalize.*``
buffers that ``forward`` does *not* apply (as in the origin code). Widths 16/32/64,
``(depth - 2) / 6`` blocks per stage. The option-A shortcut has no parameters: it
subsamples by 2 and zero-pads ``planes // 4`` channels on each side.

``OpenLTHResNet`` — open_lth's ``cifar_resnet_N[_W]``: keys ``conv, bn,
blocks.{i}.conv1/bn1/conv2/bn2, blocks.{i}.shortcut.{0,1}, fc`` with a global block
index across stages, widths W/2W/4W and 1×1 conv + BN shortcuts where a block
changes shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    Normalize,
    PostActBasicBlock,
    conv1x1,
    conv3x3,
    global_avg_pool,
    init_weights,
    resnet_stages,
)


def blocks_per_stage(depth: int) -> int:
    if depth <= 2 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6k+2 (20, 32, 44, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::2, ::2]`` then ``pad`` zero channels either side."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class ShortcutBlock(PostActBasicBlock):
    """Basic block whose residual path is the module ``shortcut`` (keyless when identity)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: nn.Module):
        super().__init__(cin, cout, stride)
        self.shortcut = shortcut

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


def block_a(cin: int, cout: int, stride: int) -> ShortcutBlock:
    """Option A: a parameter-free zero-pad shortcut where the shape changes."""
    changes = stride != 1 or cin != cout
    return ShortcutBlock(
        cin, cout, stride, ZeroPadShortcut(cout // 4) if changes else nn.Sequential()
    )


def block_b(cin: int, cout: int, stride: int) -> ShortcutBlock:
    """Option B: 1×1 conv + BN (``shortcut.0``/``shortcut.1``) where the shape changes."""
    if stride != 1 or cin != cout:
        return ShortcutBlock(
            cin, cout, stride, nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
        )
    return ShortcutBlock(cin, cout, stride, nn.Sequential())


class ResNetS(nn.Module):
    """Structure-LTH ``res{depth}s``."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = blocks_per_stage(depth)
        self.normalize = Normalize()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        for i, stage in enumerate(resnet_stages(block_a, 16, (16, 32, 64), n)):
            self.add_module(f"layer{i + 1}", stage)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Structure-LTH's res20s/res56s never apply self.normalize: inputs are raw [0, 1].
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(global_avg_pool(out))


class OpenLTHResNet(nn.Module):
    """open_lth ``cifar_resnet_{depth}[_{width}]``."""

    def __init__(self, depth: int, width: int = 16, num_classes: int = 10):
        super().__init__()
        n = blocks_per_stage(depth)
        self.conv = conv3x3(3, width)
        self.bn = nn.BatchNorm2d(width)
        widths = [width * 2**stage for stage in range(3)]
        # open_lth numbers blocks across stages: one trunk, not one Sequential per stage
        stages = resnet_stages(block_b, width, widths, n)
        self.blocks = nn.Sequential(*(block for stage in stages for block in stage))
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.blocks(out)
        return self.fc(global_avg_pool(out))
