"""The elastic transform: a ticket copied block by block into another depth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...errors import ElasticError, TicketMismatchError
from ...tickets.ticket import Ticket
from .layout import ArchLayout, arch_layout, check_compatible
from .mapping import STRATEGIES, MappingSpec, StageMapping, resolve_mapping
from .report import ElasticReport, LayerCopy, StageChange

# Meta entries that describe the source network as measured, not the new ticket.
_SOURCE_ONLY = (
    "accuracy",
    "metrics",
    "density",
    "imp_density",
    "sparsity",
    "source",
    "key_prefix_change",
)


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
    (whichever the ticket has) are copied; see :mod:`sparse_ops.structure.elastic` for
    the rules and
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
        source,
        masks,
        src,
        dst,
        stages,
        sources,
        shuffled,
        strategy=_strategy_name(mapping),
        random_extra=random_extra,
        seed=seed,
    )
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
        layers.append(
            LayerCopy(
                name=key,
                source=src_key,
                shape=tuple(mask.shape),
                stage=stage,
                block=block,
                source_block=None if place is None else src.blocks[src_key][1],
                role=_role(key, block, stages[stage] if place else None, shuffled),
                nnz_before=before[src_key],
                nnz_after=after[key],
                numel=mask.numel(),
            )
        )
    changes = tuple(
        StageChange(
            stage=s,
            source_blocks=src.counts[s],
            target_blocks=dst.counts[s],
            mapping=str(m),
            sources=tuple(m.source_of()[t] for t in range(dst.counts[s])),
            extras=tuple(sorted(m.extras())),
            density_before=_density_over(before, source.masks, lambda k, s=s: src.stage_of(k) == s),
            density_after=_density_over(after, masks, lambda k, s=s: dst.stage_of(k) == s),
        )
        for s, m in enumerate(stages)
    )
    return ElasticReport(
        source_arch=src.arch,
        target_arch=dst.arch,
        density_before=_density_over(before, source.masks, default=1.0),
        density_after=_density_over(after, masks, default=1.0),
        stages=changes,
        layers=tuple(layers),
        **params,
    )


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
