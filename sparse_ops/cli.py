"""The ``sparse-ops`` command (also ``python -m sparse_ops``).

Every subcommand takes ``--json`` (one JSON object on stdout instead of tables). Bad
input prints one line, ``sparse-ops: error: ...``, on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from . import __version__, models
from .errors import USER_ERRORS, SparseOpsError, printable
from .progress import Progress
from .structure.methods import METHODS
from .structure.partition import MODELS as PARTITION_MODELS
from .structure.refill import ACTIVATION_CRITERIA, CRITERIA
from .tables import format_table, shape_text
from .training import TrainConfig

COMMAND_GROUP = "sparse_ops.commands"  # subcommands other packages (bench/) contribute


def _cmd_models(args: argparse.Namespace) -> int:
    """list the built-in architectures"""
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
    """per-layer density and structure of a ticket / checkpoint

    Read a checkpoint in any recognised layout (our .safetensors tickets,
    torch.nn.utils.prune state dicts, Structure-LTH checkpoints, open_lth level
    directories or checkpoint.pth, plain state dicts whose zeros are the mask) and print
    per-layer statistics."""
    from .inspection import inspect_report, render_inspect

    report = inspect_report(args.checkpoint, arch=args.arch)
    if args.json:
        _print_json(report)
        return 0
    print(render_inspect(report))
    return 0


def _int_or(*words: str) -> Callable[[str], int | str]:
    """An argparse type: an int, or one of ``words``."""
    expected = " or ".join(["an int", *(repr(w) for w in words)])

    def parse(text: str) -> int | str:
        if text in words:
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def _t2(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


# (flag, option name, type, help); None defaults mean "the method's own default".
_REFILL_ARGS = [
    ("--extra", "extra", float, "refill+: share of the pruned channels refilled (default 0.1)"),
    (
        "--criterion",
        "criterion",
        str,
        "channel ranking: l1 (default), l2, remain, "
        "feature_l1, feature_l2, saliency (the last three read activations: need --data)",
    ),
]
_CHOICES = {"criterion": CRITERIA, "model": PARTITION_MODELS}
_REGROUP_ARGS = [
    (
        "--parts",
        "parts",
        _int_or("auto", "rows"),
        "partitions per layer: an int, 'auto' "
        "(default: the count around rows/group-rows whose blocks keep the most nonzeros per "
        "unit of area) or 'rows' (round(rows/group-rows))",
    ),
    ("--group-rows", "group_rows", int, "auto / rows parts: target rows per part (default 64)"),
    ("--t1", "t1", float, "column growth threshold (default 1.5)"),
    ("--t2", "t2", _t2, "columns this full within a part always join (default: off)"),
    ("--b1", "b1", int, "rows per group (default 32)"),
    ("--min-rows", "min_rows", int, "parts with fewer rows are dropped (default 16)"),
    ("--b2", "b2", int, "blocks with fewer columns are dropped (default 1)"),
    ("--partition-model", "model", str, "graph (default) or hypergraph"),
    ("--regroup-seed", "seed", int, "partitioner seed (default 0)"),
    (
        "--col-run",
        "col_run",
        _int_or("auto"),
        "columns in runs of 8 channels of one tap (16-byte "
        "loads in the group kernel): 1 (default), 8, or auto (runs where they keep ≥ 95%% of "
        "the nonzeros single columns keep)",
    ),
]


def _add_structure_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("refill / refill+ options")
    for flag, dest, kind, text in _REFILL_ARGS:
        group.add_argument(
            flag, dest=f"opt_{dest}", type=kind, help=text, choices=_CHOICES.get(dest)
        )
    group = parser.add_argument_group("regroup options")
    for flag, dest, kind, text in _REGROUP_ARGS:
        group.add_argument(
            flag, dest=f"opt_{dest}", type=kind, help=text, choices=_CHOICES.get(dest)
        )


def _structure_options(args: argparse.Namespace, method: str) -> dict:
    """Options given on the command line for ``method``; options of another method fail."""
    own = _REFILL_ARGS if method.startswith("refill") else _REGROUP_ARGS
    other = _REGROUP_ARGS if method.startswith("refill") else _REFILL_ARGS
    stray = [flag for flag, dest, *_ in other if getattr(args, f"opt_{dest}") is not None]
    if method == "refill" and args.opt_extra is not None:
        stray.append("--extra (use --post/--method refill+)")
    if stray and method != "none":
        raise SparseOpsError(f"options not used by {method}: {', '.join(stray)}")
    if method == "none":
        given = [f for f, d, *_ in _REFILL_ARGS + _REGROUP_ARGS if getattr(args, f"opt_{d}")]
        if given:
            raise SparseOpsError(f"{', '.join(given)} need a post-processing method (--post)")
        return {}
    options = {dest: getattr(args, f"opt_{dest}") for _, dest, *_ in own}
    return {k: v for k, v in options.items() if v is not None}


def _options(args: argparse.Namespace, *names: str) -> dict:
    """``{name: args.name}`` for options handed on under their command-line names."""
    return {name: getattr(args, name) for name in names}


def _cmd_prune(args: argparse.Namespace) -> int:
    """iterative magnitude pruning, optionally with refill / regroup every round

    Train a built-in architecture, then prune RATE of the remaining weights per round
    (stem conv and Linear layers excluded), post-process, rewind and retrain. Writes one
    ticket per round (round0.safetensors is the dense network) and summary.json to
    --out. Data-parallel: torchrun --nproc-per-node N -m sparse_ops prune ...
    (--batch-size is per process)."""
    from .jobs import prune_job, render_prune

    train = _options(args, "epochs", "batch_size", "lr", "weight_decay", "rewind_epoch", "seed")
    summary = prune_job(
        args.arch,
        args.out,
        post_options=_structure_options(args, args.post),
        train=TrainConfig(**train),
        progress=Progress(),
        **_options(
            args,
            "data",
            "data_dir",
            "image_size",
            "rounds",
            "rate",
            "scope",
            "post",
            "device",
            "workers",
        ),
    )
    from .distributed import is_main

    if not is_main():  # under torchrun: rank 0 reports for the job
        return 0
    if args.json:
        _print_json(summary)
    else:
        print(render_prune(summary))
    return 0


def _cmd_restructure(args: argparse.Namespace) -> int:
    """apply refill, refill+ or regroup to an existing ticket

    Read a ticket in any recognised format, apply one structuring step and write the
    result in our format."""
    from .jobs import restructure_job
    from .structure import LayerChange, render_changes

    batch = None
    if args.data is None and args.opt_criterion in ACTIVATION_CRITERIA:
        raise SparseOpsError(
            f"--criterion {args.opt_criterion} ranks channels by activations: pass --data "
            "(digits, cifar10, cifar100 or synthetic) for the batch to measure them on"
        )
    if args.data is not None:
        from .data import load

        dataset = load(args.data, args.data_dir, image_size=args.image_size)
        batch = (dataset.train.images[: args.batch_size], dataset.train.labels[: args.batch_size])
    _, summary = restructure_job(
        args.ticket,
        args.output,
        args.method,
        arch=args.arch,
        options=_structure_options(args, args.method),
        batch=batch,
    )
    if args.json:
        _print_json(summary)
        return 0
    changes = [
        LayerChange(**{k: v for k, v in layer.items() if not k.startswith("density")})
        for layer in summary["layers"]
    ]
    extra = ("channels_kept",) if args.method.startswith("refill") else ("parts", "groups")
    print(render_changes(changes, extra=extra))
    print(
        f"\n{summary['method']}: density {summary['density_before']:.4f} → "
        f"{summary['density_after']:.4f}; written to {summary['output']}"
    )
    return 0


def _cmd_transform(args: argparse.Namespace) -> int:
    """stretch or squeeze a ticket to another depth of its family (E-LTH)

    Elastic Lottery Ticket transform: copy a ticket's masks and weights (trained and
    rewind, BN statistics included) block by block into a deeper or shallower network
    of the same family. Stem, classifier and each stage's first block are copied
    unchanged. Writes our ticket format."""
    from .structure.elastic import transform
    from .tickets.loading import load_ticket

    if args.seed is not None and not args.random_extra:
        raise SparseOpsError("--seed only applies with --random-extra")
    ticket = load_ticket(args.ticket, arch=args.src)
    if args.src is None and ticket.arch is None:
        raise SparseOpsError(f"{args.ticket}: the ticket names no architecture; pass --from")
    result, report = transform(
        ticket,
        args.src,
        args.dst,
        args.mapping,
        random_extra=args.random_extra,
        seed=args.seed or 0,
        return_report=True,
    )
    path = result.save(args.output)
    if args.json:
        _print_json({"input": str(args.ticket), "output": str(path), **report.to_dict()})
        return 0
    print(report.render())
    print(f"\nwritten to {path}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    """convert a ticket into a fast inference module (saved, no pickle)

    Load a ticket (any recognised format), build its architecture, fold BatchNorm, fuse
    ReLU/residual adds, run each conv as a channel-pruned, group-sparse or dense unit,
    check the result against the masked dense network on a random batch, and save it
    (load it back with sparse_ops.load_converted)."""
    from .jobs import convert_job

    if not args.tune and (args.tune_batch is not None or args.tune_cache is not None):
        raise SparseOpsError("--tune-batch and --tune-cache only apply with --tune")
    cache = args.tune_cache or "default"
    summary, report = convert_job(
        args.ticket,
        args.output,
        arch=args.arch,
        mode=args.mode,
        dtype=args.dtype,
        on_unstructured=args.on_unstructured,
        target=args.target,
        tune_batch=(64 if args.tune_batch is None else args.tune_batch) if args.tune else None,
        tune_cache=None if cache.lower() == "none" else cache,
        progress=not args.json,
    )
    if args.json:
        _print_json(summary)
        return 0
    if args.report or args.tune:
        print(report.render())
        print()
    ratio = summary["report"]["flops_ratio"]
    print(
        f"converted {summary['arch']} ({summary['mode']} mode, for {summary['target']}): "
        f"{100 * ratio:.1f}% of dense "
        f"FLOPs; max |converted − masked dense| = {summary['max_abs_diff']:.3g} on a random "
        f"batch; written to {summary['output']}"
    )
    return 0


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _command_plugins() -> list:
    plugins = []
    for ep in sorted(entry_points(group=COMMAND_GROUP), key=lambda e: e.name):
        try:
            plugins.append(ep.load())
        except ImportError as exc:
            raise SystemExit(
                f"sparse-ops: error: the {ep.name!r} command ({ep.value}) cannot be loaded: "
                f"{exc}; {_import_advice(ep.value.partition(':')[0].partition('.')[0])}"
            ) from None
    return plugins


def _import_advice(package: str) -> str:
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

    p = _command(sub, "models", _cmd_models)
    _json_flag(p)

    p = _command(sub, "inspect", _cmd_inspect)
    p.add_argument("checkpoint", help="file or open_lth level directory")
    p.add_argument("--arch", help="check the ticket against this architecture")
    _json_flag(p)

    p = _command(sub, "prune", _cmd_prune)
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
    _add_structure_args(p)

    p = _command(sub, "restructure", _cmd_restructure, reads_ticket=True)
    p.add_argument("--arch", help="architecture to check the ticket against")
    p.add_argument("--method", required=True, choices=list(METHODS))
    _output_file(p)
    p.add_argument("--data", help="batch source for feature_* / saliency criteria")
    p.add_argument("--data-dir", help="directory of the CIFAR binary release")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    _json_flag(p)
    _add_structure_args(p)

    p = _command(sub, "transform", _cmd_transform, reads_ticket=True)
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

    p = _command(sub, "convert", _cmd_convert, reads_ticket=True)
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


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors: the source line means nothing to a CLI user."""
    print(f"sparse-ops: warning: {printable(message)}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores the global hook on the way out
            warnings.showwarning = _show_warning
            return args.handler(args)
    except USER_ERRORS as exc:
        print(f"sparse-ops: error: {printable(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co: not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter exit quiet
        return 0
    except OSError as exc:  # an output path we cannot write, a full disk, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"sparse-ops: error: {printable(f'{where}{exc.strerror or exc}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sparse-ops: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
