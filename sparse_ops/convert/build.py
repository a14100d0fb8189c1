"""From a traced masked network to the converted graph.

Four passes over the fx graph of the masked dense network:

1. **Representation** per conv site (:func:`choose`): a ChannelPrunedConv2d (dense or
   channel), a GroupSparseConv2d (group, or regrouped with a leftover pack), or a
   TorchConv2d (grouped/depthwise convs).
2. **Constants**: which channels of each tensor are constant, and their values. A
   pruned row of a conv outputs ``relu?(bias + residual)``, which with BatchNorm folded
   in is in general not zero. Constants flow through ReLUs, pooling, slicing, channel
   padding and adds.
3. **Layouts**: the channels each tensor stores physically. Tensors tied together — a
   conv output and the residual its kernel adds, the operands of an add, the input and
   output of a pooling — share one layout: the union of their non-constant channels.
   Inputs of ops the converter does not understand, grouped convs and group units keep
   every channel.
4. **Emission**: units read their input layout (skipping constant input channels,
   whose contribution becomes the bias map), write their output layout (constant
   channels inside it through epilogue-only tiles), and ``Relayout`` moves tensors
   across channel padding.

The result computes exactly the masked dense network, up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from ..errors import listing
from ..formats import ChannelPlan, GroupPack
from ..masks import from_gemm_view, gemm_view, mask_stats
from ..nn import ChannelPrunedConv2d, GroupSparseConv2d, Relayout, TorchConv2d
from ..structure.regroup import RegroupConfig, regroup_mask
from . import patterns
from .prepare import ConvertError

MODES = ("auto", "channel", "group")
ON_UNSTRUCTURED = ("error", "dense", "regroup")


@dataclass(frozen=True)
class CostModel:
    """Predicted cost of one layer, in dense-FLOP equivalents, for ``mode='auto'``.

    channel: 2·rows·inputs·kh·kw·OH·OW (a smaller dense conv, no overhead).
    group:   2·Σ padded_rows·padded_cols·OH·OW × ``group_overhead``: per-column
             (ky, kx, c) gathers and tile padding cost about this much over a dense GEMM
             of the same size (a starting value; calibrate with bench/ results).
    The cheaper one is used; a channel-structured mask nearly always picks channel.

    The overhead depends on where the module runs (:meth:`for_device`): 1.3 for the
    Triton group kernel on a GPU (a starting value until GPU measurements calibrate
    it), 20 for the CPU torch path, measured on this project's CPU machine
    (``bench/``: 64–512-channel 3×3 layers at block densities 0.5–0.05 ran 1.1–3.5×
    slower than oneDNN's *dense* conv, 5–32× per useful multiply-add), so on a CPU
    ``auto`` keeps group layers as compacted dense convs unless they are very sparse.

    **Channel alignment** (``docs/CONVERT.md``, "Channel alignment"). The GPU channel
    kernel uses 16-byte vector and asynchronous copies only where every row it reads or
    writes is 16-byte aligned: activation widths (the NHWC pixel stride) and the compact
    weight's input channels multiples of 8 elements at fp16/bf16, input read without a
    gather (``in_idx=None``), output written without a scatter (``out_idx=None``). With
    ``channel_align`` A > 1 the converter

    * rounds every narrowed activation's width up to a multiple of A by also storing
      channels it knows are constant there (when the tensor has that many channels);
    * lets a channel unit read its whole input layout, zero weight columns for the
      channels it does not use, when those are at most ``max_zero_inputs`` of the
      layout (or only fill the last 32-wide GEMM tile of the used ones);
    * lets a channel unit compute its whole output layout, zero weight rows for the
      channels no weight reaches, when those are at most ``max_zero_rows`` of the layout
      (or only fill the last 32-wide GEMM tile of the computed rows).

    ``channel_align=1`` (the CPU's) turns all three off: the layouts of before, which on
    a CPU are the fastest (zero rows and columns are real work for oneDNN).
    """

    group_overhead: float = 1.3
    block_n: int = 32
    k_pad: int = 32
    # 8 elements = 16 bytes at fp16/bf16 (fp32 needs only 4, so 8 serves every dtype).
    channel_align: int = 8
    # A gather costs scalar loads (and no cp.async pipelining) for the whole K loop, zero
    # columns only their fraction of extra MMA work: a quarter is a clear win.
    max_zero_inputs: float = 0.25
    # A scatter costs scalar stores once per output tile (the epilogue), zero rows their
    # fraction of extra MMA work in the K loop: the trade is narrower than on the input
    # side, so the limit is no larger. Starting values until GPU measurements calibrate
    # them, like group_overhead.
    max_zero_rows: float = 0.25

    def __post_init__(self) -> None:
        if not self.group_overhead > 0:
            raise ConvertError(f"CostModel.group_overhead must be > 0, got {self.group_overhead}")
        for name in ("block_n", "k_pad"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ConvertError(f"CostModel.{name} must be a power of two ≥ 16, got {value!r}")
        align = self.channel_align
        if isinstance(align, bool) or not isinstance(align, int) or align < 1:
            raise ConvertError(f"CostModel.channel_align must be an int ≥ 1, got {align!r}")
        for name in ("max_zero_inputs", "max_zero_rows"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ConvertError(f"CostModel.{name} must lie in [0, 1], got {value!r}")

    @classmethod
    def for_device(cls, device: torch.device | str | None) -> CostModel:
        """The cost model for modules that run on ``device`` (None: a GPU)."""
        if device is not None and torch.device(device).type == "cpu":
            return cls(group_overhead=20.0, channel_align=1)
        return cls()


# The channel kernel's GEMM tiles are at least this wide in rows (BLOCK_N) and in input
# channels per K step (BLOCK_K): every tensor-core config in kernels/channel_conv.py has
# both ≥ 32 (the exact-fp32 "fma" configs step K by 16).
# Zero rows/columns that only fill the last tile the used ones occupy anyway cost no MMA
# work (the tile is computed whole, masked lanes as zeros). Were smaller tiles added, the
# cost would be at most one more 16-wide tile (tl.dot's smallest) on layers this narrow.
MIN_TILE = 32


def _zero_padding_pays(width: int, used: int, max_fraction: float) -> bool:
    """Whether ``width − used`` zero-weight rows/columns (instead of a scatter/gather) are
    cheap enough: at most ``max_fraction`` of ``width``, or inside the last GEMM tile."""
    if used == 0:
        return False  # nothing to compute: no GEMM to pad
    extra = width - used
    return extra <= max_fraction * width or width <= -(-used // MIN_TILE) * MIN_TILE


@dataclass
class Choice:
    kind: str  # "channel", "group", "torch"
    structure: str
    layout: list[dict] | None = None  # groups for a group unit
    leftover: list[dict] | None = None  # one-row groups keeping a regrouped layer exact
    note: str = ""


@dataclass
class LayerRow:
    """One line of the conversion report."""

    name: str
    kind: str  # conv / linear
    structure: str
    representation: str
    in_channels: int
    out_channels: int
    flops_dense: int
    flops_after: int
    params_dense: int
    params_after: int
    detail: dict[str, Any] = field(default_factory=dict)
    # What the unit's GEMM really multiplies, zero-weight padding included (channel
    # alignment's zero rows/columns, group tiles' padding); None: as flops_after/params_after.
    flops_kernel: int | None = None
    params_stored: int | None = None


class _UnionFind:
    def __init__(self):
        self.parent: dict[fx.Node, fx.Node] = {}
        self.full: set[fx.Node] = set()

    def find(self, x: fx.Node) -> fx.Node:
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[ra] = rb
            if ra in self.full:
                self.full.add(rb)

    def force_full(self, x: fx.Node) -> None:
        self.full.add(self.find(x))

    def is_full(self, x: fx.Node) -> bool:
        return self.find(x) in self.full


class Builder:
    # Leftover rows are packed 16 at a time (the smallest tensor-core tile) sharing the
    # union of their columns, so a leftover pack never exceeds the dense size of its rows.
    LEFTOVER_ROWS = 16

    def __init__(
        self,
        gm: fx.GraphModule,
        example: torch.Tensor,
        masks: dict[str, torch.Tensor],
        layouts: dict[str, list],
        *,
        mode: str,
        on_unstructured: str,
        dtype: torch.dtype | None,
        cost: CostModel,
        regroup: RegroupConfig | None = None,
    ):
        if mode not in MODES:
            raise ConvertError(f"mode must be one of {MODES}, got {mode!r}")
        if on_unstructured not in ON_UNSTRUCTURED:
            raise ConvertError(
                f"on_unstructured must be one of {ON_UNSTRUCTURED}, got {on_unstructured!r}"
            )
        self.gm, self.masks, self.layouts = gm, masks, layouts
        self.mode, self.on_unstructured, self.dtype, self.cost = mode, on_unstructured, dtype, cost
        self.regroup = regroup or RegroupConfig()
        self.modules = dict(gm.named_modules())
        try:
            ShapeProp(gm).propagate(example)
        except Exception as exc:
            cause = exc.__cause__ or exc
            raise ConvertError(
                f"the model does not run on an input of shape {tuple(example.shape)} "
                f"({type(cause).__name__}: {str(cause).splitlines()[0]}); pass input_size=(C, H, W)"
            ) from None
        self.sites = patterns.find_sites(gm, self.shape)
        self.site_of: dict[fx.Node, patterns.Site] = {n: s for s in self.sites for n in s.nodes}
        self.folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.choices: dict[str, Choice] = {}
        self.const: dict[fx.Node, torch.Tensor] = {}
        self.uf = _UnionFind()
        self.align_added: dict[fx.Node, int] = {}  # tied set (root) → channels added to align
        self.rows: list[LayerRow] = []
        self.notes: dict[str, int] = {"bn_folded": 0, "relu_fused": 0, "residual_fused": 0}

    # ------------------------------------------------------------------ helpers
    def shape(self, node) -> tuple[int, ...] | None:
        if not isinstance(node, fx.Node):
            return None
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def channel_tensor(self, node) -> bool:
        shape = self.shape(node)
        return shape is not None and len(shape) in (2, 4)

    def channels(self, node) -> int:
        return int(self.shape(node)[1])

    # ------------------------------------------------------------------ 1. fold + choose
    def fold(self, site: patterns.Site) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchNorm folded into the conv: (weight, bias) in float64."""
        if site.name in self.folded:
            return self.folded[site.name]
        conv: nn.Conv2d = self.modules[site.conv.target]
        w = conv.weight.detach().to(torch.float64)
        b = (conv.bias.detach().to(torch.float64) if conv.bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64))  # fmt: skip
        if site.bn is not None:
            bn: nn.BatchNorm2d = self.modules[site.bn.target]
            scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach().double()
            shift = -bn.running_mean.detach().double() * scale
            if bn.bias is not None:
                shift = shift + bn.bias.detach().double()
            w = w * scale.view(-1, 1, 1, 1)
            b = b * scale + shift
        self.folded[site.name] = (w, b)
        return w, b

    def choose(self, site: patterns.Site) -> Choice:
        conv: nn.Conv2d = self.modules[site.conv.target]
        mask = self.masks.get(f"{site.name}.weight")
        if conv.groups != 1:
            return Choice("torch", "grouped conv" if mask is None else mask_stats(mask).structure)
        structure = "dense" if mask is None else mask_stats(mask).structure
        if structure in ("dense", "empty"):
            return Choice("channel", structure)
        if self.mode == "channel" and structure == "channel":
            return Choice("channel", structure)
        if self.mode == "group" and structure in ("channel", "group"):
            return Choice("group", structure, self._layout(site, mask))
        if self.mode == "auto" and structure in ("channel", "group"):
            layout = self._layout(site, mask)
            if self._group_cost(site, layout) < self._channel_cost(site):
                return Choice("group", structure, layout)
            return Choice("channel", structure)
        # A structure the chosen mode cannot run: the unstructured policy decides.
        if self.on_unstructured == "dense":
            return Choice("channel", structure, note="masked dense (unstructured)")
        if self.on_unstructured == "regroup":
            new_mask, groups, _ = regroup_mask(mask, self.regroup, name=site.name)
            leftover_view = gemm_view(mask) & ~gemm_view(new_mask)
            leftover = _leftover_groups(leftover_view, self.LEFTOVER_ROWS)
            note = f"regrouped, {int(leftover_view.sum())} leftover nonzeros"
            layout = [g.as_dict() for g in groups]
            return Choice("group", structure, layout, leftover or None, note=note)
        return Choice("error", structure)

    def _layout(self, site: patterns.Site, mask: torch.Tensor) -> list[dict]:
        """The ticket's group layout if it still covers the mask; else read off the mask."""
        view = gemm_view(mask.bool())
        stored = self.layouts.get(site.name)
        if stored:
            covered = torch.zeros_like(view)
            for g in stored:
                covered[torch.tensor(g["rows"], dtype=torch.long)[:, None],
                        torch.tensor(g["cols"], dtype=torch.long)[None, :]] = True  # fmt: skip
            if not bool((view & ~covered).any()):
                return stored
        rows, cols = [], []
        patterns_, inverse = torch.unique(view, dim=0, return_inverse=True)
        for g in range(patterns_.shape[0]):
            members = torch.nonzero(inverse == g).flatten()
            if patterns_[g].any():
                rows.append(members.tolist())
                cols.append(torch.nonzero(patterns_[g]).flatten().tolist())
        return [{"rows": r, "cols": c} for r, c in zip(rows, cols, strict=True)]

    def _spatial(self, site: patterns.Site) -> int:
        shape = self.shape(site.conv)
        return int(shape[2] * shape[3])

    def _channel_cost(self, site: patterns.Site) -> float:
        w, _ = self.fold(site)
        nz = w != 0
        rows = int(nz.flatten(1).any(1).sum())
        ins = int(nz.any(dim=(0, 2, 3)).sum())
        return 2.0 * rows * ins * w.shape[2] * w.shape[3] * self._spatial(site)

    def _group_cost(self, site: patterns.Site, layout: list[dict]) -> float:
        bn, kp = self.cost.block_n, self.cost.k_pad
        padded = sum(math.ceil(len(g["rows"]) / bn) * bn * math.ceil(len(g["cols"]) / kp) * kp
                     for g in layout)  # fmt: skip
        return 2.0 * padded * self._spatial(site) * self.cost.group_overhead

    # ------------------------------------------------------------------ 2. constants
    def propagate_constants(self) -> None:
        for node in self.gm.graph.nodes:
            if not self.channel_tensor(node):
                continue
            c = self.channels(node)
            varying = torch.full((c,), float("nan"), dtype=torch.float64)
            site = self.site_of.get(node)
            if site is not None:
                self.const[node] = self._site_const(site) if node is site.out else varying
                continue
            inputs = [a for a in node.all_input_nodes if self.channel_tensor(a)]
            if not inputs:
                self.const[node] = varying
            elif patterns.is_unary(node, self.modules) or self._is_bn(node):
                self.const[node] = self._apply_unary(node, self.const[inputs[0]])
            elif (patterns.is_spatial(node, self.modules) or patterns.spatial_slice(node)
                  or patterns.flatten_keeps_channels(node, self.shape)):  # fmt: skip
                self.const[node] = self.const[inputs[0]].clone()
            elif (pad := patterns.channel_pad(node)) is not None:
                z = torch.zeros
                self.const[node] = torch.cat([z(pad[0], dtype=torch.float64), self.const[inputs[0]],
                                              z(pad[1], dtype=torch.float64)])  # fmt: skip
            elif (ops := patterns.add_operands(node)) is not None and all(
                self.channel_tensor(o) and self.shape(o) == self.shape(node) for o in ops
            ):
                self.const[node] = self.const[ops[0]] + self.const[ops[1]]
            else:
                self.const[node] = varying

    def _is_bn(self, node: fx.Node) -> bool:
        return node.op == "call_module" and type(self.modules[node.target]) is nn.BatchNorm2d

    def _apply_unary(self, node: fx.Node, const: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1) if len(self.shape(node)) == 4 else (1, -1)
        x = const.view(shape)
        with torch.no_grad():
            if self._is_bn(node):  # per-channel affine with running statistics
                bn = self.modules[node.target]
                y = (x - bn.running_mean.double().view(shape)) / torch.sqrt(
                    bn.running_var.double().view(shape) + bn.eps)  # fmt: skip
                if bn.weight is not None:
                    y = y * bn.weight.detach().double().view(
                        shape
                    ) + bn.bias.detach().double().view(shape)
            elif node.op == "call_module":
                y = self.modules[node.target](x)
            elif node.op == "call_function":
                y = node.target(x, *node.args[1:], **node.kwargs)
            else:
                y = getattr(x, node.target)(*node.args[1:], **node.kwargs)
        return y.reshape(-1).to(torch.float64)

    def _site_const(self, site: patterns.Site) -> torch.Tensor:
        w, b = self.fold(site)
        empty = ~(w != 0).flatten(1).any(1)
        value = b.clone()
        if site.residual is not None:
            value = value + self.const[site.residual]
        if site.relu is not None:
            value = torch.relu(value)  # relu(NaN) stays NaN
        return torch.where(empty, value, torch.full_like(value, float("nan")))

    # ------------------------------------------------------------------ 3. layouts
    def assign_layouts(self) -> None:
        uf = self.uf
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and self.channel_tensor(node):
                uf.force_full(node)
            if node.op == "output":
                for a in node.all_input_nodes:
                    if self.channel_tensor(a):
                        uf.force_full(a)
                continue
            site = self.site_of.get(node)
            if site is not None:
                if node is site.out:
                    choice = self.choices[site.name]
                    if site.residual is not None:
                        uf.union(site.out, site.residual)
                    if choice.kind in ("group", "torch"):
                        uf.force_full(site.out)
                        uf.force_full(site.conv.args[0])
                continue
            inputs = [a for a in node.all_input_nodes if self.channel_tensor(a)]
            if not inputs:
                if self.channel_tensor(node) and node.op != "placeholder":
                    uf.force_full(node)  # a tensor made from nothing we track
                continue
            if (patterns.is_unary(node, self.modules) or self._is_bn(node)
                    or patterns.is_spatial(node, self.modules) or patterns.spatial_slice(node)
                    or patterns.flatten_keeps_channels(node, self.shape)):  # fmt: skip
                uf.union(node, inputs[0])
            elif patterns.channel_pad(node) is not None:
                pass  # a Relayout maps any input layout to any output layout
            elif (ops := patterns.add_operands(node)) is not None and all(
                self.channel_tensor(o) and self.shape(o) == self.shape(node) for o in ops
            ):
                uf.union(node, ops[0])
                uf.union(node, ops[1])
            elif self._is_linear(node):
                pass  # folded into the new Linear
            elif patterns.is_shape_access(node):
                if patterns.shape_access_reads_channels(node):
                    uf.force_full(inputs[0])
            else:
                for a in inputs:
                    uf.force_full(a)
                if self.channel_tensor(node):
                    uf.force_full(node)
        varying_of: dict[fx.Node, torch.Tensor] = {}
        for node, const in self.const.items():
            root = uf.find(node)
            v = torch.isnan(const)
            varying_of[root] = v if root not in varying_of else varying_of[root] | v
        stored_of = self._align_layouts(varying_of)
        self.layout: dict[fx.Node, torch.Tensor] = {}
        for node, const in self.const.items():
            root = uf.find(node)
            if uf.is_full(node):
                self.layout[node] = torch.arange(const.numel())
            else:
                self.layout[node] = torch.nonzero(stored_of[root]).flatten()

    def _align_layouts(
        self, varying_of: dict[fx.Node, torch.Tensor]
    ) -> dict[fx.Node, torch.Tensor]:
        """The channels each tied set stores: its varying ones, and with ``channel_align``
        A > 1 as many channels constant in every tensor of the set as round the width up
        to a multiple of A, where the set has that many channels (a 3-channel image or a
        set whose channels all vary stays as it is). Constant channels some channel unit
        reads with a kept weight go first (stored, they are read through the weight
        instead of the bias map), then the lowest-numbered."""
        align = self.cost.channel_align
        if align <= 1:
            return varying_of
        usage: dict[fx.Node, torch.Tensor] = {}
        for site in self.sites:
            if self.choices[site.name].kind != "channel":
                continue
            w, _ = self.fold(site)
            root = self.uf.find(site.conv.args[0])
            used = (w != 0).any(dim=(0, 2, 3)).to(torch.int64)
            usage[root] = used if root not in usage else usage[root] + used
        stored_of = {}
        for root, varying in varying_of.items():
            width, channels = int(varying.sum()), varying.numel()
            target = -(-width // align) * align
            if self.uf.is_full(root) or target == width or target > channels:
                stored_of[root] = varying
                continue
            candidates = torch.nonzero(~varying).flatten()
            if root in usage:
                order = torch.argsort(-usage[root][candidates], stable=True)
                candidates = candidates[order]
            stored = varying.clone()
            stored[candidates[: target - width]] = True
            stored_of[root] = stored
            self.align_added[root] = target - width
        return stored_of

    def _is_linear(self, node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(self.modules[node.target], nn.Linear)

    # ------------------------------------------------------------------ 4. emission
    def build(self) -> fx.GraphModule:
        errors = []
        for site in self.sites:
            choice = self.choose(site)
            if choice.kind == "error":
                errors.append(f"{site.name} ({choice.structure})")
            self.choices[site.name] = choice
        if errors:
            raise ConvertError(
                f"layers whose masks mode={self.mode!r} cannot run: {listing(errors, 12)}; "
                "pass on_unstructured='dense' (masked dense conv) or 'regroup' (regroup them "
                "and keep the leftover nonzeros exact)"
            )
        self.propagate_constants()
        self.assign_layouts()
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        root: dict[str, Any] = {}
        counter = 0
        for node in self.gm.graph.nodes:
            site = self.site_of.get(node)
            if site is not None:
                if node is site.out:
                    unit = self._unit(site)
                    root[site.name] = unit
                    args = (env[site.conv.args[0]],)
                    if site.residual is not None:
                        args += (env[site.residual],)
                    env[node] = graph.call_module(site.name, args)
                continue
            if node.op == "get_attr":
                value = _fetch_attr(self.gm, node.target)
                if self.dtype is not None and torch.is_tensor(value) and value.is_floating_point():
                    value = value.to(self.dtype)
                root[node.target] = value
            if (pad := patterns.channel_pad(node)) is not None and self.channel_tensor(node):
                counter += 1
                name = f"relayout_{counter}"
                root[name] = self._relayout_pad(node, pad)
                env[node] = graph.call_module(name, (env[node.args[0]],))
                continue
            if self._is_linear(node):
                root[node.target] = self._linear(node)
                env[node] = graph.call_module(node.target, (env[node.args[0]],))
                continue
            if node.op == "call_module":
                module = self.modules[node.target]
                root[node.target] = module.to(self.dtype) if self.dtype is not None else module
            env[node] = graph.node_copy(node, lambda n: env[n])
        gm = fx.GraphModule(root, graph)
        gm.graph.lint()
        return gm.eval()

    def _positions(self, node: fx.Node, channels: torch.Tensor) -> torch.Tensor:
        """Positions of logical ``channels`` in ``node``'s physical layout."""
        where = torch.full((self.const[node].numel(),), -1, dtype=torch.long)
        layout = self.layout[node]
        where[layout] = torch.arange(layout.numel())
        pos = where[channels]
        assert bool((pos >= 0).all()), "a varying channel is missing from its layout"
        return pos

    def _unit(self, site: patterns.Site) -> nn.Module:
        choice = self.choices[site.name]
        conv: nn.Conv2d = self.modules[site.conv.target]
        w, b = self.fold(site)
        relu = site.relu is not None
        self.notes["bn_folded"] += site.bn is not None
        self.notes["relu_fused"] += relu
        self.notes["residual_fused"] += site.residual is not None
        geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
        dtype = self.dtype or conv.weight.dtype
        in_node, out_node = site.conv.args[0], site.out
        spatial = self._spatial(site)
        kh, kw = conv.kernel_size
        cout, cin = conv.out_channels, conv.in_channels
        row = LayerRow(site.name, "conv", choice.structure, choice.kind, cin, cout,
                       2 * cout * (cin // conv.groups) * kh * kw * spatial,
                       0, conv.weight.numel(), 0, {})  # fmt: skip
        if choice.note:
            row.detail["note"] = choice.note
        if choice.kind == "torch":
            unit = TorchConv2d(w.to(dtype), b.float(), groups=conv.groups, relu=relu,
                               name=site.name, **geometry)  # fmt: skip
            row.flops_after = row.flops_kernel = row.flops_dense
            row.params_after = int((w != 0).sum())
            row.params_stored = int(w.numel())
        elif choice.kind == "group":
            unit, row = self._group_unit(site, choice, w, b, relu, dtype, geometry, row)
        else:
            unit, row = self._channel_unit(
                site, w, b, relu, dtype, geometry, row, in_node, out_node
            )
        self.rows.append(row)
        return unit

    def _channel_unit(self, site, w, b, relu, dtype, geometry, row, in_node, out_node):
        nz = w != 0
        in_const = self.const[in_node]
        keep_in = nz.any(dim=(0, 2, 3))
        varying_in = torch.isnan(in_const)
        in_layout, out_layout = self.layout[in_node], self.layout[out_node]
        n_in_phys, n_out_phys = int(in_layout.numel()), int(out_layout.numel())
        # The layer's useful work: kept weights on varying inputs (what flops_after counts,
        # whatever the alignment), and the rows they reach.
        in_logical = torch.nonzero(keep_in & varying_in).flatten()
        reached = self._rows_reading(nz, in_logical)
        rows_logical = int(reached[out_layout].sum())
        # Input channels read. Without alignment: the varying kept ones (gathered unless
        # that is the whole layout); constant inputs go to the bias map. With alignment
        # the whole layout is read when the channels without a kept weight are few: zero
        # columns instead of a gather; stored constants then contribute through their
        # weights (exact: the stored value is the constant).
        read = in_logical
        align = self.cost.channel_align
        used = int(keep_in[in_layout].sum())  # stored inputs with a kept weight
        if (
            align > 1
            and n_in_phys > in_logical.numel()
            and _zero_padding_pays(n_in_phys, used, self.cost.max_zero_inputs)
        ):
            read = in_layout
        computes = self._rows_reading(nz, read)
        is_read = torch.zeros(w.shape[1], dtype=torch.bool)
        is_read[read] = True
        const_in = torch.nonzero(keep_in & ~varying_in & (in_const != 0) & ~is_read).flatten()
        in_pos = self._positions(in_node, read)
        identity_in = in_pos.numel() == n_in_phys and bool(
            (in_pos == torch.arange(n_in_phys)).all())  # fmt: skip
        # Output rows computed. With alignment every stored output channel becomes a GEMM
        # row (zero weights where no weight reaches it: its epilogue is bias + residual,
        # as a fill channel's) when those zero rows are few: no scatter, no fill tiles.
        n_computes = int(computes[out_layout].sum())
        if (
            align > 1
            and n_computes < n_out_phys
            and _zero_padding_pays(n_out_phys, n_computes, self.cost.max_zero_rows)
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
        in_shape = self.shape(in_node)
        unit = ChannelPrunedConv2d(plan, relu=relu, const_weight=const_weight,
                                   const_values=const_values, input_hw=tuple(in_shape[2:]),
                                   name=site.name)  # fmt: skip
        kh, kw = w.shape[2], w.shape[3]
        per_weight = 2 * kh * kw * self._spatial(site)
        row.flops_after = per_weight * rows_logical * int(in_logical.numel())
        row.params_after = rows_logical * int(in_logical.numel()) * kh * kw
        row.flops_kernel = per_weight * int(rows.numel()) * int(read.numel())
        row.params_stored = int(compact.numel())
        computed_all = rows_logical == w.shape[0] and in_logical.numel() == w.shape[1]
        row.representation = "dense" if computed_all else "channel"
        # 16-byte rows in the unit's dtype: 8 elements at fp16/bf16, 4 at fp32.
        per_16_bytes = max(1, 16 // torch.empty((), dtype=dtype).element_size())
        aligned = (plan.in_idx is None and plan.out_idx is None and n_in_phys % per_16_bytes == 0
                   and n_out_phys % per_16_bytes == 0)  # fmt: skip
        row.detail.update({
            "inputs_used": int(in_logical.numel()), "rows_computed": rows_logical,
            "input_width": n_in_phys, "output_width": n_out_phys,
            "stored_inputs_with_weights": used, "bias_map_channels": int(const_in.numel()),
            "input_gather": plan.in_idx is not None, "output_scatter": plan.out_idx is not None,
            "aligned": aligned,
        })  # fmt: skip
        return unit, row

    @staticmethod
    def _rows_reading(nz: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
        """Output rows with a kept weight on one of the logical input ``channels``."""
        if channels.numel() == 0:
            return torch.zeros(nz.shape[0], dtype=torch.bool)
        return nz[:, channels].flatten(1).any(1)

    def _group_unit(self, site, choice, w, b, relu, dtype, geometry, row):
        mask = self.masks.get(f"{site.name}.weight")
        keep = (w != 0) if mask is None else mask.bool()
        blocks = torch.zeros_like(gemm_view(keep))
        for g in choice.layout:
            blocks[torch.tensor(g["rows"])[:, None], torch.tensor(g["cols"])[None, :]] = True
        main_mask = from_gemm_view(blocks, tuple(w.shape)) & keep
        common = dict(stride=geometry["stride"], padding=geometry["padding"],
                      dilation=geometry["dilation"], name=site.name)  # fmt: skip
        blocking = {"block_n": self.cost.block_n, "k_pad": self.cost.k_pad}
        pack = GroupPack.from_weight(w, main_mask, choice.layout, b.float(), **blocking, **common)
        leftover = None
        if choice.leftover:
            left_mask = keep & ~from_gemm_view(blocks, tuple(w.shape))
            leftover = GroupPack.from_weight(w, left_mask, choice.leftover, None, block_n=16,
                                             k_pad=16, **common).to(dtype=dtype)  # fmt: skip
        unit = GroupSparseConv2d(pack.to(dtype=dtype), relu=relu, leftover=leftover, name=site.name)
        spatial = self._spatial(site)
        nnz_groups = sum(len(g["rows"]) * len(g["cols"]) for g in choice.layout)
        nnz_left = sum(len(g["rows"]) * len(g["cols"]) for g in (choice.leftover or []))
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

    def _relayout_pad(self, node: fx.Node, pad: tuple[int, int]) -> Relayout:
        src = node.args[0]
        out_layout = self.layout[node]
        src_where = torch.full((self.const[src].numel(),), -1, dtype=torch.long)
        src_layout = self.layout[src]
        src_where[src_layout] = torch.arange(src_layout.numel())
        logical_src = out_layout - pad[0]
        inside = (logical_src >= 0) & (logical_src < self.const[src].numel())
        index = torch.full_like(out_layout, -1)
        index[inside] = src_where[logical_src[inside]]
        fill = torch.nan_to_num(self.const[node][out_layout], nan=0.0)
        return Relayout(index, fill, name=str(node.name))

    def _linear(self, node: fx.Node) -> nn.Linear:
        old: nn.Linear = self.modules[node.target]
        src = node.args[0]
        layout = self.layout.get(src)
        c = old.in_features
        weight = old.weight.detach().double()
        bias = (old.bias.detach().double() if old.bias is not None
                else torch.zeros(old.out_features, dtype=torch.float64))  # fmt: skip
        dtype = self.dtype or old.weight.dtype
        mask = self.masks.get(f"{node.target}.weight")
        # A pruned Linear stays a dense Linear (its zeros kept): the structure is reported,
        # the FLOPs and parameters are those it runs with.
        structure = "dense" if mask is None else mask_stats(mask).structure
        row = LayerRow(node.target, "linear", structure, "linear", c, old.out_features,
                       2 * c * old.out_features, 0, old.weight.numel(), 0)  # fmt: skip
        if mask is not None:
            row.detail["kept_weights"] = int(mask.sum())
        if layout is None or layout.numel() == c:
            new = nn.Linear(c, old.out_features, bias=old.bias is not None)
            new.weight.data = old.weight.detach().to(dtype).clone()
            if old.bias is not None:
                new.bias.data = old.bias.detach().to(dtype).clone()
        else:
            removed = torch.ones(c, dtype=torch.bool)
            removed[layout] = False
            const = torch.nan_to_num(self.const[src], nan=0.0)
            folded = bias + weight[:, removed] @ const[removed]
            new = nn.Linear(int(layout.numel()), old.out_features)
            new.weight.data = weight[:, layout].to(dtype).contiguous()
            new.bias.data = folded.to(dtype)
        # Useful work without the channels stored only for alignment (zero-cost constants
        # folded into the bias at channel_align=1); the kernel figures include them.
        added = 0 if layout is None else self.align_added.get(self.uf.find(src), 0)
        row.flops_after = 2 * (new.in_features - added) * new.out_features
        row.params_after = (new.in_features - added) * new.out_features
        row.flops_kernel = 2 * new.in_features * new.out_features
        row.params_stored = new.weight.numel()
        row.detail["input_width"] = new.in_features
        self.rows.append(row)
        return new.eval()


def _leftover_groups(view: torch.Tensor, rows_per_group: int) -> list[dict]:
    """Rows holding leftover nonzeros, in chunks sharing the union of their columns."""
    rows = torch.nonzero(view.any(1)).flatten()
    groups = []
    for chunk in rows.split(rows_per_group):
        cols = torch.nonzero(view[chunk].any(0)).flatten()
        groups.append({"rows": chunk.tolist(), "cols": cols.tolist()})
    return groups


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
