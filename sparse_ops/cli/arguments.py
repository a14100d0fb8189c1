"""The ``sparse-ops`` argument parser: subcommands, their options, and the subcommands
other packages contribute through the ``sparse_ops.commands`` entry-point group.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points

from .. import __version__
from ..structure.methods import METHODS
from . import commands
from .structure_args import add_structure_args

COMMAND_GROUP = "sparse_ops.commands"  # subcommands other packages (bench/) contribute


def _command_plugins() -> list:
    plugins = []
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            plugins.append(ep.load())
        except ImportError as exc:
            raise SystemExit(
                f"sparse-ops: error: the {ep.name!r} command ({ep.value}) cannot be loaded: "
                f"{exc}; {import_advice(ep.value.partition(':')[0].partition('.')[0])}"
            ) from None
    return plugins


def import_advice(package: str) -> str:
    """Why ``package`` may not import: a folder of that name without ``__init__.py`` on
    the path (typically in the working directory) hides the installed one."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin is None and spec.submodule_search_locations:
        where = ", ".join(str(p) for p in spec.submodule_search_locations)
        return (
            f"the folder {where} hides the installed {package!r} package; run from "
            "another directory or rename that folder"
        )
    return "reinstall with `pip install -e .`"


def _command(
    sub: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    reads_ticket: bool = False,
) -> argparse.ArgumentParser:
    """Subcommand ``name``, run by ``handler``, whose docstring is its help: the first line
    for the command list, the rest (re-wrapped) for its --help; ``reads_ticket`` adds the
    ticket argument."""
    summary, _, description = inspect.cleandoc(handler.__doc__ or "").partition("\n\n")
    p = sub.add_parser(name, help=summary, description=description or None)
    if reads_ticket:
        p.add_argument("ticket", help="ticket file or open_lth level directory")
    p.set_defaults(handler=handler)
    return p


def _output_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", required=True, help="output .safetensors file")


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-ops",
        description="Structurally sparse lottery tickets: structure, convert, measure.",
    )
    parser.add_argument("--version", action="version", version=f"sparse-ops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "models", commands._cmd_models)
    _json_flag(p)

    p = _command(sub, "inspect", commands._cmd_inspect)
    p.add_argument("checkpoint", help="file or open_lth level directory")
    p.add_argument("--arch", help="check the ticket against this architecture")
    _json_flag(p)

    p = _command(sub, "prune", commands._cmd_prune)
    p.add_argument("--arch", required=True, help="built-in architecture (sparse-ops models)")
    p.add_argument(
        "--data",
        default="digits",
        help="digits (default), cifar10, cifar100, synthetic, imagefolder (DIR/train/<class>/ "
        "and DIR/val/, as ImageNet and Tiny-ImageNet ship)",
    )
    p.add_argument("--data-dir", help="directory of the CIFAR binary release / image folders")
    p.add_argument(
        "--image-size",
        type=int,
        help="resize digits/synthetic images (default 32); imagefolder crop size (default 224)",
    )
    p.add_argument("--rounds", type=int, default=4, help="pruning rounds (default 4)")
    p.add_argument("--rate", type=float, default=0.2, help="share of remaining weights pruned")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--post", choices=["none", *METHODS], default="none")
    p.add_argument("--epochs", type=int, default=15, help="training epochs per round")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--rewind-epoch", type=int, default=0, help="rewind point (0: init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="train on a GPU if there is one (auto, default), or as told; under "
        "torchrun each rank takes cuda:LOCAL_RANK (NCCL) or the CPU (gloo)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="DataLoader processes decoding images (imagefolder)"
    )
    p.add_argument("--out", required=True, help="output folder")
    _json_flag(p)
    add_structure_args(p)

    p = _command(sub, "restructure", commands._cmd_restructure, reads_ticket=True)
    p.add_argument("--arch", help="architecture to check the ticket against")
    p.add_argument("--method", required=True, choices=list(METHODS))
    _output_file(p)
    p.add_argument("--data", help="batch source for feature_* / saliency criteria")
    p.add_argument("--data-dir", help="directory of the CIFAR binary release")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    _json_flag(p)
    add_structure_args(p)

    p = _command(sub, "transform", commands._cmd_transform, reads_ticket=True)
    p.add_argument(
        "--from",
        dest="src",
        metavar="ARCH",
        help="the ticket's architecture (default: the one the ticket names)",
    )
    p.add_argument(
        "--to",
        dest="dst",
        metavar="ARCH",
        required=True,
        help="target architecture, same family at another depth",
    )
    p.add_argument(
        "--mapping",
        default="interpolate",
        help="interpolate (default), append, drop-last, drop-interleaved, "
        "drop-first, or blocks as 'src:tgt[,tgt];...' (one per stage joined "
        "by '|' where stages differ)",
    )
    p.add_argument(
        "--random-extra",
        action="store_true",
        help="shuffle the masks of extra copies within each layer (control)",
    )
    p.add_argument("--seed", type=int, help="seed of --random-extra (default 0)")
    _output_file(p)
    _json_flag(p)

    p = _command(sub, "convert", commands._cmd_convert, reads_ticket=True)
    p.add_argument("--arch", help="architecture (default: the one the ticket names)")
    p.add_argument("--mode", choices=["auto", "channel", "group"], default="auto")
    p.add_argument(
        "--target",
        choices=["cuda", "cpu"],
        default="cuda",
        help="the device the module will run on: --mode auto prices each layer's "
        "representations for it (default: %(default)s; the saved file runs on either)",
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument(
        "--on-unstructured",
        choices=["error", "dense", "regroup"],
        default="error",
        help="layers whose mask the mode cannot run (default: error)",
    )
    p.add_argument(
        "--tune",
        action="store_true",
        help="time every representation of each layer on the target (this machine's CPU or "
        "GPU) and keep the fastest; the whole network is checked against the folded dense "
        "and the narrowed one (docs/CONVERT.md, 'Tuning')",
    )
    p.add_argument(
        "--tune-batch",
        type=int,
        default=None,
        metavar="N",
        help="with --tune: batch size to tune at (default: 64)",
    )
    p.add_argument(
        "--tune-cache",
        default=None,
        metavar="FILE",
        help="with --tune: timing cache (default: $SPARSE_OPS_CACHE_DIR/tuning.json "
        "or ~/.cache/sparse-ops/tuning.json); 'none' for no cache",
    )
    _output_file(p)
    p.add_argument("--report", action="store_true", help="print the per-layer report")
    _json_flag(p)

    # `bench` and `demo` live in bench/ (sparse_ops never imports it): they register
    # themselves through the "sparse_ops.commands" entry points declared in setup.py.
    for register in _command_plugins():
        register(sub)
    return parser
