"""Tuning: keep, per conv site, the representation that is fastest where it will run.

``convert(model, ticket, tune=x)`` builds the network as the cost model says, then:

1. runs ``x`` through it once; as each unit returns, its candidates are built and timed
   right there, on the unit's live inputs (the narrowed, channels-last tensors of the
   converted network, residual included), so one layer's extra activations are held at
   a time; the chosen units are installed after the pass;
2. builds every representation the mode allows for each site *in the layouts the passes
   assigned* (so any mix of choices still fits together): ``channel`` (the narrow unit,
   gathering and scattering channels as the layouts need), ``padded`` (the same unit
   reading its whole input layout and computing every stored output channel, zero
   weights instead of gather and scatter: the BatchNorm-folded dense conv of the
   narrowed tensors), ``group`` (the block-sparse unit of the mask's groups, where the
   site's layouts are whole), ``regroup`` (regrouped + exact leftover, for unstructured
   masks under ``on_unstructured="regroup"``) and on CUDA ``cudnn`` (the padded unit's
   weights on cuDNN instead of the Triton channel kernel);
3. checks each candidate computes what the built unit computes, then times them
   interleaved, call by call (so drift and other load hit all alike), after warm-up:
   CUDA events on a GPU, the wall clock on a CPU; median of at least ``min_repeats``
   calls, more until the fastest one's p80 lies below every other one's p20 or the
   site's time budget is spent. The fastest is kept; candidates within ``noise`` of it
   count as tied, and of those the one with the fewest multiply-adds wins (it is the
   one a faster or less loaded machine favours);
4. times the tuned network against the whole-network baselines at ``x``'s shape —
   the BatchNorm-folded dense network and the channel-narrowed one — and, while it is
   slower than the faster of them by more than ``noise``, puts back the layer with the
   smallest measured gain on that baseline's representation, and times again.

Decisions and every candidate's time go into the report's rows (``detail["tuning"]``)
and the module's ``sparse_ops_tuning`` attribute, which :func:`save_converted` stores:
loading never re-tunes. Timings are cached (:class:`TuneCache`) by device, versions, dtype,
input shapes and each candidate's structure, so converting the same ticket again skips
the timing.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..nn import ChannelPrunedConv2d
from ..progress import Progress
from ..tables import format_table
from . import patterns
from .context import Choice, Context, LayerRow
from .measure import (
    TuneCache,
    cache_key,
    environment_key,
    network_signature,
    shapes_of,
    time_interleaved,
    unit_signature,
)
from .prepare import ConvertError
from .units import as_torch_conv, group_layout, make_conv_unit, regrouped


@dataclass(frozen=True)
class TuneOptions:
    """How :func:`convert` tunes (``tune=example``); see the module docstring."""

    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 40
    site_budget_s: float = 0.3  # timing per site, once min_repeats are done
    network_repeats: int = 15
    network_budget_s: float = 10.0  # the network check stops there, after min_repeats
    noise: float = 0.05
    # A file path, or None for no cache; "default": $SPARSE_OPS_CACHE_DIR/tuning.json,
    # else ~/.cache/sparse-ops/tuning.json.
    cache: str | os.PathLike | None = "default"
    progress: bool = False

    def __post_init__(self) -> None:
        for name in ("warmup", "min_repeats", "max_repeats", "network_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name != "warmup"):
                raise ConvertError(f"TuneOptions.{name} must be an int ≥ 1, got {value!r}")
        if self.max_repeats < self.min_repeats:
            raise ConvertError("TuneOptions.max_repeats must be ≥ min_repeats")
        if not 0 <= self.noise < 1:
            raise ConvertError(f"TuneOptions.noise must lie in [0, 1), got {self.noise!r}")
        for name in ("site_budget_s", "network_budget_s"):
            if not getattr(self, name) >= 0:
                raise ConvertError(f"TuneOptions.{name} must be ≥ 0, got {getattr(self, name)}")


@dataclass
class Candidate:
    label: str
    unit: nn.Module
    row: LayerRow
    samples: list[float] = field(default_factory=list)
    median_ms: float | None = None

    @property
    def work(self) -> int:
        return self.row.flops_after if self.row.flops_kernel is None else self.row.flops_kernel


# ---------------------------------------------------------------------------- candidates
def candidates(ctx: Context, site: patterns.Site, device: torch.device) -> list[Candidate]:
    """Every representation of ``site`` valid in its assigned layouts under ``ctx.mode``;
    the first is the one the cost model built."""
    built = ctx.choices[site.name]
    if built.kind == "torch":
        return []  # grouped / depthwise: one way to run them
    out: list[Candidate] = []

    def add(label: str, choice: Choice, **options) -> Candidate:
        unit, row = make_conv_unit(ctx, site, choice, **options)
        out.append(Candidate(label, unit, row))
        return out[-1]

    add(
        built.kind
        if built.kind == "group" and not built.leftover
        else "regroup"
        if built.leftover
        else "channel",
        built,
    )
    mask = ctx.masks.get(f"{site.name}.weight")
    structure = built.structure
    channel_ok = ctx.mode in ("auto", "channel") or structure in ("dense", "empty")
    if built.kind == "group" and channel_ok:
        add("channel", Choice("channel", structure))
    channel = next((c for c in out if c.label == "channel"), None)
    if channel is not None and isinstance(channel.unit, ChannelPrunedConv2d):
        if channel.unit.in_idx is not None or channel.unit.out_idx is not None:
            add("padded", Choice("channel", structure), zero_pad=True)
        if device.type == "cuda":
            base = out[-1].unit if out[-1].label == "padded" else channel.unit
            torch_unit = as_torch_conv(base)
            if torch_unit is not None:
                row = LayerRow(**{**out[-1].row.__dict__, "detail": dict(out[-1].row.detail)})
                row.representation = "cudnn"
                out.append(Candidate("cudnn", torch_unit, row))
    whole = _whole_layouts(ctx, site)
    labels = {c.label for c in out}
    if (
        mask is not None
        and whole
        and ctx.mode in ("auto", "group")
        and "group" not in labels
        and structure in ("channel", "group")
    ):
        add("group", Choice("group", structure, group_layout(ctx, site, mask)))
    if (
        mask is not None
        and whole
        and ctx.mode == "auto"
        and "regroup" not in labels
        and ctx.on_unstructured == "regroup"
        and structure == "unstructured"
    ):
        add("regroup", regrouped(ctx, site, mask, structure))
    return out


def _whole_layouts(ctx: Context, site: patterns.Site) -> bool:
    """Group units read and write every channel (they keep no bias map)."""
    conv = ctx.modules[site.conv.target]
    return (
        ctx.layout[site.conv.args[0]].numel() == conv.in_channels
        and ctx.layout[site.out].numel() == conv.out_channels
    )


# ---------------------------------------------------------------------------- per site
def visit_units(module: fx.GraphModule, names: list[str], example: torch.Tensor, visit) -> None:
    """Run ``example`` through ``module`` once, calling ``visit(name, args, output)`` as
    each named unit returns: candidates are timed on the network's live tensors there,
    so tuning holds one layer's activations at a time, not every layer's."""
    handles = []
    for name in names:

        def hook(mod, args, output, name=name):
            visit(name, args, output)

        handles.append(module.get_submodule(name).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            module(example)
    finally:
        for handle in handles:
            handle.remove()


def _tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """How far two exact representations may round apart, relative to the output scale.
    fp32 on CUDA: TF32 (cuDNN's default, which our kernels follow) rounds the inputs to
    10 mantissa bits, and two candidates may use it differently."""
    if dtype == torch.float32 and device.type == "cuda":
        return 1e-2
    return {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-4)


def _check_same(site: str, label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got.float() - want.float()).abs().max()) if want.numel() else 0.0
    if got.shape != want.shape or err > _tolerance(want.dtype, want.device) * max(scale, 1.0):
        raise ConvertError(
            f"{site}: tuning candidate {label!r} computes something else than the converted "
            f"unit (max |Δ| {err:.3g} at scale {scale:.3g}, shape {tuple(got.shape)} vs "
            f"{tuple(want.shape)}); this is a sparse-ops bug, please report it"
        )


def tune_site(
    site: str,
    cands: list[Candidate],
    args: tuple,
    want: torch.Tensor,
    device: torch.device,
    options: TuneOptions,
    cache: TuneCache,
    env: dict,
) -> dict[str, Any]:
    """Time ``cands`` on ``args`` and return the decision record (chosen label first)."""
    for c in cands:
        try:
            with torch.inference_mode():
                got = c.unit(*args)
        except Exception as exc:  # a candidate that cannot run here is a bug: say where
            raise ConvertError(
                f"{site}: tuning candidate {c.label!r} failed on the layer's input "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                "this is a sparse-ops bug, please report it"
            ) from exc
        _check_same(site, c.label, got, want)
    key = cache_key(
        "site", env, shapes_of(args), [(c.label, unit_signature(c.unit)) for c in cands]
    )
    labels = {c.label for c in cands}
    cached = cache.get(key, lambda entry: _numbers(entry, labels))
    if cached is not None:
        for c in cands:
            c.median_ms = float(cached[c.label])
    else:
        calls = {c.label: (lambda u=c.unit: u(*args)) for c in cands}
        samples = time_interleaved(calls, device, options, options.site_budget_s)
        for c in cands:
            c.samples, c.median_ms = samples[c.label], statistics.median(samples[c.label])
        cache.put(key, {c.label: c.median_ms for c in cands})
        cached = None
    fastest = min(cands, key=lambda c: c.median_ms)
    tied = [c for c in cands if c.median_ms <= fastest.median_ms * (1 + options.noise)]
    chosen = min(tied, key=lambda c: (c.work, c.median_ms))
    if chosen is fastest:
        reason = "fastest"
    else:
        reason = (
            f"within {100 * options.noise:.0f}% of {fastest.label} "
            f"({fastest.median_ms:.3f} ms), fewer multiply-adds"
        )
    return {
        "chosen": chosen.label,
        "reason": reason,
        "times_ms": {c.label: round(c.median_ms, 4) for c in cands},
        "runs": {c.label: len(c.samples) for c in cands} if cached is None else "cached",
    }


# ---------------------------------------------------------------------------- network
def tune_network(
    module: fx.GraphModule,
    ctx: Context,
    example: torch.Tensor,
    device: torch.device,
    options: TuneOptions,
    baselines: Callable[[], dict[str, nn.Module]],
    dtype: torch.dtype,
) -> tuple[fx.GraphModule, dict[str, Any]]:
    """Tune ``module`` (built from ``ctx``) in place; returns it and the tuning record.
    ``baselines()`` builds the whole-network baselines (name → module on ``device``)."""
    started = time.perf_counter()
    progress = Progress(enabled=options.progress)
    cache = TuneCache(TuneCache.resolve(options.cache))
    env = environment_key(device, dtype)
    example = example.to(device=device, dtype=dtype)
    sites = [s for s in ctx.sites if ctx.choices[s.name].kind != "torch"]
    site_of = {s.name: s for s in sites}
    rows = {r.name: i for i, r in enumerate(ctx.rows)}
    per_site: dict[str, dict[str, Any]] = {}
    fallbacks: dict[str, dict[str, Candidate]] = {}

    def visit(name: str, args: tuple, output: torch.Tensor) -> None:
        progress.update(f"tuning {name} ({len(per_site) + 1} of at most {len(sites)} layers)")
        with torch.inference_mode(False):  # units made here outlive the tuning pass
            cands = candidates(ctx, site_of[name], device)
            for c in cands:
                c.unit = c.unit.to(device)
        if len(cands) < 2:
            return
        per_site[name] = tune_site(name, cands, args, output, device, options, cache, env)
        fallbacks[name] = {c.label: c for c in cands}

    # Layers the example does not reach (a branch it skips) keep the cost model's choice.
    visit_units(module, list(site_of), example, visit)
    for name, record in per_site.items():  # installed after the pass that measured them
        _install(module, ctx, rows, name, fallbacks[name][record["chosen"]], record)
    network = _check_network(
        module,
        ctx,
        rows,
        example,
        device,
        options,
        baselines,
        per_site,
        fallbacks,
        cache,
        env,
        progress,
    )
    cache.save()
    record = {
        "device": env["device"],
        "dtype": env["dtype"],
        "input_shape": list(example.shape),
        "seconds": round(time.perf_counter() - started, 2),
        "cache": None if cache.path is None else str(cache.path),
        "cache_hits": cache.hits,
        "cache_misses": cache.misses,
        "sites": per_site,
        "network": network,
    }
    progress.line(
        f"tuned {len(per_site)} layers in {record['seconds']:.1f}s: "
        + ", ".join(f"{k} {v} ms" for k, v in network["times_ms"].items())
    )
    return module, record


def _numbers(entry: Any, labels: set[str]) -> bool:
    """A cache entry holding a finite time for each of ``labels`` (at least): anything
    else (an edited or foreign file) is timed again."""
    return (
        isinstance(entry, dict)
        and set(entry) >= labels
        and all(type(entry[k]) in (int, float) and math.isfinite(entry[k]) for k in labels)
    )


def _install(module, ctx, rows, name: str, cand: Candidate, record: dict) -> None:
    module.set_submodule(name, cand.unit)
    row = cand.row
    row.detail = {**row.detail, "tuning": record}
    ctx.rows[rows[name]] = row


def _check_network(
    module,
    ctx,
    rows,
    example,
    device,
    options,
    baselines,
    per_site,
    fallbacks,
    cache,
    env,
    progress,
) -> dict[str, Any]:
    progress.update("timing the tuned network against the baselines")
    base = baselines()
    names = ["tuned", *base]
    # The tuned network itself, not only its labels: the same labels over other units
    # (another ticket, regroup or cost configuration) are another network. The noise
    # decides the fallbacks kept with the times.
    key = cache_key(
        "network",
        env,
        list(example.shape),
        options.noise,
        {name: r["chosen"] for name, r in per_site.items()},
        network_signature(module),
        [(name, network_signature(m)) for name, m in base.items()],
    )
    cached = cache.get(
        key,
        lambda entry: (
            isinstance(entry, dict)
            and _numbers(entry.get("times_ms"), set(names))
            and isinstance(entry.get("fallbacks", {}), dict)
        ),
    )
    if cached is not None:
        times = cached["times_ms"]
        for name, label in cached.get("fallbacks", {}).items():
            if name in fallbacks and isinstance(label, str) and label in fallbacks[name]:
                per_site[name] = {
                    **per_site[name],
                    "chosen": label,
                    "reason": "network fallback (cached)",
                }
                _install(module, ctx, rows, name, fallbacks[name][label], per_site[name])
        return {
            "times_ms": times,
            "fallbacks": cached.get("fallbacks", {}),
            "verdict": str(cached.get("verdict", "")),
            "slower_than_baseline": cached.get("slower_than_baseline") is True,
            "cached": True,
        }

    def measure() -> dict[str, float]:
        nets = {"tuned": module, **base}
        calls = {name: (lambda m=m: m(example)) for name, m in nets.items()}
        samples = time_interleaved(
            calls, device, options, options.network_budget_s, repeats=options.network_repeats
        )
        return {name: statistics.median(s) for name, s in samples.items()}

    times = measure()
    best_name = min(base, key=lambda n: times[n])
    undone: dict[str, str] = {}
    # The layers that gained least over the best baseline's representation go back first.
    target = "channel" if best_name == "narrow" else "padded"

    def back_to(name: str) -> str:
        return target if target in fallbacks[name] else "channel"

    order = sorted(
        (
            n
            for n, by in fallbacks.items()
            if "channel" in by and per_site[n]["chosen"] != back_to(n)
        ),
        key=lambda n: (
            per_site[n]["times_ms"][back_to(n)] - per_site[n]["times_ms"][per_site[n]["chosen"]]
        ),
    )
    while times["tuned"] > times[best_name] * (1 + options.noise) and order:
        name = order.pop(0)
        label = back_to(name)
        per_site[name] = {
            **per_site[name],
            "chosen": label,
            "reason": f"network fallback: tuned network slower than {best_name}",
        }
        _install(module, ctx, rows, name, fallbacks[name][label], per_site[name])
        undone[name] = label
        progress.update(f"network slower than {best_name}: {name} back to {label}")
        times = measure()
    slower = times["tuned"] > times[best_name] * (1 + options.noise)
    verdict = f"tuned network {times['tuned']:.3f} ms vs {best_name} {times[best_name]:.3f} ms" + (
        ": STILL SLOWER after every fallback" if slower else ""
    )
    result = {
        "times_ms": {k: round(v, 4) for k, v in times.items()},
        "fallbacks": undone,
        "verdict": verdict,
        "slower_than_baseline": slower,
    }
    cache.put(key, result)
    return {**result, "cached": False}


def tuning_table(rows: list[LayerRow], record: dict[str, Any]) -> str:
    """The report's tuning section: per layer what ran fastest and what was kept."""
    tuned = [r for r in rows if "tuning" in r.detail]
    seen = {label for r in tuned for label in r.detail["tuning"]["times_ms"]}
    labels = [label for label in LABEL_ORDER if label in seen]
    table = []
    for r in tuned:
        t = r.detail["tuning"]
        cells = [f"{t['times_ms'][x]:.3f}" if x in t["times_ms"] else "" for x in labels]
        table.append([r.name, t["chosen"], *cells, t["reason"]])
    head = ["layer", "kept", *[f"{x} ms" for x in labels], "why"]
    network = record["network"]
    summary = "network: " + ", ".join(f"{k} {v:.2f} ms" for k, v in network["times_ms"].items())
    if network["fallbacks"]:
        summary += "; fallbacks: " + ", ".join(
            f"{k} → {v}" for k, v in network["fallbacks"].items()
        )
    lines = [
        f"tuned on {record['device']} ({record['dtype']}) at input {tuple(record['input_shape'])}"
        f" in {record['seconds']:.1f} s (cache: {record['cache_hits']} hits, "
        f"{record['cache_misses']} misses); median ms per call:",
        format_table(head, table, align="ll" + "r" * len(labels) + "l"),
        summary,
    ]
    if network.get("slower_than_baseline"):
        lines.append("WARNING: " + network["verdict"])
    return "\n".join(lines)


LABEL_ORDER = ("channel", "padded", "cudnn", "group", "regroup")
