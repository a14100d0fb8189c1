"""Write tickets back in the layouts the origin code reads.

So a ticket structured or transformed here can be retrained with the original
research code:

* :func:`to_prune_state` — a state dict in the torch.nn.utils.prune convention
  (``<name>_orig`` + float ``<name>_mask``), what ``model.state_dict()`` of a pruned
  model returns;
* :func:`save_structure_lth` — Structure-LTH's checkpoint dict (``state_dict`` in the
  prune convention, dense ``init_weight``, ``epoch``, ``best_sa``, ``state``, ``result``);
* :func:`save_open_lth_level` — an open_lth level directory (``mask.pth`` with int32
  masks for *every* conv/linear weight, masked ``model_ep*_it*.pth`` files,
  ``sparsity_report.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import checkpoint_io
from .errors import TicketMismatchError
from .importers import is_conv_or_linear_weight

if TYPE_CHECKING:
    from .tickets import Ticket


def to_prune_state(ticket: Ticket, which: str = "weights") -> dict[str, torch.Tensor]:
    """``weights`` (or ``rewind``) in the torch.nn.utils.prune state-dict convention."""
    state = ticket._section(which)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ticket.masks:
            out[key + "_orig"] = value
            # torch.nn.utils.prune keeps masks in the weight's dtype
            out[key + "_mask"] = ticket.masks[key].to(value.dtype)
        else:
            out[key] = value
    return out


def save_structure_lth(
    ticket: Ticket,
    path: str | os.PathLike,
    *,
    epoch: int | None = None,
    best_sa: float | None = None,
    state: int | None = None,
) -> Path:
    """A checkpoint Structure-LTH's scripts accept as ``--pretrained`` / ``--mask_dir``.

    ``epoch``, ``best_sa`` and ``state`` (the IMP round) default to the ticket's meta
    (``epoch``/``best_sa``/``state``, or ``round``), else 0.
    """
    meta = ticket.meta
    ckpt: dict = {
        "state": state if state is not None else meta.get("state", meta.get("round", 0)),
        "result": {"train": [], "ta": [], "test_ta": []},
        "epoch": epoch if epoch is not None else meta.get("epoch", 0),
        "state_dict": to_prune_state(ticket, "weights"),
        "best_sa": best_sa if best_sa is not None else meta.get("best_sa", 0.0),
    }
    if ticket.rewind is not None:
        ckpt["init_weight"] = dict(ticket.rewind)
    path = Path(path)
    _torch_save(ckpt, path)
    return path


def save_open_lth_level(
    ticket: Ticket,
    directory: str | os.PathLike,
    *,
    start: str = "rewind",
    end_step: tuple[int, int] = (160, 0),
) -> Path:
    """An open_lth level directory open_lth and E-LTH can branch from.

    Writes ``mask.pth`` (int32, every conv/linear weight: unpruned ones all ones, as
    open_lth expects; that needs the ticket's weights to know which they are),
    ``model_ep0_it0.pth`` — the start point, from ``start`` (``"rewind"``, or
    ``"weights"`` for a ticket without rewind weights) — and, when the ticket has
    trained weights and they are not the start point, ``model_ep{E}_it{I}.pth``.
    Weight files are multiplied by the mask, as open_lth saves them.
    """
    if start not in ("rewind", "weights"):
        raise ValueError(f"start must be 'rewind' or 'weights', got {start!r}")
    if end_step <= (0, 0):
        raise ValueError(f"end_step must come after the start step (0, 0), got {end_step}")
    has_weights = ticket.weights is not None or ticket.rewind is not None
    if has_weights and getattr(ticket, start) is None:
        raise TicketMismatchError(
            f"the ticket has no {start} weights for open_lth's start point "
            f"(model_ep0_it0.pth); pass start={'weights' if start == 'rewind' else 'rewind'!r}"
        )
    directory = Path(directory)
    reference = ticket.weights if ticket.weights is not None else ticket.rewind
    if reference is None:
        masks = dict(ticket.masks)
    else:
        masks = {
            k: ticket.masks.get(k, torch.ones(v.shape, dtype=torch.bool))
            for k, v in reference.items()
            if is_conv_or_linear_weight(k, v)
        }
    if not masks:
        raise TicketMismatchError("nothing to export: the ticket has no masks and no weights")
    directory.mkdir(parents=True, exist_ok=True)
    _torch_save({k: m.to(torch.int32) for k, m in masks.items()}, directory / "mask.pth")
    if has_weights:
        _torch_save(ticket.masked_weights(start), directory / "model_ep0_it0.pth")
    if ticket.weights is not None and start != "weights":
        ep, it = end_step
        _torch_save(ticket.masked_weights("weights"), directory / f"model_ep{ep}_it{it}.pth")
    total = sum(m.numel() for m in masks.values())
    unpruned = sum(int(m.sum()) for m in masks.values())
    # E-LTH's "sparsity_ratio" is the kept fraction despite its name.
    report = {
        "total": float(total),
        "unpruned": float(unpruned),
        "sparsity_ratio": unpruned / total,
    }
    checkpoint_io.write_text(directory / "sparsity_report.json", json.dumps(report, indent=4))
    return directory


def _torch_save(obj, path: Path) -> None:
    with checkpoint_io.atomic_output(path) as tmp:
        torch.save(obj, tmp)
