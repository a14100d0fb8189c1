"""One rule per kind of op: how it carries constant channels, ties layouts, and emits.

Every node of the traced graph gets exactly one rule, decided once (``rule_for``) before
the passes run, so the passes cannot disagree about what an op is. A rule answers
three questions, one per pass (``build.py``):

* ``constants(node, ctx)``: the value of each logical channel of the node's output where
  it is the same at every pixel of every input, NaN where it varies; None when the
  output is not a tensor whose dim 1 the converter tracks as channels.
* ``tie(node, ctx)``: which tensors must share one physical channel layout (union), and
  which must keep every channel (force full). A rule that ties nothing lets its input
  and output layouts differ and must bridge them when it emits (a ``Relayout``, a
  narrowed Linear or BatchNorm, a channel unit's gather and scatter).
* ``emit(node, ctx)``: the node's replacement in the converted graph, reading the new
  graph's values (``ctx.env``), which are stored in the layouts the tie pass made.

The base class is the *opaque* rule, the one any op nobody describes gets: its output
varies everywhere and every channel tensor it reads or writes keeps every channel, so
the narrowing is never visible to code that could notice it. Exactness rests on that:
only rules that know how an op treats dim 1 may tie layouts.

The ops the rules name are also the only ones a saved converted graph may call
(:data:`FUNCTIONS`, :data:`METHODS`, :data:`TORCH_MODULES`, read by ``serialize.py``):
adding an op is one entry in one rule. :func:`register_module_rule` tells the converter
how a custom module treats channels.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn import Relayout
from .context import batchnorm_affine
from .prepare import ConvertError

if TYPE_CHECKING:
    from .context import Context


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


# ---------------------------------------------------------------------- helpers
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


# ---------------------------------------------------------------------- the op kinds
class Unary(_KeepsChannels):
    """Elementwise functions of one tensor with no per-channel parameters: a constant
    channel stays constant, its value mapped through the same function."""

    kind = "unary"
    functions = frozen({
        "F.relu": (F.relu, ("input", "inplace")), "torch.relu": (torch.relu, ("input",)),
        "torch.relu_": (torch.relu_, ("input",)), "F.relu6": (F.relu6, ("input", "inplace")),
        "F.hardtanh": (F.hardtanh, ("input", "min_val", "max_val", "inplace")),
        "F.silu": (F.silu, ("input", "inplace")), "F.gelu": (F.gelu, ("input", "approximate")),
        "F.sigmoid": (F.sigmoid, ("input",)), "torch.sigmoid": (torch.sigmoid, ("input",)),
        "torch.tanh": (torch.tanh, ("input",)),
        "F.dropout": (F.dropout, ("input", "p", "training", "inplace")),
        "F.leaky_relu": (F.leaky_relu, ("input", "negative_slope", "inplace")),
        "F.elu": (F.elu, ("input", "alpha", "inplace")),
        "F.hardswish": (F.hardswish, ("input", "inplace")),
        "F.hardsigmoid": (F.hardsigmoid, ("input", "inplace")),
        "F.mish": (F.mish, ("input", "inplace")),
        "torch.sqrt": (torch.sqrt, ("input",)), "torch.rsqrt": (torch.rsqrt, ("input",)),
        "torch.exp": (torch.exp, ("input",)), "torch.abs": (torch.abs, ("input",)),
        "torch.neg": (torch.neg, ("input",)), "operator.neg": (operator.neg, ()),
        "torch.clamp": (torch.clamp, ("input", "min", "max")),
    })  # fmt: skip
    methods = frozen({"relu": (), "relu_": (), "sigmoid": (), "tanh": (), "contiguous": (),
                      "clamp": ("min", "max"), "clamp_": ("min", "max"), "float": (),
                      "sqrt": (), "rsqrt": (), "exp": (), "abs": (), "neg": ()})  # fmt: skip
    modules = frozen({
        "ReLU": (nn.ReLU, ("inplace",)), "ReLU6": (nn.ReLU6, ("inplace",)),
        "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")), "SiLU": (nn.SiLU, ()),
        "GELU": (nn.GELU, ("approximate",)), "Sigmoid": (nn.Sigmoid, ()), "Tanh": (nn.Tanh, ()),
        "Dropout": (nn.Dropout, ("p",)), "Identity": (nn.Identity, ()),
        "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)), "ELU": (nn.ELU, ("alpha",)),
        "Hardswish": (nn.Hardswish, ()), "Hardsigmoid": (nn.Hardsigmoid, ()),
        "Mish": (nn.Mish, ()), "Dropout2d": (nn.Dropout2d, ("p",)),
    })  # fmt: skip

    def understands(self, node, ctx):
        if not super().understands(node, ctx):
            return False
        # A module is evaluated on the constants as module(c): it must be called so.
        return node.op != "call_module" or (len(node.args) == 1 and not node.kwargs)

    def constants(self, node, ctx):
        source = node.args[0]
        x = _as_per_channel(ctx.const[source].clone(), len(ctx.shape(source)))
        with torch.no_grad():
            if node.op == "call_module":
                y = ctx.modules[node.target](x)
            elif node.op == "call_function":
                y = node.target(x, *node.args[1:], **node.kwargs)
            else:
                y = getattr(x, node.target)(*node.args[1:], **node.kwargs)
        return y.reshape(-1).to(torch.float64)  # NaN (varying) maps to NaN


class CustomUnary(Unary):
    """A registered module applied per element (see :func:`register_module_rule`)."""

    functions = methods = modules = frozen({})


class BatchNorm(_KeepsChannels):
    """Eval-mode BatchNorm not folded into a conv (pre-activation blocks, after an add): a
    per-channel affine map, emitted narrowed to its input's layout."""

    kind = "batchnorm"
    _config = ("num_features", "eps", "momentum", "affine", "track_running_stats")
    modules = frozen(
        {"BatchNorm2d": (nn.BatchNorm2d, _config), "BatchNorm1d": (nn.BatchNorm1d, _config)}
    )

    def understands(self, node, ctx):
        bn = ctx.modules[node.target]
        rank = len(ctx.shape(node) or ())
        expected = 4 if isinstance(bn, nn.BatchNorm2d) else 2
        return bn.running_mean is not None and rank == expected and super().understands(node, ctx)

    def constants(self, node, ctx):
        scale, shift = batchnorm_affine(ctx.modules[node.target])
        return ctx.const[node.args[0]] * scale + shift

    def emit(self, node, ctx):
        bn = ctx.modules[node.target]
        if ctx.is_full(node):
            return ctx.copy(node)
        keep = ctx.layout[node]
        narrow = type(bn)(int(keep.numel()), eps=bn.eps, momentum=bn.momentum, affine=bn.affine)
        state = {k: (v[keep] if v.dim() == 1 else v) for k, v in bn.state_dict().items()}
        narrow.load_state_dict(state)
        return ctx.call_module(ctx.own_name(node), ctx.cast(narrow.eval()),
                               (ctx.env[node.args[0]],))  # fmt: skip


class Spatial(_KeepsChannels):
    """Pooling, resampling, spatial slicing and spatial means: each channel on its own,
    and a constant channel stays that constant (a window of equal values averages,
    maxes and interpolates to the value)."""

    kind = "spatial"
    _pool_max = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    _pool_avg = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")  # fmt: skip
    _resample = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")
    functions = frozen({
        "F.max_pool2d": (F.max_pool2d, ("input", *_pool_max)),
        "F.avg_pool2d": (F.avg_pool2d, ("input", *_pool_avg)),
        "F.adaptive_avg_pool2d": (F.adaptive_avg_pool2d, ("input", "output_size")),
        "F.adaptive_max_pool2d": (F.adaptive_max_pool2d,
                                  ("input", "output_size", "return_indices")),
        "F.interpolate": (F.interpolate, ("input", *_resample, "antialias")),
        "torch.mean": (torch.mean, ("input", "dim", "keepdim", "dtype")),
        "torch.amax": (torch.amax, ("input", "dim", "keepdim")),
        "operator.getitem": (operator.getitem, ()),
    })  # fmt: skip
    methods = frozen({"mean": ("dim", "keepdim", "dtype"), "amax": ("dim", "keepdim")})
    modules = frozen({
        "MaxPool2d": (nn.MaxPool2d, _pool_max), "AvgPool2d": (nn.AvgPool2d, _pool_avg),
        "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
        "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
        "Upsample": (nn.Upsample, _resample),
    })  # fmt: skip

    def understands(self, node, ctx):
        if not super().understands(node, ctx) or len(ctx.shape(node.args[0])) != 4:
            return False
        if node.op == "call_function" and node.target is operator.getitem:
            index = node.args[1]
            return (isinstance(index, tuple) and len(index) >= 2 and index[1] == slice(None)
                    and all(isinstance(i, slice) for i in index))  # fmt: skip
        reductions = {("call_function", torch.mean), ("call_function", torch.amax),
                      ("call_method", "mean"), ("call_method", "amax")}  # fmt: skip
        if (node.op, node.target) in reductions:
            dims = _arg(node, 1, "dim")
            dims = [dims] if isinstance(dims, int) else dims
            return (
                isinstance(dims, list | tuple)
                and len(dims) > 0
                and all(isinstance(d, int) and d % 4 in (2, 3) for d in dims)
            )
        return True

    def constants(self, node, ctx):
        const = ctx.const[node.args[0]].clone()
        if self._pads_with_zeros(node, ctx):
            # Zero padding counted in the average: near the border a nonzero constant
            # channel varies; a zero one stays zero.
            const = torch.where(const == 0, const, torch.full_like(const, float("nan")))
        return const

    @staticmethod
    def _pads_with_zeros(node, ctx) -> bool:
        if node.op == "call_module" and type(ctx.modules[node.target]) is nn.AvgPool2d:
            pool = ctx.modules[node.target]
            padding, include, divisor = pool.padding, pool.count_include_pad, pool.divisor_override
        elif node.target is F.avg_pool2d:
            padding = _arg(node, 3, "padding", 0)
            include = _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override")
        else:
            return False
        padded = padding not in (0, (0, 0), [0, 0])
        return divisor is not None or (padded and include)


class ZeroPad(_KeepsChannels):
    """``F.pad`` with zeros on the spatial sides only: zero channels stay zero."""

    kind = "zero-pad"
    functions = frozen({"F.pad": (F.pad, ("input", "pad", "mode", "value"))})

    def understands(self, node, ctx):
        pads = _constant_pads(node)
        spatial_only = pads is not None and (len(pads) == 4 or list(pads[4:6]) == [0, 0])
        return spatial_only and super().understands(node, ctx) and len(ctx.shape(node)) == 4

    def constants(self, node, ctx):
        const = ctx.const[node.args[0]].clone()
        return torch.where(const == 0, const, torch.full_like(const, float("nan")))


def _constant_pads(node: fx.Node) -> tuple[int, ...] | None:
    """The pad amounts of an ``F.pad`` with zeros of 4 or 6 ints, else None."""
    pads = _arg(node, 1, "pad")
    mode = _arg(node, 2, "mode", "constant")
    value = _arg(node, 3, "value", 0.0)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pads, list | tuple):
        return None
    if len(pads) not in (4, 6) or not all(type(p) is int for p in pads):
        return None
    return tuple(pads)


class Flatten(_KeepsChannels):
    """``[N, C, 1, 1] → [N, C]`` (flatten from dim 1, or view/reshape to ``(N, -1)``):
    channels stay channels."""

    kind = "flatten"
    functions = frozen({"torch.flatten": (torch.flatten, ("input", "start_dim", "end_dim"))})
    methods = frozen(
        {"flatten": ("start_dim", "end_dim"), "view": ("dtype",), "reshape": ("shape",)}
    )
    modules = frozen({"Flatten": (nn.Flatten, ("start_dim", "end_dim"))})

    def understands(self, node, ctx):
        source = node.args[0] if node.args else None
        shape, src = ctx.shape(node), ctx.shape(source)
        if not ctx.is_channel(source) or shape is None or src is None:
            return False
        if len(src) != 4 or tuple(src[2:]) != (1, 1) or tuple(shape) != tuple(src[:2]):
            return False
        if node.op == "call_method" and node.target in ("view", "reshape"):
            # The new shape must leave the channel count to torch (-1): a literal C
            # would not survive narrowing. Its batch size may come from x.size(0).
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
                sizes = tuple(sizes[0])
            return len(sizes) == 2 and sizes[1] == -1 and not node.kwargs
        if node.op == "call_module":
            flatten = ctx.modules[node.target]
            return flatten.start_dim in (1, -3) and flatten.end_dim in (-1, 3)
        start = _arg(node, 1, "start_dim", 0)
        end = _arg(node, 2, "end_dim", -1)
        return start in (1, -3) and end in (-1, 3)

    def constants(self, node, ctx):
        return ctx.const[node.args[0]].clone()

    def tie(self, node, ctx):
        ctx.uf.union(node, node.args[0])  # a batch size read by x.size(0) is its own node


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
        return ctx.call_module(name, Relayout(index, fill, name=str(node.name)),
                               (ctx.env[source],))  # fmt: skip


class ChannelPad(_ChannelMap):
    """``F.pad(x, (0, 0, 0, 0, a, b))``: ``a`` zero channels before, ``b`` after (option-A
    shortcuts)."""

    kind = "channel-pad"
    functions = ZeroPad.functions

    def understands(self, node, ctx):
        pads = _constant_pads(node)
        return (pads is not None and len(pads) == 6 and list(pads[:4]) == [0, 0, 0, 0]
                and min(pads[4:]) >= 0 and _first_channel_arg(node, ctx) is not None
                and len(ctx.shape(node)) == 4)  # fmt: skip

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
        return (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None)
                and isinstance(index[1], slice) and index[1] != slice(None)
                and all(i == slice(None) for i in index[2:])
                and all(v is None or type(v) is int for v in
                        (index[1].start, index[1].stop, index[1].step)))  # fmt: skip

    def source_channels(self, node, ctx):
        c_in = int(ctx.shape(node.args[0])[1])
        return torch.arange(c_in)[node.args[1][1]]


class Binary(Rule):
    """``a ∘ b`` for ∘ in + − × ÷: two channel tensors of equal channel count (broadcast
    over the other dims, e.g. a squeeze-excitation gate ``x * s``) share one layout; a
    channel tensor and a number act as a unary op."""

    kind = "elementwise"
    functions = frozen({
        "operator.add": (operator.add, ()), "operator.iadd": (operator.iadd, ()),
        "operator.sub": (operator.sub, ()), "operator.mul": (operator.mul, ()),
        "operator.imul": (operator.imul, ()), "operator.truediv": (operator.truediv, ()),
        "torch.add": (torch.add, ("input", "other", "alpha")),
        "torch.sub": (torch.sub, ("input", "other", "alpha")),
        "torch.mul": (torch.mul, ("input", "other")),
        "torch.div": (torch.div, ("input", "other", "rounding_mode")),
        "operator.pow": (operator.pow, ()), "torch.pow": (torch.pow, ("input", "exponent")),
    })  # fmt: skip
    methods = frozen(
        {
            "add": ("other", "alpha"),
            "add_": ("other", "alpha"),
            "mul": ("other",),
            "mul_": ("other",),
            "sub": ("other", "alpha"),
            "div": ("other", "rounding_mode"),
            "pow": ("exponent",),
        }
    )
    _OPS = frozen({
        operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add,
        "add": operator.add, "add_": operator.add, operator.sub: operator.sub,
        torch.sub: operator.sub, "sub": operator.sub, operator.mul: operator.mul,
        operator.imul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
        "mul_": operator.mul, operator.truediv: operator.truediv, torch.div: operator.truediv,
        "div": operator.truediv, operator.pow: operator.pow, torch.pow: operator.pow,
        "pow": operator.pow,
    })  # fmt: skip

    def understands(self, node, ctx):
        if node.kwargs or len(node.args) != 2:
            return False
        a, b = node.args
        shape = ctx.shape(node)
        if shape is None or len(shape) not in (2, 4):
            return False
        tensors = [x for x in (a, b) if isinstance(x, fx.Node)]
        numbers = [x for x in (a, b) if type(x) in (int, float)]
        if len(tensors) + len(numbers) != 2 or not tensors:
            return False
        return all(
            ctx.is_channel(t) and len(ctx.shape(t)) == len(shape) and _same_channels(node, t, ctx)
            for t in tensors
        )

    def constants(self, node, ctx):
        a, b = (ctx.const[x] if isinstance(x, fx.Node) else float(x) for x in node.args)
        op = self._OPS[node.target]
        value = op(a, b)
        if op is operator.mul:
            # 0 × anything finite is 0, even where the other operand varies.
            zero = (torch.as_tensor(a) == 0) | (torch.as_tensor(b) == 0)
            value = torch.where(zero, torch.zeros_like(value), value)
        return value.to(torch.float64)

    def tie(self, node, ctx):
        for x in node.args:
            if isinstance(x, fx.Node):
                ctx.uf.union(node, x)


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


class Linear(Rule):
    """``nn.Linear`` on ``[N, C]``: narrowed to the layout it reads, the constant input
    channels folded into its bias. On other ranks (a Linear over NHWC channels) opaque."""

    kind = "linear"
    modules = frozen({"Linear": (nn.Linear, ("in_features", "out_features"))})

    def understands(self, node, ctx):
        return len(node.args) == 1 and not node.kwargs

    def narrows(self, node, ctx) -> bool:
        source = _first_channel_arg(node, ctx)
        return source is not None and len(ctx.shape(source)) == 2

    def tie(self, node, ctx):
        if not self.narrows(node, ctx):
            super().tie(node, ctx)

    def emit(self, node, ctx):
        from .units import linear_unit

        module = linear_unit(ctx, node, narrow=self.narrows(node, ctx))
        return ctx.call_module(ctx.own_name(node), module, (ctx.env[node.args[0]],))


class ShapeAccess(Rule):
    """``x.shape`` / ``x.size(d)``: the tensor keeps every channel only if code reads its
    channel count."""

    kind = "shape"
    functions = frozen({"builtins.getattr": (getattr, ())})
    methods = frozen({"size": ("dim",)})

    def understands(self, node, ctx):
        if node.op == "call_function":
            return len(node.args) == 2 and node.args[1] in ("shape", "ndim", "dtype", "device")
        return True

    def constants(self, node, ctx):
        return None

    def tie(self, node, ctx):
        source = node.args[0]
        if ctx.is_channel(source) and self._reads_channels(node, len(ctx.shape(source))):
            ctx.uf.force_full(source)

    @staticmethod
    def _reads_channels(node: fx.Node, rank: int) -> bool:
        if node.op == "call_method":
            dim = _arg(node, 1, "dim")
            return not isinstance(dim, int) or dim % rank == 1
        if node.args[1] != "shape":
            return False
        for user in node.users:
            index = user.args[1] if len(user.args) > 1 else None
            if not (user.op == "call_function" and user.target is operator.getitem
                    and isinstance(index, int) and index % rank != 1):  # fmt: skip
                return True
        return False


class Passthrough(Rule):
    """Ops known to mix channels or move the channel axis (permutes, reshapes, channel
    LayerNorm, splits, matmuls): opaque, and saved like any other."""

    kind = "opaque (known)"
    functions = frozen({
        "torch.permute": (torch.permute, ("input", "dims")),
        "torch.transpose": (torch.transpose, ("input", "dim0", "dim1")),
        "torch.reshape": (torch.reshape, ("input", "shape")),
        "torch.chunk": (torch.chunk, ("input", "chunks", "dim")),
        "torch.split": (torch.split, ("tensor", "split_size_or_sections", "dim")),
        "torch.matmul": (torch.matmul, ("input", "other")),
        "torch.sum": (torch.sum, ("input", "dim", "keepdim", "dtype")),
        "torch.softmax": (torch.softmax, ("input", "dim", "dtype")),
        "F.softmax": (F.softmax, ("input", "dim", "dtype")),
        "F.layer_norm": (F.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps")),
        "F.group_norm": (F.group_norm, ("input", "num_groups", "weight", "bias", "eps")),
        "torch.cat": Cat.functions["torch.cat"], "torch.flatten": Flatten.functions[
            "torch.flatten"], "operator.getitem": (operator.getitem, ()),
        "torch.mean": Spatial.functions["torch.mean"], "F.pad": ZeroPad.functions["F.pad"],
        "F.avg_pool2d": Spatial.functions["F.avg_pool2d"],
        "operator.floordiv": (operator.floordiv, ()),  # channels // groups in a shuffle
        "torch.stack": (torch.stack, ("tensors", "dim")),
        "F.linear": (F.linear, ("input", "weight", "bias")),
    })  # fmt: skip
    methods = frozen({
        "permute": ("dims",), "transpose": ("dim0", "dim1"), "view": ("dtype",),
        "reshape": ("shape",), "chunk": ("chunks", "dim"), "split": ("split_size", "dim"),
        "flatten": ("start_dim", "end_dim"), "mean": ("dim", "keepdim", "dtype"),
        "sum": ("dim", "keepdim", "dtype"), "squeeze": ("dim",), "unsqueeze": ("dim",),
        "expand_as": ("other",), "softmax": ("dim", "dtype"),
    })  # fmt: skip
    modules = frozen({
        "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine")),
        "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine")),
        "ChannelShuffle": (nn.ChannelShuffle, ("groups",)),
        "Softmax": (nn.Softmax, ("dim",)), "Flatten": Flatten.modules["Flatten"],
        "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                               "dilation", "groups", "padding_mode")),
        "AvgPool2d": Spatial.modules["AvgPool2d"],
        "InstanceNorm2d": (nn.InstanceNorm2d, ("num_features", "eps", "momentum", "affine",
                                               "track_running_stats")),
        "LocalResponseNorm": (nn.LocalResponseNorm, ("size", "alpha", "beta", "k")),
        "PixelShuffle": (nn.PixelShuffle, ("upscale_factor",)),
    })  # fmt: skip


class ConvSite(Rule):
    """A conv and what is fused into it (``patterns.Site``): the whole chain becomes one
    unit at its last node; the others emit nothing (nothing else reads them)."""

    kind = "conv"

    def constants(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return ctx.varying(node)
        from .units import site_constants

        return site_constants(ctx, site)

    def tie(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return
        if site.residual is not None:
            ctx.uf.union(site.out, site.residual)
        if ctx.choices[site.name].kind in ("group", "torch"):
            ctx.uf.force_full(site.out)
            ctx.uf.force_full(site.conv.args[0])

    def emit(self, node, ctx):
        site = ctx.site_of[node]
        if node is not site.out:
            return None
        from .units import conv_unit

        args = (ctx.env[site.conv.args[0]],)
        if site.residual is not None:
            args += (ctx.env[site.residual],)
        return ctx.call_module(site.name, conv_unit(ctx, site), args)


CONV_SITE = ConvSite()

# Tried in this order; the first whose ``matches`` holds is the node's rule. The
# specific rules for an op come before the general ones naming the same op (a channel
# slice before an opaque getitem), and Passthrough last of all.
RULES: tuple[Rule, ...] = (Unary(), BatchNorm(), Spatial(), ZeroPad(), ChannelPad(),
                           ChannelSlice(), Flatten(), Binary(), Cat(), Linear(),
                           ShapeAccess(), Passthrough())  # fmt: skip
_RULE_NAMES = {"unary": CustomUnary(), "spatial": Spatial(), "opaque": OPAQUE}
_CUSTOM: dict[type, Rule] = {}


def register_module_rule(module_type: type[nn.Module], rule: str | Rule) -> None:
    """Tell the converter how a custom module treats channels.

    ``rule``: ``"unary"`` (elementwise, each channel alone, no per-channel parameters:
    a constant channel ``c`` becomes ``module(c)``), ``"spatial"`` (each channel alone,
    and a channel constant over the image stays that constant: a pooling), ``"opaque"``
    (the default for any module the converter does not know: its input and output keep
    every channel), or a :class:`Rule` instance. Applies to modules of exactly that type
    (not subclasses), which tracing then keeps whole instead of tracing into them (so a
    module torch.fx cannot trace converts once registered, as ``"opaque"`` at least).
    Custom modules convert, but a converted module holding one cannot be saved (loading
    must never build types named by a file).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise ConvertError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if isinstance(rule, str):
        if rule not in _RULE_NAMES:
            raise ConvertError(f"rule must be one of {sorted(_RULE_NAMES)} or a Rule, got {rule!r}")
        rule = _RULE_NAMES[rule]
    if not isinstance(rule, Rule):
        raise ConvertError(f"rule must be a name or a Rule instance, got {type(rule).__name__}")
    _CUSTOM[module_type] = rule


def unregister_module_rule(module_type: type[nn.Module]) -> None:
    _CUSTOM.pop(module_type, None)


class Tracer(fx.Tracer):
    """torch.fx's tracer, keeping registered module types whole (fx would otherwise trace
    into them: only ``torch.nn`` modules are leaves), so their rule applies; a module
    fx cannot trace into converts once registered as ``"opaque"``."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in _CUSTOM or super().is_leaf_module(m, module_qualified_name)


def rule_for(node: fx.Node, ctx: Context) -> Rule:
    if node in ctx.site_of:
        return CONV_SITE
    if node.op == "call_module" and type(ctx.modules[node.target]) in _CUSTOM:
        rule = _CUSTOM[type(ctx.modules[node.target])]
        return rule if rule.understands(node, ctx) else OPAQUE
    for rule in RULES:
        if rule.matches(node, ctx):
            return rule
    return OPAQUE


# ---------------------------------------------------------------------- saved-graph tables
def _tables():
    functions: dict[str, tuple[Callable, frozenset[str]]] = {}
    methods: dict[str, frozenset[str]] = {}
    modules: dict[str, tuple[type, tuple[str, ...]]] = {}
    for rule in RULES:
        for name, (fn, keys) in rule.functions.items():
            assert functions.get(name, (fn,))[0] is fn, name
            functions[name] = (fn, functions.get(name, (fn, frozenset()))[1] | frozenset(keys))
        for name, keys in rule.methods.items():
            methods[name] = methods.get(name, frozenset()) | frozenset(keys)
        for name, entry in rule.modules.items():
            assert modules.get(name, entry) == entry, name
            modules[name] = entry
    return functions, methods, modules


_FUNCTION_TABLE, METHOD_KWARGS, TORCH_MODULES = _tables()
FUNCTIONS: dict[str, Callable] = {name: fn for name, (fn, _) in _FUNCTION_TABLE.items()}
FUNCTION_KWARGS: dict[str, frozenset[str]] = {n: keys for n, (_, keys) in _FUNCTION_TABLE.items()}
METHODS = frozenset(METHOD_KWARGS)
