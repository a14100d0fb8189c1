"""What the converter recognises in a torch.fx graph, and the conv chains it fuses.

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

# Elementwise ops that act on each channel alone: they keep the channel layout, and a
# constant channel stays constant (its value maps through the same function).
UNARY_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.silu, F.gelu,
                   torch.sigmoid, F.sigmoid, torch.tanh, F.dropout}  # fmt: skip
UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                 nn.Dropout, nn.Identity)  # fmt: skip
UNARY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous"}

# Spatial ops: every channel pooled/sliced on its own. Padded average pooling is left
# out: near the borders it would turn a constant channel into a varying one.
SPATIAL_MODULES = (nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
SPATIAL_FUNCTIONS = {F.max_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}


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


def is_unary(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in UNARY_FUNCTIONS:
        return len([a for a in node.args if isinstance(a, fx.Node)]) == 1
    if node.op == "call_module":
        return isinstance(modules[node.target], UNARY_MODULES)
    return node.op == "call_method" and node.target in UNARY_METHODS and len(node.args) == 1


def is_spatial(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Pooling that treats every channel alone and maps constants to themselves."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.AvgPool2d):
            return _no_padding(m.padding)
        return isinstance(m, SPATIAL_MODULES)
    if node.op == "call_function":
        if node.target is F.avg_pool2d:
            padding = node.kwargs.get("padding", node.args[3] if len(node.args) > 3 else 0)
            return _no_padding(padding)
        return node.target in SPATIAL_FUNCTIONS
    return False


def _no_padding(padding) -> bool:
    return padding == 0 or padding == (0, 0) or padding == [0, 0]


def spatial_slice(node: fx.Node) -> bool:
    """``x[:, :, a:b:c, ...]``: slicing that keeps every channel."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    index = node.args[1]
    if not isinstance(index, tuple) or len(index) < 2:
        return False
    return index[1] == slice(None) and index[0] == slice(None)


def channel_pad(node: fx.Node) -> tuple[int, int] | None:
    """``F.pad(x, (0, 0, 0, 0, a, b))`` on a 4-D tensor: (a, b) zero channels added."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
    if mode != "constant" or (value not in (None, 0, 0.0)):
        return None
    six_ints = isinstance(pad, list | tuple) and len(pad) == 6
    if six_ints and all(isinstance(p, int) for p in pad) and list(pad[:4]) == [0, 0, 0, 0]:
        return int(pad[4]), int(pad[5])
    return None


def flatten_keeps_channels(node: fx.Node, shape_of) -> bool:
    """``flatten(x, 1)`` of a ``[N, C, 1, 1]`` tensor: channels stay channels."""
    function = node.op == "call_function" and node.target is torch.flatten
    method = node.op == "call_method" and node.target == "flatten"
    if not (function or method):
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    shape = shape_of(node.args[0])
    return start == 1 and shape is not None and len(shape) == 4 and tuple(shape[2:]) == (1, 1)


def is_shape_access(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is getattr and node.args[1] == "shape") or (
        node.op == "call_method" and node.target == "size"
    )


def shape_access_reads_channels(node: fx.Node) -> bool:
    """Whether code reads the channel count of a tensor through ``.shape`` / ``.size()``."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim is None or dim in (1, -3)
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            if user.args[1] not in (0, 2, 3, -1, -2):
                return True
        else:
            return True
    return False


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
            user is not None and user.op == "call_module"
            and type(modules[user.target]) is nn.BatchNorm2d
            and modules[user.target].running_mean is not None
        ):  # fmt: skip
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
