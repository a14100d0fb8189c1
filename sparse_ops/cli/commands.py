"""What each subcommand does, given its parsed arguments (the parser is in :mod:`.arguments`).

Each handler's docstring is its help: the first line the one-line summary, the rest
the description.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import models
from ..errors import SparseOpsError
from ..progress import Progress
from ..structure.refill import ACTIVATION_CRITERIA
from ..tables import format_table, shape_text
from ..training import TrainConfig
from .structure_args import structure_options


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
    from ..inspection import inspect_report, render_inspect

    report = inspect_report(args.checkpoint, arch=args.arch)
    if args.json:
        _print_json(report)
        return 0
    print(render_inspect(report))
    return 0


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
    from ..jobs import prune_job, render_prune

    train = _options(args, "epochs", "batch_size", "lr", "weight_decay", "rewind_epoch", "seed")
    summary = prune_job(
        args.arch,
        args.out,
        post_options=structure_options(args, args.post),
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
    from ..distributed import is_main

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
    from ..jobs import restructure_job
    from ..structure import LayerChange, render_changes

    batch = None
    if args.data is None and args.opt_criterion in ACTIVATION_CRITERIA:
        raise SparseOpsError(
            f"--criterion {args.opt_criterion} ranks channels by activations: pass --data "
            "(digits, cifar10, cifar100 or synthetic) for the batch to measure them on"
        )
    if args.data is not None:
        from ..data import load

        dataset = load(args.data, args.data_dir, image_size=args.image_size)
        batch = (dataset.train.images[: args.batch_size], dataset.train.labels[: args.batch_size])
    _, summary = restructure_job(
        args.ticket,
        args.output,
        args.method,
        arch=args.arch,
        options=structure_options(args, args.method),
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
    from ..structure.elastic import transform
    from ..tickets.loading import load_ticket

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
    from ..jobs import convert_job

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
