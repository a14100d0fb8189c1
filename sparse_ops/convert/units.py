"""The units a conv site or a Linear becomes: representation choice, BatchNorm-folded
weights cut to the layouts the passes assigned, and the report row of each."""

from __future__ import annotations

import torch
from torch import fx, nn

from sparse_ops_kernels.formats import ChannelPlan

from ..layouts import Group, GroupLayout
from ..masks import gemm_view, mask_stats
from ..nn import ChannelPrunedConv2d, GroupSparseConv2d, TorchConv2d
from ..packing import pack_groups
from ..structure.regroup import regroup_mask
from . import patterns
from .context import Choice, LayerRow
from .cost import zero_padding_pays

# Leftover rows are packed 16 at a time (the smallest tensor-core tile) sharing the
# union of their columns, so a leftover pack never exceeds the dense size of its rows.
LEFTOVER_ROWS = 16


def choose(ctx, site: patterns.Site) -> Choice:
    conv: nn.Conv2d = ctx.modules[site.conv.target]
    mask = ctx.masks.get(f"{site.name}.weight")
    if conv.groups != 1:
        return Choice("torch", "grouped conv" if mask is None else mask_stats(mask).structure)
    structure = "dense" if mask is None else mask_stats(mask).structure
    if structure in ("dense", "empty"):
        return Choice("channel", structure)
    if ctx.mode == "channel" and structure == "channel":
        return Choice("channel", structure)
    if ctx.mode == "group" and structure in ("channel", "group"):
        return Choice("group", structure, group_layout(ctx, site, mask))
    if ctx.mode == "auto" and structure in ("channel", "group"):
        layout = group_layout(ctx, site, mask)
        if _group_cost(ctx, site, layout) < _channel_cost(ctx, site):
            return Choice("group", structure, layout)
        return Choice("channel", structure)
    # A structure the chosen mode cannot run: the unstructured policy decides.
    if ctx.on_unstructured == "dense":
        return Choice("channel", structure, note="masked dense (unstructured)")
    if ctx.on_unstructured == "regroup":
        return regrouped(ctx, site, mask, structure)
    return Choice("error", structure)


def regrouped(ctx, site: patterns.Site, mask: torch.Tensor, structure: str) -> Choice:
    """A group unit of the regrouped mask, plus one-row groups of what regroup dropped
    (the leftover), so the layer stays exact."""
    new_mask, layout, _ = regroup_mask(mask, ctx.regroup, name=site.name)
    leftover_view = gemm_view(mask) & ~gemm_view(new_mask)
    leftover = _leftover_groups(leftover_view, LEFTOVER_ROWS)
    note = f"regrouped, {int(leftover_view.sum())} leftover nonzeros"
    return Choice("group", structure, layout, leftover if len(leftover) else None, note=note)


def group_layout(ctx, site: patterns.Site, mask: torch.Tensor) -> GroupLayout:
    """The ticket's group layout if it still covers the mask; else read off the mask."""
    stored = ctx.stored_layouts.get(site.name)
    if stored:
        layout = GroupLayout.of(stored)
        if layout.covers(mask):
            return layout
    return GroupLayout.from_mask(mask)


def _spatial(ctx, site: patterns.Site) -> int:
    shape = ctx.shape(site.conv)
    return int(shape[2] * shape[3])


def _channel_cost(ctx, site: patterns.Site) -> float:
    w, _ = ctx.fold(site)
    nz = w != 0
    rows = int(nz.flatten(1).any(1).sum())
    ins = int(nz.any(dim=(0, 2, 3)).sum())
    return 2.0 * rows * ins * w.shape[2] * w.shape[3] * _spatial(ctx, site)


def _group_cost(ctx, site: patterns.Site, layout: GroupLayout) -> float:
    padded = layout.padded_size(ctx.cost.block_n, ctx.cost.k_pad)
    return 2.0 * padded * _spatial(ctx, site) * ctx.cost.group_overhead


def site_constants(ctx, site: patterns.Site) -> torch.Tensor:
    w, b = ctx.fold(site)
    empty = ~(w != 0).flatten(1).any(1)
    value = b.clone()
    if site.residual is not None:
        value = value + ctx.const[site.residual]
    if site.relu is not None:
        value = torch.relu(value)  # relu(NaN) stays NaN
    return torch.where(empty, value, torch.full_like(value, float("nan")))


def conv_unit(ctx, site: patterns.Site) -> nn.Module:
    """The unit of ``site`` as ``ctx.choices`` says, its report row appended to ``ctx.rows``."""
    unit, row = make_conv_unit(ctx, site, ctx.choices[site.name])
    ctx.notes["bn_folded"] += site.bn is not None
    ctx.notes["relu_fused"] += site.relu is not None
    ctx.notes["residual_fused"] += site.residual is not None
    ctx.rows.append(row)
    return unit


def make_conv_unit(
    ctx, site: patterns.Site, choice: Choice, *, zero_pad: bool = False
) -> tuple[nn.Module, LayerRow]:
    """The unit ``choice`` makes of ``site`` in the layouts the passes assigned, and its
    report row; no side effect on ``ctx`` (tuning builds several per site).

    ``zero_pad`` (channel units): read the whole stored input layout and compute every
    stored output channel, zero weights where the mask has none — no gather, no scatter,
    the BatchNorm-folded dense conv of the narrowed tensors."""
    conv: nn.Conv2d = ctx.modules[site.conv.target]
    w, b = ctx.fold(site)
    relu = site.relu is not None
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    dtype = ctx.dtype or conv.weight.dtype
    in_node, out_node = site.conv.args[0], site.out
    spatial = _spatial(ctx, site)
    kh, kw = conv.kernel_size
    cout, cin = conv.out_channels, conv.in_channels
    row = LayerRow(
        site.name,
        "conv",
        choice.structure,
        choice.kind,
        cin,
        cout,
        2 * cout * (cin // conv.groups) * kh * kw * spatial,
        0,
        conv.weight.numel(),
        0,
        {},
    )
    if choice.note:
        row.detail["note"] = choice.note
    if choice.kind == "torch":
        unit = TorchConv2d(
            w.to(dtype), b.float(), groups=conv.groups, relu=relu, name=site.name, **geometry
        )
        row.flops_after = row.flops_kernel = row.flops_dense
        row.params_after = int((w != 0).sum())
        row.params_stored = int(w.numel())
    elif choice.kind == "group":
        unit, row = _group_unit(ctx, site, choice, w, b, relu, dtype, geometry, row)
    else:
        unit, row = _channel_unit(
            ctx, site, w, b, relu, dtype, geometry, row, in_node, out_node, zero_pad=zero_pad
        )
    return unit, row


def as_torch_conv(unit: ChannelPrunedConv2d) -> TorchConv2d | None:
    """A channel unit without gather, scatter or bias map as a TorchConv2d: the vendor
    conv (cuDNN on a GPU) instead of the channel kernel, same weights and layouts; None
    where the unit needs one of the three."""
    if unit.const_weight is not None or unit.in_idx is not None or unit.out_idx is not None:
        return None
    weight = unit.weight.permute(0, 3, 1, 2).contiguous()
    geometry = {"stride": unit.stride, "padding": unit.padding, "dilation": unit.dilation}
    return TorchConv2d(weight, unit.bias, groups=1, relu=unit.relu, name=unit.name, **geometry)


def _channel_unit(ctx, site, w, b, relu, dtype, geometry, row, in_node, out_node, *, zero_pad):
    nz = w != 0
    in_const = ctx.const[in_node]
    keep_in = nz.any(dim=(0, 2, 3))
    varying_in = torch.isnan(in_const)
    in_layout, out_layout = ctx.layout[in_node], ctx.layout[out_node]
    n_in_phys, n_out_phys = int(in_layout.numel()), int(out_layout.numel())
    # The layer's useful work: kept weights on varying inputs (what flops_after counts,
    # whatever the alignment), and the rows they reach.
    in_logical = torch.nonzero(keep_in & varying_in).flatten()
    reached = _rows_reading(nz, in_logical)
    rows_logical = int(reached[out_layout].sum())
    # Input channels read. Without alignment: the varying kept ones (gathered unless
    # that is the whole layout); constant inputs go to the bias map. With alignment
    # the whole layout is read when the channels without a kept weight are few: zero
    # columns instead of a gather; stored constants then contribute through their
    # weights (exact: the stored value is the constant).
    read = in_logical
    align = ctx.cost.channel_align
    used = int(keep_in[in_layout].sum())  # stored inputs with a kept weight
    if zero_pad or (
        align > 1
        and n_in_phys > in_logical.numel()
        and zero_padding_pays(n_in_phys, used, ctx.cost.max_zero_inputs)
    ):
        read = in_layout
    computes = _rows_reading(nz, read)
    is_read = torch.zeros(w.shape[1], dtype=torch.bool)
    is_read[read] = True
    const_in = torch.nonzero(keep_in & ~varying_in & (in_const != 0) & ~is_read).flatten()
    in_pos = ctx.positions(in_node, read)
    assert bool((in_pos >= 0).all()), f"{site.name}: a channel it reads is not stored"
    identity_in = in_pos.numel() == n_in_phys and bool((in_pos == torch.arange(n_in_phys)).all())
    # Output rows computed. With alignment every stored output channel becomes a GEMM
    # row (zero weights where no weight reaches it: its epilogue is bias + residual,
    # as a fill channel's) when those zero rows are few: no scatter, no fill tiles.
    n_computes = int(computes[out_layout].sum())
    if zero_pad or (
        align > 1
        and n_computes < n_out_phys
        and zero_padding_pays(n_out_phys, n_computes, ctx.cost.max_zero_rows)
    ):
        computes = torch.ones_like(computes)
    rows = out_layout[computes[out_layout]]
    out_pos = torch.nonzero(computes[out_layout]).flatten()
    fill_pos = torch.nonzero(~computes[out_layout]).flatten()
    compact = w[rows][:, read].permute(0, 2, 3, 1).contiguous()
    plan = ChannelPlan(
        weight=compact.to(dtype),
        bias=b[out_layout].float(),
        in_idx=None if identity_in else in_pos.to(torch.int32),
        out_idx=None if fill_pos.numel() == 0 else out_pos.to(torch.int32),
        fill_idx=None if fill_pos.numel() == 0 else fill_pos.to(torch.int32),
        in_channels=n_in_phys,
        out_channels=n_out_phys,
        stride=tuple(geometry["stride"]),
        padding=tuple(geometry["padding"]),
        dilation=tuple(geometry["dilation"]),
    )
    const_weight = const_values = None
    if const_in.numel():
        const_weight = w[out_layout][:, const_in].float()
        const_values = in_const[const_in].float()
    in_shape = ctx.shape(in_node)
    unit = ChannelPrunedConv2d(
        plan,
        relu=relu,
        const_weight=const_weight,
        const_values=const_values,
        input_hw=tuple(in_shape[2:]),
        name=site.name,
    )
    kh, kw = w.shape[2], w.shape[3]
    per_weight = 2 * kh * kw * _spatial(ctx, site)
    row.flops_after = per_weight * rows_logical * int(in_logical.numel())
    row.params_after = rows_logical * int(in_logical.numel()) * kh * kw
    row.flops_kernel = per_weight * int(rows.numel()) * int(read.numel())
    row.params_stored = int(compact.numel())
    computed_all = rows_logical == w.shape[0] and in_logical.numel() == w.shape[1]
    row.representation = "dense" if computed_all else "channel"
    # 16-byte rows in the unit's dtype: 8 elements at fp16/bf16, 4 at fp32.
    per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    aligned = (
        plan.in_idx is None
        and plan.out_idx is None
        and n_in_phys % per_16_bytes == 0
        and n_out_phys % per_16_bytes == 0
    )
    row.detail.update(
        {
            "inputs_used": int(in_logical.numel()),
            "rows_computed": rows_logical,
            "input_width": n_in_phys,
            "output_width": n_out_phys,
            "stored_inputs_with_weights": used,
            "bias_map_channels": int(const_in.numel()),
            "input_gather": plan.in_idx is not None,
            "output_scatter": plan.out_idx is not None,
            "aligned": aligned,
        }
    )
    return unit, row


def _rows_reading(nz: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """Output rows with a kept weight on one of the logical input ``channels``."""
    if channels.numel() == 0:
        return torch.zeros(nz.shape[0], dtype=torch.bool)
    return nz[:, channels].flatten(1).any(1)


def _group_unit(ctx, site, choice, w, b, relu, dtype, geometry, row):
    mask = ctx.masks.get(f"{site.name}.weight")
    keep = (w != 0) if mask is None else mask.bool()
    blocks = choice.layout.to_mask(tuple(w.shape))
    main_mask = blocks & keep
    common = dict(
        stride=geometry["stride"],
        padding=geometry["padding"],
        dilation=geometry["dilation"],
        name=site.name,
    )
    blocking = {"block_n": ctx.cost.block_n, "k_pad": ctx.cost.k_pad}
    pack = pack_groups(w, main_mask, choice.layout, b.float(), **blocking, **common)
    leftover = None
    if choice.leftover:
        left_mask = keep & ~blocks
        leftover = pack_groups(
            w, left_mask, choice.leftover, None, block_n=16, k_pad=16, **common
        ).to(dtype=dtype)
    unit = GroupSparseConv2d(pack.to(dtype=dtype), relu=relu, leftover=leftover, name=site.name)
    spatial = _spatial(ctx, site)
    nnz_groups = choice.layout.padded_size(1, 1)
    nnz_left = choice.leftover.padded_size(1, 1) if choice.leftover else 0
    row.flops_after = 2 * (nnz_groups + nnz_left) * spatial
    row.params_after = nnz_groups + nnz_left
    # The kernel multiplies whole padded tiles (block_n rows × k_pad columns).
    stored = int(pack.values.numel())
    if leftover is not None:
        stored += int(leftover.values.numel())
    row.flops_kernel, row.params_stored = 2 * stored * spatial, stored
    row.representation = "group+leftover" if leftover is not None else "group"
    row.detail.update({"groups": len(choice.layout), "leftover_nonzeros": nnz_left})
    return unit, row


def linear_unit(ctx, node: fx.Node, *, narrow: bool) -> nn.Linear:
    old: nn.Linear = ctx.modules[node.target]
    src = node.args[0]
    layout = ctx.layout.get(src)
    c = old.in_features
    weight = old.weight.detach().double()
    bias = (
        old.bias.detach().double()
        if old.bias is not None
        else torch.zeros(old.out_features, dtype=torch.float64)
    )
    dtype = ctx.dtype or old.weight.dtype
    mask = ctx.masks.get(f"{node.target}.weight")
    # A pruned Linear stays a dense Linear (its zeros kept): the structure is reported,
    # the FLOPs and parameters are those it runs with.
    structure = "dense" if mask is None else mask_stats(mask).structure
    row = LayerRow(
        node.target,
        "linear",
        structure,
        "linear",
        c,
        old.out_features,
        2 * c * old.out_features,
        0,
        old.weight.numel(),
        0,
    )
    if mask is not None:
        row.detail["kept_weights"] = int(mask.sum())
    if not narrow or layout.numel() == c:
        new = nn.Linear(c, old.out_features, bias=old.bias is not None)
        new.weight.data = old.weight.detach().to(dtype).clone()
        if old.bias is not None:
            new.bias.data = old.bias.detach().to(dtype).clone()
    else:
        removed = torch.ones(c, dtype=torch.bool)
        removed[layout] = False
        const = torch.nan_to_num(ctx.const[src], nan=0.0)
        folded = bias + weight[:, removed] @ const[removed]
        new = nn.Linear(int(layout.numel()), old.out_features)
        new.weight.data = weight[:, layout].to(dtype).contiguous()
        new.bias.data = folded.to(dtype)
    # Useful work without the channels stored only for alignment (zero-cost constants
    # folded into the bias at channel_align=1); the kernel figures include them.
    added = 0 if not narrow else ctx.align_added.get(ctx.uf.find(src), 0)
    row.flops_after = 2 * (new.in_features - added) * new.out_features
    row.params_after = (new.in_features - added) * new.out_features
    row.flops_kernel = 2 * new.in_features * new.out_features
    row.params_stored = new.weight.numel()
    row.detail["input_width"] = new.in_features
    ctx.rows.append(row)
    return new.eval()


def _leftover_groups(view: torch.Tensor, rows_per_group: int) -> GroupLayout:
    """Rows holding leftover nonzeros, in chunks sharing the union of their columns."""
    rows = torch.nonzero(view.any(1)).flatten()
    groups = []
    for chunk in rows.split(rows_per_group):
        cols = torch.nonzero(view[chunk].any(0)).flatten()
        groups.append(Group(tuple(chunk.tolist()), tuple(cols.tolist())))
    return GroupLayout(tuple(groups))
