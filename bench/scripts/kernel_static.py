"""Static kernel report: every kernel × config × case × dtype compiled for sm_90a / sm_80.

    python -m sparse_ops_bench.scripts.kernel_static [--matrix full|ci]
                                                     [--targets sm_90a sm_80] [--out DIR]

Each case is a launch the product makes (the triton-dense baseline, converted channel
units with and without index maps, fill channels, bias maps and residuals, group packs
and the converter's leftover pack; ``sparse_ops_bench.static_cases``), built from CPU
tensors and compiled ahead of time with the specialisation a real launch gets
(``sparse_ops_bench.kernel_compile``). Per compile it records registers, spills, shared
memory, the MMA kind, asynchronous copies and load widths in the innermost MMA loop,
instructions per iteration per warp, store widths, and the issue-bound ceiling those
imply.

The ceiling is a bound, not a time: it counts issue slots in the innermost loop only.

``--matrix ci`` is the subset the test suite compiles (tests/test_kernel_compile.py):
every config × dtype × target on each kernel's heaviest case, every case once. Exit
status 1 when a compile fails, a config spills, or a floor
(``sparse_ops_bench.static_report``) is missed. Output: ``kernel_static.json`` and
``kernel_static.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from ..static_cases import (
    CASE_BY_NAME,
    DTYPES,
    build_launch,
    candidate_configs,
    ignore_spill_tables,
    kernel_module,
    matrix,
    torch_dtype,
    withheld,
)
from ..static_report import (
    best_configs,
    config_label,
    floor_failures,
    markdown,
    spill_table_text,
)

DEFAULT_OUT = os.path.join("bench", "results", "static")

# ---------------------------------------------------------------------- one compile

_launches: dict = {}


def compile_one(job) -> dict:
    """Compile one matrix entry; a row for the report (never raises)."""
    import triton

    from sparse_ops_bench import kernel_compile
    from sparse_ops_kernels.configs import config_id

    case_name, dtype, index, target = job
    case = CASE_BY_NAME[case_name]
    row = {
        "kernel": case.kernel,
        "case": case_name,
        "dtype": dtype,
        "target": target,
        "triton": triton.__version__,
    }
    try:
        key = (case_name, dtype)
        if key not in _launches:
            _launches[key] = build_launch(case, dtype)
        spec = _launches[key]
        config = candidate_configs(case, dtype, spec)[index]
        tiles = {**spec.constexprs, **config.kwargs}
        row["config"] = {
            **config.kwargs,
            "num_warps": config.num_warps,
            "num_stages": config.num_stages,
        }
        row["config"].setdefault("BLOCK_N", tiles.get("BLOCK_N"))
        row["config_id"] = config_id(config)
        row["launch_class"] = kernel_module(case).launch_class(torch_dtype(dtype), spec.constexprs)
        start = time.perf_counter()
        compiled, log = kernel_compile.compile_launch(spec, config, target)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        stats = kernel_compile.analyse(compiled, log)
        row.update(ok=True, stats=stats.to_json())
        operand = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype, "tf32")
        ceiling = kernel_compile.issue_ceiling(
            stats, tiles, config.num_warps, kernel_compile.TARGETS[target], operand
        )
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
            with ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(all_configs,)
            ) as pool:
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
            print(
                f"[{i}/{total} {time.perf_counter() - start:5.0f}s] {row['kernel']} "
                f"{row['case']} {row['dtype']} {row['target']} {config_label(row)}: "
                f"{status}",
                file=sys.stderr,
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------- writing


def environment() -> dict:
    import platform

    import torch
    import triton

    from sparse_ops_bench.env import git_commit

    return {
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _write(payload: dict, out: str) -> None:
    from sparse_ops.checkpoint_io import write_text  # not at import: the gate's workers stay light

    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "kernel_static.json"), json.dumps(payload, indent=1))
    write_text(
        os.path.join(out, "kernel_static.md"), markdown(payload["rows"], payload["environment"])
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sparse_ops_bench.scripts.kernel_static",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--matrix", choices=["full", "ci"], default="full")
    p.add_argument("--targets", nargs="+", default=list(("sm_90a", "sm_80")))
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument(
        "--kernels", nargs="+", default=["channel", "group"], choices=["channel", "group"]
    )
    p.add_argument("--cases", nargs="+", default=None, choices=sorted(CASE_BY_NAME))
    p.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: CPUs)")
    p.add_argument(
        "--out", default=None, help=f"output folder (default {DEFAULT_OUT}/triton-<version>)"
    )
    p.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    p.add_argument(
        "--all-configs",
        action="store_true",
        help="also the configs the kernels' SPILLS tables withhold",
    )
    p.add_argument(
        "--spill-table",
        nargs="+",
        metavar="JSON",
        help="print the SPILLS tables these --all-configs reports imply, and exit",
    )
    p.add_argument(
        "--render",
        metavar="JSON",
        help="re-mark withheld configs in a report (after a SPILLS table edit), rewrite "
        "its JSON and Markdown in --out; compiles nothing",
    )
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
        print(spill_table_text(args.spill_table))
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
    env.update(
        matrix=args.matrix,
        all_configs=args.all_configs,
        seconds=round(time.perf_counter() - start, 1),
    )
    out = args.out or os.path.join(DEFAULT_OUT, f"triton-{env['triton']}")
    os.makedirs(out, exist_ok=True)
    payload = {"environment": env, "rows": rows, "best_configs": best_configs(rows)}
    _write(payload, out)
    bad = [r for r in rows if floor_failures(r)]
    print(
        f"{len(rows)} compiles in {env['seconds']} s, {len(bad)} miss a floor; report in {out}",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(payload))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
