"""Converter == masked network on a corpus of topologies, and on random small CNNs.

Issue 15, items 3 and 4. ``tests/topology_cases.py`` holds the corpus: small networks
(5–24 channels, 3×11×11 inputs) in the topologies real tickets come from — pre-activation
residual blocks, BatchNorm after an add, squeeze-excitation, concatenation, grouped and
depthwise convs, channel shuffle, ConvNeXt's LayerNorm through permutes, average-pool and
zero-pad shortcuts, layer collapse (fully pruned convs and stages, a pruned network
input), BatchNorm into a flattened classifier, channel slicing and chunking, scalar ops.

Every case, under every ticket kind and conversion variant below, must convert and then
compute the masked network (``masked_model``) on random fp32 inputs of the size it was
converted for, to ``rtol=1e-5`` with ``atol=1e-5·max|ref|``; where its graph only holds
ops the serializer knows, it must also save and load to the same bits.

The property test draws random small CNNs (convs 1×1/3×3, stride 2, BN/ReLU on or off,
residual blocks with identity / 1×1 / zero-pad / average-pool shortcuts, pre-activation
blocks, depthwise convs, concatenations, pooling, squeeze-excitation gates, BatchNorms of
their own, scalar ops) and random per-layer masks (dense,
channel — random or the same channel numbers in every layer —, group, unstructured,
empty), converted in a random mode: derandomized, so CI
sees the same examples every run. Shrinking is off by default (a failing example is
printed as drawn); ``SPARSE_OPS_SHRINK=1`` turns it on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from topology_cases import (
    CASES,
    Case,
    channel_mask,
    channel_pattern,
    group_mask,
    make_ticket,
    randomize,
)
from torch import nn

from sparse_ops import Ticket, imp, ops
from sparse_ops.convert import (
    ConvertError,
    SaveError,
    convert,
    load_converted,
    masked_model,
    save_converted,
)
from sparse_ops.masks import mask_stats
from sparse_ops.structure import RegroupConfig

# Narrow layers (3–24 rows): the default RegroupConfig drops parts under 16 rows.
REGROUP = RegroupConfig(parts=1, min_rows=1)


@dataclass(frozen=True)
class Variant:
    """A ticket kind and the convert() options it is converted with."""

    kind: str  # make_ticket's: channel, group, unstructured
    mode: str
    on_unstructured: str
    device: str | None  # None: the default (GPU) cost model, channel_align=8

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.mode}-{self.on_unstructured}-{self.device or 'gpucost'}"


VARIANTS = [
    Variant("channel", "channel", "error", "cpu"),
    Variant("channel", "auto", "error", None),
    Variant("channel", "group", "error", None),
    Variant("group", "group", "dense", None),
    Variant("unstructured", "auto", "regroup", None),
    Variant("unstructured", "channel", "dense", "cpu"),
]
SAVE_VARIANTS = [VARIANTS[1], VARIANTS[4]]  # channel units (aligned), group + leftover units


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on maps this small a second thread only adds its barriers,
    which on a loaded 2-core machine cost ~10 ms per op (the file ran 4× slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return randomize(case.build(), seed=1)


def _input(size: tuple[int, int, int], seed: int = 2, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def _convert(model: nn.Module, ticket: Ticket, variant: Variant, input_size):
    return convert(
        model,
        ticket,
        mode=variant.mode,
        on_unstructured=variant.on_unstructured,
        device=variant.device,
        input_size=input_size,
        regroup=REGROUP,
        return_report=True,
    )


def assert_exact(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 equality up to rounding: rtol 1e-5, atol 1e-5 of the output's magnitude."""
    atol = 1e-5 * max(float(ref.abs().max()), 1e-30)
    torch.testing.assert_close(got.float().contiguous(), ref, rtol=1e-5, atol=atol)


# ---------------------------------------------------------------- the corpus


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corpus_converts_exactly(case, variant):
    model = _model(case)
    ticket = make_ticket(model, case, variant.kind)
    fast, report = _convert(model, ticket, variant, case.input_size)
    assert report.traced, report.notes.get("fallback")
    x = _input(case.input_size)
    with torch.no_grad():
        expected = masked_model(model, ticket)(x)
        assert_exact(fast(x), expected)


@pytest.mark.parametrize("variant", SAVE_VARIANTS, ids=lambda v: v.id)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_corpus_saves_and_loads(case, variant, tmp_path):
    """Graphs of allowlisted ops save and load to the same bits; the others are refused
    with a SaveError naming the op and its node."""
    model = _model(case)
    fast, _ = _convert(model, make_ticket(model, case, variant.kind), variant, case.input_size)
    path = tmp_path / f"{case.name}.safetensors"
    if not case.saves:
        with pytest.raises(SaveError, match=r"cannot save a call to .* \(node \w+\)"):
            save_converted(fast, path)
        return
    back = load_converted(save_converted(fast, path))
    x = _input(case.input_size, seed=3)
    with torch.no_grad():
        assert torch.equal(fast(x), back(x))


TRITON_CASES = [
    ("preact_resnet", 1),
    ("squeeze_excite", 1),
    ("densenet_cat", 4),
    ("option_a_pad_shortcut", 1),
    ("collapse_stage", 1),
    ("convnext_torchvision", 1),
]


@pytest.mark.parametrize(("name", "variant"), TRITON_CASES, ids=[n for n, _ in TRITON_CASES])
def test_corpus_through_the_triton_kernels(name, variant):
    """The same through the Triton kernels (the interpreter without a GPU): the GPU cost
    model's aligned layouts, channel units and group + leftover units. One image: the
    interpreter is slow."""
    case = next(c for c in CASES if c.name == name)
    variant = VARIANTS[variant]
    model = _model(case)
    ticket = make_ticket(model, case, variant.kind)
    fast, _ = _convert(model, ticket, variant, case.input_size)
    x = _input(case.input_size, batch=1)
    with torch.no_grad():
        with ops.backend("triton"):
            got = fast(x)
        assert_exact(got, masked_model(model, ticket)(x))


def test_corpus_tickets_have_the_structure_they_claim():
    """The corpus exercises what it says: channel tickets classify as channel, group
    tickets as group, unstructured ones as unstructured (bar the case's fixed masks)."""
    want = {"channel": {"channel"}, "group": {"group", "channel"}, "unstructured": {"unstructured"}}
    for case in CASES:
        model = _model(case)
        modules = dict(model.named_modules())
        fixed = set(case.fixed(model)) if case.fixed else set()
        seen_group = False
        for kind in want:
            for name, mask in make_ticket(model, case, kind).masks.items():
                if name in fixed:
                    assert not mask.any(), (case.name, name)
                    continue
                structure = mask_stats(mask).structure
                module = modules[name.removesuffix(".weight")]
                grouped = isinstance(module, nn.Conv2d) and module.groups > 1
                expect = {"channel"} if kind == "group" and grouped else want[kind]
                if kind == "unstructured" and mask.numel() < 8:
                    expect = expect | {"channel", "group", "dense"}
                assert structure in expect, (case.name, kind, name, structure)
                seen_group |= kind == "group" and structure == "group"
        dense_convs = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.Conv2d) and m.groups == 1 and f"{n}.weight" not in fixed
        ]
        assert seen_group or not dense_convs, case.name


def test_regroup_with_the_default_config_on_narrow_layers():
    """on_unstructured='regroup' with the default RegroupConfig (parts='auto') on layers
    narrower than its min_rows (16): exact. (The corpus uses parts=1, where min_rows must
    come down: RegroupConfig(parts=1) refuses layers under 16 rows with a RegroupError.)"""
    case = next(c for c in CASES if c.name == "inception_cat")
    model = _model(case)
    ticket = make_ticket(model, case, "unstructured")
    fast = convert(model, ticket, on_unstructured="regroup", input_size=case.input_size)
    x = _input(case.input_size)
    with torch.no_grad():
        assert_exact(fast(x), masked_model(model, ticket)(x))


# ---------------------------------------------------------------- random networks


class SpecNet(nn.Module):
    """A network read off a spec (a list of tuples, see :func:`networks`); the spec is
    plain Python data, so torch.fx unrolls it."""

    def __init__(self, spec: list[tuple], classes: int = 7):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        width = 3
        for i, (kind, *args) in enumerate(spec):
            p = f"b{i}"
            if kind == "conv":
                out, k, stride, bn, _relu = args
                self.layers[f"{p}_conv"] = nn.Conv2d(width, out, k, stride, k // 2, bias=not bn)
                if bn:
                    self.layers[f"{p}_bn"] = nn.BatchNorm2d(out)
                width = out
            elif kind == "dw":
                (stride,) = args
                self.layers[f"{p}_conv"] = nn.Conv2d(
                    width, width, 3, stride, 1, groups=width, bias=False
                )
                self.layers[f"{p}_bn"] = nn.BatchNorm2d(width)
            elif kind in ("res", "preact"):
                out, stride, shortcut = args
                pre = kind == "preact"
                self.layers[f"{p}_c1"] = nn.Conv2d(width, out, 3, stride, 1, bias=False)
                self.layers[f"{p}_c2"] = nn.Conv2d(out, out, 3, 1, 1, bias=False)
                self.layers[f"{p}_bn1"] = nn.BatchNorm2d(width if pre else out)
                self.layers[f"{p}_bn2"] = nn.BatchNorm2d(out)
                if shortcut in ("conv", "avgpool"):
                    s = stride if shortcut == "conv" else 1
                    self.layers[f"{p}_sc"] = nn.Conv2d(width, out, 1, s, bias=False)
                    if not pre:
                        self.layers[f"{p}_scbn"] = nn.BatchNorm2d(out)
                width = out
            elif kind == "cat":
                a, ka, b, kb, stride, keep_input = args
                self.layers[f"{p}_a"] = nn.Conv2d(width, a, ka, stride, ka // 2, bias=False)
                self.layers[f"{p}_abn"] = nn.BatchNorm2d(a)
                self.layers[f"{p}_b"] = nn.Conv2d(width, b, kb, stride, kb // 2, bias=False)
                self.layers[f"{p}_bbn"] = nn.BatchNorm2d(b)
                width = a + b + (width if keep_input else 0)
            elif kind == "se":
                (squeeze,) = args
                self.layers[f"{p}_fc1"] = nn.Conv2d(width, squeeze, 1)
                self.layers[f"{p}_fc2"] = nn.Conv2d(squeeze, width, 1)
            elif kind == "bn":
                self.layers[f"{p}_bn"] = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        layers = self.layers
        for i, (kind, *args) in enumerate(self.spec):
            p = f"b{i}"
            if kind == "conv":
                x = layers[f"{p}_conv"](x)
                if args[3]:
                    x = layers[f"{p}_bn"](x)
                if args[4]:
                    x = F.relu(x)
            elif kind == "dw":
                x = F.relu(layers[f"{p}_bn"](layers[f"{p}_conv"](x)))
            elif kind in ("res", "preact"):
                out, stride, shortcut = args
                if kind == "preact":
                    act = F.relu(layers[f"{p}_bn1"](x))
                    y = layers[f"{p}_c2"](F.relu(layers[f"{p}_bn2"](layers[f"{p}_c1"](act))))
                    source = act if shortcut == "conv" else x
                else:
                    y = F.relu(layers[f"{p}_bn1"](layers[f"{p}_c1"](x)))
                    y = layers[f"{p}_bn2"](layers[f"{p}_c2"](y))
                    source = x
                if shortcut == "identity":
                    s = x
                elif shortcut == "pad":
                    sub = x[:, :, ::stride, ::stride] if stride > 1 else x
                    extra = out - x.shape[1]
                    s = F.pad(sub, (0, 0, 0, 0, extra // 2, extra - extra // 2))
                else:
                    if shortcut == "avgpool":
                        source = (
                            F.avg_pool2d(source, 2, 2, ceil_mode=True, count_include_pad=False)
                            if stride > 1
                            else source
                        )
                    s = layers[f"{p}_sc"](source)
                    if kind == "res":
                        s = layers[f"{p}_scbn"](s)
                x = y + s if kind == "preact" else F.relu(y + s)
            elif kind == "cat":
                keep_input = args[5]
                a = F.relu(layers[f"{p}_abn"](layers[f"{p}_a"](x)))
                b = F.relu(layers[f"{p}_bbn"](layers[f"{p}_b"](x)))
                x = torch.cat([x, a, b] if keep_input else [a, b], 1)
            elif kind == "pool":
                if args[0] == "max":
                    x = F.max_pool2d(x, 2, 2, ceil_mode=True)
                elif args[0] == "max3":
                    x = F.max_pool2d(x, 3, 2, 1)
                else:
                    x = F.avg_pool2d(x, 2, 2, ceil_mode=True)
            elif kind == "se":
                gate = F.relu(layers[f"{p}_fc1"](F.adaptive_avg_pool2d(x, 1)))
                x = x * torch.sigmoid(layers[f"{p}_fc2"](gate))
            elif kind == "bn":  # a BatchNorm of its own (after an add, a pool, a cat...)
                x = F.relu(layers[f"{p}_bn"](x)) if args[0] else layers[f"{p}_bn"](x)
            elif kind == "scalar":
                x = x * 0.5 + 1
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


BLOCKS = ("conv", "res", "preact", "cat", "pool", "dw", "se", "bn", "scalar")
MASK_KINDS = ("pattern", "channel", "dense", "empty", "group", "unstructured")


@st.composite
def networks(draw):
    """(input size, spec): a stem conv, then 1–4 blocks, spatial size tracked so every
    stride-2 layer and pool has at least 2 pixels to work on."""
    size = draw(st.sampled_from([9, 11]))
    widths = st.integers(3, 14)
    spec = [
        (
            "conv",
            draw(st.integers(4, 14)),
            draw(st.sampled_from([3, 1])),
            1,
            draw(st.booleans()),
            draw(st.booleans()),
        )
    ]
    width, hw = spec[0][1], size
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(BLOCKS))
        stride = draw(st.sampled_from([1, 2])) if hw >= 2 else 1
        if kind == "conv":
            spec.append(
                (
                    "conv",
                    draw(widths),
                    draw(st.sampled_from([3, 1])),
                    stride,
                    draw(st.booleans()),
                    draw(st.booleans()),
                )
            )
            width = spec[-1][1]
        elif kind == "dw":
            spec.append(("dw", stride))
        elif kind in ("res", "preact"):
            options = ["conv", "pad", "avgpool"] + (["identity"] if stride == 1 else [])
            shortcut = draw(st.sampled_from(options))
            if shortcut == "identity":
                out = width
            elif shortcut == "pad":
                out = width + draw(st.integers(0, 6))
            else:
                out = draw(widths)
            spec.append((kind, out, stride, shortcut))
            width = out
        elif kind == "cat":
            a, b = draw(widths), draw(widths)
            keep_input = stride == 1 and draw(st.booleans())
            spec.append(
                (
                    "cat",
                    a,
                    draw(st.sampled_from([1, 3])),
                    b,
                    draw(st.sampled_from([1, 3])),
                    stride,
                    keep_input,
                )
            )
            width = a + b + (width if keep_input else 0)
        elif kind == "pool":
            if hw < 2:
                continue
            spec.append(("pool", draw(st.sampled_from(["max", "avg", "max3"]))))
            stride = 2
        elif kind == "se":
            spec.append(("se", draw(st.integers(2, 6))))
            stride = 1
        elif kind == "bn":
            spec.append(("bn", draw(st.booleans())))
            stride = 1
        elif kind == "scalar":
            spec.append(("scalar",))
            stride = 1
        hw = math.ceil(hw / stride)
    return size, spec


def _random_mask(module: nn.Module, kind: str, g: torch.Generator) -> torch.Tensor | None:
    shape = tuple(module.weight.shape)
    grouped = isinstance(module, nn.Conv2d) and module.groups > 1
    if kind == "dense":
        return None
    if kind == "empty":
        return torch.zeros(shape, dtype=torch.bool)
    if kind == "unstructured":
        return torch.rand(shape, generator=g) < 0.5
    if kind == "group" and not grouped:
        return group_mask(shape, g)
    if kind == "pattern":  # the same channel numbers in every layer: tied tensors narrow
        return channel_pattern(shape)
    keep_out = torch.rand(shape[0], generator=g) < 0.6
    keep_in = torch.rand(shape[1], generator=g) < 0.7
    return channel_mask(shape, keep_out, keep_in)


SHRINK = os.environ.get("SPARSE_OPS_SHRINK") == "1"


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate] + ([Phase.shrink] if SHRINK else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)
@given(
    net=networks(),
    kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=6, max_size=6),
    mask_seed=st.integers(0, 2**16),
    mode=st.sampled_from(["auto", "channel", "group"]),
    on_unstructured=st.sampled_from(["dense", "regroup"]),
    device=st.sampled_from(["cpu", None]),
)
# Failures the generator found (shrunk), kept as explicit examples: a pre-activation BN
# reading a narrowed stem output; a fully pruned stem whose pool has no channel left.
@example(
    net=(9, [("conv", 4, 3, 1, False, False), ("preact", 4, 1, "identity")]),
    kinds=["pattern"] * 6,
    mask_seed=0,
    mode="auto",
    on_unstructured="dense",
    device="cpu",
)
@example(
    net=(9, [("conv", 12, 3, 1, False, False), ("pool", "max3")]),
    kinds=["empty"] + ["channel"] * 5,
    mask_seed=0,
    mode="auto",
    on_unstructured="dense",
    device="cpu",
)
def test_random_networks_convert_exactly(net, kinds, mask_seed, mode, on_unstructured, device):
    size, spec = net
    torch.manual_seed(mask_seed)
    model = randomize(SpecNet(spec), seed=mask_seed)
    g = torch.Generator().manual_seed(mask_seed)
    masks = {}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for i, (name, module) in enumerate(convs):
        mask = _random_mask(module, kinds[i % len(kinds)], g)
        if mask is not None:
            masks[f"{name}.weight"] = mask
    ticket = Ticket(masks, imp.capture_state(model))
    input_size = (3, size, size)
    try:
        fast = convert(
            model,
            ticket,
            mode=mode,
            on_unstructured=on_unstructured,
            device=device,
            input_size=input_size,
            regroup=REGROUP,
        )
    except ConvertError as exc:  # never for these ops: they are all the converter's own
        raise AssertionError(f"refused: {exc}") from exc
    x = _input(input_size, seed=mask_seed + 1)
    with torch.no_grad():
        assert_exact(fast(x), masked_model(model, ticket)(x))
