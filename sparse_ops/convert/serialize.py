"""Save and load converted modules: safetensors + a JSON graph, no pickle.

The file holds every tensor in one safetensors file. Its string metadata describes
the fx graph (placeholder / get_attr / call_module / call_function / call_method /
output nodes with JSON-encoded arguments) and each submodule's type and constructor
config. Loading rebuilds the graph from **allowlists** of functions, methods and module
types: a file naming anything else is refused, so loading cannot run foreign code.

This module is the file side (safetensors, metadata, format version, tuning record);
``graph_writer.py`` and ``graph_reader.py`` turn the graph into that description and
back, and ``saved_format.py`` holds what both must agree on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import fx, nn

from .. import checkpoint_io
from .graph_reader import rebuild
from .graph_writer import encode_graph
from .saved_format import FORMAT_NAME, FORMAT_VERSION, SaveError, _first_line, _short

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SaveError", "load_converted", "save_converted"]


def save_converted(module: nn.Module, path: str | os.PathLike) -> Path:
    """Write a module made by :func:`sparse_ops.convert` (safetensors, no pickle)."""
    if not isinstance(module, fx.GraphModule):
        raise SaveError(
            "only traced conversions can be saved; this module was converted by per-module "
            "replacement (torch.fx could not trace the model)"
        )
    nodes, modules, tensors = encode_graph(module)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "graph": json.dumps(nodes),
        "modules": json.dumps(modules),
    }
    tuning = getattr(module, "sparse_ops_tuning", None)
    if tuning is not None:  # what convert(tune=...) measured and chose: loading never re-tunes
        try:
            metadata["tuning"] = json.dumps(tuning)
        except (TypeError, ValueError) as exc:
            raise SaveError(f"the module's tuning record is not JSON ({exc})") from None
    path = Path(path)
    checkpoint_io.write_safetensors(path, tensors, metadata)
    return path


def load_converted(path: str | os.PathLike) -> fx.GraphModule:
    """Rebuild a converted module saved by :func:`save_converted`.

    Loading runs no code from the file and generates none from it (see the comment
    above ``graph_reader.GETATTR_ATTRIBUTES``); a damaged or crafted file raises
    :class:`SaveError` naming the file and the node, module or tensor at fault."""
    path = Path(path)
    checkpoint_io.check_input_file(path, SaveError)
    if checkpoint_io.sniff(path) != checkpoint_io.SAFETENSORS:
        raise SaveError(f"{path}: not a converted sparse-ops module (expected safetensors)")
    tensors, metadata = checkpoint_io.read_safetensors(path)
    if metadata.get("format") != FORMAT_NAME:
        raise SaveError(
            f"{path}: not a converted sparse-ops module (format {_short(metadata.get('format'))})"
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
        raise SaveError(f"{path}: bad format_version {_short(metadata.get('format_version'))}")
    try:
        nodes = json.loads(metadata["graph"])
        module_specs = json.loads(metadata["modules"])
    except (KeyError, json.JSONDecodeError, RecursionError) as exc:
        raise SaveError(f"{path}: corrupt graph description ({_first_line(exc)})") from None
    module = rebuild(path, tensors, nodes, module_specs)
    if "tuning" in metadata:
        try:
            tuning = json.loads(metadata["tuning"])
        except (json.JSONDecodeError, RecursionError) as exc:
            raise SaveError(f"{path}: corrupt tuning record ({_first_line(exc)})") from None
        if not isinstance(tuning, dict):
            raise SaveError(f"{path}: the tuning record must be a JSON object")
        module.sparse_ops_tuning = tuning  # a record only: nothing in it is run or looked up
    return module.eval()
