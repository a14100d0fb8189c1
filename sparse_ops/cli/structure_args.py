"""The structuring options ``prune --post`` and ``restructure`` share (refill and regroup
parameters), and how they become keyword arguments of the chosen method."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import SparseOpsError
from ..structure.partition import MODELS as PARTITION_MODELS
from ..structure.refill import CRITERIA


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


def add_structure_args(parser: argparse.ArgumentParser) -> None:
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


def structure_options(args: argparse.Namespace, method: str) -> dict:
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
