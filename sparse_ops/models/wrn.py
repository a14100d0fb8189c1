"""Structure-LTH's ``wrn32``: GraSP's ResNet-32 at twice the usual width (32/64/128).

Despite the name this is a *post*-activation ResNet (no dropout, no final BN) with
5 blocks per stage. Key names follow the origin code: the stem BN is ``bn`` (not
``bn1``), a downsampling block holds its 1×1 conv as ``downsample.0`` and that conv's
BN as the block-level ``bn3``, and the classifier is ``linear``. ``normalize`` is
registered last and applied first in ``forward``.
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


class WideBlock(PostActBasicBlock):
    """GraSP's block: a downsampling block adds ``downsample.0`` (1×1 conv) and ``bn3``."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.downsample: nn.Module | None = None
        self.bn3: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(conv1x1(cin, cout, stride))
            self.bn3 = nn.BatchNorm2d(cout)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.bn3(self.downsample(x))


class WRN32(nn.Module):
    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        self.conv1 = conv3x3(3, widths[0])
        self.bn = nn.BatchNorm2d(widths[0])
        for i, stage in enumerate(resnet_stages(WideBlock, widths[0], widths, 5)):
            self.add_module(f"layer{i + 1}", stage)
        self.linear = nn.Linear(widths[-1], num_classes)
        self.normalize = Normalize()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv1(self.normalize(x))))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(global_avg_pool(out))
