"""How tuning measures and remembers: interleaved timing of candidate calls, and the
on-disk cache of their timings (keyed by device, versions, dtype, shapes and each
candidate's structure, never its weight values)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint_io import write_text

CACHE_ENV = "SPARSE_OPS_CACHE_DIR"
CACHE_VERSION = 1


# ---------------------------------------------------------------------------- timing
class _Timer:
    """One call of ``fn`` in milliseconds: CUDA events on a GPU, the wall clock else."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)


def _quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _separated(samples: list[list[float]]) -> bool:
    """The fastest call's p80 below every other one's p20."""
    ranked = sorted(samples, key=statistics.median)
    best = _quantile(ranked[0], 0.8)
    return all(best < _quantile(s, 0.2) for s in ranked[1:])


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    device: torch.device,
    options,
    budget_s: float,
    repeats: int | None = None,
) -> dict[str, list[float]]:
    """Samples (ms) per named call, taken round-robin after ``options.warmup`` calls each.

    Without ``repeats``: from ``options.min_repeats`` to ``max_repeats`` rounds, stopping
    once the fastest call is separated from the others or ``budget_s`` is spent. With
    ``repeats``: that many rounds, or fewer once ``budget_s`` is spent (never fewer than
    ``min_repeats``), so a large network's check stays bounded."""
    timer = _Timer(device)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(options.warmup):
                fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        high = repeats or options.max_repeats
        low = min(options.min_repeats, high)
        for done in range(high):
            for name, fn in calls.items():
                samples[name].append(timer(fn))
            if done + 1 < low:
                continue
            spent = time.perf_counter() - started > budget_s
            if repeats:
                if spent:
                    break
            elif len(calls) < 2 or spent or _separated(list(samples.values())):
                break
    return samples


# ---------------------------------------------------------------------------- cache
def environment_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}/{os.cpu_count()} cpus/"
        f"{torch.get_num_threads()} threads"
    )
    return {
        "device": where,
        "torch": torch.__version__,
        "triton": triton_version,
        "dtype": str(dtype),
        "code": _code_digest(),
    }


@functools.cache
def _code_digest() -> str:
    """The source of what runs the units (torch paths, units, kernels): timings cached
    by another version of it say nothing about this one."""
    from .. import nn as units
    from .. import ops

    files = [Path(ops.__file__), Path(units.__file__)]
    try:
        import sparse_ops_kernels

        files += sorted(Path(sparse_ops_kernels.__file__).parent.glob("*.py"))
    except ImportError:  # Triton absent: the kernels are not what runs
        pass
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def unit_signature(unit: nn.Module) -> str:
    """What a unit's speed depends on: its class, config, tensor shapes and index
    tensors (not the weight values)."""
    digest = hashlib.sha256(type(unit).__name__.encode())
    config = unit.config() if hasattr(unit, "config") else {}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unit.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if not tensor.is_floating_point():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TuneCache:
    """Candidate timings by key, in one JSON file (written atomically)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self.entries: dict[str, Any] = {}
        self.hits = self.misses = 0
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = {}  # an unreadable cache is only a slower conversion
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION:
                entries = data.get("entries")
                self.entries = entries if isinstance(entries, dict) else {}

    @staticmethod
    def resolve(option: str | os.PathLike | None) -> Path | None:
        if option is None:
            return None
        if option == "default":
            root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse-ops"
            return Path(root) / "tuning.json"
        return Path(option)

    def get(self, key: str, valid: Callable[[Any], bool] | None = None) -> Any:
        """The entry under ``key``, or None (a miss) where there is none or ``valid``
        refuses it (an edited or foreign file)."""
        value = self.entries.get(key)
        if value is not None and valid is not None and not valid(value):
            value = None
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text(
                self.path, json.dumps({"version": CACHE_VERSION, "entries": self.entries}) + "\n"
            )
        except OSError:
            pass  # a read-only home: tuning still worked, only nothing is remembered


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def shapes_of(args: tuple) -> list:
    return [list(a.shape) if torch.is_tensor(a) else None for a in args]


def network_signature(module: nn.Module) -> str:
    """What a whole network's speed depends on: its graph (where it is one) and every
    leaf module's :func:`unit_signature` by path (units, Relayouts, torch modules)."""
    digest = hashlib.sha256()
    code = getattr(module, "code", None)
    if isinstance(code, str):
        digest.update(code.encode())
    for name, unit in sorted(module.named_modules(), key=lambda kv: kv[0]):
        if next(unit.children(), None) is None:
            digest.update(f"{name}:{unit_signature(unit)}".encode())
    return digest.hexdigest()
