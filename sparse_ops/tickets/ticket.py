"""The :class:`Ticket` type: binary masks over conv/linear weights, with the weights
they belong to.

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

Saved in our format (:mod:`.ticket_file`); read from any layout by
:func:`~.loading.load_ticket`; checked against architectures by :mod:`.fitting`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from contextlib import nullcontext as _nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .. import checkpoint_io, importers
from .. import models as arch_registry
from ..errors import TicketFormatError, TicketMismatchError, listing
from ..masks import DEFAULT_MIN_BLOCK_ROWS, MaskStats, check_mask_shape, mask_stats
from . import fitting, ticket_file


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
        fitting.check_fits(self, model_or_arch)

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
            if fitting.has_pruning_hook(module)
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
        ticket = self._aligned_to(fitting.arch_state_keys(info.name, self))
        ticket.check_fits(info.name)
        if ticket is self:
            ticket = self.copy()
        ticket.arch = info.name
        return ticket

    def _aligned_to(self, keys: set[str]) -> Ticket:
        """This ticket, or a copy re-keyed across a ``model.`` prefix to match ``keys``."""
        found = fitting.model_prefix_change(set(self.masks) | set(self.weights or {}), keys)
        if found is None:
            return self
        rename, change = found

        def remap(state):
            return None if state is None else {rename(k): v for k, v in state.items()}

        meta = dict(self.meta, key_prefix_change=change)
        return Ticket(
            remap(self.masks), remap(self.weights), self.arch, meta, rewind=remap(self.rewind)
        )

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
        num_classes = fitting.num_classes_for(self.arch, self)
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
        sections = {s: getattr(self, s) for s in ("masks", "weights", "rewind")}
        checkpoint_io.write_safetensors(path, *ticket_file.encode_ticket(sections, self.arch, meta))
        return path

    @classmethod
    def from_module(cls, module: nn.Module, arch: str | None = None) -> Ticket:
        """The ticket a live module carries (pruning hooks, else exact zeros)."""
        return from_imported(importers.from_module(module), importers.module_label(module), arch)

    def __repr__(self) -> str:
        parts = [f"{len(self.masks)} masked layers", f"density {self.density:.4f}"]
        if self.arch:
            parts.insert(0, f"arch={self.arch}")
        carried = [s for s in ("weights", "rewind") if getattr(self, s) is not None]
        parts.append("with " + "+".join(carried) if carried else "masks only")
        if "source_format" in self.meta:
            parts.append(f"from {self.meta['source_format']}")
        return f"Ticket({', '.join(parts)})"


def from_imported(imported: importers.Imported, where: str, arch: str | None = None) -> Ticket:
    """The validated ticket of what an importer read from ``where``; see
    :func:`~.loading.load_ticket` for ``arch``."""
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


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model
