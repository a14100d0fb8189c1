"""The converter: converted module == masked dense network, for every built-in architecture."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from model_cases import trained_like
from torch import nn

from sparse_ops import SparseOpsError, Ticket, imp, models, ops, structure
from sparse_ops.convert import (
    ConvertError,
    SaveError,
    convert,
    load_converted,
    masked_model,
    save_converted,
)
from sparse_ops.nn import ChannelPrunedConv2d, GroupSparseConv2d
from sparse_ops.structure import RegroupConfig

TOL = {"atol": 1e-4, "rtol": 1e-4}
FAST_REGROUP = RegroupConfig(parts=1)  # the partitioner has its own tests; keep CI fast


def _ticket(model: nn.Module, arch: str, kind: str, density: float = 0.4) -> Ticket:
    names = imp.prunable(model)
    state = imp.capture_state(model)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(state[n].shape, generator=g) < density for n in names}
    ticket = Ticket(masks, state, arch)
    if kind == "refill":
        return structure.refill(ticket)
    if kind == "regroup":
        return structure.regroup(ticket, FAST_REGROUP)
    return ticket  # random unstructured


CASES = [("refill", "error"), ("regroup", "error"), ("random", "regroup"), ("random", "dense")]


@pytest.mark.parametrize(("kind", "policy"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
@pytest.mark.parametrize("arch", models.names())
def test_converted_equals_masked_dense(arch, kind, policy):
    model = trained_like(arch)
    ticket = _ticket(model, arch, kind)
    options = {"input_size": (3, 32, 32), "regroup": FAST_REGROUP, "return_report": True}
    fast, report = convert(model, ticket, mode="auto", on_unstructured=policy, **options)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)
    assert report.traced and report.flops_after <= report.flops_dense


@pytest.mark.parametrize("mode", ["channel", "group", "auto"])
def test_modes_on_res20s_with_default_regroup(mode):
    model = trained_like("res20s")
    for kind in ("refill", "regroup"):
        ticket = _ticket(model, "res20s", kind)
        if kind == "regroup":
            ticket = structure.regroup(Ticket(ticket.masks, ticket.weights, "res20s"))
        fast = convert(model, ticket, mode=mode, on_unstructured="regroup")
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)


def test_channel_mode_narrows_and_folds():
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "refill")
    fast, report = convert(model, ticket, mode="channel", return_report=True)
    assert report.notes["bn_folded"] == 19 and report.notes["residual_fused"] == 9
    assert report.notes["narrowed_activations"] > 0
    units = [m for m in fast.modules() if isinstance(m, ChannelPrunedConv2d)]
    assert any(u.out_channels < 16 for u in units)  # a block's inner activation is narrow
    assert any(u.const_weight is not None for u in units)  # removed constants → bias map
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())


def test_res56s_refill_half_channels_flops():
    model = trained_like("res56s")
    names = imp.prunable(model)
    state = imp.capture_state(model)
    masks = {n: torch.rand(state[n].shape) < 0.5 for n in names}
    ticket = structure.refill(Ticket(masks, state, "res56s"), criterion="remain")
    _, report = convert(model, ticket, mode="channel", return_report=True)
    ratio = report.flops_after / report.flops_dense
    assert ratio <= 0.55, ratio


def test_group_mode_uses_group_units_and_ticket_layouts():
    model = trained_like("vgg16_bn")
    ticket = _ticket(model, "vgg16_bn", "regroup")
    fast, report = convert(model, ticket, mode="group", return_report=True)
    units = [m for m in fast.modules() if isinstance(m, GroupSparseConv2d)]
    assert len(units) == 12  # every pruned conv (the stem is not pruned)
    assert {r.representation for r in report.layers if r.kind == "conv"} >= {"group"}


def test_through_triton_kernels_under_the_interpreter():
    # 8×8 inputs keep the interpreter fast; every layer type still runs (stride 2 included)
    model = trained_like("res20s")
    x = torch.randn(1, 3, 8, 8)
    for kind, policy in [("refill", "error"), ("random", "regroup")]:
        ticket = _ticket(model, "res20s", kind)
        fast = convert(
            model,
            ticket,
            mode="auto",
            on_unstructured=policy,
            regroup=FAST_REGROUP,
            input_size=(3, 8, 8),
        )
        with torch.no_grad(), ops.backend("triton"):
            got = fast(x)
        with torch.no_grad():
            torch.testing.assert_close(got.contiguous(), masked_model(model, ticket)(x), **TOL)


def test_save_and_load_give_identical_outputs(tmp_path):
    model = trained_like("mobilenet")
    for kind, policy in [("refill", "error"), ("random", "regroup")]:
        ticket = _ticket(model, "mobilenet", kind)
        fast = convert(model, ticket, on_unstructured=policy, regroup=FAST_REGROUP)
        back = load_converted(save_converted(fast, tmp_path / f"{kind}.safetensors"))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(fast(x), back(x))


ROUND_TRIP_ARCHS = ["res20s", "vgg16_bn", "wrn32", "mobilenet", "cifar_resnet_20", "res18"]


@pytest.mark.parametrize(("kind", "policy"), CASES, ids=[f"{k}-{p}" for k, p in CASES])
@pytest.mark.parametrize("arch", ROUND_TRIP_ARCHS)
def test_save_and_load_are_bitwise_identical(arch, kind, policy, tmp_path):
    """The property test's models (one per family), saved and loaded: the same bits out,
    at the conversion's input size (saved bias maps) and at another (recomputed ones)."""
    model = trained_like(arch)
    fast = convert(
        model,
        _ticket(model, arch, kind),
        on_unstructured=policy,
        regroup=FAST_REGROUP,
        input_size=(3, 32, 32),
    )
    back = load_converted(save_converted(fast, tmp_path / "c.safetensors"))
    for shape in [(2, 3, 32, 32), (1, 3, 40, 40)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(fast(x), back(x)), shape


class _Pools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.avg = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, divisor_override=5)
        self.max = nn.MaxPool2d(2, ceil_mode=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.max(self.avg(self.conv(x))).mean((2, 3)))


def test_saved_pooling_modules_keep_every_argument_that_changes_the_result(tmp_path):
    model = _Pools().eval()
    ticket = Ticket({"conv.weight": torch.rand(8, 3, 3, 3) > 0.5}, imp.capture_state(model))
    fast = convert(model, ticket, input_size=(3, 9, 9), on_unstructured="dense")
    back = load_converted(save_converted(fast, tmp_path / "pools.safetensors"))
    assert back.avg.divisor_override == 5 and back.max.ceil_mode
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fast(x), back(x))


def test_saved_file_from_a_newer_version(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparse_ops.checkpoint_io import read_safetensors

    model = trained_like("res20s")
    path = save_converted(convert(model, _ticket(model, "res20s", "refill")), tmp_path / "c.st")
    _, metadata = read_safetensors(path)
    save_file(load_file(str(path)), str(path), metadata={**metadata, "format_version": "9"})
    with pytest.raises(SaveError, match="newer sparse-ops.*format_version 9"):
        load_converted(path)


def test_loading_refuses_functions_outside_the_allowlist(tmp_path):
    from safetensors.torch import load_file, save_file

    from sparse_ops.checkpoint_io import read_safetensors

    model = trained_like("res20s")
    path = save_converted(convert(model, _ticket(model, "res20s", "refill")), tmp_path / "c.st")
    _, metadata = read_safetensors(path)
    graph = json.loads(metadata["graph"])
    graph[3]["op"], graph[3]["target"] = "call_function", "os.system"
    metadata["graph"] = json.dumps(graph)
    save_file(load_file(str(path)), str(path), metadata=metadata)
    with pytest.raises(SaveError, match="function 'os.system' is not allowed"):
        load_converted(path)


def test_model_in_training_mode():
    with pytest.raises(ConvertError, match="training mode: call model.eval"):
        convert(models.create("res20s").train(), Ticket({}))


def test_hooks_we_cannot_honour():
    model = trained_like("res20s")
    model.layer1[0].conv1.register_forward_hook(lambda *a: None)
    with pytest.raises(ConvertError, match="'layer1.0.conv1' carry forward/backward hooks"):
        convert(model, Ticket({}))


def test_ticket_that_does_not_fit():
    model = trained_like("res20s")
    bad = Ticket({"layer1.0.conv1.weight": torch.ones(16, 8, 3, 3)})
    with pytest.raises(
        ConvertError, match=r"does not fit.*layer1\.0\.conv1\.weight \(16, 8, 3, 3\)"
    ):
        convert(model, bad)


def test_unstructured_masks_error_lists_layers():
    model = trained_like("res20s")
    with pytest.raises(ConvertError, match=r"cannot run: 'layer1\.0\.conv1 \(unstructured\)'"):
        convert(model, _ticket(model, "res20s", "random"), mode="channel")


def test_unsupported_layer_type_in_a_pruned_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()).eval()
    ticket = Ticket({"0.weight": torch.rand(4, 3, 3, 3) < 0.5})
    with pytest.raises(ConvertError, match=r"'0' \(padding=\(1, 1\), padding_mode='reflect'\)"):
        convert(model, ticket)


def test_input_size_the_model_cannot_run():
    model = trained_like("cifar_vgg_11")
    with pytest.raises(ConvertError, match=r"does not run on an input of shape \(1, 3, 64, 64\)"):
        convert(model, _ticket(model, "cifar_vgg_11", "refill"), input_size=(3, 64, 64))


def test_bad_mode_and_policy():
    model = trained_like("res20s")
    with pytest.raises(ConvertError, match="mode must be one of"):
        convert(model, Ticket({}), mode="fast")
    with pytest.raises(ConvertError, match="on_unstructured must be one of"):
        convert(model, Ticket({}), on_unstructured="ignore")


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return torch.relu(y)
        return y


def test_fallback_when_tracing_fails():
    torch.manual_seed(0)
    model = Untraceable().eval()
    ticket = Ticket({"conv.weight": torch.rand(8, 3, 3, 3) < 0.5})
    fast, report = convert(model, ticket, return_report=True)
    assert not report.traced and "could not trace" in report.notes["fallback"]
    assert isinstance(fast.conv, ChannelPrunedConv2d)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)
    with pytest.raises(SaveError, match="only traced conversions can be saved"):
        save_converted(fast, "/tmp/never.safetensors")


def test_torch_compile_sees_no_graph_break():
    model = trained_like("res20s")
    for kind, mode in [("refill", "channel"), ("regroup", "group")]:
        fast = convert(model, _ticket(model, "res20s", kind), mode=mode)
        compiled = torch.compile(fast, backend="eager", fullgraph=True)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), fast(x))


def test_converted_module_is_eval_only():
    fast = convert(trained_like("res20s"), Ticket({}))
    with pytest.raises(RuntimeError, match="inference module"):
        fast.train()


def test_report_is_json_ready():
    model = trained_like("res20s")
    _, report = convert(model, _ticket(model, "res20s", "refill"), return_report=True)
    d = json.loads(json.dumps(report.as_dict()))
    assert d["flops_after"] < d["flops_dense"] and d["layers"][0]["name"] == "conv1"
    assert "MFLOPs" in report.render()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2"])
def test_torchvision_models(name):
    tv = pytest.importorskip("torchvision.models")
    model = getattr(tv, name)(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.bias.normal_(0, 0.3)
    model.eval()
    ticket = _ticket(model, None, "refill")
    fast = convert(model, ticket, mode="auto", input_size=(3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
def test_gpu_path_cuda_graphs_and_inductor():
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "refill")
    fast = convert(model, ticket, mode="channel", dtype=torch.float16, device="cuda")
    ref = masked_model(model, ticket).cuda().half()
    x = torch.randn(8, 3, 32, 32, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = ref(x)
        torch.testing.assert_close(fast(x), expected, atol=2e-2, rtol=2e-2)
        compiled = torch.compile(fast, fullgraph=True)
        torch.testing.assert_close(compiled(x), expected, atol=2e-2, rtol=2e-2)
        static_x = x.clone()
        fast(static_x)  # warm up (autotuning happens outside the capture)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = fast(static_x)
        static_x.copy_(torch.randn_like(static_x))
        graph.replay()
        torch.testing.assert_close(static_y, ref(static_x), atol=2e-2, rtol=2e-2)


def test_auto_mode_prices_group_units_for_the_target_device():
    """At this ticket's block densities (80% sparse) a CPU group unit is slower than the
    dense conv (docs/CONVERT.md, cost model): auto avoids it there, not on a GPU."""
    from sparse_ops.convert import CostModel
    from sparse_ops_bench.tickets import make_ticket

    model = models.create("res20s").eval()
    ticket = make_ticket(model, "regroup", 0.8)
    assert CostModel.for_device("cpu").group_overhead > CostModel.for_device(None).group_overhead
    x = torch.randn(2, 3, 32, 32)
    kinds = {}
    for device in (None, "cpu"):
        fast, report = convert(model, ticket, mode="auto", device=device, return_report=True)
        kinds[device] = {r.representation for r in report.layers if r.kind == "conv"}
        with torch.no_grad():
            torch.testing.assert_close(
                fast(x), masked_model(model, ticket)(x), rtol=1e-4, atol=1e-4
            )
    assert "group" in kinds[None]
    assert "group" not in kinds["cpu"]


def test_a_model_pruned_by_ticket_apply_converts():
    """The README flow: ticket.apply (torch.nn.utils.prune hooks, ``weight`` a non-leaf
    tensor) then convert, on the model itself and with the ticket."""
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "refill")
    pruned = ticket.apply(models.create("res20s"), "weights").eval()
    assert not pruned.layer1[0].conv1.weight.is_leaf  # what copy.deepcopy refuses
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fast = convert(pruned, ticket)  # before any forward: weight still non-leaf
    reference = masked_model(pruned)
    with torch.no_grad():
        expected = pruned(x)
        torch.testing.assert_close(fast(x), expected, **TOL)
        torch.testing.assert_close(reference(x), expected, **TOL)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_an_unpruned_conv_with_another_padding_mode_is_refused(mode):
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, padding_mode=mode),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
    ).eval()
    mask = torch.zeros(8, 8, 3, 3, dtype=torch.bool)
    mask[:4] = True
    with pytest.raises(ConvertError, match=rf"'0' \(padding=\(1, 1\), padding_mode='{mode}'\)"):
        convert(net, Ticket({"3.weight": mask}), input_size=(3, 8, 8))


def test_same_and_valid_padding_run_as_the_integers_they_mean():
    torch.manual_seed(0)
    same = nn.Conv2d(3, 8, 5, padding="same", dilation=2)
    net = nn.Sequential(
        same, nn.ReLU(), nn.Conv2d(8, 8, 3, padding="valid"), nn.Conv2d(8, 6, 3, padding=1)
    ).eval()
    mask = torch.ones(6, 8, 3, 3, dtype=torch.bool)
    mask[0] = False  # one output channel pruned
    ticket = Ticket({"3.weight": mask})
    x = torch.randn(2, 3, 11, 9)
    fast = convert(net, ticket, input_size=(3, 11, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(net, ticket)(x), **TOL)
    uneven = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same")).eval()  # pads 0 left, 1 right
    with pytest.raises(ConvertError, match=r"'0' \(padding='same'"):
        convert(uneven, Ticket({}), input_size=(3, 8, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_save_and_load_keep_a_half_precision_module_whole(dtype, tmp_path):
    model = trained_like("res20s")
    fast = convert(model, _ticket(model, "res20s", "refill"), dtype=dtype)
    back = load_converted(save_converted(fast, tmp_path / "half.safetensors"))
    assert {p.dtype for p in back.parameters()} == {dtype}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        assert torch.equal(fast(x), back(x))


def test_bad_dtype_and_cost_model_are_convert_errors():
    from sparse_ops.convert import CostModel

    model = models.create("res20s").eval()
    for dtype in (torch.int8, "float16", torch.float64):
        with pytest.raises(ConvertError, match="dtype must be torch.float32"):
            convert(model, Ticket({}, None, "res20s"), dtype=dtype)
    with pytest.raises(ConvertError, match="group_overhead must be > 0, got -1"):
        CostModel(group_overhead=-1)
    with pytest.raises(ConvertError, match="block_n must be a power of two ≥ 16, got 24"):
        CostModel(block_n=24)


def test_regroup_names_the_partitioning_model_keyword():
    from sparse_ops.structure import RegroupError

    ticket = _ticket(models.create("res20s"), "res20s", "random")
    with pytest.raises(RegroupError, match=r"RegroupConfig\(model='hypergraph'\)"):
        structure.regroup(ticket, model="hypergraph")


def test_report_names_a_pruned_linear_layers_structure():
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32)).eval()
    mask = torch.rand(32, 48, generator=torch.Generator().manual_seed(0)) < 0.5
    fast, report = convert(
        net, Ticket({"1.weight": mask}), input_size=(3, 4, 4), return_report=True
    )
    (row,) = report.layers
    assert (row.kind, row.structure, row.representation) == ("linear", "unstructured", "linear")
    assert row.detail["kept_weights"] == int(mask.sum())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(net, Ticket({"1.weight": mask}))(x))


def test_group_units_written_before_column_codes_still_load(tmp_path):
    """A file from before GroupPack format 2 (no col_code tensors, no col_run): the codes
    are derived from col_idx on load and the module computes the same bits."""
    from safetensors.torch import save_file

    from sparse_ops.checkpoint_io import read_safetensors

    model = trained_like("res20s")
    fast = convert(model, _ticket(model, "res20s", "regroup"), mode="group", regroup=FAST_REGROUP)
    path = save_converted(fast, tmp_path / "new.safetensors")
    tensors, metadata = read_safetensors(path)
    modules = json.loads(metadata["modules"])
    old = {k: v for k, v in tensors.items() if not k.endswith("_col_code")}
    assert len(old) < len(tensors)
    for entry in modules.values():
        config = entry["config"]
        if entry["type"] == "GroupSparseConv2d":
            config.pop("col_run", None)
            if config.get("leftover"):
                config["leftover"] = config["leftover"][:2]
            config["tensors"] = [t for t in config["tensors"] if not t.endswith("_col_code")]
    save_file(
        old,
        str(tmp_path / "old.safetensors"),
        metadata={**metadata, "modules": json.dumps(modules)},
    )
    back = load_converted(tmp_path / "old.safetensors")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(fast(x), back(x))


def test_convert_with_a_bad_stored_group_layout_raises_a_sparse_ops_error():
    """docs/CONVERT.md, 'Bad input': every error convert raises is a SparseOpsError, also
    when the packer refuses a stored layout (a row in two groups): a PackingError, which
    is the kernels' FormatError too (found by the review of the format move)."""
    model = trained_like("res20s")
    ticket = _ticket(model, "res20s", "regroup")
    meta = copy.deepcopy(ticket.meta)
    layer = "layer1.0.conv1.weight"
    meta["groups"][layer].append(dict(meta["groups"][layer][0]))  # row 0 in two groups
    bad = Ticket(dict(ticket.masks), ticket.weights, ticket.arch, meta=meta)
    with pytest.raises(SparseOpsError, match="rows shared by two groups"):
        convert(model, bad, mode="group", regroup=FAST_REGROUP, input_size=(3, 32, 32))
