"""Compiler and export readiness on a CPU.

- ``torch.library.opcheck`` on ``sparse_ops::channel_conv`` and ``sparse_ops::group_conv``
  (schema, autograd registration, fake tensor vs real, AOT dispatch static and dynamic),
  on synthetic argument sets and on every kind of call a converted network makes;
- a converted module under ``torch.compile(fullgraph=True)`` (inductor, CPU) equals eager;
- a converted module round-trips through ``torch.export`` (export, save, load, run).

The networks are ``res20s`` at 8×8 inputs: every site kind (stem, stride-2 blocks,
option-A shortcuts, residual fusion, bias maps, group units with leftover packs) at the
lowest compile cost.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_cases import channel_mask, conv_weight, group_layout
from model_cases import trained_like
from torch import nn
from torch.library import opcheck

import sparse_ops.nn as units
from sparse_ops import Ticket, imp, ops, structure
from sparse_ops.convert import convert, masked_model
from sparse_ops.masks import from_gemm_view
from sparse_ops.nn import channel as channel_unit
from sparse_ops.nn import group as group_unit
from sparse_ops.nn.unit import plain_eager_call
from sparse_ops.packing import pack_channels, pack_groups
from sparse_ops.structure import RegroupConfig

# Every check opcheck has, not only its defaults (which leave out the static AOT one).
ALL_CHECKS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_static",
    "test_aot_dispatch_dynamic",
)
CHANNEL_OP = torch.ops.sparse_ops.channel_conv.default
GROUP_OP = torch.ops.sparse_ops.group_conv.default


def _inputs(n, cin, cout, h, w, k, s, p, dtype, g, residual, channels_last=True):
    x = torch.randn(n, cin, h, w, generator=g).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = None
    if residual:  # what a unit gets: the previous unit's channels-last output
        res = torch.randn(n, cout, oh, ow, generator=g).to(dtype)
        res = res.contiguous(memory_format=torch.channels_last)
    return x, res, (oh, ow)


# ---------------------------------------------------------------- opcheck, channel op

CHANNEL_CASES = [  # keyword arguments of _channel_args
    pytest.param({}, id="3x3-in+out-pruned-bias-relu"),
    pytest.param(dict(s=2, bias_map=True, residual=True), id="3x3-s2-bias_map-residual"),
    pytest.param(dict(n=1, k=1, p=0, mask="dense", bias=False, relu=False), id="1x1-n1-dense"),
    # in_idx set, out_idx and fill_idx None
    pytest.param(dict(mask="in", residual=True), id="in-pruned-only"),
    # out_idx and fill_idx set, in_idx None
    pytest.param(dict(mask="out", bias_map=True), id="out-pruned-only"),
    # a [0, k, k, Cin'] weight: the epilogue alone
    pytest.param(dict(mask="empty", residual=True), id="every-row-pruned"),
    pytest.param(dict(k=1, p=0, s=2, channels_last=False), id="nchw-input-1x1-s2"),
    pytest.param(dict(s=2, bias_map=True, residual=True, dtype=torch.float16), id="fp16-s2-all"),
    pytest.param(dict(n=1, k=1, p=0, dtype=torch.bfloat16), id="bf16-1x1-n1"),
]


def _channel_args(
    n=2,
    cin=5,
    cout=7,
    h=7,
    w=6,
    k=3,
    s=1,
    p=1,
    mask="both",
    bias=True,
    bias_map=False,
    residual=False,
    relu=True,
    dtype=torch.float32,
    channels_last=True,
):
    g = torch.Generator().manual_seed(cin * cout + k + s)
    plan = pack_channels(
        conv_weight(cout, cin, k, g),
        channel_mask(cout, cin, k, mask, g),
        torch.randn(cout, generator=g) if bias else None,
        stride=s,
        padding=p,
    ).to(dtype=dtype)
    x, res, (oh, ow) = _inputs(n, cin, cout, h, w, k, s, p, dtype, g, residual, channels_last)
    # The module passes bias and bias map in fp32 whatever the dtype (nn.unit.fp32).
    bmap = torch.randn(cout, oh, ow, generator=g) if bias_map else None
    indices = (plan.in_idx, plan.out_idx, plan.fill_idx)
    geometry = (list(plan.stride), list(plan.padding), list(plan.dilation))
    return (x, plan.weight, plan.bias, *indices, bmap, res, cin, cout, *geometry, relu)


@pytest.mark.parametrize("kwargs", CHANNEL_CASES)
def test_opcheck_channel_conv(kwargs):
    args = _channel_args(**kwargs)
    opcheck(CHANNEL_OP, args, test_utils=ALL_CHECKS)


# ---------------------------------------------------------------- opcheck, group op


def _leftover_layout(mask: torch.Tensor) -> list[dict]:
    """What the converter does with the nonzeros regrouping leaves out: chunks of 16 rows
    sharing the union of their columns (sparse_ops.convert.units._leftover_groups)."""
    view = mask.permute(0, 2, 3, 1).flatten(1)
    rows = view.any(1).nonzero().flatten()
    return [
        {"rows": chunk.tolist(), "cols": view[chunk].any(0).nonzero().flatten().tolist()}
        for chunk in rows.split(16)
    ]


def _all_rows_few_columns(cout, cin, k, g):
    """One group of every row in order over a third of the columns: the torch path's
    single gathered GEMM that is the output as it stands."""
    k_total = k * k * cin
    cols = torch.randperm(k_total, generator=g)[: max(1, k_total // 3)]
    view = torch.zeros(cout, k_total, dtype=torch.bool)
    view[:, cols] = True
    return [{"rows": list(range(cout)), "cols": cols.tolist()}], from_gemm_view(
        view, (cout, cin, k, k)
    )


LEFTOVER = dict(layout="leftover", bias=False, residual=True, block=16)
GROUP_CASES = [  # keyword arguments of _group_args
    pytest.param({}, id="3x3-mixed-fill-rows-bias-relu"),
    pytest.param(dict(s=2, residual=True), id="3x3-s2-mixed-residual"),
    pytest.param(dict(n=1, k=1, p=0, layout="dense", relu=False), id="1x1-n1-dense-no-relu"),
    pytest.param(dict(layout="no-groups", residual=True), id="no-groups-every-row-fill"),
    pytest.param(dict(layout="one-row", cout=33), id="one-row-groups"),
    pytest.param(dict(layout="all-rows-few-columns", bias=False), id="all-rows-few-columns"),
    # the converter's leftover pack: block_n = k_pad = 16, no bias, the main pack's
    # output as residual, the layer's ReLU
    pytest.param(dict(LEFTOVER, cout=33), id="leftover-16x16-no-bias"),
    pytest.param(dict(many_sets=True, residual=True), id="many-column-sets-one-dense-conv"),
    pytest.param(dict(s=2, residual=True, dtype=torch.float16), id="fp16-s2-mixed-residual"),
    pytest.param(dict(LEFTOVER, dtype=torch.bfloat16), id="bf16-leftover"),
]


def _group_args(
    n=2,
    cin=5,
    cout=19,
    h=7,
    w=6,
    k=3,
    s=1,
    p=1,
    layout="mixed",
    bias=True,
    residual=False,
    relu=True,
    dtype=torch.float32,
    block=32,
):
    g = torch.Generator().manual_seed(cin * cout + k + s)
    weight = conv_weight(cout, cin, k, g)
    if layout == "leftover":
        mask = torch.rand(weight.shape, generator=g) < 0.1
        groups = _leftover_layout(mask)
    elif layout == "all-rows-few-columns":
        groups, mask = _all_rows_few_columns(cout, cin, k, g)
    else:
        groups, mask = group_layout(cout, cin, k, layout, g)
    pack = pack_groups(
        weight,
        mask,
        groups,
        torch.randn(cout, generator=g) if bias else None,
        stride=s,
        padding=p,
        block_n=block,
        k_pad=block,
    ).to(dtype=dtype)
    x, res, _ = _inputs(n, cin, cout, h, w, k, s, p, dtype, g, residual)
    return (
        x,
        pack.values,
        pack.val_ptr,
        pack.row_idx,
        pack.row_ptr,
        pack.col_idx,
        pack.col_code,
        pack.col_ptr,
        pack.tile_group,
        pack.tile_row,
        pack.fill_idx,
        pack.bias,
        res,
        cin,
        cout,
        list(pack.kernel_size),
        list(pack.stride),
        list(pack.padding),
        list(pack.dilation),
        pack.block_n,
        pack.k_pad,
        pack.col_run,
        pack.max_cols,
        relu,
    )


@pytest.mark.parametrize("kwargs", GROUP_CASES)
def test_opcheck_group_conv(kwargs, monkeypatch):
    kwargs = dict(kwargs)  # the parameter's own dict is shared between runs
    if kwargs.pop("many_sets", False):  # the path for more column sets than _MANY_SETS
        monkeypatch.setattr(ops.group, "_MANY_SETS", 0)
    opcheck(GROUP_OP, _group_args(**kwargs), test_utils=ALL_CHECKS)


# ---------------------------------------------------------------- opcheck, autograd


@pytest.mark.parametrize("which", ["channel", "group"])
def test_ops_are_inference_only(which):
    """The ops register no backward: the units are eval-only (``train()`` raises) and
    hold buffers, not parameters. With an input that needs grad, opcheck's AOT checks
    (check_gradients="auto") backpropagate through the op and fail with "Trying to
    backward through sparse_ops.channel_conv.default but no autograd formula was
    registered", so they are left out here; the tests above run every check with inputs
    that need no grad, as inference does. What is checked with a grad-requiring input:
    schema, the Autograd-key registration (custom_op's default kernel), fake vs real,
    and that a backward raises instead of returning a silently wrong gradient."""
    op, args = (CHANNEL_OP, _channel_args()) if which == "channel" else (GROUP_OP, _group_args())
    x = args[0].detach().requires_grad_()
    args = (x, *args[1:])
    opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y = op(*args)
    assert y.requires_grad  # not silently detached: the backward below must raise
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        y.sum().backward()


# ---------------------------------------------------------------- converted networks


# The smallest input at which res20s's last stage is still wider than 1×1 (8, 4, 2):
# bias maps still vary at the border, and the compile stays cheap.
HW = 8
# id: (ticket kind, convert mode, on_unstructured, device the converter lays out for)
NETWORKS = {
    # channel units with bias maps, residual fusion, narrowed activations, Relayouts,
    # input gathers and output scatters (the CPU cost model keeps the narrowest layouts)
    "refill-channel": ("refill", "channel", "error", "cpu"),
    # the same ticket laid out for the GPU (convert's default device): channel widths
    # rounded up to multiples of 8, zero-weight rows instead of scatters
    "refill-channel-gpu-layout": ("refill", "channel", "error", None),
    # group units from a regroup ticket (a channel unit for the unpruned stem)
    "regroup-group": ("regroup", "group", "error", "cpu"),
    # regrouped on the fly: group units + leftover packs (the residual path of the op)
    "random-group-leftover": ("random", "group", "regroup", "cpu"),
}
_converted: dict[tuple, tuple] = {}


def _network(name: str, dtype: torch.dtype = torch.float32):
    """``(converted, masked reference)``, built once per session (conversion is pure)."""
    if (name, dtype) not in _converted:
        kind, mode, policy, device = NETWORKS[name]
        model = trained_like("res20s")
        state = imp.capture_state(model)
        g = torch.Generator().manual_seed(1)
        masks = {n: torch.rand(state[n].shape, generator=g) < 0.4 for n in imp.prunable(model)}
        ticket = Ticket(masks, state, "res20s")
        if kind == "refill":
            ticket = structure.refill(ticket)
        elif kind == "regroup":
            ticket = structure.regroup(ticket, RegroupConfig(parts=1))
        fast = convert(
            model,
            ticket,
            mode=mode,
            on_unstructured=policy,
            regroup=RegroupConfig(parts=1),
            input_size=(3, HW, HW),
            dtype=dtype,
            device=device,
        )
        _converted[name, dtype] = (fast, masked_model(model, ticket))
    return _converted[name, dtype]


def _x(n: int = 2, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 3, HW, HW, generator=torch.Generator().manual_seed(n)).to(dtype)


def _units(fast: nn.Module) -> dict[str, int]:
    """How many custom-op calls one forward makes."""
    calls = {"channel_conv": 0, "group_conv": 0}
    for m in fast.modules():
        if isinstance(m, units.ChannelPrunedConv2d):
            calls["channel_conv"] += 1
        elif isinstance(m, units.GroupSparseConv2d):
            calls["group_conv"] += 2 if m.has_leftover else 1
    return calls


def test_networks_exercise_every_feature():
    """The networks below cover what the tests claim they cover."""
    refill = _network("refill-channel")[0]
    channel_units = [m for m in refill.modules() if isinstance(m, units.ChannelPrunedConv2d)]
    assert any(u.const_weight is not None for u in channel_units)  # bias maps
    assert any(u.in_idx is not None for u in channel_units)
    assert any(u.out_idx is not None for u in channel_units)
    assert any(isinstance(m, units.Relayout) for m in refill.modules())
    regroup = _network("regroup-group")[0]
    assert _units(regroup)["group_conv"] > 0
    leftover = _network("random-group-leftover")[0]
    group_units = [m for m in leftover.modules() if isinstance(m, units.GroupSparseConv2d)]
    assert any(u.has_leftover for u in group_units)
    x = _x()
    for name in NETWORKS:
        fast, reference = _network(name)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_opcheck_every_call_a_converted_network_makes(name, monkeypatch):
    """opcheck on the arguments the converter's units really pass (one call of each
    distinct kind: op, which optional tensors are set, ReLU, kernel, stride, blocking)."""
    fast, _ = _network(name)
    calls = {}

    def recorder(op, key_of):
        def record(*args):
            calls.setdefault(key_of(args), (op, args))
            return op(*args)

        return record

    def channel_key(a):  # which of bias .. residual are None, stride, kernel, relu
        return (
            "channel",
            *(t is None for t in a[2:8]),
            tuple(a[10]),
            tuple(a[1].shape[1:3]),
            a[13],
        )

    def group_key(a):  # bias, residual None; kernel, stride, block_n, k_pad, col_run, relu
        return ("group", a[11] is None, a[12] is None, tuple(a[15]), tuple(a[16]), *a[19:22], a[23])

    monkeypatch.setattr(channel_unit, "channel_conv_op", recorder(CHANNEL_OP, channel_key))
    monkeypatch.setattr(group_unit, "group_conv_op", recorder(GROUP_OP, group_key))
    # Plain eager units skip the dispatcher; here every call goes through the op.
    monkeypatch.setattr(channel_unit, "plain_eager_call", lambda *tensors: False)
    monkeypatch.setattr(group_unit, "plain_eager_call", lambda *tensors: False)
    with torch.no_grad():
        fast(_x())
    assert calls
    for op, args in calls.values():
        opcheck(op, args, test_utils=ALL_CHECKS)


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        pytest.param("refill-channel", torch.float32, id="refill-channel"),
        pytest.param("random-group-leftover", torch.float32, id="random-group-leftover"),
        pytest.param("random-group-leftover", torch.bfloat16, id="random-group-leftover-bf16"),
    ],
)
def test_torch_compile_fullgraph_inductor_equals_eager(name, dtype):
    fast, _ = _network(name, dtype)
    compiled = torch.compile(fast, fullgraph=True)  # inductor, the default backend
    x = _x(2, dtype)
    with torch.no_grad():
        expected, got = fast(x), compiled(x)
    # Inductor runs the custom ops as they are and generates code for the rest (Relayout,
    # pooling, Linear): only accumulation order and where bf16 is rounded may differ.
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    torch.testing.assert_close(got, expected, **tol)


# ---------------------------------------------------------------- torch.export


@pytest.mark.parametrize("name", list(NETWORKS))
def test_torch_export_round_trip(name, tmp_path):
    fast, _ = _network(name)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(fast, (_x(2),), dynamic_shapes=({0: batch},))
    # The custom ops stay one opaque node per unit call (not traced into, not decomposed).
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    calls = _units(fast)
    assert targets.count(CHANNEL_OP) == calls["channel_conv"]
    assert targets.count(GROUP_OP) == calls["group_conv"]
    path = tmp_path / f"{name}.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path).module()
    for n in (2, 1, 3):  # the batch size it was exported at, and others
        x = _x(n)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), fast(x), atol=0, rtol=0)


def test_exported_file_loads_in_a_fresh_process_after_import_sparse_ops(tmp_path):
    """``import sparse_ops`` is all a process needs to load and run an exported program
    (the custom ops are registered on import, without importing Triton)."""
    fast, _ = _network("random-group-leftover")
    x = _x(2)
    torch.export.save(torch.export.export(fast, (x,)), tmp_path / "net.pt2")
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, torch, sparse_ops\n"
        "assert 'triton' not in sys.modules, 'import sparse_ops imported triton'\n"
        "d = sys.argv[1]\n"
        "program = torch.export.load(d + '/net.pt2')\n"
        "with torch.no_grad():\n"
        "    torch.save(program.module()(torch.load(d + '/x.pt')), d + '/y.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), fast(x), atol=0, rtol=0)


# ---------------------------------------------------------------- eager dispatch


def test_eager_units_call_the_op_only_when_something_may_record(monkeypatch):
    """A plain eager call skips the dispatcher (host time per layer); anything that may
    record the call (a fake or proxy tensor, a dispatch mode, a gradient) goes through
    the registered op, so traced graphs keep one opaque op per layer."""
    fast, _ = _network("refill-channel")
    unit = next(m for m in fast.modules() if isinstance(m, units.ChannelPrunedConv2d))
    x = torch.randn(2, unit.in_channels, 8, 8).contiguous(memory_format=torch.channels_last)
    through = []

    def spy(name, real):
        def call(*args, **kwargs):
            through.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(channel_unit, "channel_conv_op", spy("op", channel_unit.channel_conv_op))
    monkeypatch.setattr(ops, "channel_conv", spy("direct", ops.channel_conv))
    with torch.no_grad():
        direct = unit(x)
        again = unit(x)
    assert through == ["direct", "direct"]
    torch.testing.assert_close(again, direct, rtol=0, atol=0)
    through.clear()
    with torch.enable_grad():
        via_op = unit(x.clone().requires_grad_())
    assert through[0] == "op"  # (the op's implementation then calls ops.channel_conv)
    torch.testing.assert_close(via_op.detach(), direct, rtol=0, atol=0)
    through.clear()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        shape = unit(mode.from_tensor(x)).shape  # the unit's buffers stay real tensors
    assert through == ["op"] and shape == direct.shape
    # A moved or reloaded buffer is picked up: the kept plan is rebuilt.
    unit.weight = unit.weight * 2
    with torch.no_grad():
        doubled = unit(x)
    assert not torch.equal(doubled, direct)


def test_kept_plan_sees_in_place_bias_updates_after_a_dtype_change():
    """After .to(bf16) a kept plan holds an fp32 copy of the bias; an in-place update of
    the buffer (what load_state_dict does) must reach it."""
    fast, _ = _network("refill-channel")
    unit = next(m for m in fast.modules() if isinstance(m, units.ChannelPrunedConv2d))
    unit = unit.to(torch.bfloat16)
    x = torch.randn(1, unit.in_channels, 8, 8).to(torch.bfloat16)
    with torch.no_grad():
        before = unit(x).float()
        state = {k: v.clone() for k, v in unit.state_dict().items()}
        state["bias"] = state["bias"] + 100
        unit.load_state_dict(state)
        after = unit(x).float()
        via_op = channel_unit.channel_conv_op(
            x,
            unit.weight,
            unit.bias.float(),
            unit.in_idx,
            unit.out_idx,
            unit.fill_idx,
            None,
            None,
            unit.in_channels,
            unit.out_channels,
            list(unit.stride),
            list(unit.padding),
            list(unit.dilation),
            unit.relu,
        ).float()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, via_op, rtol=0, atol=0)


def test_module_tensors_that_want_gradients_go_through_the_op():
    fast, _ = _network("refill-channel")
    unit = next(m for m in fast.modules() if isinstance(m, units.ChannelPrunedConv2d))
    x = torch.randn(1, unit.in_channels, 8, 8)
    assert plain_eager_call(x, None, unit.weight, unit.bias)
    weight = unit.weight.detach().requires_grad_()
    with torch.enable_grad():
        assert not plain_eager_call(x, None, weight, unit.bias)
    with torch.no_grad():
        assert plain_eager_call(x, None, weight, unit.bias)
