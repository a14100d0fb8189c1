"""Built-in architectures whose parameter names equal their origin code's.

``create(name, num_classes=10)`` builds one; ``names()`` lists the canonical names;
``info(name)`` says where a name comes from. Besides the canonical names, the
registry accepts the depth/width patterns the origin repositories accept:

=========================  ===============  ===========================================
pattern                    origin           example
=========================  ===============  ===========================================
``res{N}s``                Structure-LTH    ``res20s``, ``res56s`` (N = 6k+2)
``cifar_resnet_{N}[_{W}]``  open_lth         ``cifar_resnet_20``, ``cifar_resnet_14_128``
``cifar_vgg_{D}[_{W}]``     open_lth/E-LTH   ``cifar_vgg_16`` (D in 11, 13, 16, 19)
``imagenet_resnet_{D}[_{W}]`` open_lth/E-LTH ``imagenet_resnet_50`` (keys under ``model.``)
``resnet{D}``              torchvision      ``resnet18`` ... ``resnet152``, E-LTH's ``resnet26``
=========================  ===============  ===========================================

Building on the ``meta`` device (``with torch.device("meta"): create(...)``) is free
and is how shapes and parameter counts are looked up without allocating weights.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnknownArchitectureError
from .cifar_resnet import OpenLTHResNet, ResNetS
from .mobilenet import MobileNetV1
from .resnet import LAYOUTS, OpenLTHImageNetResNet, ResNet
from .vgg import PLANS, OpenLTHVGG, StructureLTHVGG
from .wrn import WRN32

__all__ = [
    "ArchInfo",
    "create",
    "info",
    "is_known",
    "names",
    "parameter_count",
    "shape_model",
    "state_shapes",
]


@dataclass(frozen=True)
class ArchInfo:
    name: str
    origin: str  # code whose key names the model reproduces
    family: str  # architecture family (same family ⇒ elastic transforms may apply)
    input_size: tuple[int, int, int]  # (C, H, W) the network is built for
    description: str
    build: Callable[[int], nn.Module]


CIFAR = (3, 32, 32)
IMAGENET = (3, 224, 224)


@dataclass(frozen=True)
class _Pattern:
    """A family of names with a depth (and optional width) in them."""

    regex: re.Pattern
    depths: Callable[[int], bool]
    default_width: int
    origin: str
    family: str
    input_size: tuple[int, int, int]
    describe: Callable[[int, int], str]
    build: Callable[[int, int, int], nn.Module]  # (depth, width, num_classes)

    def match(self, name: str) -> ArchInfo | None:
        m = self.regex.fullmatch(name)
        if not m or not self.depths(int(m[1])):
            return None
        depth = int(m[1])
        width = int(m[2]) if m.lastindex and m.lastindex >= 2 and m[2] else self.default_width
        if width <= 0:
            return None
        return ArchInfo(
            name,
            self.origin,
            self.family,
            self.input_size,
            self.describe(depth, width),
            lambda nc: self.build(depth, width, nc),
        )


def _cifar_depth(d: int) -> bool:
    return d > 2 and (d - 2) % 6 == 0


_PATTERNS = [
    _Pattern(
        re.compile(r"res(\d+)s"),
        _cifar_depth,
        16,
        "Structure-LTH",
        "cifar_resnet_a",
        CIFAR,
        lambda d, w: f"ResNet-{d} for CIFAR, option-A shortcuts, widths 16/32/64",
        lambda d, w, nc: ResNetS(d, nc),
    ),
    _Pattern(
        re.compile(r"cifar_resnet_(\d+)(?:_(\d+))?"),
        _cifar_depth,
        16,
        "open_lth",
        "cifar_resnet_b",
        CIFAR,
        lambda d, w: f"ResNet-{d} for CIFAR, 1×1 conv shortcuts, widths {w}/{2 * w}/{4 * w}",
        lambda d, w, nc: OpenLTHResNet(d, w, nc),
    ),
    _Pattern(
        re.compile(r"cifar_vgg_(\d+)(?:_(\d+))?"),
        lambda d: d in PLANS,
        64,
        "open_lth",
        "cifar_vgg",
        CIFAR,
        lambda d, w: f"VGG-{d} with BN for CIFAR, widths {w}..{8 * w}, keys layers.{{i}}",
        lambda d, w, nc: OpenLTHVGG(d, w, nc),
    ),
    _Pattern(
        re.compile(r"imagenet_resnet_(\d+)(?:_(\d+))?"),
        lambda d: d in LAYOUTS,
        64,
        "open_lth",
        "imagenet_resnet",
        IMAGENET,
        lambda d, w: f"ImageNet ResNet-{d}, first width {w}, torchvision keys under 'model.'",
        lambda d, w, nc: OpenLTHImageNetResNet(d, w, nc),
    ),
    _Pattern(
        re.compile(r"resnet(\d+)"),
        lambda d: d in LAYOUTS,
        64,
        "torchvision",
        "imagenet_resnet",
        IMAGENET,
        lambda d, w: f"ImageNet ResNet-{d} with torchvision's key names",
        lambda d, w, nc: ResNet(d, nc),
    ),
]

_FIXED: dict[str, ArchInfo] = {
    a.name: a
    for a in [
        ArchInfo(
            "res18",
            "Structure-LTH",
            "cifar_resnet_tv",
            CIFAR,
            "ResNet-18 for CIFAR (3×3 stem, no max-pool), normalize applied",
            lambda nc: ResNet(18, nc, stem="cifar", normalize=True),
        ),
        ArchInfo(
            "res50",
            "Structure-LTH",
            "cifar_resnet_tv",
            CIFAR,
            "ResNet-50 for CIFAR (3×3 stem, no max-pool), normalize applied",
            lambda nc: ResNet(50, nc, stem="cifar", normalize=True),
        ),
        ArchInfo(
            "vgg16_bn",
            "Structure-LTH",
            "structure_lth_vgg",
            CIFAR,
            "VGG-16 with BN for CIFAR, keys features.{i}, classifier Linear(512)",
            lambda nc: StructureLTHVGG(16, nc),
        ),
        ArchInfo(
            "wrn32",
            "Structure-LTH",
            "wrn",
            CIFAR,
            "WRN-32-2: GraSP's post-activation ResNet-32 at widths 32/64/128",
            lambda nc: WRN32(nc),
        ),
        ArchInfo(
            "mobilenet",
            "Structure-LTH",
            "mobilenet_v1",
            CIFAR,
            "MobileNet-v1 for CIFAR: 13 depthwise-separable blocks to 1024",
            lambda nc: MobileNetV1(nc),
        ),
    ]
}

_CANONICAL = [
    "res20s",
    "res32s",
    "res44s",
    "res56s",
    "res110s",
    "res18",
    "res50",
    "vgg16_bn",
    "wrn32",
    "mobilenet",
    "cifar_resnet_20",
    "cifar_resnet_32",
    "cifar_resnet_44",
    "cifar_resnet_56",
    "cifar_resnet_110",
    "cifar_vgg_11",
    "cifar_vgg_13",
    "cifar_vgg_16",
    "cifar_vgg_19",
    "imagenet_resnet_18",
    "imagenet_resnet_26",
    "imagenet_resnet_34",
    "imagenet_resnet_50",
    "resnet18",
    "resnet26",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]

PATTERN_HELP = (
    "res{N}s, cifar_resnet_{N}[_{W}] (N = 6k+2), cifar_vgg_{11,13,16,19}[_{W}], "
    "imagenet_resnet_{18,26,34,50,101,152,200}[_{W}], resnet{18,26,34,50,101,152,200}"
)


def names() -> list[str]:
    """Canonical architecture names (patterns accept more; see the module docstring)."""
    return list(_CANONICAL)


def info(name: str) -> ArchInfo:
    """Describe architecture ``name``; raises :class:`UnknownArchitectureError`."""
    if not isinstance(name, str):
        raise UnknownArchitectureError(f"architecture name must be a string, got {name!r}")
    if name in _FIXED:
        return _FIXED[name]
    for pattern in _PATTERNS:
        found = pattern.match(name)
        if found is not None:
            return found
    # Same depth first ("resnet20" → res20s, cifar_resnet_20), then spelling neighbours.
    depth = re.findall(r"\d+", name)[:1]
    same_depth = [c for c in _CANONICAL if depth and re.findall(r"\d+", c)[:1] == depth]
    spelled = difflib.get_close_matches(name, _CANONICAL, n=3, cutoff=0.6)
    close = list(dict.fromkeys(same_depth + spelled))[:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise UnknownArchitectureError(
        f"unknown architecture {name!r}{hint} (known: {', '.join(_CANONICAL)}; "
        f"patterns: {PATTERN_HELP})"
    )


def is_known(name: str) -> bool:
    """True when ``name`` is a canonical name or matches a registered pattern."""
    try:
        info(name)
    except UnknownArchitectureError:
        return False
    return True


def create(name: str, num_classes: int = 10) -> nn.Module:
    """Build architecture ``name`` with a ``num_classes``-way classifier."""
    arch = info(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return arch.build(num_classes)


@functools.lru_cache(maxsize=64)
def shape_model(name: str, num_classes: int = 10) -> nn.Module:
    """Architecture ``name`` built on the meta device: shapes only, no memory, cached.

    Shared, so treat it as read-only.
    """
    with torch.device("meta"):
        return create(name, num_classes)


def state_shapes(name: str, num_classes: int = 10) -> dict[str, tuple[int, ...]]:
    """``{state_dict key: shape}`` of architecture ``name``."""
    return {k: tuple(v.shape) for k, v in shape_model(name, num_classes).state_dict().items()}


def parameter_count(name: str, num_classes: int = 10) -> int:
    """Number of trainable parameters (no buffers)."""
    return sum(p.numel() for p in shape_model(name, num_classes).parameters())
