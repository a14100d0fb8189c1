"""Importers for the checkpoint layouts tickets arrive in.

Each importer turns one layout into :class:`Imported` parts (masks, weights, rewind
weights, meta); :func:`sparse_ops.tickets.load_ticket` picks the importer and builds
the validated :class:`~sparse_ops.tickets.Ticket`. Layouts:

``torch-prune``
    a state dict from ``torch.nn.utils.prune``: ``<name>_orig`` (unmasked values)
    plus ``<name>_mask`` for each pruned parameter.
``structure-lth``
    Structure-LTH's checkpoint dict: ``state_dict`` (torch-prune keys in rounds ≥ 1),
    ``init_weight`` (the dense rewind state), ``epoch``, ``best_sa``, ``state``, ...
``open-lth-checkpoint``
    open_lth's ``checkpoint.pth``: ``model_state_dict`` holding ``model.<name>`` and
    ``mask_<name with . → ___>`` buffers, plus ``ep``/``it``.
``open-lth-level``
    an open_lth / E-LTH level directory: ``mask.pth`` (``{name: 0/1 int32}``) and
    ``model_ep{E}_it{I}.pth`` state dicts (the earliest is the rewind point, the latest
    the trained weights).
``mask-dict``
    a bare ``{name: 0/1 tensor}`` dict (e.g. a lone ``mask.pth``): masks, no weights.
``zeros``
    a plain state dict: every conv/linear weight (2-D or 4-D ``*weight``) that holds an
    exact zero gets the mask ``weight != 0``; weights without a zero count as unpruned.
``module``
    a live ``nn.Module``: its state dict, read as ``torch-prune`` when it carries
    pruning re-parametrisations, else as ``zeros``.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint_io import load_torch
from .errors import TicketFormatError, listing

RECOGNISED = (
    "sparse-ops ticket (.safetensors with format metadata)",
    "torch.nn.utils.prune state dict (*_orig + *_mask)",
    "Structure-LTH checkpoint (state_dict, init_weight, ...)",
    "open_lth checkpoint.pth (model_state_dict with mask_* buffers)",
    "open_lth / E-LTH level directory (mask.pth + model_ep*_it*.pth)",
    "mask dict ({name: 0/1 tensor})",
    "plain state dict (exact zeros define the mask; .pth/.pt/.safetensors)",
)

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_MODEL_FILE = re.compile(r"model_ep(\d+)_it(\d+)\.pth")


@dataclass
class Imported:
    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] | None
    rewind: dict[str, torch.Tensor] | None
    meta: dict[str, Any] = field(default_factory=dict)
    arch: str | None = None


def recognised_formats() -> str:
    return "; ".join(RECOGNISED)


def strip_wrapper_prefix(state: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove a ``module.``/``_orig_mod.`` prefix shared by every key (repeatedly)."""
    state = dict(state)
    stripped = ""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped += prefix
                changed = True
    return state, stripped


def _tensor_dict(obj: Any, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise TicketFormatError(f"{where}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TicketFormatError(
            f"{where}: expected a dict of tensors; {listing(bad)} hold non-tensor values"
        )
    return {str(k): v for k, v in obj.items()}


def _is_prune_state(state: Mapping[str, Any]) -> bool:
    return any(k.endswith("_orig") and k[:-5] + "_mask" in state for k in state)


def _looks_binary(t: torch.Tensor) -> bool:
    """A 0/1 tensor, or an integer/bool one, or ≥ 99% exact 0/1: a mask, not weights.

    Near-binary floats count so that a corrupt mask file reaches the 0/1 check and is
    reported, instead of being read as (strange) weights.
    """
    if t.dtype == torch.bool or not t.is_floating_point():
        return True
    if t.numel() == 0:
        return False
    return float(((t == 0) | (t == 1)).float().mean()) >= 0.99


def _mask_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The masks of a bare mask file, or None if ``state`` is not one.

    Two spellings: ``{name.weight: 0/1}`` (open_lth's ``mask.pth``) and
    ``{name.weight_mask: 0/1}`` (Structure-LTH's ``extract_mask`` output).
    """
    if not state:
        return None
    if all(k.endswith("_mask") for k in state):
        state = {k[: -len("_mask")]: v for k, v in state.items()}
    if all(
        k.endswith("weight") and v.dim() in (2, 4) and _looks_binary(v) for k, v in state.items()
    ):
        return dict(state)
    return None


def is_conv_or_linear_weight(name: str, t: torch.Tensor) -> bool:
    return name.endswith("weight") and t.dim() in (2, 4) and t.is_floating_point()


# ---------------------------------------------------------------------------- layouts


def from_prune_state(state: Mapping[str, torch.Tensor], where: str) -> Imported:
    """``*_orig`` + ``*_mask`` keys → masks and unmasked weights.

    A ``*_mask`` key without its ``*_orig`` is an ordinary buffer (``attn_mask``, ...).
    Masks on anything but a conv/linear weight (a bias, a Conv1d/Conv3d weight) are
    folded into the weight (``orig × mask``) and listed in ``meta["folded_masks"]``.
    """
    masks: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    folded = []
    pairs = {k[: -len("_orig")] for k in state if k.endswith("_orig")}
    for key, value in state.items():
        if key.endswith("_orig") and key[: -len("_orig")] in pairs:
            name = key[: -len("_orig")]
            mask_key = name + "_mask"
            if mask_key not in state:
                raise TicketFormatError(f"{where}: {key!r} has no matching {mask_key!r}")
            if name in state:
                raise TicketFormatError(
                    f"{where}: both {name!r} and the pruning pair {key!r}/{mask_key!r} present"
                )
            mask = state[mask_key]
            if tuple(mask.shape) != tuple(value.shape):
                raise TicketFormatError(
                    f"{where}: {mask_key!r} has shape {tuple(mask.shape)} but {key!r} has "
                    f"{tuple(value.shape)}"
                )
            if name.endswith("weight") and value.dim() in (2, 4):
                masks[name] = mask
                weights[name] = value
            else:
                weights[name] = value * mask.to(value.dtype)
                folded.append(name)
        elif key.endswith("_mask") and key[: -len("_mask")] in pairs:
            continue
        else:
            weights[key] = value
    meta: dict[str, Any] = {"source_format": "torch-prune"}
    if folded:
        meta["folded_masks"] = folded
    return Imported(masks, weights, None, meta)


def from_zeros_state(state: Mapping[str, torch.Tensor]) -> Imported:
    """Plain state dict: exact zeros of conv/linear weights define the masks."""
    masks = {}
    unpruned = []
    for key, value in state.items():
        if is_conv_or_linear_weight(key, value):
            keep = value != 0
            if bool(keep.all()):
                unpruned.append(key)
            else:
                masks[key] = keep
    meta = {"source_format": "zeros", "unpruned_layers": unpruned}
    return Imported(masks, dict(state), None, meta)


def weights_without_masks(state: Mapping[str, torch.Tensor], where: str) -> dict:
    """A state dict with any pruning pairs folded back to plain parameter names."""
    if _is_prune_state(state):
        weights = from_prune_state(state, where).weights
        assert weights is not None
        return weights
    return dict(state)


def from_state_dict(state: Mapping[str, Any], where: str) -> Imported:
    """Any flat dict of tensors: prune pairs, a mask dict or a plain state dict."""
    tensors, prefix = strip_wrapper_prefix(_tensor_dict(state, where))
    if not tensors:
        raise TicketFormatError(f"{where}: holds no tensors")
    masks = None if _is_prune_state(tensors) else _mask_dict(tensors)
    if _is_prune_state(tensors):
        imported = from_prune_state(tensors, where)
    elif masks is not None:
        imported = Imported(masks, None, None, {"source_format": "mask-dict"})
    else:
        imported = from_zeros_state(tensors)
    if prefix:
        imported.meta["stripped_prefix"] = prefix
    return imported


def from_structure_lth(ckpt: Mapping[str, Any], where: str) -> Imported:
    """Structure-LTH checkpoint (or any ``{'state_dict': ...}`` wrapper)."""
    imported = from_state_dict(ckpt["state_dict"], f"{where}['state_dict']")
    if "init_weight" in ckpt and ckpt["init_weight"] is not None:
        rewind, _ = strip_wrapper_prefix(
            _tensor_dict(ckpt["init_weight"], f"{where}['init_weight']")
        )
        imported.rewind = weights_without_masks(rewind, f"{where}['init_weight']")
    signature = {"init_weight", "best_sa", "result"}
    structure_lth = bool(signature & set(ckpt))
    imported.meta["source_format"] = "structure-lth" if structure_lth else "checkpoint-dict"
    imported.meta["weights_kind"] = "trained"
    imported.meta.update(_scalars(ckpt, ("epoch", "best_sa", "state")))
    # save_structure_lth gives unpruned convs all-ones masks for their loader and lists
    # them here: they were no masks in the ticket, so they are none again.
    unmasked = ckpt.get("sparse_ops_unmasked")
    if isinstance(unmasked, list | tuple):
        for name in unmasked:
            mask = imported.masks.get(name) if isinstance(name, str) else None
            if mask is not None and bool(mask.all()):
                del imported.masks[name]
    if structure_lth and imported.masks:
        imported.meta.setdefault("method", "imp")
    return imported


def is_open_lth_state(state: Mapping[str, Any]) -> bool:
    """PrunedModel's layout: only ``mask_*`` buffers and ``model.*`` entries, both present."""
    keys, _ = strip_wrapper_prefix(dict.fromkeys(state))
    masks = [k for k in keys if k.startswith("mask_")]
    wrapped = [k for k in keys if k.startswith("model.")]
    return bool(masks) and bool(wrapped) and len(masks) + len(wrapped) == len(keys)


def from_open_lth_checkpoint(ckpt: Mapping[str, Any], where: str) -> Imported:
    """open_lth ``checkpoint.pth``: PrunedModel's ``mask_*`` buffers + ``model.*`` params.

    A ``model_state_dict`` in any other layout (open_lth's dense pretraining checkpoint,
    other training code) is read as a plain state dict.
    """
    inner = ckpt["model_state_dict"]
    state, prefix = strip_wrapper_prefix(_tensor_dict(inner, f"{where}['model_state_dict']"))
    if not is_open_lth_state(state):
        imported = from_state_dict(state, f"{where}['model_state_dict']")
    else:
        masks = {
            k[len("mask_") :].replace("___", "."): v
            for k, v in state.items()
            if k.startswith("mask_")
        }
        weights = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        imported = Imported(masks, weights, None, {})
    imported.meta["source_format"] = "open-lth-checkpoint"
    imported.meta["weights_kind"] = "trained"
    if prefix:
        imported.meta["stripped_prefix"] = prefix
    imported.meta.update(_scalars(ckpt, ("ep", "it")))
    return imported


def _scalars(ckpt: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, int | float]:
    """Numeric entries (Python or numpy numbers) as plain Python numbers."""
    out: dict[str, int | float] = {}
    for key in keys:
        value = ckpt.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, numbers.Integral):
            out[key] = int(value)
        elif isinstance(value, numbers.Real):
            out[key] = float(value)
    return out


def from_open_lth_level(directory: Path) -> Imported:
    """An open_lth level directory (``level_L/main`` or ``level_L``)."""
    directory = _resolve_level_dir(directory)
    mask_file = directory / "mask.pth"
    masks = _tensor_dict(load_torch(mask_file), str(mask_file))
    steps = sorted(
        ((int(m[1]), int(m[2])), p)
        for p in directory.iterdir()
        if (m := _MODEL_FILE.fullmatch(p.name))
    )
    meta: dict[str, Any] = {"source_format": "open-lth-level", "method": "imp"}
    weights = rewind = None
    if steps:
        _, rewind_path = steps[0]
        rewind = _tensor_dict(load_torch(rewind_path), str(rewind_path))
        meta["rewind_file"] = rewind_path.name
        if len(steps) > 1:
            _, trained_path = steps[-1]
            weights = _tensor_dict(load_torch(trained_path), str(trained_path))
            meta["weights_file"] = trained_path.name
            meta["weights_kind"] = "trained"
    report = directory / "sparsity_report.json"
    if report.is_file():
        try:
            meta["sparsity_report"] = json.loads(report.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TicketFormatError(f"{report}: not valid JSON ({exc})") from None
    return Imported(masks, weights, rewind, meta)


def _resolve_level_dir(directory: Path) -> Path:
    if (directory / "mask.pth").is_file():
        return directory
    if (directory / "main" / "mask.pth").is_file():
        return directory / "main"
    levels = sorted(
        (p.name for p in directory.glob("level_*") if p.is_dir()),
        key=lambda n: (0, int(n[6:])) if n[6:].isdigit() else (1, n),
    )
    if levels:
        raise TicketFormatError(
            f"{directory}: an open_lth replicate directory (levels: {', '.join(levels)}); "
            f"pass one level, e.g. {directory / levels[-1]}"
        )
    if (directory / "checkpoint.pth").is_file():
        raise TicketFormatError(
            f"{directory}: no mask.pth here; pass {directory / 'checkpoint.pth'} to read "
            "the masks from open_lth's checkpoint instead"
        )
    raise TicketFormatError(
        f"{directory}: not a ticket directory (expected an open_lth level: mask.pth and "
        "model_ep*_it*.pth, or level_L/main/ holding them)"
    )


def from_module(module: nn.Module) -> Imported:
    """A live module: pruning re-parametrisations if any, else its zeros."""
    state = {k: v.detach() for k, v in module.state_dict().items()}
    imported = from_state_dict(state, module_label(module))
    imported.meta["source_format"] = (
        "module-prune" if imported.meta["source_format"] == "torch-prune" else "module-zeros"
    )
    return imported


def module_label(module: nn.Module) -> str:
    return f"<{type(module).__name__} module>"


def from_object(obj: Any, where: str) -> Imported:
    """Dispatch on the content of a ``torch.load``-ed object."""
    if not isinstance(obj, Mapping):
        raise TicketFormatError(
            f"{where}: holds a {type(obj).__name__}, not a checkpoint dict "
            f"(recognised: {recognised_formats()})"
        )
    if "model_state_dict" in obj:
        return from_open_lth_checkpoint(obj, where)
    if "state_dict" in obj:
        return from_structure_lth(obj, where)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return from_state_dict(obj, where)
    keys = [str(k) for k in obj]
    raise TicketFormatError(
        f"{where}: unrecognised checkpoint dict with keys {listing(keys)} "
        f"(recognised: {recognised_formats()})"
    )
