"""Rules for elementwise ops: one tensor through a function (``Unary``, and registered
``"unary"`` modules), or two operands combined (``Binary``). Each output channel depends
on the same channel of the inputs only, so input and output share one layout.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import Rule, _as_per_channel, _KeepsChannels, _same_channels, frozen


class Unary(_KeepsChannels):
    """Elementwise functions of one tensor with no per-channel parameters: a constant
    channel stays constant, its value mapped through the same function."""

    kind = "unary"
    functions = frozen(
        {
            "F.relu": (F.relu, ("input", "inplace")),
            "torch.relu": (torch.relu, ("input",)),
            "torch.relu_": (torch.relu_, ("input",)),
            "F.relu6": (F.relu6, ("input", "inplace")),
            "F.hardtanh": (F.hardtanh, ("input", "min_val", "max_val", "inplace")),
            "F.silu": (F.silu, ("input", "inplace")),
            "F.gelu": (F.gelu, ("input", "approximate")),
            "F.sigmoid": (F.sigmoid, ("input",)),
            "torch.sigmoid": (torch.sigmoid, ("input",)),
            "torch.tanh": (torch.tanh, ("input",)),
            "F.dropout": (F.dropout, ("input", "p", "training", "inplace")),
            "F.leaky_relu": (F.leaky_relu, ("input", "negative_slope", "inplace")),
            "F.elu": (F.elu, ("input", "alpha", "inplace")),
            "F.hardswish": (F.hardswish, ("input", "inplace")),
            "F.hardsigmoid": (F.hardsigmoid, ("input", "inplace")),
            "F.mish": (F.mish, ("input", "inplace")),
            "torch.sqrt": (torch.sqrt, ("input",)),
            "torch.rsqrt": (torch.rsqrt, ("input",)),
            "torch.exp": (torch.exp, ("input",)),
            "torch.abs": (torch.abs, ("input",)),
            "torch.neg": (torch.neg, ("input",)),
            "operator.neg": (operator.neg, ()),
            "torch.clamp": (torch.clamp, ("input", "min", "max")),
        }
    )
    methods = frozen(
        {
            "relu": (),
            "relu_": (),
            "sigmoid": (),
            "tanh": (),
            "contiguous": (),
            "clamp": ("min", "max"),
            "clamp_": ("min", "max"),
            "float": (),
            "sqrt": (),
            "rsqrt": (),
            "exp": (),
            "abs": (),
            "neg": (),
        }
    )
    modules = frozen(
        {
            "ReLU": (nn.ReLU, ("inplace",)),
            "ReLU6": (nn.ReLU6, ("inplace",)),
            "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
            "SiLU": (nn.SiLU, ()),
            "GELU": (nn.GELU, ("approximate",)),
            "Sigmoid": (nn.Sigmoid, ()),
            "Tanh": (nn.Tanh, ()),
            "Dropout": (nn.Dropout, ("p",)),
            "Identity": (nn.Identity, ()),
            "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
            "ELU": (nn.ELU, ("alpha",)),
            "Hardswish": (nn.Hardswish, ()),
            "Hardsigmoid": (nn.Hardsigmoid, ()),
            "Mish": (nn.Mish, ()),
            "Dropout2d": (nn.Dropout2d, ("p",)),
        }
    )

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


class Binary(Rule):
    """``a ∘ b`` for ∘ in + − × ÷: two channel tensors of equal channel count (broadcast
    over the other dims, e.g. a squeeze-excitation gate ``x * s``) share one layout; a
    channel tensor and a number act as a unary op."""

    kind = "elementwise"
    functions = frozen(
        {
            "operator.add": (operator.add, ()),
            "operator.iadd": (operator.iadd, ()),
            "operator.sub": (operator.sub, ()),
            "operator.mul": (operator.mul, ()),
            "operator.imul": (operator.imul, ()),
            "operator.truediv": (operator.truediv, ()),
            "torch.add": (torch.add, ("input", "other", "alpha")),
            "torch.sub": (torch.sub, ("input", "other", "alpha")),
            "torch.mul": (torch.mul, ("input", "other")),
            "torch.div": (torch.div, ("input", "other", "rounding_mode")),
            "operator.pow": (operator.pow, ()),
            "torch.pow": (torch.pow, ("input", "exponent")),
        }
    )
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
    _OPS = frozen(
        {
            operator.add: operator.add,
            operator.iadd: operator.add,
            torch.add: operator.add,
            "add": operator.add,
            "add_": operator.add,
            operator.sub: operator.sub,
            torch.sub: operator.sub,
            "sub": operator.sub,
            operator.mul: operator.mul,
            operator.imul: operator.mul,
            torch.mul: operator.mul,
            "mul": operator.mul,
            "mul_": operator.mul,
            operator.truediv: operator.truediv,
            torch.div: operator.truediv,
            "div": operator.truediv,
            operator.pow: operator.pow,
            torch.pow: operator.pow,
            "pow": operator.pow,
        }
    )

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
