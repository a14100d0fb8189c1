"""Run a benchmark preset: build every case, check every provider's output, time it.

    result = run("cifar", device="cuda", dtype="float16", out="bench/results/<gpu>")

The result (also written as ``results.json`` when ``out`` is given) holds the
environment, the settings, and one row per (case, provider) with the raw samples.
``bench.report`` renders it as a Markdown table and plots.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparse_ops import masked_model, models
from sparse_ops.checkpoint_io import write_text
from sparse_ops.progress import Progress

from . import BenchError
from . import presets as preset_defs
from .checks import check_output
from .env import device_slug, environment, resolve_device, steady_allocator
from .providers import (
    PROVIDERS,
    Case,
    baseline_provider,
    check_providers,
    default_providers,
    unweighted,
)
from .tickets import make_ticket
from .timing import time_call

SCHEMA = "sparse-ops-bench/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class SingleConv(nn.Module):
    """One conv layer alone, for per-layer timing."""

    def __init__(self, shape: preset_defs.LayerShape):
        super().__init__()
        self.conv = nn.Conv2d(
            shape.in_channels,
            shape.out_channels,
            shape.kernel_size,
            shape.stride,
            shape.padding,
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _cases(
    preset: preset_defs.Preset, wanted: list[str] | None
) -> Iterator[tuple[dict[str, Any], nn.Module, tuple[int, ...], list[str] | None]]:
    """(description, fp32 eval model, input shape, names to mask or None for IMP's)."""
    for spec in preset_defs.filter_models(preset, wanted):
        if isinstance(spec, preset_defs.ModelSpec):
            info = models.info(spec.arch)
            torch.manual_seed(0)
            model = models.create(info.name).eval()
            input_shape = (spec.batch, *spec.input_size)
            _calibrate_bn(model, input_shape)
            desc = {"kind": "model", "arch": spec.arch, "layer": None, "count": 1}
            yield desc, model, input_shape, None
        else:
            for shape in preset_defs.distinct_convs(spec.arch, spec.kernel_sizes):
                torch.manual_seed(0)
                model = SingleConv(shape).eval()
                desc = {
                    "kind": "layer",
                    "arch": spec.arch,
                    "layer": shape.source,
                    "count": shape.count,
                    "shape": asdict(shape),
                }
                x_shape = (spec.batch, shape.in_channels, spec.hw, spec.hw)
                yield desc, model, x_shape, ["conv.weight"]


def _calibrate_bn(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Trained-looking BatchNorm: random affine terms, running statistics measured on
    the benchmark's input distribution (one train-mode pass over 8 inputs).

    Fixed statistics on an untrained deep ResNet let activations grow block after block
    (past fp16's 65504 in res56s); measured ones keep every dtype in range, as training
    does. Nonzero means and shifts also keep the folded biases from being all zero."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in norms:
            if m.affine:
                m.weight.copy_(0.8 + 0.4 * torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.reset_running_stats()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = None  # cumulative average: exact statistics of the batch
        try:
            model.train()
            model(torch.randn((8, *input_shape[1:]), generator=g))
        finally:
            model.eval()
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum


def run(
    preset: str | preset_defs.Preset,
    *,
    models_wanted: list[str] | None = None,
    providers: list[str] | None = None,
    methods: list[str] | None = None,
    sparsities: list[float] | None = None,
    dtype: str = "float32",
    device: str | torch.device | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    graph: bool = False,
    out: str | Path | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Benchmark ``preset``; returns the result dict (see the module docstring)."""
    preset = preset_defs.PRESETS[preset] if isinstance(preset, str) else preset
    device = resolve_device(device)
    steady_allocator()
    if dtype not in DTYPES:
        raise BenchError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    providers = check_providers(list(providers or default_providers(device)), device)
    methods = list(methods or preset.methods)
    sparsities = list(sparsities or preset.sparsities)
    progress = progress or Progress()
    timing = {
        "warmup": warmup if warmup is not None else preset.warmup,
        "repeats": repeats if repeats is not None else preset.repeats,
    }
    if timing["repeats"] < 1 or timing["warmup"] < 0:
        raise BenchError(
            f"need repeats ≥ 1 and warmup ≥ 0, got {timing['repeats']} and {timing['warmup']}"
        )
    if device.type == "cuda":
        timing |= {"flush_l2": True, "graph": graph}
    cases = list(_cases(preset, models_wanted))
    if not cases:
        raise BenchError(f"preset {preset.name!r} has no case for models {models_wanted}")
    # The dense baseline at its best: cuDNN picks its fastest algorithm per shape.
    partial = None
    if out is not None:  # rows so far, in case a time limit kills a long preset
        Path(out).mkdir(parents=True, exist_ok=True)
        partial = Path(out) / f"{preset.name}_{dtype}.partial.json"
    with _cudnn_benchmark(device.type == "cuda"):
        rows, seconds = _run_cases(
            cases, methods, sparsities, providers, torch_dtype, device, timing, progress, partial
        )
    result = {
        "schema": SCHEMA,
        "preset": preset.name,
        "device": device.type,
        "dtype": dtype,
        "layout": "channels_last",
        "providers": providers,
        "baseline": baseline_provider(device),
        "methods": methods,
        "sparsities": sparsities,
        "timing": timing,
        "environment": environment() | {"dtype": dtype, "layout": "channels_last"},
        "seconds": seconds,
        "rows": rows,
    }
    _add_speedups(result)
    if out is not None:
        write(result, out)
        partial.unlink(missing_ok=True)
    return result


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or previous
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _run_cases(
    cases,
    methods,
    sparsities,
    providers,
    torch_dtype,
    device,
    timing,
    progress,
    partial: Path | None,
):
    total = len(cases) * len(methods) * len(sparsities)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    done = 0
    for desc, model, input_shape, names in cases:
        x = torch.randn(input_shape, generator=torch.Generator().manual_seed(2))
        dense_ref = _reference(model, None, x, device)
        for method in methods:
            for sparsity in sparsities:
                done += 1
                label = desc["arch"] + (f" {desc['layer']}" if desc["layer"] else "")
                progress.line(
                    f"[{done}/{total}] {label} {method} {sparsity:.0%} "
                    f"(t={time.perf_counter() - start:.0f}s)"
                )
                ticket = make_ticket(model, method, sparsity, names=names, arch=None)
                common = desc | {
                    "method": method,
                    "sparsity": sparsity,
                    "density": ticket.density,
                    "input": list(input_shape),
                }
                measured = measure_case(
                    model,
                    ticket,
                    x,
                    providers,
                    dtype=torch_dtype,
                    device=device,
                    timing=timing,
                    dense_ref=dense_ref,
                    progress=progress,
                )
                rows.extend(common | row for row in measured)
                if partial is not None:
                    write_text(partial, json.dumps({"schema": SCHEMA, "rows": rows}) + "\n")
                _free()
    return rows, time.perf_counter() - start


def measure_case(
    model: nn.Module,
    ticket,
    x: torch.Tensor,
    providers: list[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device,
    timing: dict[str, Any],
    dense_ref: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per provider for ``model`` (eval, fp32, CPU) + ``ticket`` on input ``x``.

    Every provider runs ``model``'s own weights under the ticket's masks (the ticket's
    stored weights, if any, are not loaded): speed does not depend on the values.
    """
    steady_allocator()  # before any provider runs: the same for all (bench.env)
    ticket = unweighted(ticket)
    refs = {
        "dense": dense_ref if dense_ref is not None else _reference(model, None, x, device),
        "masked": _reference(model, ticket, x, device),
    }
    case = Case(model, ticket, tuple(x.shape), dtype, device)
    rows = []
    for name in providers:
        if progress is not None:
            progress.update(f"      {name} ...")
        rows.append({"input": list(x.shape)} | _measure(name, case, x, refs, timing))
    return rows


def _reference(model: nn.Module, ticket, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The fp32 output of the dense (ticket None) or masked network, on ``device``."""
    reference = masked_model(model, ticket).to(device)
    with torch.inference_mode():
        prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        # The reference is full fp32: no TF32 in its convs nor in its Linear layers.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return reference(x.to(device)).float()
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


def _measure(name: str, case: Case, x: torch.Tensor, refs: dict, timing: dict) -> dict[str, Any]:
    provider = PROVIDERS[name]
    row: dict[str, Any] = {"provider": name}
    try:
        built = provider.build(case)
        xd = x.to(case.device, case.dtype).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            y = built.run(xd)
        check = check_output(y, refs[built.computes], case.dtype)
        row |= {"computes": built.computes, "rel_error": check["rel_error"], "note": built.note}
        if built.details is not None:
            row["details"] = built.details
        if check["status"] != "ok":
            row["status"] = check["status"]
            return row
        row |= time_call(lambda: built.run(xd), case.device, **timing)
        row["status"] = "ok"
    except Exception as exc:  # one provider failing must not lose the others' rows
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    return row


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _add_speedups(result: dict[str, Any]) -> None:
    """speedup = t_baseline / t, saving = 1 − t / t_baseline, per case."""
    base = result["baseline"]

    def case(r: dict[str, Any]) -> tuple:  # the input shape separates batch 1 from 64
        return (r["kind"], r["arch"], r["layer"], r["method"], r["sparsity"], tuple(r["input"]))

    baseline = {
        case(r): r.get("median_ms")
        for r in result["rows"]
        if r["provider"] == base and r["status"] == "ok"
    }
    for r in result["rows"]:
        t0 = baseline.get(case(r))
        if r["status"] == "ok" and t0:
            r["speedup"] = t0 / r["median_ms"]
            r["saving"] = 1.0 - r["median_ms"] / t0


def write(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.md`` and the plots, in ``out``."""
    from . import report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['preset']}_{result['dtype']}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md"}
    write_text(paths["json"], json.dumps(result, indent=1) + "\n")
    write_text(paths["markdown"], report.markdown(result) + "\n")
    paths |= report.plots(result, out, stem)
    return paths


def default_out(device: str | torch.device | None) -> Path:
    """``sparse-ops-bench/<device>``: never a folder named ``bench`` in the working
    directory, which would shadow this package for ``python -m`` runs started there."""
    return Path("sparse-ops-bench") / device_slug(resolve_device(device))
