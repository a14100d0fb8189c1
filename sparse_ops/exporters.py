"""Write tickets back in the layouts the origin code reads.

So a ticket structured or transformed here can be retrained with the original
research code:

* :func:`to_prune_state` — a state dict in the torch.nn.utils.prune convention
  (``<name>_orig`` + float ``<name>_mask``), what ``model.state_dict()`` of a pruned
  model returns;
* :func:`save_structure_lth` — Structure-LTH's checkpoint dict (``state_dict`` in the
  prune convention with a mask on every conv but ``conv1``, dense ``init_weight``,
  ``epoch``, ``best_sa``, ``state``, ``result``, fresh ``optimizer``/``scheduler``);
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
from .errors import TicketMismatchError, listing
from .importers import is_conv_or_linear_weight

if TYPE_CHECKING:
    from .tickets.ticket import Ticket


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


# Structure-LTH's loaders (prune_model_custom, main_imp*.py --resume) attach a mask to
# every nn.Conv2d whose module name is not literally "conv1" and then load the state
# dict strictly; nothing else is ever pruned there.
STRUCTURE_LTH_UNPRUNED = ("conv1",)
# Their SGD / MultiStepLR defaults (main_imp.py), used when a ticket records no recipe.
_SLTH_RECIPE = {
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "milestones": (80, 120),
    "gamma": 0.1,
}
# Names of the convs this exporter gave all-ones masks, so load_ticket can drop them
# again (their loader ignores keys it does not read).
UNMASKED_KEY = "sparse_ops_unmasked"


def save_structure_lth(
    ticket: Ticket,
    path: str | os.PathLike,
    *,
    epoch: int | None = None,
    best_sa: float | None = None,
    state: int | None = None,
) -> Path:
    """A checkpoint Structure-LTH's scripts accept as ``--pretrained`` / ``--mask_dir``
    and ``--resume`` (``--checkpoint``).

    ``state_dict`` carries ``weight_orig`` + ``weight_mask`` for *every* ``Conv2d`` but the
    one named ``conv1`` (all-ones masks where the ticket prunes nothing, e.g. VGG's stem
    ``features.0``), since their ``prune_model_custom`` expects exactly that set.
    ``optimizer`` / ``scheduler`` are fresh ``SGD`` / ``MultiStepLR`` state dicts (no
    momentum buffers) for the model's parameter count, the schedule advanced to ``epoch``,
    so ``--resume`` loads them; hyperparameters come from the ticket's ``meta["train"]``,
    else Structure-LTH's defaults.

    ``epoch``, ``best_sa`` and ``state`` (the IMP round) default to the ticket's meta
    (``epoch``/``best_sa``/``state``, or ``round``), else 0. Their ``--resume`` continues
    round ``state`` at epoch ``epoch``: pass ``epoch=<their --epochs>`` to go straight to
    the next pruning step. Raises :class:`TicketMismatchError` for a ticket that prunes
    ``conv1`` or a Linear layer: their strict ``load_state_dict`` rejects such keys.
    """
    meta = ticket.meta
    weights = ticket._section("weights")
    convs = [k for k, v in weights.items() if _is_slth_prunable(k, v)]
    foreign = [k for k, m in ticket.masks.items() if k not in convs and not bool(m.all())]
    if foreign:
        raise TicketMismatchError(
            f"Structure-LTH prunes only Conv2d layers other than 'conv1'; this ticket also "
            f"masks {listing(foreign)}, which their loader would reject"
        )
    unmasked = [k for k in convs if k not in ticket.masks]
    masks = {k: ticket.masks.get(k, torch.ones(weights[k].shape, dtype=torch.bool)) for k in convs}
    full = _with_masks(ticket, masks)
    epoch = int(epoch if epoch is not None else meta.get("epoch", 0))
    optimizer, scheduler = _fresh_optimizer_state(ticket, epoch)
    ckpt: dict = {
        "state": state if state is not None else meta.get("state", meta.get("round", 0)),
        "result": {"train": [], "ta": [], "test_ta": []},
        "epoch": epoch,
        "state_dict": to_prune_state(full, "weights"),
        "best_sa": best_sa if best_sa is not None else meta.get("best_sa", 0.0),
        "optimizer": optimizer,
        "scheduler": scheduler,
        UNMASKED_KEY: unmasked,
    }
    if ticket.rewind is not None:
        ckpt["init_weight"] = dict(ticket.rewind)
    path = Path(path)
    _torch_save(ckpt, path)
    return path


def _is_slth_prunable(key: str, value: torch.Tensor) -> bool:
    # A 4-D floating ".weight" is a Conv2d weight (Conv1d/3d are 3-D/5-D, BN 1-D).
    module = key.removesuffix(".weight")
    return (
        key.endswith(".weight")
        and value.dim() == 4
        and value.is_floating_point()
        and module not in STRUCTURE_LTH_UNPRUNED
    )


def _with_masks(ticket: Ticket, masks: dict[str, torch.Tensor]) -> Ticket:
    out = ticket.copy()
    out.masks = masks
    return out


def _fresh_optimizer_state(ticket: Ticket, epoch: int) -> tuple[dict, dict]:
    """State dicts of a new SGD and MultiStepLR over as many parameters as the model has
    (``optimizer.load_state_dict`` checks only the count per group)."""
    import warnings

    recipe = dict(_SLTH_RECIPE)
    train = ticket.meta.get("train") or {}
    for key in ("lr", "momentum", "weight_decay", "gamma"):
        if key in train:
            recipe[key] = train[key]
    if "milestones" in train and "epochs" in train:  # ours are fractions of the epochs
        epochs = int(train["epochs"])
        recipe["milestones"] = sorted({max(1, round(f * epochs)) for f in train["milestones"]})
    params = [torch.zeros(1, requires_grad=True) for _ in range(_parameter_count(ticket))]
    optimizer = torch.optim.SGD(
        params, lr=recipe["lr"], momentum=recipe["momentum"], weight_decay=recipe["weight_decay"]
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, list(recipe["milestones"]), recipe["gamma"]
    )
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore")
        for _ in range(epoch):
            scheduler.step()
    return optimizer.state_dict(), scheduler.state_dict()


def _parameter_count(ticket: Ticket) -> int:
    from . import models

    if ticket.arch is not None and models.is_known(ticket.arch):
        return sum(1 for _ in ticket.create_model(device="meta").parameters())
    # Without an architecture: every weight/bias entry is a parameter, the rest
    # (running statistics, normalize.mean/std, counters) are buffers.
    return sum(1 for k in ticket._section("weights") if k.endswith((".weight", ".bias")))


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
