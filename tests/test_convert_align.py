"""Channel alignment (docs/CONVERT.md, "Channel alignment"): with ``CostModel.channel_align``
8 (the GPU's, and the default) activation widths are multiples of 8 wherever the tensor has
enough channels, and channel units read / write whole layouts with zero-weight columns / rows
instead of gathers / scatters when those are few; with the CPU's cost model (align 1) the
layouts are the narrowest ones, as before. Every conversion still equals the masked network.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from model_cases import trained_like
from test_convert import TOL, _ticket
from torch import nn

from sparse_ops import Ticket, ops
from sparse_ops.convert import (
    ConvertError,
    CostModel,
    convert,
    load_converted,
    masked_model,
    save_converted,
)
from sparse_ops.convert.cost import MIN_TILE, zero_padding_pays
from sparse_ops.nn import ChannelPrunedConv2d

ALIGN = 8
GPU, CPU = CostModel(), CostModel.for_device("cpu")


def _units(fast) -> dict[str, ChannelPrunedConv2d]:
    return {m.name: m for m in fast.modules() if isinstance(m, ChannelPrunedConv2d)}


def _zero_columns(unit: ChannelPrunedConv2d) -> int:
    return int((unit.weight == 0).all(dim=(0, 1, 2)).sum())


def _zero_rows(unit: ChannelPrunedConv2d) -> int:
    return int((unit.weight == 0).flatten(1).all(1).sum())


def _alignable(width: int, channels: int) -> bool:
    """A layout of ``width`` stored channels could be rounded up within ``channels``."""
    return -(-width // ALIGN) * ALIGN <= channels


# ---------------------------------------------------------------- the rule itself


def test_zero_padding_rule():
    assert MIN_TILE == 32
    assert zero_padding_pays(128, 96, 0.25)  # 32 zero of 128: a quarter
    assert not zero_padding_pays(128, 95, 0.25)  # 33 of 128, and past the last tile of 95
    assert not zero_padding_pays(96, 40, 0.25)  # 56 of 96, past the last tile of 40 (64)
    assert zero_padding_pays(64, 40, 0.25)  # inside the last 32-wide tile of 40
    assert zero_padding_pays(32, 3, 0.0)  # one tile either way
    assert not zero_padding_pays(16, 0, 1.0)  # nothing to compute: no GEMM to pad
    assert not zero_padding_pays(96, 20, 0.0) and zero_padding_pays(96, 20, 1.0)


def test_cost_models_alignment_fields():
    assert (GPU.channel_align, CPU.channel_align) == (8, 1)
    assert CostModel.for_device(None) == GPU and CostModel.for_device("cuda").channel_align == 8
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ConvertError, match="channel_align must be an int ≥ 1"):
            CostModel(channel_align=bad)
    with pytest.raises(ConvertError, match=r"max_zero_rows must lie in \[0, 1\], got 1.5"):
        CostModel(max_zero_rows=1.5)
    with pytest.raises(ConvertError, match=r"max_zero_inputs must lie in \[0, 1\]"):
        CostModel(max_zero_inputs=-0.1)


# ---------------------------------------------------------------- a network with known layouts


class Tiny(nn.Module):
    """Each layer sits in one case of the rule (masks from :func:`_tiny_ticket`):

    ``a``  3 → 64, reads the image (3 channels: cannot be aligned);
    ``b``  residual block on ``a``'s 64 channels, 20 of 64 rows × 20 of 64 inputs: the
           zero rows/columns would be 44 of 64 (past the last 32-wide tile of 20), so it
           gathers and scatters;
    ``c``  64 → 16 keeping 5 rows: its output layout 5 → 8 with 3 constant channels;
    ``d``  reads those 8 (7 with kept weights, two of them constants): no gather, the two
           constants through their weights instead of a bias map;
    ``e``  16 → 12 dense: 12 channels, all varying, cannot be rounded up to 16.
    """

    def __init__(self):
        super().__init__()
        for name, (cin, cout, k) in {
            "a": (3, 64, 3),
            "b": (64, 64, 3),
            "c": (64, 16, 3),
            "d": (16, 16, 3),
            "e": (16, 12, 1),
        }.items():
            setattr(self, name, nn.Conv2d(cin, cout, k, padding=k // 2, bias=False))
            setattr(self, f"bn_{name}", nn.BatchNorm2d(cout))
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        h = torch.relu(self.bn_a(self.a(x)))
        h = torch.relu(self.bn_b(self.b(h)) + h)
        g = torch.relu(self.bn_c(self.c(h)))
        g = torch.relu(self.bn_d(self.d(g)))
        y = torch.relu(self.bn_e(self.e(g)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


C_ROWS = [0, 2, 4, 6, 8]
D_INPUTS = [*C_ROWS, 13, 15]  # 13 and 15 are constant (pruned rows of c)


def _tiny() -> tuple[nn.Module, Ticket]:
    torch.manual_seed(0)
    net = Tiny()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(0.2, 0.5)  # pruned channels: positive constants after ReLU
    b = torch.zeros(64, 64, 3, 3, dtype=torch.bool)
    b[:20, :20] = True
    c = torch.zeros(16, 64, 3, 3, dtype=torch.bool)
    c[C_ROWS] = True
    d = torch.zeros(16, 16, 3, 3, dtype=torch.bool)
    d[:, D_INPUTS] = True
    masks = {"b.weight": b, "c.weight": c, "d.weight": d}
    return net.eval(), Ticket(masks)


def test_known_layouts_with_alignment():
    net, ticket = _tiny()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fast, report = convert(net, ticket, input_size=(3, 8, 8), return_report=True)
    u = _units(fast)
    assert (u["a"].in_channels, u["a"].out_channels, u["a"].in_idx) == (3, 64, None)
    # b: 44 zero columns / rows of 64 are too many → gather 20 inputs, scatter 20 rows.
    assert u["b"].in_idx.tolist() == list(range(20)) and u["b"].out_idx.numel() == 20
    assert u["b"].fill_idx.numel() == 44
    # c: output layout 5 varying + 3 constants = 8; the 3 extra rows are zero-weight GEMM rows.
    assert (u["c"].out_channels, u["c"].out_idx, u["c"].fill_idx) == (8, None, None)
    assert tuple(u["c"].weight.shape) == (8, 3, 3, 64) and _zero_rows(u["c"]) == 3
    # d: reads all 8 stored channels; 13 and 15 (constants d uses) were stored first, so
    # only one stored channel has no weight; the constants need no bias map.
    assert (u["d"].in_channels, u["d"].in_idx) == (8, None)
    assert tuple(u["d"].weight.shape) == (16, 3, 3, 8)
    assert _zero_columns(u["d"]) == 1 and u["d"].const_weight is None
    # e: 12 channels cannot be rounded up to 16 inside a 12-channel tensor.
    assert u["e"].out_channels == 12 and u["e"].out_idx is None
    detail = {r.name: r.detail for r in report.layers if r.kind == "conv"}
    assert detail["c"]["aligned"] and detail["d"]["aligned"]
    assert not detail["b"]["aligned"] and detail["b"]["input_gather"]
    assert detail["b"]["output_scatter"]
    # e's 12 output channels are 48 bytes at fp32 (16-byte rows), 24 at fp16 (not).
    assert detail["e"]["aligned"]
    _, half = convert(net, ticket, dtype=torch.float16, input_size=(3, 8, 8), return_report=True)
    assert not {r.name: r for r in half.layers}["e"].detail["aligned"]
    assert detail["d"]["stored_inputs_with_weights"] == 7
    with torch.no_grad():
        expected = masked_model(net, ticket)(x)
        torch.testing.assert_close(fast(x), expected, **TOL)
        with ops.backend("triton"):  # zero rows and columns through the kernel too
            torch.testing.assert_close(fast(x).contiguous(), expected, **TOL)


def test_known_layouts_without_alignment():
    net, ticket = _tiny()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    fast = convert(net, ticket, input_size=(3, 8, 8), device="cpu")
    u = _units(fast)
    assert u["c"].out_channels == 5 and tuple(u["c"].weight.shape) == (5, 3, 3, 64)
    assert u["d"].in_channels == 5 and u["d"].const_weight.shape[1] == 2  # 13, 15: bias map
    assert not any(_zero_rows(m) or _zero_columns(m) for m in u.values())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(net, ticket)(x), **TOL)


# ---------------------------------------------------------------- built-in architectures

ARCHS = ["res20s", "cifar_resnet_20", "vgg16_bn"]  # option-A shortcuts, 1×1 shortcuts, plain


def _check_rule(fast, report, cost: CostModel) -> None:
    """Every channel unit obeys the alignment rule of ``cost``."""
    detail = {r.name: (r, r.detail) for r in report.layers if "aligned" in r.detail}
    for name, unit in _units(fast).items():
        row, d = detail[name]
        w_in, w_out = unit.in_channels, unit.out_channels
        rows, cols = int(unit.weight.shape[0]), int(unit.weight.shape[3])
        # 2a: widths rounded up wherever the logical tensor has room.
        if _alignable(w_in, row.in_channels):
            assert w_in % ALIGN == 0, (name, w_in, row.in_channels)
        if _alignable(w_out, row.out_channels):
            assert w_out % ALIGN == 0, (name, w_out, row.out_channels)
        # 2c/2d: whole layout read iff the zero columns are few; the weight is then as wide.
        used = d["stored_inputs_with_weights"]
        if d["inputs_used"] < w_in:
            pays = zero_padding_pays(w_in, used, cost.max_zero_inputs)
            assert (unit.in_idx is None) == pays, (name, w_in, used)
        if unit.in_idx is None:
            assert cols == w_in
        # 2b: whole output layout computed iff the zero rows are few.
        if unit.out_idx is None:
            assert rows == w_out and unit.fill_idx is None
            assert zero_padding_pays(w_out, w_out - _zero_rows(unit), cost.max_zero_rows)
        else:
            assert not zero_padding_pays(w_out, rows, cost.max_zero_rows), (name, w_out, rows)
        aligned = unit.in_idx is None and unit.out_idx is None
        assert d["aligned"] == (aligned and w_in % 4 == 0 and w_out % 4 == 0)  # fp32: 4


@pytest.mark.parametrize("arch", ARCHS)
def test_refill_ticket_is_aligned_for_the_gpu(arch):
    model = trained_like(arch)
    ticket = _ticket(model, arch, "refill")
    fast, report = convert(
        model, ticket, mode="channel", input_size=(3, 32, 32), return_report=True
    )
    assert report.channel_align == ALIGN
    _check_rule(fast, report, GPU)
    units = _units(fast)
    # Only the stem (3-channel image) stays unaligned on its input; no unit gathers.
    assert all(u.in_channels % ALIGN == 0 for n, u in units.items() if u.in_channels != 3)
    assert not any(u.in_idx is not None for u in units.values())
    aligned, total = report.alignment
    assert total == len(units) and aligned >= total // 2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_cpu_cost_model_keeps_the_narrowest_layouts(arch):
    model = trained_like(arch)
    ticket = _ticket(model, arch, "refill")
    options = {"mode": "channel", "input_size": (3, 32, 32), "return_report": True}
    cpu, cpu_report = convert(model, ticket, device="cpu", **options)
    gpu, _ = convert(model, ticket, **options)
    widths = {n: (u.in_channels, u.out_channels) for n, u in _units(cpu).items()}
    # The narrowest layout: the varying channels, unaligned (refill tickets give odd widths).
    assert any(w % ALIGN for pair in widths.values() for w in pair)
    for name, unit in _units(cpu).items():
        assert _zero_rows(unit) == 0 and _zero_columns(unit) == 0, name
        g = _units(gpu)[name]
        assert g.in_channels >= unit.in_channels and g.out_channels >= unit.out_channels
    assert cpu_report.channel_align == 1
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(cpu(x), masked_model(model, ticket)(x), **TOL)


@pytest.mark.parametrize("arch", ["res20s", "vgg16_bn"])
def test_report_accounting_with_alignment(arch):
    """flops_after/params_after: the useful work, whatever the alignment. flops_kernel /
    params_stored: what the GEMMs multiply and store, zero-weight rows and columns included."""
    model = trained_like(arch)
    ticket = _ticket(model, arch, "refill")
    options = {"mode": "channel", "input_size": (3, 32, 32), "return_report": True}
    gpu, gpu_report = convert(model, ticket, **options)
    _, cpu_report = convert(model, ticket, device="cpu", **options)
    for a, b in zip(gpu_report.layers, cpu_report.layers, strict=True):
        assert (a.name, a.flops_after, a.params_after) == (b.name, b.flops_after, b.params_after)
        assert b.flops_kernel == b.flops_after and b.params_stored == b.params_after
        assert a.flops_after <= a.flops_kernel <= a.flops_dense
    units = _units(gpu)
    spatial = {n: int(torch.tensor(s).prod()) for n, s in _output_hw(gpu, units).items()}
    linears = dict(gpu.named_modules())
    for row in gpu_report.layers:
        if row.name in units:
            unit = units[row.name]
            assert row.params_stored == unit.weight.numel()
            assert row.flops_kernel == 2 * unit.weight.numel() * spatial[row.name]
        else:  # the classifier: as wide as the layout it reads, alignment channels included
            assert row.params_stored == linears[row.name].weight.numel()
    assert gpu_report.flops_after == cpu_report.flops_after
    assert cpu_report.flops_after < gpu_report.flops_kernel < gpu_report.flops_dense
    d = json.loads(json.dumps(gpu_report.as_dict()))
    assert d["flops_kernel"] == gpu_report.flops_kernel and d["channel_align"] == 8
    assert d["aligned_channel_units"] == gpu_report.alignment[0]
    assert d["layers"][1]["aligned"] in (True, False) and "flops_kernel" in d["layers"][1]
    text = gpu_report.render()
    assert "GEMM work with zero-weight padding" in text and "channel_align=8" in text
    assert "zero-weight padding" not in cpu_report.render()


def _output_hw(fast, units) -> dict[str, tuple[int, int]]:
    shapes = {}
    hooks = [
        u.register_forward_hook(lambda m, i, o: shapes.__setitem__(m.name, o.shape[2:]))
        for u in units.values()
    ]
    with torch.no_grad():
        fast(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    return shapes


def test_aligned_module_saves_and_loads(tmp_path):
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "refill")
    fast = convert(model, ticket, mode="channel")
    back = load_converted(save_converted(fast, tmp_path / "aligned.safetensors"))
    for name, unit in _units(back).items():
        assert unit.in_channels == _units(fast)[name].in_channels
        assert unit.out_idx is None or _units(fast)[name].out_idx is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fast(x), back(x))


def test_every_zero_row_and_column_can_be_forced():
    """max_zero_rows = max_zero_inputs = 1: no gather, no scatter anywhere; still exact."""
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "refill")
    cost = CostModel(max_zero_rows=1.0, max_zero_inputs=1.0)
    fast, report = convert(model, ticket, mode="channel", cost=cost, return_report=True)
    _check_rule(fast, report, cost)
    assert all(u.in_idx is None and u.out_idx is None for u in _units(fast).values())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)
