"""The conv chains the converter fuses into one unit (every other op: ``rules.py``).

A *site* is a Conv2d and what its output flows into alone: an optional BatchNorm2d
(folded), then either a ReLU, or a residual add with an optional ReLU after it. Each
link must be the previous node's only user, so nothing else observes the intermediate
values the fused unit no longer produces.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in RELU_FUNCTIONS:
        return True
    if node.op == "call_module" and type(modules[node.target]) is nn.ReLU:
        return True
    return node.op == "call_method" and node.target in ("relu", "relu_")


def add_operands(node: fx.Node) -> tuple | None:
    """``(a, b)`` if ``node`` is a plain ``a + b`` of two tensors, else None."""
    plain_call = node.op == "call_function" and node.target in ADD_FUNCTIONS
    method_call = node.op == "call_method" and node.target in ("add", "add_")
    if (plain_call or method_call) and not node.kwargs and len(node.args) == 2:
        a, b = node.args
        if isinstance(a, fx.Node) and isinstance(b, fx.Node):
            return a, b
    return None


@dataclass
class Site:
    """A conv and the nodes fused into it."""

    conv: fx.Node
    bn: fx.Node | None
    add: fx.Node | None
    residual: fx.Node | None  # the other operand of the add
    relu: fx.Node | None
    name: str  # the conv's module path

    @property
    def out(self) -> fx.Node:
        """The last fused node: its value is the unit's output."""
        return self.relu or self.add or self.bn or self.conv

    @property
    def nodes(self) -> list[fx.Node]:
        return [n for n in (self.conv, self.bn, self.add, self.relu) if n is not None]


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def find_sites(gm: fx.GraphModule, shape_of) -> list[Site]:
    modules = dict(gm.named_modules())
    sites = []
    claimed: set[fx.Node] = set()  # an add both operands of which are conv chains: first wins
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        bn = add = residual = relu = None
        cur = node
        user = _only_user(cur)
        if (
            user is not None
            and user.op == "call_module"
            and type(modules[user.target]) is nn.BatchNorm2d
            and modules[user.target].running_mean is not None
        ):
            bn = cur = user
            user = _only_user(cur)
        if user is not None and is_relu(user, modules):
            relu = user
        elif user is not None and user not in claimed and (ops := add_operands(user)) is not None:
            other = ops[1] if ops[0] is cur else ops[0]
            if other is not cur and shape_of(other) == shape_of(cur):
                add, residual = user, other
                after = _only_user(add)
                if after is not None and is_relu(after, modules):
                    relu = after
        site = Site(node, bn, add, residual, relu, node.target)
        claimed.update(site.nodes)
        sites.append(site)
    return sites
