"""``sparse-ops bench`` (also ``python -m sparse_ops_bench``): run a preset, write JSON,
Markdown, plots."""

from __future__ import annotations

import argparse
import json
import sys

from sparse_ops.progress import Progress

from . import harness, report
from .checks import is_wrong
from .presets import PRESETS
from .providers import PROVIDERS
from .tickets import METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="what to measure (default: %(default)s; see bench/presets.py)",
    )
    p.add_argument(
        "--models", nargs="+", metavar="ARCH", help="only these architectures of the preset"
    )
    p.add_argument(
        "--providers",
        nargs="+",
        choices=sorted(PROVIDERS),
        metavar="P",
        help=f"default: all that run on the device; of {', '.join(PROVIDERS)}",
    )
    p.add_argument("--methods", nargs="+", choices=METHODS, help="ticket kinds to sweep")
    p.add_argument(
        "--sparsities",
        nargs="+",
        type=float,
        metavar="S",
        help="override the preset's sparsities (fractions, e.g. 0.5 0.8)",
    )
    p.add_argument("--dtype", choices=sorted(harness.DTYPES), default="float32")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--repeats", type=int, help="timed runs per provider (preset default)")
    p.add_argument("--warmup", type=int, help="untimed runs first (preset default)")
    p.add_argument("--graph", action="store_true", help="GPU: time CUDA-graph replays")
    p.add_argument("--out", help="output folder (default: sparse-ops-bench/<device>)")
    p.add_argument("--json", action="store_true", help="print the result JSON")


def run_from_args(args: argparse.Namespace) -> int:
    out = args.out or harness.default_out(args.device)
    progress = Progress(enabled=not args.json)
    result = harness.run(
        args.preset,
        models_wanted=args.models,
        providers=args.providers,
        methods=args.methods,
        sparsities=args.sparsities,
        dtype=args.dtype,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        graph=args.graph,
        out=out,
        progress=progress,
    )
    if args.json:
        print(json.dumps(result))
    else:
        print(report.markdown(result))
        for line in report.summary_lines(result):
            print(line)
        print(f"results in {out}/")
    bad = [r for r in result["rows"] if is_wrong(r)]
    return 1 if bad else 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    """The ``sparse-ops bench`` subcommand (an entry point of group sparse_ops.commands)."""
    p = sub.add_parser(
        "bench",
        help="latency of our kernels vs dense baselines, per layer and end to end",
        description="Run a benchmark preset over refill, regroup and random tickets at several "
        "sparsities; every provider's output is checked against the network it claims to "
        "compute before it is timed. Writes JSON (environment + raw samples), a Markdown "
        "table and plots.",
    )
    add_arguments(p)
    p.set_defaults(handler=run_from_args)


def register_demo(sub: argparse._SubParsersAction) -> None:
    """The ``sparse-ops demo`` subcommand: the main job on the embedded default."""
    p = sub.add_parser("demo", help="the main job on the embedded default (no downloads)")
    p.add_argument("--out", default="sparse-ops-out", help="output folder (default: %(default)s)")
    p.add_argument("--device", help="where to time latency: cuda or cpu (default: cuda if any)")
    p.add_argument(
        "--quick", action="store_true", help="the same pipeline in seconds (1 round, 1 epoch)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import QUICK, DemoConfig, run_demo

    config = QUICK if args.quick else DemoConfig()
    summary = run_demo(args.out, quiet=args.json, config=config, device=args.device)
    if args.json:
        print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparse_ops_bench", description=__doc__)
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
