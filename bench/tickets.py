"""Tickets of a chosen sparsity for speed measurements (no training needed).

Speed depends on a ticket's structure and density, not on what it was trained for, so
sweeps use tickets drawn at exact densities:

``refill``
    uniform random masks at the density, then Refill by remaining-weight count (the
    Structure-LTH code's default criterion): whole output channels, as IMP + Refill
    produces.
``regroup``
    Regroup-shaped masks: output channels shuffled and cut into groups of
    ``rows_per_group`` (Regroup's ``b1`` = 32); each group keeps a dense block over a
    random ``density · n`` of the ``n = kh·kw·Cin`` GEMM columns. Every row keeps the
    same count, so the layer's density is exact. The layout goes into
    ``meta["groups"]`` as :func:`sparse_ops.structure.regroup` writes it.
``random``
    uniform random (unstructured) masks: what IMP produces with no post-processing.

Prunable layers are IMP's (:func:`sparse_ops.imp.prunable`: stem and classifier
excluded).
"""

from __future__ import annotations

import torch
from torch import nn

from sparse_ops import Ticket, imp, structure
from sparse_ops.layouts import Group, GroupLayout

from . import BenchError

METHODS = ("refill", "regroup", "random")


def group_mask(
    shape: tuple[int, ...], density: float, generator: torch.Generator, rows_per_group: int = 32
) -> tuple[torch.Tensor, list[dict]]:
    """A regroup-shaped mask of ``shape`` at ``density``, and its group layout (the form a
    ticket's ``meta["groups"]`` holds)."""
    cout = shape[0]
    n = int(torch.tensor(shape[1:]).prod())
    keep = max(1, round(density * n))
    order = torch.randperm(cout, generator=generator)
    groups = []
    for rows in order.split(rows_per_group):
        cols = torch.randperm(n, generator=generator)[:keep].sort().values
        groups.append(Group(tuple(rows.sort().values.tolist()), tuple(cols.tolist())))
    layout = GroupLayout(tuple(groups))
    return layout.to_mask(tuple(shape)), layout.as_meta()


def make_ticket(
    model: nn.Module,
    method: str,
    sparsity: float,
    *,
    names: list[str] | None = None,
    seed: int = 0,
    arch: str | None = None,
) -> Ticket:
    """A ``method`` ticket of ``model`` at ``sparsity`` over ``names`` (default: IMP's)."""
    if method not in METHODS:
        raise BenchError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= sparsity < 1.0:
        raise BenchError(f"sparsity must be in [0, 1), got {sparsity}")
    density = 1.0 - sparsity
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = names if names is not None else imp.prunable(model)
    names = [n for n in names if state[n].dim() == 4]  # convs: the kernels' domain
    generator = torch.Generator().manual_seed(seed)
    masks, layouts = {}, {}
    for name in names:
        shape = tuple(state[name].shape)
        if method == "regroup":
            masks[name], layouts[name] = group_mask(shape, density, generator)
        else:
            masks[name] = torch.rand(shape, generator=generator) < density
    ticket = Ticket(masks, state, arch)
    if method == "refill":
        ticket = structure.refill(ticket, criterion="remain")
    elif method == "regroup":
        ticket.meta["groups"] = layouts
    ticket.meta.update(method=method, target_sparsity=sparsity, seed=seed)
    return ticket
