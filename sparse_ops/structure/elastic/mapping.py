"""The block-mapping language of elastic transforms: which source block of a stage
goes to which target blocks.

A mapping is a named strategy (:data:`STRATEGIES`, built for any pair of stage depths
by :func:`named_mapping`) or a string in open_lth/E-LTH's syntax ``src:tgt[,tgt];…``
(:func:`parse_mapping`); :func:`resolve_mapping` turns either, one per stage or one
for all, into checked :class:`StageMapping` objects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ...errors import BlockMappingError, ElasticError

_T = TypeVar("_T")

STRETCH = ("interpolate", "append")
SQUEEZE = ("drop-last", "drop-interleaved", "drop-first")
STRATEGIES = STRETCH + SQUEEZE
_EXAMPLE = "'0:0;1:1,2;2:3,4' (source:target[,target] per block, ';' between blocks)"


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
        return cls(
            tuple(
                (src, (targets,) if isinstance(targets, int) else tuple(targets))
                for src, targets in mapping.items()
            )
        )

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
    return _per_stage(text.split("|"), parse_stage_mapping)


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
        "drop-interleaved": lambda m, big_m: {
            1 + (j - 1) * m // big_m: [j] for j in range(1, big_m + 1)
        },
        "drop-first": lambda m, big_m: {m - big_m + j: [j] for j in range(1, big_m + 1)},
    }[strategy]
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
    return _per_stage(parts, _stage_spec)


def _stage_spec(part: StageSpec) -> str | StageMapping:
    if isinstance(part, StageMapping):
        return part
    if isinstance(part, Mapping):
        return StageMapping.from_dict(part)
    if isinstance(part, str):
        return part.strip() if part.strip() in STRATEGIES else parse_stage_mapping(part)
    raise BlockMappingError(f"cannot use {part!r} as a stage mapping")


def _per_stage(parts: Sequence[Any], read: Callable[[Any], _T]) -> list[_T]:
    """``read`` of each stage's part. One part stands for every stage, so only with
    several does an error say which stage it is about."""
    if len(parts) == 1:
        return [read(parts[0])]
    out = []
    for stage, part in enumerate(parts):
        try:
            out.append(read(part))
        except BlockMappingError as exc:
            raise BlockMappingError(f"stage {stage}: {exc}") from None
    return out
