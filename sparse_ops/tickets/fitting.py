"""Fitting tickets to architectures: what a model's state looks like, and whether a
ticket's masks and weights match it.

The functions take anything with a ticket's ``masks`` / ``weights`` / ``rewind``
sections (:class:`TicketSections`), so this module stays below :mod:`.ticket`, whose
methods call into it.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.utils import prune

from .. import importers
from .. import models as arch_registry
from ..errors import TicketMismatchError, listing


class TicketSections(Protocol):
    """The parts of a :class:`~sparse_ops.tickets.Ticket` fitting reads."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor] | None
    rewind: dict[str, torch.Tensor] | None
    arch: str | None


def _is_optional_key(key: str) -> bool:
    """State keys an architecture can supply itself when a checkpoint lacks them."""
    return key.endswith("num_batches_tracked") or key in ("normalize.mean", "normalize.std")


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


def check_fits(ticket: TicketSections, model_or_arch: nn.Module | str) -> None:
    """Raise :class:`TicketMismatchError` unless ``ticket`` fits the architecture
    (the rules are :meth:`Ticket.check_fits <sparse_ops.tickets.Ticket.check_fits>`'s)."""
    if isinstance(model_or_arch, str):
        sig = _arch_signature(model_or_arch, num_classes_for(model_or_arch, ticket))
    else:
        sig = _module_signature(model_or_arch)
    label, shapes, maskable = sig.label, sig.shapes, sig.maskable
    errors = []
    not_maskable = [n for n in ticket.masks if n not in maskable]
    if not_maskable:
        errors.append(
            f"masks for names that are not conv/linear weights of {label}: {listing(not_maskable)}"
        )
    mismatched = [
        f"{n} {tuple(m.shape)} vs {maskable[n]}"
        for n, m in ticket.masks.items()
        if n in maskable and tuple(m.shape) != maskable[n]
    ]
    if mismatched:
        errors.append(f"mask shapes differ from {label}'s: {', '.join(mismatched[:6])}")
    for section in ("weights", "rewind"):
        state = getattr(ticket, section)
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


def arch_state_keys(arch: str, ticket: TicketSections) -> set[str]:
    """The state keys of ``arch`` at the classifier width ``ticket`` implies."""
    return set(_arch_signature(arch, num_classes_for(arch, ticket)).shapes)


def maskable_weights(ticket: TicketSections) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of every conv/linear weight of the ticket's architecture."""
    if ticket.arch is None:
        raise TicketMismatchError("the ticket names no architecture")
    return dict(_arch_signature(ticket.arch, num_classes_for(ticket.arch, ticket)).maskable)


def num_classes_for(arch: str, ticket: TicketSections) -> int:
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


def model_prefix_change(names: set[str], keys: set[str]) -> tuple[Callable[[str], str], str] | None:
    """``(rename, description)`` adding or dropping a ``model.`` key prefix when that
    alone makes ``names`` a subset of ``keys``; None when no such change is needed or
    helps.

    open_lth nests ImageNet ResNets as ``model.<torchvision name>``; the same ticket
    is then usable with our torchvision-named ``resnet*`` and vice versa.
    """
    if not names or names <= keys:
        return None
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
        return None
    if not {rename(n) for n in names} <= keys:
        return None
    return rename, change


def has_pruning_hook(module: nn.Module) -> bool:
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
