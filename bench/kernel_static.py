"""Static kernel report: every kernel × config × case × dtype compiled for sm_90a / sm_80.

    python -m sparse_ops_bench.kernel_static [--matrix full|ci] [--targets sm_90a sm_80] [--out DIR]

Each case is a launch the product makes (the triton-dense baseline, converted channel
units with and without index maps, fill channels, bias maps and residuals, group packs
and the converter's leftover pack), built from CPU tensors and compiled ahead of time
with the specialisation a real launch gets (``bench.kernel_compile``). Per compile it
records registers, spills, shared memory, the MMA kind, asynchronous copies and load
widths in the innermost MMA loop, instructions per iteration per warp, store widths,
and the issue-bound ceiling those imply.

The ceiling is a bound, not a time: it counts issue slots in the innermost loop only.

``--matrix ci`` is the subset the test suite compiles (tests/test_kernel_compile.py):
every config × dtype × target on each kernel's heaviest case, every case once. Exit
status 1 when a compile fails, a config spills, or a floor (``floors``) is missed.
Output: ``kernel_static.json`` and ``kernel_static.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16", "float32", "float32-ieee")
DEFAULT_OUT = os.path.join("bench", "results", "static")


@dataclass(frozen=True)
class Case:
    """One launch shape. ``mask``: for channel cases ``dense`` (no index maps: also a
    converted unit over physically narrowed activations), ``in`` (input gather),
    ``out`` (scattered rows + fill channels), ``both``; for group cases ``groups``
    (multi-row groups, rows in no group) or ``leftover`` (16-row chunks, no bias)."""

    name: str
    kernel: str  # "channel" or "group"
    n: int
    cin: int
    cout: int
    hw: tuple[int, int]
    k: int
    stride: int = 1
    padding: int = 0
    mask: str = "dense"
    bias: bool = True
    bias_map: bool = False
    residual: bool = False
    relu: bool = False
    block_n: int = 32
    k_pad: int = 32
    aligned: bool = False  # every row 16-byte aligned: the vector-load floors apply
    col_run: int = 1  # group cases: columns chosen in runs of 8 channels of one tap
    note: str = ""


CASES = [
    Case("dense-3x3", "channel", 64, 64, 64, (32, 32), 3, 1, 1, relu=True, aligned=True,
         note="CIFAR ResNet-18 layer1 conv; the triton-dense baseline"),
    Case("dense-3x3-res", "channel", 64, 256, 256, (8, 8), 3, 1, 1, residual=True, relu=True,
         aligned=True, note="ResNet-18 layer3 second conv, residual and ReLU fused"),
    Case("dense-1x1-s2", "channel", 64, 128, 256, (16, 16), 1, 2, 0, aligned=True,
         note="downsampling shortcut"),
    Case("stem-7x7-s2", "channel", 8, 3, 64, (224, 224), 7, 2, 3, relu=True,
         note="ImageNet stem: 3 input channels cannot be 16-byte aligned"),
    Case("narrow-odd", "channel", 64, 307, 203, (16, 16), 3, 1, 1, relu=True,
         note="narrowed activations of odd width, as a plan built without alignment"),
    Case("narrow-aligned", "channel", 64, 312, 208, (16, 16), 3, 1, 1, relu=True, aligned=True,
         note="the same widths padded to a multiple of 8, as the converter stores them"),
    Case("gather-in", "channel", 64, 256, 256, (8, 8), 3, 1, 1, mask="in", residual=True,
         relu=True, note="input channels read through in_idx (residual-tied layout)"),
    Case("scatter-out", "channel", 64, 256, 256, (8, 8), 3, 1, 1, mask="out", relu=True,
         note="rows written through out_idx, constant channels by fill tiles"),
    Case("all-features", "channel", 64, 128, 128, (16, 16), 3, 1, 1, mask="both",
         bias_map=True, residual=True, relu=True,
         note="in_idx, out_idx, fill, bias map, residual, ReLU: the heaviest epilogue"),
    Case("batch1-odd-s2", "channel", 1, 17, 33, (9, 7), 3, 2, 1, mask="both", residual=True,
         note="batch 1, odd channels and sizes, stride 2"),
    Case("groups-3x3", "group", 64, 256, 256, (8, 8), 3, 1, 1, mask="groups", residual=True,
         relu=True, note="regroup pack: 32-row groups, rows in no group, residual, ReLU"),
    Case("groups-512", "group", 64, 512, 512, (8, 8), 3, 1, 1, mask="groups", relu=True,
         note="the floor case: 3x3 512→512, density 0.2, 32-row groups, arbitrary columns"),
    Case("groups-512-run8", "group", 64, 512, 512, (8, 8), 3, 1, 1, mask="groups", relu=True,
         col_run=8, aligned=True,
         note="the same with columns in runs of 8 channels (RegroupConfig(col_run=8))"),
    Case("groups-1x1-s2", "group", 64, 128, 256, (16, 16), 1, 2, 0, mask="groups",
         note="group-sparse downsampling 1x1"),
    Case("groups-7x7", "group", 8, 64, 64, (28, 28), 7, 1, 3, mask="groups", relu=True,
         note="7x7 group pack"),
    Case("groups-kpad64", "group", 64, 256, 256, (8, 8), 3, 1, 1, mask="groups", k_pad=64,
         note="k_pad 64: the only packs BLOCK_K=64 configs may run on"),
    Case("leftover", "group", 64, 256, 256, (8, 8), 3, 1, 1, mask="leftover", bias=False,
         residual=True, relu=True, block_n=16, k_pad=16,
         note="the converter's leftover pack: 16-row chunks, block_n = k_pad = 16"),
    Case("groups-batch1-odd", "group", 1, 17, 33, (9, 7), 3, 2, 1, mask="groups",
         note="batch 1, odd channels and sizes, stride 2"),
]  # fmt: skip
CASE_BY_NAME = {c.name: c for c in CASES}


# ---------------------------------------------------------------------- building launches


def _torch_dtype(dtype: str):
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)


def build_launch(case: Case, dtype: str):
    """The KernelLaunch a real call of ``case`` makes (CPU tensors, nothing runs)."""
    import torch

    from sparse_ops.formats import ChannelPlan, GroupPack

    g = torch.Generator().manual_seed(0)
    dt = _torch_dtype(dtype)
    allow_tf32 = dtype == "float32"
    n, (h, w), k = case.n, case.hw, case.k
    weight = torch.randn(case.cout, case.cin, k, k, generator=g)
    bias = torch.randn(case.cout, generator=g) if case.bias else None
    x = torch.empty(n, case.cin, h, w, dtype=dt).contiguous(memory_format=torch.channels_last)
    oh = (h + 2 * case.padding - k) // case.stride + 1
    ow = (w + 2 * case.padding - k) // case.stride + 1
    residual = None
    if case.residual:
        residual = torch.empty(n, case.cout, oh, ow, dtype=dt,
                               memory_format=torch.channels_last)  # fmt: skip
    geometry = {"stride": case.stride, "padding": case.padding}
    if case.kernel == "channel":
        from sparse_ops_kernels.channel_conv import channel_conv_launch

        keep_out = torch.ones(case.cout, dtype=torch.bool)
        keep_in = torch.ones(case.cin, dtype=torch.bool)
        if case.mask in ("out", "both"):
            keep_out[torch.randperm(case.cout, generator=g)[: case.cout // 3]] = False
        if case.mask in ("in", "both"):
            keep_in[torch.randperm(case.cin, generator=g)[: case.cin // 3]] = False
        mask = (keep_out[:, None, None, None] & keep_in[None, :, None, None]).expand_as(weight)
        plan = ChannelPlan.from_weight(weight, mask, bias, **geometry).to(dtype=dt)
        bias_map = torch.zeros(case.cout, oh, ow) if case.bias_map else None
        return channel_conv_launch(x, plan, residual=residual, relu=case.relu,
                                   allow_tf32=allow_tf32, bias_map=bias_map,
                                   check_device=False)  # fmt: skip
    from sparse_ops_kernels.group_conv import group_conv_launch

    k_total = k * k * case.cin
    layout = []
    rows = torch.randperm(case.cout, generator=g).tolist()
    size = 16 if case.mask == "leftover" else 32
    keep = case.cout - case.cout // 8  # the rest belong to no group: fill rows
    for start in range(0, keep, size):
        if case.col_run > 1:  # whole aligned runs of col_run channels, density 1/5
            n_runs = k_total // case.col_run
            runs = torch.randperm(n_runs, generator=g)[: n_runs // 5]
            cols = (runs[:, None] * case.col_run + torch.arange(case.col_run)).flatten().tolist()
        else:
            cols = torch.randperm(k_total, generator=g)[: max(1, k_total // 5)].tolist()
        layout.append({"rows": rows[start : min(start + size, keep)], "cols": cols})
    pack = GroupPack.from_weight(weight, None, layout, bias, block_n=case.block_n,
                                 k_pad=case.k_pad, **geometry).to(dtype=dt)  # fmt: skip
    return group_conv_launch(x, pack, residual=residual, relu=case.relu, allow_tf32=allow_tf32,
                             check_device=False)  # fmt: skip


def _kernel_module(case: Case):
    if case.kernel == "channel":
        from sparse_ops_kernels import channel_conv as module
    else:
        from sparse_ops_kernels import group_conv as module
    return module


def candidate_configs(case: Case, dtype: str, spec=None) -> list:
    """The configs the autotuner may pick for this launch (after its pruning)."""
    spec = spec if spec is not None else build_launch(case, dtype)
    return _kernel_module(case).candidate_configs(_torch_dtype(dtype), spec.constexprs)


_SPILL_TABLES: dict[str, dict] = {}


def ignore_spill_tables() -> None:
    """Offer every config, also those the kernels' SPILLS tables withhold (to measure
    them again: ``--all-configs``); :func:`withheld` still reads the tables."""
    from sparse_ops_kernels import channel_conv, group_conv

    for name, module in (("channel", channel_conv), ("group", group_conv)):
        _SPILL_TABLES.setdefault(name, module.SPILLS)
        module.SPILLS = {}


def withheld(row: dict) -> bool:
    """Whether the kernels' SPILLS tables keep this row's config from its launches on
    the row's Triton version (so the autotuner never runs it there)."""
    from sparse_ops_kernels import channel_conv, group_conv, launch

    module = channel_conv if row["kernel"] == "channel" else group_conv
    table = _SPILL_TABLES.get(row["kernel"], module.SPILLS)
    dtype = _torch_dtype(row["dtype"])
    return row.get("config_id") in launch.known_spills(table, row.get("launch_class", ""),
                                                         dtype, row["triton"])  # fmt: skip


def spill_table(paths) -> dict[str, dict[tuple[int, int], dict[str, list[str]]]]:
    """Per kernel, the SPILLS table that full-matrix reports (``--all-configs``) imply:
    {(major, minor): {"class/dtype": [config ids that spilled]}}."""
    table: dict = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        version = tuple(int(p) for p in payload["environment"]["triton"].split(".")[:2])
        for kernel in {row["kernel"] for row in payload["rows"]}:
            table.setdefault(kernel, {}).setdefault(version, {})  # measured, even if clean
        for row in payload["rows"]:
            if not row["ok"] or not (row["stats"]["spill_stores"] or row["stats"]["spill_loads"]):
                continue
            dtype = "float32" if row["dtype"] == "float32-ieee" else row["dtype"]
            key = f"{row['launch_class']}/{dtype}"
            entry = table.setdefault(row["kernel"], {}).setdefault(version, {})
            entry.setdefault(key, set()).add(row["config_id"])
    return {k: {v: {c: sorted(ids) for c, ids in sorted(e.items())} for v, e in sorted(t.items())}
            for k, t in table.items()}  # fmt: skip


# ---------------------------------------------------------------------- the matrix


def matrix(kind: str, targets, dtypes=DTYPES, kernels=("channel", "group"), cases=None):
    """``[(case name, dtype, config index, target)]`` to compile."""
    chosen = [c for c in CASES if c.kernel in kernels and (cases is None or c.name in cases)]
    jobs = []
    if kind == "full":
        for case in chosen:
            for dtype in dtypes:
                for i in range(len(candidate_configs(case, dtype))):
                    jobs += [(case.name, dtype, i, t) for t in targets]
        return jobs
    if kind != "ci":
        raise ValueError(f"matrix must be 'full' or 'ci', got {kind!r}")
    # Each launch class's config set is compiled in full on a case of that class: every
    # config × fp16/bf16/fp32 for the first target, × fp16 for the others (register use
    # barely differs between fp16 and bf16). Every other case once, fp16, with a config
    # that rotates so that each config meets several cases.
    first, others = targets[0], targets[1:]
    covered = set()
    for case_name, dtype_set, keep in CI_CLASS_CASES:
        case = CASE_BY_NAME[case_name]
        if case not in chosen:
            continue
        covered.add(case_name)
        for dtype in [d for d in dtype_set if d in dtypes]:
            for i, config in enumerate(candidate_configs(case, dtype)):
                if keep and not keep(config):
                    continue
                jobs.append((case.name, dtype, i, first))
                if dtype in ("float16", "float32-ieee"):
                    jobs += [(case.name, dtype, i, t) for t in others]
    rotate = 0
    for case in chosen:
        if case.name in covered or "float16" not in dtypes:
            continue
        n_configs = len(candidate_configs(case, "float16"))
        jobs += [(case.name, "float16", rotate % n_configs, t) for t in targets]
        rotate += 1
    return jobs


_TENSOR_DTYPES = ("float16", "bfloat16", "float32")
# (case, dtypes, config filter): one case per launch class, whose configs it compiles.
CI_CLASS_CASES = [
    ("dense-3x3-res", _TENSOR_DTYPES, None),  # channel "vector"
    ("scatter-out", _TENSOR_DTYPES, None),  # "vector-scatter"
    ("gather-in", _TENSOR_DTYPES, None),  # "scalar"
    ("all-features", _TENSOR_DTYPES, None),  # "scalar-scatter"
    ("dense-3x3", ("float32-ieee",), None),  # "fma"
    ("groups-3x3", (*_TENSOR_DTYPES, "float32-ieee"), None),  # group "tensor", "fma"
    ("groups-512-run8", _TENSOR_DTYPES, None),  # group "tensor-run"
    ("groups-kpad64", _TENSOR_DTYPES, lambda c: c.kwargs["BLOCK_K"] == 64),
    ("leftover", _TENSOR_DTYPES, None),  # block_n = k_pad = 16
]


# ---------------------------------------------------------------------- one compile

_launches: dict = {}


def compile_one(job) -> dict:
    """Compile one matrix entry; a row for the report (never raises)."""
    import triton
    from sparse_ops_bench import kernel_compile
    from sparse_ops_kernels.launch import config_id

    case_name, dtype, index, target = job
    case = CASE_BY_NAME[case_name]
    row = {"kernel": case.kernel, "case": case_name, "dtype": dtype, "target": target,
           "triton": triton.__version__}  # fmt: skip
    try:
        key = (case_name, dtype)
        if key not in _launches:
            _launches[key] = build_launch(case, dtype)
        spec = _launches[key]
        config = candidate_configs(case, dtype, spec)[index]
        tiles = {**spec.constexprs, **config.kwargs}
        row["config"] = {**config.kwargs, "num_warps": config.num_warps,
                         "num_stages": config.num_stages}  # fmt: skip
        row["config"].setdefault("BLOCK_N", tiles.get("BLOCK_N"))
        row["config_id"] = config_id(config)
        row["launch_class"] = _kernel_module(case).launch_class(_torch_dtype(dtype),
                                                                spec.constexprs)  # fmt: skip
        start = time.perf_counter()
        compiled, log = kernel_compile.compile_launch(spec, config, target)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        stats = kernel_compile.analyse(compiled, log)
        row.update(ok=True, stats=stats.to_json())
        operand = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "tf32")
        ceiling = kernel_compile.issue_ceiling(stats, tiles, config.num_warps,
                                               kernel_compile.TARGETS[target], operand)  # fmt: skip
        row["ceiling"] = None if ceiling is None else round(ceiling, 4)
    except Exception as e:  # a failing compile is a result, reported with its message
        text = f"{type(e).__name__}: {str(e).strip()}"
        # Triton's errors nest: where it failed comes first, why at the end.
        row.update(ok=False, error=text if len(text) < 2400 else text[:900] + " … " + text[-1500:])
    return row


def _isolate_environment() -> None:
    """No interpreter (it compiles nothing), and every config (a SPARSE_OPS_TUNING=quick
    left in the environment would shrink the matrix without a word)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("SPARSE_OPS_TUNING", None)


def _init_worker(all_configs: bool = False):
    _isolate_environment()
    if all_configs:
        ignore_spill_tables()


def run_matrix(jobs, workers: int | None = None, progress=True, all_configs=False) -> list[dict]:
    from sparse_ops_bench import kernel_compile

    workers = workers or min(len(jobs), os.cpu_count() or 1) or 1
    rows = []
    with kernel_compile.fresh_cache():
        if workers == 1:
            results = map(compile_one, jobs)
            rows = _collect(results, len(jobs), progress)
        else:
            # spawn, not fork: a forked child of a process that has run torch ops can
            # deadlock in the inherited OpenMP thread pool.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(all_configs,)) as pool:  # fmt: skip
                rows = _collect(pool.map(compile_one, jobs), len(jobs), progress)
    return rows


def _collect(results, total: int, progress: bool) -> list[dict]:
    rows, start = [], time.perf_counter()
    for i, row in enumerate(results, 1):
        rows.append(row)
        if progress:
            status = "ok" if row["ok"] else "FAILED"
            if row["ok"] and row["stats"]["spill_stores"]:
                status = f"SPILLS {row['stats']['spill_stores']} B"
            print(f"[{i}/{total} {time.perf_counter() - start:5.0f}s] {row['kernel']} "
                  f"{row['case']} {row['dtype']} {row['target']} {_config_id(row)}: {status}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return rows


def _config_id(row) -> str:
    return row.get("config_id", "?")


# ---------------------------------------------------------------------- floors


def floor_failures(row: dict) -> list[str]:
    """What a compiled row misses of the floors: no spills anywhere; on aligned channel
    cases in fp16/bf16, both operands on 16-byte asynchronous copies in the MMA loop, no
    synchronous global load there, and no store narrower than 64 bits."""
    if row.get("withheld"):
        return []  # never offered on this Triton: it is in the spill table
    if not row["ok"]:
        return ["does not compile"]
    stats, missed = row["stats"], []
    if stats["spill_stores"] or stats["spill_loads"]:
        missed.append(f"spills {stats['spill_stores']} B")
    case = CASE_BY_NAME[row["case"]]
    if case.kernel == "channel" and case.aligned and row["dtype"] in ("float16", "bfloat16"):
        loop = stats["loop"]
        if loop is None:
            missed.append("no MMA loop found")
        else:
            if loop["global_loads"]:
                missed.append(f"{loop['global_loads']} synchronous loads in the K loop")
            narrow = {b: n for b, n in loop["load_bits"].items() if b != "128" and n}
            if narrow or not loop["async_copies"]:
                missed.append(f"K-loop copies not all 16-byte async: {loop['load_bits']}")
        narrow_stores = {b: n for b, n in stats["store_bits"].items() if int(b) < 64 and n}
        if narrow_stores:
            missed.append(f"narrow stores {narrow_stores}")
    if case.name in GROUP_LOOP_FLOORS and row["dtype"] in ("float16", "bfloat16"):
        missed += _group_loop_misses(row, case, GROUP_LOOP_FLOORS[case.name])
    return missed


# Group kernel floors, per case: SASS instructions per 32 gathered columns per warp in
# the innermost MMA loop (checked at BLOCK_K = 32, where one iteration is 32 columns;
# BLOCK_K = 16 iterations carry the same fixed cost for half the columns), and for
# column runs both operands on 16-byte asynchronous copies with no synchronous load.
GROUP_LOOP_FLOORS = {"groups-512": 300, "groups-512-run8": 120}


def _group_loop_misses(row: dict, case: Case, limit: int) -> list[str]:
    loop = row["stats"]["loop"]
    if loop is None:
        return ["no MMA loop found"]
    missed = []
    if row["config"]["BLOCK_K"] == 32 and loop["instructions"] > limit:
        missed.append(f"{loop['instructions']} instructions per 32 columns > {limit}")
    if case.col_run > 1:
        if loop["global_loads"]:
            missed.append(f"{loop['global_loads']} synchronous loads in the K loop")
        if loop["async_copies"] < 2 or not loop["load_bits"].get("128"):
            missed.append(f"operands not on 16-byte async copies: {loop['load_bits']}")
    return missed


# ---------------------------------------------------------------------- report


def environment() -> dict:
    import platform

    import torch
    import triton
    from sparse_ops_bench.env import git_commit

    return {"triton": triton.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "commit": git_commit(),
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"# Static kernel report (Triton {env['triton']}, commit {env['commit']})",
        "",
    ]
    if "commit_group_rows" in env:  # a report whose kernels were compiled in two runs
        lines += [f"Channel kernel rows compiled at {env['commit_channel_rows']}, group kernel "
                  f"rows at {env['commit_group_rows']}.", ""]  # fmt: skip
    lines += [
        "Compiled ahead of time on a CPU, with the specialisation a real launch gets. "
        "`loop` = SASS instructions per iteration of the innermost MMA loop, per warp; "
        "`async` = asynchronous copies in that loop (cp.async / TMA) and their widths in "
        "bits; `ceiling` = the issue-bound fraction of the SM's peak tensor rate "
        "(FLOP per iteration ÷ (instructions × warps ÷ 4) ÷ peak per clock). "
        "**A bound from counted instructions, not a measured time.**",
        "",
    ]
    failed = [r for r in rows if floor_failures(r)]
    held = [r for r in rows if r.get("withheld")]
    offered = [r for r in rows if not r.get("withheld")]
    lines.append(f"{len(rows)} compiles: {len(offered)} of configs the autotuner may pick "
                 f"on this Triton, {sum(not r['ok'] for r in offered)} of them failed, "
                 f"{sum(bool(r['ok'] and r['stats']['spill_stores']) for r in offered)} spill, "
                 f"{len(failed)} miss a floor; {len(held)} of configs the spill tables "
                 "withhold on this Triton (marked *withheld*).")  # fmt: skip
    for r in failed:
        lines.append(f"- {r['kernel']} {r['case']} {r['dtype']} {r['target']} {_config_id(r)}: "
                     + "; ".join(floor_failures(r)))  # fmt: skip
    lines.append("")
    header = (
        "| case | dtype | target | config | regs | spill B | smem KB | mma | loop instr "
        "| mma/iter | async (bits) | sync loads | stores (bits) | ceiling |"
    )
    for kernel in ("channel", "group"):
        kernel_rows = [r for r in rows if r["kernel"] == kernel]
        if not kernel_rows:
            continue
        lines += ["", f"## {kernel} kernel", "", header, "|" + "---|" * 14]
        for r in kernel_rows:
            if not r["ok"]:
                why = r["error"].splitlines()[-1][:80]
                lines.append(f"| {r['case']} | {r['dtype']} | {r['target']} | {_config_id(r)} "
                             f"| **fails**: {why} |||||||||")  # fmt: skip
                continue
            s, loop = r["stats"], r["stats"]["loop"] or {}
            bits = ",".join(f"{b}×{n}" for b, n in loop.get("load_bits", {}).items() if n)
            stores = ",".join(f"{b}×{n}" for b, n in s["store_bits"].items())
            ceiling = "–" if r["ceiling"] is None else f"{100 * r['ceiling']:.1f}%"
            config = _config_id(r) + (" *withheld*" if r.get("withheld") else "")
            cells = [r["case"], r["dtype"], r["target"], config, s["registers"],
                     s["spill_stores"], f"{s['shared'] / 1024:.0f}", s["mma_kind"],
                     loop.get("instructions", "–"), loop.get("mma", "–"),
                     f"{loop.get('async_copies', 0)} ({bits or '–'})",
                     loop.get("global_loads", "–"), stores or "–", ceiling]  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "## Cases", ""]
    lines += [f"- `{c.name}` ({c.kernel}): {c.note}" for c in CASES]
    return "\n".join(lines) + "\n"


def best_configs(rows: list[dict], target="sm_90a", dtype="float16") -> dict[str, list]:
    """Per case, configs ordered by issue ceiling (the static ranking --quick GPU runs use)."""
    ranked: dict[str, list] = {}
    for r in rows:
        if r.get("withheld") or not r["ok"]:
            continue
        if r["target"] == target and r["dtype"] == dtype and r["ceiling"] is not None:
            ranked.setdefault(r["case"], []).append((r["ceiling"], r["config"]))
    return {k: [c for _, c in sorted(v, key=lambda t: -t[0])] for k, v in ranked.items()}


def _write(payload: dict, out: str) -> None:
    from sparse_ops.checkpoint_io import write_text  # not at import: the gate's workers stay light

    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "kernel_static.json"), json.dumps(payload, indent=1))
    write_text(
        os.path.join(out, "kernel_static.md"), markdown(payload["rows"], payload["environment"])
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse_ops_bench.kernel_static",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--matrix", choices=["full", "ci"], default="full")
    p.add_argument("--targets", nargs="+", default=list(("sm_90a", "sm_80")))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--kernels", nargs="+", default=["channel", "group"],
                   choices=["channel", "group"])  # fmt: skip
    p.add_argument("--cases", nargs="+", default=None, choices=sorted(CASE_BY_NAME))
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}/"
                                                "triton-<version>)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.add_argument("--all-configs", action="store_true",
                   help="also the configs the kernels' SPILLS tables withhold")  # fmt: skip
    p.add_argument(
        "--spill-table",
        nargs="+",
        metavar="JSON",
        help="print the SPILLS tables these --all-configs reports imply, and exit",
    )
    p.add_argument(
        "--render", metavar="JSON",
        help="re-mark withheld configs in a report (after a SPILLS table edit), rewrite "
             "its JSON and Markdown in --out; compiles nothing",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.render:
        with open(args.render, encoding="utf-8") as f:
            payload = json.load(f)
        for row in payload["rows"]:
            row["withheld"] = withheld(row)
        payload["best_configs"] = best_configs(payload["rows"])
        out = args.out or os.path.dirname(args.render)
        _write(payload, out)
        return 1 if any(floor_failures(r) for r in payload["rows"]) else 0
    if args.spill_table:
        for kernel, table in spill_table(args.spill_table).items():
            print(f"# kernels/{kernel}_conv.py\nSPILLS = {{")
            for version, entry in table.items():
                if not entry:
                    print(f"    {version}: {{}},  # measured: nothing spills")
                    continue
                print(f"    {version}: {{")
                for key, ids in entry.items():
                    print(f"        {key!r}: {{{', '.join(repr(i) for i in ids)}}},")
                print("    },")
            print("}")
        return 0
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    _isolate_environment()
    if interpreted and "sparse_ops_kernels.channel_conv" in sys.modules:
        p.error("TRITON_INTERPRET was set when the kernels were imported: unset it")
    from sparse_ops_bench import kernel_compile

    for t in args.targets:
        if t not in kernel_compile.TARGETS:
            p.error(f"unknown target {t}; known: {', '.join(kernel_compile.TARGETS)}")
    if args.all_configs:
        ignore_spill_tables()
    jobs = matrix(args.matrix, args.targets, tuple(args.dtypes), tuple(args.kernels), args.cases)
    print(f"{len(jobs)} compiles", file=sys.stderr)
    start = time.perf_counter()
    rows = run_matrix(jobs, args.jobs, all_configs=args.all_configs)
    for row in rows:
        row["withheld"] = withheld(row)
    env = environment()
    env.update(matrix=args.matrix, all_configs=args.all_configs,
               seconds=round(time.perf_counter() - start, 1))  # fmt: skip
    out = args.out or os.path.join(DEFAULT_OUT, f"triton-{env['triton']}")
    os.makedirs(out, exist_ok=True)
    payload = {"environment": env, "rows": rows, "best_configs": best_configs(rows)}
    _write(payload, out)
    bad = [r for r in rows if floor_failures(r)]
    print(f"{len(rows)} compiles in {env['seconds']} s, {len(bad)} miss a floor; "
          f"report in {out}", file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(payload))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
