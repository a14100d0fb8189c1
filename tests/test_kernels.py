"""Triton kernels against the reference (interpreter on CPU; the same tests on a GPU)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from kernel_cases import (
    DEVICE,
    SHAPES,
    assert_matches,
    channel_mask,
    conv_weight,
    expected,
    group_layout,
    poisoned_output,
    shape_id,
)

from sparse_ops.packing import pack_channels, pack_groups
from sparse_ops_kernels import channel_conv, configs, group_conv, launch
from sparse_ops_kernels.channel_conv import channel_conv_launch
from sparse_ops_kernels.errors import KernelInputError
from sparse_ops_kernels.formats import ChannelPlan
from sparse_ops_kernels.group_conv import group_conv_launch

DTYPES = [torch.float32, torch.float16]
EPILOGUES = [(False, False), (True, False), (False, True), (True, True)]  # (residual, relu)


def _run_channel(
    shape, mask_mode, dtype, residual_on, relu, seed=0, nchw=False, config=None, force_wide=None
):
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(seed)
    weight = conv_weight(cout, cin, k, g)
    bias = torch.randn(cout, generator=g)
    mask = channel_mask(cout, cin, k, mask_mode, g)
    plan = pack_channels(weight, mask, bias, stride=s, padding=p, dilation=d)
    plan = plan.to(DEVICE, dtype)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(n, cout, oh, ow, generator=g).to(dtype) if residual_on else None
    ref = expected(x, plan.dense_weight(), bias, (s, p, d), res, relu)
    xin = x.to(DEVICE) if nchw else x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    out = poisoned_output((n, cout, oh, ow), dtype)
    residual = None if res is None else res.to(DEVICE)
    spec = channel_conv_launch(
        xin, plan, residual=residual, relu=relu, out=out, allow_tf32=False, force_wide=force_wide
    )
    y = launch.run(spec, config, channel_conv.INTERPRETED)
    assert y is out
    assert_matches(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_channel_conv_shapes(shape, dtype):
    i = SHAPES.index(shape)
    mask_mode = ["both", "in", "out", "dense"][i % 4]
    residual_on, relu = EPILOGUES[i % 4]
    _run_channel(shape, mask_mode, dtype, residual_on, relu, seed=i)


@pytest.mark.parametrize("mask_mode", ["dense", "in", "out", "both", "empty"])
@pytest.mark.parametrize(("residual_on", "relu"), EPILOGUES)
def test_channel_conv_masks_and_epilogues(mask_mode, residual_on, relu):
    _run_channel((2, 17, 33, 7, 6, 3, 1, 1, 1), mask_mode, torch.float32, residual_on, relu)


def test_channel_conv_nchw_input_is_converted():
    _run_channel((2, 17, 33, 7, 6, 3, 2, 1, 1), "both", torch.float32, True, True, nchw=True)


def _run_group(
    shape, layout_mode, dtype, residual_on, relu, seed=0, block_n=32, k_pad=32, force_wide=None
):
    n, cin, cout, h, w, k, s, p, d = shape
    g = torch.Generator().manual_seed(seed)
    weight = conv_weight(cout, cin, k, g)
    bias = torch.randn(cout, generator=g)
    layout, mask = group_layout(cout, cin, k, layout_mode, g)
    pack = pack_groups(
        weight, mask, layout, bias, stride=s, padding=p, dilation=d, block_n=block_n, k_pad=k_pad
    )
    pack = pack.to(DEVICE, dtype)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
    ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
    res = torch.randn(n, cout, oh, ow, generator=g).to(dtype) if residual_on else None
    ref = expected(x, pack.dense_weight(), bias, (s, p, d), res, relu)
    out = poisoned_output((n, cout, oh, ow), dtype)
    residual = None if res is None else res.to(DEVICE)
    spec = group_conv_launch(
        x.to(DEVICE),
        pack,
        residual=residual,
        relu=relu,
        out=out,
        allow_tf32=False,
        force_wide=force_wide,
    )
    y = launch.run(spec, None, group_conv.INTERPRETED)
    assert_matches(y, ref, dtype)
    return pack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_group_conv_shapes(shape, dtype):
    i = SHAPES.index(shape)
    residual_on, relu = EPILOGUES[i % 4]
    _run_group(shape, "mixed", dtype, residual_on, relu, seed=i)


@pytest.mark.parametrize("layout_mode", ["one-row", "no-groups", "dense", "mixed"])
@pytest.mark.parametrize(("residual_on", "relu"), EPILOGUES)
def test_group_conv_layouts_and_epilogues(layout_mode, residual_on, relu):
    pack = _run_group((2, 9, 40, 7, 6, 3, 1, 1, 1), layout_mode, torch.float32, residual_on, relu)
    if layout_mode == "no-groups":
        assert pack.num_groups == 0 and pack.fill_idx.numel() == 40


@pytest.mark.parametrize(("block_n", "k_pad"), [(16, 16), (16, 64), (64, 32)])
def test_group_conv_block_sizes(block_n, k_pad):
    _run_group((2, 17, 50, 6, 6, 3, 1, 1, 1), "mixed", torch.float16, True, True, 3, block_n, k_pad)


# Column runs (col_run = 8 packs): runs of 8 channels within one tap; on a GPU both operands
# load as 16-byte vectors. Shapes: 1x1/3x3/7x7, stride, padding, dilation, batch 1.
RUN_SHAPES = [
    (2, 16, 40, 7, 6, 3, 1, 1, 1),
    (1, 24, 33, 9, 7, 3, 2, 1, 1),
    (2, 8, 20, 6, 6, 1, 1, 0, 1),
    (1, 8, 17, 9, 9, 7, 1, 3, 1),
    (2, 16, 24, 9, 8, 3, 1, 2, 2),
]


@pytest.mark.parametrize("shape", RUN_SHAPES, ids=shape_id)
@pytest.mark.parametrize(("block_n", "k_pad"), [(32, 32), (16, 16), (16, 64)])
def test_group_conv_column_runs(shape, block_n, k_pad):
    i = RUN_SHAPES.index(shape)
    residual_on, relu = EPILOGUES[i % 4]
    pack = _run_group(
        shape, "runs", torch.float16, residual_on, relu, seed=i, block_n=block_n, k_pad=k_pad
    )
    assert pack.col_run == 8
    spec = group_conv_launch(torch.randn(shape[:2] + shape[3:5]).to(DEVICE, torch.float16), pack)
    assert spec.constexprs["COL_RUN"] == 8


# Aligned channel counts (multiples of 8) take the vector-load path on a GPU; odd ones do
# not. Under the interpreter both compute the same thing, which is what is checked here.
ALIGNED_SHAPES = [(2, 16, 24, 9, 9, 3, 1, 1, 1), (1, 32, 8, 6, 7, 1, 2, 0, 1)]


@pytest.mark.parametrize("shape", ALIGNED_SHAPES + SHAPES[1:4], ids=shape_id)
@pytest.mark.parametrize("mask_mode", ["dense", "both"])
def test_channel_conv_flat_k_loop(shape, mask_mode):
    """The FLAT configs walk (tap, channel block) steps in one loop: same result."""
    flat = configs.config_from_id("32x32x16 w4 s2 flat")
    _run_channel(shape, mask_mode, torch.float32, True, True, seed=7, config=flat)


@pytest.mark.parametrize("mask_mode", ["dense", "in", "both"])
def test_channel_conv_64_bit_offsets(mask_mode):
    """The WIDE (int64 offset) path, which real launches take only past 2^30 elements."""
    for shape in (SHAPES[1], SHAPES[4], ALIGNED_SHAPES[0]):
        _run_channel(shape, mask_mode, torch.float32, True, True, seed=3, force_wide=True)


def test_group_conv_64_bit_offsets():
    for shape in (SHAPES[1], SHAPES[4]):
        _run_group(shape, "mixed", torch.float32, True, True, seed=3, force_wide=True)


def test_small_tensors_use_32_bit_offsets():
    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(8, 8, 3, g), None, None, padding=1).to(DEVICE)
    spec = channel_conv_launch(torch.randn(1, 8, 5, 5, device=DEVICE), plan)
    assert spec.constexprs["WIDE"] is False
    assert spec.constexprs["X_ALIGN"] == 8 and spec.constexprs["W_ALIGN"] == 8


def test_wide_offsets_follow_a_views_span_not_its_size():
    """A residual that is a channel slice of a wider tensor holds < 2^30 elements but
    reaches past 2^31: int32 offsets into it would wrap (meta tensors: nothing is
    allocated)."""
    big = torch.empty(80, 512, 256, 256, dtype=torch.float16, device="meta")
    residual = big.contiguous(memory_format=torch.channels_last)[:, :64]
    assert residual.numel() < launch.WIDE_OFFSETS_AT <= launch.element_span(residual)
    assert launch.needs_wide_offsets(views=(residual,))
    assert not launch.needs_wide_offsets(dense=(residual,))  # what a numel check would say
    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(64, 64, 1, g), None, None)
    plan = plan.to("meta", torch.float16)
    x = torch.empty(80, 64, 256, 256, dtype=torch.float16, device="meta")
    x = x.contiguous(memory_format=torch.channels_last)
    spec = channel_conv_launch(x, plan, residual=residual, check_device=False)
    assert spec.constexprs["WIDE"] is True
    contiguous = channel_conv_launch(x, plan, residual=residual.contiguous(), check_device=False)
    assert contiguous.constexprs["WIDE"] is False


def test_alignment_claims_are_exact():
    # What the kernel may state with multiple_of: the largest power of two ≤ 8 dividing
    # every value (a wrong claim would make the compiler vectorise unaligned rows).
    assert launch.alignment(312, 312 * 16, 312 * 256) == 8
    assert launch.alignment(307) == 1 and launch.alignment(6, 12) == 2
    assert launch.alignment(0, 4) == 4 and launch.alignment() == 8


def test_channel_candidate_configs_by_launch_class():
    def flags(in_idx=False, out_idx=False, align=8, precision="ieee"):
        return {
            "HAS_IN_IDX": in_idx,
            "HAS_OUT_IDX": out_idx,
            "X_ALIGN": align,
            "W_ALIGN": align,
            "INPUT_PRECISION": precision,
        }

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        p = "tf32" if dtype == torch.float32 else "ieee"
        assert channel_conv.launch_class(dtype, flags(precision=p)) == "vector"
        assert channel_conv.launch_class(dtype, flags(out_idx=True, precision=p)) == (
            "vector-scatter"
        )
        assert channel_conv.launch_class(dtype, flags(in_idx=True, precision=p)) == "scalar"
        assert channel_conv.launch_class(dtype, flags(align=1, out_idx=True, precision=p)) == (
            "scalar-scatter"
        )
        for kind in channel_conv.CONFIG_SETS:
            if kind == "fma":
                continue
            in_idx, out_idx = kind.startswith("scalar"), kind.endswith("scatter")
            chosen = channel_conv.candidate_configs(dtype, flags(in_idx, out_idx, precision=p))
            assert chosen, (kind, dtype)
            assert all(c in channel_conv.CONFIG_SETS[kind] for c in chosen)
    # Exact fp32 (no tf32) runs on CUDA cores, whatever the loads: its own set.
    for in_idx in (False, True):
        for out_idx in (False, True):
            kind = channel_conv.launch_class(torch.float32, flags(in_idx, out_idx))
            assert kind.startswith("fma:")
            chosen = channel_conv.candidate_configs(torch.float32, flags(in_idx, out_idx))
            assert chosen and all(c in channel_conv.CONFIG_SETS["fma"] for c in chosen)
    # 4-element (8-byte) alignment is a full 16-byte vector for fp32 only.
    assert channel_conv.vector_loads(torch.float32, flags(align=4, precision="tf32"))
    assert not channel_conv.vector_loads(torch.float16, flags(align=4))


@pytest.mark.parametrize("version", ["3.6.0", "3.9.0", "3.7.0"])
def test_every_launch_keeps_a_config_on_every_triton(version, monkeypatch):
    """The spill tables never leave a launch class without configs: on each measured
    Triton version, and on one never measured (where every exclusion applies)."""
    import itertools

    import triton

    monkeypatch.setattr(triton, "__version__", version)
    for dtype, precision in (
        (torch.float16, "ieee"),
        (torch.bfloat16, "ieee"),
        (torch.float32, "tf32"),
        (torch.float32, "ieee"),
    ):
        for in_idx, out_idx, align in itertools.product((False, True), (False, True), (1, 8)):
            flags = {
                "HAS_IN_IDX": in_idx,
                "HAS_OUT_IDX": out_idx,
                "X_ALIGN": align,
                "W_ALIGN": align,
                "INPUT_PRECISION": precision,
            }
            assert channel_conv.candidate_configs(dtype, flags), (version, dtype, flags)
        for k_pad in (16, 32, 64):
            flags = {"K_PAD": k_pad, "INPUT_PRECISION": precision}
            chosen = group_conv.candidate_configs(dtype, flags)
            assert chosen and all(k_pad % c.kwargs["BLOCK_K"] == 0 for c in chosen)
    if version != "3.7.0":  # measured versions keep more than a fallback
        flags = {
            "HAS_IN_IDX": False,
            "HAS_OUT_IDX": False,
            "X_ALIGN": 8,
            "W_ALIGN": 8,
            "INPUT_PRECISION": "ieee",
        }
        assert len(channel_conv.candidate_configs(torch.float16, flags)) >= 6


def test_quick_tuning_offers_the_ranked_configs(monkeypatch):
    flags = {
        "HAS_IN_IDX": False,
        "HAS_OUT_IDX": False,
        "X_ALIGN": 8,
        "W_ALIGN": 8,
        "INPUT_PRECISION": "ieee",
    }
    full = channel_conv.candidate_configs(torch.float16, flags)
    monkeypatch.setenv("SPARSE_OPS_TUNING", "quick")
    quick = channel_conv.candidate_configs(torch.float16, flags)
    assert 1 <= len(quick) <= 2 < len(full)
    assert {configs.config_id(c) for c in quick} <= set(channel_conv.QUICK["vector"])
    group_flags = {"K_PAD": 32, "INPUT_PRECISION": "ieee"}
    group_quick = group_conv.candidate_configs(torch.float16, group_flags)
    assert 1 <= len(group_quick) <= len(group_conv.QUICK["tensor"])
    for module in (channel_conv, group_conv):  # no typo in a QUICK list
        for name, ids in module.QUICK.items():
            assert set(ids) <= {configs.config_id(c) for c in module.CONFIG_SETS[name]}
    monkeypatch.setenv("SPARSE_OPS_TUNING", "fast")
    with pytest.raises(KernelInputError, match="SPARSE_OPS_TUNING='fast'"):
        channel_conv.candidate_configs(torch.float16, flags)


def test_known_spills_follow_the_installed_version(monkeypatch):
    import triton

    table = {(3, 6): {"scalar": {"a"}}, (3, 9): {"scalar/float32": {"b"}}}
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert configs.known_spills(table, "scalar", torch.float32) == {"a"}
    monkeypatch.setattr(triton, "__version__", "3.9.1")
    assert configs.known_spills(table, "scalar", torch.float32) == {"b"}
    assert configs.known_spills(table, "scalar", torch.float16) == set()
    monkeypatch.setattr(triton, "__version__", "3.7.0")  # never measured: every exclusion
    assert configs.known_spills(table, "scalar", torch.float32) == {"a", "b"}
    for version in ("3.6rc1", "3.6.0+git1234"):
        monkeypatch.setattr(triton, "__version__", version)
        assert configs.known_spills(table, "scalar", torch.float32) == {"a"}


settings_kernel = settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@settings_kernel
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 20),
    cout=st.integers(1, 40),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    k=st.sampled_from([1, 3, 5]),
    s=st.integers(1, 2),
    p=st.integers(0, 2),
    d=st.integers(1, 2),
    mode=st.sampled_from(["dense", "in", "out", "both", "empty"]),
    residual_on=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 99),
)
def test_channel_conv_property(n, cin, cout, h, w, k, s, p, d, mode, residual_on, relu, seed):
    if (h + 2 * p - d * (k - 1) - 1) < 0 or (w + 2 * p - d * (k - 1) - 1) < 0:
        return  # no output pixel: covered by the launcher error test
    _run_channel((n, cin, cout, h, w, k, s, p, d), mode, torch.float32, residual_on, relu, seed)


@settings_kernel
@given(
    n=st.integers(1, 2),
    cin=st.integers(1, 12),
    cout=st.integers(1, 40),
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    k=st.sampled_from([1, 3]),
    s=st.integers(1, 2),
    p=st.integers(0, 1),
    d=st.integers(1, 2),
    mode=st.sampled_from(["one-row", "no-groups", "dense", "mixed"]),
    residual_on=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 99),
)
def test_group_conv_property(n, cin, cout, h, w, k, s, p, d, mode, residual_on, relu, seed):
    if (h + 2 * p - d * (k - 1) - 1) < 0 or (w + 2 * p - d * (k - 1) - 1) < 0:
        return
    _run_group((n, cin, cout, h, w, k, s, p, d), mode, torch.float32, residual_on, relu, seed)


# ---------------------------------------------------------------- launcher checks


def _plan(dtype=torch.float32, **kw):
    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(8, 4, 3, g), None, torch.zeros(8), padding=1, **kw)
    return plan.to(DEVICE, dtype)


def test_launcher_rejects_dtype_mismatch():
    with pytest.raises(KernelInputError, match=r"plan weight dtype torch.float32 ≠ input dtype"):
        channel_conv.channel_conv(
            torch.randn(1, 4, 5, 5, dtype=torch.float16, device=DEVICE), _plan()
        )


def test_launcher_rejects_wrong_channels_and_shapes():
    plan = _plan()
    with pytest.raises(KernelInputError, match="input has 5 channels, plan expects 4"):
        channel_conv.channel_conv(torch.randn(1, 5, 5, 5, device=DEVICE), plan)
    with pytest.raises(KernelInputError, match=r"must be a 4-D tensor"):
        channel_conv.channel_conv(torch.randn(4, 5, 5, device=DEVICE), plan)
    with pytest.raises(KernelInputError, match=r"residual has shape \(1, 8, 4, 4\)"):
        channel_conv.channel_conv(
            torch.randn(1, 4, 5, 5, device=DEVICE),
            plan,
            residual=torch.randn(1, 8, 4, 4, device=DEVICE),
        )
    with pytest.raises(KernelInputError, match="too small"):
        channel_conv.channel_conv(torch.randn(1, 4, 1, 1, device=DEVICE), _plan(dilation=3))
    with pytest.raises(KernelInputError, match="dtype torch.int64 not supported"):
        channel_conv.channel_conv(torch.ones(1, 4, 5, 5, dtype=torch.int64, device=DEVICE), plan)


def _channel_entry(backend):
    """The launcher, or the torch path of sparse_ops.ops (same checks, same messages)."""
    if backend == "triton":
        return channel_conv.channel_conv
    from sparse_ops import ops

    return lambda x, plan, **kw: ops.channel_conv(x, plan, backend="torch", **kw)


def _group_entry(backend):
    if backend == "triton":
        return group_conv.group_conv
    from sparse_ops import ops

    return lambda x, pack, **kw: ops.group_conv(x, pack, backend="torch", **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_both_backends_refuse_the_same_bad_calls(backend):
    conv = _channel_entry(backend)
    plan = _plan()
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    with pytest.raises(KernelInputError, match="input has 16 channels, plan expects 4"):
        conv(torch.randn(1, 16, 5, 5, device=DEVICE), plan)
    with pytest.raises(KernelInputError, match=r"must be a 4-D tensor"):
        conv(torch.randn(4, 5, 5, device=DEVICE), plan)
    with pytest.raises(KernelInputError, match="dtype torch.int32 not supported"):
        conv(torch.ones(1, 4, 5, 5, dtype=torch.int32, device=DEVICE), plan)
    with pytest.raises(KernelInputError, match=r"residual has shape \(1, 8, 4, 4\)"):
        conv(x, plan, residual=torch.randn(1, 8, 4, 4, device=DEVICE))
    with pytest.raises(KernelInputError, match="too small"):
        conv(torch.randn(1, 4, 1, 1, device=DEVICE), _plan(dilation=3))
    short_bias = ChannelPlan(**{**vars(plan), "bias": torch.zeros(3, device=DEVICE)})
    with pytest.raises(KernelInputError, match=r"plan bias must have shape \(8,\), got \(3,\)"):
        conv(x, short_bias)
    # Built by hand from a permuted (non-contiguous) weight: would be read with wrong strides.
    w = torch.randn(8, 4, 3, 3, device=DEVICE)
    by_hand = ChannelPlan(**{**vars(plan), "weight": w.permute(0, 2, 3, 1)})
    with pytest.raises(KernelInputError, match="plan weight must be contiguous"):
        conv(x, by_hand)
    with pytest.raises(KernelInputError, match="format_version 99"):  # refused when built
        ChannelPlan(**{**vars(plan), "format_version": 99})

    g = torch.Generator().manual_seed(0)
    layout, mask = group_layout(20, 6, 3, "mixed", g)
    pack = pack_groups(conv_weight(20, 6, 3, g), mask, layout).to(DEVICE)
    with pytest.raises(KernelInputError, match="input has 16 channels, pack expects 6"):
        _group_entry(backend)(torch.randn(2, 16, 5, 5, device=DEVICE), pack)
    with pytest.raises(KernelInputError, match=r"residual has shape \(2, 20, 5, 6\)"):
        _group_entry(backend)(
            torch.randn(2, 6, 5, 5, device=DEVICE),
            pack,
            residual=torch.randn(2, 20, 5, 6, device=DEVICE),
        )


def test_launcher_refuses_an_overlapping_out():
    plan = _plan()
    out = torch.zeros(1, 8, 1, 1, device=DEVICE).expand(2, 8, 5, 5)
    with pytest.raises(KernelInputError, match="out must be contiguous"):
        channel_conv.channel_conv(torch.randn(2, 4, 5, 5, device=DEVICE), plan, out=out)


def _square_plan():
    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(4, 4, 3, g), None, torch.zeros(4), padding=1)
    return plan.to(DEVICE)


def test_launcher_refuses_an_out_that_shares_memory_with_an_input():
    """The kernel reads x and the residual while tiles of out are already written."""
    plan = _square_plan()
    buffer = torch.randn(3 * 2 * 4 * 5 * 5, device=DEVICE)
    x = buffer[:200].view(2, 4, 5, 5)
    residual = buffer[200:400].view(2, 4, 5, 5)
    with pytest.raises(KernelInputError, match="out overlaps the memory of x"):
        channel_conv.channel_conv(x, plan, out=x)
    with pytest.raises(KernelInputError, match="out overlaps the memory of residual"):
        channel_conv.channel_conv(x, plan, residual=residual, out=residual)
    with pytest.raises(KernelInputError, match="out overlaps the memory of x"):
        channel_conv.channel_conv(x, plan, out=buffer[100:300].view(2, 4, 5, 5))  # partly
    maps = torch.randn(300, device=DEVICE)
    with pytest.raises(KernelInputError, match="out overlaps the memory of bias_map"):
        channel_conv.channel_conv(
            x, plan, bias_map=maps[:100].view(4, 5, 5), out=maps[50:250].view(2, 4, 5, 5)
        )
    # the buffer's third part is separate: accepted, and the result is right
    out = buffer[400:].view(2, 4, 5, 5)
    expected = channel_conv.channel_conv(x, plan, residual=residual)
    channel_conv.channel_conv(x, plan, residual=residual, out=out)
    torch.testing.assert_close(out, expected)


def test_launcher_rejects_format_version():
    plan = _plan()
    plan.format_version = 99
    with pytest.raises(KernelInputError, match="format_version 99"):
        channel_conv.channel_conv(torch.randn(1, 4, 5, 5, device=DEVICE), plan)


def test_group_launcher_checks_pack():
    g = torch.Generator().manual_seed(0)
    layout, mask = group_layout(20, 4, 3, "mixed", g)
    weight = conv_weight(20, 4, 3, g)
    pack = pack_groups(weight, mask, layout, block_n=24).to(DEVICE)
    with pytest.raises(KernelInputError, match="block_n=24 and k_pad=32 must be powers of two"):
        group_conv.group_conv(torch.randn(1, 4, 5, 5, device=DEVICE), pack)
    pack = pack_groups(weight, mask, layout).to(DEVICE)
    with pytest.raises(KernelInputError, match="pack values dtype torch.float32 ≠ input dtype"):
        group_conv.group_conv(torch.randn(1, 4, 5, 5, device=DEVICE, dtype=torch.float16), pack)
    pack.format_version = 0
    with pytest.raises(KernelInputError, match="format_version 0"):
        group_conv.group_conv(torch.randn(1, 4, 5, 5, device=DEVICE), pack)


# ---------------------------------------------------------------- GPU only


gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("which", ["channel", "group"])
def test_every_autotune_config(which):
    """Each config compiles to correct code (num_warps=8 included)."""
    configs = channel_conv.CONFIGS if which == "channel" else group_conv.CONFIGS
    shape = (2, 40, 72, 13, 11, 3, 1, 1, 1)
    for config in configs:
        if which == "channel":
            n, cin, cout, h, w, k, s, p, d = shape
            g = torch.Generator().manual_seed(1)
            weight = conv_weight(cout, cin, k, g)
            mask = channel_mask(cout, cin, k, "both", g)
            plan = pack_channels(weight, mask, torch.randn(cout, generator=g), padding=p)
            plan = plan.to("cuda", torch.float16)
            x = torch.randn(n, cin, h, w, generator=g).half()
            ref = expected(x, plan.dense_weight(), plan.bias, (s, p, d), None, True)
            out = poisoned_output(tuple(ref.shape), torch.float16, "cuda")
            y = channel_conv.channel_conv(x.cuda(), plan, relu=True, out=out, config=config)
        else:
            n, cin, cout, h, w, k, s, p, d = shape
            g = torch.Generator().manual_seed(1)
            layout, mask = group_layout(cout, cin, k, "mixed", g)
            pack = pack_groups(conv_weight(cout, cin, k, g), mask, layout, padding=p, k_pad=64).to(
                "cuda", torch.float16
            )
            x = torch.randn(n, cin, h, w, generator=g).half()
            ref = expected(x, pack.dense_weight(), None, (s, p, d), None, True)
            out = poisoned_output(tuple(ref.shape), torch.float16, "cuda")
            y = group_conv.group_conv(x.cuda(), pack, relu=True, out=out, config=config)
        assert_matches(y, ref, torch.float16)


@gpu
@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
def test_bf16_on_gpu(shape):
    # tl.dot on bf16 operands is wrong under the interpreter (seen with triton 3.9)
    _run_channel(shape, "both", torch.bfloat16, True, True)
    _run_group(shape, "mixed", torch.bfloat16, True, True)


@gpu
def test_tf32_switch():
    from kernel_cases import TOLERANCES

    g = torch.Generator().manual_seed(0)
    plan = pack_channels(conv_weight(64, 64, 3, g), None, None, padding=1).to("cuda")
    x = torch.randn(2, 64, 16, 16, generator=g)
    ref = expected(x, plan.dense_weight(), None, (1, 1, 1), None, False)
    exact = channel_conv.channel_conv(x.cuda(), plan, allow_tf32=False)
    fast = channel_conv.channel_conv(x.cuda(), plan, allow_tf32=True)
    torch.testing.assert_close(exact.cpu().double(), ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(fast.cpu().double(), ref, **TOLERANCES["tf32"])


@gpu
def test_offsets_beyond_two_to_the_31():
    """N·H·W·C > 2^31 elements: int32 offsets would wrap."""
    n, c, h, w = 1, 8, 16384, 16400  # 2.15e9 elements, 4.3 GB in fp16
    weight = torch.eye(c).view(c, c, 1, 1)
    plan = pack_channels(weight, None, None).to("cuda", torch.float16)
    x = torch.empty(n, c, h, w, dtype=torch.float16, device="cuda").contiguous(
        memory_format=torch.channels_last
    )
    x.normal_()
    y = channel_conv.channel_conv(x, plan)
    for hh, ww in [(0, 0), (h - 1, w - 1), (h // 2, 7), (h - 3, w // 3)]:
        torch.testing.assert_close(y[0, :, hh, ww], x[0, :, hh, ww])
    del x, y
    torch.cuda.empty_cache()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bias_map_is_added_per_position(backend):
    from sparse_ops import ops

    g = torch.Generator().manual_seed(4)
    weight = conv_weight(12, 6, 3, g)
    mask = channel_mask(12, 6, 3, "both", g)
    bias = torch.randn(12, generator=g)
    plan = pack_channels(weight, mask, bias, padding=1).to(DEVICE)
    x = torch.randn(2, 6, 5, 4, generator=g)
    bias_map = torch.randn(12, 5, 4, generator=g)
    res = torch.randn(2, 12, 5, 4, generator=g)
    ref = expected(x, plan.dense_weight(), bias, (1, 1, 1), res + bias_map, True)
    if backend == "triton" or DEVICE == "cuda":
        y = channel_conv.channel_conv(
            x.to(DEVICE),
            plan,
            residual=res.to(DEVICE),
            relu=True,
            bias_map=bias_map.to(DEVICE),
            allow_tf32=False,
        )
    else:
        y = ops.channel_conv(x, plan, residual=res, relu=True, bias_map=bias_map, backend="torch")
    assert_matches(y, ref, torch.float32)
    with pytest.raises(KernelInputError, match=r"bias_map has shape \(12, 4, 4\)"):
        channel_conv.channel_conv(x.to(DEVICE), plan, bias_map=torch.zeros(12, 4, 4, device=DEVICE))


@pytest.mark.parametrize("module", [channel_conv, group_conv], ids=["channel", "group"])
def test_config_tables_are_data_the_ids_name(module):
    """Configs are kept as ids: each parses back to itself, and every id a spill table or
    a quick list names is one of the kernel's configs."""
    ids = [i for kind in module.CONFIG_IDS.values() for i in kind]
    assert [configs.config_id(configs.config_from_id(i)) for i in ids] == ids
    known = {configs.config_id(c) for c in module.CONFIGS}
    assert set(ids) == known
    named = {i for v in module.QUICK.values() for i in v}
    named |= {i for table in module.SPILLS.values() for v in table.values() for i in v}
    assert named <= known, sorted(named - known)
    with pytest.raises(ValueError, match="is not 'BMxBNxBK"):
        configs.config_from_id("64x64 w4")
