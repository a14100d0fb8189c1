"""Rules for ops whose output channels are input channels rearranged: zero channels
padded on (``ChannelPad``), a channel slice (``ChannelSlice``), a concatenation
(``Cat``). Input and output layouts are free; a ``Relayout`` bridges them where needed.
"""

from __future__ import annotations

import operator

import torch

from ...nn import Relayout
from .base import Rule, _arg, _first_channel_arg, frozen
from .spatial import ZeroPad, _constant_pads


class _ChannelMap(Rule):
    """Ops whose output channel j is one input channel (or a zero): the layouts on both
    sides are free, bridged by a ``Relayout`` (or the op itself, where both are full)."""

    def source_channels(self, node, ctx) -> torch.Tensor:
        """Per output channel: the logical input channel it copies, −1 for a zero."""
        raise NotImplementedError

    def constants(self, node, ctx):
        src = ctx.const[node.args[0]]
        index = self.source_channels(node, ctx)
        return torch.where(index >= 0, src[index.clamp(min=0)], torch.zeros_like(index).double())

    def tie(self, node, ctx):
        pass

    def emit(self, node, ctx):
        source = node.args[0]
        if ctx.is_full(node) and ctx.is_full(source):
            return ctx.copy(node)
        logical = self.source_channels(node, ctx)[ctx.layout[node]]
        index = torch.full_like(logical, -1)
        inside = logical >= 0
        index[inside] = ctx.positions(source, logical[inside])
        fill = torch.nan_to_num(ctx.const[node][ctx.layout[node]], nan=0.0)
        name = ctx.fresh_name(f"relayout_{node.name}")
        return ctx.call_module(name, Relayout(index, fill, name=str(node.name)), (ctx.env[source],))


class ChannelPad(_ChannelMap):
    """``F.pad(x, (0, 0, 0, 0, a, b))``: ``a`` zero channels before, ``b`` after (option-A
    shortcuts)."""

    kind = "channel-pad"
    functions = ZeroPad.functions

    def understands(self, node, ctx):
        pads = _constant_pads(node)
        return (
            pads is not None
            and len(pads) == 6
            and list(pads[:4]) == [0, 0, 0, 0]
            and min(pads[4:]) >= 0
            and _first_channel_arg(node, ctx) is not None
            and len(ctx.shape(node)) == 4
        )

    def source_channels(self, node, ctx):
        before = _constant_pads(node)[4]
        c_in = int(ctx.shape(node.args[0])[1])
        index = torch.arange(int(ctx.shape(node)[1])) - before
        return torch.where(index < c_in, index, torch.full_like(index, -1)).clamp(min=-1)


class ChannelSlice(_ChannelMap):
    """``x[:, a:b:s]`` (any trailing full slices): a channel subset."""

    kind = "channel-slice"
    functions = frozen({"operator.getitem": (operator.getitem, ())})

    def understands(self, node, ctx):
        if _first_channel_arg(node, ctx) is None or len(node.args) != 2:
            return False
        index = node.args[1]
        return (
            isinstance(index, tuple)
            and len(index) >= 2
            and index[0] == slice(None)
            and isinstance(index[1], slice)
            and index[1] != slice(None)
            and all(i == slice(None) for i in index[2:])
            and all(
                v is None or type(v) is int for v in (index[1].start, index[1].stop, index[1].step)
            )
        )

    def source_channels(self, node, ctx):
        c_in = int(ctx.shape(node.args[0])[1])
        return torch.arange(c_in)[node.args[1][1]]


class Cat(Rule):
    """``torch.cat`` along channels: the output's channels are its inputs', each input
    keeping its own layout; a ``Relayout`` after the concatenation where the output's
    layout is not their concatenation (alignment, ties of the output)."""

    kind = "cat"
    functions = frozen({"torch.cat": (torch.cat, ("tensors", "dim"))})

    def understands(self, node, ctx):
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        shape = ctx.shape(node)
        if shape is None or len(shape) not in (2, 4) or not isinstance(parts, list | tuple):
            return False
        dim = _arg(node, 1, "dim", 0)
        tracked = all(ctx.is_channel(p) and len(ctx.shape(p)) == len(shape) for p in parts)
        return isinstance(dim, int) and dim % len(shape) == 1 and len(parts) > 0 and tracked

    @staticmethod
    def parts(node):
        return list(node.args[0] if node.args else node.kwargs["tensors"])

    def constants(self, node, ctx):
        return torch.cat([ctx.const[p] for p in self.parts(node)])

    def tie(self, node, ctx):
        pass

    def emit(self, node, ctx):
        joined = ctx.copy(node)
        stored, offset = [], 0
        for p in self.parts(node):
            stored.append(ctx.layout[p] + offset)
            offset += int(ctx.const[p].numel())
        stored = torch.cat(stored)
        wanted = ctx.layout[node]
        if stored.numel() == wanted.numel() and bool((stored == wanted).all()):
            return joined
        where = torch.full((offset,), -1, dtype=torch.long)
        where[stored] = torch.arange(stored.numel())
        index = where[wanted]
        fill = torch.nan_to_num(ctx.const[node][wanted], nan=0.0)
        name = ctx.fresh_name(f"relayout_{node.name}")
        return ctx.call_module(name, Relayout(index, fill, name=str(node.name)), (joined,))
