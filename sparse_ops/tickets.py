"""Tickets: binary masks over conv/linear weights, with the weights they belong to.

A :class:`Ticket` holds

``masks``
    ``{parameter name: bool tensor}`` for every pruned conv/linear weight. A weight
    without a mask is unpruned (stem convs and classifiers usually are).
``weights``
    optional state dict of the trained network, values *as stored* (a
    torch.nn.utils.prune checkpoint keeps nonzero values under the mask; use
    :meth:`Ticket.masked_weights` for the effective ones).
``rewind``
    optional state dict to rewind to (Structure-LTH's ``init_weight``, open_lth's
    earliest ``model_ep*_it*.pth``).
``arch``
    optional name from :mod:`sparse_ops.models`.
``meta``
    JSON-serialisable dict: ``source_format``, ``method``, group layouts, ...

Our file format (``format_version`` 1) is one safetensors file: tensors
``masks/<name>`` (bool), ``weights/<name>``, ``rewind/<name>``, and string metadata
``format = "sparse-ops-ticket"``, ``format_version``, ``arch`` and ``meta`` (JSON). It
holds no pickle, so loading it cannot run code.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Mapping
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import checkpoint_io, importers
from . import models as arch_registry
from .errors import TicketFormatError, TicketMismatchError, listing
from .masks import DEFAULT_MIN_BLOCK_ROWS, MaskStats, check_mask_shape, mask_stats

FORMAT_NAME = "sparse-ops-ticket"
# Written by sparse_ops.save_converted; named here so load_ticket can point to the loader.
CONVERTED_FORMAT_NAME = "sparse-ops-converted"
FORMAT_VERSION = 1
_SECTIONS = ("masks", "weights", "rewind")


def _is_optional_key(key: str) -> bool:
    """State keys an architecture can supply itself when a checkpoint lacks them."""
    return key.endswith("num_batches_tracked") or key in ("normalize.mean", "normalize.std")


class Ticket:
    """Masks (+ optional trained / rewind weights) of a sparse subnetwork."""

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor],
        weights: Mapping[str, torch.Tensor] | None = None,
        arch: str | None = None,
        meta: Mapping[str, Any] | None = None,
        *,
        rewind: Mapping[str, torch.Tensor] | None = None,
    ):
        if arch is not None and not isinstance(arch, str):
            raise TicketMismatchError(f"arch must be a name (str) or None, got {arch!r}")
        self.masks = _as_masks(masks)
        self.weights = _as_state(weights, "weights")
        self.rewind = _as_state(rewind, "rewind")
        self.arch = arch
        self.meta: dict[str, Any] = dict(meta or {})
        self._check_consistent()

    # ------------------------------------------------------------------ validation
    def _check_consistent(self) -> None:
        for section in ("weights", "rewind"):
            state = getattr(self, section)
            if state is None:
                continue
            for name, mask in self.masks.items():
                if name not in state:
                    raise TicketMismatchError(
                        f"mask {name!r} has no weight in the ticket's {section} "
                        f"(its keys: {listing(sorted(state), 4)})"
                    )
                if tuple(state[name].shape) != tuple(mask.shape):
                    raise TicketMismatchError(
                        f"mask {name!r} has shape {tuple(mask.shape)} but its {section} "
                        f"tensor has shape {tuple(state[name].shape)}"
                    )
            for key, value in state.items():
                bad = _non_finite(value)
                if bad:
                    raise TicketMismatchError(
                        f"{section} tensor {key!r} {tuple(value.shape)} holds {bad} NaN/Inf "
                        "value(s)"
                    )

    def check_fits(self, model_or_arch: nn.Module | str) -> None:
        """Raise :class:`TicketMismatchError` unless the ticket fits the architecture.

        Masks must name conv/linear weights of the model with equal shapes; weight
        dicts must have exactly the model's state keys (BN's ``num_batches_tracked``
        and Structure-LTH's ``normalize`` buffers may be absent) with equal shapes.
        """
        if isinstance(model_or_arch, str):
            sig = _arch_signature(model_or_arch, _num_classes_for(model_or_arch, self))
        else:
            sig = _module_signature(model_or_arch)
        label, shapes, maskable = sig.label, sig.shapes, sig.maskable
        errors = []
        not_maskable = [n for n in self.masks if n not in maskable]
        if not_maskable:
            errors.append(
                f"masks for names that are not conv/linear weights of {label}: "
                f"{listing(not_maskable)}"
            )
        mismatched = [
            f"{n} {tuple(m.shape)} vs {maskable[n]}"
            for n, m in self.masks.items()
            if n in maskable and tuple(m.shape) != maskable[n]
        ]
        if mismatched:
            errors.append(f"mask shapes differ from {label}'s: {', '.join(mismatched[:6])}")
        for section in ("weights", "rewind"):
            state = getattr(self, section)
            if state is None:
                continue
            missing = [k for k in shapes if k not in state and not _is_optional_key(k)]
            unexpected = [k for k in state if k not in shapes]
            wrong = [
                f"{k} {tuple(v.shape)} vs {shapes[k]}"
                for k, v in state.items()
                if k in shapes and tuple(v.shape) != shapes[k]
            ]
            if missing:
                errors.append(f"{section}: keys of {label} missing: {listing(missing)}")
            if unexpected:
                errors.append(f"{section}: keys not in {label}: {listing(unexpected)}")
            if wrong:
                errors.append(f"{section}: shapes differ from {label}'s: {', '.join(wrong[:6])}")
        if errors:
            raise TicketMismatchError(f"ticket does not fit {label}: " + "; ".join(errors))

    # ------------------------------------------------------------------ statistics
    @property
    def density(self) -> float:
        """Kept fraction over all masked weights (1.0 when nothing is masked)."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(torch.count_nonzero(m)) for m in self.masks.values())
        return kept / total if total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def stats(self, *, min_block_rows: float = DEFAULT_MIN_BLOCK_ROWS) -> dict[str, MaskStats]:
        """Per-layer shape, density, empty channels and structure class."""
        return {n: mask_stats(m, min_block_rows=min_block_rows) for n, m in self.masks.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready overview: global density and one entry per masked layer."""
        stats = self.stats()
        layers = [{"name": n, **s.as_dict()} for n, s in stats.items()]
        total = sum(s.numel for s in stats.values())
        kept = sum(s.nnz for s in stats.values())
        density = kept / total if total else 1.0
        return {
            "arch": self.arch,
            "source_format": self.meta.get("source_format"),
            "global_density": density,
            "global_sparsity": 1.0 - density,
            "masked_params": total,
            "kept_params": kept,
            "has_weights": self.weights is not None,
            "has_rewind": self.rewind is not None,
            "layers": layers,
        }

    def masked_weights(self, which: str = "weights") -> dict[str, torch.Tensor]:
        """``weights`` (or ``rewind``) with every mask applied."""
        state = self._section(which)
        return {
            k: (v * self.masks[k].to(v.dtype)) if k in self.masks else v for k, v in state.items()
        }

    def _section(self, which: str) -> dict[str, torch.Tensor]:
        if which not in ("weights", "rewind"):
            raise ValueError(f"which must be 'weights' or 'rewind', got {which!r}")
        state = getattr(self, which)
        if state is None:
            raise TicketMismatchError(f"this ticket carries no {which}")
        return state

    # ------------------------------------------------------------------ models
    def apply(
        self, model: nn.Module, weights: str | None = "weights", *, hooks: bool = True
    ) -> nn.Module:
        """Load ``weights``/``rewind`` (or nothing, ``None``) into ``model`` and mask it.

        With ``hooks=True`` masks are attached the torch.nn.utils.prune way
        (``weight_orig`` + ``weight_mask``), so pruning tools keep working; with
        ``hooks=False`` the weights are multiplied by the masks in place.
        """
        self.check_fits(model)
        already = [
            name or type(model).__name__
            for name, module in model.named_modules()
            if _has_pruning_hook(module)
        ]
        if already:
            raise TicketMismatchError(
                f"model already carries pruning hooks (on {listing(already)}); call "
                "torch.nn.utils.prune.remove on them first"
            )
        if weights is not None:
            state = self._section(weights)
            own = model.state_dict()
            merged = {k: state.get(k, own[k]) for k in own}
            model.load_state_dict(merged, strict=True)
        params = dict(model.named_parameters())
        for name, mask in self.masks.items():
            module_name, _, pname = name.rpartition(".")
            module = _get(model, module_name)
            mask = mask.to(params[name].device)
            if hooks:
                prune.custom_from_mask(module, pname, mask)
            else:
                with torch.no_grad():
                    params[name].mul_(mask.to(params[name].dtype))
        return model

    def with_arch(self, arch: str) -> Ticket:
        """This ticket checked against ``arch`` (and re-keyed across a ``model.`` wrapper)."""
        info = arch_registry.info(arch)
        sig = _arch_signature(info.name, _num_classes_for(info.name, self))
        ticket = _align_model_prefix(self, set(sig.shapes))
        ticket.check_fits(info.name)
        if ticket is self:
            ticket = self.copy()
        ticket.arch = info.name
        return ticket

    def copy(self) -> Ticket:
        """A new Ticket sharing the tensors (masks, weights and meta dicts are copied)."""
        return Ticket(
            self.masks,
            None if self.weights is None else dict(self.weights),
            self.arch,
            copy.deepcopy(self.meta),
            rewind=None if self.rewind is None else dict(self.rewind),
        )

    def create_model(self, device: torch.device | str | None = None) -> nn.Module:
        """A fresh instance of the ticket's architecture, with the classifier width the
        ticket's weights imply (``device="meta"`` for a shape-only model)."""
        if self.arch is None:
            raise TicketMismatchError("the ticket names no architecture; pass arch=...")
        num_classes = _num_classes_for(self.arch, self)
        with torch.device(device) if device is not None else _nullcontext():
            return arch_registry.create(self.arch, num_classes)

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the ticket in our format (safetensors + JSON metadata); returns the path.

        A ticket that names a built-in architecture is checked against it first, so a
        file that could not be loaded back is never written.
        """
        path = Path(path)
        if path.is_dir():
            raise TicketFormatError(f"{path}: is a directory; give a file name to save to")
        if self.arch is not None and arch_registry.is_known(self.arch):
            self.check_fits(self.arch)
        meta = {k: v for k, v in self.meta.items() if k != "source"}  # where it was read from
        meta["sparsity"] = self.sparsity
        try:
            meta_json = json.dumps(meta, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TicketFormatError(f"ticket meta is not JSON-serialisable: {exc}") from None
        tensors = {f"masks/{k}": v for k, v in self.masks.items()}
        for section in ("weights", "rewind"):
            state = getattr(self, section)
            if state is not None:
                tensors.update({f"{section}/{k}": v for k, v in state.items()})
        metadata = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "arch": self.arch or "",
            "meta": meta_json,
            "sections": ",".join(s for s in _SECTIONS if getattr(self, s) is not None),
        }
        checkpoint_io.write_safetensors(path, tensors, metadata)
        return path

    @classmethod
    def from_module(cls, module: nn.Module, arch: str | None = None) -> Ticket:
        """The ticket a live module carries (pruning hooks, else exact zeros)."""
        return load_ticket(module, arch=arch)

    def __repr__(self) -> str:
        parts = [f"{len(self.masks)} masked layers", f"density {self.density:.4f}"]
        if self.arch:
            parts.insert(0, f"arch={self.arch}")
        carried = [s for s in ("weights", "rewind") if getattr(self, s) is not None]
        parts.append("with " + "+".join(carried) if carried else "masks only")
        if "source_format" in self.meta:
            parts.append(f"from {self.meta['source_format']}")
        return f"Ticket({', '.join(parts)})"


# ---------------------------------------------------------------------- loading


def load_ticket(source: str | os.PathLike | nn.Module | Mapping, arch: str | None = None) -> Ticket:
    """Read a ticket from a file, directory, loaded checkpoint dict or live module.

    The layout is detected from the content (see :mod:`sparse_ops.importers` for the
    list). With ``arch``, the ticket is checked against that architecture and any
    mismatch (missing/unexpected keys, shapes) raises a clear error.
    Loading never executes code.
    """
    if isinstance(source, nn.Module):
        imported = importers.from_module(source)
        where = importers.module_label(source)
    elif isinstance(source, Mapping):
        imported = importers.from_object(source, "<dict>")
        where = "<dict>"
    else:
        imported = _import_path(Path(source))
        where = str(source)
    try:
        ticket = Ticket(
            imported.masks, imported.weights, imported.arch, imported.meta, rewind=imported.rewind
        )
    except TicketMismatchError as exc:
        raise TicketMismatchError(f"{where}: {exc}") from None
    # A ticket that names a built-in architecture must fit it, even when the caller
    # does not ask; a custom name (the user's own model) cannot be checked here.
    check = arch if arch is not None else ticket.arch
    if check is not None and (arch is not None or arch_registry.is_known(check)):
        try:
            ticket = ticket.with_arch(check)
        except TicketMismatchError as exc:
            raise TicketMismatchError(f"{where}: {exc}") from None
    return ticket


def _import_path(path: Path) -> importers.Imported:
    if not path.exists():
        raise TicketFormatError(f"{path}: no such file or directory")
    if path.is_dir():
        imported = importers.from_open_lth_level(path)
    else:
        kind = checkpoint_io.sniff(path)
        if kind == checkpoint_io.SAFETENSORS:
            tensors, metadata = checkpoint_io.read_safetensors(path)
            if metadata.get("format") == FORMAT_NAME:
                imported = _read_ours(path, tensors, metadata)
            elif metadata.get("format") == CONVERTED_FORMAT_NAME:
                raise TicketFormatError(
                    f"{path}: a converted module, not a ticket; load it with "
                    "sparse_ops.load_converted (its masks are compiled into packed layers)"
                )
            else:
                imported = importers.from_state_dict(tensors, str(path))
        elif kind in (checkpoint_io.TORCH_ZIP, checkpoint_io.TORCH_LEGACY):
            if path.name == "mask.pth" and any(path.parent.glob("model_ep*_it*.pth")):
                imported = importers.from_open_lth_level(path.parent)
            else:
                imported = importers.from_object(checkpoint_io.load_torch(path), str(path))
        elif kind == checkpoint_io.PICKLE:
            raise TicketFormatError(
                f"{path}: a plain Python pickle, not a torch or safetensors checkpoint; "
                "refusing to unpickle it (that would execute code)"
            )
        else:
            raise TicketFormatError(
                f"{path}: unrecognised file format (recognised: {importers.recognised_formats()})"
            )
    imported.meta["source"] = str(path)
    return imported


def _read_ours(path: Path, tensors: dict, metadata: dict[str, str]) -> importers.Imported:
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


# ---------------------------------------------------------------------- helpers


def _as_masks(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(masks, Mapping):
        raise TicketMismatchError(f"masks must be a dict of tensors, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(mask, torch.Tensor):
            raise TicketMismatchError(f"mask {name!r} is a {type(mask).__name__}, not a tensor")
        if mask.is_meta:
            raise TicketMismatchError(f"mask {name!r} is on the meta device: it has no values")
        if mask.layout != torch.strided:
            mask = mask.to_dense()
        check_mask_shape(name, mask)
        if mask.dtype != torch.bool:
            values = mask.detach().cpu()
            if values.is_floating_point() or values.is_complex():
                values = values.to(torch.float64)  # fp8 and friends lack comparisons
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                raise TicketMismatchError(f"mask {name!r} holds NaN/Inf values")
            bad = values[(values != 0) & (values != 1)]
            if bad.numel():
                raise TicketMismatchError(
                    f"mask {name!r} {tuple(mask.shape)} holds values other than 0/1 "
                    f"({bad.numel()} of them, e.g. {bad.flatten()[0].item()!r})"
                )
        out[str(name)] = mask.detach().to("cpu").bool().contiguous()
    return out


def _non_finite(t: torch.Tensor) -> int:
    """Number of NaN/Inf entries (0 for non-float tensors)."""
    if not (t.is_floating_point() or t.is_complex()):
        return 0
    try:
        finite = torch.isfinite(t)
    except (NotImplementedError, RuntimeError):  # e.g. float8 on some builds
        finite = torch.isfinite(t.to(torch.float32))
    return int(finite.numel() - torch.count_nonzero(finite))


def _as_state(state: Mapping[str, torch.Tensor] | None, section: str) -> dict | None:
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise TicketMismatchError(f"{section} must be a state dict, got {type(state).__name__}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TicketMismatchError(f"{section}: non-tensor values under {listing(bad)}")
    return {str(k): v.detach().to("cpu") for k, v in state.items()}


def _has_pruning_hook(module: nn.Module) -> bool:
    return any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values())


def unpruned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every torch.nn.utils.prune re-parametrisation made
    permanent (``weight = weight_orig × weight_mask`` as a plain parameter).

    torch.nn.utils.prune keeps ``weight`` as a plain attribute computed with autograd on,
    a non-leaf tensor that ``copy.deepcopy`` refuses; it is recomputed from
    ``weight_orig`` and the mask, so a detached copy of it is exact."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    plain = copy.deepcopy(model, memo)
    for module in plain.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return plain


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


@dataclass(frozen=True)
class _Signature:
    """What a ticket is checked against: state shapes and conv/linear weight shapes."""

    label: str
    shapes: dict[str, tuple[int, ...]]
    maskable: dict[str, tuple[int, ...]]
    classifier: str | None  # weight key of the last Linear


def _module_signature(model: nn.Module, label: str | None = None) -> _Signature:
    # Pruning pairs fold back to parameter names, so a pruned model checks like a plain one.
    state = importers.weights_without_masks(model.state_dict(), type(model).__name__)
    maskable = {}
    classifier = None
    for mname, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            key = f"{mname}.weight" if mname else "weight"
            # weight_orig under pruning; .weight is computed under parametrizations
            weight = getattr(module, "weight_orig", None)
            maskable[key] = tuple((weight if weight is not None else module.weight).shape)
            if isinstance(module, nn.Linear):
                classifier = key
    return _Signature(
        label or type(model).__name__,
        {k: tuple(v.shape) for k, v in state.items()},
        maskable,
        classifier,
    )


@functools.lru_cache(maxsize=64)
def _arch_signature(arch: str, num_classes: int) -> _Signature:
    return _module_signature(arch_registry.shape_model(arch, num_classes), arch)


def maskable_weights(ticket: Ticket) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every conv/linear weight of the ticket's architecture."""
    if ticket.arch is None:
        raise TicketMismatchError("the ticket names no architecture")
    return dict(_arch_signature(ticket.arch, _num_classes_for(ticket.arch, ticket)).maskable)


def _num_classes_for(arch: str, ticket: Ticket) -> int:
    """The classifier width a ticket implies for ``arch`` (10 when it cannot tell)."""
    key = _arch_signature(arch, 10).classifier
    if key is None:
        return 10
    for state in (ticket.weights, ticket.rewind, ticket.masks):
        if state is not None:
            for candidate in (key, f"model.{key}", key.removeprefix("model.")):
                if candidate in state and state[candidate].dim() == 2:
                    return int(state[candidate].shape[0])
    return 10


def _align_model_prefix(ticket: Ticket, keys: set[str]) -> Ticket:
    """Add or drop a ``model.`` key prefix when that alone makes the keys match.

    open_lth nests ImageNet ResNets as ``model.<torchvision name>``; the same ticket
    is then usable with our torchvision-named ``resnet*`` and vice versa.
    """
    names = set(ticket.masks) | set(ticket.weights or {})
    if not names or names <= keys:
        return ticket
    model_prefixed = all(k.startswith("model.") for k in keys)
    ticket_prefixed = all(n.startswith("model.") for n in names)
    if ticket_prefixed and not model_prefixed:

        def rename(k: str) -> str:
            return k.removeprefix("model.")

        change = "removed 'model.'"
    elif model_prefixed and not ticket_prefixed:

        def rename(k: str) -> str:
            return "model." + k

        change = "added 'model.'"
    else:
        return ticket
    if not {rename(n) for n in names} <= keys:
        return ticket

    def remap(state):
        return None if state is None else {rename(k): v for k, v in state.items()}

    meta = dict(ticket.meta, key_prefix_change=change)
    return Ticket(
        remap(ticket.masks), remap(ticket.weights), ticket.arch, meta, rewind=remap(ticket.rewind)
    )
