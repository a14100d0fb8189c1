"""Our ticket file format: one safetensors file, no pickle.

``format_version`` 1 holds tensors ``masks/<name>`` (bool), ``weights/<name>``,
``rewind/<name>``, and string metadata ``format = "sparse-ops-ticket"``,
``format_version``, ``arch``, ``meta`` (JSON) and ``sections`` (the sections the
ticket carries, so an empty one reads back as empty rather than absent). Loading it
cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import importers
from ..errors import TicketFormatError

FORMAT_NAME = "sparse-ops-ticket"
# Written by sparse_ops.save_converted; named here so load_ticket can point to the loader.
CONVERTED_FORMAT_NAME = "sparse-ops-converted"
FORMAT_VERSION = 1
_SECTIONS = ("masks", "weights", "rewind")


def encode_ticket(
    sections: Mapping[str, Mapping[str, torch.Tensor] | None],
    arch: str | None,
    meta: Mapping[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a ticket file, from a ticket's ``sections``
    (masks, weights, rewind; None: not carried)."""
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TicketFormatError(f"ticket meta is not JSON-serialisable: {exc}") from None
    tensors = {
        f"{section}/{k}": v
        for section in _SECTIONS
        if sections[section] is not None
        for k, v in sections[section].items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "arch": arch or "",
        "meta": meta_json,
        "sections": ",".join(s for s in _SECTIONS if sections[s] is not None),
    }
    return tensors, metadata


def read_ticket_file(path: Path, tensors: dict, metadata: dict[str, str]) -> importers.Imported:
    """The sections of a safetensors file whose metadata names our format."""
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        version = 0
    if version < 1:
        raise TicketFormatError(
            f"{path}: bad format_version {metadata.get('format_version')!r} in a ticket file"
        )
    if version > FORMAT_VERSION:
        raise TicketFormatError(
            f"{path}: written by a newer sparse-ops (ticket format_version {version}; this "
            f"version reads up to {FORMAT_VERSION}); upgrade sparse-ops to read it"
        )
    try:
        meta = json.loads(metadata.get("meta", "{}"))
    except json.JSONDecodeError as exc:
        raise TicketFormatError(f"{path}: corrupt meta JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise TicketFormatError(f"{path}: meta must be a JSON object, got {type(meta).__name__}")
    sections: dict[str, dict[str, torch.Tensor]] = {s: {} for s in _SECTIONS}
    for key, value in tensors.items():
        section, _, name = key.partition("/")
        if section not in sections or not name:
            raise TicketFormatError(f"{path}: unexpected tensor key {key!r} in a ticket file")
        sections[section][name] = value
    # Declared sections may be empty; tensors in an undeclared section mean a damaged file.
    declared = metadata.get("sections")
    present = set(declared.split(",")) - {""} if declared is not None else set()
    present |= {s for s, content in sections.items() if content}
    undeclared = {s for s, content in sections.items() if content} - present
    if declared is not None and undeclared:
        raise TicketFormatError(f"{path}: tensors in undeclared sections {sorted(undeclared)}")
    # Keep where the ticket first came from; it now comes from our format.
    origin = meta.get("source_format")
    if origin and origin != "sparse-ops":
        meta.setdefault("origin_format", origin)
    meta["source_format"] = "sparse-ops"
    return importers.Imported(
        masks=sections["masks"],
        weights=sections["weights"] if "weights" in present else None,
        rewind=sections["rewind"] if "rewind" in present else None,
        meta=meta,
        arch=metadata.get("arch") or None,
    )
