"""A hand-written corpus of small CNN topologies for the converter, and their tickets.

Each :class:`Case` builds a small network (5–24 channels, odd counts, inputs like
3×11×11) whose topology is one the converter must handle: pre-activation residual
blocks, BatchNorm after an add, squeeze-excitation gates, concatenation, grouped and
depthwise convs, channel shuffle, channel LayerNorm through permutes, average-pool and
zero-pad shortcuts, fully pruned convs and stages, channel slicing and chunking, scalar
ops. :func:`make_ticket` gives it a ticket of one kind (``channel``, ``group``,
``unstructured``), plus the case's own fixed masks (all-zero convs for layer collapse).

Used by ``tests/test_convert_topology.py``; not a test module itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparse_ops import Ticket, imp
from sparse_ops.masks import from_gemm_view

# ---------------------------------------------------------------- building blocks


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics: BatchNorm running stats and affine parameters, LayerNorm
    affine parameters and layer-scale vectors random, so folded biases (and the constants
    pruned channels output) are not zero. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
        for name, p in model.named_parameters():
            if name.endswith("gamma") or name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


# ---------------------------------------------------------------- the corpus


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN → ReLU → conv, twice; the
    projection shortcut reads the pre-activated input (pre-act ResNet)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 13, 3, 1, 1, bias=False)
        self.layer1 = PreActBlock(13, 13)
        self.layer2 = PreActBlock(13, 21, stride=2)
        self.bn = nn.BatchNorm2d(21)
        self.fc = nn.Linear(21, 10)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class WideBasic(nn.Module):
    """WRN block (Zagoruyko & Komodakis): BN → ReLU → conv → BN → ReLU → dropout → conv,
    shortcut a 1×1 conv of the raw input when the width changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.dropout = nn.Dropout(0.3)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride))

    def forward(self, x):
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 7, 3, 1, 1)
        self.layer1 = nn.Sequential(WideBasic(7, 11, 1), WideBasic(11, 11, 1))
        self.layer2 = nn.Sequential(WideBasic(11, 19, 2))
        self.bn = nn.BatchNorm2d(19)
        self.fc = nn.Linear(19, 10)

    def forward(self, x):
        out = self.layer2(self.layer1(self.conv1(x)))
        out = F.relu(self.bn(out))
        return self.fc(F.avg_pool2d(out, 6).view(out.size(0), -1))


class ConvReluBN(nn.Module):
    """conv → ReLU → BN (BN after the activation, not foldable): a BN reading a tensor
    whose pruned channels are constants."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 13, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(13)
        self.conv2 = nn.Conv2d(13, 11, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(11)
        self.fc = nn.Linear(11, 10)

    def forward(self, x):
        x = self.bn1(F.relu(self.conv1(x)))
        x = self.bn2(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BNAfterAdd(nn.Module):
    """Residual adds whose sum goes into a BatchNorm (then ReLU), not into a ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 11)
        self.conv1 = conv_bn(11, 11)
        self.bn_add1 = nn.BatchNorm2d(11)
        self.conv2 = conv_bn(11, 11)
        self.bn_add2 = nn.BatchNorm2d(11)
        self.conv3 = conv_bn(11, 7, stride=2)
        self.fc = nn.Linear(7, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn_add1(self.conv1(x) + x))
        x = self.bn_add2(x + self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, r: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(gate))))
        return x * gate


class SENet(nn.Module):
    """SE-ResNet block: conv-BN-ReLU, conv-BN, x · gate, + shortcut, ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.conv1 = conv_bn(12, 12)
        self.conv2 = conv_bn(12, 12)
        self.se = SqueezeExcite(12, 5)
        self.conv3 = conv_bn(12, 17, stride=2)
        self.se2 = SqueezeExcite(17, 5)
        self.fc = nn.Linear(17, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.se(self.conv2(F.relu(self.conv1(x))))
        x = F.relu(out + x)
        x = self.se2(F.relu(self.conv3(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(F.relu(self.norm1(x)))
        return self.conv2(F.relu(self.norm2(x)))


class DenseNet(nn.Module):
    """DenseNet-BC: pre-activation layers reading the concatenation of all before them."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.layer1 = DenseLayer(8, 5)
        self.layer2 = DenseLayer(13, 5)
        self.norm_t = nn.BatchNorm2d(18)
        self.conv_t = nn.Conv2d(18, 9, 1, bias=False)
        self.pool_t = nn.AvgPool2d(2, 2)
        self.layer3 = DenseLayer(9, 5)
        self.norm5 = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 10)

    def forward(self, x):
        features = [self.conv0(x)]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        x = self.pool_t(self.conv_t(F.relu(self.norm_t(torch.cat(features, 1)))))
        features = [x, self.layer3([x])]
        x = F.relu(self.norm5(torch.cat(features, 1)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


class Inception(nn.Module):
    """GoogLeNet-style branches (1×1; 1×1 → 3×3; max pool → 1×1; padded avg pool → 1×1)
    concatenated, then a 3×3 conv and a second concatenation with the block input."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 9)
        self.b1 = conv_bn(9, 5, 1)
        self.b2a = conv_bn(9, 4, 1)
        self.b2b = conv_bn(4, 7)
        self.b3 = conv_bn(9, 3, 1)
        self.b4 = conv_bn(9, 6, 1)
        self.mix = conv_bn(21, 11, stride=2)
        self.fc = nn.Linear(11 + 9, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        b1 = F.relu(self.b1(x))
        b2 = F.relu(self.b2b(F.relu(self.b2a(x))))
        b3 = F.relu(self.b3(F.max_pool2d(x, 3, 1, 1)))
        b4 = F.relu(self.b4(F.avg_pool2d(x, 3, 1, 1)))
        y = torch.cat([b1, b2, b3, b4], dim=1)
        y = F.relu(self.mix(y))
        pooled = torch.cat([F.adaptive_avg_pool2d(y, 1), F.adaptive_max_pool2d(x, 1)], 1)
        return self.fc(pooled.flatten(1))


class GroupedConvNet(nn.Module):
    """Grouped 3×3 convs (ResNeXt-like) between dense 1×1 convs, with a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.reduce = conv_bn(12, 15, 1)
        self.grouped = conv_bn(15, 15, 3, groups=3)
        self.expand = conv_bn(15, 12, 1)
        self.grouped2 = conv_bn(12, 20, 3, stride=2, groups=4)
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = F.relu(self.grouped(F.relu(self.reduce(x))))
        x = F.relu(self.expand(out) + x)
        x = F.relu(self.grouped2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    """Depthwise convs: inverted residuals (expand 1×1 → depthwise 3×3 → project 1×1)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8), nn.ReLU6())
        self.block1 = InvertedResidual(8, 8, 1, 3)
        self.block2 = InvertedResidual(8, 13, 2, 3)
        self.block3 = InvertedResidual(13, 13, 1, 2)
        self.fc = nn.Linear(13, 10)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (chunk) or two strided branches, concat, channel shuffle."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        half = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1, bias=False),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
        inner = cin if stride > 1 else half
        self.branch2 = nn.Sequential(
            nn.Conv2d(inner, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 10), nn.ReLU())
        self.stage = nn.Sequential(ShuffleUnit(10, 10, 1), ShuffleUnit(10, 14, 2))
        self.conv5 = nn.Sequential(*conv_bn(14, 17, 1), nn.ReLU())
        self.fc = nn.Linear(17, 10)

    def forward(self, x):
        x = self.conv5(self.stage(self.stem(x)))
        return self.fc(x.mean([2, 3]))


class ShuffleReshape(nn.Module):
    """Channel shuffle written with reshape/permute and literal sizes."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 12)
        self.conv2 = conv_bn(12, 12, 1)
        self.conv3 = conv_bn(12, 9, 3, stride=2)
        self.fc = nn.Linear(9, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        n, _, h, w = x.shape
        x = x.reshape(n, 3, 4, h, w).permute(0, 2, 1, 3, 4).reshape(n, 12, h, w)
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: LayerNorm over channels through permutes, inside the
    module's own forward (fx traces into it: it is not a torch.nn leaf)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerNormChannelsFirst(nn.Module):
    """The ConvNeXt repository's ``data_format="channels_first"`` LayerNorm: statistics
    over dim 1 written out."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNeXtBlock(nn.Module):
    """The ConvNeXt repository's block: depthwise conv → permute → LayerNorm → Linear →
    GELU → Linear → gamma · x → permute back, + input."""

    def __init__(self, c: int):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 3 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(3 * c, c)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        y = self.dwconv(x)
        y = y.permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = self.gamma * y
        return x + y.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's CNBlock: the same through nn.Sequential with torch.permute modules and
    a (C, 1, 1) layer scale applied after permuting back."""

    def __init__(self, c: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(c, eps=1e-6),
            nn.Linear(c, 3 * c),
            nn.GELU(),
            nn.Linear(3 * c, c),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x):
        return self.layer_scale * self.block(x) + x


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class ConvNeXt(nn.Module):
    """Patchify stem (conv + LayerNorm2d), ConvNeXt blocks, a downsampling LayerNorm2d +
    2×2 stride-2 conv, head LayerNorm + Linear on the pooled features. ``torchvision``
    picks CNBlock and LayerNorm2d, else the original repository's block and its
    channels-first LayerNorm in the downsampling layer."""

    def __init__(self, torchvision_style: bool):
        super().__init__()
        block = CNBlock if torchvision_style else ConvNeXtBlock
        norm = LayerNorm2d if torchvision_style else LayerNormChannelsFirst
        self.stem = nn.Sequential(nn.Conv2d(3, 11, 2, 2), norm(11))
        self.stage1 = block(11)
        self.down = nn.Sequential(norm(11), nn.Conv2d(11, 19, 2, 2))
        self.stage2 = nn.Sequential(block(19), block(19))
        self.head_norm = nn.LayerNorm(19)
        self.head = nn.Linear(19, 10)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.head_norm(x.mean([-2, -1])))


class ResNetDBlock(nn.Module):
    """ResNet-D downsampling block: the shortcut is AvgPool2d(2, 2) then a 1×1 conv."""

    def __init__(self, cin: int, cout: int, ceil_mode: bool):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=2)
        self.conv2 = conv_bn(cout, cout)
        self.shortcut = nn.Sequential(
            nn.AvgPool2d(2, 2, ceil_mode=ceil_mode, count_include_pad=False),
            *conv_bn(cin, cout, 1),
        )

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + self.shortcut(x))


class AvgPoolShortcutNet(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.stem = conv_bn(3, 9)
        # an odd input needs ceil_mode so the shortcut meets the strided conv's size
        self.block = ResNetDBlock(9, 15, ceil_mode=size % 2 == 1)
        self.fc = nn.Linear(15, 10)

    def forward(self, x):
        x = self.block(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class OptionABlock(nn.Module):
    """CIFAR ResNet option A: the shortcut subsamples and zero-pads channels (F.pad)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=2)
        self.conv2 = conv_bn(cout, cout)
        self.lo = (cout - cin) // 2
        self.hi = cout - cin - self.lo

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.lo, self.hi))
        return F.relu(out + shortcut)


class OptionANet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 7)
        self.conv_a = conv_bn(7, 7)
        self.block = OptionABlock(7, 12)  # pads 2 before, 3 after
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv_a(x) + x)
        x = self.block(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class PlainCollapse(nn.Module):
    """conv-BN-ReLU chains through max pooling and average pooling into the classifier;
    the collapse cases prune some of these convs entirely."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 9)
        self.conv2 = conv_bn(9, 13)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.conv3 = conv_bn(13, 7)
        self.fc = nn.Linear(7, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, stride=stride)
        self.conv2 = conv_bn(cout, cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = conv_bn(cin, cout, 1, stride)

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class ResidualCollapse(nn.Module):
    """Two stages of post-activation residual blocks (projection shortcut in the second),
    max pooling between them."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 9)
        self.layer1 = nn.Sequential(BasicBlock(9, 9, 1), BasicBlock(9, 9, 1))
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.layer2 = BasicBlock(9, 14, 2)
        self.fc = nn.Linear(14, 10)

    def forward(self, x):
        x = self.layer1(F.relu(self.stem(x)))
        x = self.layer2(self.pool(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlattenHead(nn.Module):
    """conv → BN (pruned channels are constants) straight into a Linear through flatten:
    over the whole [C, H, W] map, and over a pooled [C, 1, 1] map with nn.Flatten."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 9)
        self.conv2 = conv_bn(9, 7, stride=2)
        self.fc_map = nn.Linear(7 * 6 * 6, 10)
        self.conv3 = conv_bn(9, 11, stride=2)
        self.flatten = nn.Flatten()
        self.fc_pool = nn.Linear(11, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        a = self.fc_map(torch.flatten(self.conv2(x), 1))
        b = self.fc_pool(self.flatten(F.adaptive_avg_pool2d(self.conv3(x), 1)))
        return a + b


class ChannelSlice(nn.Module):
    """Channel slicing: GhostNet's ``cat([primary, cheap])[:, :out]`` and a split of one
    activation into ``x[:, :k]`` and ``x[:, k:]`` read by two convs."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.primary = conv_bn(12, 6, 1)
        self.cheap = conv_bn(6, 6, 3, groups=6)
        self.conv_a = conv_bn(5, 9)
        self.conv_b = conv_bn(6, 9)
        self.fc = nn.Linear(9, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        p = F.relu(self.primary(x))
        ghost = torch.cat([p, F.relu(self.cheap(p))], 1)[:, :11]
        y = F.relu(self.conv_a(ghost[:, :5]) + self.conv_b(ghost[:, 5:]))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Chunked(nn.Module):
    """torch.chunk along channels: a GLU gate (a · sigmoid(b)) and a three-way split."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 14)
        self.conv2 = conv_bn(7, 15)
        self.conv3 = conv_bn(5, 9, stride=2)
        self.fc = nn.Linear(9, 10)

    def forward(self, x):
        a, b = torch.chunk(self.conv1(x), 2, dim=1)
        x = a * torch.sigmoid(b)
        p, q, r = F.relu(self.conv2(x)).chunk(3, 1)
        x = F.relu(self.conv3(p + q * r))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ScalarOps(nn.Module):
    """Scalar arithmetic on activations: x · 0.5, x + 1, 2 − x, x / 3, x ** 2."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_bn(3, 11)
        self.conv2 = conv_bn(11, 13)
        self.conv3 = conv_bn(13, 7, stride=2)
        self.fc = nn.Linear(7, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x)) * 0.5 + 1
        x = 2 - F.relu(self.conv2(x))
        x = self.conv3(x / 3) ** 2
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ---------------------------------------------------------------- cases


def zero_masks(*names: str) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """Fixed masks: every weight of the named layers pruned."""

    def masks(model: nn.Module) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        return {f"{n}.weight": torch.zeros_like(modules[n].weight, dtype=torch.bool) for n in names}

    return masks


def all_zero(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{n}.weight": torch.zeros_like(m.weight, dtype=torch.bool)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_size: tuple[int, int, int] = (3, 11, 11)
    # masks every ticket of the case carries, over the kind's random ones
    fixed: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    # layers left unpruned (the classifier by default)
    unpruned: tuple[str, ...] = ("fc", "head")
    # whether save_converted should write it: every op in the graph is on the
    # serializer's allowlist (sparse_ops/convert/rules/allowlists.py). False: it should refuse
    # with a SaveError naming the op.
    saves: bool = True


CASES = [
    Case("preact_resnet", PreActResNet),
    Case("wide_resnet", WideResNet),
    Case("conv_relu_bn", ConvReluBN),
    Case("bn_after_add", BNAfterAdd),
    Case("squeeze_excite", SENet),
    Case("densenet_cat", DenseNet),
    Case("inception_cat", Inception),
    Case("grouped_conv", GroupedConvNet),
    Case("depthwise_inverted_residual", MobileNetV2ish),
    Case("shuffle_chunk_view_transpose", ShuffleNet),  # chunk, transpose
    Case("shuffle_reshape_permute", ShuffleReshape),  # permute
    Case("convnext_original", lambda: ConvNeXt(False), (3, 12, 12)),
    Case("convnext_torchvision", lambda: ConvNeXt(True), (3, 12, 12)),
    Case("avgpool_shortcut_even", lambda: AvgPoolShortcutNet(12), (3, 12, 12)),
    Case("avgpool_shortcut_odd_ceil", lambda: AvgPoolShortcutNet(11)),
    Case("option_a_pad_shortcut", OptionANet),
    Case("collapse_conv_before_pool", PlainCollapse, fixed=zero_masks("conv2.0")),
    Case("collapse_conv_after_pool", PlainCollapse, fixed=zero_masks("conv3.0")),
    Case(
        "collapse_residual_branch",
        ResidualCollapse,
        fixed=zero_masks("layer1.0.conv2.0", "layer1.1.conv1.0"),
    ),
    Case(
        "collapse_stage", ResidualCollapse, fixed=zero_masks("layer2.conv2.0", "layer2.shortcut.0")
    ),
    Case("collapse_everything", ResidualCollapse, fixed=all_zero),
    Case(
        "collapse_preact_stage", PreActResNet, fixed=zero_masks("layer2.conv2", "layer2.shortcut")
    ),
    Case("pruned_network_input", PlainCollapse, fixed=zero_masks("conv1.0")),
    Case("bn_into_flatten_linear", FlattenHead, unpruned=("fc_map", "fc_pool")),
    Case("channel_slice", ChannelSlice),
    Case("chunk", Chunked),  # torch.chunk, method chunk
    Case("scalar_ops", ScalarOps),  # rsub, pow
]


# ---------------------------------------------------------------- tickets

KINDS = ("channel", "group", "unstructured")


def channel_mask(shape: tuple[int, ...], keep_out: torch.Tensor, keep_in: torch.Tensor):
    """keep_out ⊗ keep_in over every kernel tap: a channel-structured mask."""
    rest = (1,) * (len(shape) - 2)
    return (keep_out.view(-1, 1, *rest) & keep_in.view(1, -1, *rest)).expand(shape).clone()


def channel_pattern(shape: tuple[int, ...]) -> torch.Tensor:
    """Every third output row (1, 4, 7, …) and every fourth input column (2, 6, …)
    pruned: the same channel numbers in every layer, so tensors tied by adds keep
    their pruned channels in common and activations really narrow."""
    keep_out = torch.arange(shape[0]) % 3 != 1
    keep_in = torch.arange(shape[1]) % 4 != 2
    return channel_mask(shape, keep_out, keep_in)


def group_mask(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Dense blocks with disjoint rows over the (ky, kx, c) GEMM columns: two blocks of
    ≥ 4 rows where there are ≥ 10 rows, else one; the remaining rows pruned."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    view = torch.zeros(rows, cols, dtype=torch.bool)
    order = torch.randperm(rows, generator=g)
    blocks = 2 if rows >= 10 else 1
    per = max(4, (rows * 2) // (3 * blocks)) if rows >= 4 else rows
    for b in range(blocks):
        members = order[b * per : (b + 1) * per]
        columns = torch.rand(cols, generator=g) < 0.5
        columns[torch.randint(cols, (1,), generator=g)] = True
        view[members[:, None], torch.nonzero(columns).flatten()[None, :]] = True
    return from_gemm_view(view, shape) if len(shape) == 4 else view


def make_ticket(model: nn.Module, case: Case, kind: str, seed: int = 0) -> Ticket:
    """A ticket of ``kind`` over every conv and linear layer of the case but its
    ``unpruned`` ones, the case's ``fixed`` masks on top, the model's state as weights.

    ``channel``: :func:`channel_pattern` (grouped and depthwise convs too, over their per-group
    input columns); ``group``: :func:`group_mask` for dense convs and linears, ``channel`` for
    grouped ones; ``unstructured``: each weight kept with probability 1/2."""
    assert kind in KINDS, kind
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d | nn.Linear) or name in case.unpruned:
            continue
        shape = tuple(m.weight.shape)
        grouped = isinstance(m, nn.Conv2d) and m.groups > 1
        if kind == "channel" or (kind == "group" and grouped):
            mask = channel_pattern(shape)
        elif kind == "group":
            mask = group_mask(shape, g)
        else:
            mask = torch.rand(shape, generator=g) < 0.5
        masks[f"{name}.weight"] = mask
    if case.fixed is not None:
        masks.update(case.fixed(model))
    return Ticket(masks, imp.capture_state(model))
