"""Refill / Refill+ (Structure-LTH): make a mask channel-wise by keeping whole channels.

Per conv layer with mask density ``d`` (nonzeros / size) and ``Cout`` output channels,
keep

    K = ⌊ d·Cout + (Cout − d·Cout) · extra ⌋

channels (``extra = 0``: Refill; ``extra > 0``: Refill+), at least ``min_channels``
for a layer that had any nonzero. The kept channels become fully dense, and the
others fully pruned. ``d·Cout`` is computed exactly (nonzeros / row length, as a
fraction), so a whole number never rounds down.

Channels are ranked by a criterion, highest first, ties broken by the lower channel
index (deterministic; the original broke ties at random):

``l1`` (default)
    ℓ1 norm of the channel's trained weights under the current mask.
``l2``
    ℓ2 norm of the same.
``remain``
    number of unpruned weights in the channel (the original code's default).
``feature_l1`` / ``feature_l2``
    ℓ1 / squared-ℓ2 norm of the channel's output feature map over a batch (model in
    eval mode, masked trained weights).
``saliency``
    ``Σ |a · ∂L/∂a|`` over the batch and positions, ``a`` the channel's output and
    ``L`` the cross-entropy of the batch's targets.

The original code viewed an NCHW feature map as ``(C, -1)``, which mixes batch and
channel. Ours sums per channel over batch and space.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseOpsError
from ..tickets.fitting import unpruned_copy
from ..tickets.ticket import Ticket
from .layers import LINEAR, layer_kinds, select
from .report import LayerChange

CRITERIA = ("l1", "l2", "remain", "feature_l1", "feature_l2", "saliency")
ACTIVATION_CRITERIA = ("feature_l1", "feature_l2", "saliency")


class RefillError(SparseOpsError):
    """Refill cannot run as asked (missing weights, batch, ...)."""


def kept_channels(nnz: int, row_length: int, cout: int, extra: float = 0.0) -> int:
    """⌊ d·Cout + (Cout − d·Cout)·extra ⌋ with d·Cout = nnz / row_length, exactly."""
    if not 0 <= extra <= 1:
        raise RefillError(f"extra must be in [0, 1], got {extra!r}")
    channels = Fraction(nnz, row_length)
    return int(channels + (cout - channels) * Fraction(str(extra)))


def _top_channels(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores; ties go to the lower index."""
    order = torch.sort(scores.to(torch.float64), descending=True, stable=True).indices
    return order[:k]


def refill_mask(
    mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    extra: float = 0.0,
    min_channels: int = 1,
    name: str = "<mask>",
) -> tuple[torch.Tensor, LayerChange]:
    """Refill one mask given per-output-channel ``scores``."""
    mask = mask.detach().to("cpu", torch.bool)
    cout = mask.shape[0]
    if scores.shape != (cout,):
        raise RefillError(f"{name}: need {cout} channel scores, got shape {tuple(scores.shape)}")
    nnz = int(mask.sum())
    if nnz == 0:
        return mask.clone(), LayerChange.compare(name, mask, mask, "empty", channels_kept=0)
    k = kept_channels(nnz, mask[0].numel(), cout, extra)
    k = min(cout, max(k, min_channels))
    new = torch.zeros_like(mask)
    new[_top_channels(scores, k)] = True
    change = LayerChange.compare(name, mask, new, "refilled", channels_kept=k, channels=cout)
    return new, change


def channel_scores(
    ticket: Ticket,
    names: list[str],
    criterion: str,
    *,
    model: nn.Module | None = None,
    batch: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-output-channel importance of each named layer under ``criterion``."""
    if criterion not in CRITERIA:
        raise RefillError(f"unknown refill criterion {criterion!r}; choose from {CRITERIA}")
    if criterion == "remain":
        return {n: ticket.masks[n].flatten(1).sum(1).to(torch.float64) for n in names}
    if ticket.weights is None:
        raise RefillError(
            f"criterion {criterion!r} needs the ticket's trained weights and this ticket "
            "has none; use criterion='remain'"
        )
    if criterion in ("l1", "l2"):
        masked = ticket.masked_weights()
        p = 1 if criterion == "l1" else 2
        return {n: masked[n].flatten(1).to(torch.float64).norm(p=p, dim=1) for n in names}
    return _feature_scores(ticket, names, criterion, model, batch)


def _feature_scores(
    ticket: Ticket,
    names: list[str],
    criterion: str,
    model: nn.Module | None,
    batch: tuple[torch.Tensor, ...] | None,
) -> dict[str, torch.Tensor]:
    if batch is None or (criterion == "saliency" and len(batch) < 2):
        need = "(inputs, targets)" if criterion == "saliency" else "(inputs, ...)"
        raise RefillError(f"criterion {criterion!r} needs batch={need}")
    net = _scoring_model(ticket, model)
    outputs: dict[str, torch.Tensor] = {}

    def keep(layer: str) -> Callable:
        def hook(_module, _inputs, output):
            if criterion == "saliency":
                output.retain_grad()
            outputs[layer] = output

        return hook

    handles = [
        net.get_submodule(n.rpartition(".")[0]).register_forward_hook(keep(n)) for n in names
    ]
    try:
        inputs = batch[0].to(next(net.parameters()).device)
        with torch.set_grad_enabled(criterion == "saliency"):
            logits = net(inputs)
            if criterion == "saliency":
                targets = batch[1].to(logits.device)
                F.cross_entropy(logits, targets).backward()
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for n in names:
        a = outputs[n].detach()
        if criterion == "feature_l1":
            s = a.abs().sum(dim=(0, 2, 3))
        elif criterion == "feature_l2":
            s = a.pow(2).sum(dim=(0, 2, 3))
        else:
            s = (a * outputs[n].grad).abs().sum(dim=(0, 2, 3))
        scores[n] = s.to("cpu", torch.float64)
    return scores


def _scoring_model(ticket: Ticket, model: nn.Module | None) -> nn.Module:
    """A private copy of the network carrying the ticket's masked trained weights."""
    net = ticket.create_model() if model is None else unpruned_copy(model)
    ticket.apply(net, "weights", hooks=False)
    return net.eval()


def refill(
    ticket: Ticket,
    *,
    extra: float = 0.0,
    criterion: str = "l1",
    model: nn.Module | None = None,
    batch: tuple[torch.Tensor, ...] | None = None,
    layers: list[str] | None = None,
    min_channels: int = 1,
) -> Ticket:
    """Refill (``extra=0``) or Refill+ (``extra>0``) every conv mask of ``ticket``.

    Linear masks are left as they are and reported as skipped. The result's meta
    carries ``method`` (``"refill"`` / ``"refill+"``) and ``structure_report``; group
    layouts of refilled layers are dropped (they no longer describe the mask).
    """
    if min_channels < 0:
        raise RefillError(f"min_channels must be ≥ 0, got {min_channels}")
    kinds = layer_kinds(ticket, model)
    names = [n for n in select(ticket, layers) if kinds[n] != LINEAR]
    scores = channel_scores(ticket, names, criterion, model=model, batch=batch)
    masks = dict(ticket.masks)
    changes = []
    for name in select(ticket, layers):
        if name not in scores:
            changes.append(LayerChange.compare(name, masks[name], masks[name], "skipped: linear"))
            continue
        masks[name], change = refill_mask(
            masks[name], scores[name], extra=extra, min_channels=min_channels, name=name
        )
        changes.append(change)
    method = "refill+" if extra > 0 else "refill"
    layouts = {k: v for k, v in ticket.meta.get("groups", {}).items() if k not in scores}
    meta = dict(ticket.meta, method=method, groups=layouts)
    meta["structure_report"] = {
        "method": method,
        "params": {"extra": extra, "criterion": criterion, "min_channels": min_channels},
        "layers": [c.as_dict() for c in changes],
    }
    return Ticket(masks, ticket.weights, ticket.arch, meta, rewind=ticket.rewind)
