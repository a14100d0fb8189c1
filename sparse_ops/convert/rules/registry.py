"""Which rule a node gets: the built-in rules in the order they are tried, rules
registered for custom module types (:func:`register_module_rule`), and the tracer that
keeps registered module types whole so their rule applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import fx, nn

from ..prepare import ConvertError
from .base import OPAQUE, Rule
from .channel_maps import Cat, ChannelPad, ChannelSlice
from .elementwise import Binary, CustomUnary, Unary
from .layers import BatchNorm, ConvSite, Linear
from .opaque import Passthrough, ShapeAccess
from .spatial import Flatten, Spatial, ZeroPad

if TYPE_CHECKING:
    from ..context import Context


CONV_SITE = ConvSite()

# Tried in this order; the first whose ``matches`` holds is the node's rule. The
# specific rules for an op come before the general ones naming the same op (a channel
# slice before an opaque getitem), and Passthrough last of all.
RULES: tuple[Rule, ...] = (
    Unary(),
    BatchNorm(),
    Spatial(),
    ZeroPad(),
    ChannelPad(),
    ChannelSlice(),
    Flatten(),
    Binary(),
    Cat(),
    Linear(),
    ShapeAccess(),
    Passthrough(),
)
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
