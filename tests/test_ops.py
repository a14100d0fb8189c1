"""The torch paths of sparse_ops.ops against the reference (the CPU inference path)."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    SHAPES,
    TOLERANCES,
    channel_mask,
    conv_weight,
    expected,
    group_layout,
    shape_id,
)

from sparse_ops import ops
from sparse_ops.errors import SparseOpsError
from sparse_ops.packing import pack_channels, pack_groups


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("residual_on", [False, True])
def test_torch_paths_match_reference(shape, residual_on):
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(SHAPES.index(shape))
    weight = conv_weight(cout, cin, k, g)
    bias = torch.randn(cout, generator=g)
    x = torch.randn(n, cin, h, w, generator=g)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(n, cout, oh, ow, generator=g) if residual_on else None
    plan = pack_channels(
        weight, channel_mask(cout, cin, k, "both", g), bias, stride=s, padding=p, dilation=d
    )
    y = ops.channel_conv(x, plan, residual=res, relu=True)
    ref = expected(x, plan.dense_weight(), bias, (s, p, d), res, True)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    layout, mask = group_layout(cout, cin, k, "mixed", g)
    pack = pack_groups(weight, mask, layout, bias, stride=s, padding=p, dilation=d)
    y = ops.group_conv(x, pack, residual=res, relu=True)
    ref = expected(x, pack.dense_weight(), bias, (s, p, d), res, True)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])


def test_forced_triton_backend_matches_torch_on_cpu():
    g = torch.Generator().manual_seed(0)
    layout, mask = group_layout(20, 6, 3, "mixed", g)
    pack = pack_groups(conv_weight(20, 6, 3, g), mask, layout, padding=1)
    x = torch.randn(2, 6, 5, 5, generator=g)
    a = ops.group_conv(x, pack, backend="torch")
    b = ops.group_conv(x, pack, backend="triton")  # the interpreter on this machine
    torch.testing.assert_close(a, b.contiguous(), **TOLERANCES[torch.float32])


def test_unknown_backend():
    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(4, 2, 1, g))
    with pytest.raises(SparseOpsError, match="backend must be one of"):
        ops.channel_conv(torch.randn(1, 2, 3, 3), plan, backend="cudnn")


@pytest.mark.parametrize("shape", SHAPES[:5], ids=shape_id)
@pytest.mark.parametrize("layout_kind", ["no-groups", "dense", "one-row", "mixed"])
@pytest.mark.parametrize("gemm_penalty", [0.0, 1e9], ids=["gather-gemm", "conv"])
@pytest.mark.parametrize("epilogue", ["none", "bias-residual-relu", "residual"])
def test_group_torch_path_both_strategies(shape, layout_kind, gemm_penalty, epilogue, monkeypatch):
    """Each column set runs either as a gathered GEMM (bias and residual inside the GEMM
    when one set covers every row) or as a conv over its channels."""
    monkeypatch.setattr(ops.group, "_GEMM_PENALTY", gemm_penalty)
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(7 + SHAPES.index(shape))
    weight = conv_weight(cout, cin, k, g)
    bias = None if epilogue == "residual" else torch.randn(cout, generator=g)
    x = torch.randn(n, cin, h, w, generator=g)
    layout, mask = group_layout(cout, cin, k, layout_kind, g)
    pack = pack_groups(weight, mask, layout, bias, stride=s, padding=p, dilation=d)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = None if epilogue == "none" else torch.randn(n, cout, oh, ow, generator=g)
    relu = "relu" in epilogue
    for _ in range(2):  # the second call runs on what the first one prepared
        y = ops.group_conv(x, pack, residual=res, relu=relu)
        ref = expected(x, pack.dense_weight(), bias, (s, p, d), res, relu)
        torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (3, 16, 4, 9), (2, 5, 1, 1), (0, 6, 3, 3)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_select_channels_gathers_and_keeps_the_layout(shape, layout):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    index = torch.randperm(shape[1], generator=g)[: max(1, shape[1] // 2)]
    index = torch.cat([index, index[:1]])  # a repeated channel, out of order
    y = ops.select_channels(x, index)
    torch.testing.assert_close(y, x[:, index], rtol=0, atol=0)
    if layout == "channels_last" and shape[0] > 0:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_channel_path_never_writes_into_the_plan_bias():
    """Batch 1 at a 1×1 output: the expanded bias view is already channels-last
    contiguous, so starting y from it would alias the plan's bias."""
    g = torch.Generator().manual_seed(11)
    weight = conv_weight(6, 5, 1, g)
    mask = torch.zeros(6, 5, 1, 1, dtype=torch.bool)
    mask[[0, 2, 5]] = True  # output channels 1, 3, 4 empty: an out_idx scatter
    bias = torch.randn(6, generator=g)
    plan = pack_channels(weight, mask, bias)
    kept_bias = plan.bias.clone()
    x = torch.randn(1, 5, 1, 1, generator=g)
    ref = expected(x, plan.dense_weight(), bias, (1, 0, 1), None, True)
    for _ in range(3):
        y = ops.channel_conv(x, plan, relu=True)
        torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
        assert y.untyped_storage().data_ptr() != plan.bias.untyped_storage().data_ptr()
    torch.testing.assert_close(plan.bias, kept_bias, rtol=0, atol=0)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_channel_path_runs_a_fully_pruned_layer(with_bias, with_residual):
    """Every weight pruned: oneDNN refuses a conv with no filters; the output is the
    epilogue of zero (bias, residual, ReLU)."""
    g = torch.Generator().manual_seed(12)
    weight = conv_weight(6, 5, 3, g)
    mask = torch.zeros(6, 5, 3, 3, dtype=torch.bool)
    bias = torch.randn(6, generator=g) if with_bias else None
    plan = pack_channels(weight, mask, bias, stride=2, padding=1)
    x = torch.randn(2, 5, 7, 9, generator=g)
    res = torch.randn(2, 6, 4, 5, generator=g) if with_residual else None
    y = ops.channel_conv(x, plan, residual=res, relu=True)
    ref = expected(x, plan.dense_weight(), bias, (2, 1, 1), res, True)
    assert y.shape == (2, 6, 4, 5)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("epilogue", ["plain", "relu", "residual", "residual-relu", "nchw-res"])
@pytest.mark.parametrize("fused", [True, False], ids=["onednn-fused", "separate"])
def test_whole_layout_conv_fuses_its_epilogue_exactly(shape, epilogue, fused, monkeypatch):
    """Every output channel computed: oneDNN's fused conv (bias, residual, ReLU in the
    primitive) and the separate passes agree with the reference."""
    monkeypatch.setattr(ops.channel, "_FUSE_ON_CPU", fused)
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(100 + SHAPES.index(shape))
    weight, bias = conv_weight(cout, cin, k, g), torch.randn(cout, generator=g)
    x = torch.randn(n, cin, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = None
    if "res" in epilogue:
        res = torch.randn(n, cout, oh, ow, generator=g)
        if epilogue != "nchw-res":
            res = res.contiguous(memory_format=torch.channels_last)
    relu = "relu" in epilogue
    plan = pack_channels(weight, None, bias, stride=s, padding=p, dilation=d)
    y = ops.channel_conv(x, plan, residual=res, relu=relu)
    ref = expected(x, weight, bias, (s, p, d), res, relu)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
def test_group_path_for_very_many_column_sets_keeps_the_epilogue(shape, monkeypatch):
    """Beyond _MANY_SETS column sets the CPU path runs one conv on the dense weight:
    bias, residual and ReLU must still be applied."""
    monkeypatch.setattr(ops.group, "_MANY_SETS", 0)
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(200 + SHAPES.index(shape))
    weight, bias = conv_weight(cout, cin, k, g), torch.randn(cout, generator=g) + 3.0
    x = torch.randn(n, cin, h, w, generator=g)
    layout, mask = group_layout(cout, cin, k, "mixed", g)
    pack = pack_groups(weight, mask, layout, bias, stride=s, padding=p, dilation=d)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(n, cout, oh, ow, generator=g)
    y = ops.group_conv(x, pack, residual=res, relu=True)
    ref = expected(x, pack.dense_weight(), bias, (s, p, d), res, True)
    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])


def test_group_gather_path_reuses_its_padded_buffer_safely(monkeypatch):
    """The zero-bordered input buffer is reused across calls and units: each call sees its
    own input, inside and outside inference mode, and a gradient-tracking call gets a
    fresh tensor."""
    monkeypatch.setattr(ops.group, "_GEMM_PENALTY", 0.0)  # every column set gathers
    n, cin, cout, h, w, k, s, p, d = SHAPES[1]
    g = torch.Generator().manual_seed(300)
    packs = []
    for _ in range(2):  # two units with the same input shape share the buffer
        weight, bias = conv_weight(cout, cin, k, g), torch.randn(cout, generator=g)
        layout, mask = group_layout(cout, cin, k, "mixed", g)
        packs.append(
            (pack_groups(weight, mask, layout, bias, stride=s, padding=p, dilation=d), bias)
        )
    inputs = [torch.randn(n, cin, h, w, generator=g) for _ in range(3)]
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            for x in inputs:
                for pack, bias in packs:
                    y = ops.group_conv(x, pack)
                    ref = expected(x, pack.dense_weight(), bias, (s, p, d), None, False)
                    torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    x = inputs[0].clone().requires_grad_(True)
    pack, bias = packs[0]
    ops.group_conv(x, pack).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
