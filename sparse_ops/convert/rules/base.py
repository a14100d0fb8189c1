"""The rule interface, the opaque rule every unknown op gets, and helpers the rule
modules share (the underscored names: for this package's rule modules only).

What a rule answers and why the opaque rule is the safe default: the ``rules`` package
docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import fx

if TYPE_CHECKING:
    from ..context import Context


def frozen(table: dict) -> Mapping:
    """A class-level table no instance can change by accident."""
    return MappingProxyType(table)


class Rule:
    """The opaque rule, and the interface of every other.

    ``functions``: table name → (callable, keyword parameters); ``methods``: method name →
    keyword parameters; ``modules``: type name → (module type, constructor arguments read
    back from an instance when saving). ``matches`` decides, beyond the op itself, whether
    the node's arguments are ones the rule understands (else the node is opaque).
    """

    kind = "opaque"
    functions: ClassVar[Mapping[str, tuple[Callable, tuple[str, ...]]]] = frozen({})
    methods: ClassVar[Mapping[str, tuple[str, ...]]] = frozen({})
    modules: ClassVar[Mapping[str, tuple[type, tuple[str, ...]]]] = frozen({})

    def calls_one_of_mine(self, node: fx.Node, ctx: Context) -> bool:
        if node.op == "call_function":
            return any(fn is node.target for fn, _ in self.functions.values())
        if node.op == "call_method":
            return node.target in self.methods
        if node.op == "call_module":
            return any(type(ctx.modules[node.target]) is t for t, _ in self.modules.values())
        return False

    def matches(self, node: fx.Node, ctx: Context) -> bool:
        return self.calls_one_of_mine(node, ctx) and self.understands(node, ctx)

    def understands(self, node: fx.Node, ctx: Context) -> bool:
        return True

    def constants(self, node: fx.Node, ctx: Context) -> torch.Tensor | None:
        shape = ctx.shape(node)
        return ctx.varying(node) if shape is not None and len(shape) in (2, 4) else None

    def tie(self, node: fx.Node, ctx: Context) -> None:
        for a in ctx.channel_inputs(node):
            ctx.uf.force_full(a)
        if ctx.is_channel(node):
            ctx.uf.force_full(node)

    def emit(self, node: fx.Node, ctx: Context) -> fx.Node | None:
        return ctx.copy(node)


OPAQUE = Rule()


def _first_channel_arg(node: fx.Node, ctx: Context) -> fx.Node | None:
    """The op's tensor argument (its first), when it is the only node among the arguments
    and a tracked channel tensor."""
    if not node.args or not ctx.is_channel(node.args[0]):
        return None
    others = [a for a in node.all_input_nodes if a is not node.args[0]]
    return None if others else node.args[0]


def _same_channels(node: fx.Node, source: fx.Node, ctx: Context) -> bool:
    shape, src = ctx.shape(node), ctx.shape(source)
    return shape is not None and len(shape) >= 2 and src is not None and shape[1] == src[1]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _as_per_channel(const: torch.Tensor, rank: int) -> torch.Tensor:
    return const.view((1, -1, 1, 1) if rank == 4 else (1, -1))


class _KeepsChannels(Rule):
    """An op reading one channel tensor and writing one of the same channels, each
    channel alone: input and output share a layout."""

    def understands(self, node, ctx):
        source = _first_channel_arg(node, ctx)
        return source is not None and _same_channels(node, source, ctx)

    def tie(self, node, ctx):
        ctx.uf.union(node, node.args[0])
