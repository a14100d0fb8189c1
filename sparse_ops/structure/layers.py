"""Which masked layers a structuring step applies to."""

from __future__ import annotations

from torch import nn

from .. import models
from ..errors import TicketMismatchError
from ..tickets.ticket import Ticket

CONV = "conv"
LINEAR = "linear"
GROUPED = "grouped conv"  # depthwise and other groups > 1: no shared GEMM columns


def layer_kinds(ticket: Ticket, model: nn.Module | None = None) -> dict[str, str]:
    """``{mask name: kind}``. Conv grouping is read from ``model`` or the ticket's
    architecture; without either, every 4-D mask counts as an ordinary conv."""
    modules: dict[str, nn.Module] = {}
    if model is None and ticket.arch is not None and models.is_known(ticket.arch):
        model = ticket.create_model("meta")
    if model is not None:
        modules = dict(model.named_modules())
    kinds = {}
    for name, mask in ticket.masks.items():
        module = modules.get(name.rpartition(".")[0])
        if mask.dim() == 2:
            kinds[name] = LINEAR
        elif isinstance(module, nn.Conv2d) and module.groups > 1:
            kinds[name] = GROUPED
        else:
            kinds[name] = CONV
    return kinds


def select(ticket: Ticket, layers: list[str] | None) -> list[str]:
    """Mask names to process: all, or the named ones (each must exist)."""
    if layers is None:
        return list(ticket.masks)
    unknown = [n for n in layers if n not in ticket.masks]
    if unknown:
        raise TicketMismatchError(
            f"no mask named {', '.join(map(repr, unknown))} in the ticket "
            f"(masked layers: {', '.join(list(ticket.masks)[:6])}...)"
        )
    return list(layers)
