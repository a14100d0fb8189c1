"""CIFAR VGGs (3×3 convs with bias, BN, ReLU; four 2×2 max-pools; one Linear head).

``StructureLTHVGG`` — Structure-LTH's ``vgg16_bn``: ``features.{i}`` (conv, BN, ReLU,
MaxPool each take an index, so convs sit at 0, 3, 7, 10, ...), global average pool,
``classifier`` = Linear(512, classes), and a ``normalize`` module applied first.

``OpenLTHVGG`` — open_lth's ``cifar_vgg_{D}[_{W}]``: ``layers.{i}.conv`` /
``layers.{i}.bn`` (a max-pool takes an index but has no keys), 2×2 average pool,
``fc``. The width suffix (E-LTH) scales the plan's 64/128/256/512 to W/2W/4W/8W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize, conv3x3, init_weights

POOL = "M"

# Plans as written for VGG-11/13/16/19 ("configuration A/B/D/E") without the final pool:
# CIFAR's 32×32 input is 2×2 after four pools.
PLANS: dict[int, list[int | str]] = {
    11: [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    13: [64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    16: [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
    19: [
        64,
        64,
        POOL,
        128,
        128,
        POOL,
        256,
        256,
        256,
        256,
        POOL,
        512,
        512,
        512,
        512,
        POOL,
        512,
        512,
        512,
        512,
    ],
}


def plan(depth: int, width: int = 64) -> list[int | str]:
    if depth not in PLANS:
        raise ValueError(f"VGG depth must be one of {sorted(PLANS)}, got {depth}")
    return [v if v == POOL else v * width // 64 for v in PLANS[depth]]


class StructureLTHVGG(nn.Module):
    def __init__(self, depth: int = 16, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in plan(depth):
            if v == POOL:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [conv3x3(cin, v, bias=True), nn.BatchNorm2d(v)]
                layers.append(nn.ReLU(inplace=True))
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        # Registered last, as in the origin code, so state_dict order matches too.
        self.normalize = Normalize()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv3x3(cin, cout, bias=True)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class OpenLTHVGG(nn.Module):
    def __init__(self, depth: int, width: int = 64, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in plan(depth, width):
            if v == POOL:
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(ConvBN(cin, v))
                cin = v
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.layers(x), 2)
        return self.fc(torch.flatten(x, 1))
