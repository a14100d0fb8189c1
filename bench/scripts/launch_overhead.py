"""Host-side cost of one conv call, the kernel launch itself stubbed out: this tree vs an
earlier revision, measured in one run.

    python -m sparse_ops_bench.scripts.launch_overhead [--baseline REV] [--calls 2000]
                                                       [--out DIR]

For each side a fresh interpreter imports that side's ``kernels`` and ``sparse_ops``
(the baseline's are extracted from git into a temporary folder), replaces the Triton
kernel objects with a no-op (so the number is Python, checks, allocation and dispatch:
what our code costs per call, not Triton's launcher nor the GPU), and times:

- ``channel launcher`` / ``group launcher``: ``channel_conv`` / ``group_conv`` (named
  ``channel_conv2d`` / ``group_conv2d`` before the formats moved into the kernels);
- ``channel module`` / ``group module``: a converted unit's ``forward`` as a converted
  network calls it (``ChannelPrunedConv2d``, ``GroupSparseConv2d``, Triton backend).

Inputs are small CPU tensors (batch 1, 8×8), so tensor work is negligible. The sides
alternate over ``--rounds`` rounds (a shared machine drifts); each round times
``--repeats`` batches of ``--calls`` calls. Output: ``launch_overhead.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

DEFAULT_BASELINE = "2b2b460"  # main before the formats moved into the kernels package
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a fresh interpreter with one side's packages first on sys.path.
_PROBE = r"""
import json, os, statistics, sys, time
os.environ["TRITON_INTERPRET"] = "1"
sys.path.insert(0, sys.argv[1])
calls, repeats = int(sys.argv[2]), int(sys.argv[3])
import importlib
import torch
from sparse_ops import nn as snn, ops
# This side's kernel package: whichever name its sparse_ops imported (an older tree calls
# it kernels), so the stubs below replace the kernels that side's modules really call.
kernel_package = "sparse_ops_kernels" if "sparse_ops_kernels" in sys.modules else "kernels"
cc = importlib.import_module(kernel_package + ".channel_conv")
gc = importlib.import_module(kernel_package + ".group_conv")
try:
    from sparse_ops.packing import pack_channels, pack_groups
except ImportError:  # before the formats moved into the kernels package
    from sparse_ops.formats import ChannelPlan, GroupPack
    pack_channels, pack_groups = ChannelPlan.from_weight, GroupPack.from_weight
channel_launcher = getattr(cc, "channel_conv2d", None) or cc.channel_conv
group_launcher = getattr(gc, "group_conv2d", None) or gc.group_conv

class InterpretedFunction:  # the launchers test for this class name: keep their path
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

cc.channel_conv_kernel = InterpretedFunction()
gc.group_conv_kernel = InterpretedFunction()
torch.manual_seed(0)
torch.set_num_threads(1)
w = torch.randn(64, 64, 3, 3)
mask = torch.ones_like(w, dtype=torch.bool)
mask[::3] = False
mask[:, ::4] = False
plan = pack_channels(w, mask, torch.zeros(64), padding=1).to("cpu", torch.float16)
layout = [{"rows": list(range(0, 32)), "cols": list(range(0, 200))},
          {"rows": list(range(32, 60)), "cols": list(range(100, 400))}]
pack = pack_groups(w, None, layout, torch.zeros(64), padding=1).to("cpu", torch.float16)
x = torch.randn(1, 64, 8, 8).half().contiguous(memory_format=torch.channels_last)
res = torch.randn(1, 64, 8, 8).half().contiguous(memory_format=torch.channels_last)
channel_unit = snn.ChannelPrunedConv2d(plan, relu=True)
group_unit = snn.GroupSparseConv2d(pack, relu=True)

def per_call(fn):
    for _ in range(200):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t) / calls * 1e6)
    return {"median_us": statistics.median(samples), "samples_us": samples}

result = {
    "channel launcher": per_call(lambda: channel_launcher(x, plan, residual=res, relu=True)),
    "group launcher": per_call(lambda: group_launcher(x, pack, residual=res, relu=True)),
}
with ops.backend("triton"), torch.no_grad():
    result["channel module"] = per_call(lambda: channel_unit(x, res))
    result["group module"] = per_call(lambda: group_unit(x, res))
print(json.dumps(result))
"""


def _extract(rev: str, folder: str) -> None:
    archive = subprocess.run(
        ["git", "archive", rev, "kernels", "sparse_ops"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    # The folder installs as sparse_ops_kernels; without this name in the extracted tree
    # a baseline that imports it would get this tree's installed kernels instead.
    os.symlink("kernels", os.path.join(folder, "sparse_ops_kernels"))


def _measure(path: str, calls: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [sys.executable, "-c", _PROBE, path, str(calls), str(repeats)]
    out = subprocess.run(
        command, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"probe failed for {path}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sparse_ops_bench.scripts.launch_overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=7, help="alternating baseline/tree rounds")
    p.add_argument("--out", default=os.path.join("bench", "results", "cpu"))
    args = p.parse_args(argv)
    from sparse_ops_bench.env import cpu_name, git_commit

    # Rounds alternate the two sides, so a machine that speeds up or slows down during
    # the run (shared cores, frequency) affects both alike; the median round counts.
    sides: dict[str, list[dict]] = {"baseline": [], "this tree": []}
    with tempfile.TemporaryDirectory(prefix="sparse-ops-baseline-") as folder:
        _extract(args.baseline, folder)
        for i in range(args.rounds):
            for name, path in (("baseline", folder), ("this tree", ROOT)):
                print(f"round {i + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                sides[name].append(_measure(path, args.calls, args.repeats))

    def rounds_of(name: str, what: str) -> list[float]:
        return [r[what]["median_us"] for r in sides[name]]

    rows = []
    for what in sides["baseline"][0]:
        old, new = rounds_of("baseline", what), rounds_of("this tree", what)
        rows.append(
            {
                "call": what,
                "baseline_us": round(statistics.median(old), 1),
                "this_tree_us": round(statistics.median(new), 1),
                "speedup": round(statistics.median(old) / statistics.median(new), 2),
                "baseline_min_us": round(min(old), 1),
                "this_tree_min_us": round(min(new), 1),
                "speedup_of_min": round(min(old) / min(new), 2),
            }
        )
    env = {
        "commit": git_commit(),
        "baseline": args.baseline,
        "cpu": cpu_name(),
        "python": sys.version.split()[0],
        "calls": args.calls,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "date": time.strftime("%Y-%m-%d"),
    }
    from sparse_ops.checkpoint_io import write_text

    os.makedirs(args.out, exist_ok=True)
    payload = {"environment": env, "rows": rows, "raw": sides}
    write_text(os.path.join(args.out, "launch_overhead.json"), json.dumps(payload, indent=1))
    lines = [
        f"# Host cost per conv call, launch stubbed ({env['cpu']}, 1 thread)",
        "",
        f"Baseline `{args.baseline}` vs this tree (`{env['commit']}`): per side, the "
        f"median over {args.rounds} alternating rounds of the median of {args.repeats} "
        f"batches of {args.calls} calls; µs per call.",
        "",
        "| call | baseline µs | this tree µs | less by | fastest rounds: baseline, "
        "this tree, less by |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['call']} | {r['baseline_us']} | {r['this_tree_us']} | {r['speedup']}× "
        f"| {r['baseline_min_us']}, {r['this_tree_min_us']}, {r['speedup_of_min']}× |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    write_text(os.path.join(args.out, "launch_overhead.md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
