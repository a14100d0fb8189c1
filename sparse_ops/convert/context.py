"""The state the converter's passes share, and what they produce per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..layouts import GroupLayout
from ..structure.regroup import RegroupConfig
from . import patterns
from .cost import CostModel
from .prepare import ConvertError


@dataclass
class Choice:
    kind: str  # "channel", "group", "torch"
    structure: str
    layout: GroupLayout | None = None  # groups for a group unit
    leftover: GroupLayout | None = None  # one-row groups keeping a regrouped layer exact
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


class UnionFind:
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


def tensor_shape(node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for ``node``'s value, None if it is not one tensor."""
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


class Context:
    """What the converter's passes share.

    Read-only after tracing: the graph, its modules and shapes, the conv sites. Filled
    pass by pass: ``rule`` (the op kind of every node, decided once so no later pass can
    disagree), ``const`` (per channel tensor: each logical channel's constant value, NaN
    where it varies), ``uf`` (channel sets tied to one layout), ``layout`` (the logical
    channels each tensor stores, in order), ``choices`` and ``folded`` per conv site, and
    the output graph (``graph``, ``env``: old node → new node, ``root``: its modules and
    tensors)."""

    def __init__(
        self,
        gm: fx.GraphModule,
        masks: dict[str, torch.Tensor],
        stored_layouts: dict[str, list],
        *,
        mode: str,
        on_unstructured: str,
        dtype: torch.dtype | None,
        cost: CostModel,
        regroup: RegroupConfig | None,
    ):
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.masks, self.stored_layouts = masks, stored_layouts
        self.mode, self.on_unstructured, self.dtype, self.cost = mode, on_unstructured, dtype, cost
        self.regroup = regroup or RegroupConfig()
        self.sites = patterns.find_sites(gm, tensor_shape)
        self.site_of: dict[fx.Node, patterns.Site] = {n: s for s in self.sites for n in s.nodes}
        calls: dict[str, int] = {}
        for site in self.sites:
            calls[site.name] = calls.get(site.name, 0) + 1
        shared = sorted(name for name, count in calls.items() if count > 1)
        if shared:
            raise ConvertError(
                f"convs called more than once (shared weights): {', '.join(shared)}; each "
                "conv becomes one unit fused with what follows it, so each must be called "
                "once"
            )
        self.rule: dict[fx.Node, Any] = {}
        self.const: dict[fx.Node, torch.Tensor] = {}
        self.uf = UnionFind()
        self.layout: dict[fx.Node, torch.Tensor] = {}
        self.align_added: dict[fx.Node, int] = {}  # tied set (root) → constant channels added
        self.folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.choices: dict[str, Choice] = {}
        self.rows: list[LayerRow] = []
        self.notes: dict[str, int] = {"bn_folded": 0, "relu_fused": 0, "residual_fused": 0}
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.root: dict[str, Any] = {}
        # Every path the model has (modules, containers, attributes): names the converter
        # makes up must not take one, or a copy of that module would overwrite it.
        self.reserved: set[str] = set(self.modules)
        self.module_calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                self.reserved.add(node.target)
            elif node.op == "call_module":
                self.module_calls[node.target] = self.module_calls.get(node.target, 0) + 1

    # ---------------------------------------------------------------- graph facts
    shape = staticmethod(tensor_shape)

    def is_channel(self, node) -> bool:
        """Whether ``node`` is a tensor whose dim 1 the passes track as channels."""
        return isinstance(node, fx.Node) and node in self.const

    def channel_inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.is_channel(a)]

    def varying(self, node: fx.Node) -> torch.Tensor:
        return torch.full((int(self.shape(node)[1]),), float("nan"), dtype=torch.float64)

    def positions(self, node: fx.Node, channels: torch.Tensor) -> torch.Tensor:
        """Positions of logical ``channels`` in ``node``'s physical layout (−1: not stored)."""
        where = torch.full((self.const[node].numel(),), -1, dtype=torch.long)
        layout = self.layout[node]
        where[layout] = torch.arange(layout.numel())
        return where[channels]

    def is_full(self, node: fx.Node) -> bool:
        """Whether ``node`` stores every logical channel, in order."""
        return int(self.layout[node].numel()) == int(self.const[node].numel())

    def fold(self, site: patterns.Site) -> tuple[torch.Tensor, torch.Tensor]:
        """BatchNorm folded into the conv: (weight, bias) in float64."""
        if site.name in self.folded:
            return self.folded[site.name]
        conv: nn.Conv2d = self.modules[site.conv.target]
        w = conv.weight.detach().to(torch.float64)
        b = (
            conv.bias.detach().to(torch.float64)
            if conv.bias is not None
            else torch.zeros(w.shape[0], dtype=torch.float64)
        )
        if site.bn is not None:
            scale, shift = batchnorm_affine(self.modules[site.bn.target])
            w = w * scale.view(-1, 1, 1, 1)
            b = b * scale + shift
        self.folded[site.name] = (w, b)
        return w, b

    # ---------------------------------------------------------------- emission
    def cast(self, value):
        """A module or floating tensor in the conversion's dtype (unchanged without one)."""
        if self.dtype is None:
            return value
        if isinstance(value, nn.Module):
            return value.to(self.dtype)
        if torch.is_tensor(value) and value.is_floating_point():
            return value.to(self.dtype)
        return value

    def fresh_name(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``…: a name neither the model nor the output
        graph has."""
        name, k = base, 1
        while name in self.root or name in self.reserved:
            k += 1
            name = f"{base}_{k}"
        return name

    def own_name(self, node: fx.Node) -> str:
        """The name for a module replacing ``node``'s module: its path, unless the model
        calls that module at other places too (each call may be narrowed differently)."""
        if self.module_calls.get(node.target) == 1:
            return node.target
        return self.fresh_name(node.target)

    def call_module(self, name: str, module: nn.Module, args: tuple) -> fx.Node:
        self.root[name] = module
        return self.graph.call_module(name, args)

    def copy(self, node: fx.Node) -> fx.Node:
        """``node`` as it was, reading the new graph's values."""
        if node.op == "get_attr":
            self.root[node.target] = self.cast(fetch_attr(self.gm, node.target))
        elif node.op == "call_module":
            self.root[node.target] = self.cast(self.modules[node.target])
        return self.graph.node_copy(node, lambda n: self.env[n])


def batchnorm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x · scale + shift`` per channel, in float64."""
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
