"""Elastic lottery tickets (E-LTH): stretch or squeeze a ticket to another depth.

The Elastic Lottery Ticket Hypothesis (Chen et al., NeurIPS 2021) turns the ticket of
one network into a ticket of a deeper (*stretch*) or shallower (*squeeze*) network of
the same family, without running IMP again:

* Both networks have the same *stages*: a stem, stages of blocks (residual blocks;
  for VGG the convs between two poolings), a classifier. Only the number of blocks
  per stage differs.
* The stem, the classifier and the first block of every stage (the block that
  changes resolution or width) are copied unchanged.
* Inside each stage a *mapping* ``source block → target blocks`` says where every
  source block's masks **and** weights go: trained and rewind weights, BN affine
  parameters, running statistics and ``num_batches_tracked``. Replicas are exact
  clones. Source blocks mapped nowhere are dropped. Sparsity is not renormalised:
  every layer keeps its mask, so its density.

A mapping is a named strategy (:data:`STRATEGIES`, built for any pair of stage depths
by :func:`named_mapping`) or a string in open_lth/E-LTH's syntax ``src:tgt[,tgt];…``
(:func:`parse_mapping`), e.g. ResNet-32 → 56 ``0:0;1:1,2;2:3,4;3:5,6;4:7,8``. One
mapping applies to every stage alike; stages that need different ones take one each,
joined by ``|``. With ``random_extra=True`` (the paper's control) each *extra* copy,
that is every target after the first one listed for a source block, gets its masks
shuffled within the layer: same number of kept weights, other positions; its weights
stay copied.

The stage/block structure is read from the instantiated model (:func:`arch_layout`),
not from hand-written tables. A block is a child of an ``nn.Sequential`` *trunk* that
contains convs. A new stage starts at each trunk, after a pooling layer, and at a
block that changes resolution or width. Depth is the only thing that may change:
another family, block type (basic vs bottleneck) or width is an :class:`ElasticError`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .. import models
from ..errors import BlockMappingError, ElasticError, TicketMismatchError
from ..tables import format_table, shape_text
from ..tickets import Ticket
from .report import DensityChange

__all__ = [
    "STRATEGIES",
    "ArchLayout",
    "BlockMappingError",
    "ElasticError",
    "ElasticReport",
    "LayerCopy",
    "StageChange",
    "StageMapping",
    "arch_layout",
    "check_compatible",
    "named_mapping",
    "parse_mapping",
    "parse_stage_mapping",
    "resolve_mapping",
    "transform",
]

STRETCH = ("interpolate", "append")
SQUEEZE = ("drop-last", "drop-interleaved", "drop-first")
STRATEGIES = STRETCH + SQUEEZE
_EXAMPLE = "'0:0;1:1,2;2:3,4' (source:target[,target] per block, ';' between blocks)"


# ---------------------------------------------------------------------- mappings


@dataclass(frozen=True)
class StageMapping:
    """Where the blocks of one stage go: ``source block → target blocks``, local indices.

    The first target listed for a source block is its *primary* copy; the others are
    *extra* copies (what ``random_extra`` shuffles). ``str()`` gives the open_lth
    syntax back.
    """

    pairs: tuple[tuple[int, tuple[int, ...]], ...]

    def __post_init__(self) -> None:
        seen = set()
        for src, targets in self.pairs:
            for index in (src, *targets):
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise BlockMappingError(
                        f"block indices must be ints ≥ 0, got {index!r} in {src!r}: {targets!r}"
                    )
            if not targets:
                raise BlockMappingError(f"source block {src} maps to no target block")
            if len(set(targets)) != len(targets):
                raise BlockMappingError(f"source block {src} lists a target twice: {targets}")
            if src in seen:
                raise BlockMappingError(f"source block {src} is listed twice")
            seen.add(src)

    @classmethod
    def from_dict(cls, mapping: Mapping[int, int | Sequence[int]]) -> StageMapping:
        """From ``{source: [targets]}`` (a single target may be a bare int)."""
        return cls(tuple(
            (src, (targets,) if isinstance(targets, int) else tuple(targets))
            for src, targets in mapping.items()
        ))  # fmt: skip

    def as_dict(self) -> dict[int, list[int]]:
        return {src: list(targets) for src, targets in self.pairs}

    def __str__(self) -> str:
        return ";".join(f"{src}:{','.join(map(str, targets))}" for src, targets in self.pairs)

    def source_of(self) -> dict[int, int]:
        """``{target block: source block}`` (the last one wins where several cover it)."""
        return {t: src for src, targets in self.pairs for t in targets}

    def extras(self) -> set[int]:
        """Target blocks that are extra (not primary) copies of their source block."""
        return {t for _, targets in self.pairs for t in targets[1:]}

    def inverse(self) -> StageMapping:
        """Map each source's primary copy back to it: the squeeze that undoes a stretch.

        The inverse of interpolation ``0:0;1:1,2;2:3,4`` is ``0:0;1:1;3:2``.
        """
        back = sorted((targets[0], src) for src, targets in self.pairs)
        return StageMapping(tuple((t, (src,)) for t, src in back))

    def problems(self, n_src: int, n_dst: int) -> list[str]:
        """Everything that keeps this mapping from turning ``n_src`` blocks into ``n_dst``."""
        return self._out_of_range(n_src, n_dst) + self._first_block() + self._coverage(n_dst)

    def _out_of_range(self, n_src: int, n_dst: int) -> list[str]:
        out = []
        bad = [src for src, _ in self.pairs if src >= n_src]
        if bad:
            out.append(
                f"{_blocks('source', bad)} out of range (the source stage has {n_src} "
                f"blocks, 0–{n_src - 1})"
            )
        bad = sorted({t for _, targets in self.pairs for t in targets if t >= n_dst})
        if bad:
            out.append(
                f"{_blocks('target', bad)} out of range (the target stage has {n_dst} "
                f"blocks, 0–{n_dst - 1})"
            )
        return out

    def _first_block(self) -> list[str]:
        # The first block changes resolution/width: no other block has its shapes.
        out = []
        first = dict(self.pairs).get(0)
        if first is None:
            out.append("block 0 (the stage's first block) must map to block 0 ('0:0')")
        elif first != (0,):
            out.append(
                "block 0 (the stage's first block) may map only to block 0, not to "
                f"{_blocks('', first)}"
            )
        into_first = [src for src, targets in self.pairs if src != 0 and 0 in targets]
        if into_first:
            out.append(f"only block 0 may map to target block 0, not {_blocks('', into_first)}")
        return out

    def _coverage(self, n_dst: int) -> list[str]:
        covering: dict[int, list[int]] = {}
        for src, targets in self.pairs:
            for t in targets:
                covering.setdefault(t, []).append(src)
        out = [
            f"target block {t} is covered by several source blocks ({_ints(srcs)})"
            for t, srcs in sorted(covering.items())
            if len(srcs) > 1
        ]
        # An uncovered target 0 is already reported by _first_block.
        missing = [t for t in range(1, n_dst) if t not in covering]
        if missing:
            out.append(f"{_blocks('target', missing)} not covered by any source block")
        return out


def _ints(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _blocks(kind: str, values: Sequence[int]) -> str:
    """``"target block 3"`` / ``"target blocks 3, 4, 5"`` (``kind`` may be empty)."""
    noun = "block" if len(values) == 1 else "blocks"
    return f"{kind} {noun} {_ints(values)}".strip()


def parse_stage_mapping(text: str) -> StageMapping:
    """Parse one stage's mapping, ``src:tgt[,tgt];…`` (spaces allowed)."""
    if not isinstance(text, str):
        raise BlockMappingError(f"a block mapping string is needed, got {type(text).__name__}")
    pairs: dict[int, list[int]] = {}
    for entry in text.split(";"):
        src_text, colon, targets_text = entry.partition(":")
        try:
            if not colon:
                raise ValueError
            src = int(src_text)
            targets = [int(t) for t in targets_text.split(",")]
        except ValueError:
            raise BlockMappingError(
                f"cannot parse block mapping {text!r}: entry {entry.strip()!r} is not "
                f"'src:tgt[,tgt]'; expected e.g. {_EXAMPLE}, or a named strategy "
                f"({', '.join(STRATEGIES)})"
            ) from None
        if src in pairs:
            raise BlockMappingError(f"block mapping {text!r} lists source block {src} twice")
        pairs[src] = targets
    return StageMapping.from_dict(pairs)


def parse_mapping(text: str) -> list[StageMapping]:
    """Parse ``stage0|stage1|…`` (or one mapping without ``|``) into per-stage mappings."""
    if not isinstance(text, str):
        raise BlockMappingError(f"a block mapping string is needed, got {type(text).__name__}")
    parts = text.split("|")
    if len(parts) == 1:
        return [parse_stage_mapping(text)]
    out = []
    for stage, part in enumerate(parts):
        try:
            out.append(parse_stage_mapping(part))
        except BlockMappingError as exc:
            raise BlockMappingError(f"stage {stage}: {exc}") from None
    return out


def named_mapping(strategy: str, n_src: int, n_dst: int) -> StageMapping:
    """The mapping strategy ``strategy`` gives for a stage of ``n_src`` → ``n_dst`` blocks.

    Block 0 always maps to block 0. Of the other blocks (``m = n_src − 1`` source,
    ``M = n_dst − 1`` target):

    ``interpolate`` (stretch)
        nearest-neighbour interpolation along the stage: target ``t`` copies source
        ``1 + ⌊(t−1)m/M⌋``. Every source block is replicated in place, ``⌊M/m⌋`` or
        ``⌈M/m⌉`` times, the larger counts spread evenly over the stage. 5 → 9 blocks:
        ``0:0;1:1,2;2:3,4;3:5,6;4:7,8``; 5 → 7: ``0:0;1:1,2;2:3;3:4,5;4:6``.
    ``append`` (stretch)
        the source blocks keep their places and are repeated, in order, after the
        last one. 5 → 9: ``0:0;1:1,5;2:2,6;3:3,7;4:4,8``.
    ``drop-last`` (squeeze)
        keep blocks ``0 … n_dst−1``. 9 → 5: ``0:0;1:1;2:2;3:3;4:4``.
    ``drop-interleaved`` (squeeze)
        keep ``M`` evenly spaced blocks starting at block 1 (block ``1 + ⌊(j−1)m/M⌋`` for
        target ``j``). 9 → 5: ``0:0;1:1;3:2;5:3;7:4``.
    ``drop-first`` (squeeze)
        keep block 0 and the last ``M`` blocks. 9 → 5: ``0:0;5:1;6:2;7:3;8:4``.

    Every strategy gives the identity when ``n_src == n_dst``.
    """
    if strategy not in STRATEGIES:
        raise BlockMappingError(
            f"unknown mapping strategy {strategy!r}; choose from {', '.join(STRATEGIES)} "
            f"or give a mapping like {_EXAMPLE}"
        )
    if n_src < 1 or n_dst < 1:
        raise BlockMappingError(f"stages need at least one block, got {n_src} → {n_dst}")
    m, big_m = n_src - 1, n_dst - 1
    if strategy in STRETCH and big_m < m:
        raise BlockMappingError(
            f"{strategy} stretches but this stage shrinks ({n_src} → {n_dst} blocks); "
            f"squeeze with {', '.join(SQUEEZE)}"
        )
    if strategy in SQUEEZE and big_m > m:
        raise BlockMappingError(
            f"{strategy} squeezes but this stage grows ({n_src} → {n_dst} blocks); "
            f"stretch with {', '.join(STRETCH)}"
        )
    if m == 0 and big_m > 0:
        raise BlockMappingError(
            f"the source stage has only its first block, which maps to block 0 only, so "
            f"nothing can fill {_blocks('target', range(1, n_dst))}"
        )
    build = {
        "interpolate": _interpolate,
        "append": _append,
        "drop-last": lambda m, big_m: {i: [i] for i in range(1, big_m + 1)},
        "drop-interleaved": lambda m, big_m: {1 + (j - 1) * m // big_m: [j]
                                              for j in range(1, big_m + 1)},
        "drop-first": lambda m, big_m: {m - big_m + j: [j] for j in range(1, big_m + 1)},
    }[strategy]  # fmt: skip
    return StageMapping.from_dict({0: [0], **build(m, big_m)})


def _interpolate(m: int, big_m: int) -> dict[int, list[int]]:
    # The rule drop-interleaved uses to pick sources, read in the stretch direction; with
    # M ≥ m every source block gets at least one target, and the targets stay in order.
    out: dict[int, list[int]] = {i: [] for i in range(1, m + 1)}
    for t in range(1, big_m + 1):
        out[1 + (t - 1) * m // big_m].append(t)
    return out


def _append(m: int, big_m: int) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(1, m + 1)}
    for t in range(1, big_m + 1):
        out[1 + (t - 1) % m].append(t)
    return out


StageSpec = str | StageMapping | Mapping[int, Sequence[int]]
MappingSpec = StageSpec | Sequence[StageSpec]


def resolve_mapping(
    spec: MappingSpec, src_counts: Sequence[int], dst_counts: Sequence[int]
) -> list[StageMapping]:
    """One checked :class:`StageMapping` per stage from ``spec``.

    ``spec`` is a strategy name, a mapping string (``|`` between stages), a
    :class:`StageMapping` / ``{source: [targets]}`` dict, or a list of those, one per
    stage (a list item may be a strategy name too). A single mapping applies to every
    stage. Every problem of every stage is reported in one :class:`BlockMappingError`.
    """
    n = len(src_counts)
    if len(dst_counts) != n:
        raise ElasticError(f"the networks have {n} and {len(dst_counts)} stages")
    parts = _split_spec(spec)
    if len(parts) == 1:
        parts = parts * n
    elif len(parts) != n:
        raise BlockMappingError(
            f"{len(parts)} per-stage mappings for {n} stages; give one per stage joined by "
            "'|', or a single mapping for all stages"
        )
    problems, stages = [], []
    for s, (part, n_src, n_dst) in enumerate(zip(parts, src_counts, dst_counts, strict=True)):
        try:
            stage = named_mapping(part, n_src, n_dst) if isinstance(part, str) else part
        except BlockMappingError as exc:
            problems.append(f"stage {s}: {exc}")
            continue
        problems += [f"stage {s}: {p}" for p in stage.problems(n_src, n_dst)]
        stages.append(stage)
    if problems:
        hint = ""
        single = len(set(parts)) == 1 and not isinstance(parts[0], str)
        if single and len(set(zip(src_counts, dst_counts, strict=True))) > 1:
            hint = (
                f" (the stages differ in depth, {_ints(src_counts)} → {_ints(dst_counts)} "
                "blocks: give one mapping per stage, joined by '|')"
            )
        raise BlockMappingError("; ".join(problems) + hint)
    return stages


def _split_spec(spec: MappingSpec) -> list[str | StageMapping]:
    """Per-stage parts; strategy names stay strings, everything else is parsed."""
    if isinstance(spec, str):
        parts: list = spec.split("|")
    elif isinstance(spec, StageMapping | Mapping):
        parts = [spec]
    elif isinstance(spec, Sequence) and spec:
        parts = list(spec)
    else:
        raise BlockMappingError(
            f"mapping must be a strategy name, a mapping string or per-stage mappings, got {spec!r}"
        )
    if len(parts) == 1:
        return [_stage_spec(parts[0])]
    out = []
    for stage, part in enumerate(parts):
        try:
            out.append(_stage_spec(part))
        except BlockMappingError as exc:
            raise BlockMappingError(f"stage {stage}: {exc}") from None
    return out


def _stage_spec(part: StageSpec) -> str | StageMapping:
    if isinstance(part, StageMapping):
        return part
    if isinstance(part, Mapping):
        return StageMapping.from_dict(part)
    if isinstance(part, str):
        return part.strip() if part.strip() in STRATEGIES else parse_stage_mapping(part)
    raise BlockMappingError(f"cannot use {part!r} as a stage mapping")


# ---------------------------------------------------------------------- structure


@dataclass(frozen=True)
class ArchLayout:
    """The stem/stages/classifier structure of one architecture, read from its model.

    ``stages[s][b]`` is the module name of block ``b`` of stage ``s``. Every state key
    is either in ``blocks`` (``key → (stage, block, key inside the block)``) or in
    ``fixed`` (``key → key without root``); ``root`` is a prefix all keys share
    (``"model."`` for open_lth's ImageNet ResNets), so a transform may cross it.
    """

    arch: str
    family: str
    root: str
    stages: tuple[tuple[str, ...], ...]
    block_types: tuple[tuple[str, ...], ...]
    shapes: Mapping[str, tuple[int, ...]]
    blocks: Mapping[str, tuple[int, int, str]]
    fixed: Mapping[str, str]

    @property
    def counts(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(len(stage) for stage in self.stages)

    def block_shapes(self, stage: int, block: int) -> dict[str, tuple[int, ...]]:
        """``{key inside the block: shape}`` of one block."""
        return {
            inner: self.shapes[key]
            for key, (s, b, inner) in self.blocks.items()
            if (s, b) == (stage, block)
        }

    def stage_of(self, key: str) -> int | None:
        place = self.blocks.get(key)
        return None if place is None else place[0]


@functools.lru_cache(maxsize=64)
def arch_layout(arch: str, num_classes: int = 10) -> ArchLayout:
    """The stage/block structure of a built-in architecture (from a meta-device model)."""
    info = models.info(arch)
    model = models.shape_model(info.name, num_classes)
    stages = _find_stages(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    owner = {name: (s, b) for s, stage in enumerate(stages) for b, (name, _) in enumerate(stage)}
    root = _common_root(list(shapes))
    blocks, fixed = {}, {}
    for key in shapes:
        parts = key.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        block = next((p for p in prefixes if p in owner), None)
        if block is None:
            fixed[key] = key[len(root) :]
        else:
            blocks[key] = (*owner[block], key[len(block) + 1 :])
    return ArchLayout(
        arch=info.name,
        family=info.family,
        root=root,
        stages=tuple(tuple(name for name, _ in stage) for stage in stages),
        block_types=tuple(tuple(kind for _, kind in stage) for stage in stages),
        shapes=MappingProxyType(shapes),
        blocks=MappingProxyType(blocks),
        fixed=MappingProxyType(fixed),
    )


def _find_stages(model: nn.Module) -> list[list[tuple[str, str]]]:
    """``[[(block module name, block class name), ...] per stage]`` in forward order."""
    stages: list[list[tuple[str, str]]] = []
    trunks: list[str] = []
    for name, module in model.named_modules():
        if not _is_trunk(module) or any(name.startswith(f"{t}.") for t in trunks):
            continue
        trunks.append(name)
        current: list[tuple[str, str]] | None = None
        for child_name, child in module.named_children():
            if not _is_block(child):
                current = None  # a pooling layer ends the stage (VGG)
                continue
            if current is None or _changes_shape(child):
                current = []
                stages.append(current)
            current.append((f"{name}.{child_name}" if name else child_name, type(child).__name__))
    return stages


def _is_block(module: nn.Module) -> bool:
    """A composite module that holds convs (a residual block, VGG's conv + BN)."""
    return not isinstance(module, nn.Conv2d) and any(
        isinstance(m, nn.Conv2d) for m in module.modules()
    )


def _is_trunk(module: nn.Module) -> bool:
    """An ``nn.Sequential`` of blocks and parameter-free layers (pools), holding a block."""
    if not isinstance(module, nn.Sequential):
        return False
    children = list(module.children())
    return any(_is_block(c) for c in children) and all(
        _is_block(c) or not any(True for _ in c.parameters()) for c in children
    )


def _changes_shape(block: nn.Module) -> bool:
    """Whether a block changes resolution or width, and so starts a stage."""
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    strided = any(s != 1 for c in convs for s in c.stride)
    return strided or convs[0].in_channels != convs[-1].out_channels


def _common_root(keys: list[str]) -> str:
    """The module path every key starts with (``"model."`` or ``""``)."""
    split = [k.split(".")[:-1] for k in keys]
    root: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        root.append(parts[0])
    return "".join(f"{p}." for p in root)


def check_compatible(src: ArchLayout, dst: ArchLayout) -> None:
    """Raise :class:`ElasticError` unless ``dst`` is ``src`` at another depth."""
    where = f"cannot transform {src.arch} into {dst.arch}"
    if src.family != dst.family:
        raise ElasticError(
            f"{where}: different families ({src.arch}: {src.family}, {dst.arch}: "
            f"{dst.family}); elastic transforms change the depth within one family, never "
            "the block type, shortcut kind or width"
        )
    for layout in (src, dst):
        if not layout.stages:
            raise ElasticError(f"{where}: {layout.arch} has no stages of blocks to transform")
    if len(src.stages) != len(dst.stages):
        raise ElasticError(
            f"{where}: {len(src.stages)} vs {len(dst.stages)} stages (only depth may change)"
        )
    for s, (a, b) in enumerate(zip(src.block_types, dst.block_types, strict=True)):
        if set(a) != set(b):
            raise ElasticError(
                f"{where}: stage {s} is built from {'/'.join(sorted(set(a)))} blocks in "
                f"{src.arch} but {'/'.join(sorted(set(b)))} in {dst.arch}; basic-block and "
                "bottleneck networks are different families"
            )
    src_fixed = {rel: src.shapes[k] for k, rel in src.fixed.items()}
    dst_fixed = {rel: dst.shapes[k] for k, rel in dst.fixed.items()}
    _compare(where, "stem/classifier", src_fixed, dst_fixed, src.root, dst.root)
    for s, (n_src, n_dst) in enumerate(zip(src.counts, dst.counts, strict=True)):
        _compare(where, f"stage {s} block 0", src.block_shapes(s, 0), dst.block_shapes(s, 0),
                 f"{src.stages[s][0]}.", f"{dst.stages[s][0]}.")  # fmt: skip
        if n_dst < 2:
            continue
        # Any source block may land on any later target block: all must look alike.
        template = dst.block_shapes(s, 1)
        for b in range(1, n_src):
            _compare(where, f"stage {s} block {b}", src.block_shapes(s, b), template,
                     f"{src.stages[s][b]}.", f"{dst.stages[s][1]}.")  # fmt: skip
        for b in range(2, n_dst):
            _compare(where, f"stage {s} block {b}", template, dst.block_shapes(s, b),
                     f"{dst.stages[s][1]}.", f"{dst.stages[s][b]}.")  # fmt: skip


def _compare(
    where: str,
    part: str,
    a: dict[str, tuple[int, ...]],
    b: dict[str, tuple[int, ...]],
    prefix_a: str,
    prefix_b: str,
) -> None:
    if set(a) != set(b):
        only_a = sorted(prefix_a + k for k in set(a) - set(b))
        only_b = sorted(prefix_b + k for k in set(b) - set(a))
        raise ElasticError(
            f"{where}: the {part} differs in structure (keys only in the source: "
            f"{', '.join(only_a) or '(none)'}; only in the target: {', '.join(only_b) or '(none)'})"
        )
    for key in a:
        if a[key] != b[key]:
            raise ElasticError(
                f"{where}: the width differs ({part}: {prefix_a}{key} is {a[key]} in the "
                f"source, {prefix_b}{key} is {b[key]} in the target); elastic transforms "
                "change depth only"
            )


# ---------------------------------------------------------------------- report


@dataclass(frozen=True)
class LayerCopy(DensityChange):
    """Where one masked layer of the target ticket came from."""

    name: str
    source: str
    shape: tuple[int, ...]
    stage: int | None  # None: stem / classifier
    block: int | None
    source_block: int | None
    role: str  # "fixed", "first block", "copy", "extra copy", "extra copy, shuffled"
    nnz_before: int  # in the source layer
    nnz_after: int
    numel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "shape": list(self.shape),
            "stage": self.stage,
            "block": self.block,
            "source_block": self.source_block,
            "role": self.role,
            "nnz_before": self.nnz_before,
            "nnz_after": self.nnz_after,
            "numel": self.numel,
            "density_before": self.density_before,
            "density_after": self.density_after,
        }


@dataclass(frozen=True)
class StageChange:
    """One stage: depths, mapping, the source block of each target block, density."""

    stage: int
    source_blocks: int
    target_blocks: int
    mapping: str
    sources: tuple[int, ...]  # sources[t]: the source block of target block t
    extras: tuple[int, ...]  # target blocks that are extra copies
    density_before: float | None  # over the stage's masked layers; None: nothing masked
    density_after: float | None

    @property
    def kind(self) -> str:
        if self.target_blocks == self.source_blocks:
            return "same depth"
        return "stretch" if self.target_blocks > self.source_blocks else "squeeze"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "kind": self.kind,
            "source_blocks": self.source_blocks,
            "target_blocks": self.target_blocks,
            "mapping": self.mapping,
            "sources": list(self.sources),
            "extras": list(self.extras),
            "density_before": self.density_before,
            "density_after": self.density_after,
        }


@dataclass(frozen=True)
class ElasticReport:
    """What :func:`transform` did, per stage and per masked layer."""

    source_arch: str
    target_arch: str
    strategy: str  # the strategy name, or "explicit"
    random_extra: bool
    seed: int
    density_before: float
    density_after: float
    stages: tuple[StageChange, ...]
    layers: tuple[LayerCopy, ...] = field(repr=False)

    @property
    def mapping(self) -> str:
        """All stages' mappings in open_lth syntax (``|`` between stages)."""
        return "|".join(s.mapping for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "elastic",
            "source_arch": self.source_arch,
            "target_arch": self.target_arch,
            "strategy": self.strategy,
            "mapping": [s.mapping for s in self.stages],
            "random_extra": self.random_extra,
            "seed": self.seed,
            "density_before": self.density_before,
            "density_after": self.density_after,
            "stages": [s.to_dict() for s in self.stages],
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def render(self, layers: bool = True) -> str:
        """Stage table, then (with ``layers``) the per-layer table, as plain text."""
        head = (
            f"elastic {self.source_arch} → {self.target_arch} ({self.strategy}"
            + (f", random extra copies, seed {self.seed}" if self.random_extra else "")
            + f"): density {self.density_before:.4f} → {self.density_after:.4f}"
        )
        rows = [
            [s.stage, s.kind, f"{s.source_blocks} → {s.target_blocks}", s.mapping,
             " ".join(map(str, s.sources)), _density(s.density_before),
             _density(s.density_after)]
            for s in self.stages
        ]  # fmt: skip
        headers = ["stage", "kind", "blocks", "mapping", "source of each block", "density before",
                   "after"]  # fmt: skip
        out = [head, "", format_table(headers, rows, align="rllllrr")]
        if layers:
            rows = [
                [c.name, shape_text(c.shape), c.source, c.role, c.density_before,
                 c.density_after]
                for c in self.layers
            ]  # fmt: skip
            headers = ["layer", "shape", "from", "role", "density before", "after"]
            out += ["", format_table(headers, rows, align="llllrr")]
        return "\n".join(out)


def _density(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------- transform

# Meta entries that describe the source network as measured, not the new ticket.
_SOURCE_ONLY = ("accuracy", "metrics", "density", "imp_density", "sparsity", "source",
                "key_prefix_change")  # fmt: skip


def transform(
    ticket: Ticket,
    src_arch: str | None,
    dst_arch: str,
    mapping: MappingSpec = "interpolate",
    random_extra: bool = False,
    seed: int = 0,
    *,
    return_report: bool = False,
) -> Ticket | tuple[Ticket, ElasticReport]:
    """The ticket of ``dst_arch`` that ``ticket`` (of ``src_arch``) maps to, block by block.

    ``src_arch=None`` uses ``ticket.arch``. Masks, trained weights and rewind weights
    (whichever the ticket has) are copied; see the module docstring for the rules and
    :func:`resolve_mapping` for ``mapping``. The result names ``dst_arch``; its meta
    keeps the source's entries (structure method, IMP round, ...) except measurements
    of the source network, which move into the new ``meta["elastic"]`` record (a list,
    one record per transform). ``meta["groups"]`` layouts follow their layers (shuffled
    copies lose theirs), and ``meta["structure_report"]`` holds
    :meth:`ElasticReport.to_dict`. ``return_report=True`` returns ``(ticket, report)``.
    """
    source = _source_ticket(ticket, src_arch)
    num_classes = _num_classes(source)
    src = arch_layout(source.arch, num_classes)
    dst = arch_layout(dst_arch, num_classes)
    check_compatible(src, dst)
    stages = resolve_mapping(mapping, src.counts, dst.counts)
    sources = _key_sources(src, dst, stages)
    masks = {k: source.masks[s].clone() for k, s in sources.items() if s in source.masks}
    shuffled = _shuffle_extras(masks, dst, stages, seed) if random_extra else set()
    weights, rewind = (_copy_state(state, sources) for state in (source.weights, source.rewind))
    report = _report(
        source, masks, src, dst, stages, sources, shuffled,
        strategy=_strategy_name(mapping), random_extra=random_extra, seed=seed,
    )  # fmt: skip
    meta = _meta(source, report, sources, shuffled)
    result = Ticket(masks, weights, dst.arch, meta, rewind=rewind)
    result.check_fits(dst.arch)
    return (result, report) if return_report else result


def _source_ticket(ticket: Ticket, src_arch: str | None) -> Ticket:
    if not isinstance(ticket, Ticket):
        raise TypeError(f"transform needs a Ticket, got {type(ticket).__name__}")
    arch = src_arch if src_arch is not None else ticket.arch
    if arch is None:
        raise ElasticError("the ticket names no architecture: give the source architecture")
    try:
        return ticket.with_arch(arch)
    except TicketMismatchError as exc:
        raise TicketMismatchError(
            f"{exc} (the source architecture must be the one the ticket was found on)"
        ) from None


def _num_classes(ticket: Ticket) -> int:
    linears = [m for m in ticket.create_model("meta").modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 10


def _key_sources(src: ArchLayout, dst: ArchLayout, stages: list[StageMapping]) -> dict[str, str]:
    """``{target state key: source state key}`` for every key of the target."""
    source_of = [m.source_of() for m in stages]
    out = {}
    for key in dst.shapes:
        if key in dst.fixed:
            out[key] = src.root + dst.fixed[key]
        else:
            s, b, inner = dst.blocks[key]
            out[key] = f"{src.stages[s][source_of[s][b]]}.{inner}"
    return out


def _copy_state(
    state: dict[str, torch.Tensor] | None, sources: dict[str, str]
) -> dict[str, torch.Tensor] | None:
    if state is None:
        return None
    # Optional keys (num_batches_tracked, normalize.*) absent in the source stay absent.
    return {k: state[s].clone() for k, s in sources.items() if s in state}


def _shuffle_extras(
    masks: dict[str, torch.Tensor], dst: ArchLayout, stages: list[StageMapping], seed: int
) -> set[str]:
    """Shuffle (in ``masks``) the mask of every layer in an extra copy; returns their keys."""
    extras = [m.extras() for m in stages]
    generator = torch.Generator().manual_seed(seed)
    shuffled = set()
    for key in dst.shapes:  # state order: the same seed gives the same masks
        place = dst.blocks.get(key)
        if key not in masks or place is None or place[1] not in extras[place[0]]:
            continue
        mask = masks[key]
        order = torch.randperm(mask.numel(), generator=generator)
        masks[key] = mask.flatten()[order].view_as(mask)
        shuffled.add(key)
    return shuffled


def _strategy_name(spec: MappingSpec) -> str:
    if isinstance(spec, str) and all(p.strip() in STRATEGIES for p in spec.split("|")):
        return spec.replace(" ", "")
    return "explicit"


def _report(
    source: Ticket,
    masks: dict[str, torch.Tensor],
    src: ArchLayout,
    dst: ArchLayout,
    stages: list[StageMapping],
    sources: dict[str, str],
    shuffled: set[str],
    **params: Any,
) -> ElasticReport:
    before, after = _nnz(source.masks), _nnz(masks)
    layers = []
    for key, mask in masks.items():
        src_key = sources[key]
        place = dst.blocks.get(key)
        stage, block = (place[0], place[1]) if place else (None, None)
        layers.append(LayerCopy(
            name=key, source=src_key, shape=tuple(mask.shape), stage=stage, block=block,
            source_block=None if place is None else src.blocks[src_key][1],
            role=_role(key, block, stages[stage] if place else None, shuffled),
            nnz_before=before[src_key], nnz_after=after[key], numel=mask.numel(),
        ))  # fmt: skip
    changes = tuple(
        StageChange(
            stage=s, source_blocks=src.counts[s], target_blocks=dst.counts[s], mapping=str(m),
            sources=tuple(m.source_of()[t] for t in range(dst.counts[s])),
            extras=tuple(sorted(m.extras())),
            density_before=_density_over(before, source.masks, lambda k, s=s: src.stage_of(k) == s),
            density_after=_density_over(after, masks, lambda k, s=s: dst.stage_of(k) == s),
        )
        for s, m in enumerate(stages)
    )  # fmt: skip
    return ElasticReport(
        source_arch=src.arch, target_arch=dst.arch,
        density_before=_density_over(before, source.masks, default=1.0),
        density_after=_density_over(after, masks, default=1.0),
        stages=changes, layers=tuple(layers), **params,
    )  # fmt: skip


def _role(key: str, block: int | None, mapping: StageMapping | None, shuffled: set[str]) -> str:
    if block is None or mapping is None:
        return "fixed"
    if block == 0:
        return "first block"
    if block not in mapping.extras():
        return "copy"
    return "extra copy, shuffled" if key in shuffled else "extra copy"


def _nnz(masks: dict[str, torch.Tensor]) -> dict[str, int]:
    return {k: int(torch.count_nonzero(m)) for k, m in masks.items()}


def _density_over(
    nnz: dict[str, int],
    masks: dict[str, torch.Tensor],
    keep: Callable[[str], bool] | None = None,
    default: float | None = None,
) -> float | None:
    """Kept fraction over the masks whose key passes ``keep``; ``default`` if none do."""
    keys = [k for k in masks if keep is None or keep(k)]
    total = sum(masks[k].numel() for k in keys)
    return sum(nnz[k] for k in keys) / total if total else default


def _meta(
    source: Ticket, report: ElasticReport, sources: dict[str, str], shuffled: set[str]
) -> dict[str, Any]:
    meta = {k: v for k, v in source.meta.items() if k not in _SOURCE_ONLY}
    record = {
        "method": "elastic",
        "source_arch": report.source_arch,
        "target_arch": report.target_arch,
        "strategy": report.strategy,
        "mapping": [s.mapping for s in report.stages],
        "random_extra": report.random_extra,
        "seed": report.seed,
        "source_meta": {k: source.meta[k] for k in _SOURCE_ONLY if k in source.meta},
    }
    history = source.meta.get("elastic")
    meta["elastic"] = [*(history if isinstance(history, list) else []), record]
    groups = source.meta.get("groups")
    if isinstance(groups, dict):
        # A group layout describes its mask: it follows the copy, unless that was shuffled.
        meta["groups"] = {
            k: groups[s] for k, s in sources.items() if s in groups and k not in shuffled
        }
    meta["structure_report"] = report.to_dict()
    return meta
