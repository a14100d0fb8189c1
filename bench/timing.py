"""Latency measurement: CUDA events on a GPU, ``time.perf_counter`` on the CPU.

Both return the same record: median, p20 and p80 in milliseconds, and every raw
sample, so a reader can recompute any statistic.

GPU method (what a reviewer expects, unlike one cold launch): ``warmup`` untimed calls
(autotuning and cuDNN's algorithm search happen there), then ``repeats`` timed calls,
each bracketed by its own pair of CUDA events. Before each timed call the L2 cache is
flushed by writing a buffer larger than any current L2 (outside the events), so a
small layer is not timed reading its weights and inputs from a warm cache. With
``graph=True`` the call is captured once into a CUDA graph and replays are timed: the
end-to-end number without Python and launch overhead.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # > the 50 MB L2 of an H100 and the 60 MB of a B200


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 1]."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(samples_ms: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "median_ms": statistics.median(samples_ms),
        "p20_ms": percentile(samples_ms, 0.2),
        "p80_ms": percentile(samples_ms, 0.8),
        "runs": len(samples_ms),
        "samples_ms": samples_ms,
        **extra,
    }


def time_cpu(fn: Callable[[], object], *, warmup: int = 3, repeats: int = 20) -> dict[str, Any]:
    """CPU wall clock of ``fn()`` after ``warmup`` calls; records torch's thread count."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
    return summarize(samples, timer="perf_counter", warmup=warmup, threads=torch.get_num_threads())


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup: int = 10,
    repeats: int = 50,
    flush_l2: bool = True,
    graph: bool = False,
) -> dict[str, Any]:
    """GPU time of ``fn()`` from CUDA events (see the module docstring)."""
    flush = None
    if flush_l2:
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        call = fn
        if graph:
            cuda_graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # side-stream warm-up before capture (lazy inits)
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(cuda_graph):
                fn()
            call = cuda_graph.replay
            call()
            torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for start, end in zip(starts, ends, strict=True):
            if flush is not None:
                flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]
    return summarize(
        samples,
        timer="cuda_events" + ("+graph" if graph else ""),
        warmup=warmup,
        l2_flushed=flush_l2,
    )


def time_call(fn: Callable[[], object], device: torch.device, **options: Any) -> dict[str, Any]:
    """``time_cuda`` on a CUDA device, ``time_cpu`` elsewhere (GPU-only options dropped)."""
    if device.type == "cuda":
        return time_cuda(fn, **options)
    options = {k: v for k, v in options.items() if k in ("warmup", "repeats")}
    return time_cpu(fn, **options)
