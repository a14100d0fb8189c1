"""In-place ops made explicit before the passes reason about values.

``a.relu_()``, ``a += b``, ``F.relu(a, inplace=True)``, ``nn.ReLU(inplace=True)(a)``
change ``a`` itself: every later read of ``a`` sees the new value. The passes treat each
graph node as one value (constants, layouts, fused units writing new tensors), so a
later read of ``a`` is rewired to the in-place node, whose value is the mutated tensor.
Mutations the rewiring cannot follow are refused: a tensor with views or aliases
(another name for the same memory, which would change unseen), and a conv unit that
would run after a mutation of the input it read before it.
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .prepare import ConvertError

INPLACE_FUNCTIONS = frozenset(
    {
        operator.iadd,
        operator.isub,
        operator.imul,
        operator.itruediv,
        operator.ifloordiv,
        operator.ipow,
        torch.relu_,
        F.relu_,
        torch.sigmoid_,
        torch.tanh_,
        F.hardtanh_,
        F.elu_,
        F.leaky_relu_,
        torch.clamp_,
    }
)

# Ops whose result may share memory with their input (a view, or the input itself).
ALIAS_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "expand",
        "expand_as",
        "squeeze",
        "unsqueeze",
        "narrow",
        "chunk",
        "split",
        "unbind",
        "select",
        "contiguous",
        "detach",
        "as_strided",
        "diagonal",
        "movedim",
        "swapaxes",
    }
)
ALIAS_FUNCTIONS = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.chunk,
        torch.split,
        torch.narrow,
        torch.unbind,
        torch.select,
        torch.movedim,
        torch.swapaxes,
        F.dropout,
        torch.detach,
    }
)
ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout2d)


def mutated_input(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor ``node`` changes in place, if it is an in-place op on a graph tensor."""
    target = None
    if node.op == "call_method" and isinstance(node.target, str):
        name = node.target
        if name.endswith("_") and not name.startswith("_") and name != "requires_grad_":
            target = node.args[0] if node.args else None
    elif node.op == "call_function":
        if node.target in INPLACE_FUNCTIONS or _inplace_flag(node):
            target = node.args[0] if node.args else None
    elif node.op == "call_module" and getattr(modules[node.target], "inplace", False) is True:
        target = node.args[0] if node.args else None
    is_tensor = isinstance(target, fx.Node) and "tensor_meta" in target.meta
    return target if is_tensor else None


def _inplace_flag(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # a builtin without a signature, or a bad call
        return False
    return bound.arguments.get("inplace") is True


def _is_alias(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return node.target in ALIAS_METHODS
    if node.op == "call_function":
        return node.target in ALIAS_FUNCTIONS
    return node.op == "call_module" and isinstance(modules[node.target], ALIAS_MODULES)


def functionalize(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """Rewire every read after an in-place op to that op; returns (op, mutated) pairs."""
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    mutations = []
    for node in list(gm.graph.nodes):
        target = mutated_input(node, modules)
        if target is None:
            continue
        aliased = _is_alias(target, modules) or any(
            u is not node and _is_alias(u, modules) for u in target.users
        )
        if aliased:
            raise ConvertError(
                f"in-place op {node.name!r} changes {target.name!r}, which shares memory with "
                "another tensor (a view or an alias): the converter follows in-place changes "
                "of a tensor only through its own name; use the out-of-place op"
            )
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
        mutations.append((node, target))
    return mutations


def check_units_read_before(gm: fx.GraphModule, mutations, sites) -> None:
    """A fused unit runs where its last node was; its conv read the input earlier. A
    mutation of that input in between would reach the unit but not the conv."""
    if not mutations:
        return
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for site in sites:
        for op, target in mutations:
            if site.conv.args[0] is target and order[site.conv] < order[op] < order[site.out]:
                raise ConvertError(
                    f"in-place op {op.name!r} changes the input of conv {site.name!r} between "
                    f"the conv and {site.out.name!r}, which is fused into its unit"
                )
