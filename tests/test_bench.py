"""The benchmark harness: tickets, timing statistics, provider checks, the tiny preset."""

from __future__ import annotations

import json

import pytest
import torch

from sparse_ops import masks as mask_utils
from sparse_ops import models
from sparse_ops.cli import main
from sparse_ops_bench import BenchError, harness, report, tickets, timing
from sparse_ops_bench.providers import PROVIDERS, Built, Provider, default_providers


def test_percentile_and_summary():
    samples = [5.0, 1.0, 4.0, 2.0, 3.0]
    s = timing.summarize(samples)
    assert s["median_ms"] == 3.0 and s["runs"] == 5 and s["samples_ms"] == samples
    assert s["p20_ms"] == pytest.approx(1.8) and s["p80_ms"] == pytest.approx(4.2)
    assert timing.percentile([7.0], 0.5) == 7.0
    with pytest.raises(ValueError):
        timing.percentile([], 0.5)


def test_time_cpu_records_every_sample_and_threads():
    calls = []
    result = timing.time_cpu(lambda: calls.append(1), warmup=2, repeats=7)
    assert len(calls) == 9 and len(result["samples_ms"]) == 7
    assert result["threads"] == torch.get_num_threads() and result["timer"] == "perf_counter"
    assert result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]


@pytest.mark.parametrize("method", tickets.METHODS)
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_bench_tickets_have_the_structure_and_density_asked(method, sparsity):
    model = models.create("res20s").eval()
    ticket = tickets.make_ticket(model, method, sparsity, seed=3)
    assert ticket.meta["method"] == method
    assert abs(ticket.sparsity - sparsity) < 0.05
    structures = {mask_utils.mask_stats(m).structure for m in ticket.masks.values()}
    expected = {"refill": {"channel"}, "regroup": {"group"}, "random": {"unstructured"}}[method]
    assert structures == expected
    if method == "regroup":  # the stored layout is exactly the mask
        for name, groups in ticket.meta["groups"].items():
            view = mask_utils.gemm_view(ticket.masks[name])
            covered = torch.zeros_like(view)
            for g in groups:
                covered[torch.tensor(g["rows"])[:, None], torch.tensor(g["cols"])[None, :]] = True
            assert torch.equal(covered, view)


def test_bench_ticket_bad_input():
    model = models.create("res20s")
    with pytest.raises(BenchError, match="method"):
        tickets.make_ticket(model, "magic", 0.5)
    with pytest.raises(BenchError, match="sparsity"):
        tickets.make_ticket(model, "refill", 1.0)


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = harness.run("tiny", device="cpu", out=out)
    return result, out


def test_tiny_preset_json_has_every_field(tiny_result):
    result, out = tiny_result
    saved = json.loads((out / "tiny_float32.json").read_text())
    assert not (out / "tiny_float32.partial.json").exists()
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["schema"] == harness.SCHEMA and saved["preset"] == "tiny"
    assert saved["dtype"] == "float32" and saved["layout"] == "channels_last"
    env = saved["environment"]
    for key in ("cpu", "torch_threads", "commit", "python", "dtype", "layout"):
        assert key in env, key
    assert env["versions"]["torch"] and env["versions"]["triton"]
    assert saved["providers"] == list(default_providers(torch.device("cpu")))
    assert saved["baseline"] == "dense"
    kinds = {(r["kind"], r["method"]) for r in saved["rows"]}
    assert kinds == {(k, m) for k in ("model", "layer") for m in tickets.METHODS}
    for row in saved["rows"]:
        assert row["status"] == "ok", row
        assert row["rel_error"] <= 5e-3
        assert len(row["samples_ms"]) == row["runs"] == 5
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert row["threads"] >= 1 and row["input"][0] == 4
        assert row["speedup"] > 0 and row["saving"] == pytest.approx(1 - 1 / row["speedup"])
    baseline_rows = [r for r in saved["rows"] if r["provider"] == "dense"]
    assert all(r["speedup"] == 1.0 for r in baseline_rows)


def test_tiny_preset_writes_table_and_plots(tiny_result):
    result, out = tiny_result
    table = (out / "tiny_float32.md").read_text()
    assert "| case" in table and "speedup" in table and "res20s:layer1.0.conv1" in table
    for kind in ("latency", "saving"):
        png = out / f"tiny_float32_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.summary_lines(result)


def test_a_provider_with_a_wrong_answer_is_reported_not_timed(monkeypatch, tmp_path):
    honest = PROVIDERS["dense"]

    def wrong(case):
        model = honest.build(case).run
        return Built(lambda x: model(x) * 1.01, "dense")

    monkeypatch.setitem(PROVIDERS, "dense", Provider("dense", ("cpu",), wrong, "broken"))
    result = harness.run(
        "tiny",
        device="cpu",
        models_wanted=["res20s"],
        methods=["refill"],
        providers=["dense", "ours"],
        repeats=1,
        warmup=0,
    )
    statuses = {r["provider"]: r["status"] for r in result["rows"]}
    assert statuses["dense"].startswith("wrong output") and statuses["ours"] == "ok"
    assert all("median_ms" not in r for r in result["rows"] if r["provider"] == "dense")
    assert "WRONG" in report.markdown(result) and "Not timed" in report.markdown(result)


def test_one_check_policy_judges_every_output():
    """bench/checks.py holds the tolerance and the comparison; nothing else in bench/ has
    its own copy (the harness, the demo and the kernel floors import it)."""
    from pathlib import Path

    from sparse_ops_bench import checks

    ref = torch.tensor([1.0, -2.0, 4.0])
    assert checks.check_output(ref * 1.001, ref, torch.float32) == {
        "rel_error": pytest.approx(1e-3, abs=1e-5),
        "status": "ok",
    }
    wrong = checks.check_output((ref * 1.1).half(), ref, torch.float16)
    assert checks.is_wrong(wrong) and wrong["rel_error"] == pytest.approx(0.1, abs=2e-3)
    assert checks.tolerance(torch.bfloat16) > checks.tolerance(torch.float16)
    bench = Path(checks.__file__).parent
    own = ("def tolerance", "clamp_min(1e-12)")
    copies = [
        p.relative_to(bench)
        for p in bench.rglob("*.py")
        if p.name != "checks.py" and any(s in p.read_text() for s in own)
    ]
    assert copies == []


def test_bench_cli_bad_input_is_one_line(capsys, tmp_path):
    assert main(["bench", "--providers", "cudnn", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-ops: error: ") and "cudnn" in err and "\n" not in err
    assert main(["bench", "--models", "wrn32", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "no case" in capsys.readouterr().err


def test_bench_cli_json(capsys, tmp_path):
    argv = [
        "bench",
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--models",
        "res20s",
        "--methods",
        "refill",
        "--providers",
        "dense",
        "narrow",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--out",
        str(tmp_path),
        "--json",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {r["provider"] for r in result["rows"]} == {"dense", "narrow"}
    assert (tmp_path / "tiny_float32.json").is_file()


def test_paper_preset_layers_are_distinct_3x3_convs():
    from sparse_ops_bench.presets import distinct_convs

    layers = distinct_convs("res18", (3,))
    keys = {(s.in_channels, s.out_channels, s.stride) for s in layers}
    assert len(keys) == len(layers)
    assert (64, 64, 1) in keys and (256, 512, 2) in keys
    assert sum(s.count for s in layers) == 16  # 8 BasicBlocks × two 3×3 convs; stem excluded


def test_kernel_floor_script_runs_its_cases_under_the_interpreter():
    """The GPU kernel microbenchmark's code path, on tiny shapes (no speed claimed)."""
    from sparse_ops_bench.scripts import kernel_floors

    rows = kernel_floors.run(
        torch.float32, 1, torch.device("cpu"), {"warmup": 0, "repeats": 1}, scale=16
    )
    kinds = {r["kind"] for r in rows}
    assert kinds == {"channel", "channel-indexed", "group"}
    assert {r["arch"] for r in rows if r["kind"] == "group"} == set(kernel_floors.GROUP_ARCHS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["speedup"] > 0 and isinstance(r["meets_floor"], bool)
        assert len(r["ours"]["samples_ms"]) == 1


def test_speedups_pair_each_row_with_the_baseline_of_the_same_input():
    def row(provider, batch, ms):
        return {
            "kind": "model",
            "arch": "resnet18",
            "layer": None,
            "method": "refill",
            "sparsity": 0.5,
            "input": [batch, 3, 224, 224],
            "provider": provider,
            "status": "ok",
            "median_ms": ms,
        }

    result = {
        "baseline": "cudnn",
        "rows": [
            row("cudnn", 1, 2.0),
            row("ours", 1, 1.0),
            row("cudnn", 64, 40.0),
            row("ours", 64, 10.0),
        ],
    }
    harness._add_speedups(result)
    assert [r["speedup"] for r in result["rows"]] == [1.0, 2.0, 1.0, 4.0]


def test_layer_sums_skip_a_sparsity_where_a_layer_failed():
    def row(provider, layer, sparsity, ms, status="ok"):
        return {
            "provider": provider,
            "layer": layer,
            "sparsity": sparsity,
            "status": status,
            "median_ms": ms,
            "p20_ms": ms,
            "p80_ms": ms,
            "count": 2,
        }

    rows = [
        row("dense", "a", 0.5, 1.0),
        row("dense", "b", 0.5, 1.0),
        row("ours", "a", 0.5, 0.2),
        row("ours", "b", 0.5, 0.0, "error: x"),
        row("dense", "a", 0.8, 1.0),
        row("dense", "b", 0.8, 1.0),
        row("ours", "a", 0.8, 0.5),
        row("ours", "b", 0.8, 0.5),
    ]
    xs, med, _, _ = report._series(rows, "ours", "dense")
    assert xs == [0.8] and med == [2.0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--device", "gpu"], "unknown device 'gpu'"),
        (["bench", "--device", "cpu", "--repeats", "0"], "repeats ≥ 1"),
        (["bench", "--device", "cpu", "--warmup", "-1"], "warmup ≥ 0"),
        (["demo", "--device", "mps"], "only cpu and cuda"),
    ],
)
def test_bad_device_and_timing_options_fail_before_any_work(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sparse-ops: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_requested_without_a_gpu_is_refused(capsys, tmp_path):
    assert main(["demo", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device here" in capsys.readouterr().err


def test_default_output_folder_cannot_shadow_the_bench_package():
    out = harness.default_out("cpu")
    assert out.parts[0] != "bench" and out.name == "cpu"


def test_bench_models_stay_in_half_precision_range():
    """An untrained deep ResNet with fixed BatchNorm statistics overflows fp16; the
    harness calibrates them on its own input distribution."""
    from sparse_ops_bench import presets

    preset = presets.PRESETS["cifar"]
    (_, model, shape, _), *_ = harness._cases(preset, ["res56s"])
    peaks = []
    hooks = [
        m.register_forward_hook(lambda m, a, y: peaks.append(float(y.abs().max())))
        for m in model.modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0)))
    for h in hooks:
        h.remove()
    assert len(peaks) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert max(peaks) < 1e3  # fp16 tops out at 65504
    assert not model.training
    folded_means = [
        m.running_mean.abs().max() for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
    ]
    assert all(float(v) > 0 for v in folded_means)


def test_steady_allocator_is_recorded():
    """Every provider runs under the same allocator setting, and the results say which."""
    import platform

    from sparse_ops_bench.env import environment, steady_allocator

    state = steady_allocator()
    assert steady_allocator() == state  # set once, idempotent
    assert environment()["allocator"] == state
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert state["steady"] and "M_MMAP_MAX=0" in state["how"]
