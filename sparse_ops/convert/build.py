"""From a traced masked network to the converted graph.

The passes over the fx graph of the masked dense network (in-place ops made explicit
first, ``inplace.py``), each iterating the nodes and asking every node's rule
(``rules.py``, one per op kind) for its part:

1. **Representation** per conv site (``units.choose``): a ChannelPrunedConv2d (dense or
   channel), a GroupSparseConv2d (group, or regrouped with a leftover pack), or a
   TorchConv2d (grouped/depthwise convs).
2. **Rules and constants**: each node's rule is decided once, then says which channels
   of the node's output are constant and their values. A pruned row of a conv outputs
   ``relu?(bias + residual)``, which with BatchNorm folded in is in general not zero.
3. **Layouts**: the rules tie tensors that must share one physical channel layout — a
   conv output and the residual its kernel adds, the operands of an add, the input and
   output of a pooling — and force every channel where an op could notice narrowing.
   Each tied set stores the union of its non-constant channels (at least one, so no op
   meets an empty tensor; with channel alignment rounded up with constant ones).
4. **Emission**: each rule emits its node reading the new graph's values: units read
   their input layout (skipping constant input channels, whose contribution becomes the
   bias map) and write their output layout (constant channels inside it through
   epilogue-only tiles); ``Relayout`` bridges layouts where a rule ties nothing.

The result computes exactly the masked dense network, up to float rounding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import listing
from .context import Context
from .cost import MODES, ON_UNSTRUCTURED
from .inplace import check_units_read_before, functionalize
from .prepare import ConvertError
from .rules import rule_for
from .units import choose


def build(
    gm: fx.GraphModule,
    example: torch.Tensor,
    masks: dict[str, torch.Tensor],
    stored_layouts: dict[str, list],
    **options: Any,
) -> tuple[fx.GraphModule, Context]:
    """The converted module of a traced masked network, and the passes' shared state.
    ``options``: :class:`Context`'s (mode, on_unstructured, dtype, cost, regroup)."""
    mode, on_unstructured = options["mode"], options["on_unstructured"]
    if mode not in MODES:
        raise ConvertError(f"mode must be one of {MODES}, got {mode!r}")
    if on_unstructured not in ON_UNSTRUCTURED:
        raise ConvertError(
            f"on_unstructured must be one of {ON_UNSTRUCTURED}, got {on_unstructured!r}"
        )
    try:
        ShapeProp(gm).propagate(example)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConvertError(
            f"the model does not run on an input of shape {tuple(example.shape)} "
            f"({type(cause).__name__}: {str(cause).splitlines()[0]}); pass input_size=(C, H, W)"
        ) from None
    mutations = functionalize(gm)
    ctx = Context(gm, masks, stored_layouts, **options)
    check_units_read_before(gm, mutations, ctx.sites)
    choose_representations(ctx)
    nodes = list(gm.graph.nodes)
    for node in nodes:
        rule = ctx.rule[node] = rule_for(node, ctx)
        const = rule.constants(node, ctx)
        if const is not None:
            ctx.const[node] = const
    for node in nodes:
        ctx.rule[node].tie(node, ctx)
    assign_layouts(ctx)
    for node in nodes:
        new = ctx.rule[node].emit(node, ctx)
        if new is not None:
            ctx.env[node] = new
    module = fx.GraphModule(ctx.root, ctx.graph)
    module.graph.lint()
    return module.eval(), ctx


def choose_representations(ctx: Context) -> None:
    errors = []
    for site in ctx.sites:
        choice = ctx.choices[site.name] = choose(ctx, site)
        if choice.kind == "error":
            errors.append(f"{site.name} ({choice.structure})")
    if errors:
        raise ConvertError(
            f"layers whose masks mode={ctx.mode!r} cannot run: {listing(errors, 12)}; "
            "pass on_unstructured='dense' (masked dense conv) or 'regroup' (regroup them "
            "and keep the leftover nonzeros exact)"
        )


def assign_layouts(ctx: Context) -> None:
    """Each channel tensor's layout: every channel where its tied set is forced full,
    else the channels :func:`stored_channels` picks for the set."""
    varying_of: dict[fx.Node, torch.Tensor] = {}
    for node, const in ctx.const.items():
        root = ctx.uf.find(node)
        v = torch.isnan(const)
        varying_of[root] = v if root not in varying_of else varying_of[root] | v
    stored_of = stored_channels(ctx, varying_of)
    for node, const in ctx.const.items():
        if ctx.uf.is_full(node):
            ctx.layout[node] = torch.arange(const.numel())
        else:
            ctx.layout[node] = torch.nonzero(stored_of[ctx.uf.find(node)]).flatten()


def stored_channels(
    ctx: Context, varying_of: dict[fx.Node, torch.Tensor]
) -> dict[fx.Node, torch.Tensor]:
    """The channels each tied set stores: its varying ones; at least one (a set whose
    channels are all constant — every conv before a pooling fully pruned — would be an
    empty tensor, which pooling and convs refuse); and with ``channel_align`` A > 1 as
    many channels constant in every tensor of the set as round the width up to a
    multiple of A, where the set has that many channels (a 3-channel image or a set
    whose channels all vary stays as it is). Constant channels some channel unit reads
    with a kept weight go first (stored, they are read through the weight instead of the
    bias map), then the lowest-numbered."""
    align = ctx.cost.channel_align
    usage: dict[fx.Node, torch.Tensor] = {}
    for site in ctx.sites:
        if ctx.choices[site.name].kind != "channel":
            continue
        w, _ = ctx.fold(site)
        root = ctx.uf.find(site.conv.args[0])
        used = (w != 0).any(dim=(0, 2, 3)).to(torch.int64)
        usage[root] = used if root not in usage else usage[root] + used
    stored_of = {}
    for root, varying in varying_of.items():
        width, channels = int(varying.sum()), varying.numel()
        least = max(width, 1)
        target = -(-least // align) * align
        if target > channels:
            target = least  # too few channels to round up
        if ctx.uf.is_full(root) or target == width:
            stored_of[root] = varying
            continue
        candidates = torch.nonzero(~varying).flatten()
        if root in usage:
            order = torch.argsort(-usage[root][candidates], stable=True)
            candidates = candidates[order]
        stored = varying.clone()
        stored[candidates[: target - width]] = True
        stored_of[root] = stored
        ctx.align_added[root] = target - width
    return stored_of
