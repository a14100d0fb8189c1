"""Kernel microbenchmark: our two kernels against cuDNN on single layers (GPU).

    python -m sparse_ops_bench.scripts.kernel_floors [--dtype float16] [--batch 64]
                                                     [--out FILE.json]
    python -m sparse_ops_bench.scripts.kernel_floors --smoke  # tiny shapes, CPU, interpreter

Two comparisons, each on every distinct 3×3 conv of the CIFAR networks, at the
spatial size the layer sees in the network on 32×32 inputs, batch 64, channels-last:

``channel``  a layer compacted to 50% of its input and output channels: our channel
             kernel on the compacted weight vs cuDNN running the same compacted conv.
             Floor (issue 5): ours ≥ 0.8× cuDNN's speed (ResNet-18 / ResNet-50).
``channel-indexed``  the same layer as a converted network with residual-tied channels
             runs it: full-width input read through ``in_idx``, output written
             through ``out_idx``, pruned channels filled in the same launch, vs cuDNN
             on the compacted conv alone (input gathered beforehand). Same floor.
``group``    a layer with ≥ 256 output channels at 80% block sparsity (regroup-shaped
             blocks of 32 rows): our group kernel vs cuDNN on the dense layer.
             Floor (issue 5): ≥ 2.5× faster (VGG-16 / ResNet-18).

Each pair's outputs are compared before timing (fp32 accumulate on both sides;
:func:`sparse_ops_bench.checks.check_output`, the benchmark's one policy: tolerance by
dtype). Timing: :func:`sparse_ops_bench.timing.time_cuda` (CUDA events, warm-up, L2
flushed, median of ``--repeats``).
``--smoke`` runs the same code on tiny shapes on the CPU under ``TRITON_INTERPRET=1``
(perf_counter), to check the script, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparse_ops import models
from sparse_ops.checkpoint_io import write_text
from sparse_ops.packing import pack_channels, pack_groups

from ..checks import check_output
from ..env import environment
from ..presets import distinct_convs
from ..tickets import group_mask
from ..timing import time_call

CHANNEL_ARCHS = ("res18", "res50")
GROUP_ARCHS = ("vgg16_bn", "res18")
CHANNEL_FLOOR = 0.8  # ours / cuDNN speed on the same compacted conv
GROUP_FLOOR = 2.5  # speedup over dense cuDNN at 80% block sparsity


def conv_input_sizes(arch: str, hw: int = 32) -> dict[str, int]:
    """Input height of every conv of ``arch`` on ``hw``×``hw`` images (square inputs)."""
    model = models.create(arch).eval()
    sizes: dict[str, int] = {}

    def record(name: str):
        def hook(module, args) -> None:  # returning a value would replace the input
            sizes.setdefault(name, args[0].shape[-1])

        return hook

    hooks = [
        m.register_forward_pre_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, hw, hw))
    for h in hooks:
        h.remove()
    return sizes


def _layers(archs, min_out: int = 0):
    for arch in archs:
        sizes = conv_input_sizes(arch)
        for shape in distinct_convs(arch, (3,)):
            if shape.out_channels >= min_out:
                yield arch, shape, sizes[shape.source]


def _checked(ours_fn, reference_fn, dtype: torch.dtype) -> dict[str, Any]:
    with torch.inference_mode():
        return check_output(ours_fn(), reference_fn(), dtype)


def _timed(row: dict[str, Any], ours_fn, cudnn_fn, device, timing) -> dict[str, Any]:
    if row["status"] == "ok":
        row["ours"] = time_call(ours_fn, device, **timing)
        row["cudnn"] = time_call(cudnn_fn, device, **timing)
        row["speedup"] = row["cudnn"]["median_ms"] / row["ours"]["median_ms"]
    return row


def _indexed_channel_row(arch, s, hw, scale, batch, device, dtype, timing, g) -> dict:
    """The layer as a converted network runs it when its channels are tied by residual
    adds: full-width activations read through ``in_idx`` and written through ``out_idx``
    (50% of each, scattered), pruned output channels filled in the same launch. cuDNN
    runs only the compacted conv on an input gathered beforehand (gather not timed)."""
    from sparse_ops_kernels.channel_conv import channel_conv

    cin, cout = max(2, s.in_channels // scale), max(2, s.out_channels // scale)
    hw = max(4, hw // scale)
    keep_in = torch.randperm(cin, generator=g)[: cin // 2].sort().values
    keep_out = torch.randperm(cout, generator=g)[: cout // 2].sort().values
    w = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 4.5) ** 0.5
    mask = torch.zeros(cout, cin, 3, 3, dtype=torch.bool)
    mask[keep_out[:, None], keep_in[None, :]] = True
    plan = pack_channels(w, mask, None, stride=s.stride, padding=s.padding)
    plan = plan.to(device, dtype)
    x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    x_compact = x[:, keep_in.to(device)].contiguous(memory_format=torch.channels_last)
    w_compact = w[keep_out][:, keep_in].to(device, dtype)
    w_compact = w_compact.contiguous(memory_format=torch.channels_last)
    out_rows = keep_out.to(device)
    ours = lambda x=x, plan=plan: channel_conv(x, plan)  # noqa: E731
    cudnn = lambda: F.conv2d(x_compact, w_compact, None, s.stride, s.padding)  # noqa: E731
    check = _checked(lambda: ours()[:, out_rows], cudnn, dtype)
    row = _timed(check, ours, cudnn, device, timing)
    kept = {"kept_in": int(keep_in.numel()), "kept_out": int(keep_out.numel())}
    return _layer_row("channel-indexed", arch, s, cin, cout, hw, batch, CHANNEL_FLOOR, row, **kept)


def _layer_row(kind, arch, s, cin, cout, hw, batch, floor, row, **extra) -> dict:
    """One result row: the layer, its (scaled) sizes, the floor it is held to, timings."""
    return {
        "kind": kind,
        "arch": arch,
        "layer": s.source,
        "in_channels": cin,
        "out_channels": cout,
        **extra,
        "hw": hw,
        "stride": s.stride,
        "batch": batch,
        "floor": floor,
        **row,
    }


def run(dtype: torch.dtype, batch: int, device: torch.device, timing: dict, scale: int = 1):
    """``scale`` > 1 divides channels and spatial sizes (the CPU smoke run)."""
    from sparse_ops_kernels.channel_conv import channel_conv
    from sparse_ops_kernels.group_conv import group_conv

    g = torch.Generator().manual_seed(0)
    rows = []
    for arch, s, hw in _layers(CHANNEL_ARCHS):
        cin, cout = max(1, s.in_channels // (2 * scale)), max(1, s.out_channels // (2 * scale))
        hw = max(4, hw // scale)
        x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9) ** 0.5
        plan = pack_channels(w, None, None, stride=s.stride, padding=s.padding)
        plan = plan.to(device, dtype)
        wd = w.to(device, dtype).contiguous(memory_format=torch.channels_last)
        ours = lambda x=x, plan=plan: channel_conv(x, plan)  # noqa: E731
        cudnn = lambda x=x, wd=wd, s=s: F.conv2d(x, wd, None, s.stride, s.padding)  # noqa: E731
        row = _timed(_checked(ours, cudnn, dtype), ours, cudnn, device, timing)
        rows.append(_layer_row("channel", arch, s, cin, cout, hw, batch, CHANNEL_FLOOR, row))
        rows.append(_indexed_channel_row(arch, s, hw, scale, batch, device, dtype, timing, g))
    for arch, s, hw in _layers(GROUP_ARCHS, min_out=256):
        cin, cout = max(1, s.in_channels // scale), max(1, s.out_channels // scale)
        hw = max(4, hw // scale)
        x = torch.randn(batch, cin, hw, hw, generator=g).to(device, dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        w = torch.randn(cout, cin, 3, 3, generator=g) / (cin * 9 * 0.2) ** 0.5
        mask, layout = group_mask(tuple(w.shape), 0.2, g)
        pack = pack_groups(w, mask, layout, None, stride=s.stride, padding=s.padding)
        pack = pack.to(device, dtype)
        wd = (w * mask).to(device, dtype).contiguous(memory_format=torch.channels_last)
        dense = w.to(device, dtype).contiguous(memory_format=torch.channels_last)
        ours = lambda x=x, pack=pack: group_conv(x, pack)  # noqa: E731
        masked = lambda x=x, wd=wd, s=s: F.conv2d(x, wd, None, s.stride, s.padding)  # noqa: E731
        # Checked against the masked layer, timed against the *dense* one: what pruning saves.
        cudnn = lambda x=x, d=dense, s=s: F.conv2d(x, d, None, s.stride, s.padding)  # noqa: E731
        row = _timed(_checked(ours, masked, dtype), ours, cudnn, device, timing)
        density = {"block_density": float(mask.float().mean())}
        rows.append(_layer_row("group", arch, s, cin, cout, hw, batch, GROUP_FLOOR, row, **density))
    for r in rows:
        r["meets_floor"] = r["status"] == "ok" and r["speedup"] >= r["floor"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, interpreter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment (set before start)")
        device, batch, scale = torch.device("cpu"), 1, 16
        timing = {"warmup": 0, "repeats": 1}
    else:
        if not torch.cuda.is_available():
            sys.exit("kernel_floors measures GPU kernels: no CUDA device here (try --smoke)")
        device, batch, scale = torch.device("cuda"), args.batch, 1
        torch.backends.cudnn.benchmark = True
        timing = {"warmup": args.warmup, "repeats": args.repeats, "flush_l2": True}
    rows = run(dtype, batch, device, timing, scale)
    for r in rows:
        speed = f"{r['speedup']:.2f}×" if "speedup" in r else r["status"]
        print(
            f"{r['kind']:15} {r['arch']:9} {r['layer']:18} {r['in_channels']:4}→"
            f"{r['out_channels']:<4} {r['hw']:3}px  {speed:>8}  floor {r['floor']}×  "
            f"{'ok' if r['meets_floor'] else 'BELOW'}"
        )
    result = {
        "benchmark": "kernel_floors",
        "dtype": args.dtype,
        "smoke": args.smoke,
        "timing": timing,
        "environment": environment(),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.out, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
