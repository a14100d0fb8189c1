"""Save and load converted modules: safetensors + a JSON graph, no pickle.

The file holds every tensor in one safetensors file. Its string metadata describes
the fx graph (placeholder / get_attr / call_module / call_function / call_method /
output nodes with JSON-encoded arguments) and each submodule's type and constructor
config. Loading rebuilds the graph from **allowlists** of functions, methods and module
types: a file naming anything else is refused, so loading cannot run foreign code.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import checkpoint_io
from ..errors import SparseOpsError
from ..nn import UNITS
from ..tickets import CONVERTED_FORMAT_NAME

FORMAT_NAME = CONVERTED_FORMAT_NAME
FORMAT_VERSION = 1


class SaveError(SparseOpsError):
    """A converted module that cannot be saved, or a file that cannot be loaded."""


FUNCTIONS: dict[str, Any] = {
    "operator.add": operator.add, "operator.iadd": operator.iadd, "operator.sub": operator.sub,
    "operator.mul": operator.mul, "operator.truediv": operator.truediv,
    "operator.getitem": operator.getitem, "builtins.getattr": builtins.getattr,
    "torch.add": torch.add, "torch.relu": torch.relu, "torch.relu_": torch.relu_,
    "torch.flatten": torch.flatten, "torch.cat": torch.cat, "torch.sigmoid": torch.sigmoid,
    "torch.tanh": torch.tanh, "F.relu": F.relu, "F.relu6": F.relu6, "F.hardtanh": F.hardtanh,
    "F.silu": F.silu, "F.gelu": F.gelu, "F.sigmoid": F.sigmoid, "F.dropout": F.dropout,
    "F.pad": F.pad, "F.avg_pool2d": F.avg_pool2d, "F.max_pool2d": F.max_pool2d,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.adaptive_max_pool2d": F.adaptive_max_pool2d,
}  # fmt: skip
_FUNCTION_NAMES = {id(fn): name for name, fn in FUNCTIONS.items()}
METHODS = {"flatten", "view", "reshape", "size", "relu", "relu_", "contiguous", "mean",
           "add", "add_", "sigmoid", "tanh"}  # fmt: skip

# torch module type → constructor arguments read back from the instance.
TORCH_MODULES: dict[str, tuple[type, tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features")),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                           "dilation", "groups", "padding_mode")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features", "eps", "momentum", "affine",
                                     "track_running_stats")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                 "count_include_pad")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size",)),
    "Identity": (nn.Identity, ()), "ReLU": (nn.ReLU, ("inplace",)),
    "ReLU6": (nn.ReLU6, ("inplace",)), "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "SiLU": (nn.SiLU, ()), "GELU": (nn.GELU, ("approximate",)), "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()), "Dropout": (nn.Dropout, ("p",)),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
}  # fmt: skip


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


def _decode(value: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, env) for v in value]
    if not isinstance(value, dict):
        return value
    ((kind, inner),) = value.items()
    if kind == "node":
        return env[inner]
    if kind == "float":
        return float(inner)
    if kind == "tuple":
        return tuple(_decode(v, env) for v in inner)
    if kind == "slice":
        return slice(*(_decode(v, env) for v in inner))
    if kind == "dict":
        return {k: _decode(v, env) for k, v in inner.items()}
    if kind == "dtype":
        dtype = getattr(torch, inner, None)
        if not isinstance(dtype, torch.dtype):
            raise SaveError(f"unknown dtype {inner!r} in a saved graph")
        return dtype
    if kind == "ellipsis":
        return Ellipsis
    raise SaveError(f"unknown argument encoding {kind!r} in a saved graph")


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
        if kind in ("Linear", "Conv2d"):
            config["bias"] = module.bias is not None
        for k, v in module.state_dict().items():
            tensors[f"modules/{target}/{k}"] = v
        return {"type": kind, "config": _encode(config)}
    raise SaveError(
        f"cannot save submodule {target!r} of type {kind}: only sparse_ops units and "
        f"{', '.join(sorted(TORCH_MODULES))} are saved"
    )


def save_converted(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write a module made by :func:`sparse_ops.convert` (safetensors, no pickle)."""
    if not isinstance(module, fx.GraphModule):
        raise SaveError(
            "only traced conversions can be saved; this module was converted by per-module "
            "replacement (torch.fx could not trace the model)"
        )
    tensors: dict[str, torch.Tensor] = {}
    nodes, modules = [], {}
    for node in module.graph.nodes:
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        entry.update(args=_encode(node.args), kwargs=_encode(node.kwargs))
        if node.op == "call_function":
            name = _FUNCTION_NAMES.get(id(node.target))
            if name is None:
                raise SaveError(f"cannot save a call to {node.target!r} (node {node.name})")
            entry["target"] = name
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise SaveError(f"cannot save a call to method {node.target!r} (node {node.name})")
            entry["target"] = node.target
        else:
            entry["target"] = node.target
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _module_entry(node.target, module.get_submodule(node.target),
                                                 tensors)  # fmt: skip
        if node.op == "get_attr":
            value = module
            for part in node.target.split("."):
                value = getattr(value, part)
            if not torch.is_tensor(value):
                raise SaveError(f"cannot save attribute {node.target!r}: not a tensor")
            tensors[f"attrs/{node.target}"] = value
        nodes.append(entry)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "graph": json.dumps(nodes),
        "modules": json.dumps(modules),
    }
    path = Path(path)
    checkpoint_io.write_safetensors(path, tensors, metadata)
    return path


def load_converted(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a converted module saved by :func:`save_converted`."""
    path = Path(path)
    if not path.is_file():
        raise SaveError(f"{path}: no such file")
    if checkpoint_io.sniff(path) != checkpoint_io.SAFETENSORS:
        raise SaveError(f"{path}: not a converted sparse-ops module (expected safetensors)")
    tensors, metadata = checkpoint_io.read_safetensors(path)
    if metadata.get("format") != FORMAT_NAME:
        raise SaveError(
            f"{path}: not a converted sparse-ops module (format {metadata.get('format')!r})"
        )
    try:
        version = int(metadata.get("format_version", "0"))
    except ValueError:
        version = 0
    if version > FORMAT_VERSION:
        raise SaveError(
            f"{path}: written by a newer sparse-ops (converted format_version {version}; this "
            f"version reads up to {FORMAT_VERSION}); upgrade sparse-ops"
        )
    if version < 1:
        raise SaveError(f"{path}: bad format_version {metadata.get('format_version')!r}")
    try:
        nodes = json.loads(metadata["graph"])
        module_specs = json.loads(metadata["modules"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise SaveError(f"{path}: corrupt graph description ({exc})") from None

    def state_of(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    root: dict[str, Any] = {}
    for target, spec in module_specs.items():
        kind, config = spec["type"], spec["config"]
        state = state_of(f"modules/{target}/")
        if kind in UNITS:
            version = int(config.get("format_version", 1))
            if version > FORMAT_VERSION:
                raise SaveError(f"{path}: module {target} has a newer format_version {version}")
            root[target] = UNITS[kind].from_state(state, config)
        elif kind in TORCH_MODULES:
            cls, _ = TORCH_MODULES[kind]
            module = cls(**_decode(config, {}))
            # assign=True keeps the saved dtype (a half-precision Linear stays half)
            module.load_state_dict(state, assign=True)
            root[target] = module
        else:
            raise SaveError(f"{path}: module {target} has a type that is not allowed: {kind!r}")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in nodes:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            if target not in FUNCTIONS:
                raise SaveError(f"{path}: function {target!r} is not allowed")
            target = FUNCTIONS[target]
        elif op == "call_method":
            if target not in METHODS:
                raise SaveError(f"{path}: method {target!r} is not allowed")
        elif op == "get_attr":
            root[target] = tensors[f"attrs/{target}"]
        elif op not in ("placeholder", "call_module", "output"):
            raise SaveError(f"{path}: node kind {op!r} is not allowed")
        args = _decode(entry["args"], env)
        kwargs = _decode(entry["kwargs"], env)
        env[entry["name"]] = graph.create_node(op, target, tuple(args), kwargs, name=entry["name"])
    module = fx.GraphModule(root, graph)
    return module.eval()
