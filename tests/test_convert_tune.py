"""convert(tune=x): per-layer timing picks a representation, the network check falls back,
the cache remembers, the saved file keeps the record — and the result stays exact."""

from __future__ import annotations

import json

import pytest
import torch
from model_cases import trained_like
from torch import nn

from sparse_ops import Ticket, imp, structure
from sparse_ops.cli import main
from sparse_ops.convert import (
    ConvertError,
    SaveError,
    TuneOptions,
    convert,
    load_converted,
    masked_model,
    save_converted,
)
from sparse_ops.convert import tune as tune_module
from sparse_ops.convert.units import as_torch_conv
from sparse_ops.nn import ChannelPrunedConv2d, GroupSparseConv2d, TorchConv2d
from sparse_ops.structure import RegroupConfig
from sparse_ops_kernels.formats import ChannelPlan

TOL = {"atol": 1e-4, "rtol": 1e-4}
FAST_REGROUP = RegroupConfig(parts=1)
# Real timing, as little of it as still exercises every step.
QUICK = TuneOptions(
    warmup=1, min_repeats=1, max_repeats=2, site_budget_s=0.0, network_repeats=1, cache=None
)
SHAPE = (2, 3, 16, 16)


def _model(seed: int = 0) -> nn.Module:
    return trained_like("res20s", seed, scale=False)


def _ticket(model: nn.Module, kind: str, density: float = 0.3) -> Ticket:
    state = imp.capture_state(model)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(state[n].shape, generator=g) < density for n in imp.prunable(model)}
    ticket = Ticket(masks, state, "res20s")
    if kind == "refill":
        return structure.refill(ticket)
    if kind == "regroup":
        return structure.regroup(ticket, FAST_REGROUP)
    return ticket


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def _convert(model, ticket, options=QUICK, **kw):
    kw = {"mode": "auto", "on_unstructured": "regroup", "regroup": FAST_REGROUP, **kw}
    return convert(
        model, ticket, device="cpu", tune=_x(1), tune_options=options, return_report=True, **kw
    )


def _assert_exact(fast, model, ticket):
    x = _x(3)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), masked_model(model, ticket)(x), **TOL)


class FakeTimes:
    """Stands in for the timer: ``site(label, unit)`` and ``network(name, module)`` give
    the milliseconds each call 'takes'. Counts the calls it answered."""

    def __init__(self, site, network=None):
        self.site, self.network, self.calls = site, network, 0

    def __call__(self, calls, device, options, budget_s, repeats=None):
        self.calls += 1
        out = {}
        for name, fn in calls.items():
            target = fn.__defaults__[0]  # the unit or network the call runs
            if name in ("tuned", "folded", "narrow"):
                ms = self.network(name, target) if self.network else 1.0
            else:
                ms = self.site(name, target)
            out[name] = [ms, ms, ms]
        return out


def _units(module, kind):
    return [m for m in module.modules() if isinstance(m, kind)]


@pytest.mark.parametrize(
    ("kind", "mode", "policy"),
    [
        ("refill", "auto", "error"),
        ("regroup", "auto", "error"),
        ("random", "auto", "regroup"),
        ("random", "auto", "dense"),
        ("regroup", "channel", "dense"),
        ("regroup", "group", "error"),
    ],
)
def test_tuned_module_equals_masked_network(kind, mode, policy):
    model = _model()
    ticket = _ticket(model, kind)
    fast, report = _convert(model, ticket, mode=mode, on_unstructured=policy)
    _assert_exact(fast, model, ticket)
    record = report.notes["tuning"]
    assert set(record["network"]["times_ms"]) == {"tuned", "folded", "narrow"}
    tuned = [r for r in report.layers if "tuning" in r.detail]
    assert set(record["sites"]) == {r.name for r in tuned}
    # Nothing to time where each layer has one representation: masked dense convs on
    # whole layouts, or mode="group" (the group unit of each structured layer).
    assert bool(tuned) == ((kind, policy) != ("random", "dense") and mode != "group")
    for row in tuned:
        t = row.detail["tuning"]
        assert t["chosen"] in t["times_ms"] and len(t["times_ms"]) >= 2
        unit = fast.get_submodule(row.name)
        assert isinstance(unit, GroupSparseConv2d) == (t["chosen"] in ("group", "regroup"))
    if mode == "channel":  # the mode bounds what tuning may pick
        assert not _units(fast, GroupSparseConv2d)
    assert "tuned on" in report.render()


def test_the_fastest_candidate_is_installed(monkeypatch):
    model = _model()
    ticket = _ticket(model, "regroup")
    fake = FakeTimes(lambda label, unit: 0.5 if label == "group" else 2.0)
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    fast, report = _convert(model, ticket)
    _assert_exact(fast, model, ticket)
    groups = [r for r in report.layers if r.detail.get("tuning", {}).get("chosen") == "group"]
    assert groups and all(r.representation == "group" for r in groups)
    assert all(isinstance(fast.get_submodule(r.name), GroupSparseConv2d) for r in groups)

    fake.site = lambda label, unit: 0.5 if label == "padded" else 2.0
    fast, report = _convert(model, _ticket(model, "refill"))
    padded = [r for r in report.layers if r.detail.get("tuning", {}).get("chosen") == "padded"]
    assert padded
    for row in padded:  # no gather, no scatter: whole layouts with zero weights
        unit = fast.get_submodule(row.name)
        assert unit.in_idx is None and unit.out_idx is None
        assert row.detail["tuning"]["reason"] == "fastest"
    _assert_exact(fast, model, _ticket(model, "refill"))


def test_ties_go_to_fewer_multiply_adds(monkeypatch):
    model = _model()
    ticket = _ticket(model, "refill")
    # padded does more work (zero rows/columns) and is 2% faster: within noise.
    fake = FakeTimes(lambda label, unit: 0.98 if label == "padded" else 1.0)
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    _, report = _convert(model, ticket)
    rows = [r for r in report.layers if "padded" in r.detail.get("tuning", {}).get("times_ms", {})]
    assert rows
    for row in rows:
        assert row.detail["tuning"]["chosen"] == "channel"
        assert "fewer multiply-adds" in row.detail["tuning"]["reason"]


def test_network_slower_than_baseline_falls_back_layer_by_layer(monkeypatch):
    model = _model()
    ticket = _ticket(model, "regroup")
    gains = {}

    def site(label, unit):
        # group wins everywhere, by a margin that grows with the layer's position
        gains.setdefault(unit.name, len(gains) + 1)
        return 1.0 if label != "group" else 1.0 - 0.01 * gains[unit.name]

    def network(name, module):
        if name != "tuned":
            return {"folded": 100.0, "narrow": 3.0}[name]
        return 1.0 + len(_units(module, GroupSparseConv2d))  # each group unit costs 1 ms

    monkeypatch.setattr(tune_module, "time_interleaved", FakeTimes(site, network))
    fast, report = _convert(model, ticket)
    net = report.notes["tuning"]["network"]
    left = len(_units(fast, GroupSparseConv2d))
    assert left == 2 and net["times_ms"]["tuned"] == 3.0  # 1 + 2 ≤ 3 × 1.05: it stops there
    assert not net["slower_than_baseline"]
    undone = list(net["fallbacks"])
    # smallest gain first: the earliest layers (gain 0.01, 0.02, ...) went back first
    ranked = sorted((g, n) for n, g in gains.items() if n in report.notes["tuning"]["sites"])
    groups_before = [
        n for _, n in ranked if "group" in report.notes["tuning"]["sites"][n]["times_ms"]
    ]
    assert undone == groups_before[: len(undone)]
    for name in undone:
        record = report.notes["tuning"]["sites"][name]
        assert record["chosen"] == "channel" and "network fallback" in record["reason"]
        assert not isinstance(fast.get_submodule(name), GroupSparseConv2d)
    _assert_exact(fast, model, ticket)


def test_still_slower_after_every_fallback_is_reported(monkeypatch):
    model = _model()
    ticket = _ticket(model, "regroup")
    fake = FakeTimes(
        lambda label, unit: 0.5 if label == "group" else 1.0,
        lambda name, module: 10.0 if name == "tuned" else 1.0,
    )
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    fast, report = _convert(model, ticket)
    net = report.notes["tuning"]["network"]
    assert net["slower_than_baseline"] and "STILL SLOWER" in net["verdict"]
    assert "WARNING" in report.render()
    assert not _units(fast, GroupSparseConv2d)  # every layer went back
    _assert_exact(fast, model, ticket)


def test_cache_makes_the_second_conversion_skip_timing(monkeypatch, tmp_path):
    model = _model()
    ticket = _ticket(model, "regroup")
    options = TuneOptions(
        warmup=1,
        min_repeats=1,
        max_repeats=1,
        site_budget_s=0,
        network_repeats=1,
        cache=tmp_path / "cache.json",
    )
    fake = FakeTimes(lambda label, unit: 0.5 if label == "group" else 1.0)
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    _, report1 = _convert(model, ticket, options)
    assert fake.calls > 0 and (tmp_path / "cache.json").is_file()
    assert report1.notes["tuning"]["cache_hits"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("timed although every timing is cached")

    monkeypatch.setattr(tune_module, "time_interleaved", refuse)
    second, report2 = _convert(model, ticket, options)
    record1, record2 = report1.notes["tuning"], report2.notes["tuning"]
    assert record2["cache_misses"] == 0 and record2["cache_hits"] == len(record1["sites"]) + 1
    assert {n: r["chosen"] for n, r in record2["sites"].items()} == {
        n: r["chosen"] for n, r in record1["sites"].items()
    }
    assert record2["network"]["cached"]
    _assert_exact(second, model, ticket)

    # Another machine state (thread count) is another key: timed again.
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if threads > 1 else 2)
    try:
        _, report3 = _convert(model, ticket, options)
    finally:
        torch.set_num_threads(threads)
    assert report3.notes["tuning"]["cache_hits"] == 0


def test_unreadable_cache_is_only_slower(monkeypatch, tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    model = _model()
    ticket = _ticket(model, "refill")
    options = TuneOptions(
        warmup=1, min_repeats=1, max_repeats=1, site_budget_s=0, network_repeats=1, cache=path
    )
    fast, report = _convert(model, ticket, options)
    assert report.notes["tuning"]["cache_hits"] == 0
    assert json.loads(path.read_text())["entries"]  # rewritten whole
    _assert_exact(fast, model, ticket)


def test_saved_file_keeps_the_decisions(tmp_path):
    model = _model()
    ticket = _ticket(model, "regroup")
    fast, report = _convert(model, ticket)
    path = save_converted(fast, tmp_path / "tuned.safetensors")
    loaded = load_converted(path)
    assert loaded.sparse_ops_tuning == json.loads(json.dumps(report.notes["tuning"]))
    for name in report.notes["tuning"]["sites"]:
        assert type(loaded.get_submodule(name)) is type(fast.get_submodule(name))
    x = _x(4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fast(x), rtol=0, atol=0)


def test_a_tuning_record_that_is_not_an_object_is_refused(tmp_path):
    model = _model()
    fast = convert(model, _ticket(model, "refill"), device="cpu")
    fast.sparse_ops_tuning = [1, 2]
    path = save_converted(fast, tmp_path / "bad.safetensors")
    with pytest.raises(SaveError, match="tuning record must be a JSON object"):
        load_converted(path)
    fast.sparse_ops_tuning = {"x": object()}
    with pytest.raises(SaveError, match="tuning record is not JSON"):
        save_converted(fast, tmp_path / "bad2.safetensors")


def test_a_candidate_computing_something_else_is_an_error(monkeypatch):
    real = tune_module.make_conv_unit

    def broken(ctx, site, choice, **kw):
        unit, row = real(ctx, site, choice, **kw)
        if kw.get("zero_pad"):
            unit.weight.add_(1.0)
        return unit, row

    monkeypatch.setattr(tune_module, "make_conv_unit", broken)
    model = _model()
    with pytest.raises(ConvertError, match=r"tuning candidate 'padded' computes something else"):
        _convert(model, _ticket(model, "refill"))


def test_cudnn_candidate_is_the_same_conv():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 3, 3, 5, generator=g)  # [Cout, kh, kw, Cin]
    plan = ChannelPlan(
        weight, torch.randn(6, generator=g), None, None, None, 5, 6, (2, 1), (1, 1), (1, 1)
    )
    unit = ChannelPrunedConv2d(plan, relu=True, name="layer")
    torch_unit = as_torch_conv(unit)
    assert isinstance(torch_unit, TorchConv2d) and torch_unit.relu and torch_unit.name == "layer"
    x = torch.randn(2, 5, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    residual = torch.randn(2, 6, 5, 7, generator=g)
    torch.testing.assert_close(torch_unit(x, residual), unit(x, residual), **TOL)
    picked = torch.tensor([0, 2, 4], dtype=torch.int32)
    gathered = ChannelPlan(
        weight[:, :, :, :3], plan.bias, picked, None, None, 5, 6, (2, 1), (1, 1), (1, 1)
    )
    assert as_torch_conv(ChannelPrunedConv2d(gathered)) is None  # a gather: no vendor conv


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_repeats": 0}, "min_repeats must be an int ≥ 1"),
        ({"min_repeats": 5, "max_repeats": 3}, "max_repeats must be ≥ min_repeats"),
        ({"noise": 1.5}, r"noise must lie in \[0, 1\)"),
        ({"site_budget_s": -1}, "site_budget_s must be ≥ 0"),
        ({"network_budget_s": -1}, "network_budget_s must be ≥ 0"),
        ({"warmup": True}, "warmup must be an int"),
    ],
)
def test_tune_options_are_checked(options, message):
    with pytest.raises(ConvertError, match=message):
        TuneOptions(**options)


def test_tune_argument_is_checked():
    model = _model()
    with pytest.raises(ConvertError, match="tune must be an example input tensor"):
        convert(model, Ticket({}), tune=[1, 2, 3])
    with pytest.raises(ConvertError, match="needs a batch dimension"):
        convert(model, Ticket({}), tune=torch.randn(3))


def test_cli_convert_tune(tmp_path, capsys):
    model = _model()
    ticket = _ticket(model, "refill")
    ticket.save(tmp_path / "t.safetensors")
    out = tmp_path / "fast.safetensors"
    args = [
        "convert",
        str(tmp_path / "t.safetensors"),
        "--target",
        "cpu",
        "--tune",
        "--tune-batch",
        "2",
        "--tune-cache",
        "none",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "tuned on" in printed and "network:" in printed
    assert load_converted(out).sparse_ops_tuning["input_shape"] == [2, 3, 32, 32]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_tune_for_cuda_needs_a_gpu(tmp_path, capsys):
    model = _model()
    _ticket(model, "refill").save(tmp_path / "t.safetensors")
    args = ["convert", str(tmp_path / "t.safetensors"), "--tune", "-o", str(tmp_path / "o")]
    assert main(args) == 2
    assert "--target cuda needs a GPU" in capsys.readouterr().err


def test_cuda_candidates_include_cudnn_and_it_can_be_kept(monkeypatch):
    """On CUDA each whole-layout channel unit also runs as cuDNN (TorchConv2d). Built for
    'cuda' here and run on the CPU, where TorchConv2d computes the same conv."""
    real = tune_module.candidates

    def for_cuda(ctx, site, device):
        return real(ctx, site, torch.device("cuda"))

    monkeypatch.setattr(tune_module, "candidates", for_cuda)
    fake = FakeTimes(lambda label, unit: 0.5 if label == "cudnn" else 2.0)
    monkeypatch.setattr(tune_module, "time_interleaved", fake)
    model = _model()
    ticket = _ticket(model, "refill")
    fast, report = _convert(model, ticket)
    kept = [r for r in report.layers if r.detail.get("tuning", {}).get("chosen") == "cudnn"]
    assert kept and all(r.representation == "cudnn" for r in kept)
    assert all(isinstance(fast.get_submodule(r.name), TorchConv2d) for r in kept)
    _assert_exact(fast, model, ticket)


def test_tune_options_of_the_cli_need_tune(tmp_path, capsys):
    model = _model()
    _ticket(model, "refill").save(tmp_path / "t.safetensors")
    for extra in (["--tune-batch", "2"], ["--tune-cache", "none"]):
        args = [
            "convert",
            str(tmp_path / "t.safetensors"),
            "--target",
            "cpu",
            *extra,
            "-o",
            str(tmp_path / "o.safetensors"),
        ]
        assert main(args) == 2
        assert "only apply with --tune" in capsys.readouterr().err
    args = [
        "convert",
        str(tmp_path / "t.safetensors"),
        "--target",
        "cpu",
        "--tune",
        "--tune-batch",
        "0",
        "-o",
        str(tmp_path / "o.safetensors"),
    ]
    assert main(args) == 2
    assert "--tune-batch must be ≥ 1" in capsys.readouterr().err


def test_a_candidate_that_raises_names_the_layer(monkeypatch):
    real = tune_module.make_conv_unit

    class Broken(nn.Module):
        name = "broken"

        def forward(self, *args):
            raise RuntimeError("boom")

    def broken(ctx, site, choice, **kw):
        unit, row = real(ctx, site, choice, **kw)
        return (Broken() if kw.get("zero_pad") else unit), row

    monkeypatch.setattr(tune_module, "make_conv_unit", broken)
    model = _model()
    with pytest.raises(
        ConvertError,
        match=r"layer\d\.\d\.conv\d: tuning candidate 'padded' "
        r"failed on the layer's input \(RuntimeError: boom\)",
    ):
        _convert(model, _ticket(model, "refill"))


def test_the_equality_check_allows_tf32_rounding_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tune_module._tolerance(torch.float32, cpu) == 1e-4
    assert tune_module._tolerance(torch.float32, cuda) == 1e-2  # TF32 inputs
    assert tune_module._tolerance(torch.float16, cuda) == tune_module._tolerance(torch.float16, cpu)


def test_the_cache_key_holds_the_code_that_runs_the_units():
    from sparse_ops.convert.measure import environment_key

    key = environment_key(torch.device("cpu"), torch.float32)
    assert {"device", "torch", "triton", "dtype", "code"} <= set(key)
    assert len(key["code"]) == 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_tuning_on_cuda_times_triton_against_cudnn_and_stays_exact(dtype):
    """The CUDA path: CUDA-event timing, the cudnn candidate next to the Triton units,
    the TF32-aware equality check (fp32), and a module equal to the masked network."""
    model = _model()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    for kind in ("refill", "regroup"):
        ticket = _ticket(model, kind)
        fast, report = convert(
            model,
            ticket,
            mode="auto",
            on_unstructured="regroup",
            regroup=FAST_REGROUP,
            dtype=dtype,
            device="cuda",
            tune=x,
            tune_options=TuneOptions(cache=None),
            return_report=True,
        )
        record = report.notes["tuning"]
        labels = {label for r in record["sites"].values() for label in r["times_ms"]}
        assert "cudnn" in labels, labels
        assert set(record["network"]["times_ms"]) == {"tuned", "folded", "narrow"}
        ref = masked_model(model, ticket).cuda().to(dtype)
        xd = x.cuda().to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(fast(xd).float(), ref(xd).float(), atol=3e-2, rtol=3e-2)


def test_interleaved_timing_rounds_and_budgets():
    """Fixed rounds stop early once the budget is spent (never under min_repeats); open
    rounds stop once the fastest call is separated or the budget is spent."""
    import time

    from sparse_ops.convert.measure import time_interleaved

    cpu = torch.device("cpu")
    options = TuneOptions(warmup=1, min_repeats=3, max_repeats=30)
    calls = {"a": lambda: None, "b": lambda: None}
    assert [len(v) for v in time_interleaved(calls, cpu, options, 1e9, repeats=7).values()] == [
        7,
        7,
    ]
    assert [len(v) for v in time_interleaved(calls, cpu, options, 0.0, repeats=7).values()] == [
        3,
        3,
    ]
    assert [len(v) for v in time_interleaved(calls, cpu, options, 0.0, repeats=2).values()] == [
        2,
        2,
    ]
    slow = {"fast": lambda: None, "slow": lambda: time.sleep(0.002)}
    rounds = {len(v) for v in time_interleaved(slow, cpu, options, 1e9).values()}
    assert rounds == {3}  # separated at the first check
