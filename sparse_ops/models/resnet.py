"""torchvision-style ResNets (BasicBlock / Bottleneck v1.5) with torchvision key names.

One class covers three naming/stem conventions:

* ``resnet{18,26,34,50,101,152}`` — ImageNet stem (7×7/2 conv, 3×3/2 max-pool); keys
  exactly torchvision's (``conv1, bn1, layer{k}.{j}..., layer{k}.0.downsample.{0,1},
  fc``). ``resnet26`` is E-LTH's [2, 3, 4, 3] BasicBlock network.
* ``res18`` / ``res50`` — Structure-LTH's CIFAR variants: 3×3/1 stem, no max-pool, and a
  ``normalize`` module applied first in ``forward``.
* ``imagenet_resnet_{D}[_{W}]`` — open_lth's wrapper: the same network stored as
  ``self.model`` (every key prefixed ``model.``), stage widths W/2W/4W/8W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, PostActBasicBlock, conv1x1, conv3x3, init_weights


class BasicBlock(PostActBasicBlock):
    """torchvision's BasicBlock: optional ``downsample`` (1×1 conv + BN) on the residual."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__(cin, planes, stride)
        self.downsample = downsample

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (carries the stride, "v1.5") → 1×1 expanding by 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


# depth → (block, blocks per stage)
LAYOUTS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    26: (BasicBlock, (2, 3, 4, 3)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),  # open_lth's imagenet_resnet_200
}


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int,
        num_classes: int = 1000,
        *,
        stem: str = "imagenet",
        width: int = 64,
        normalize: bool = False,
    ):
        super().__init__()
        if depth not in LAYOUTS:
            raise ValueError(f"ResNet depth must be one of {sorted(LAYOUTS)}, got {depth}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        block, counts = LAYOUTS[depth]
        self.normalize = Normalize() if normalize else None
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for stage, count in enumerate(counts):
            planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            layers = []
            for j in range(count):
                s = stride if j == 0 else 1
                downsample = None
                if j == 0 and (s != 1 or cin != planes * block.expansion):
                    downsample = nn.Sequential(
                        conv1x1(cin, planes * block.expansion, s),
                        nn.BatchNorm2d(planes * block.expansion),
                    )
                layers.append(block(cin, planes, s, downsample))
                cin = planes * block.expansion
            self.add_module(f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize is not None:
            x = self.normalize(x)
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class OpenLTHImageNetResNet(nn.Module):
    """open_lth ``imagenet_resnet_{depth}[_{width}]``: a ResNet stored as ``self.model``."""

    def __init__(self, depth: int, width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.model = ResNet(depth, num_classes, stem="imagenet", width=width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
