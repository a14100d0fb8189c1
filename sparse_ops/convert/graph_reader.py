"""A saved graph description rebuilt into an fx.GraphModule, refusing anything else.

Every target comes from the saved-graph allowlists (``rules/allowlists.py``), every
module is a sparse_ops unit or one of the allowed torch modules built on the meta device
first, and every error names the file and the node or module at fault.
"""

from __future__ import annotations

import builtins
import inspect
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import USER_ERRORS, listing
from ..nn import UNITS
from .rules import FUNCTION_KWARGS, FUNCTIONS, METHOD_KWARGS, METHODS, TORCH_MODULES
from .saved_format import (
    _BIAS_FLAG,
    _IDENTIFIER,
    SaveError,
    _first_line,
    _is_name,
    _is_path,
    _short,
)

# torch.fx turns a graph into Python source and exec()s it: placeholder targets become
# parameter names, keyword keys are pasted as ``key=``, module and attribute paths as
# ``self.a.b`` or ``getattr(self, "a")``, and a getattr call as ``x.attr``. So nothing
# from the file reaches that source unchecked: node names are not used at all (fx
# names the rebuilt nodes itself), targets come from the saved-graph allowlists, module
# and attribute paths and placeholder names must be plain identifiers (or decimal
# indices; ``saved_format.py``), keyword keys must be parameters of the op called, and
# getattr reads only the attributes in GETATTR_ATTRIBUTES.

GETATTR_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})

MAX_NODES = 100_000
MAX_DEPTH = 16  # nesting of tuples / lists / dicts in one node argument
MAX_INT = 1 << 40  # graph constants are dims, sizes and slices; nothing near this
MAX_PAD = 1 << 12  # F.pad amounts: the padded tensor is allocated on every forward


# Globals the code fx generates refers to: an input of that name would shadow them.
_GENERATED_GLOBALS = frozenset(
    {"self", "torch", "operator", "math", "builtins", "fx_pytree", "pytree", "inf", "nan", "device"}
)


def _is_input_name(text: Any) -> bool:
    """A placeholder target: forward()'s parameter name, in scope for the whole body."""
    return (
        _is_name(text)
        and text not in _GENERATED_GLOBALS
        and (text == "input" or text not in vars(builtins))
    )


class _Loader:
    """Rebuilds one file's graph; every error names the file and the node or module."""

    def __init__(self, path: Path, tensors: dict[str, torch.Tensor]):
        self.path, self.tensors = path, tensors

    def error(self, where: str, message: str) -> SaveError:
        return SaveError(f"{self.path}: {where}: {message}")

    def decode(self, value: Any, env: dict[str, fx.Node], where: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(where, f"arguments nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            return [self.decode(v, env, where, depth + 1) for v in value]
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return value
        if isinstance(value, int):
            if abs(value) > MAX_INT:
                raise self.error(where, f"integer argument {value} out of range")
            return value
        if isinstance(value, float):
            return value
        if not isinstance(value, dict) or len(value) != 1:
            raise self.error(where, f"bad argument encoding {_short(value)}")
        ((kind, inner),) = value.items()
        if kind == "node":
            if not isinstance(inner, str) or inner not in env:
                raise self.error(where, f"uses node {_short(inner)}, not defined before it")
            return env[inner]
        if kind == "float":
            if inner not in ("nan", "inf", "-inf"):
                raise self.error(where, f"bad float {_short(inner)}")
            return float(inner)
        if kind in ("tuple", "slice") and isinstance(inner, list):
            items = tuple(self.decode(v, env, where, depth + 1) for v in inner)
            if kind == "tuple":
                return items
            if len(items) != 3 or not all(v is None or type(v) is int for v in items):
                raise self.error(where, f"bad slice {_short(inner)}")
            return slice(*items)
        if kind == "dict" and isinstance(inner, dict):
            return {k: self.decode(v, env, where, depth + 1) for k, v in inner.items()}
        if kind == "dtype":
            dtype = getattr(torch, inner, None) if isinstance(inner, str) else None
            if not _is_name(inner) or not isinstance(dtype, torch.dtype):
                raise self.error(where, f"unknown dtype {_short(inner)}")
            return dtype
        if kind == "ellipsis" and inner is True:
            return Ellipsis
        raise self.error(where, f"unknown argument encoding {_short(kind)}")

    def modules(self, specs: Any) -> dict[str, nn.Module]:
        if not isinstance(specs, dict):
            raise self.error("modules", "must be a JSON object")
        root: dict[str, nn.Module] = {}
        for target, spec in specs.items():
            where = f"module {_short(target)}"
            if not _is_path(target):
                raise self.error(where, "not a valid module path (dotted identifiers)")
            if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
                raise self.error(where, "needs a 'type' and a 'config' object")
            kind = spec.get("type")
            where = f"module {target!r} ({_short(kind)})"
            prefix = f"modules/{target}/"
            state = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
            try:
                if isinstance(kind, str) and kind in UNITS:
                    root[target] = UNITS[kind].from_state(state, spec["config"])
                elif isinstance(kind, str) and kind in TORCH_MODULES:
                    root[target] = self.torch_module(kind, spec["config"], state, where)
                else:
                    raise self.error(where, "a module type that is not allowed")
            except SaveError:
                raise
            except USER_ERRORS as exc:
                raise self.error(where, str(exc)) from None
        return root

    def torch_module(self, kind: str, config: dict, state: dict, where: str) -> nn.Module:
        cls, names = TORCH_MODULES[kind]
        allowed = set(names) | ({"bias"} if kind in _BIAS_FLAG else set())
        kwargs = self.decode(config, {}, where)
        if not isinstance(kwargs, dict):
            raise self.error(where, "config must be an object")
        stray = set(kwargs) - allowed
        if stray:
            raise self.error(where, f"unknown config keys {listing(sorted(stray))}")
        # Built on the meta device: a file's sizes allocate nothing until the real
        # tensors are put in, and those must then match the sizes exactly.
        try:
            with torch.device("meta"):
                module = cls(**kwargs)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise self.error(where, f"bad config ({_first_line(exc)})") from None
        expected = module.state_dict()
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        if missing or extra:
            raise self.error(
                where,
                f"tensors missing {listing(sorted(missing))}, unexpected {listing(sorted(extra))}",
            )
        for key, meta in expected.items():
            got = state[key]
            if tuple(got.shape) != tuple(meta.shape) or got.dtype.is_floating_point != (
                meta.dtype.is_floating_point
            ):
                raise self.error(
                    where, f"tensor {key!r} is {_describe(got)}, expected {_describe(meta)}"
                )
        # assign=True keeps the saved dtype (a half-precision Linear stays half)
        module.load_state_dict(state, assign=True)
        return module

    def graph(self, nodes: Any, root: dict[str, Any]) -> fx.Graph:
        if not isinstance(nodes, list) or not nodes or len(nodes) > MAX_NODES:
            raise self.error("graph", f"must be a list of 1..{MAX_NODES} nodes")
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        placeholders: set[str] = set()
        for i, entry in enumerate(nodes):
            where = f"graph node {i}"
            if not isinstance(entry, dict) or not {"op", "name", "target", "args"} <= set(entry):
                raise self.error(where, "needs op, name, target and args")
            op, target, name = entry["op"], entry["target"], entry["name"]
            # Names only link nodes here (fx names the rebuilt ones), but a name that is
            # not an identifier is not from our writer.
            if not isinstance(name, str) or not _IDENTIFIER.match(name) or name in env:
                raise self.error(where, f"bad or repeated node name {_short(name)}")
            where = f"graph node {i} ({_short(name)})"
            if (op == "output") != (i == len(nodes) - 1):
                raise self.error(where, "the output node must be the last and only one")
            args = self.decode(entry["args"], env, where)
            kwargs = self.decode(entry.get("kwargs", {"dict": {}}), env, where)
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise self.error(where, "args must be a tuple and kwargs a dict")
            if op == "placeholder":
                # The target is forward()'s parameter name: it must be an identifier,
                # and a default value (args) is a plain constant.
                if not _is_input_name(target) or target in placeholders:
                    raise self.error(where, f"bad input name {_short(target)}")
                if kwargs or len(args) > 1 or any(isinstance(a, fx.Node) for a in args):
                    raise self.error(where, "an input takes no arguments but a default")
                placeholders.add(target)
                allowed_keys: frozenset[str] = frozenset()
            elif op == "call_function":
                if not isinstance(target, str) or target not in FUNCTIONS:
                    raise self.error(where, f"function {_short(target)} is not allowed")
                allowed_keys = FUNCTION_KWARGS[target]
                self.check_call(target, args, where)
                target = FUNCTIONS[target]
            elif op == "call_method":
                if not isinstance(target, str) or target not in METHODS:
                    raise self.error(where, f"method {_short(target)} is not allowed")
                if not args or not isinstance(args[0], fx.Node):
                    raise self.error(where, f"method {target!r} needs a node to call it on")
                allowed_keys = METHOD_KWARGS[target]
            elif op == "call_module":
                if not isinstance(target, str) or target not in root:
                    raise self.error(where, f"calls module {_short(target)}, not in the file")
                if not isinstance(root[target], nn.Module):
                    raise self.error(where, f"{target!r} is a tensor, not a module")
                forward = inspect.signature(type(root[target]).forward).parameters
                allowed_keys = frozenset(forward) - {"self"}
            elif op == "get_attr":
                key = f"attrs/{target}" if isinstance(target, str) else None
                if not _is_path(target) or key not in self.tensors:
                    raise self.error(where, f"attribute {_short(target)} is not in the file")
                if target in root and not torch.is_tensor(root[target]):
                    raise self.error(where, f"attribute {target!r} is also a module")
                if args or kwargs:
                    raise self.error(where, "an attribute read takes no arguments")
                root[target] = self.tensors[key]
                allowed_keys = frozenset()
            elif op == "output":
                if len(args) != 1 or kwargs:
                    raise self.error(where, "the output node takes one argument")
                allowed_keys = frozenset()
                target = "output"
            else:
                raise self.error(where, f"node kind {_short(op)} is not allowed")
            stray = set(kwargs) - allowed_keys
            if stray:
                raise self.error(
                    where,
                    f"keyword arguments {listing(sorted(stray))} are not parameters of the op",
                )
            env[name] = graph.create_node(op, target, args, kwargs)
        return graph

    def check_call(self, target: str, args: tuple, where: str) -> None:
        if target == "builtins.getattr" and (
            len(args) != 2 or not isinstance(args[0], fx.Node) or args[1] not in GETATTR_ATTRIBUTES
        ):
            raise self.error(
                where,
                f"getattr may only read {', '.join(sorted(GETATTR_ATTRIBUTES))} of a "
                f"node, not {_short(args[1:])}",
            )
        if target == "F.pad" and len(args) > 1:
            pads = args[1] if isinstance(args[1], list | tuple) else [args[1]]
            if not all(type(p) is int and abs(p) <= MAX_PAD for p in pads):
                raise self.error(where, f"pad amounts must be ints within ±{MAX_PAD}")


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}"


def rebuild(
    path: Path, tensors: dict[str, torch.Tensor], nodes: Any, module_specs: Any
) -> fx.GraphModule:
    """The module a file's graph and module descriptions (parsed JSON) describe."""
    loader = _Loader(path, tensors)
    root: dict[str, Any] = loader.modules(module_specs)
    graph = loader.graph(nodes, root)
    try:
        module = fx.GraphModule(root, graph)
    except (AttributeError, KeyError, RuntimeError, TypeError) as exc:
        # e.g. a module path running through a tensor attribute
        raise SaveError(f"{path}: inconsistent module tree ({_first_line(exc)})") from None
    return module
