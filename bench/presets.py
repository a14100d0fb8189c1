"""Benchmark presets: which networks and layers, at which inputs and sparsities.

``tiny``      seconds on a CPU, for CI: ``res20s`` on 16×16 inputs and one conv layer.
``cifar``     end to end at batch 64 on 32×32 inputs: ``res56s``, ``res18``, ``vgg16_bn``.
``imagenet``  end to end at 224×224, batch 1 and 64: torchvision-keyed ``resnet18``,
              ``resnet50``.
``paper``     Structure-LTH's measurement setup (REFERENCE.md): every distinct 3×3 conv
              of ResNet-18 and VGG-16 on a batch of 64 inputs of 127×127, of ResNet-50
              on 64×64, each with its own channel counts and stride (the paper quotes the
              input as 64×64×127×127, i.e. the 64-channel layers); and end to end at
              batch 64 on 32×32 like the paper's whole-network numbers.

A *layer* case times one conv alone (no BatchNorm, no activation, as the paper's
per-layer times exclude them); a *model* case the whole network.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from sparse_ops import imp, models


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    batch: int
    input_size: tuple[int, int, int]


@dataclass(frozen=True)
class LayerSpec:
    """Every distinct conv of ``arch`` whose kernel is in ``kernel_sizes``, on ``hw``."""

    arch: str
    batch: int
    hw: int
    kernel_sizes: tuple[int, ...] = (3,)


@dataclass(frozen=True)
class Preset:
    name: str
    models: tuple[ModelSpec, ...]
    layers: tuple[LayerSpec, ...]
    sparsities: tuple[float, ...]
    methods: tuple[str, ...] = ("refill", "regroup", "random")
    warmup: int = 10
    repeats: int = 50
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        models=(ModelSpec("res20s", 4, (3, 16, 16)),),
        layers=(LayerSpec("res20s", 4, 16),),
        sparsities=(0.5,),
        warmup=1,
        repeats=5,
    ),
    "cifar": Preset(
        "cifar",
        models=tuple(ModelSpec(a, 64, (3, 32, 32)) for a in ("res56s", "res18", "vgg16_bn")),
        layers=(),
        sparsities=(0.3, 0.5, 0.7, 0.9),
    ),
    "imagenet": Preset(
        "imagenet",
        models=tuple(
            ModelSpec(a, b, (3, 224, 224)) for a in ("resnet18", "resnet50") for b in (1, 64)
        ),
        layers=(),
        sparsities=(0.5, 0.7, 0.9),
        methods=("refill", "regroup"),
    ),
    "paper": Preset(
        "paper",
        models=tuple(ModelSpec(a, 64, (3, 32, 32)) for a in ("res18", "vgg16_bn")),
        layers=(
            LayerSpec("res18", 64, 127),
            LayerSpec("vgg16_bn", 64, 127),
            LayerSpec("res50", 64, 64),
        ),
        sparsities=(0.36, 0.5, 0.6, 0.7, 0.8),
        methods=("refill", "regroup"),
    ),
}


@dataclass(frozen=True)
class LayerShape:
    source: str  # first layer of the architecture with this shape
    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    padding: int
    count: int  # how many layers of the architecture share it


def distinct_convs(arch: str, kernel_sizes: tuple[int, ...]) -> list[LayerShape]:
    """The distinct (shape, stride, padding) convs IMP prunes in ``arch``, in order."""
    model = models.create(arch)
    prunable = set(imp.prunable(model))
    found: dict[tuple, LayerShape] = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or f"{name}.weight" not in prunable or m.groups != 1:
            continue
        if m.kernel_size[0] not in kernel_sizes:
            continue
        key = (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0])
        if key in found:
            s = found[key]
            found[key] = LayerShape(s.source, *key, count=s.count + 1)
        else:
            found[key] = LayerShape(name, *key, count=1)
    return list(found.values())


def filter_models(preset: Preset, wanted: list[str] | None) -> Iterator[ModelSpec | LayerSpec]:
    """The preset's model and layer specs, restricted to architectures in ``wanted``."""
    for spec in (*preset.models, *preset.layers):
        if wanted is None or spec.arch in wanted:
            yield spec
