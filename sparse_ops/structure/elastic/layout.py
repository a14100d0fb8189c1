"""Reading a model's stage layout: stem, stages of blocks, classifier.

The structure is read from the instantiated model, not from hand-written tables. A
block is a child of an ``nn.Sequential`` *trunk* that contains convs. A new stage
starts at each trunk, after a pooling layer, and at a block that changes resolution
or width. :func:`check_compatible` says whether two layouts differ in depth only.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from ... import models
from ...errors import ElasticError


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
        _compare(
            where,
            f"stage {s} block 0",
            src.block_shapes(s, 0),
            dst.block_shapes(s, 0),
            f"{src.stages[s][0]}.",
            f"{dst.stages[s][0]}.",
        )
        if n_dst < 2:
            continue
        # Any source block may land on any later target block: all must look alike.
        template = dst.block_shapes(s, 1)
        for b in range(1, n_src):
            _compare(
                where,
                f"stage {s} block {b}",
                src.block_shapes(s, b),
                template,
                f"{src.stages[s][b]}.",
                f"{dst.stages[s][1]}.",
            )
        for b in range(2, n_dst):
            _compare(
                where,
                f"stage {s} block {b}",
                template,
                dst.block_shapes(s, b),
                f"{dst.stages[s][1]}.",
                f"{dst.stages[s][b]}.",
            )


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
