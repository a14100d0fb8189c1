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

This package file only re-exports. ``base.py``: the interface and the opaque rule;
``elementwise.py``, ``spatial.py``, ``channel_maps.py``, ``layers.py``, ``opaque.py``:
the rules by op family; ``registry.py``: their order, custom module rules and the
tracer; ``allowlists.py``: the saved-graph tables.
"""

from __future__ import annotations

from .allowlists import FUNCTION_KWARGS, FUNCTIONS, METHOD_KWARGS, METHODS, TORCH_MODULES
from .base import OPAQUE, Rule, frozen
from .channel_maps import Cat, ChannelPad, ChannelSlice
from .elementwise import Binary, CustomUnary, Unary
from .layers import BatchNorm, ConvSite, Linear
from .opaque import Passthrough, ShapeAccess
from .registry import (
    CONV_SITE,
    RULES,
    Tracer,
    register_module_rule,
    rule_for,
    unregister_module_rule,
)
from .spatial import Flatten, Spatial, ZeroPad

__all__ = [
    "CONV_SITE",
    "FUNCTIONS",
    "FUNCTION_KWARGS",
    "METHODS",
    "METHOD_KWARGS",
    "OPAQUE",
    "RULES",
    "TORCH_MODULES",
    "BatchNorm",
    "Binary",
    "Cat",
    "ChannelPad",
    "ChannelSlice",
    "ConvSite",
    "CustomUnary",
    "Flatten",
    "Linear",
    "Passthrough",
    "Rule",
    "ShapeAccess",
    "Spatial",
    "Tracer",
    "Unary",
    "ZeroPad",
    "frozen",
    "register_module_rule",
    "rule_for",
    "unregister_module_rule",
]
