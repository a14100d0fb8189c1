"""The ``sparse-ops`` command (also ``python -m sparse_ops``).

Every subcommand takes ``--json`` (one JSON object on stdout instead of tables). Bad
input prints one line, ``sparse-ops: error: ...``, on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__, models
from .errors import SparseOpsError
from .tables import format_table, shape_text


def _cmd_models(args: argparse.Namespace) -> int:
    entries = []
    for name in models.names():
        info = models.info(name)
        classes = 1000 if info.input_size[1] == 224 else 10
        entries.append(
            {
                "name": name,
                "origin": info.origin,
                "family": info.family,
                "input_size": list(info.input_size),
                "num_classes_default": classes,
                "params": models.parameter_count(name, classes),
                "description": info.description,
            }
        )
    if args.json:
        _print_json({"models": entries, "patterns": models.PATTERN_HELP})
        return 0
    rows = [
        [e["name"], e["origin"], shape_text(e["input_size"]), e["params"], e["description"]]
        for e in entries
    ]
    print(format_table(["name", "origin", "input", "params", "description"], rows, align="lllrl"))
    print(f"\nalso accepted: {models.PATTERN_HELP}")
    print("params counted with 10 classes for 32×32 inputs, 1000 for 224×224")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_report, render_inspect

    report = inspect_report(args.checkpoint, arch=args.arch)
    if args.json:
        _print_json(report)
        return 0
    print(render_inspect(report))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    summary = run_demo(args.out, quiet=args.json)
    if args.json:
        _print_json(summary)
    return 0 if summary["ok"] else 1


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-ops",
        description="Structurally sparse lottery tickets: structure, convert, measure.",
    )
    parser.add_argument("--version", action="version", version=f"sparse-ops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the built-in architectures")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_models)

    p = sub.add_parser(
        "inspect",
        help="per-layer density and structure of a ticket / checkpoint",
        description="Read a checkpoint in any recognised layout (our .safetensors tickets, "
        "torch.nn.utils.prune state dicts, Structure-LTH checkpoints, open_lth level "
        "directories or checkpoint.pth, plain state dicts whose zeros are the mask) and "
        "print per-layer statistics.",
    )
    p.add_argument("checkpoint", help="file or open_lth level directory")
    p.add_argument("--arch", help="check the ticket against this architecture")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_inspect)

    p = sub.add_parser("demo", help="the main job on the embedded default (no downloads)")
    p.add_argument("--out", default="sparse-ops-out", help="output folder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except SparseOpsError as exc:
        print(f"sparse-ops: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-ops: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
