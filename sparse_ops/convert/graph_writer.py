"""A converted module's fx graph and submodules as JSON-ready descriptions plus tensors.

Only what the loader would rebuild is written: calls to the functions and methods of
the saved-graph allowlists (``rules/allowlists.py``) with keywords they take, sparse_ops
units, and the torch modules of those tables. Anything else is a :class:`SaveError` at
save time rather than a file that fails to load later.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import fx, nn

from ..errors import listing
from ..nn import UNITS
from .rules import FUNCTION_KWARGS, FUNCTIONS, METHOD_KWARGS, METHODS, TORCH_MODULES
from .saved_format import _BIAS_FLAG, _INDEX, SaveError, _is_name, _is_path, _short

# The ops a saved graph may call are those the converter's rules name (rules/allowlists.py).
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, dict):
        return {"dict": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"ellipsis": True}
    raise SaveError(f"cannot save a graph argument of type {type(value).__name__}: {value!r}")


def _module_entry(target: str, module: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    kind = type(module).__name__
    if kind in UNITS and type(module) is UNITS[kind]:
        state, config = module.state()
        for k, v in state.items():
            tensors[f"modules/{target}/{k}"] = v
        return {"type": kind, "config": config}
    if kind in TORCH_MODULES and type(module) is TORCH_MODULES[kind][0]:
        _, names = TORCH_MODULES[kind]
        config = {n: getattr(module, n) for n in names}
        if kind in _BIAS_FLAG:
            config["bias"] = module.bias is not None
        for k, v in module.state_dict().items():
            tensors[f"modules/{target}/{k}"] = v
        return {"type": kind, "config": _encode(config)}
    raise SaveError(
        f"cannot save submodule {target!r} of type {kind}: only sparse_ops units and "
        f"{', '.join(sorted(TORCH_MODULES))} are saved"
    )


def encode_graph(
    module: fx.GraphModule,
) -> tuple[list[dict], dict[str, dict], dict[str, torch.Tensor]]:
    """``(nodes, modules, tensors)``: the graph's nodes and the specs of the submodules
    they call (both JSON-ready), and every tensor, keyed as the loader looks them up."""
    tensors: dict[str, torch.Tensor] = {}
    nodes, modules = [], {}
    saved_path = _loadable_paths(module)
    for node in module.graph.nodes:
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        entry.update(args=_encode(node.args), kwargs=_encode(node.kwargs))
        if node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise SaveError(f"cannot save a call to {node.target!r} (node {node.name})")
            entry["target"] = name
            _check_keywords(node, FUNCTION_KWARGS[name])
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise SaveError(f"cannot save a call to method {node.target!r} (node {node.name})")
            entry["target"] = node.target
            _check_keywords(node, METHOD_KWARGS[node.target])
        elif node.op in ("call_module", "get_attr"):
            entry["target"] = saved_path[node.target]
        else:
            entry["target"] = node.target
        if node.op == "call_module" and entry["target"] not in modules:
            modules[entry["target"]] = _module_entry(
                entry["target"], module.get_submodule(node.target), tensors
            )
        if node.op == "get_attr":
            value = module
            for part in node.target.split("."):
                value = getattr(value, part)
            if not torch.is_tensor(value):
                raise SaveError(f"cannot save attribute {node.target!r}: not a tensor")
            tensors[f"attrs/{entry['target']}"] = value
        nodes.append(entry)
    return nodes, modules, tensors


def _check_keywords(node: fx.Node, allowed: frozenset[str]) -> None:
    """What the loader would refuse is refused when saving (e.g. ``mean(axis=...)``)."""
    stray = set(node.kwargs) - allowed
    if stray:
        raise SaveError(
            f"cannot save node {node.name}: keyword arguments {listing(sorted(stray))} of "
            f"{node.target!r} are not in the saved-graph table (use the op's main spelling)"
        )


def _loadable_paths(module: fx.GraphModule) -> dict[str, str]:
    """Module and attribute paths as the loader accepts them (dotted identifiers and
    indices): a model's own names may hold characters it refuses (torchvision's RegNet
    has ``block1-0``), renamed here so that what saves also loads."""
    targets = [n.target for n in module.graph.nodes if n.op in ("call_module", "get_attr")]
    taken = {t for t in targets if _is_path(t)}
    renamed = {t: t for t in taken}
    for target in targets:
        if target in renamed:
            continue
        parts = target.split(".")
        safe = [
            p
            if _is_name(p) or (i and _INDEX.match(p))
            else "m_" + re.sub(r"[^A-Za-z0-9_]", "_", p).strip("_")[:100]
            for i, p in enumerate(parts)
        ]
        new, k = ".".join(safe), 1
        while new in taken:
            k += 1
            new = f"{'.'.join(safe)}_{k}"
        if not _is_path(new):
            raise SaveError(f"cannot save module path {_short(target)}: no loadable name for it")
        taken.add(new)
        renamed[target] = new
    return renamed
