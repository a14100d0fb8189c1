"""Structure-LTH's CIFAR MobileNet-v1 (``mobilenet``).

Stem 3×3/1 conv to 32 channels, then 13 depthwise-separable blocks
(``layers.{i}.conv1`` depthwise 3×3 ``[C, 1, 3, 3]``, ``bn1``, ``conv2`` pointwise 1×1,
``bn2``) up to 1024 channels, a fixed 2×2 average pool, and ``linear``. The origin
code attaches ``normalize`` after construction and never applies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, conv3x3, init_weights

# (output channels, stride) of each depthwise-separable block.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)


class SeparableBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cin, 3, stride=stride, padding=1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = conv3x3(3, 32)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        cin = 32
        for cout, stride in BLOCKS:
            blocks.append(SeparableBlock(cin, cout, stride))
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)
        self.normalize = Normalize()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return self.linear(F.avg_pool2d(out, 2).flatten(1))
