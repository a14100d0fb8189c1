"""Autotune configs: their names (ids), the data each kernel keeps them as, the spill
tables that withhold some per Triton version, and the tuning mode.

An id reads ``BMxBNxBK w<warps> s<stages>`` (`` flat`` for the channel kernel's single
K loop; ``pack`` for BLOCK_N when the pack's ``block_n`` sets it). Kernels keep their
config sets, spill tables and quick lists as ids, the same names the static report and
the benchmark results print.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from .errors import KernelInputError


@dataclass(frozen=True)
class ConfigTable:
    """One kernel's autotune data: config ids per launch class, the quick lists, and the
    configs withheld per Triton (major, minor) for spilling, by class or class/dtype."""

    config_ids: dict[str, list[str]]
    quick: dict[str, list[str]]
    spills: dict[tuple[int, int], dict[str, set[str]]]


def load_table(kernel_file: str) -> ConfigTable:
    """The table kept as JSON next to a kernel module (``group_conv.py`` →
    ``group_conv.json``): data the static report regenerates (``--spill-table``), so it
    lives apart from the code that reads it."""
    with open(os.path.splitext(kernel_file)[0] + ".json", encoding="utf-8") as f:
        data = json.load(f)
    spills = {
        tuple(int(p) for p in version.split(".")): {key: set(ids) for key, ids in entry.items()}
        for version, entry in data["spills"].items()
    }
    return ConfigTable(data["config_sets"], data["quick"], spills)


def config_id(config) -> str:
    """A config's name in tables and reports: ``BMxBNxBK w<warps> s<stages>``, ``flat``
    appended for a flattened K loop (BLOCK_N comes from the pack for group configs)."""
    kw = config.kwargs
    name = (
        f"{kw['BLOCK_M']}x{kw.get('BLOCK_N', 'pack')}x{kw['BLOCK_K']} "
        f"w{config.num_warps} s{config.num_stages}"
    )
    return name + (" flat" if kw.get("FLAT") else "")


_CONFIG_ID = re.compile(r"(\d+)x(\d+|pack)x(\d+) w(\d+) s(\d+)( flat)?")


def config_from_id(name: str) -> triton.Config:
    """The inverse of :func:`config_id`. Each kernel keeps its configs as these ids, the
    names its spill tables, quick lists and the static report use too. ``pack`` for
    BLOCK_N: a group kernel's row tile is the pack's ``block_n``, not a config's."""
    parsed = _CONFIG_ID.fullmatch(name)
    if parsed is None:
        raise ValueError(f"config id {name!r} is not 'BMxBNxBK w<warps> s<stages>[ flat]'")
    bm, bn, bk, warps, stages, flat = parsed.groups()
    kwargs = {"BLOCK_M": int(bm), "BLOCK_K": int(bk)}
    if bn != "pack":  # the channel kernel: its own BLOCK_N and the FLAT loop flag
        kwargs = {"BLOCK_M": int(bm), "BLOCK_N": int(bn), "BLOCK_K": int(bk), "FLAT": bool(flat)}
    return triton.Config(kwargs, num_warps=int(warps), num_stages=int(stages))


def autotuned(kernel, config_sets: dict[str, list], key: list[str], candidates: Callable):
    """``kernel`` behind ``triton.autotune`` over every config of ``config_sets``, each
    launch pruned to ``candidates(operand dtype, constexprs)`` (its class's set minus the
    spilling configs); returns ``(tuned kernel, every config)``."""
    every = list({config_id(c): c for s in config_sets.values() for c in s}.values())

    def prune(configs, named_args, **constexprs):
        return candidates(named_args["x_ptr"].dtype, constexprs)

    tuned = triton.autotune(configs=every, key=key, prune_configs_by={"early_config_prune": prune})
    return tuned(kernel), every


def triton_version(version: str | None = None) -> tuple[int, int] | None:
    """(major, minor) of ``version`` (default: the installed Triton's); None if it does not
    parse. Accepts "3.6.0", "3.6.0+git…", "3.6rc1"."""
    if version is None:
        version = triton.__version__
    parsed = re.match(r"(\d+)\.(\d+)", version)
    return (int(parsed[1]), int(parsed[2])) if parsed else None


def known_spills(table: dict, kind: str, dtype: torch.dtype, version: str | None = None):
    """Config ids that spill for launch class ``kind`` with ``dtype`` operands on Triton
    ``version`` (default: the installed one; every version's, if it was never measured).
    ``table`` maps (major, minor) to {"class" or "class/dtype": config ids}."""
    keys = (kind, f"{kind}/{str(dtype).removeprefix('torch.')}")
    minor = triton_version(version)
    entries = [table[minor]] if minor in table else list(table.values())
    return {c for entry in entries for key in keys for c in entry.get(key, ())}


TUNING_MODES = ("full", "quick")


def tuning_mode() -> str:
    """``SPARSE_OPS_TUNING``: ``full`` (default) autotunes over every config of a launch's
    class; ``quick`` over the few the static report ranks best (``QUICK`` in each kernel
    module), for GPU sessions measured in minutes (``bench/scripts/gpu_run.sh --quick``)."""
    mode = os.environ.get("SPARSE_OPS_TUNING", "full")
    if mode not in TUNING_MODES:
        raise KernelInputError(f"SPARSE_OPS_TUNING={mode!r}: expected one of {TUNING_MODES}")
    return mode


def select_configs(configs: list, withheld: set[str], quick: list[str]) -> list:
    """``configs`` minus the ``withheld`` ids; in quick mode only the ``quick`` ids (or
    the first config left, if none of them is)."""
    kept = [c for c in configs if config_id(c) not in withheld]
    if not kept:
        # Only on a Triton never measured, where every version's exclusions apply at
        # once: a spilling config is slower, not wrong, and the autotuner needs one.
        kept = configs[:1]
    if tuning_mode() == "quick":
        kept = [c for c in kept if config_id(c) in quick] or kept[:1]
    return kept
