"""The ops a saved converted graph may call: the union of the built-in rules' tables.

``serialize.py`` (through ``graph_writer.py`` and ``graph_reader.py``) saves and loads
only these, so what the converter can emit and what a file may name cannot drift apart:
adding an op is one entry in one rule. Registered custom rules are not included: a
module holding a custom module type cannot be saved (loading never builds types named by
a file).
"""

from __future__ import annotations

from collections.abc import Callable

from .registry import RULES


def _tables():
    functions: dict[str, tuple[Callable, frozenset[str]]] = {}
    methods: dict[str, frozenset[str]] = {}
    modules: dict[str, tuple[type, tuple[str, ...]]] = {}
    for rule in RULES:
        for name, (fn, keys) in rule.functions.items():
            assert functions.get(name, (fn,))[0] is fn, name
            functions[name] = (fn, functions.get(name, (fn, frozenset()))[1] | frozenset(keys))
        for name, keys in rule.methods.items():
            methods[name] = methods.get(name, frozenset()) | frozenset(keys)
        for name, entry in rule.modules.items():
            assert modules.get(name, entry) == entry, name
            modules[name] = entry
    return functions, methods, modules


_FUNCTION_TABLE, METHOD_KWARGS, TORCH_MODULES = _tables()
FUNCTIONS: dict[str, Callable] = {name: fn for name, (fn, _) in _FUNCTION_TABLE.items()}
FUNCTION_KWARGS: dict[str, frozenset[str]] = {n: keys for n, (_, keys) in _FUNCTION_TABLE.items()}
METHODS = frozenset(METHOD_KWARGS)
